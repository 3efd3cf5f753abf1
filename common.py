"""What several stages share, in the order data flows through the pipeline.

Stage scripts import only `model` and `common` from the project; this file imports only `model`.
  1. run setup: base dir, device, distributed, printing, atomic writes
  2. downloads (every one honours NANOCHAT_MIRROR): pretraining shards, the CORE eval bundle, hub datasets
  3. tokenizer and chat format: rendering, the chat prompt, the one parser of a reply's parts
  4. pretraining data: the BOS-aligned best-fit loader
  5. checkpoints and metrics: save, load, and one run lifecycle for pretrain.py, sft.py and rl.py
  6. tasks (chat datasets) and the code sandbox HumanEval runs answers in
  7. inference engine and calculator tool
  8. evaluation: bits per byte, CORE, chat tasks and ChatCORE
  9. report card
"""

import argparse
import ast
import base64
import bisect
import codecs
import collections
import concurrent.futures
import contextlib
import copy
import csv
import dataclasses
import datetime
import errno
import fcntl
import glob
import html
import json
import logging
import math
import operator
import os
import pickle
import platform
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import requests
import tiktoken
import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import load_gpt, sample_next_token, sampling_probs, set_decode_dtype


# ======== 1. Run setup ============================================================================

class NanochatError(SystemExit):
    """A problem the user has to fix (missing file, no network, bad checkpoint), said in one line.
    It subclasses SystemExit on purpose: uncaught, a script exits with status 1 and prints just the
    message, no traceback; code that wants to carry on (a server, a test) catches it by this name."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the docstring's layout and shows every flag's default."""


class ArgumentParser(argparse.ArgumentParser):
    """A mistake on the command line is one line naming the flag and what it takes (exit status 2),
    not the usage block of forty flags above it."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def argument_parser(doc):
    return ArgumentParser(description=doc, formatter_class=HelpFormatter)


def number_flag(kind, low=None, high=None, never=False, auto=False):
    """An argparse type: an int or float in [low, high]; never=True also takes -1, the flags' one word for
    never, unset or all; auto=True also takes "auto". A bad value is one line naming the flag and the range."""
    def parse(text):
        if auto and text == "auto":
            return text
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if math.isfinite(value) and (never and value == -1 or (low is None or value >= low) and
                                     (high is None or value <= high)):
            return value
        what = "an integer" if kind is int else "a number"
        bounds = f"{what} >= {low}" if high is None else f"{what} from {low} to {high}"
        raise argparse.ArgumentTypeError(f"{text!r} is not {bounds}" + " (or -1)" * never + " or auto" * auto)
    return parse


def int_flag(low=None, high=None, never=False, auto=False):
    return number_flag(int, low, high, never, auto)


def float_flag(low=None, high=None, never=False):
    return number_flag(float, low, high, never)


def add_stage_flags(parser, parent=None, lrs=(None, None, None)):
    """The flags pretrain.py, sft.py and rl.py share, with one meaning in all three. parent: the stage whose
    checkpoint this one starts from; lrs: defaults of the embedding, unembedding and matrix LRs."""
    parser.add_argument("--device-type", default="", choices=["", "cuda", "mps", "cpu"], help="'' = autodetect")
    if parent:
        parser.add_argument("--model-tag", default=None, help=f"{parent} checkpoint tag (None = the latest written)")
        parser.add_argument("--model-step", type=int_flag(0), default=None,
                            help=f"{parent} checkpoint step (None = the latest)")
    parser.add_argument("--resume-from-step", type=int_flag(0, never=True), default=-1,
                        help="continue exactly from this run's checkpoint at that step (-1 = start afresh)")
    parser.add_argument("--save-every", type=int_flag(1, never=True), default=-1,
                        help="checkpoint every N steps (-1 = only at the end)")
    inherited = " (None = the base run's)" if lrs[0] is None else ""
    for name, default, what in zip(("embedding", "unembedding", "matrix"), lrs,
                                   ("AdamW LR of the token embeddings", "AdamW LR of lm_head",
                                    "Muon LR of the block matrices")):
        parser.add_argument(f"--{name}-lr", type=float_flag(0), default=default, help=what + inherited)


def add_sampling_flags(parser, temperature):
    """-t/--temperature and -k/--top-k, the same in every script that samples."""
    parser.add_argument("-t", "--temperature", type=float_flag(0, 2), default=temperature,
                        help="sampling temperature (0 = always the likeliest token)")
    parser.add_argument("-k", "--top-k", type=int_flag(0, 200), default=50,
                        help="sample among the k likeliest tokens (0 = all)")


def get_base_dir():
    base_dir = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    return make_dir(base_dir)


def make_dir(path, writable=False):
    """os.makedirs, but a folder that cannot be made (a file in the way, a read-only disk) or, with
    writable=True, cannot be written in is one line saying so. Returns path."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise NanochatError(f"cannot create the folder {path}: {e.strerror or e}; "
                            "set NANOCHAT_BASE_DIR to a writable folder") from None
    if writable and not os.access(path, os.W_OK):  # access() also reports a read-only mount
        raise NanochatError(f"cannot write in {path}: it is read-only; set NANOCHAT_BASE_DIR to a writable folder")
    return path


def autodetect_device_type():
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def compute_init(device_type="", seed=42):
    """Pick the device, seed the global RNG (it only drives weight init), join the torchrun process group.
    Returns (ddp, rank, local_rank, world_size, device)."""
    device_type = device_type or autodetect_device_type()
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if device_type not in available:
        raise NanochatError(f"unknown --device-type {device_type!r}: use cuda, mps or cpu")
    if not available[device_type]:
        raise NanochatError(f"--device-type {device_type} requested but it is not available here: "
                            f"use --device-type {autodetect_device_type()}")
    torch.manual_seed(seed)
    if device_type == "cuda":
        torch.cuda.manual_seed(seed)
        torch.set_float32_matmul_precision("high")  # TF32 for the few fp32 matmuls
    ddp = all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))  # torchrun sets them
    rank, local_rank, world_size = 0, 0, 1
    device = torch.device(device_type)
    if ddp:
        rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        if device_type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")  # CPU (and MPS, which has no collective backend) go through gloo
        dist.barrier()
    return ddp, rank, local_rank, world_size, device


def compute_cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def get_rank():
    return int(os.environ.get("RANK", 0))


def print0(*args, **kwargs):
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


def get_logger(name="nanochat"):
    """Logger that tags lines with the rank; ranks other than 0 only report warnings and errors."""
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {get_rank()}] %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO if get_rank() == 0 else logging.WARNING)
        logger.propagate = False
    return logger


# bf16 dense peak FLOP/s; substring match in this order, so the more specific names come first
PEAK_FLOPS = [
    ("GB200", 2.5e15), ("B200", 2.25e15), ("B100", 1.8e15),
    ("H200 NVL", 836e12), ("H200 PCIE", 836e12), ("H200", 989e12),
    ("H100 NVL", 835e12), ("H100 PCIE", 756e12), ("H100", 989e12),
    ("H800 NVL", 989e12), ("H800", 756e12), ("A100", 312e12), ("A800", 312e12),
    ("A40", 149.7e12), ("A30", 165e12), ("L40S", 362e12), ("L4", 121e12),
    ("MI355", 2.5e15), ("MI325", 1.3074e15), ("MI300X", 1.3074e15), ("MI300A", 980.6e12),
    ("MI250X", 383e12), ("MI250", 362.1e12), ("RTX 5090", 209.5e12), ("4090", 165.2e12), ("3090", 71e12),
]


def get_peak_flops(device_name):
    """Peak bf16 FLOP/s of a GPU from its name; inf when unknown (MFU then reads 0)."""
    name = device_name.upper()
    for key, flops in PEAK_FLOPS:
        if key in name:
            return flops
    return float("inf")


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Write to a temp file beside `path` and rename it over `path` only once the block has finished,
    so a crash or a full disk never leaves a half-written file under the real name. The temp name
    carries the writer's PID: remove_stale_temps clears what a killed writer left."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temps(folder):
    """Delete the temp files (atomic_write's <name>.tmp<pid>, download_file's <name>.tmp<pid>.<thread>)
    whose writer is no longer running: a killed save would otherwise leave gigabytes behind."""
    for path in glob.glob(os.path.join(glob.escape(folder), "*.tmp*")):
        m = re.search(r"\.tmp(\d+)(\.\d+)?$", path)
        if m and not pid_alive(int(m.group(1))):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def is_disk_full(e):
    """Is this write error a full disk? torch.save loses the errno and says "unexpected pos" instead."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(e, RuntimeError) and ("unexpected pos" in str(e) or "No space left" in str(e))


def rank_and_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def format_duration(seconds):
    """The one format of every ETA and duration: 42s, 11m54s, 1h02m."""
    seconds = max(int(seconds), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


_last_progress = [0.0]


def print_progress(line, final=False):
    """A status line that rewrites itself on a terminal; in a log file (no carriage returns) one line
    every 10 seconds at most, and the final one."""
    if sys.stdout.isatty():
        print0("\r" + line, end="\n" if final else "")
    elif final or time.time() - _last_progress[0] >= 10:
        _last_progress[0] = time.time()
        print0(line)


# ======== 2. Downloads (NANOCHAT_MIRROR: a mirror laid out like shared/data) ======================

MIRROR_HINT = "No network? Point NANOCHAT_MIRROR at a mirror URL or a directory laid out like shared/data"
SHARD_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main/shard_{:05d}.parquet"
NUM_SOURCE_SHARDS = 6543  # shards 0..6542 on the hub; the last one is the validation shard


def is_url(source):
    return source.startswith(("http://", "https://"))


def source_for(default_url, mirror_relpath):
    """Where to fetch a file from: the real URL, or the same file in $NANOCHAT_MIRROR, which is either
    a base URL or a local directory laid out like shared/data (pretrain/, eval_bundle/, mmlu/, ...)."""
    mirror = os.environ.get("NANOCHAT_MIRROR")
    if not mirror:
        return default_url
    if is_url(mirror):
        return mirror.rstrip("/") + "/" + mirror_relpath
    mirror = mirror.removeprefix("file://")
    return os.path.join(os.path.expanduser(mirror), mirror_relpath)


@contextlib.contextmanager
def file_lock(path):
    """Exclusive lock on `path`.lock, shared by threads, ranks and concurrent runs (POSIX flock)."""
    with open(path + ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def progress_line(desc, done, total, t0):
    """'desc  12.3/45.6 MB  3.1 MB/s | eta 11s' (total may be None when the server sends no length)."""
    elapsed = max(time.time() - t0, 1e-6)
    rate = done / elapsed
    if not total:
        return f"{desc}  {done / 1e6:.1f} MB  {rate / 1e6:.1f} MB/s"
    eta = (total - done) / rate if rate > 0 else 0
    return f"{desc}  {done / 1e6:.1f}/{total / 1e6:.1f} MB  {rate / 1e6:.1f} MB/s | eta {format_duration(eta)}"


class RetryableError(Exception):
    pass


class CannotConnect(RetryableError):
    """Host unknown or refusing: on the first attempt that means no network, so we fail at once."""


def short_reason(e):
    """requests nests the cause three deep; keep the innermost reason ('[Errno -2] Name or service not known')."""
    inner = getattr(e.args[0], "reason", None) if e.args else None
    text = str(inner or e)
    m = re.search(r"\[Errno -?\d+\] [^'\")]+", text)
    return f"{type(inner or e).__name__}: {m.group(0) if m else text[:200]}"


def _fetch_once(url, tmp, desc):
    """Stream one HTTP GET into `tmp`; raises RetryableError for what a retry can fix."""
    try:
        with requests.get(url, stream=True, timeout=(15, 60)) as r:
            if r.status_code in (408, 429) or r.status_code >= 500:
                raise RetryableError(f"HTTP {r.status_code}")
            if r.status_code >= 400:  # 404 and friends: retrying cannot help
                where = ("check that NANOCHAT_MIRROR is laid out like shared/data" if os.environ.get("NANOCHAT_MIRROR")
                         else "the file has moved upstream? Point NANOCHAT_MIRROR at a copy laid out like shared/data")
                raise NanochatError(f"could not download {url}: HTTP {r.status_code} {r.reason}; {where}")
            # Content-Length counts bytes on the wire: only comparable when the body is not re-encoded
            expected = None if r.headers.get("Content-Encoding") else r.headers.get("Content-Length")
            expected = int(expected) if expected is not None else None
            done, t0, last_print = 0, time.time(), 0.0
            with open(tmp, "wb") as f:
                for chunk in r.iter_content(chunk_size=1 << 20):
                    f.write(chunk)
                    done += len(chunk)
                    if desc and time.time() - last_print > 1.0:
                        print_progress(progress_line(desc, done, expected, t0))
                        last_print = time.time()
            if desc and last_print:
                print_progress(progress_line(desc, done, expected, t0), final=True)
    except requests.RequestException as e:  # refused, reset, timeout, body cut short
        inner = getattr(e.args[0], "reason", None) if e.args else None
        no_connection = type(inner).__name__ in ("NameResolutionError", "NewConnectionError", "ProxyError")
        raise (CannotConnect if no_connection else RetryableError)(short_reason(e)) from e
    if expected is not None and done != expected:
        raise RetryableError(f"got {done} of {expected} bytes")


def parquet_problem(path):
    """Why the parquet file at `path` is unreadable (truncated, empty, not parquet), or None when its
    magic bytes and footer are sound. Cheap: it reads the first and last bytes and the footer only."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(max(size - 4, 0))
            tail = f.read(4)
        if size < 12 or head != b"PAR1" or tail != b"PAR1":
            return f"{size} bytes, no parquet header and footer"
        pq.read_metadata(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError and others for a bad footer
        return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    return None


def check_download(tmp, source):
    """A fetched file named *.parquet must be sound before it takes its real name."""
    problem = parquet_problem(tmp) if source.endswith(".parquet") else None
    if problem and not is_url(source):
        raise NanochatError(f"the copy at {source} is not a readable parquet file ({problem}): replace it")
    if problem:
        raise RetryableError(f"the downloaded file is not a readable parquet file ({problem})")


def present(dest_path):
    """Is dest_path there and sound? A parquet file that fails the footer check is deleted (and so fetched again)."""
    if not os.path.exists(dest_path):
        return False
    problem = parquet_problem(dest_path) if dest_path.endswith(".parquet") else None
    if problem:
        print0(f"{dest_path} is corrupt ({problem}); fetching it again")
        with contextlib.suppress(FileNotFoundError):  # another rank removed it first
            os.remove(dest_path)
    return not problem


def download_file(source, dest_path, desc=None, attempts=5, backoff=None):
    """Fetch `source` (URL or local path, see source_for) to `dest_path` unless it is already there
    (a parquet file there that fails its footer check is fetched again). Streams to a temp file, checks
    the byte count (and a parquet's footer), renames; retries with exponential backoff
    (NANOCHAT_DOWNLOAD_BACKOFF seconds, default 2, doubling); a file lock makes ranks and concurrent
    runs wait for one download instead of racing. Raises NanochatError with a one-line reason."""
    if os.path.exists(dest_path) and (not dest_path.endswith(".parquet") or parquet_problem(dest_path) is None):
        return dest_path  # no lock needed: files under their final name are complete (a read-only folder works)
    backoff = float(os.environ.get("NANOCHAT_DOWNLOAD_BACKOFF", 2.0)) if backoff is None else backoff
    make_dir(os.path.dirname(os.path.abspath(dest_path)), writable=True)
    with file_lock(dest_path):
        if present(dest_path):  # already there, or someone else finished it while we waited for the lock
            return dest_path
        for stale in glob.glob(glob.escape(dest_path) + ".tmp*"):  # under the lock: left by a killed download
            os.remove(stale)
        tmp = f"{dest_path}.tmp{os.getpid()}.{threading.get_ident()}"
        try:
            if not is_url(source):
                if not os.path.isfile(source):
                    raise NanochatError(f"could not copy {source}: no such file (is NANOCHAT_MIRROR laid out like shared/data?)")
                shutil.copyfile(source, tmp)
                if os.path.getsize(tmp) != os.path.getsize(source):
                    raise NanochatError(f"could not copy {source}: size mismatch (disk full?)")
                check_download(tmp, source)
                os.replace(tmp, dest_path)
                return dest_path
            for attempt in range(attempts):
                try:
                    _fetch_once(source, tmp, desc)
                    check_download(tmp, source)
                    os.replace(tmp, dest_path)
                    return dest_path
                except RetryableError as e:
                    reason = str(e)
                    if attempt == 0 and isinstance(e, CannotConnect):
                        break
                    if attempt + 1 < attempts:
                        wait = backoff * 2 ** attempt
                        print0(f"download of {source} failed ({reason}); retry {attempt + 1}/{attempts - 1} in {wait:.0f}s")
                        time.sleep(wait)
            raise NanochatError(f"could not download {source}: {reason}. {MIRROR_HINT}")
        except OSError as e:
            if is_disk_full(e):
                raise NanochatError(f"no space left on device writing {dest_path}: free some space and run again") from None
            raise
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def pretrain_data_dir():
    return os.path.join(get_base_dir(), "base_data_climbmix")


def shard_path(index):
    return os.path.join(pretrain_data_dir(), f"shard_{index:05d}.parquet")


def num_source_shards():
    """How many shards the source holds (the last is validation): 6543 on the hub; for a mirror,
    counted in its directory or found by probing the URL (shards are numbered 0..n-1)."""
    mirror = os.environ.get("NANOCHAT_MIRROR")
    if not mirror:
        return NUM_SOURCE_SHARDS
    first = source_for(SHARD_URL.format(0), "pretrain/shard_00000.parquet")
    if not is_url(first):
        total = len(glob.glob(os.path.join(os.path.dirname(first), "shard_*.parquet")))
    else:
        total = _probe_shard_count(mirror)
    if total < 2:
        raise NanochatError(f"NANOCHAT_MIRROR={mirror} has {total} shards in pretrain/ (shard_00000.parquet, ...); "
                            "need at least 2, train + validation")
    return total


def _probe_shard_count(mirror):
    def exists(i):
        try:
            return requests.head(source_for("", f"pretrain/shard_{i:05d}.parquet"), timeout=15).ok
        except requests.RequestException as e:
            raise NanochatError(f"could not reach NANOCHAT_MIRROR={mirror}: {short_reason(e)}") from e
    if not exists(0):
        return 0
    lo, hi = 0, 1  # HEAD requests: exists(lo) holds; double hi until it fails, then bisect
    while exists(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if exists(mid) else (lo, mid)
    return hi


def download_shard(index):
    relpath = f"pretrain/shard_{index:05d}.parquet"
    return download_file(source_for(SHARD_URL.format(index), relpath), shard_path(index))


def repair_shards(files):
    """Check the footer of every local shard in `files`; one that fails it is fetched again from its
    source (the hub or NANOCHAT_MIRROR) before a loader trips over it in the middle of a run."""
    for path in files:
        problem = parquet_problem(path)
        if problem is None:
            continue
        m = re.fullmatch(r"shard_(\d+)\.parquet", os.path.basename(path))
        if not m or os.path.dirname(os.path.abspath(path)) != os.path.abspath(pretrain_data_dir()):
            raise NanochatError(f"{path} is not a readable parquet file ({problem}): delete or replace it")
        try:
            download_shard(int(m.group(1)))
        except NanochatError as e:
            raise NanochatError(f"{path} is corrupt ({problem}) and could not be fetched again: {e}") from None
    return files


def download_shards(num_train_shards, num_workers=4, background=False):
    """Download the first `num_train_shards` training shards plus the validation shard (the source's
    last), in parallel threads. -1 means all. With background=True returns a Future at once
    (its .result() waits and re-raises any error): the speedrun fetches data while the tokenizer trains."""
    if background:
        # a daemon thread: if the main work fails, the process exits without waiting for the downloads
        future = concurrent.futures.Future()

        def run():
            try:
                future.set_result(download_shards(num_train_shards, num_workers))
            except BaseException as e:  # NanochatError is a SystemExit: hand it to .result() too
                future.set_exception(e)
        threading.Thread(target=run, daemon=True).start()
        return future
    total = num_source_shards()
    num_train = total - 1 if num_train_shards < 0 else min(num_train_shards, total - 1)
    if num_train < num_train_shards:
        print0(f"the source has only {total - 1} training shards; downloading those")
    indices = [total - 1] + list(range(num_train))
    todo = [i for i in indices if parquet_problem(shard_path(i))]  # missing or corrupt
    t0, done_bytes = time.time(), 0
    pool = concurrent.futures.ThreadPoolExecutor(num_workers)
    try:
        futures = [pool.submit(download_shard, i) for i in todo]
        for n, future in enumerate(concurrent.futures.as_completed(futures), 1):
            done_bytes += os.path.getsize(future.result())
            eta = (time.time() - t0) / n * (len(todo) - n)
            print_progress(f"shards {n}/{len(todo)}  {done_bytes / 1e6:.0f} MB | eta {format_duration(eta)}",
                           final=n == len(todo))
    finally:
        pool.shutdown(cancel_futures=True)  # after a failure, do not start the thousands still queued
    return [shard_path(i) for i in indices]


EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"


def parse_core_yaml(text):
    """The few YAML forms core.yaml uses: a top-level key, "-" list items, `key: value` with a scalar,
    a double-quoted string or a [list]. (PyYAML is not a dependency for one small file.)"""
    def scalar(v):
        v = v.strip()
        if v.startswith('"'):
            return json.loads(v)  # YAML double-quoted escapes (\n) read like JSON's
        if v.startswith("["):
            return [scalar(x) for x in v[1:-1].split(",") if x.strip()]
        if v in ("true", "false"):
            return v == "true"
        return int(v) if v.lstrip("-").isdigit() else v.strip("'")
    tasks = []
    for line in text.splitlines():
        line = line.split(" #")[0].rstrip()
        if not line.strip() or line.lstrip().startswith("#") or not line.startswith((" ", "-")):
            continue  # blank, comment, or a top-level header such as "icl_tasks:"
        if line.startswith("-"):  # a new task, maybe with its first key on the same line
            tasks.append({})
            line = line[1:]
            if not line.strip():
                continue
        key, _, value = line.strip().partition(":")
        tasks[-1][key.strip()] = scalar(value)
    return tasks


def ensure_eval_bundle():
    """<base>/eval_bundle, fetched on first use: the zip from the reference's URL, or with NANOCHAT_MIRROR
    the unpacked files (core.yaml, eval_meta_data.csv, each task file the mirror has)."""
    bundle = os.path.join(get_base_dir(), "eval_bundle")
    if os.path.exists(os.path.join(bundle, "core.yaml")):
        return bundle
    tmp = tempfile.mkdtemp(dir=get_base_dir(), prefix="eval_bundle.tmp")
    try:
        if os.environ.get("NANOCHAT_MIRROR"):
            for name in ("core.yaml", "eval_meta_data.csv"):
                download_file(source_for(EVAL_BUNDLE_URL, f"eval_bundle/{name}"), os.path.join(tmp, name))
            with open(os.path.join(tmp, "core.yaml")) as f:
                uris = [task["dataset_uri"] for task in parse_core_yaml(f.read())]
            for uri in dict.fromkeys(uris):
                try:
                    download_file(source_for(EVAL_BUNDLE_URL, f"eval_bundle/eval_data/{uri}"),
                                  os.path.join(tmp, "eval_data", uri))
                except NanochatError as e:  # a mirror may hold only some tasks: CORE is then marked partial
                    print0(f"eval bundle: {uri} not on the mirror ({e})")
            for lock in glob.glob(os.path.join(tmp, "**", "*.lock"), recursive=True):
                os.remove(lock)  # download_file's lock files: not part of the bundle
            unpacked = tmp
        else:
            zip_path = download_file(EVAL_BUNDLE_URL, os.path.join(tmp, "eval_bundle.zip"), desc="eval_bundle.zip")
            with zipfile.ZipFile(zip_path) as z:
                z.extractall(tmp)
            unpacked = os.path.join(tmp, "eval_bundle")
        os.replace(unpacked, bundle)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return bundle


HF_HUB = "https://huggingface.co"
WORDS_URL = "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"
IDENTITY_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl"
# Hugging Face repo -> folder in the mirror layout (shared/data/README.md)
MIRROR_FOLDERS = {"cais/mmlu": "mmlu", "allenai/ai2_arc": "arc", "openai/gsm8k": "gsm8k",
                  "openai/openai_humaneval": "humaneval", "HuggingFaceTB/smol-smoltalk": "smoltalk"}


class MissingSplitError(NanochatError):
    """A dataset split the source does not have (the shared MMLU sample has no auxiliary_train).
    Scripts catch it by name to build a mixture without that task when the user asks for it."""


def task_data_dir(*parts):
    return os.path.join(get_base_dir(), "task_data", *parts)


def hub_listing_url(repo_id, subset, split):
    """The Hugging Face dataset-viewer endpoint listing the parquet files of one split; the hub converts
    every public dataset to parquet (branch refs/convert/parquet), so this works for all of them."""
    return f"{HF_HUB}/api/datasets/{repo_id}/parquet/{subset}/{split}"


def hub_mirror_relpath(repo_id, subset, split):
    # a dataset repo keeps its default config in data/ ; a mirror holds one file per split
    folder = MIRROR_FOLDERS.get(repo_id, repo_id.split("/")[-1])
    return f"{folder}/{'data' if subset == 'default' else subset}/{split}-00000-of-00001.parquet"


def source_missing(source):
    """After a failed download: is it because the file is not there at all (vs. network trouble)?"""
    if not is_url(source):
        return not os.path.isfile(source)
    try:
        return requests.head(source, allow_redirects=True, timeout=15).status_code == 404
    except requests.RequestException:
        return False


def fetch(source, dest_path, what):
    """download_file, but a source that does not exist becomes a MissingSplitError naming `what`."""
    try:
        return download_file(source, dest_path, desc=what)
    except NanochatError as e:
        if source_missing(source):
            raise MissingSplitError(f"{what} is not available from {source}: that split is missing from the "
                                    "source (a mirror may hold only some splits); leave that task out of the "
                                    "mixture (see the script's --help) or use a source that has it") from e
        raise


def split_complete(dest):
    """Is the split in `dest` complete: manifest.json readable and each file it lists a sound parquet?
    A corrupt file is deleted here, so the caller fetches it again."""
    try:
        with open(os.path.join(dest, "manifest.json")) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all([present(os.path.join(dest, name)) for name in files])  # a list: check (and clear) every file


def load_hub_dataset(repo_id, subset, split):
    """One split of a Hugging Face dataset as a pyarrow Table. The hub lists the split's parquet files,
    each is downloaded to <base>/task_data/<repo>/<subset>/<split>/NNNNN.parquet; manifest.json is
    written last, so its presence means the split is complete. Under NANOCHAT_MIRROR the split is the
    single file hub_mirror_relpath(...)."""
    what = f"{repo_id} {subset}/{split}"
    dest = task_data_dir(repo_id.replace("/", "--"), subset, split)
    manifest = os.path.join(dest, "manifest.json")
    if not split_complete(dest):
        listing = hub_listing_url(repo_id, subset, split)
        source = source_for(listing, hub_mirror_relpath(repo_id, subset, split))
        if source == listing:  # the real hub: ask which files make up the split
            with open(fetch(listing, os.path.join(dest, "listing.json"), what)) as f:
                sources = json.load(f)
        else:
            sources = [source]
        files = [f"{i:05d}.parquet" for i in range(len(sources))]
        for src, name in zip(sources, files):
            fetch(src, os.path.join(dest, name), what)
        with atomic_write(manifest, "w") as f:
            json.dump({"sources": sources, "files": files}, f)
    with open(manifest) as f:
        files = json.load(f)["files"]
    return pa.concat_tables([pq.read_table(os.path.join(dest, name)) for name in files])


def download_task_file(url, mirror_relpath, name):
    """A single-file source (word list, identity conversations) cached in <base>/task_data/<name>."""
    return fetch(source_for(url, mirror_relpath), task_data_dir(name), name)


# ======== 3. Tokenizer and chat format ============================================================

SPECIAL_TOKENS = [
    "<|bos|>",  # document delimiter, prepended to every document and conversation
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # the assistant calls the calculator/python tool
    "<|output_start|>", "<|output_end|>",  # the tool's answer, written by the engine, not learned
]
# GPT-4's split pattern, but numbers split into groups of 1-2 digits (not 1-3): better bpb at small vocab
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
TOKENIZER_FILE = "tokenizer.json"


class Tokenizer:
    """BPE trained with rustbpe, run with tiktoken. Special tokens come after the merged tokens."""

    def __init__(self, enc):
        self.enc = enc
        self.bos_token_id = self.encode_special("<|bos|>")

    @classmethod
    def from_ranks(cls, mergeable_ranks, pattern, special_tokens=SPECIAL_TOKENS):
        n = len(mergeable_ranks)
        enc = tiktoken.Encoding(name="rustbpe", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                special_tokens={name: n + i for i, name in enumerate(special_tokens)})
        return cls(enc)

    @classmethod
    def train(cls, text_iter, vocab_size):
        import rustbpe
        num_ranks = vocab_size - len(SPECIAL_TOKENS)
        if num_ranks < 256:
            raise NanochatError(f"--vocab-size {vocab_size} is too small: need at least {256 + len(SPECIAL_TOKENS)}")
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(text_iter, num_ranks, pattern=SPLIT_PATTERN)
        ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
        return cls.from_ranks(ranks, bpe.get_pattern())

    def save(self, tokenizer_dir):
        """Plain JSON (no pickle): the split pattern, the specials, and token bytes (base64) in rank order.
        Also writes token_bytes.pt, the byte length of each token id used for bits-per-byte."""
        make_dir(tokenizer_dir, writable=True)
        ranks = self.enc._mergeable_ranks
        tokens = sorted(ranks, key=ranks.get)
        assert [ranks[t] for t in tokens] == list(range(len(tokens))), "ranks must be 0..n-1"
        payload = {"pattern": self.enc._pat_str, "special_tokens": list(self.enc._special_tokens),
                   "mergeable_ranks": [base64.b64encode(t).decode("ascii") for t in tokens]}
        with atomic_write(os.path.join(tokenizer_dir, TOKENIZER_FILE), "w") as f:
            json.dump(payload, f)
        with atomic_write(os.path.join(tokenizer_dir, "token_bytes.pt"), "wb") as f:
            torch.save(self.token_bytes(), f)

    @classmethod
    def load(cls, tokenizer_dir):
        path = os.path.join(tokenizer_dir, TOKENIZER_FILE)
        pkl = os.path.join(tokenizer_dir, "tokenizer.pkl")
        if not os.path.exists(path) and not os.path.exists(pkl):
            raise NanochatError(f"no tokenizer in {tokenizer_dir}: run `python train_tokenizer.py` first")
        try:
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    payload = json.load(f)
                ranks = {base64.b64decode(t, validate=True): i for i, t in enumerate(payload["mergeable_ranks"])}
                return cls.from_ranks(ranks, payload["pattern"], payload["special_tokens"])
            # the reference's format: a pickled tiktoken.Encoding. Unpickling runs code from the
            # file, so only load a tokenizer.pkl you made yourself or got from a source you trust.
            path = pkl
            with open(pkl, "rb") as f:
                return cls(pickle.load(f))
        except Exception as e:  # truncated, garbled, a field missing or of the wrong type
            raise NanochatError(f"{path} is corrupt ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}): "
                                "restore it, or rebuild it with `python train_tokenizer.py` (then retrain: a model "
                                "only works with the tokenizer it was trained with)") from None

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.bos_token_id

    def get_special_tokens(self):
        return set(self.enc.special_tokens_set)

    def encode_special(self, text):
        return self.enc.encode_single_token(text)

    def id_to_token(self, token_id):
        return self.enc.decode([token_id])

    def decode_single_token_bytes(self, token_id):
        return self.enc.decode_single_token_bytes(token_id)

    def _as_id(self, token):
        return token if isinstance(token, int) else self.encode_special(token)

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """str -> list of ids, list[str] -> list of lists (threaded). Special-token strings inside the
        text are ordinary text; `prepend`/`append` (an id or a special-token name) go on every row."""
        head = [] if prepend is None else [self._as_id(prepend)]
        tail = [] if append is None else [self._as_id(append)]
        if isinstance(text, str):
            return head + self.enc.encode_ordinary(text) + tail
        rows = self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)
        return [head + row + tail for row in rows]

    def decode(self, ids):
        return self.enc.decode(ids)

    def token_bytes(self):
        """int32 tensor: UTF-8 byte length of each token id (raw bytes, not re-decoded), 0 for specials."""
        specials = set(self.enc._special_tokens.values())
        return torch.tensor([0 if i in specials else len(self.enc.decode_single_token_bytes(i))
                             for i in range(self.get_vocab_size())], dtype=torch.int32)

    def render_conversation(self, conversation, max_tokens=2048):
        """Tokenize a chat; mask 1 marks the tokens the model learns to produce (the assistant's own),
        0 the rest (BOS, user turns, tool outputs). Returns (ids, mask), both cut to max_tokens."""
        messages = conversation["messages"]
        if messages and messages[0]["role"] == "system":
            # no system slot in the format: fold it into the first user turn
            if len(messages) < 2 or messages[1]["role"] != "user":
                raise ValueError("a system message must be followed by a user message")
            messages = copy.deepcopy(messages[1:])
            messages[0]["content"] = conversation["messages"][0]["content"] + "\n\n" + messages[0]["content"]
        ids, mask = [], []

        def add(token_ids, supervised):
            token_ids = [token_ids] if isinstance(token_ids, int) else token_ids
            ids.extend(token_ids)
            mask.extend([supervised] * len(token_ids))

        special = self.encode_special
        add(self.bos_token_id, 0)
        for i, message in enumerate(messages):
            expected = "user" if i % 2 == 0 else "assistant"
            if message["role"] != expected:
                raise ValueError(f"message {i} has role {message['role']!r}, expected {expected!r} "
                                 "(messages must alternate user, assistant, ...)")
            content = message["content"]
            if expected == "user":
                if not isinstance(content, str):
                    raise ValueError("user content must be a string")
                add(special("<|user_start|>"), 0)
                add(self.encode(content), 0)
                add(special("<|user_end|>"), 0)
                continue
            add(special("<|assistant_start|>"), 0)
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                if part["type"] == "text":
                    add(self.encode(part["text"]), 1)
                elif part["type"] == "python":
                    add(special("<|python_start|>"), 1)
                    add(self.encode(part["text"]), 1)
                    add(special("<|python_end|>"), 1)
                elif part["type"] == "python_output":  # produced by the interpreter at inference
                    add(special("<|output_start|>"), 0)
                    add(self.encode(part["text"]), 0)
                    add(special("<|output_end|>"), 0)
                else:
                    raise ValueError(f"unknown assistant part type {part['type']!r}")
            add(special("<|assistant_end|>"), 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation):
        """Prompt ids for sampling the final assistant turn: drop it, render, open a new assistant turn."""
        messages = conversation["messages"]
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("render_for_completion expects the conversation to end with an assistant message")
        ids, _ = self.render_conversation({**conversation, "messages": messages[:-1]}, max_tokens=10**9)
        return ids + [self.encode_special("<|assistant_start|>")]


def get_tokenizer():
    return Tokenizer.load(os.path.join(get_base_dir(), "tokenizer"))


def get_token_bytes(device="cpu"):
    """The byte length of each token id (for bits per byte), from token_bytes.pt; when that file is missing,
    corrupt or of another vocabulary it is rebuilt from the tokenizer, which it is derived from."""
    tokenizer_dir = os.path.join(get_base_dir(), "tokenizer")
    path = os.path.join(tokenizer_dir, "token_bytes.pt")
    tokenizer = Tokenizer.load(tokenizer_dir)
    try:
        token_bytes = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(token_bytes, torch.Tensor) and token_bytes.shape == (tokenizer.get_vocab_size(),):
            return token_bytes.long().to(device)
        problem = "another vocabulary"
    except Exception as e:  # missing, truncated, garbled
        problem = type(e).__name__
    token_bytes = tokenizer.token_bytes()
    print0(f"{path} is unreadable ({problem}): rebuilt it from the tokenizer")
    if get_rank() == 0:
        with contextlib.suppress(OSError):  # a read-only folder: use it without saving
            with atomic_write(path, "wb") as f:
                torch.save(token_bytes, f)
    return token_bytes.long().to(device)


def build_chat_prompt(tokenizer, messages, max_context, max_tokens):
    """Prompt ids asking for the assistant's reply to `messages` ([system,] user, assistant, ..., user),
    and the reply's token budget. While the prompt leaves less than min(max_tokens, half the context) for
    the reply, whole turns (user + assistant) are dropped, oldest first; a system message stays (folded
    into the first remaining user turn) and the last user message always does: the reply then gets what
    the context leaves. Returns (ids, turns dropped, reply budget); ValueError when the prompt alone
    fills the context."""
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("the conversation must end with a user message")
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = list(messages[len(system):])
    reserve = min(max_tokens, max_context // 2)
    assistant_start = tokenizer.encode_special("<|assistant_start|>")
    dropped = 0
    while True:
        ids, _ = tokenizer.render_conversation({"messages": system + turns}, max_tokens=10**9)
        ids.append(assistant_start)
        if len(ids) + reserve <= max_context or len(turns) <= 1:
            break
        turns, dropped = turns[2:], dropped + 1
    if len(ids) >= max_context:
        raise ValueError(f"the message is too long: its {len(ids)} tokens fill the model's context of "
                         f"{max_context}; send a shorter message")
    return ids, dropped, min(max_tokens, max_context - len(ids))


# ---- the reply's grammar: one parser for the engine, the streamers, serve.py and rl.py ----

class ReplyParser:
    """Reads an assistant reply one token at a time. A reply is text, calculator calls
    <|python_start|>expression<|python_end|>, and their results <|output_start|>result<|output_end|>
    (forced by the engine), up to <|assistant_end|> or <|bos|>. push(token) says what the token was:
      "token"   an ordinary token of the part being read (self.kind: "text", "python" or "python_output")
      "open"    a call or result begins (self.kind is now "python" / "python_output")
      "close"   it ended (self.kind is "text" again)
      "stop"    the reply is over
      "special" any other special token, which belongs to no part
    After "open", "close" and "stop", self.ended holds (kind, tokens) of the part that just ended."""

    def __init__(self, tokenizer):
        special = tokenizer.encode_special
        self.opens = {special("<|python_start|>"): "python", special("<|output_start|>"): "python_output"}
        self.closes = {special("<|python_end|>"): "python", special("<|output_end|>"): "python_output"}
        self.stops = {special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
        self.specials = {special(name) for name in tokenizer.get_special_tokens()}
        self.kind, self.part, self.ended = "text", [], None

    def end_part(self, next_kind):
        self.ended, self.kind, self.part = (self.kind, self.part), next_kind, []

    def push(self, token):
        if token in self.stops:
            self.end_part("text")
            return "stop"
        if token in self.opens:
            self.end_part(self.opens[token])
            return "open"
        if self.closes.get(token) == self.kind:
            self.end_part("text")
            return "close"
        if token in self.specials:
            return "special"
        self.part.append(token)
        return "token"


def reply_parts(tokenizer, tokens):
    """Generated tokens -> [(kind, tokens)] of the reply's parts, empty text parts left out; stops at the
    reply's end."""
    parser, parts = ReplyParser(tokenizer), []
    for token in tokens:
        what = parser.push(token)
        if what in ("open", "close", "stop") and (parser.ended[1] or parser.ended[0] != "text"):
            parts.append(parser.ended)
        if what == "stop":
            return parts
    return parts + [(parser.kind, parser.part)] * bool(parser.part or parser.kind != "text")


def reply_to_content(tokenizer, tokens):
    """Generated tokens -> assistant message content for the conversation history: a str, or a list of
    {"type": "text"|"python"|"python_output", "text"} parts when the reply called the tool."""
    parts = [{"type": kind, "text": tokenizer.decode(ids)} for kind, ids in reply_parts(tokenizer, tokens)]
    if all(part["type"] == "text" for part in parts):
        return "".join(part["text"] for part in parts)
    return parts


class Utf8Streamer:
    """Turns generated token ids into display text as they arrive: push(token) -> new text, flush() at the
    end. Bytes of a multi-byte character split across tokens are held back until the character is
    complete (invalid bytes show as U+FFFD). Tool calls read as "[calculator: 2+3 = 5]", other special
    tokens print nothing. With typed=True, push returns [(part kind, text)] instead, for clients that
    show calls and results apart (serve.py's stream)."""

    def __init__(self, tokenizer, typed=False):
        self.tokenizer, self.typed = tokenizer, typed
        self.parser = ReplyParser(tokenizer)
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.awaiting_result = False  # a call has closed; a result may follow

    def push(self, token):
        kind = self.parser.kind
        what = self.parser.push(token)
        pieces = []
        if what != "token":  # a special token: first finish any character held back
            pieces.append((kind, self.utf8.decode(b"", final=True)))
        if not self.typed:
            pieces.append(("text", self._brackets(what, kind)))
        if what == "token":
            pieces.append((self.parser.kind, self.utf8.decode(self.tokenizer.decode_single_token_bytes(token))))
        pieces = [(k, text) for k, text in pieces if text]
        return pieces if self.typed else "".join(text for _, text in pieces)

    def _brackets(self, what, kind):
        """The text that frames tool calls in plain display: [calculator: expr = result]."""
        text = ""
        if self.awaiting_result and not (what == "open" and self.parser.kind == "python_output"):
            text, self.awaiting_result = "]", False  # the calculator gave no result
        if what == "open":
            text += " = " if self.awaiting_result else (
                "[calculator: " if self.parser.kind == "python" else "[output: ")
            self.awaiting_result = False
        elif what == "close":
            self.awaiting_result = kind == "python"
            text += "" if self.awaiting_result else "]"
        return text

    def flush(self):
        kind, text = self.parser.kind, self.utf8.decode(b"", final=True)
        if self.typed:
            return [(kind, text)] if text else []
        if kind != "text" or self.awaiting_result:  # a call or result cut off: close its bracket
            text, self.awaiting_result = text + "]", False
            self.parser.end_part("text")
        return text


def display_text(tokenizer, tokens):
    """The whole reply as readable text (see Utf8Streamer)."""
    streamer = Utf8Streamer(tokenizer)
    return "".join(streamer.push(token) for token in tokens) + streamer.flush()


# ======== 4. Pretraining data: BOS-aligned best-fit batches =======================================

def list_parquet_files(data_dir=None):
    """Local shards, sorted. Train = all but the last, validation = the last."""
    data_dir = data_dir or pretrain_data_dir()
    files = sorted(glob.glob(os.path.join(data_dir, "*.parquet")))
    if not files:
        raise NanochatError(f"no pretraining shards in {data_dir}: run `python train_tokenizer.py` (it downloads them)")
    return files


def split_files(split, data_dir=None):
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    files = list_parquet_files(data_dir)
    if len(files) < 2:
        raise NanochatError(f"need at least 2 shards in {data_dir or pretrain_data_dir()} (train + validation), found {len(files)}")
    return files[:-1] if split == "train" else files[-1:]


# Every row of a batch starts with BOS and is filled, without padding, by best fit: the longest buffered
# document that fits whole (the first of equally long ones), else the shortest one cropped to the space left.
# As in the reference, rank r of W reads row groups r, r+W, r+2W, ... of each file, in batches of 128
# documents, and the micro-steps of gradient accumulation read consecutive batches of the rank's loader.
# Reading, tokenizing and packing run in a background thread. Unlike the reference's approximate resume,
# each batch carries a small state (next unread position + the buffered documents' positions) from which
# the very same batch is rebuilt, so a resumed run continues bit for bit.
# keep_rest=True (a small data budget, e.g. the CPU demo) puts what a crop cuts off back into the buffer
# as a document of its own (no BOS: it continues its text), so every token reaches exactly one row;
# its key then carries a 4th field, the token offset the rest starts at.

def iter_doc_batches(files, rank, world_size, start=None, batch_docs=128):
    """Forever yields (position, texts): up to batch_docs documents of one row group, the row groups
    rank, rank + world_size, ... of each file in turn, epoch after epoch. A position is
    (epoch, pq_idx, rg_idx, offset); `start` is where to begin (default: the rank's first row group)."""
    epoch, pq_idx, rg_idx, offset = start or (1, 0, rank, 0)
    while True:
        found = False
        for pq_idx in range(pq_idx, len(files)):
            parquet = pq.ParquetFile(files[pq_idx])
            for rg_idx in range(rg_idx, parquet.num_row_groups, world_size):
                texts = parquet.read_row_group(rg_idx, columns=["text"]).column("text").to_pylist()
                for off in range(offset, len(texts), batch_docs):
                    found = True
                    yield (epoch, pq_idx, rg_idx, off), texts[off:off + batch_docs]
                offset = 0
            rg_idx = rank
        if not found and epoch > 1:
            raise NanochatError(f"rank {rank} of {world_size} gets no documents: every file of the split has fewer "
                                f"than {rank + 1} row groups; use fewer GPUs")
        epoch, pq_idx, rg_idx = epoch + 1, 0, rank


def read_docs(files, keys):
    """Texts of the documents at keys (pq_idx, rg_idx, offset), in the order given."""
    texts = {}
    for pq_idx, rg_idx in sorted({key[:2] for key in keys}):
        rows = pq.ParquetFile(files[pq_idx]).read_row_group(rg_idx, columns=["text"]).column("text").to_pylist()
        texts.update({(pq_idx, rg_idx, i): t for i, t in enumerate(rows)})
    return [texts[key] for key in keys]


def pack_batches(tokenizer, B, T, files, rank, world_size, state=None, buffer_size=1000, threads=4,
                 keep_rest=False):
    """Yields (rows, state): rows is an int64 array (B, T+1); passing `state` back yields the same rows."""
    bos = tokenizer.get_bos_token_id()
    lens, docs, keys = [], [], []  # the buffer: lengths ascending (equal ones in arrival order), tokens, positions

    def add(key, ids):
        i = bisect.bisect_right(lens, len(ids))
        lens.insert(i, len(ids))
        docs.insert(i, np.asarray(ids, dtype=np.int32))
        keys.insert(i, key)

    if state is not None:
        saved = [tuple(k) for k in state["buffer"]]
        for key, ids in zip(saved, tokenizer.encode(read_docs(files, [k[:3] for k in saved]), prepend=bos,
                                                    num_threads=threads)):
            add(key, ids[key[3]:] if len(key) > 3 else ids)
    position = tuple(state["next"]) if state is not None else (1, 0, rank, 0)
    source = iter_doc_batches(files, rank, world_size, position)
    while True:
        batch_state = {"next": list(position), "buffer": [list(k) for k in keys]}
        rows = np.empty((B, T + 1), dtype=np.int64)
        for row in rows:
            pos = 0
            while pos < T + 1:
                while len(lens) < buffer_size:
                    (epoch, pq_idx, rg_idx, off), texts = next(source)
                    for i, ids in enumerate(tokenizer.encode(texts, prepend=bos, num_threads=threads)):
                        add((pq_idx, rg_idx, off + i), ids)
                    position = (epoch, pq_idx, rg_idx, off + len(texts))
                i = bisect.bisect_right(lens, T + 1 - pos) - 1  # longest document that fits whole...
                crop = i < 0
                i = bisect.bisect_left(lens, lens[i]) if not crop else 0  # ...the first of equally long ones
                doc, key = docs.pop(0 if crop else i), keys.pop(0 if crop else i)  # none fits: crop the shortest
                del lens[0 if crop else i]
                if crop and keep_rest:
                    add(key[:3] + ((key[3] if len(key) > 3 else 0) + T + 1 - pos,), doc[T + 1 - pos:])
                doc = doc[:T + 1 - pos]
                row[pos:pos + len(doc)] = doc
                pos += len(doc)
        yield rows, batch_state


def _producer(out, stop, args, pin):
    try:
        for rows, state in pack_batches(*args):
            both = torch.from_numpy(np.stack([rows[:, :-1], rows[:, 1:]]))  # inputs, targets: contiguous
            item = (both.pin_memory() if pin else both, state)
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    pass
            if stop.is_set():
                return
    except BaseException as e:  # hand any failure (e.g. missing data) to the consumer
        out.put(e)


def bestfit_batches(tokenizer, B, T, split, device="cpu", rank=0, world_size=1, state=None,
                    buffer_size=1000, tokenizer_threads=4, files=None, prefetch=2, keep_rest=False):
    """Forever yields (inputs, targets, state): int64 (B, T) tensors on `device`, and the state that,
    passed back as `state`, makes a new loader start with this very batch. Work runs in a thread."""
    files = files or split_files(split)
    device = torch.device(device)
    out, stop = queue.Queue(maxsize=prefetch), threading.Event()
    args = (tokenizer, B, T, files, rank, world_size, state, buffer_size, tokenizer_threads, keep_rest)
    worker = threading.Thread(target=_producer, args=(out, stop, args, device.type == "cuda"), daemon=True)
    worker.start()
    try:
        while True:
            item = out.get()
            if isinstance(item, BaseException):
                raise item
            both, batch_state = item
            both = both.to(device, non_blocking=True)
            yield both[0], both[1], batch_state
    finally:
        # join, so that no thread is still inside the tokenizer when the interpreter exits (that aborts it)
        stop.set()
        worker.join(timeout=30)


# ======== 5. Checkpoints, metrics and the run lifecycle ===========================================

CHECKPOINT_DIRS = {"base": "base_checkpoints", "sft": "chatsft_checkpoints", "rl": "chatrl_checkpoints"}
STAGE_SCRIPTS = {"base": "pretrain.py", "sft": "sft.py", "rl": "rl.py"}


def checkpoint_dir(stage, model_tag):
    if stage not in CHECKPOINT_DIRS:
        raise ValueError(f"stage must be one of {list(CHECKPOINT_DIRS)}, not {stage!r}")
    return os.path.join(get_base_dir(), CHECKPOINT_DIRS[stage], model_tag)


def save_checkpoint(ckpt_dir, step, model_state, optimizer_state, meta, rank=0):
    """Every rank writes its optimizer shard; rank 0 then writes the model and, last, the meta JSON.
    Each file goes to a temp name and is renamed when complete, and a step counts as saved only once
    its meta exists, so a crash or a full disk mid-write leaves the previous checkpoint the latest loadable one."""
    make_dir(ckpt_dir, writable=True)
    if optimizer_state is not None:
        with full_disk_is_one_line(os.path.join(ckpt_dir, f"optim_{step:06d}_rank{rank}.pt"), step) as path:
            with atomic_write(path) as f:
                torch.save(optimizer_state, f)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # all optimizer shards are on disk before the meta declares the step complete
    if rank == 0:
        with full_disk_is_one_line(os.path.join(ckpt_dir, f"model_{step:06d}.pt"), step) as path:
            with atomic_write(path) as f:
                torch.save(model_state, f)
        with full_disk_is_one_line(os.path.join(ckpt_dir, f"meta_{step:06d}.json"), step) as path:
            with atomic_write(path, "w") as f:
                json.dump(meta, f, indent=2)


@contextlib.contextmanager
def full_disk_is_one_line(path, step=None):
    """A full disk while writing `path` in a checkpoint folder: one line naming the file and the latest
    complete checkpoint (other than `step`, the one being written), which atomic writes kept intact."""
    try:
        yield path
    except (OSError, RuntimeError) as e:
        if not is_disk_full(e):
            raise
        saved = [entry for entry in _saved_steps(os.path.dirname(path)) if entry[1] != step]
        intact = f"the checkpoint at step {max(saved)[1]} is intact" if saved else "there is no earlier checkpoint"
        raise NanochatError(f"no space left on device writing {path}; {intact}: free some space, then resume "
                            "with --resume-from-step") from None


def _saved_steps(ckpt_dir):
    """[(mtime_ns, step)] of the complete checkpoints (those with a meta file) in ckpt_dir."""
    steps = []
    for path in glob.glob(os.path.join(ckpt_dir, "meta_*.json")):
        m = re.fullmatch(r"meta_(\d+)\.json", os.path.basename(path))
        if m and os.path.exists(os.path.join(ckpt_dir, f"model_{m.group(1)}.pt")):
            steps.append((os.stat(path).st_mtime_ns, int(m.group(1))))
    return steps


def find_last_step(ckpt_dir):
    """The most recently written step (meta file mtime, ties -> larger step), not just the largest
    number: a fresh run into an old tag must not resume from the old run's later steps."""
    steps = _saved_steps(ckpt_dir)
    if not steps:
        raise NanochatError(f"no checkpoint (meta_*.json + model_*.pt) in {ckpt_dir}")
    return max(steps)[1]


def find_last_tag(stage_dir):
    """The tag whose newest checkpoint was written most recently (the reference guesses the largest depth)."""
    tags = [(max(steps), tag) for tag in sorted(os.listdir(stage_dir) if os.path.isdir(stage_dir) else [])
            if (steps := _saved_steps(os.path.join(stage_dir, tag)))]
    if not tags:
        raise NanochatError(f"no checkpoints in {stage_dir}")
    return max(tags)[1]


def _torch_load(path, device):
    if not os.path.exists(path):
        raise NanochatError(f"checkpoint file {path} is missing")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # zero bytes (EOFError), truncated (OSError), garbage (UnpicklingError, KeyError)
        reason = (str(e).splitlines() or [""])[0][:120]
        raise NanochatError(f"checkpoint file {path} is truncated or corrupt ({type(e).__name__}: {reason}); "
                            "delete that step to fall back to an earlier one") from None


def load_checkpoint(ckpt_dir, step, device, load_optimizer=False, rank=0):
    """Returns (model_state, optimizer_state or None, meta). The optimizer shard is None when not asked
    for or absent (e.g. the checkpoint was written with another number of ranks)."""
    if not os.path.isdir(ckpt_dir):
        raise NanochatError(f"checkpoint directory {ckpt_dir} does not exist")
    meta_path = os.path.join(ckpt_dir, f"meta_{step:06d}.json")
    if not os.path.exists(meta_path):
        saved = ", ".join(str(s) for s in sorted(s for _, s in _saved_steps(ckpt_dir))) or "none"
        raise NanochatError(f"no checkpoint at step {step} in {ckpt_dir} (saved steps: {saved})")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        raise NanochatError(f"cannot read {meta_path} ({type(e).__name__}: {e}); "
                            "delete that step to fall back to an earlier one") from None
    if not isinstance(meta, dict):
        raise NanochatError(f"{meta_path} is not a JSON object: delete that step to fall back to an earlier one")
    meta.setdefault("step", step)  # the file name says it, whatever the JSON lacks
    model_state = _torch_load(os.path.join(ckpt_dir, f"model_{step:06d}.pt"), device)
    optimizer_state = None
    optim_path = os.path.join(ckpt_dir, f"optim_{step:06d}_rank{rank}.pt")
    if load_optimizer and os.path.exists(optim_path):
        optimizer_state = _torch_load(optim_path, device)
    elif load_optimizer:
        print0(f"no optimizer state {optim_path}; starting the optimizer fresh")
    return model_state, optimizer_state, meta


def load_model(stage, device, phase="eval", model_tag=None, step=None):
    """Build the GPT of a saved checkpoint on `device` -> (model, tokenizer, meta). Defaults: the most
    recently written tag and step; meta["model_tag"] is the tag loaded. Also reads the reference's own
    checkpoint directories (model.load_gpt knows their differences)."""
    if phase not in ("train", "eval"):
        raise ValueError(f"phase must be 'train' or 'eval', not {phase!r}")
    stage_dir = os.path.join(get_base_dir(), CHECKPOINT_DIRS[stage])
    if not os.path.isdir(stage_dir):
        raise NanochatError(f"no {stage} checkpoints: {stage_dir} does not exist; run `{STAGE_SCRIPTS[stage]}` first")
    model_tag = model_tag or find_last_tag(stage_dir)
    ckpt_dir = os.path.join(stage_dir, model_tag)
    step = find_last_step(ckpt_dir) if step is None else step
    model_state, _, meta = load_checkpoint(ckpt_dir, step, device)
    if not isinstance(meta.get("model_config"), dict):
        raise NanochatError(f"{ckpt_dir}/meta_{step:06d}.json has no model_config: the checkpoint is incomplete; "
                            "delete that step to fall back to an earlier one")
    tokenizer = get_tokenizer()
    if tokenizer.get_vocab_size() != meta["model_config"].get("vocab_size"):
        raise NanochatError(f"tokenizer vocab {tokenizer.get_vocab_size()} != checkpoint vocab "
                            f"{meta['model_config'].get('vocab_size')} ({ckpt_dir}): the tokenizer in "
                            f"{get_base_dir()}/tokenizer is not the one this model was trained with")
    try:
        model = load_gpt(meta["model_config"], model_state, device)
    except (TypeError, ValueError, KeyError, RuntimeError) as e:  # a config or weights that do not fit together
        raise NanochatError(f"step {step} in {ckpt_dir}: the weights do not match the meta's model_config "
                            f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}); "
                            "delete that step to fall back to an earlier one") from None
    model.train() if phase == "train" else model.eval()
    print0(f"loaded {stage} checkpoint {model_tag} step {step} from {ckpt_dir}")
    return model, tokenizer, {**meta, "model_tag": model_tag}


def log_metrics(path, **row):
    """Append one row (step=..., loss=..., val_bpb=...) to a stage's metrics.jsonl, rank 0 only."""
    if get_rank() == 0:
        with full_disk_is_one_line(path), open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def read_metrics(path):
    """Rows of a metrics.jsonl; when the step counter goes backwards (a re-run appended to the file)
    only the rows of the latest run are kept. Unreadable lines (a crash mid-write, garbled bytes) are skipped."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(row, dict) or not isinstance(row.get("step"), (int, float)):
                continue
            if rows and row["step"] < rows[-1]["step"]:
                rows = []
            rows.append(row)
    return rows


def trim_metrics(path, step):
    """Keep in a stage's metrics.jsonl only the rows from before `step` (a fresh run: none), so a resumed
    run never shows the steps it redoes twice; a line torn by a kill is dropped. Rank 0 only."""
    if get_rank() != 0:
        return
    rows = read_metrics(path) if step > 0 and os.path.exists(path) else []
    with atomic_write(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows if row["step"] < step)


def start_run(stage, model_tag, resume_step):
    """A stage's output folder, made ready: (checkpoint dir, metrics.jsonl path). Rank 0 locks the folder
    for the rest of the process (a second run on it stops here), then clears temp files killed runs left."""
    ckpt_dir = make_dir(checkpoint_dir(stage, model_tag), writable=True)
    metrics_path = os.path.join(ckpt_dir, "metrics.jsonl")
    if get_rank() == 0:
        lock_run(ckpt_dir, STAGE_SCRIPTS[stage])
        remove_stale_temps(ckpt_dir)
    trim_metrics(metrics_path, max(resume_step, 0))
    return ckpt_dir, metrics_path


_run_locks = {}  # checkpoint folder -> its open lock file: the lock lasts as long as the process


def lock_run(ckpt_dir, script):
    """Take ckpt_dir/run.lock (flock, released by the kernel however the process ends), or stop with the PID
    of the run holding it: two runs on one folder would interleave metrics and overwrite each other's steps."""
    key = os.path.realpath(ckpt_dir)
    if key in _run_locks:
        return
    f = open(os.path.join(ckpt_dir, "run.lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise NanochatError(f"{ckpt_dir} is in use by another {script} run (PID {holder}): wait for it to end, "
                            "stop it, or pass another --model-tag") from None
    f.truncate(0)
    f.write(f"{os.getpid()} on {platform.node()}\n")
    f.flush()
    _run_locks[key] = f


def resume_run(ckpt_dir, step, device, model, optimizer, rank=0):
    """--resume-from-step: load the stage's own checkpoint at `step` into model and optimizer; returns its meta."""
    model_state, optim_state, meta = load_checkpoint(ckpt_dir, step, device, load_optimizer=True, rank=rank)
    if optim_state is None:
        raise NanochatError(f"no optimizer state for rank {rank} at step {step} in {ckpt_dir}: resume with "
                            "the same number of processes as the run that saved it")
    if not isinstance(meta.get("loop_state"), dict):
        raise NanochatError(f"{ckpt_dir}/meta_{step:06d}.json has no loop_state, so the run cannot continue "
                            "exactly: start afresh without --resume-from-step")
    try:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
    except (RuntimeError, ValueError, KeyError) as e:  # another depth, width or optimizer layout
        raise NanochatError(f"step {step} in {ckpt_dir} was saved by a different model or optimizer "
                            f"({(str(e).splitlines() or [''])[0][:120]}): resume with the flags of the run that "
                            "saved it") from None
    print0(f"resumed from step {step} of {ckpt_dir}")
    return meta


def run_meta(step, model, args, model_tag, loop_state, **extra):
    """The checkpoint meta of every stage: the reference's fields, the loop state for resuming, extras."""
    return {"step": step, "model_config": dataclasses.asdict(model.config), "user_config": vars(args),
            "model_tag": model_tag, "loop_state": loop_state, **extra}


def gather_states(state):
    """Every rank's data-loader state, in rank order, for the checkpoint meta."""
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def due(every, step, last, after=-1):
    """Is a periodic action due: at the last step, and every `every` steps after step `after`. every <= 0
    (the flags say -1) means never."""
    return every > 0 and (last or (step > after and step % every == 0))


def scale_lrs(optimizer, factor):
    """Scale every group's learning rate once, and make that the base the schedules multiply."""
    for group in optimizer.param_groups:
        group["lr"] *= factor
        group["initial_lr"] = group["lr"]


def set_schedule(optimizer, lrm, momentum=None, weight_decay=None):
    """This step's learning rates (initial_lr x lrm) and, where given, Muon's momentum and weight decay."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group["kind"] == "muon":
            group["momentum"] = group["momentum"] if momentum is None else momentum
            group["weight_decay"] = group["weight_decay"] if weight_decay is None else weight_decay


# ======== 6. Tasks (chat datasets) and the code sandbox ===========================================

# ---------------------------------------------------------------------------------------------
# Task base, mixture


class Task:
    """A dataset of conversations with a logical slice: task[i] is example start + i*step."""
    eval_type = "generative"  # or "categorical" (answer = one letter, read off the logits)

    def __init__(self, start=0, stop=None, step=1):
        assert start >= 0 and step >= 1 and (stop is None or stop >= start), (start, stop, step)
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self):
        raise NotImplementedError

    def get_example(self, index):
        raise NotImplementedError

    def __len__(self):
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, math.ceil((stop - self.start) / self.step))

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(f"{type(self).__name__} index {i} out of range (length {len(self)})")
        return self.get_example(self.start + i * self.step)

    def evaluate(self, conversation, response):
        raise NotImplementedError(f"{type(self).__name__} has no grader")


class HubTask(Task):
    """A task over one split of a Hugging Face dataset, rows shuffled with seed 42 (the permutation
    `datasets.Dataset.shuffle(seed=42)` would give)."""
    repo_id = None

    def __init__(self, subset, split, **slice_kw):
        super().__init__(**slice_kw)
        self.subset, self.split = subset, split
        self.table = load_hub_dataset(self.repo_id, subset, split)
        self.order = np.random.default_rng(42).permutation(len(self.table))

    def num_examples(self):
        return len(self.table)

    def row(self, index):
        return self.table.slice(int(self.order[index]), 1).to_pylist()[0]


class TaskMixture(Task):
    """All examples of all tasks in one fixed random order (random.Random(42)); a task passed k times
    is seen k times per epoch (oversampling)."""

    def __init__(self, tasks, **slice_kw):
        super().__init__(**slice_kw)
        self.tasks = tasks
        self.index = [(t, i) for t, task in enumerate(tasks) for i in range(len(task))]
        random.Random(42).shuffle(self.index)

    def num_examples(self):
        return len(self.index)

    def get_example(self, index):
        t, i = self.index[index]
        return self.tasks[t][i]


def check_messages(messages, where):
    """A chat for training: optional system message, then user/assistant strings alternating, >= 2."""
    body = messages[1:] if messages and messages[0].get("role") == "system" else messages
    if len(body) < 2:
        raise ValueError(f"{where}: a conversation needs at least a user and an assistant message")
    for i, message in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.get("role") != expected or not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: message {i} must be a {expected} message with string content")


# ---------------------------------------------------------------------------------------------
# Multiple choice: ARC, MMLU


def render_mc(question, letters, choices):
    # the letter comes right after "=" so its token in the prompt is the same as the bare answer token
    lines = "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices))
    return f"Multiple Choice question: {question}\n{lines}\nRespond only with the letter of the correct answer."


def mc_conversation(question, letters, choices, answer, **extra):
    return {"messages": [{"role": "user", "content": render_mc(question, letters, choices)},
                         {"role": "assistant", "content": answer}], "letters": list(letters), **extra}


class MultipleChoice(HubTask):
    eval_type = "categorical"

    def evaluate(self, conversation, response):
        return response == conversation["messages"][-1]["content"]


class ARC(MultipleChoice):
    repo_id = "allenai/ai2_arc"

    def __init__(self, subset="ARC-Easy", split="test", **slice_kw):
        assert subset in ("ARC-Easy", "ARC-Challenge"), subset
        super().__init__(subset, split, **slice_kw)

    def get_example(self, index):
        row = self.row(index)
        return mc_conversation(row["question"], row["choices"]["label"], row["choices"]["text"], row["answerKey"])


class MMLU(MultipleChoice):
    repo_id = "cais/mmlu"
    letters = ("A", "B", "C", "D")

    def __init__(self, subset="all", split="test", **slice_kw):
        super().__init__(subset, split, **slice_kw)

    def get_example(self, index):
        row = self.row(index)
        row = row.get("train") or row  # the "auxiliary_train" config nests each row under "train"
        return mc_conversation(row["question"], self.letters, row["choices"], self.letters[row["answer"]],
                               subject=row["subject"])


# ---------------------------------------------------------------------------------------------
# GSM8K (and the shared "#### answer" grading)

ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")


def extract_answer(text):
    """The number after '#### ', commas removed, or None."""
    match = ANSWER_RE.search(text)
    return match.group(1).strip().replace(",", "") if match else None


def last_text(conversation):
    content = conversation["messages"][-1]["content"]
    return content if isinstance(content, str) else [p for p in content if p["type"] == "text"][-1]["text"]


class AnswerGraded:
    """Mixin: correct iff the response's '#### N' equals the reference's; reward = 0.0 or 1.0."""

    def evaluate(self, conversation, response):
        predicted = extract_answer(response)
        return predicted is not None and predicted == extract_answer(last_text(conversation))

    def reward(self, conversation, response):
        return float(self.evaluate(conversation, response))


def gsm8k_parts(solution):
    """'... 48/2 = <<48/2=24>>24 clips ...' -> text / python (48/2) / python_output (24) / text parts,
    so the model learns to call the calculator and the engine supplies the result."""
    parts = []
    for piece in re.split(r"(<<[^>]*>>)", solution):
        if piece.startswith("<<") and piece.endswith(">>"):
            expr, _, result = piece[2:-2].rpartition("=") if "=" in piece else (piece[2:-2], "", "")
            parts += [{"type": "python", "text": expr}, {"type": "python_output", "text": result}]
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


class GSM8K(AnswerGraded, HubTask):
    repo_id = "openai/gsm8k"

    def __init__(self, subset="main", split="test", **slice_kw):
        super().__init__(subset, split, **slice_kw)

    def get_example(self, index):
        row = self.row(index)
        return {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": gsm8k_parts(row["answer"])}]}


# ---------------------------------------------------------------------------------------------
# HumanEval


def extract_code(completion):
    """The first ```python (or plain ```) fenced block, else the whole completion."""
    match = re.search(r"```(?:python|py)?[^\n]*\n(.*?)```", completion, re.DOTALL)
    return (match.group(1) if match else completion).strip()


class HumanEval(HubTask):
    repo_id = "openai/openai_humaneval"

    def __init__(self, subset="openai_humaneval", split="test", **slice_kw):
        super().__init__(subset, split, **slice_kw)

    def get_example(self, index):
        row = self.row(index)
        return {"messages": [{"role": "user", "content": row["prompt"]},
                             {"role": "assistant", "content": row["prompt"] + "\n" + row["canonical_solution"]}],
                "entry_point": row["entry_point"], "test": row["test"]}

    def evaluate(self, conversation, response, timeout=5.0):
        # the model often repeats the signature without the prompt's imports: put them back on top
        prompt = conversation["messages"][0]["content"]
        imports = "\n".join(line for line in prompt.splitlines() if line.startswith(("import ", "from ")))
        program = (f"{imports}\n\n{extract_code(response)}\n\n{conversation['test']}\n"
                   f"check({conversation['entry_point']})\n")
        return execute_code(program, timeout=timeout).success


# ---------------------------------------------------------------------------------------------
# Sandbox for model-written code, in two layers, each child a fresh interpreter:
# 1. the operating system (SANDBOX_ISOLATE): what the kernel grants is taken, what it refuses is
#    skipped: own PID, network, IPC and mount namespaces, a chroot into a size-capped tmpfs that
#    holds only the scratch dir and read-only views of the interpreter and system libraries, an
#    unprivileged uid of its own (when started as root) or a user namespace (when not), rlimits;
# 2. the in-process guard (SANDBOX_GUARD): Python-level refusals of process creation, kill, network
#    and file access outside the scratch dir. It stops accidents; code written to escape gets past
#    it (a reimported posix, the real FileIO class, _ctypes loaded from its file), hence layer 1.
# sandbox_layers() says which layers this machine gives. No signals are used in the calling
# process, so execute_code works from any thread.

SANDBOX_LAYERS = {
    "uid": "runs as an unprivileged uid of its own (the caller is root)",
    "userns": "runs in a user namespace (the caller is not root)",
    "pidns": "own PID namespace: every process it starts dies with it, setsid or not",
    "netns": "own network namespace: no network, not even 127.0.0.1",
    "fs": "chrooted into a size-capped tmpfs: scratch dir, read-only Python and /usr, nothing else",
    "nproc": "at most 32 processes and threads (needs the uid of its own)",
    "rlimits": "CPU time, address space, size of each file, open files",
    "guard": "in-process refusal of process creation, kill, network, files outside the scratch dir",
}

# Runs first in the child (with -S: no site import, half the start-up time), with the caller's rights;
# ends by exec'ing the guard, which drops every capability the namespaces gave.
# argv: guard source, temp root, memory bytes, cpu seconds, output bytes
SANDBOX_ISOLATE = r'''
import ctypes, os, resource, sys
guard, root, memory, cpu, output = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
NEWNS, NEWIPC, NEWUSER, NEWPID, NEWNET = 0x20000, 0x8000000, 0x10000000, 0x20000000, 0x40000000
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
NOATIME, NODIRATIME, ST_RELATIME, STRICTATIME = 1024, 2048, 4096, 1 << 24
linux, libc = sys.platform.startswith("linux"), ctypes.CDLL(None, use_errno=True)
exe, scratch, jail, host_pid = sys.executable, os.getcwd(), os.path.join(root, "jail"), os.getpid()
layers = []

def ok(ret):
    if ret != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))

def mount(src, dst, fstype=None, flags=0, data=None):
    ok(libc.mount(*(s and os.fsencode(s) for s in (src, dst, fstype)), ctypes.c_ulong(flags), data and data.encode()))

def enter_namespaces():
    """As a non-root user the user namespace comes first: our uid is 65534 in it, and we hold
    capabilities there (for the mounts) until the exec of the guard drops them."""
    uid, gid = os.getuid(), os.getgid()
    try:
        ok(libc.unshare(NEWNS | NEWIPC | NEWNET | NEWPID | (NEWUSER if uid else 0)))
    except (AttributeError, OSError):  # not Linux, no privilege, or a seccomp filter
        return False
    try:
        if uid:
            for name, line in (("setgroups", "deny"), ("uid_map", f"65534 {uid} 1"), ("gid_map", f"65534 {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(line)
            layers.append("userns")
    except OSError:  # unmapped: the mounts below will fail and be skipped
        pass
    layers.extend(["pidns", "netns"])
    return True

def wait_outside():
    """Our first child is PID 1 of the new PID namespace; when PID 1 exits, the kernel kills all
    that is left in it. This process stays outside and waits for it."""
    pid = os.fork()
    if pid:
        os._exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) & 0xFF)

def bind(src, dst, readonly=True):
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        open(dst, "a").close()
    mount(src, dst, flags=BIND | REC)
    if readonly:  # in a user namespace the remount must keep the flags the kernel locked
        f = os.statvfs(dst).f_flag
        atime = (f & (NOATIME | NODIRATIME)) | (0 if f & (NOATIME | ST_RELATIME) else STRICTATIME)
        mount(None, dst, flags=REMOUNT | BIND | RDONLY | NOSUID | NODEV | (f & NOEXEC) | atime)

def build_jail():
    """The tmpfs's size caps all writing; besides the scratch dir (same path as outside) it holds
    read-only binds of the interpreter and system libraries, four devices and a /proc that shows only
    the sandbox's processes. /etc, /home, /root, /sys, /tmp and the project are absent."""
    mount(None, "/", flags=REC | PRIVATE)  # our mounts are never seen outside
    os.mkdir(jail)
    mount("tmpfs", jail, "tmpfs", NOSUID | NODEV, f"size={output},nr_inodes=1024,mode=755")
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, os.path.dirname(exe)}
    venv = os.path.dirname(os.path.dirname(exe))  # under -S (no site) sys.prefix is the base, not the venv
    prefixes |= {venv} if os.path.exists(os.path.join(venv, "pyvenv.cfg")) else set()
    paths = {"/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache"} | prefixes
    paths |= {os.path.realpath(p) for p in prefixes} | {os.path.dirname(os.path.realpath(exe))}
    bound = []
    for path in sorted(paths):  # parents sort before children: a child of a bound path is inside already
        if path == "/" or not os.path.lexists(path) or any(path.startswith(b + "/") for b in bound):
            continue
        if os.path.islink(path):  # merged /usr: /lib -> usr/lib, the same link inside
            os.makedirs(os.path.dirname(jail + path), exist_ok=True)
            os.symlink(os.readlink(path), jail + path)
        else:
            bind(path, jail + path)
        bound.append(path)
    for dev in ("null", "zero", "random", "urandom"):
        bind("/dev/" + dev, f"{jail}/dev/{dev}", readonly=False)
    os.mkdir(jail + "/proc")
    try:  # the PID namespace's own /proc; a user namespace may be refused it (a container's masked /proc)
        mount("proc", jail + "/proc", "proc", NOSUID | NODEV | NOEXEC)
    except OSError:
        pass
    os.makedirs(jail + scratch)
    if not all(os.path.exists(jail + p) for p in (exe, os.path.realpath(exe), os.__file__)):
        raise OSError("the interpreter is incomplete inside the jail")

def others_can_run(path):
    """Whether a uid without rights of its own reaches `path` (a Python under root's 0700 home)."""
    parts = path.split("/")
    dirs = ["/".join(parts[:i]) or "/" for i in range(1, len(parts))]
    return all(os.stat(d).st_mode & 0o001 for d in dirs) and os.stat(path).st_mode & 0o005 == 0o005

os.umask(0o022)  # the jail's directories must be passable by the sandbox uid whatever the caller's umask
program = os.open(os.path.join(root, "program.py"), os.O_RDONLY)
done = os.open(os.path.join(root, "done"), os.O_WRONLY | os.O_CREAT, 0o600)
report = open(os.path.join(root, "layers"), "w")
jailed = False
if linux and enter_namespaces():
    wait_outside()
    try:
        build_jail()
        jailed = True
    except OSError:
        pass
base = jail if jailed else ""
own_uid = os.getuid() == 0 and all(others_can_run(base + p) for p in (os.path.realpath(exe), os.path.dirname(os.__file__)))
if jailed and (own_uid or os.getuid() != 0):  # root that keeps its capabilities could leave a chroot
    os.chroot(jail)
    os.chdir(scratch)
    layers.append("fs")
limits = [(resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, output), (resource.RLIMIT_NOFILE, 64)]
if sys.platform != "darwin":  # macOS does not enforce address-space limits
    limits += [(resource.RLIMIT_AS, memory), (resource.RLIMIT_DATA, memory)]
if own_uid:  # a uid no account uses, one per run (host pids are unique), so the process count is its own
    uid = 2**31 - 2**22 + host_pid
    os.chown(".", uid, uid)
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    limits.append((resource.RLIMIT_NPROC, 32))
    layers += ["uid", "nproc"]
if "pidns" in layers:  # if the timeout kills the waiter, this kills PID 1 (until now in the waiter's
    ok(libc.prctl(1, 9, 0, 0, 0))  # process group, which the caller kills); set after setuid, which clears it
if linux:
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: setuid programs (su, sudo) give nothing
    keyctl = {"x86_64": 250, "aarch64": 219}.get(os.uname().machine)
    if keyctl:  # KEYCTL_JOIN_SESSION_KEYRING: a new, empty one; the caller's may hold tokens (kerberos...)
        libc.syscall(keyctl, 1, None)
for which, value in limits:
    hard = resource.getrlimit(which)[1]
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(which, (value, value))
report.write(" ".join(layers + ["rlimits", "guard"]))
report.close()
os.set_inheritable(program, True)
os.set_inheritable(done, True)
os.execv(exe, [exe, "-I", "-X", "utf8", "-c", guard, str(program), str(done)])
'''

# Runs the untrusted code, after confining the dangerous calls. argv: program fd, done-marker fd
SANDBOX_GUARD = r'''
import builtins, faulthandler, io, os, posix, signal, socket, subprocess, sys, _io, _posixsubprocess
with open(int(sys.argv[1]), encoding="utf-8") as f:
    source = f.read()
done, real_open, real_write = int(sys.argv[2]), io.open, os.write
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # too much output: the write fails instead of a kill
faulthandler.disable()
scratch = os.path.realpath(os.getcwd())
readable = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}

def resolve(path, dir_fd=None):
    if isinstance(path, int):  # an open descriptor: it was checked when it was opened
        return None
    path = os.fsdecode(os.fspath(path))
    if not os.path.isabs(path):
        path = os.path.join(scratch if dir_fd is None else os.readlink(f"/proc/self/fd/{dir_fd}"), path)
    return os.path.realpath(path)

def check(name, path, write, dir_fd=None):
    real = resolve(path, dir_fd)
    allowed = [scratch, "/dev/null"] + ([] if write else list(readable))
    if real is not None and not any(real == a or real.startswith(a + os.sep) for a in allowed):
        raise PermissionError(f"sandbox: {name}({path!r}) is outside the scratch directory")

def denied(name):
    def call(*args, **kwargs):
        raise PermissionError(f"sandbox: {name} is disabled")
    return call

def confined(name, func, positions=(0,)):
    def call(*args, **kwargs):
        for i in positions:  # the path arguments; rename/link also take src_dir_fd/dst_dir_fd
            if i < len(args):
                fd = kwargs.get("dir_fd") if len(positions) == 1 else kwargs.get(("src_dir_fd", "dst_dir_fd")[i])
                check(name, args[i], True, fd)
        return func(*args, **kwargs)
    return call

def safe_open(file, mode="r", *args, **kwargs):
    check("open", file, any(c in mode for c in "wax+"))
    return real_open(file, mode, *args, **kwargs)

def safe_os_open(path, flags, *args, **kwargs):
    write = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND)
    check("os.open", path, write, kwargs.get("dir_fd"))
    return posix_open(path, flags, *args, **kwargs)

class FileIO(_io.FileIO):  # opens files without going through open()
    def __init__(self, file, mode="r", *args, **kwargs):
        check("FileIO", file, any(c in mode for c in "wax+"))
        super().__init__(file, mode, *args, **kwargs)

posix_open = posix.open
builtins.open = io.open = _io.open = safe_open
io.FileIO = _io.FileIO = FileIO
for module in (os, posix):
    module.open = safe_os_open
    for name in ("remove", "unlink", "rmdir", "mkdir", "mkfifo", "mknod", "chmod", "chown", "lchown",
                 "truncate", "utime"):
        setattr(module, name, confined(name, getattr(module, name)))
    module.symlink = confined("symlink", module.symlink, positions=(1,))  # only the link must be inside
    for name in ("rename", "replace", "link"):
        setattr(module, name, confined(name, getattr(module, name), positions=(0, 1)))
    for name in ("system", "popen", "fork", "forkpty", "kill", "killpg", "execv", "execve", "posix_spawn",
                 "posix_spawnp", "chdir", "fchdir", "chroot", "fchmod", "fchown", "setuid", "setgid",
                 "seteuid", "setegid", "setreuid", "setregid"):
        if hasattr(module, name):
            setattr(module, name, denied(f"os.{name}"))
for name in ("connect", "connect_ex", "bind", "sendto", "sendmsg"):
    setattr(socket.socket, name, denied(f"socket.{name}"))
subprocess.Popen = denied("subprocess.Popen")
_posixsubprocess.fork_exec = denied("process creation")
for name in ("ctypes", "_ctypes", "resource", "_posixsubprocess", "psutil", "pty", "tkinter"):
    sys.modules[name] = None
sys.argv = ["<llm>"]
del f
exec(compile(source, "<llm>", "exec"), {"__name__": "__main__"})
real_write(done, b"1")  # reached only if the code ran to its end (no exit(), no exception)
'''


@dataclasses.dataclass
class ExecutionResult:
    success: bool       # ran to its end with exit status 0
    stdout: str
    stderr: str
    error: str = None   # last line of stderr (the exception), or why it was stopped
    timeout: bool = False
    memory_exceeded: bool = False


def execute_code(code, timeout=5.0, maximum_memory_bytes=256 * 1024**2, maximum_output_bytes=16 * 1024**2):
    """Run untrusted Python `code` in a fresh interpreter, isolated by every layer of SANDBOX_LAYERS this
    machine gives (sandbox_layers()): own scratch directory as cwd (deleted after), environment reduced to
    PATH, no stdin, address space capped, output and written files capped at `maximum_output_bytes`, killed
    with everything it started after `timeout` wall-clock seconds. Uses no signals in the calling process,
    so any thread may call it."""
    return _run_sandboxed(code, timeout, maximum_memory_bytes, maximum_output_bytes)[0]


def sandbox_layers():
    """The names of the SANDBOX_LAYERS active on this machine, probed once by running an empty program."""
    if "layers" not in _probed:
        _probed["layers"] = _run_sandboxed("pass", 30.0, 256 * 1024**2, 1024**2)[1]
    return list(_probed["layers"])


_probed = {}


def _run_sandboxed(code, timeout, maximum_memory_bytes, maximum_output_bytes):
    """execute_code's work; also returns the layers the child reported."""
    with tempfile.TemporaryDirectory(prefix="nanochat_sandbox_", ignore_cleanup_errors=True) as root:
        os.chmod(root, 0o711)  # a sandbox uid may pass through to its scratch dir, not list the rest
        scratch, program, done = (os.path.join(root, name) for name in ("scratch", "program.py", "done"))
        os.mkdir(scratch)
        with open(program, "w", encoding="utf-8") as f:
            f.write(code)
        command = [sys.executable, "-I", "-S", "-c", SANDBOX_ISOLATE, SANDBOX_GUARD, root, str(maximum_memory_bytes),
                   str(math.ceil(timeout) + 1), str(maximum_output_bytes)]
        env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "OMP_NUM_THREADS": "1"}
        with open(os.path.join(root, "stdout"), "w+b") as out, open(os.path.join(root, "stderr"), "w+b") as err:
            # own session: on timeout the whole process group is killed (the PID namespace takes the rest)
            proc = subprocess.Popen(command, cwd=scratch, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=err, start_new_session=True)
            try:
                proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                timed_out = True
            out.seek(0), err.seek(0)
            stdout, stderr = (f.read(maximum_output_bytes).decode("utf-8", "replace") for f in (out, err))
        success = proc.returncode == 0 and os.path.exists(done) and os.path.getsize(done) > 0 and not timed_out
        layers_file = os.path.join(root, "layers")
        layers = open(layers_file).read().split() if os.path.exists(layers_file) else []
    lines = [line for line in stderr.splitlines() if line.strip()]
    if timed_out:
        error = "Execution timed out"
    elif not success:
        error = lines[-1] if lines else f"exited with status {proc.returncode} before the end of the code"
    else:
        error = None
    memory_exceeded = "MemoryError" in stderr or "Cannot allocate memory" in stderr
    return ExecutionResult(success, stdout, stderr, error, timed_out, memory_exceeded), layers


# ---------------------------------------------------------------------------------------------
# Free-form conversations: SmolTalk, CustomJSON (identity)


class SmolTalk(HubTask):
    repo_id = "HuggingFaceTB/smol-smoltalk"

    def __init__(self, split="train", **slice_kw):
        super().__init__("default", split, **slice_kw)

    def get_example(self, index):
        messages = [{"role": m["role"], "content": m["content"]} for m in self.row(index)["messages"]]
        check_messages(messages, f"{self.repo_id} {self.split} row {int(self.order[index])}")
        return {"messages": messages}


class CustomJSON(Task):
    """Conversations from a JSONL file (a path, or a URL fetched into task_data/custom/): each line is
    a list of alternating user/assistant messages, or {"messages": [...]}."""

    def __init__(self, path_or_url=IDENTITY_URL, **slice_kw):
        super().__init__(**slice_kw)
        path = path_or_url
        if path_or_url == IDENTITY_URL:
            path = download_task_file(IDENTITY_URL, "identity/identity_conversations.jsonl",
                                      "custom/identity_conversations.jsonl")
        elif is_url(path_or_url):
            path = download_file(path_or_url, task_data_dir("custom", path_or_url.rstrip("/").split("/")[-1]))
        elif not os.path.isfile(path):
            raise NanochatError(f"conversation file {path} not found: pass a JSONL path or URL")
        self.conversations = []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise NanochatError(f"{path}:{line_no}: not valid JSON ({e})") from e
                messages = record["messages"] if isinstance(record, dict) else record
                try:
                    check_messages(messages, f"{path}:{line_no}")
                except (ValueError, AttributeError) as e:
                    raise NanochatError(str(e)) from e
                self.conversations.append({"messages": messages})

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return self.conversations[index]


# ---------------------------------------------------------------------------------------------
# Spelling: SpellingBee (count a letter, with a python check) and SimpleSpelling


_word_lists = {}


def load_words():
    """The dwyl english-words list (~370K lowercase words), cached in memory once per process."""
    path = download_task_file(WORDS_URL, "words/words_alpha.txt", "words/words_alpha.txt")
    if path not in _word_lists:
        with open(path, encoding="utf-8") as f:
            _word_lists[path] = [w for w in (line.strip() for line in f) if w.isalpha() and w.isascii()]
    return _word_lists[path]


# {letter} and {word} are filled in; several languages so the skill is not tied to one phrasing
SPELLING_TEMPLATES = [
    "How many {letter} are in the word {word}", "How many times does the letter {letter} appear in {word}",
    "Count the number of {letter} in {word}", "How many {letter}s does {word} have",
    "In the word {word}, how many times do you see {letter}", "What is the count of {letter} in {word}",
    "Tell me how many {letter} there are in {word}", "how often does {letter} occur in {word}",
    "Can you count the {letter} letters in {word}", "Number of {letter} in {word}",
    "If you spell {word}, how many {letter} do you write", "{word}: how many {letter}",
    "Please count how many times {letter} shows up in the word {word}",
    "¿Cuántas {letter} hay en la palabra {word}", "¿Cuántas veces aparece la letra {letter} en {word}",
    "Combien de {letter} y a-t-il dans le mot {word}", "Combien de fois la lettre {letter} apparaît-elle dans {word}",
    "Wie viele {letter} sind im Wort {word}", "Wie oft kommt der Buchstabe {letter} in {word} vor",
    "Quante {letter} ci sono nella parola {word}", "Quantas letras {letter} há na palavra {word}",
    "Hoeveel keer komt de letter {letter} voor in {word}",
    "{word}这个单词里有几个{letter}", "字母{letter}在{word}中出现了几次",
    "{word}という単語に{letter}はいくつありますか", "{word}の中に{letter}は何回出てきますか",
    "{word}에 {letter}가 몇 개 있나요", "단어 {word}에서 {letter}는 몇 번 나오나요",
    "Сколько букв {letter} в слове {word}", "Kaç tane {letter} harfi var {word} kelimesinde",
]


def quote(text, rng):
    return rng.choice(["{}", "'{}'", '"{}"']).format(text)


def short_call_literal(word, word_text, template):
    """The string literal of a short answer's call, written so that the word in it has the question's tokens,
    one for one: a tiny model can copy tokens, but not respell a word into other tokens. The pre-tokenizer
    splits ' "strawberry"' into ' "' + 'strawberry' and ' strawberry' into one piece, whose BPE tokens differ
    (vocab 8192: ['stra', 'w', 'berry'] against [' straw', 'berry']), while a literal at the start of a call
    is split like the question's text only when it begins with a space. So: a quoted word keeps its quotes
    after a space (the calculator strips it), a word after a space keeps the space inside the quotes, and a
    word the question starts with (no space before it) is quoted after a space."""
    if word_text != word:
        return " " + word_text
    at = template.index("{word}")
    return f"' {word}'" if at > 0 and template[at - 1] == " " else f" '{word}'"


class SpellingBee(AnswerGraded, Task):
    """'How many r in strawberry?' answered by spelling the word out, counting, then checking with a
    python call; ends with '#### N' and is graded like GSM8K. A share `short_frac` of the answers is the
    call alone, its result copied into '#### N': two copies a tiny model can learn where it cannot learn
    to spell. Which example is short is drawn from its own RNG, so it does not change with the share."""

    def __init__(self, size=1000, split="train", short_frac=0.0, **slice_kw):
        assert split in ("train", "test"), split
        assert 0.0 <= short_frac <= 1.0, short_frac
        super().__init__(**slice_kw)
        self.size, self.split, self.short_frac, self.words = size, split, short_frac, load_words()

    def num_examples(self):
        return self.size

    def get_example(self, index):
        # each example has its own RNG, so any slice or order yields the same examples
        rng = random.Random(index if self.split == "train" else 10_000_000 + index)
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        count = word.count(letter)
        template = rng.choice(SPELLING_TEMPLATES)
        letter_text, word_text = quote(letter, rng), quote(word, rng)
        question = template.format(letter=letter_text, word=word_text)
        question = question.lower() if rng.random() < 0.3 else question
        question += "?" if rng.random() < 0.5 else ""
        short = rng.random() < self.short_frac  # drawn last: the question is the same for any share
        literal = short_call_literal(word, word_text, template) if short else f"'{word}'"
        call = [{"type": "python", "text": f"{literal}.count('{letter}')"},
                {"type": "python_output", "text": str(count)}]
        if short:
            parts = call + [{"type": "text", "text": f"\n\n#### {count}"}]
            return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]}
        walk, running = [], 0
        for i, char in enumerate(word, 1):
            running += char == letter
            walk.append(f"{i}:{char}" + (f" hit! count={running}" if char == letter else ""))
        reasoning = (f"We need to count the letter '{letter}' in the word '{word}'. First I spell it out:\n"
                     f"{word}:{','.join(word)}\n\nThen I go letter by letter:\n" + "\n".join(walk) +
                     f"\n\nThis gives us {count}.\n\nLet me double check this using Python:\n\n")
        parts = [{"type": "text", "text": reasoning}, *call,
                 {"type": "text", "text": f"\n\nPython gives us {count} too.\n\nMy final answer is:\n\n#### {count}"}]
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]}


class SimpleSpelling(Task):
    """'Spell the word: apple' -> 'apple:a,p,p,l,e'. Words in a fixed shuffled order (Random(42)); train
    reads it from the front, test from the back, so the two splits share no example."""

    def __init__(self, size=1000, split="train", **slice_kw):
        assert split in ("train", "test"), split
        super().__init__(**slice_kw)
        self.size, self.split = size, split
        self.words = list(load_words())
        random.Random(42).shuffle(self.words)

    def num_examples(self):
        return self.size

    def get_example(self, index):
        word = self.words[index if self.split == "train" else -1 - index]
        return {"messages": [{"role": "user", "content": f"Spell the word: {word}"},
                             {"role": "assistant", "content": f"{word}:{','.join(word)}"}]}

    def evaluate(self, conversation, response):
        return response.strip() == conversation["messages"][-1]["content"]


# ======== 7. Inference engine and calculator tool =================================================

CALC_MAX_CHARS = 256      # a longer "expression" is not arithmetic a model needs
CALC_MAX_BITS = 1024      # ints are capped at 2**1024 (~308 digits): no huge powers or products
CALC_TIME_LIMIT = 0.05    # seconds; checked by the walker itself, so it works from any thread
CALC_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
               ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
CALC_UNARYOPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def calc_eval(node, deadline):
    """Evaluate one node of an allow-listed AST: numbers, + - * / // % ** and 'text'.count('x')."""
    if time.monotonic() > deadline:
        raise ArithmeticError("calculator time limit")
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, str):  # type(): no bool, no complex
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in CALC_UNARYOPS:
        value = calc_eval(node.operand, deadline)
        return CALC_UNARYOPS[type(node.op)](calc_number(value))
    if isinstance(node, ast.BinOp) and type(node.op) in CALC_BINOPS:
        left, right = calc_number(calc_eval(node.left, deadline)), calc_number(calc_eval(node.right, deadline))
        if isinstance(node.op, ast.Pow) and isinstance(left, int) and isinstance(right, int):
            if right > 0 and max(abs(left).bit_length() - 1, 1) * right > CALC_MAX_BITS:  # decide before computing
                raise ArithmeticError("power too large")
        return calc_number(CALC_BINOPS[type(node.op)](left, right))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and len(node.args) == 1 and not node.keywords):
        text, part = calc_eval(node.func.value, deadline), calc_eval(node.args[0], deadline)
        if isinstance(text, str) and isinstance(part, str):
            return text.count(part)
    raise ValueError(f"not allowed in the calculator: {type(node).__name__}")


def calc_number(value):
    """Check an operand or result: a finite float or an int below the size cap (strings only count)."""
    if isinstance(value, int) and abs(value).bit_length() <= CALC_MAX_BITS:
        return value
    if isinstance(value, float) and value == value and abs(value) != float("inf"):
        return value
    raise ArithmeticError(f"calculator refuses {type(value).__name__} value")


def use_calculator(expr):
    """Run the model's tool call: arithmetic or "'text'.count('x')". Returns str(result), or None when the
    expression is not allowed, fails, or is too big/slow. Parsed with `ast` and walked over an allow-list:
    no eval, so no code can run, and no signals, so it works from any thread (unlike SIGALRM)."""
    if "'" not in expr and '"' not in expr:
        expr = expr.replace(",", "")  # models write 1,000
    expr = expr.strip()
    if not expr or len(expr) > CALC_MAX_CHARS or "\\" in expr:  # no backslash: escapes are the parser's only warnings
        return None
    try:
        return str(calc_eval(ast.parse(expr, mode="eval").body, time.monotonic() + CALC_TIME_LIMIT))
    except (SyntaxError, ValueError, ArithmeticError, TypeError, RecursionError, MemoryError):
        return None


class Engine:
    """Sampling from a GPT with a KV cache and the calculator tool.

    The prompt is run once on a batch-1 cache, copied into `num_samples` rows that then sample
    independently. A row stops at <|assistant_end|> or <|bos|> and leaves the batch (its cache rows are
    dropped), so finished samples stop costing compute. When a row writes <|python_start|>expr<|python_end|>
    the engine runs use_calculator(expr) and forces <|output_start|>result<|output_end|> into that row.
    DecodeBatch runs the same steps (prefill, sample, next_token, step) for requests that come and go.
    decode_dtype (model.DECODE_DTYPES) stores the model's matrices for inference in that precision first;
    compile=True runs the decode steps through torch.compile (GPT.compile_decode: faster steps, a slow first one)."""

    def __init__(self, model, tokenizer, decode_dtype=None, compile=False, prefix_tokens=0):
        self.model, self.tokenizer = model, tokenizer
        self.decode_dtype = set_decode_dtype(model, decode_dtype) if decode_dtype else None
        if compile:
            model.compile_decode()
        # prefix cache: prompt (a tuple of ids) -> its batch-1 KV cache, least recently used first; at most
        # prefix_tokens positions in all (0: off; only for fixed weights: RL changes them between prompts)
        self.prefixes, self.prefix_tokens = collections.OrderedDict(), prefix_tokens
        self.stop_tokens = ReplyParser(tokenizer).stops
        self.output_start, self.output_end = (tokenizer.encode_special(f"<|output_{s}|>") for s in ("start", "end"))
        self.drop_finished = True  # False: finished rows stay in the batch, as in the reference (bench.py A/B)

    def new_row(self, rng, temperature=1.0, top_k=None, top_p=None):
        """The state of one sample: its reply parser, tokens to force, terminal token, sampling settings."""
        return {"parser": ReplyParser(self.tokenizer), "forced": collections.deque(), "done": None, "rng": rng,
                "sampling": (temperature, top_k, top_p)}

    def next_token(self, row, sampled):
        """Pick this row's token (a forced tool token wins over the sample) and advance its parser.
        Returns (token, mask) with mask 0 for forced tokens."""
        token, mask = (row["forced"].popleft(), 0) if row["forced"] else (sampled, 1)
        what = row["parser"].push(token)
        if what == "stop":
            row["done"] = token
        elif what == "close" and row["parser"].ended[0] == "python":
            result = use_calculator(self.tokenizer.decode(row["parser"].ended[1]))
            if result is not None:
                row["forced"].extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
        return token, mask

    def prefill(self, tokens):
        """Run a prompt on a batch-1 cache of its length: -> (next-token logits (1, V), the cache). With a prefix
        cache, the longest stored prompt this one starts with (an earlier turn of the same conversation) is copied
        instead of recomputed, and this prompt is stored in turn. The cache returned is full: callers copy it."""
        cache = self.model.new_kv_cache(1, len(tokens))
        stored = self.stored_prefix(tokens)
        if stored is not None:
            cache.prefill(stored)
        ids = torch.tensor([tokens[cache.pos:]], dtype=torch.long, device=self.model.get_device())
        logits = self.model(ids, kv_cache=cache)[:, -1, :]
        if 0 < len(tokens) <= self.prefix_tokens:
            self.prefixes[tuple(tokens)] = cache
            while sum(map(len, self.prefixes)) > self.prefix_tokens:
                self.prefixes.popitem(last=False)
        return logits, cache

    def stored_prefix(self, tokens):
        """The cache of the longest stored prompt that `tokens` extends (None if there is none); it becomes the
        most recently used."""
        best = max((key for key in self.prefixes if len(key) < len(tokens) and tuple(tokens[:len(key)]) == key),
                   key=len, default=None)
        if best is None:
            return None
        self.prefixes.move_to_end(best)
        return self.prefixes[best]

    def sample(self, logits, rows):
        """(B, V) logits -> B token ids, each row with its own settings and generator. Rows with the same
        settings share the top-k and softmax; each draws from its own generator (one draw for rows sharing
        one, the samples of a prompt), so a row gets what it would get alone."""
        groups = {}
        for i, row in enumerate(rows):
            groups.setdefault(row["sampling"] if row["sampling"][0] else "greedy", []).append(i)
        if len(groups) == 1 and len({id(row["rng"]) for row in rows}) == 1:
            return sample_next_token(logits, rows[0]["rng"], *rows[0]["sampling"]).tolist()
        tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        for settings, indices in groups.items():
            index = torch.tensor(indices, device=logits.device)
            group = logits if len(indices) == len(rows) else logits[index]
            if settings == "greedy":
                tokens[index] = group.argmax(dim=-1)
                continue
            probs, ids = sampling_probs(group, *settings)
            choice = torch.cat([torch.multinomial(probs[j:j + 1], 1, generator=rows[i]["rng"])
                                for j, i in enumerate(indices)])
            tokens[index] = (choice if ids is None else ids.gather(-1, choice)).squeeze(-1)
        return tokens.tolist()

    def step(self, tokens, cache):
        """One decode step: each row's last token in, its next-token logits (B, V) out."""
        ids = torch.tensor(tokens, dtype=torch.long, device=self.model.get_device())[:, None]
        return self.model(ids, kv_cache=cache)[:, -1, :]

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, top_p=None, seed=42):
        """Yield (token_column, mask_column), one entry per sample, for each generated position.
        A finished sample repeats its terminal token with mask 0 until the others finish.
        max_tokens None: until the model's context (sequence_len) is full."""
        device = self.model.get_device()
        rng = torch.Generator(device=device).manual_seed(seed)
        if max_tokens is None:
            max_tokens = max(self.model.config.sequence_len - len(tokens), 0)
        if max_tokens <= 0:
            return
        logits, prompt_cache = self.prefill(tokens)
        logits = logits.expand(num_samples, -1)
        cache = self.model.new_kv_cache(num_samples, len(tokens) + max_tokens)
        cache.prefill(prompt_cache)
        del prompt_cache
        rows = [self.new_row(rng, temperature, top_k, top_p) for _ in range(num_samples)]  # one generator
        active = list(range(num_samples))  # rows still sampling, in the order of the cache's batch
        for step in range(max_tokens):
            sampled = self.sample(logits, [rows[i] for i in active])
            column = [(row["done"], 0) for row in rows]
            for i, sample in zip(active, sampled):
                if rows[i]["done"] is None:
                    column[i] = self.next_token(rows[i], sample)
            yield [token for token, _ in column], [mask for _, mask in column]
            still = [j for j, i in enumerate(active) if rows[i]["done"] is None]
            if not still or step == max_tokens - 1:
                break
            if len(still) < len(active) and self.drop_finished:
                cache.keep_rows(torch.tensor(still, device=device))
                active = [active[j] for j in still]
            logits = self.step([column[i][0] for i in active], cache)

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """Generate to completion. Returns (sequences, masks): each sequence is the prompt plus that sample's
        tokens up to (not including) its terminal token; masks are 0 on the prompt and on forced tokens."""
        sequences = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        finished = [False] * num_samples
        for column, mask_column in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(column, mask_column)):
                if finished[i] or token in self.stop_tokens:
                    finished[i] = True
                    continue
                sequences[i].append(token)
                masks[i].append(mask)
        return sequences, masks



class DecodeBatch:
    """Continuous batching: requests decode together in one batch of rows at different positions; a request
    joins between two steps (its prompt prefilled alone, copied into a free row) and leaves the moment it
    ends, hits its max_tokens or is dropped, freeing its row for the next. Each row keeps its own sampling
    settings, generator (seeded: the tokens it would get alone, up to float rounding), reply parser and
    calculator. Not thread-safe: one thread owns a batch (serve.py: one per replica)."""

    def __init__(self, engine, max_rows, seq_len=None):
        self.engine, self.max_rows = engine, max_rows
        self.seq_len = seq_len or engine.model.config.sequence_len
        with torch.inference_mode():  # like Engine.generate's caches: one compiled graph serves both
            self.cache = engine.model.new_kv_cache(max_rows, self.seq_len)
        self.rows, self.logits = [], None  # rows in the cache's order; their next-token logits (B, V)

    @torch.inference_mode()
    def join(self, tokens, max_tokens, temperature=1.0, top_k=None, top_p=None, seed=42):
        """Prefill a prompt and add it as a row; returns the row (a dict: "done" is set when it stops)."""
        if len(self.rows) >= self.max_rows:
            raise ValueError(f"the batch is full ({self.max_rows} rows)")
        if not 0 < len(tokens) < self.seq_len:
            raise ValueError(f"a prompt of {len(tokens)} tokens does not fit a context of {self.seq_len}")
        logits, prompt_cache = self.engine.prefill(tokens)
        rng = torch.Generator(device=self.engine.model.get_device()).manual_seed(seed)
        row = self.engine.new_row(rng, temperature, top_k, top_p)
        row["left"] = min(max_tokens, self.seq_len - len(tokens))  # tokens it may still generate
        self.cache.set_row(len(self.rows), prompt_cache, len(self.rows) + 1)
        self.rows.append(row)
        self.logits = logits if self.logits is None else torch.cat([self.logits, logits])
        return row

    def warm_up(self):
        """A few steps at one row, then at two, until the batch is empty again: with a compiled engine the
        compiling (a graph for one row, one for several) happens here, not in a user's request."""
        prompt = [self.engine.tokenizer.get_bos_token_id()] * 4
        self.join(prompt, max_tokens=4, temperature=0.0)
        self.step()
        if self.max_rows > 1:
            self.join(prompt, max_tokens=4, temperature=0.0)
        while self.rows:
            self.step()

    @torch.inference_mode()
    def leave(self, row):
        """Drop a row (finished, or its client left): the last row moves into its place."""
        i, last = self.rows.index(row), len(self.rows) - 1
        if i != last:
            self.cache.move_row(last, i, last)
            self.rows[i] = self.rows[last]
            self.logits[i] = self.logits[last]
        self.rows.pop()
        self.logits = self.logits[:last] if last else None
        self.cache.use_rows(last)

    @torch.inference_mode()
    def step(self):
        """Sample one token for every row: -> [(row, token, mask)]. Rows that finish leave; the rest run one
        decode step together."""
        sampled = self.engine.sample(self.logits, self.rows)
        results = []
        for row, sample in zip(self.rows, sampled):
            token, mask = self.engine.next_token(row, sample)
            row["left"] -= 1
            row["last"] = token
            results.append((row, token, mask))
        for row in [row for row in self.rows if row["done"] is not None or row["left"] <= 0]:
            self.leave(row)
        if self.rows:
            self.logits = self.engine.step([row["last"] for row in self.rows], self.cache)
        return results

# ======== 8. Evaluation: bits per byte, CORE, chat tasks ==========================================

@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes):
    """Bits per byte: summed nats over the bytes of the target tokens, special tokens excluded.
    Independent of the vocabulary size, so tokenizers can be compared. Sums are all-reduced over ranks."""
    total_nats = torch.zeros((), dtype=torch.float32, device=token_bytes.device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=token_bytes.device)
    for _ in range(steps):
        x, y = next(batches)[:2]
        nats = model(x, y, loss_reduction="none").view(-1)
        y = y.reshape(-1)
        num_bytes = torch.where(y >= 0, token_bytes[y.clamp(min=0)], 0)
        total_nats += (nats * (num_bytes > 0)).sum()
        total_bytes += num_bytes.sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    if total_bytes.item() == 0:
        return float("inf")
    return total_nats.item() / (math.log(2) * total_bytes.item())


# completed greedily during pretraining and by `evaluate.py --eval sample`
SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is",
                  "If yesterday was Friday, then tomorrow will be", "The opposite of hot is",
                  "The planets of the solar system are:", "My favorite color is", "If 5*x + 3 = 13, then x is"]


def sample_prompts(model, tokenizer):
    """Print the fixed prompts completed greedily: a glance at what a base model has learned."""
    for prompt in SAMPLE_PROMPTS:
        ids = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        print0(repr(prompt + tokenizer.decode(list(model.generate(ids, 16, temperature=0)))))


# ---- CORE: prompts as plain strings, few-shot blocks separated by a blank line ----

def render_core_mc(item, delim, shots):
    """One prompt per choice; the choice is the scored continuation."""
    head = "".join(f"{s['query']}{delim}{s['choices'][s['gold']]}\n\n" for s in shots)
    return [f"{head}{item['query']}{delim}{choice}" for choice in item["choices"]]


def render_core_schema(item, delim, shots):
    """One prompt per context option; the shared continuation is scored."""
    head = "".join(f"{s['context_options'][s['gold']]}{delim}{s['continuation']}\n\n" for s in shots)
    return [f"{head}{context}{delim}{item['continuation']}" for context in item["context_options"]]


def render_core_lm(item, delim, shots):
    """[prompt without the continuation (stripped), prompt with it]."""
    head = "".join(f"{s['context'].strip()}{delim}{s['continuation']}\n\n" for s in shots)
    prompt = f"{head}{item['context'].strip()}{delim}"
    return [prompt.strip(), prompt + item["continuation"]]


def continuation_spans(task_type, token_lists):
    """(start, end) of the scored tokens in each prompt: after the common prefix (MC), the common
    suffix (schema), or after the prompt without continuation (LM, which is one scored sequence)."""
    if task_type == "language_modeling":
        without, with_ = token_lists
        if with_[:len(without)] != without:
            raise ValueError("LM prompt without the continuation does not tokenize as a prefix of the full one")
        return [(len(without), len(with_))]
    if task_type == "multiple_choice":
        n = 0
        while all(len(t) > n for t in token_lists) and len({t[n] for t in token_lists}) == 1:
            n += 1
        return [(n, len(t)) for t in token_lists]
    n = 0
    while all(len(t) > n for t in token_lists) and len({t[-1 - n] for t in token_lists}) == 1:
        n += 1
    return [(len(t) - n, len(t)) for t in token_lists]


@torch.no_grad()
def score_example(model, token_lists, spans, task_type, gold, pad_id):
    """One forward over all prompts (right-padded). MC/schema: is the gold option the one with the lowest
    mean loss over its span? LM: does greedy prediction reproduce the continuation exactly?"""
    width = max(len(t) for t in token_lists)
    rows = [t + [pad_id] * (width - len(t)) for t in token_lists]
    ids = torch.tensor(rows, dtype=torch.long, device=model.get_device())
    logits = model(ids)
    if task_type == "language_modeling":
        start, end = spans[0]
        return bool((logits[0, start - 1:end - 1].argmax(-1) == ids[0, start:end]).all())
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")  # loss of token t+1
    mean_losses = [losses[i, s - 1:e - 1].mean().item() for i, (s, e) in enumerate(spans)]
    return min(range(len(mean_losses)), key=mean_losses.__getitem__) == gold


def evaluate_core_task(model, tokenizer, data, task, rank=0, world_size=1):
    """Accuracy on one task; examples strided over ranks, counts summed. Prompts longer than the model's
    rotary table are cut from the left (the reference never needs to: its table is 10x the context)."""
    task_type, delim, num_shots = task["icl_task_type"], task.get("continuation_delimiter", " "), task["num_fewshot"][0]
    render = {"multiple_choice": render_core_mc, "schema": render_core_schema, "language_modeling": render_core_lm}[task_type]
    bos = tokenizer.get_bos_token_id()
    max_len = model.rotary_len
    correct = torch.zeros(len(data), dtype=torch.float32, device=model.get_device())
    for idx in range(rank, len(data), world_size):
        others = [i for i in range(len(data)) if i != idx]
        shots = [data[i] for i in random.Random(1234 + idx).sample(others, min(num_shots, len(others)))]
        token_lists = tokenizer.encode(render(data[idx], delim, shots), prepend=bos)
        spans = continuation_spans(task_type, token_lists)
        if task_type == "language_modeling":
            token_lists = token_lists[1:]  # only the full prompt is scored
        cut = [max(0, len(t) - max_len) for t in token_lists]
        token_lists = [t[c:] for t, c in zip(token_lists, cut)]
        spans = [(s - c, e - c) for (s, e), c in zip(spans, cut)]
        correct[idx] = float(score_example(model, token_lists, spans, task_type, data[idx].get("gold"), bos))
    if world_size > 1:
        dist.all_reduce(correct)
    return correct.mean().item()


def evaluate_core(model, tokenizer, max_per_task=-1, bundle=None, rank=0, world_size=1):
    """CORE: mean over tasks of accuracy centered on the random baseline. Tasks whose data file is missing
    are skipped and named; the result is then marked partial. Returns a dict (results, centered, core...)."""
    if bundle is None:
        if rank == 0:  # one download; the other ranks wait for it
            ensure_eval_bundle()
        if world_size > 1:
            dist.barrier()
        bundle = ensure_eval_bundle()
    with open(os.path.join(bundle, "core.yaml")) as f:
        tasks = parse_core_yaml(f.read())
    with open(os.path.join(bundle, "eval_meta_data.csv")) as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    results, centered, missing, todo = {}, {}, [], []
    for task in tasks:  # read every task first: the overall ETA counts the examples still to score
        label, path = task["label"], os.path.join(bundle, "eval_data", task["dataset_uri"])
        if not os.path.exists(path):
            print0(f"CORE: skipping {label}, data file missing: {path}")
            missing.append(label)
            continue
        with open(path) as f:
            data = [json.loads(line) for line in f if line.strip()]
        random.Random(1337).shuffle(data)
        todo.append((task, data[:max_per_task] if max_per_task > 0 else data))
    total, done, t_start = sum(len(data) for _, data in todo), 0, time.time()
    for k, (task, data) in enumerate(todo, 1):
        label, t0 = task["label"], time.time()
        results[label] = evaluate_core_task(model, tokenizer, data, task, rank, world_size)
        baseline = 0.01 * baselines[label]
        centered[label] = (results[label] - baseline) / (1.0 - baseline)
        done += len(data)
        eta = (time.time() - t_start) / max(done, 1) * (total - done)
        print0(f"CORE task {k}/{len(todo)} {label:<35} accuracy {results[label]:.4f}  centered {centered[label]:+.4f}  "
               f"({len(data)} examples, {format_duration(time.time() - t0)}) | eta {format_duration(eta)}")
    core = sum(centered.values()) / len(centered) if centered else float("nan")
    return {"results": results, "centered_results": centered, "core_metric": core,
            "missing": missing, "partial": bool(missing)}


def write_core_csv(path, core):
    with atomic_write(path, "w") as f:
        writer = csv.writer(f)
        writer.writerow(["Task", "Accuracy", "Centered"])
        for label, acc in core["results"].items():
            writer.writerow([label, f"{acc:.6f}", f"{core['centered_results'][label]:.6f}"])
        writer.writerow(["CORE", "", f"{core['core_metric']:.6f}"])
        if core["partial"]:
            writer.writerow(["partial: missing " + " ".join(core["missing"]), "", ""])


# ---- chat evaluation: evaluate.py --stage sft|rl, and ChatCORE during sft.py ----

# name -> (task at its eval split, accuracy of random guessing); ChatCORE centers on the latter.
# SpellingBee is the sixth ChatCORE task, as in the reference's last version that had it.
CHAT_TASKS = {
    "ARC-Easy": (lambda: ARC("ARC-Easy", "test"), 0.25),
    "ARC-Challenge": (lambda: ARC("ARC-Challenge", "test"), 0.25),
    "MMLU": (lambda: MMLU("all", "test"), 0.25),
    "GSM8K": (lambda: GSM8K("main", "test"), 0.0),
    "HumanEval": (lambda: HumanEval(), 0.0),
    "SpellingBee": (lambda: SpellingBee(size=256, split="test"), 0.0),
}
CATEGORICAL_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU")


def parse_chat_tasks(spec):
    """'ARC-Easy,MMLU' (or the reference's 'ARC-Easy|MMLU'; empty = all) -> validated list of names."""
    names = [n.strip() for n in spec.replace("|", ",").split(",") if n.strip()] or list(CHAT_TASKS)
    unknown = [n for n in names if n not in CHAT_TASKS]
    if unknown:
        raise NanochatError(f"unknown chat task(s) {', '.join(unknown)}: choose from {', '.join(CHAT_TASKS)}")
    return names


def sum_over_ranks(count, device):
    t = torch.tensor(count, dtype=torch.long, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.item()


def report_progress(name, done, correct, total, world, t0):
    """Problems done (all ranks, estimated), rank 0's accuracy so far, ETA: one line rewritten on a terminal."""
    done_all = min(done * world, total)
    eta = (time.time() - t0) / max(done_all, 1) * (total - done_all)
    print_progress(f"{name}: {done_all}/{total} ({correct / max(done, 1):.1%}) | eta {format_duration(eta)}",
                   final=done_all >= total)


def letter_token_ids(tokenizer, letters):
    ids = [tokenizer.encode(letter) for letter in letters]
    if any(len(i) != 1 for i in ids):
        raise NanochatError(f"answer letters {letters} do not each encode to one token with this tokenizer: "
                            "categorical evaluation needs single-token letters")
    return [i[0] for i in ids]


@torch.no_grad()
def run_categorical(model, tokenizer, task, batch_size=8, max_problems=None, name="task"):
    """Multiple choice without sampling: one forward per batch of prompts (right-padded with BOS), and the
    answer is the allowed letter whose logit is highest at the <|assistant_start|> position.
    Batches are strided over ranks. Returns (num_correct, num_problems) summed over ranks."""
    rank, world = rank_and_world()
    device = next(model.parameters()).device
    n = len(task) if max_problems is None else min(len(task), max_problems)
    bos = tokenizer.get_bos_token_id()
    correct, done, t0 = 0, 0, time.time()
    for start in range(rank * batch_size, n, world * batch_size):
        conversations = [task[i] for i in range(start, min(start + batch_size, n))]
        prompts = [tokenizer.render_for_completion(c) for c in conversations]
        width = max(map(len, prompts))
        ids = torch.tensor([p + [bos] * (width - len(p)) for p in prompts], dtype=torch.long, device=device)
        logits = model(ids)
        for row, (conversation, prompt) in enumerate(zip(conversations, prompts)):
            letters = conversation["letters"]
            scores = logits[row, len(prompt) - 1, letter_token_ids(tokenizer, letters)]
            correct += bool(task.evaluate(conversation, letters[scores.argmax().item()]))
        done += len(conversations)
        report_progress(name, done, correct, n, world, t0)
    return sum_over_ranks(correct, device), n


@torch.no_grad()
def run_generative(model, tokenizer, task, num_samples=1, max_new_tokens=512, temperature=0.0, top_k=50,
                   max_problems=None, name="task"):
    """Sample `num_samples` completions per problem (KV-cache engine, tools on) and grade them; a problem
    passes if any sample does (pass@num_samples). Problems are strided over ranks.
    Returns (num_passed, num_problems) summed over ranks."""
    rank, world = rank_and_world()
    device = next(model.parameters()).device
    engine = Engine(model, tokenizer)
    n = len(task) if max_problems is None else min(len(task), max_problems)
    passed, done, t0 = 0, 0, time.time()
    for i in range(rank, n, world):
        conversation = task[i]
        prompt = tokenizer.render_for_completion(conversation)
        sequences, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                             temperature=temperature, top_k=top_k)
        completions = [tokenizer.decode(seq[len(prompt):]) for seq in sequences]
        passed += any(task.evaluate(conversation, c) for c in completions)
        done += 1
        report_progress(name, done, passed, n, world, t0)
    return sum_over_ranks(passed, device), n


def run_chat_eval(name, model, tokenizer, batch_size=8, num_samples=1, max_new_tokens=512, temperature=0.0,
                  top_k=50, max_problems=None):
    """Accuracy of the model on one task of CHAT_TASKS (categorical or generative as the task says)."""
    task = CHAT_TASKS[name][0]()
    if task.eval_type == "categorical":
        correct, total = run_categorical(model, tokenizer, task, batch_size, max_problems, name)
    else:
        correct, total = run_generative(model, tokenizer, task, num_samples, max_new_tokens, temperature,
                                        top_k, max_problems, name)
    return correct / max(total, 1)


def chatcore(accuracies, names=tuple(CHAT_TASKS)):
    """Mean over `names` of the accuracy centered on random guessing: 0 = chance, 1 = perfect.
    None unless every one of `names` was evaluated."""
    if not all(n in accuracies for n in names):
        return None
    return sum((accuracies[n] - CHAT_TASKS[n][1]) / (1 - CHAT_TASKS[n][1]) for n in names) / len(names)


# ======== 9. Report card ==========================================================================

REPORT_ORDER = ["tokenizer-training", "tokenizer-evaluation", "base-model-training", "base-model-evaluation",
                "chat-sft", "chat-evaluation-sft", "chat-rl", "chat-evaluation-rl"]
# Headline figures that go into the BASE / SFT / RL summary table, in this order (keys of the items dicts).
SUMMARY_METRICS = ["val bpb", "CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval",
                   "SpellingBee", "ChatCORE", "pass@1", "pass@8"]
GPU_HOURLY_USD = [("H100", 3.00), ("A100", 1.79)]   # per GPU-hour, rough cloud prices; others $2
# metrics.jsonl key -> (panel title, y-axis label with its unit, colour)
CURVE_KEYS = {"loss": ("train loss", "nats per token", "#1f77b4"), "val_bpb": ("val bpb", "bits per byte", "#d62728"),
              "reward": ("reward", "mean over samples", "#2ca02c")}
# every stage logs a row at step s about the model after s updates, so the curves of one run line up
STEP_CONVENTION = ("step s = the model after s updates; the train loss and reward at s are those of the update "
                   "from s to s+1, so they end one step before the last val bpb")


def report_dir():
    path = os.path.join(get_base_dir(), "report")
    os.makedirs(path, exist_ok=True)
    return path


def write_text_atomic(path, text):
    with atomic_write(path, "w") as f:  # readers see the old file or the new one, never half of one
        f.write(text)


def format_value(value):
    """A figure as the report shows it: '-' for none, 4 decimals for scores and losses, whole numbers with
    thousands separators from 1,000 up (3035.5389 -> 3,036), and tiny values in scientific notation."""
    if value is None:
        return "-"
    if isinstance(value, float) and math.isfinite(value):
        magnitude = abs(value)
        if magnitude >= 1000:
            return f"{value:,.0f}"
        if magnitude >= 100:
            return f"{value:.1f}"
        return f"{value:.4f}" if value == 0 or magnitude >= 1e-3 else f"{value:.2e}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def report_section(title, items, column=None):
    """Write one stage's section of the report card; returns its path (None on ranks other than 0).

    items: a dict, a markdown string, or a list of those; a dict becomes "- key: value" lines.
    column: "BASE", "SFT" or "RL" puts the section's SUMMARY_METRICS keys into the summary table.
    """
    if get_rank() != 0:
        return None
    items = items if isinstance(items, list) else [items]
    slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    parts = [f"## {title}", f"timestamp: {now}"]
    figures = {}
    for item in items:
        if isinstance(item, dict):
            parts.append("\n".join(f"- {key}: {format_value(value)}" for key, value in item.items()))
            figures.update({k: v for k, v in item.items() if isinstance(v, (int, float, str))})
        else:
            parts.append(str(item).strip())
    path = os.path.join(report_dir(), f"{slug}.md")
    # the .json twin carries the raw figures for the summary table; written first so a .md never lacks it
    write_text_atomic(path[:-3] + ".json", json.dumps({"title": title, "column": column, "figures": figures}))
    write_text_atomic(path, "\n\n".join(parts) + "\n")
    return path


def find_metrics_files(base_dir):
    """Every metrics.jsonl up to three levels under the base dir (e.g. base_checkpoints/d12/metrics.jsonl)."""
    found = []
    for depth in range(1, 4):
        found += glob.glob(os.path.join(base_dir, *["*"] * depth, "metrics.jsonl"))
    families = list(CHECKPOINT_DIRS.values())  # pipeline order: base, sft, rl, then anything else

    def pipeline_order(path):
        family = os.path.relpath(path, base_dir).split(os.sep)[0]
        return (families.index(family) if family in families else len(families), path)
    return sorted(found, key=pipeline_order)


def metrics_label(path, base_dir):
    """'base d12' for <base>/base_checkpoints/d12/metrics.jsonl; other places keep their relative folder."""
    family, _, tag = os.path.relpath(os.path.dirname(path), base_dir).partition(os.sep)
    stage = {folder: name for name, folder in CHECKPOINT_DIRS.items()}.get(family, family)
    return f"{stage} {tag}".strip()


def round_ticks(lo, hi, count=6, integer=False):
    """About `count` round tick values (steps of 1, 2 or 5 x 10^k) that cover [lo, hi] -> (ticks, decimals)."""
    if hi <= lo:  # a single value: a small range around it
        hi = lo + max(abs(lo) * 0.1, 1e-6)
    raw = (hi - lo) / (count - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw * (1 - 1e-9))
    step = max(step, 1) if integer else step
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return [round(k * step, decimals) for k in range(first, max(last, first + 1) + 1)], decimals


def curves_svg(runs):
    """A self-contained SVG line chart: one panel per (run, quantity) vs step, round ticks, labelled axes.
    runs: [(label, rows)]."""
    width, height, left, right, top, bottom, ncols = 380, 230, 70, 14, 28, 34, 2
    panels = []
    for label, rows in runs:
        for key, (title, unit, color) in CURVE_KEYS.items():
            points = [(float(r["step"]), float(r[key])) for r in rows
                      if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if points:
                panels.append((f"{label}: {title}", unit, points, color))
    nrows = max(1, math.ceil(len(panels) / ncols))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width * ncols}" height="{height * nrows + 20}" '
           f'font-family="sans-serif" font-size="11">', '<rect width="100%" height="100%" fill="white"/>']
    if not panels:
        out.append('<text x="20" y="30">no metrics.jsonl found</text>')
    for i, (title, unit, points, color) in enumerate(panels):
        x0, y0 = (i % ncols) * width, (i // ncols) * height
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        xticks, _ = round_ticks(min(xs), max(xs), integer=True)
        yticks, decimals = round_ticks(min(ys), max(ys))
        xlo, xhi, ylo, yhi = xticks[0], xticks[-1], yticks[0], yticks[-1]
        plot_w, plot_h = width - left - right, height - top - bottom
        def sx(x): return x0 + left + (x - xlo) / (xhi - xlo) * plot_w
        def sy(y): return y0 + top + (yhi - y) / (yhi - ylo) * plot_h
        out.append(f'<text x="{x0 + left}" y="{y0 + 16}" font-weight="bold">{html.escape(title)}</text>')
        out.append(f'<path d="M{x0 + left},{y0 + top}V{y0 + top + plot_h}H{x0 + left + plot_w}" '
                   f'fill="none" stroke="#444"/>')
        for yv in yticks:  # grid lines and labels
            out.append(f'<line x1="{x0 + left}" x2="{x0 + left + plot_w}" y1="{sy(yv):.1f}" y2="{sy(yv):.1f}" '
                       f'stroke="#eee"/><text x="{x0 + left - 4}" y="{sy(yv) + 4:.1f}" '
                       f'text-anchor="end" class="ytick">{yv:.{decimals}f}</text>')
        for xv in xticks:
            out.append(f'<text x="{sx(xv):.1f}" y="{y0 + top + plot_h + 14}" text-anchor="middle" '
                       f'class="xtick">{xv:.0f}</text>')
        out.append(f'<text x="{x0 + left + plot_w / 2}" y="{y0 + height - 4}" text-anchor="middle">step</text>')
        ymid = y0 + top + plot_h / 2
        out.append(f'<text x="{x0 + 14}" y="{ymid:.1f}" text-anchor="middle" transform="rotate(-90 {x0 + 14} '
                   f'{ymid:.1f})" class="ylabel">{html.escape(unit)}</text>')
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
        out.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        if len(points) <= 50:  # sparse series (val bpb) get dots so single points show
            out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}"/>' for x, y in points]
    out.append(f'<text x="10" y="{height * nrows + 12}" fill="#555">{html.escape(STEP_CONVENTION)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def git_commit():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit or "unknown") + (" (dirty)" if dirty else "")


def hardware_summary():
    """(markdown lines, hourly cost in $) of this machine."""
    ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    lines = [f"- CPU: {os.cpu_count()} cores ({platform.machine()}), {ram_gb:.1f} GB RAM"]
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if gpus:
        lines.append(f"- GPUs: {len(gpus)} x {gpus[0]}, CUDA {torch.version.cuda}")
    elif torch.backends.mps.is_available():
        lines.append("- GPU: Apple MPS")
    hourly = sum(next((usd for name, usd in GPU_HOURLY_USD if name in gpu), 2.00) for gpu in gpus)
    lines.append(f"- Python {platform.python_version()}, PyTorch {torch.__version__}, {platform.platform()}")
    return lines, hourly


def stage_times(base_dir):
    """[(stage, seconds)] from speedrun.sh's stamps (<base>/speedrun/<stage>.done holds the seconds)."""
    times = []
    for path in sorted(glob.glob(os.path.join(base_dir, "speedrun", "*.done")), key=os.path.getmtime):
        with open(path) as f:
            seconds = f.read().strip()
        if re.fullmatch(r"\d+(\.\d*)?", seconds):
            times.append((os.path.basename(path)[:-5], float(seconds)))
    return times


def summary_table(sections):
    columns = ["BASE", "SFT", "RL"]
    values = {c: {} for c in columns}
    for meta in sections:
        if meta.get("column") in values:
            values[meta["column"]].update({k: v for k, v in meta["figures"].items() if k in SUMMARY_METRICS})
    rows = [m for m in SUMMARY_METRICS if any(m in values[c] for c in columns)]
    table = ["| metric | " + " | ".join(columns) + " |", "|---|---|---|---|"]
    table += [f"| {m} | " + " | ".join(format_value(values[c].get(m, "-")) for c in columns) + " |" for m in rows]
    return "\n".join(table)


def generate_report(copy_to="."):
    """Stitch the sections into <base>/report/report.md with a header, the summary table, timings and cost,
    draw report_curves.svg next to it, copy both into copy_to (None: don't), and return report.md's path."""
    base, out_dir = get_base_dir(), report_dir()
    slugs = [os.path.basename(p)[:-3] for p in glob.glob(os.path.join(out_dir, "*.md")) if not p.endswith("/report.md")]
    slugs.sort(key=lambda s: (REPORT_ORDER.index(s) if s in REPORT_ORDER else len(REPORT_ORDER), s))
    sections = []
    for slug in slugs:
        try:
            with open(os.path.join(out_dir, slug + ".json"), encoding="utf-8") as f:
                sections.append(json.load(f))
        except (OSError, json.JSONDecodeError):
            pass
    hardware, hourly = hardware_summary()
    times = stage_times(base)
    total_s = sum(seconds for _, seconds in times)
    runs = [(metrics_label(p, base), read_metrics(p)) for p in find_metrics_files(base)]
    write_text_atomic(os.path.join(out_dir, "report_curves.svg"), curves_svg(runs))
    started = os.path.join(base, "speedrun", "started")  # written by speedrun.sh on its first run
    if os.path.exists(started):
        with open(started) as f:
            started = f.read().strip()
    else:
        started = "unknown"
    lines = ["# nanochat report card", "",
             f"- generated: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M:%S')}",
             f"- run started: {started}",
             f"- git commit: {git_commit()}", *hardware,
             f"- total wall time: {total_s / 60:.1f} min ({total_s:.0f} s over {len(times)} stages)",
             f"- estimated cost: ${total_s / 3600 * hourly:.2f} (${hourly:.2f}/h)", "",
             "## Summary", "", summary_table(sections), ""]
    if times:
        lines += ["## Wall time per stage", "", "| stage | wall time |", "|---|---|"]
        lines += [f"| {stage} | {format_duration(seconds)} |" for stage, seconds in times] + [""]
    lines += ["## Curves", "", "![train loss and val bpb per stage](report_curves.svg)", "", STEP_CONVENTION + ".", ""]
    for slug in slugs:
        with open(os.path.join(out_dir, slug + ".md"), encoding="utf-8") as f:
            lines += [f.read().strip(), ""]
    path = os.path.join(out_dir, "report.md")
    write_text_atomic(path, "\n".join(lines))
    if copy_to is not None and os.path.abspath(copy_to) != out_dir:
        for name in ("report.md", "report_curves.svg"):
            shutil.copyfile(os.path.join(out_dir, name), os.path.join(copy_to, name))
    return path
