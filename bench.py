"""Benchmarks: the figures quoted in the README and in issue notes come from here.

    python bench.py train --depth 6 --seq-len 512 --device-batch-size 32
    python bench.py decode --depth 6
    python bench.py tokenize
    python bench.py serve --depth 6
    python bench.py gpu                  one command that checks a GPU (under 8 minutes on one H100), one table
    python bench.py gpu --smoke          the same sections with a tiny model, on any machine
"""
import argparse
import contextlib
import copy
import gc
import glob
import http.client
import importlib
import importlib.util
import json
import multiprocessing
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import pyarrow.parquet as pq
import rustbpe
import torch

import common
import model
from model import COMPUTE_DTYPE, build_gpt, config_for_depth

# ---- train ----


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_seconds(fn, device, repeats=5):
    """The fastest of a few timed calls of fn, after one warm-up call (thread pool, kernel selection)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_ceiling(device, dtype, n=2048, repeats=5):
    """GFLOP/s of the best of a few n x n matmuls in `dtype`: what this machine's matmul units deliver at best,
    the ceiling a training step's achieved GFLOP/s is compared with."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 / best_seconds(lambda: a @ b, device, repeats) / 1e9


def load_model_file(folder):
    """model.py of another checkout (e.g. `git worktree add /tmp/old <commit>`) as a module of its own."""
    path = os.path.join(folder, "model.py")
    if not os.path.exists(path):
        raise SystemExit(f"bench.py: no model.py in {folder}: pass a checkout of the project to --compare-with")
    spec = importlib.util.spec_from_file_location("model_compared", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_step_fn(mod, args, device):
    """(step, gpt) for the model code in module `mod`: step() runs one training step on a fixed random batch and
    returns (forward+backward s, optimizer s, loss, process CPU s). The CPU seconds (all threads) tell the work
    apart from waiting when other processes share the cores."""
    torch.manual_seed(42)
    config = mod.config_for_depth(args.depth, head_dim=args.head_dim, sequence_len=args.seq_len,
                                  vocab_size=args.vocab_size, window_pattern=args.window_pattern)
    gpt = mod.build_gpt(config, device)
    gpt.chunked_loss = not args.no_chunked_loss
    if args.fp8:
        mod.check_fp8_support(device)
        gpt.fp8_layers = mod.enable_fp8(gpt, args.fp8_recipe)
    optimizer = gpt.setup_optimizer()
    step_model = torch.compile(gpt, dynamic=False) if args.compile else gpt
    x = torch.randint(0, args.vocab_size, (args.device_batch_size, args.seq_len), device=device)
    y = torch.roll(x, -1, dims=1)

    def step():
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step_model(x, y)
        loss.backward()
        sync(device)
        t1 = time.perf_counter()
        optimizer.step()
        gpt.zero_grad(set_to_none=True)
        sync(device)
        return t1 - t0, time.perf_counter() - t1, loss.item(), time.process_time() - c0
    return step, gpt


def setup_train_process(args, device):
    """Threads and allocator settings of a process that times training steps."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cpu" and not args.no_keep_freed_memory:
        model.keep_freed_memory()  # what a CPU training script should do too (see model.keep_freed_memory)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def model_summary(gpt):
    return dict(flops_per_token=gpt.estimate_flops(), n_embd=gpt.config.n_embd, n_head=gpt.config.n_head,
                params=gpt.num_scaling_params()["total"], fp8_layers=getattr(gpt, "fp8_layers", 0),
                chunked_loss=gpt.chunked_loss)


def train_worker(folder, args, conn):
    """The training steps of one checkout's model.py (folder None: this one) in a process of its own, driven by
    bench_train --compare-with over a pipe: "step" -> the step's timings, "memory" -> peak GiB, "stop". Each
    checkout gets its own heap and threads: with two models in one process, an identical copy of model.py
    trained at 0.90x of this one, and both ran well below their speed alone."""
    device = torch.device(args.device_type or common.autodetect_device_type())
    setup_train_process(args, device)
    step, gpt = train_step_fn(model if folder is None else load_model_file(folder), args, device)
    conn.send(model_summary(gpt))
    with contextlib.suppress(EOFError):  # the parent went away (the other checkout failed): nothing to report
        for command in iter(conn.recv, "stop"):
            conn.send(step() if command == "step" else peak_memory_gib(device))


def start_train_workers(folders, args):
    """{name: pipe} of a train_worker per checkout, each started by spawning a fresh interpreter."""
    context = multiprocessing.get_context("spawn")
    pipes = {}
    for name, folder in folders:
        ours, theirs = context.Pipe()
        context.Process(target=train_worker, args=(folder, args, theirs), daemon=True).start()
        pipes[name] = ours
    return pipes


def receive(pipe, name):
    """The next message of the train_worker of checkout `name`; one line when it has died (its traceback above)."""
    try:
        return pipe.recv()
    except EOFError:
        raise SystemExit(f"bench.py: the training process of {name} exited; its error is printed above") from None


def bench_train(args):
    """Steady-state training throughput: forward + backward + optimizer step on a fixed random batch. With
    --compare-with DIR, the model.py of DIR trains too, each checkout in a process of its own, their steps
    alternating (in turns ABBA, so neither always follows the other), so that both see the same load: the ratio
    of the medians holds on a busy machine where the absolute figures do not."""
    device = torch.device(args.device_type or common.autodetect_device_type())
    setup_train_process(args, device)
    if args.compare_with:
        load_model_file(args.compare_with)  # a clear error for a folder without model.py, before any worker starts
        args.func = None  # the workers get the flags, not this function
        pipes = start_train_workers([("this", None), (args.compare_with, args.compare_with)], args)
        summary = {name: receive(pipe, name) for name, pipe in pipes.items()}["this"]
        steps = {name: (lambda pipe=pipe, name=name: (pipe.send("step"), receive(pipe, name))[1])
                 for name, pipe in pipes.items()}
    else:
        step, gpt = train_step_fn(model, args, device)
        summary, steps = model_summary(gpt), {"this": step}
    runs = list(steps)
    B, T = args.device_batch_size, args.seq_len
    flops_per_token = summary["flops_per_token"]
    fp8 = f"{args.fp8_recipe} ({summary['fp8_layers']} layers)" if args.fp8 else "off"
    print(f"model: depth {args.depth}, n_embd {summary['n_embd']}, {summary['n_head']} heads of {args.head_dim}, "
          f"seq {T}, vocab {args.vocab_size}, window {args.window_pattern}; {summary['params']:,} "
          f"params, {flops_per_token / 1e6:.1f} MFLOP/token; batch {B} x {T} = {B * T:,} tokens/step; device {device}, "
          f"{torch.get_num_threads()} threads, dtype {model.COMPUTE_DTYPE}, compile {args.compile}, "
          f"chunked loss {summary['chunked_loss']}, keep freed memory {not args.no_keep_freed_memory}, fp8 {fp8}"
          + (", one process per checkout" if args.compare_with else ""))

    ceiling_before = matmul_ceiling(device, model.COMPUTE_DTYPE, args.ceiling_size)
    for i in range(args.warmup):
        for name in runs:
            fb, opt, loss, cpu = steps[name]()
            print(f"warm-up step {i} ({name}): {fb + opt:.2f} s (forward+backward {fb:.2f} s, optimizer {opt:.2f} s), "
                  f"loss {loss:.3f}")
    times = {name: [] for name in runs}
    for i in range(args.steps):
        for name in runs if i % 2 == 0 else runs[::-1]:  # A, B, B, A, A, B, ...
            fb, opt, loss, cpu = steps[name]()
            times[name].append((fb + opt, fb, opt, cpu))
            print(f"step {i} ({name}): {fb + opt:.2f} s (forward+backward {fb:.2f} s, optimizer {opt:.2f} s, "
                  f"{cpu:.2f} CPU s), loss {loss:.3f}")
    ceiling = max(ceiling_before, matmul_ceiling(device, model.COMPUTE_DTYPE, args.ceiling_size))  # load varies
    peak = common.get_peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else float("inf")
    results = {}
    for name in runs:
        dt, fb, opt, cpu = (statistics.median(t[i] for t in times[name]) for i in range(4))
        tok_s = B * T / dt
        achieved = flops_per_token * tok_s / 1e9
        mfu = f", MFU {100 * achieved * 1e9 / peak:.1f}%" if peak != float("inf") else ""
        print(f"{name}: median step {dt:.3f} s (forward+backward {fb:.3f} s, optimizer {opt:.3f} s; {cpu:.2f} CPU s) "
              f"over {len(times[name])} steps: {tok_s:,.0f} tokens/s, {achieved:.1f} GFLOP/s achieved{mfu}; matmul "
              f"ceiling {ceiling:.1f} GFLOP/s ({model.COMPUTE_DTYPE}) -> {100 * achieved / ceiling:.0f}% of it")
        results[name] = dict(tok_s=tok_s, cpu_s=cpu, mfu=100 * achieved * 1e9 / peak if peak != float("inf") else None)
    if args.compare_with:
        memory = {name: (pipe.send("memory"), receive(pipe, name))[1] for name, pipe in pipes.items()}
        for pipe in pipes.values():
            pipe.send("stop")
        memory_gib = memory["this"]
    else:
        memory_gib = peak_memory_gib(device)
    print(f"peak memory {memory_gib:.2f} GiB " + ("allocated on the GPU" if device.type == "cuda" else "max RSS") +
          (f" ({args.compare_with}: {memory[args.compare_with]:.2f} GiB)" if args.compare_with else ""))
    if args.compare_with:
        other = results[args.compare_with]
        print(f"this / {args.compare_with}: {results['this']['tok_s'] / other['tok_s']:.3f}x tokens/s (medians of "
              f"alternating steps), {other['cpu_s'] / results['this']['cpu_s']:.3f}x less CPU time per step; "
              f"load average {' '.join(open('/proc/loadavg').read().split()[:3]) if os.path.exists('/proc/loadavg') else '?'}")
    return dict(tok_s=results["this"]["tok_s"], mfu=results["this"]["mfu"], memory_gib=memory_gib, loss=loss)


def add_train_parser(sub):
    p = sub.add_parser("train", help="training tokens/s, GFLOP/s vs the matmul ceiling, MFU, peak memory")
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--device-batch-size", type=int, default=32)
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--window-pattern", default="L")
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (compilation happens here)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (as pretrain.py --compile)")
    p.add_argument("--no-chunked-loss", action="store_true", help="materialize the full logits (the reference way)")
    p.add_argument("--no-keep-freed-memory", action="store_true", help="leave glibc's malloc settings alone")
    p.add_argument("--fp8", action="store_true", help="fp8 matmuls in the block matrices (model.enable_fp8)")
    p.add_argument("--fp8-recipe", default="tensorwise", choices=model.FP8_RECIPES)
    p.add_argument("--ceiling-size", type=int, default=2048, help="n of the n x n matmuls that measure the ceiling")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device-type", default="")
    p.add_argument("--compare-with", default=None, metavar="DIR",
                   help="also train DIR/model.py (another checkout), alternating steps: the ratio of the two")
    p.set_defaults(func=bench_train)

# ---- decode ----


def decode_setup(args):
    """The model to time (random weights: decode speed does not depend on them) and a tokenizer with the
    same special-token ids as a trained one of this vocab size (the engine only needs those); with --stage,
    a saved checkpoint and its tokenizer instead."""
    torch.manual_seed(0)
    if getattr(args, "stage", ""):
        gpt, tokenizer, _ = common.load_model(args.stage, args.device_type or common.autodetect_device_type())
        text = " ".join(common.SAMPLE_PROMPTS * 20)
        return gpt.eval(), tokenizer, tokenizer.encode(text, prepend=tokenizer.get_bos_token_id())[:args.prompt_tokens]
    config = config_for_depth(args.depth, head_dim=args.head_dim, sequence_len=args.seq_len,
                              vocab_size=args.vocab_size, window_pattern=args.window_pattern)
    device = args.device_type or common.autodetect_device_type()
    model = build_gpt(config, device).eval()
    if COMPUTE_DTYPE != torch.float32:  # as chat.py does: weights cast once, not in every matmul
        model.to(COMPUTE_DTYPE)
    num_ranks = args.vocab_size - len(common.SPECIAL_TOKENS)
    ranks = {bytes([i]) if i < 256 else b"\xff" + i.to_bytes(2, "big"): i for i in range(num_ranks)}
    tokenizer = common.Tokenizer.from_ranks(ranks, common.SPLIT_PATTERN)
    prompt = torch.randint(0, num_ranks, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    return model, tokenizer, prompt


class StopSometimes(torch.nn.Module):
    """Wraps the model so <|assistant_end|> ties with the most likely token at every step: rows finish at
    random times (after ~top_k steps on average), like a batch of real replies of different lengths."""

    def __init__(self, model, end_token):
        super().__init__()
        self.model, self.config, self.end_token = model, model.config, end_token
        self.get_device, self.new_kv_cache = model.get_device, model.new_kv_cache

    def forward(self, idx, kv_cache=None):
        logits = self.model(idx, kv_cache=kv_cache)
        logits[:, -1, self.end_token] = logits[:, -1].max(dim=-1).values
        return logits


def import_tree(path):
    """model.py and common.py of another checkout (e.g. an older commit in a temporary folder) as modules of
    their own, next to this tree's: -> (model module, common module)."""
    saved = {name: sys.modules.pop(name) for name in ("model", "common") if name in sys.modules}
    sys.path.insert(0, str(path))
    try:
        return importlib.import_module("model"), importlib.import_module("common")
    finally:
        sys.path.remove(str(path))
        sys.modules.pop("model", None), sys.modules.pop("common", None)
        sys.modules.update(saved)


@contextlib.contextmanager
def modules_of(tree):
    """Run another tree's code: its functions that import `model` lazily then find their own."""
    if tree is None:
        yield
        return
    saved = sys.modules["model"]
    sys.modules["model"] = tree
    try:
        yield
    finally:
        sys.modules["model"] = saved


def time_decode(engine, prompt, batch_size, args, seed):
    """Run one generation; returns (tokens of unfinished rows after the first column, seconds since the
    first column, the first row's tokens): decode only, the prefill is not counted."""
    tokens, start, finished, first_row = 0, None, set(), []
    for column, _ in engine.generate(prompt, num_samples=batch_size, max_tokens=args.decode_tokens,
                                     temperature=args.temperature, top_k=args.top_k, seed=seed):
        first_row.append(column[0])
        if start is None:
            start = time.perf_counter()
            continue
        tokens += sum(1 for i, token in enumerate(column) if i not in finished)
        finished.update(i for i, token in enumerate(column) if token in engine.stop_tokens)
    return tokens, time.perf_counter() - start, first_row


def bandwidth_ceiling(device, megabytes=256, repeats=5):
    """GB/s of the best of a few fp32 matrix-vector products over `megabytes` of matrix: the memory bandwidth a
    decode step (every weight read once) can reach at best on this machine, measured in the same run."""
    n = int((megabytes * 2 ** 20 / 4) ** 0.5)
    w, x = torch.randn(n, n, device=device), torch.randn(n, device=device)
    return w.numel() * 4 / best_seconds(lambda: w @ x, device, repeats) / 1e9


def weight_bytes(gpt):
    """Bytes of weights one decode step reads: every matrix once (embeddings: one row per token, left out)."""
    matrices = [m for m in gpt.modules() if isinstance(m, torch.nn.Linear)]
    total = 0
    for m in matrices:
        if isinstance(m, model.DecodeLinear):
            total += m.qweight.numel() * m.qweight.element_size()
        else:
            rows = gpt.config.vocab_size if m is gpt.lm_head else m.weight.size(0)
            total += rows * m.weight.size(1) * m.weight.element_size()
    return total


def decode_variants(args, base, tokenizer):
    """name -> (engine, the tree's model module or None): --compare-with's engine first, then one per dtype."""
    variants = {}
    if args.compare_with:
        old_model, old_common = import_tree(args.compare_with)
        with modules_of(old_model):
            old = old_model.build_gpt(old_model.GPTConfig(**vars(base.config)), base.get_device()).eval()
        old.load_state_dict(base.state_dict())
        variants[f"{args.compare_with} fp32"] = (old_common.Engine(old, tokenizer), old_model)
    for dtype in args.decode_dtypes:
        engine = common.Engine(copy.deepcopy(base), tokenizer, dtype)
        variants.setdefault(f"this tree {engine.decode_dtype}", (engine, None))  # auto may repeat one
        if args.compile:
            engine = common.Engine(copy.deepcopy(base), tokenizer, dtype, compile=True)
            variants.setdefault(f"{engine.decode_dtype} compiled", (engine, None))
    return variants


def bench_decode(args):
    """Decode tokens/s of the Engine per batch size and weight dtype (median of --repeats, interleaved), with
    the GB/s of weight reads next to the measured memory-bandwidth ceiling; --compare-with DIR times another
    checkout's engine on the same weights in the same run."""
    if args.threads:
        torch.set_num_threads(args.threads)
    base, tokenizer, prompt = decode_setup(args)
    device = base.get_device()
    c = base.config
    print(f"model: depth {c.n_layer}, n_embd {c.n_embd}, seq {c.sequence_len}, vocab {c.vocab_size}, "
          f"window {c.window_pattern}, dtype {next(base.parameters()).dtype}; device {device}, "
          f"{torch.get_num_threads()} threads; prompt {len(prompt)} tokens, {args.decode_tokens} decoded, "
          f"temperature {args.temperature}, top-k {args.top_k}; loadavg {open('/proc/loadavg').read().split()[:3]}")
    end = tokenizer.encode_special("<|assistant_end|>")
    if args.stops:  # finished rows leave the batch vs stay in it (the reference)
        variants = {"drop finished": (common.Engine(StopSometimes(base, end), tokenizer), None),
                    "keep finished": (common.Engine(StopSometimes(base, end), tokenizer), None)}
        variants["keep finished"][0].drop_finished = False
    else:
        variants = decode_variants(args, base, tokenizer)
    ceilings, medians, firsts = [bandwidth_ceiling(device)], {}, {}
    for batch_size in args.batch_sizes:
        for engine, tree in variants.values():
            with modules_of(tree):
                time_decode(engine, prompt, batch_size, args, seed=-1)  # warm-up
        rates = {name: [] for name in variants}
        for repeat in range(args.repeats):
            for name, (engine, tree) in variants.items():  # interleaved, so load changes hit every variant alike
                with modules_of(tree):
                    tokens, seconds, firsts[name] = time_decode(engine, prompt, batch_size, args, seed=repeat)
                rates[name].append((tokens / seconds, seconds))
        ceilings.append(bandwidth_ceiling(device))
        reference = None
        for name, runs in rates.items():
            tok_s = sorted(r for r, _ in runs)
            median = medians[(batch_size, name)] = statistics.median(tok_s)
            reference = reference or median
            engine = variants[name][0]
            gb_s = weight_bytes(engine.model.model if args.stops else engine.model) * median / batch_size / 1e9
            same = next((i for i, (a, b) in enumerate(zip(firsts[name], next(iter(firsts.values())))) if a != b),
                        len(firsts[name]))
            print(f"batch {batch_size:>3} {name:>24}: {median:7.1f} tokens/s median ({median / reference:.2f}x; min "
                  f"{tok_s[0]:.1f}, max {tok_s[-1]:.1f}), weight reads {gb_s:5.1f} GB/s; first row's tokens equal to "
                  f"the first variant's for {same}/{len(firsts[name])}")
    if args.stage:  # what each dtype costs: bits per byte on the validation split, same batches for all
        for name, (engine, tree) in variants.items():
            batches = common.bestfit_batches(tokenizer, 8, base.config.sequence_len, "val", device)
            with modules_of(tree), torch.inference_mode():
                bpb = common.evaluate_bpb(engine.model, batches, args.bpb_steps, common.get_token_bytes(device))
            batches.close()
            print(f"{name:>24}: val bpb {bpb:.5f} over {args.bpb_steps} batches of 8 x {base.config.sequence_len}")
    print(f"memory-bandwidth ceiling (fp32 matrix-vector product, 256 MB): {max(ceilings):.1f} GB/s "
          f"(min {min(ceilings):.1f} over the run); loadavg {open('/proc/loadavg').read().split()[:3]}")
    return medians  # tokens/s by (batch size, variant)


def add_decode_parser(sub):
    p = sub.add_parser("decode", help="engine decode tokens/s (defaults: the CPU demo model)")
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--window-pattern", default="L")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--batch-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[1, 8])
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--decode-dtypes", type=lambda s: s.split(","), default=["fp32", "auto"],
                   help="weight dtypes to time, comma-separated (model.DECODE_DTYPES)")
    p.add_argument("--stage", default="", help="time a saved checkpoint (base|sft|rl) instead of random weights "
                   "and print each dtype's validation bits per byte")
    p.add_argument("--bpb-steps", type=int, default=8, help="validation batches for the bpb of each dtype (--stage)")
    p.add_argument("--compare-with", default="", help="another checkout (e.g. `git worktree add /tmp/old f3ddfd2`): "
                   "its engine on the same weights, timed first in each round")
    p.add_argument("--compile", action="store_true", help="also time each dtype with compiled decode steps "
                   "(Engine compile=True; the warm-up round compiles, 10-60 s a batch size on 2 cores)")
    p.add_argument("--stops", action="store_true", help="rows finish at random times: compare dropping finished "
                   "rows from the batch with keeping them (the reference), by useful tokens/s")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    p.add_argument("--device-type", default="")
    p.set_defaults(func=bench_decode)


# ---- tokenize ----


def shard_docs(path, doc_cap=None):
    docs = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    return [d[:doc_cap] for d in docs] if doc_cap else docs


def bench_tokenize(args):
    """Tokenizer training time per vocab size on the local shards (fetched through NANOCHAT_MIRROR when
    missing), then batch-encoding throughput of the val shard with the last tokenizer trained."""
    if len(glob.glob(os.path.join(common.pretrain_data_dir(), "*.parquet"))) < 2:
        common.download_shards(-1)
    train_files, (val_file,) = common.split_files("train"), common.split_files("val")
    docs, chars = [], 0
    for path in train_files:
        if chars >= args.max_chars:
            break
        for doc in shard_docs(path, args.doc_cap):
            if chars >= args.max_chars:
                break
            docs.append(doc)
            chars += len(doc)
    print(f"training text: {len(docs):,} docs, {chars / 1e6:.1f}M chars (train shards: {len(train_files)}); {os.cpu_count()} cores")
    for vocab_size in args.vocab_sizes:
        # baseline: the bare rustbpe call the reference makes, on the same text, right before ours
        t0 = time.time()
        rustbpe.Tokenizer().train_from_iterator(iter(docs), vocab_size - len(common.SPECIAL_TOKENS), pattern=common.SPLIT_PATTERN)
        t1 = time.time()
        tokenizer = common.Tokenizer.train(iter(docs), vocab_size)
        print(f"train vocab {vocab_size:>6}: {time.time() - t1:6.2f} s  (bare rustbpe call: {t1 - t0:.2f} s)")
    val_docs = shard_docs(val_file)
    val_bytes = sum(len(d.encode("utf-8")) for d in val_docs)
    for threads in sorted({1, args.threads}):
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.time()
            num_tokens = sum(map(len, tokenizer.encode(val_docs, num_threads=threads)))
            best = min(best, time.time() - t0)
        print(f"encode val shard ({val_bytes / 1e6:.2f} MB, vocab {tokenizer.get_vocab_size()}), {threads} thread(s): "
              f"{num_tokens / best / 1e6:.2f}M tokens/s, {val_bytes / best / 1e6:.1f} MB/s, {val_bytes / num_tokens:.2f} bytes/token")


def add_tokenize_parser(sub):
    p = sub.add_parser("tokenize", help="tokenizer training time and batch-encoding throughput")
    p.add_argument("--vocab-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[4096, 32768])
    p.add_argument("--max-chars", type=int, default=2_000_000_000, help="training characters (all shards by default)")
    p.add_argument("--doc-cap", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(func=bench_tokenize)


# ---- serve ----


def stream_request(port, body):
    """One streaming OpenAI request: -> (seconds to the first reply text, seconds to the last, reply tokens)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response, first, last, tokens = conn.getresponse(), None, None, 0
    assert response.status == 200, response.read()
    for line in response:
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        elif chunk["choices"][0]["delta"].get("content") or chunk["choices"][0]["finish_reason"]:
            first = first or time.perf_counter() - start
            last = time.perf_counter() - start
    conn.close()
    return first, last, tokens


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def bench_serve(args):
    """serve.py in-process on 127.0.0.1 with one replica, batching off (--max-batch 1: one request at a time)
    and on, at each --clients count: every client sends --repeats streaming requests back to back. Prints the
    aggregate reply tokens/s, p50 and p95 time to first token and p50 time per output token (from the first
    reply text to the last, per token after the first), and the engine's own time to first token without HTTP."""
    import serve
    if args.stage:
        gpt, tokenizer, _ = common.load_model(args.stage, args.device_type or common.autodetect_device_type())
    else:
        gpt, tokenizer, _ = decode_setup(args)
    dtype = model.set_decode_dtype(gpt, args.decode_dtype)
    max_batch = args.max_batch or serve.default_max_batch(gpt)
    servers = {"one at a time": serve.make_server(
                   [serve.Replica(0, gpt, tokenizer, max_batch=1, max_queue=1024, compile=args.compile)],
                   "127.0.0.1", 0, max_tokens=args.decode_tokens),
               f"batched ({max_batch} rows)": serve.make_server(
                   [serve.Replica(0, gpt, tokenizer, max_batch=max_batch, max_queue=1024, compile=args.compile)],
                   "127.0.0.1", 0, max_tokens=args.decode_tokens)}
    for server in servers.values():
        threading.Thread(target=server.serve_forever, daemon=True).start()
    text = "hello" * max(1, args.prompt_tokens // len(tokenizer.encode(" hello")))  # ~--prompt-tokens tokens
    messages = [{"role": "user", "content": text.replace("hello", " hello")[:serve.MAX_MESSAGE_CHARS]}]
    prompt = common.build_chat_prompt(tokenizer, messages, gpt.config.sequence_len, args.decode_tokens)[0]
    print(f"model: {gpt.config}; {dtype} decode weights; device {gpt.get_device()}, {torch.get_num_threads()} "
          f"threads; prompt {len(prompt)} tokens; replies of {args.decode_tokens} tokens (temperature 0.8, top-k 50); "
          f"{args.repeats} request(s) per client; loadavg {open('/proc/loadavg').read().split()[:3]}")
    engine = servers["one at a time"].replicas[0].engine
    start = time.perf_counter()
    next(iter(engine.generate(prompt, 1, args.decode_tokens, temperature=0.8, top_k=50)))
    engine_first = time.perf_counter() - start
    print(f"engine alone, no HTTP: time to first token {engine_first * 1000:.0f} ms")
    body = {"messages": messages, "stream": True, "temperature": 0.8, "top_k": 50, "max_tokens": args.decode_tokens,
            "stream_options": {"include_usage": True}}
    for server in servers.values():
        stream_request(server.server_address[1], body)  # warm-up
    results = {}
    for clients in args.clients:
        for name, server in servers.items():
            requests = []

            def client():
                for _ in range(args.repeats):
                    requests.append(stream_request(server.server_address[1], body))
            threads = [threading.Thread(target=client) for _ in range(clients)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            seconds = time.perf_counter() - start
            tokens = sum(n for _, _, n in requests)
            firsts = [first for first, _, _ in requests]
            gaps = [(last - first) / (n - 1) for first, last, n in requests if n > 1]
            results[(clients, name)] = dict(tok_s=tokens / seconds, ttft_p50=percentile(firsts, 0.5),
                                            ttft_p95=percentile(firsts, 0.95), tpot_p50=percentile(gaps, 0.5))
            r = results[(clients, name)]
            print(f"{clients:>3} clients, {name:>20}: {r['tok_s']:7.1f} tokens/s aggregate, time to first token p50 "
                  f"{r['ttft_p50'] * 1000:6.0f} ms, p95 {r['ttft_p95'] * 1000:6.0f} ms; time per output token p50 "
                  f"{r['tpot_p50'] * 1000:5.1f} ms", flush=True)
        off, on = (results[(clients, name)]["tok_s"] for name in servers)
        print(f"{clients:>3} clients: batching gives {on / off:.2f}x the aggregate tokens/s of one at a time")
    for server in servers.values():
        server.shutdown()
        server.server_close()
    print(f"loadavg {open('/proc/loadavg').read().split()[:3]}")
    first_batched = results[(args.clients[0], list(servers)[1])]
    return {"engine, no HTTP": engine_first, "POST /v1/chat/completions": first_batched["ttft_p50"], **{
        f"{clients} clients, {name}": r for (clients, name), r in results.items()}}


def add_serve_parser(sub):
    p = sub.add_parser("serve", help="serve.py under concurrent clients, batching off and on (defaults: the CPU "
                       "demo model)")
    p.add_argument("--stage", default="", help="serve a saved checkpoint (base|sft|rl) instead of random weights")
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--window-pattern", default="L")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--clients", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4, 16])
    p.add_argument("--repeats", type=int, default=2, help="requests each client sends, one after the other")
    p.add_argument("--max-batch", type=int, default=0, help="rows of the batched server (0: serve.py's default)")
    p.add_argument("--decode-dtype", default="auto", choices=model.DECODE_DTYPES)
    p.add_argument("--compile", action="store_true", help="both servers with compiled decode steps (as serve.py on a "
                   "CPU)")
    p.add_argument("--device-type", default="")
    p.set_defaults(func=bench_serve)


# ---- gpu: one command that checks a GPU ----

ROOT = pathlib.Path(__file__).resolve().parent


def run_subcommand(*argv):
    """Run another bench subcommand in this process, with its own defaults and flags; returns what it returns."""
    args = build_parser().parse_args([str(a) for a in argv])
    return args.func(args)


def free_device_memory():
    """Drop compiled graphs and cached blocks between sections: each section's peak memory is its own."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cuda_tests():
    """The CUDA tests (names with "cuda"; on a CPU they would all skip) in a fresh process."""
    command = [sys.executable, "-m", "pytest", "-q", "-k", "cuda", "-m", "not e2e", "-p", "no:cacheprovider", "tests"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    print(proc.stdout, proc.stderr)
    summary = (proc.stdout.strip().splitlines() or ["no output"])[-1].strip("= ")
    if proc.returncode != 0:
        raise RuntimeError(summary)
    return dict(note=summary)


def flags(**options):
    """--name value pairs for run_subcommand from keyword arguments (underscores become dashes)."""
    return [item for key, value in options.items() for item in ("--" + key.replace("_", "-"), value)]


def bench_gpu(args):
    """Every GPU-facing path in one run, printed as one table: the CUDA tests; training throughput (compiled, FA3
    when importable) of d12 at seq 2048 in bf16 and fp8 with SSSL and L windows and of d24 at device batch 16;
    --device-batch-size auto; KV-cache decode at batch 1, 8, 32; one request through serve.py. --smoke: the same
    sections with a tiny model on any machine, rows that need CUDA marked skipped. Exit status 1 if a row failed."""
    import pretrain  # before the first CUDA allocation: its allocator settings (expandable segments) apply here too
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("bench.py gpu: no CUDA GPU visible; run `python bench.py gpu --smoke` for the tiny-model version",
              file=sys.stderr)
        return 1
    device = torch.device("cuda" if cuda else "cpu")
    try:
        model.check_fp8_support(device)
        fp8_skip = None
    except ValueError:
        fp8_skip = "fp8 needs compute capability 8.9+"
    if args.smoke:  # tiny, but 128 wide: the smallest width whose matrices pass the fp8 filter
        small = dict(depth=2, head_dim=64, seq_len=128, vocab_size=512)
        big, batches = dict(small, depth=3), (2, 2)
        small_steps = big_steps = flags(steps=2, warmup=1, ceiling_size=256)
        served = small
        decode = flags(prompt_tokens=16, decode_tokens=8, repeats=1)
        serve = flags(prompt_tokens=16, decode_tokens=4, repeats=1)
        auto_max = 8
    else:
        small = dict(depth=12, head_dim=128, seq_len=2048, vocab_size=32768)
        big, batches = dict(small, depth=24), (32, 16)
        small_steps, big_steps = flags(steps=30, warmup=3), flags(steps=10, warmup=2)
        served = big  # the model the gpu presets of speedrun.sh train
        decode = flags(prompt_tokens=128, decode_tokens=128, repeats=3)
        serve = flags(prompt_tokens=128, decode_tokens=16, repeats=1)
        auto_max = 1048576 // big["seq_len"]  # the gpu preset's total batch, in sequences
    compile_flag = ["--compile"] if cuda else []  # compiling on a CPU costs minutes and is not what is checked
    dtype = str(model.COMPUTE_DTYPE).removeprefix("torch.")

    def attention_impl(pattern):
        if model.USE_FA3:
            return "fa3"
        return "flex" if cuda and model.FLEX_ON_CUDA and "S" in pattern else "sdpa"

    rows = []  # (section, config, tokens/s, MFU %, peak GiB, result)
    log_path = pathlib.Path(tempfile.gettempdir()) / "bench_gpu.log"
    t_start = time.perf_counter()
    with open(log_path, "w") as log:
        def section(name, config, skip, fn):
            """Run fn with its output in the log and add its row; a failure becomes a FAILED row, not an exit."""
            print(f"[bench gpu {time.perf_counter() - t_start:4.0f} s] {name}: {config}", file=sys.stderr, flush=True)
            if skip:
                rows.append((name, config, None, None, None, f"skipped: {skip}"))
                return None
            print(f"\n==== {name}: {config}", file=log, flush=True)
            t0 = time.perf_counter()
            try:
                with contextlib.redirect_stdout(log):
                    result = fn()
            except Exception as e:
                print(f"FAILED: {type(e).__name__}: {e}", file=log, flush=True)
                rows.append((name, config, None, None, None, f"FAILED: {type(e).__name__}: {str(e)[:80]}"))
                return None
            finally:
                free_device_memory()
            r = result if isinstance(result, dict) else {}
            rows.append((name, config, r.get("tok_s"), r.get("mfu"), r.get("memory_gib"),
                         r.get("note") or f"{time.perf_counter() - t0:.0f} s in all"))  # compile included
            return result

        section("cuda tests", "pytest -k cuda", None if cuda else "needs CUDA", cuda_tests)
        runs = [(small, batches[0], small_steps, pattern, fp8) for pattern in ("SSSL", "L") for fp8 in (False, True)]
        runs += [(big, batches[1], big_steps, "SSSL", fp8) for fp8 in (False, True)]
        for shape, batch, steps, pattern, fp8 in runs:
            precision = "fp8" if fp8 else dtype
            config = f"seq {shape['seq_len']} x {batch}, {pattern}, {precision}, {attention_impl(pattern)}"
            section(f"train d{shape['depth']}", config, fp8_skip if fp8 else None,
                    lambda: run_subcommand("train", *flags(**shape, device_batch_size=batch, window_pattern=pattern),
                                           *steps, *compile_flag, *(["--fp8"] if fp8 else [])))

        def auto_batch():
            config = model.config_for_depth(big["depth"], head_dim=big["head_dim"], sequence_len=big["seq_len"],
                                            vocab_size=big["vocab_size"])
            return dict(note=f"device batch {pretrain.find_device_batch_size(config, auto_max, device)} fits")
        section("device batch auto", f"d{big['depth']}, seq {big['seq_len']}, at most {auto_max}",
                None if cuda else "needs CUDA", auto_batch)
        rates = section("decode", f"d{served['depth']}, KV cache, batch 1/8/32", None,
                        lambda: run_subcommand("decode", *flags(**served), *decode, "--batch-sizes", "1,8,32",
                                               *compile_flag))
        if rates:
            rows.pop()
            rows += [("decode", f"d{served['depth']}, KV cache, batch {b}, {name.removeprefix('this tree ')}", tok_s,
                      None, None, "") for (b, name), tok_s in rates.items()]
        first = section("serve", f"d{served['depth']}, one request through serve.py", None,
                        lambda: run_subcommand("serve", *flags(**served), *serve))
        if first:
            rows[-1] = rows[-1][:5] + (f"first token {1000 * first['POST /v1/chat/completions']:.0f} ms "
                                       f"(engine alone {1000 * first['engine, no HTTP']:.0f} ms)",)

    device_name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"\nbench.py gpu{' --smoke' if args.smoke else ''}: {device_name}, torch {torch.__version__}, dtype {dtype}, "
          f"FA3 {'yes' if model.USE_FA3 else 'no'}; {time.perf_counter() - t_start:.0f} s in all; log: {log_path}")
    header = ("section", "config", "tokens/s", "MFU", "peak mem", "result")
    cells = [header] + [(s, c, "-" if t is None else f"{t:,.0f}", "-" if m is None else f"{m:.1f}%",
                         "-" if g is None else f"{g:.1f} GiB", note) for s, c, t, m, g, note in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) if j in (2, 3, 4) else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    return 1 if any(row[5].startswith("FAILED") for row in rows) else 0


def add_gpu_parser(sub):
    p = sub.add_parser("gpu", help="check a GPU end to end in one table (under 8 minutes on one H100)")
    p.add_argument("--smoke", action="store_true", help="the same sections with a tiny model, on any machine")
    p.set_defaults(func=bench_gpu)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    # each section registers its subcommand here
    add_train_parser(sub)
    add_decode_parser(sub)
    add_tokenize_parser(sub)
    add_serve_parser(sub)
    add_gpu_parser(sub)
    return parser


def main():
    args = build_parser().parse_args()
    status = args.func(args)
    if args.command == "gpu":
        sys.exit(status)  # nonzero when a section failed


if __name__ == "__main__":
    main()
