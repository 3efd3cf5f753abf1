"""What a crash, a user or a full disk feeds the pipeline ends in recovery or in one line naming the file and
what to do, never a traceback: corrupt shards, tokenizer files, checkpoints, metrics; temp files of killed
saves; a full disk; bad flags; an unusable base dir; two runs on one checkpoint folder."""
import errno
import json
import os
import shutil
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import torch

import common
from common import NanochatError
from conftest import ROOT
from model import GPTConfig, build_gpt
from test_chain import RL_FLAGS, SFT_FLAGS, chain_dir, copy_of, run_script

VOCAB = 300
CONFIG = dict(sequence_len=32, vocab_size=VOCAB, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, window_pattern="L")
TINY_PRETRAIN = ["--depth", "1", "--head-dim", "64", "--max-seq-len", "64", "--device-batch-size", "2",
                 "--total-batch-size", "128", "--num-iterations", "2", "--eval-every", "-1", "--core-metric-every",
                 "-1", "--sample-every", "-1", "--warmup-steps", "0", "--device-type", "cpu"]
CAN_MOUNT = os.geteuid() == 0 and shutil.which("unshare") is not None


def corrupt(path, how):
    """Replace `path` (a symlink is replaced, never written through) by a damaged copy of its bytes."""
    data = open(path, "rb").read()
    os.remove(path)
    damaged = {"empty": b"", "truncated": data[: len(data) // 2], "garbage": os.urandom(4096),
               "torn": data[:-10], "garbled": b"\xff\xfe" + data[2:]}[how]
    with open(path, "wb") as f:
        f.write(damaged)


def one_line(message):
    return "\n" not in str(message) and "Traceback" not in str(message)


def run(cmd, base, prefix=(), **env):
    return subprocess.run([*prefix, sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NANOCHAT_BASE_DIR": str(base), "OMP_NUM_THREADS": "1", **env})


def assert_one_line_failure(proc, code, *needles):
    assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for needle in needles:
        assert needle.lower() in proc.stderr.lower(), proc.stderr


@pytest.fixture
def tokenizer(base_dir):
    text = [f"robust {i} tests {i * 7} with some words and more words" for i in range(300)]
    tok = common.Tokenizer.train(iter(text), VOCAB)
    tok.save(str(base_dir / "tokenizer"))
    return tok


@pytest.fixture(scope="module")
def pretrain_base(shared_data, tmp_path_factory):
    """A base dir with a tokenizer trained on real text and two real shards (train 0, validation 12)."""
    base = tmp_path_factory.mktemp("robust_base")
    texts = pq.read_table(shared_data / "pretrain" / "shard_00000.parquet").column("text").to_pylist()[:100]
    common.Tokenizer.train(iter(texts), 512).save(str(base / "tokenizer"))
    (base / "base_data_climbmix").mkdir()
    for name in ("shard_00000.parquet", "shard_00012.parquet"):
        shutil.copyfile(shared_data / "pretrain" / name, base / "base_data_climbmix" / name)
    return base


def tiny_model(**overrides):
    torch.manual_seed(0)
    return build_gpt(GPTConfig(**{**CONFIG, **overrides}), "cpu")


def save_step(ckpt, step, model=None, **meta):
    model = model or tiny_model()
    optimizer = model.setup_optimizer()
    meta = {"step": step, "model_config": CONFIG, "loop_state": {}, **meta}
    common.save_checkpoint(str(ckpt), step, model.state_dict(), optimizer.state_dict(), meta)
    return model, optimizer


# ---- 1. corrupt files ----

@pytest.mark.parametrize("how", ["empty", "truncated", "garbage"])
def test_a_corrupt_shard_is_fetched_again_from_a_local_mirror(how, shared_data, base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_MIRROR", str(shared_data))
    common.download_shards(1)
    shard = base_dir / "base_data_climbmix" / "shard_00000.parquet"
    corrupt(shard, how)
    assert common.repair_shards(common.split_files("train")) == [str(shard)]
    assert shard.read_bytes() == (shared_data / "pretrain" / "shard_00000.parquet").read_bytes()


def test_a_corrupt_shard_is_fetched_again_from_an_http_mirror(http_mirror, shared_data, base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_MIRROR", http_mirror)
    common.download_shards(1)
    shard = base_dir / "base_data_climbmix" / "shard_00012.parquet"
    corrupt(shard, "truncated")
    common.repair_shards(common.split_files("val"))
    assert shard.read_bytes() == (shared_data / "pretrain" / "shard_00012.parquet").read_bytes()


def test_a_corrupt_shard_no_source_has_is_one_line(shared_data, base_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_MIRROR", str(shared_data))
    common.download_shards(1)
    corrupt(base_dir / "base_data_climbmix" / "shard_00000.parquet", "garbage")
    (tmp_path / "empty_mirror" / "pretrain").mkdir(parents=True)
    monkeypatch.setenv("NANOCHAT_MIRROR", str(tmp_path / "empty_mirror"))
    with pytest.raises(NanochatError) as error:
        common.repair_shards(common.split_files("train"))
    assert "shard_00000.parquet is corrupt" in str(error.value) and "no such file" in str(error.value)
    assert one_line(error.value)


def test_a_corrupt_copy_in_the_mirror_is_never_installed(shared_data, base_dir, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror" / "pretrain"
    mirror.mkdir(parents=True)
    (mirror / "shard_00000.parquet").write_bytes(b"PAR1 not really PAR1")
    monkeypatch.setenv("NANOCHAT_MIRROR", str(tmp_path / "mirror"))
    with pytest.raises(NanochatError, match="not a readable parquet file.*replace it"):
        common.download_shard(0)
    assert os.listdir(base_dir / "base_data_climbmix") == ["shard_00000.parquet.lock"]  # no file, no temp


def test_a_corrupt_task_file_is_fetched_again(shared_data, base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_MIRROR", str(shared_data))
    rows = common.load_hub_dataset("openai/gsm8k", "main", "test").num_rows
    corrupt(base_dir / "task_data" / "openai--gsm8k" / "main" / "test" / "00000.parquet", "truncated")
    assert common.load_hub_dataset("openai/gsm8k", "main", "test").num_rows == rows


def test_pretrain_and_train_tokenizer_recover_from_a_corrupt_shard(pretrain_base, shared_data, tmp_path):
    """The scripts as a user runs them, on a data folder with a damaged shard, a torn metrics line and the
    temp file of a killed save: the shard comes back from the mirror, the run ends normally."""
    base = tmp_path / "base"
    shutil.copytree(pretrain_base, base)
    corrupt(base / "base_data_climbmix" / "shard_00000.parquet", "truncated")
    ckpt = base / "base_checkpoints" / "d1"
    ckpt.mkdir(parents=True)
    (ckpt / "metrics.jsonl").write_text('{"step": 0, "loss": 9.0}\n{"step": 1, "lo')
    dead = subprocess.Popen(["true"])
    dead.wait()
    (ckpt / f"model_000002.pt.tmp{dead.pid}").write_bytes(b"x" * 1000)  # a writer that is gone
    proc = run(["pretrain.py", *TINY_PRETRAIN], base, NANOCHAT_MIRROR=str(shared_data))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "shard_00000.parquet is corrupt" in proc.stdout and "fetching it again" in proc.stdout
    rows = [json.loads(line) for line in open(ckpt / "metrics.jsonl")]  # the fresh run's own rows only
    assert [row["step"] for row in rows] == [0, 1] and rows[0]["loss"] != 9.0
    assert not [name for name in os.listdir(ckpt) if ".tmp" in name]
    corrupt(base / "base_data_climbmix" / "shard_00000.parquet", "garbage")
    proc = run(["train_tokenizer.py", "--vocab-size", "300", "--max-chars", "20000"], base,
               NANOCHAT_MIRROR=str(shared_data))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fetching it again" in proc.stdout
    assert common.parquet_problem(str(base / "base_data_climbmix" / "shard_00000.parquet")) is None


@pytest.mark.parametrize("damage", ["torn", "garbled", "{}", "no ranks", "ranks not a list", "bad base64"])
def test_a_corrupt_tokenizer_json_is_one_line(tokenizer, base_dir, damage):
    path = base_dir / "tokenizer" / "tokenizer.json"
    payload = json.loads(path.read_text())
    if damage in ("torn", "garbled"):
        corrupt(path, damage)
    else:
        broken = {"{}": {}, "no ranks": {k: v for k, v in payload.items() if k != "mergeable_ranks"},
                  "ranks not a list": {**payload, "mergeable_ranks": 5},
                  "bad base64": {**payload, "mergeable_ranks": ["!!"] + payload["mergeable_ranks"][1:]}}[damage]
        path.write_text(json.dumps(broken))
    with pytest.raises(NanochatError) as error:
        common.get_tokenizer()
    assert str(path) in str(error.value) and "train_tokenizer.py" in str(error.value) and one_line(error.value)


def test_a_corrupt_tokenizer_pkl_is_one_line(base_dir):
    (base_dir / "tokenizer").mkdir()
    (base_dir / "tokenizer" / "tokenizer.pkl").write_bytes(b"\x80\x04garbage")
    with pytest.raises(NanochatError, match="tokenizer.pkl is corrupt") as error:
        common.get_tokenizer()
    assert one_line(error.value)


@pytest.mark.parametrize("how", ["empty", "truncated", "garbage", "other vocab", "missing"])
def test_a_corrupt_token_bytes_is_rebuilt_from_the_tokenizer(tokenizer, base_dir, how):
    path = base_dir / "tokenizer" / "token_bytes.pt"
    if how == "other vocab":
        torch.save(torch.ones(17, dtype=torch.int32), path)
    elif how == "missing":
        path.unlink()
    else:
        corrupt(path, how)
    assert torch.equal(common.get_token_bytes("cpu"), tokenizer.token_bytes().long())
    assert torch.equal(torch.load(path, weights_only=True), tokenizer.token_bytes())  # repaired on disk too


@pytest.mark.parametrize("name", ["model_000005.pt", "optim_000005_rank0.pt"])
@pytest.mark.parametrize("how", ["empty", "truncated", "garbage"])
def test_a_corrupt_checkpoint_file_is_one_line(base_dir, name, how):
    ckpt = base_dir / "base_checkpoints" / "d1"
    model, optimizer = save_step(ckpt, 5)
    corrupt(ckpt / name, how)
    with pytest.raises(NanochatError) as error:
        common.resume_run(str(ckpt), 5, "cpu", model, optimizer)
    assert f"{ckpt / name} is truncated or corrupt" in str(error.value) and one_line(error.value)
    assert "delete that step" in str(error.value)


@pytest.mark.parametrize("meta,message", [
    ("{}", "has no model_config"), ('{"step": 5, "model_config": ', "cannot read"), ("[]", "not a JSON object"),
    (b"\xff\xfe{}", "cannot read"),
])
def test_a_corrupt_meta_is_one_line_when_loading(tokenizer, base_dir, meta, message):
    ckpt = base_dir / "base_checkpoints" / "d1"
    save_step(ckpt, 5)
    (ckpt / "meta_000005.json").write_bytes(meta if isinstance(meta, bytes) else meta.encode())
    with pytest.raises(NanochatError, match=message) as error:
        common.load_model("base", "cpu")
    assert "meta_000005.json" in str(error.value) and one_line(error.value)


@pytest.mark.parametrize("meta", [{}, {"step": 5, "model_config": CONFIG}])
def test_a_meta_without_loop_state_is_one_line_when_resuming(base_dir, meta):
    ckpt = base_dir / "sft" / "d1"
    model, optimizer = save_step(ckpt, 5)
    (ckpt / "meta_000005.json").write_text(json.dumps(meta))
    with pytest.raises(NanochatError, match="has no loop_state.*without --resume-from-step") as error:
        common.resume_run(str(ckpt), 5, "cpu", model, optimizer)
    assert one_line(error.value)


def test_resuming_a_missing_step_or_another_model_is_one_line(tokenizer, base_dir):
    ckpt = base_dir / "base_checkpoints" / "d1"
    model, optimizer = save_step(ckpt, 5)
    with pytest.raises(NanochatError, match=r"no checkpoint at step 7 .*\(saved steps: 5\)"):
        common.resume_run(str(ckpt), 7, "cpu", model, optimizer)
    wider = tiny_model(n_embd=64)
    with pytest.raises(NanochatError, match="saved by a different model") as error:
        common.resume_run(str(ckpt), 5, "cpu", wider, wider.setup_optimizer())
    assert one_line(error.value)
    meta = json.loads((ckpt / "meta_000005.json").read_text())
    (ckpt / "meta_000005.json").write_text(json.dumps({**meta, "model_config": {**CONFIG, "n_embd": 64}}))
    with pytest.raises(NanochatError, match="weights do not match the meta's model_config") as error:
        common.load_model("base", "cpu")
    assert one_line(error.value)


@pytest.mark.parametrize("stage", ["base", "sft", "rl"])
@pytest.mark.parametrize("resume_step", [-1, 2])
def test_a_torn_or_garbled_metrics_line_in_each_stage(base_dir, stage, resume_step):
    """Every stage starts through start_run: a fresh run empties metrics.jsonl, a resumed one keeps the rows
    before its step; a line torn by a kill or garbled on disk is dropped instead of breaking the run."""
    ckpt = common.checkpoint_dir(stage, "d1")
    os.makedirs(ckpt)
    rows = [json.dumps({"step": s, "loss": 1.0 / (s + 1)}) for s in range(4)]
    with open(os.path.join(ckpt, "metrics.jsonl"), "wb") as f:
        f.write(("\n".join(rows[:2]) + "\n").encode() + b'{"step": \xff\xfe 1}\n' + rows[2].encode() + b'\n{"step": 3, "lo')
    _, metrics_path = common.start_run(stage, "d1", resume_step)
    kept = [row["step"] for row in common.read_metrics(metrics_path)]
    assert kept == ([] if resume_step < 0 else [0, 1])
    common.log_metrics(metrics_path, step=max(resume_step, 0), loss=0.5)
    assert [row["step"] for row in common.read_metrics(metrics_path)] == kept + [max(resume_step, 0)]


# ---- 2. temp files of killed saves, a full disk ----

def test_a_killed_save_leaves_no_temp_file_behind(base_dir):
    """SIGKILL in the middle of atomic_write: the temp file stays until the next run on that folder starts."""
    ckpt = common.checkpoint_dir("base", "d1")
    writer = subprocess.Popen([sys.executable, "-c", f"""
import sys, time, common
with common.atomic_write({os.path.join(ckpt, "model_000010.pt")!r}) as f:
    f.write(b"x" * 100000); f.flush(); print("writing", flush=True); time.sleep(60)
"""], cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "NANOCHAT_BASE_DIR": str(base_dir)})
    os.makedirs(ckpt, exist_ok=True)
    assert writer.stdout.readline().strip() == "writing"
    writer.kill()
    writer.wait()
    temp = os.path.join(ckpt, f"model_000010.pt.tmp{writer.pid}")
    assert os.path.exists(temp)
    live = os.path.join(ckpt, f"optim_000010_rank0.pt.tmp{os.getpid()}")  # a writer still at work
    open(live, "wb").close()
    common.start_run("base", "d1", -1)
    assert not os.path.exists(temp) and os.path.exists(live)


def fill_then_fail(ckpt, big_step):
    """save_checkpoint at step 1 (fits), then at `big_step` with a model too big for the disk."""
    save_step(ckpt, 1)
    with pytest.raises(NanochatError) as error:
        save_step(ckpt, big_step, tiny_model(n_embd=512))
    return str(error.value)


@pytest.mark.skipif(not CAN_MOUNT, reason="a size-capped tmpfs needs root and unshare")
def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
    """On a real 1 MiB tmpfs (a private mount namespace, gone when the process ends)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    script = f"""
import os, sys
sys.path.insert(0, {str(ROOT / "tests")!r})
import common, test_robustness as t
ckpt = {str(disk / "d1")!r}
message = t.fill_then_fail(ckpt, 2)
print(message)
assert not [n for n in os.listdir(ckpt) if ".tmp" in n], os.listdir(ckpt)
common.load_checkpoint(ckpt, 1, "cpu", load_optimizer=True)
print("step 1 loads")
"""
    proc = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {disk} && "
                           f"{sys.executable} -c \"$SCRIPT\""], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "SCRIPT": script, "OMP_NUM_THREADS": "1"})
    if "mount" in proc.stderr and proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first, second = proc.stdout.splitlines()[:2]
    assert first.startswith(f"no space left on device writing {disk / 'd1'}/")
    assert "the checkpoint at step 1 is intact" in first and second == "step 1 loads"


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662"),
    OSError(errno.ENOSPC, "No space left on device"),
])
def test_a_full_disk_reported_by_torch_or_the_os_is_one_line(base_dir, monkeypatch, error):
    """The same, where no tmpfs can be mounted: torch.save raises as it does on a full disk."""
    ckpt = base_dir / "d1"
    save_step(ckpt, 3)

    def full(*args, **kwargs):
        raise error
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(NanochatError) as failure:
        save_step(ckpt, 6)
    assert str(failure.value) == (f"no space left on device writing {ckpt}/optim_000006_rank0.pt; the checkpoint at "
                                  "step 3 is intact: free some space, then resume with --resume-from-step")
    assert sorted(os.listdir(ckpt)) == ["meta_000003.json", "model_000003.pt", "optim_000003_rank0.pt"]
    with pytest.raises(NanochatError, match="there is no earlier checkpoint"):
        save_step(base_dir / "d2", 1)
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("something else")))
    with pytest.raises(RuntimeError, match="something else"):  # only a full disk is said to be one
        save_step(ckpt, 7)


def test_a_full_disk_during_a_download_is_one_line(shared_data, base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_MIRROR", str(shared_data))

    def full(src, dst):
        open(dst, "wb").write(b"PAR1")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(shutil, "copyfile", full)
    with pytest.raises(NanochatError, match="no space left on device writing .*shard_00000.parquet"):
        common.download_shard(0)
    assert os.listdir(base_dir / "base_data_climbmix") == ["shard_00000.parquet.lock"]  # the temp file is gone


# ---- 3. bad flags and an unusable base dir ----

def parse(module, argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", [f"{module}.py", *argv])
    script = __import__(module)
    if module == "train_tokenizer":
        monkeypatch.setattr(script, "get_base_dir", lambda: (_ for _ in ()).throw(AssertionError("parsed")))
        return script.main(argv)
    return script.parse_args(argv) if module in ("pretrain", "sft", "rl", "evaluate") else script.parse_args()


BAD_FLAGS = [
    ("serve", ["--port", "99999"]), ("serve", ["--port", "-1"]), ("serve", ["--device-type", "tpu"]),
    ("serve", ["--max-tokens", "0"]), ("serve", ["-t", "nan"]),
    ("sft", ["--device-batch-size", "-2"]), ("sft", ["--device-batch-size", "0"]), ("sft", ["--max-seq-len", "0"]),
    ("sft", ["--max-seq-len", "-8"]), ("sft", ["--total-batch-size", "0"]), ("sft", ["--warmdown-ratio", "1.5"]),
    ("rl", ["--device-batch-size", "0"]), ("rl", ["--num-samples", "0"]), ("rl", ["--examples-per-step", "0"]),
    ("rl", ["--max-new-tokens", "0"]), ("rl", ["--top-k", "-3"]), ("rl", ["--device-type", "tpu"]),
    ("evaluate", ["--device-batch-size", "0"]), ("evaluate", ["--batch-size", "0"]),
    ("evaluate", ["--max-problems", "-1"]), ("evaluate", ["--stage", "mid"]),
    ("pretrain", ["--eval-tokens", "-5"]), ("pretrain", ["--total-batch-size", "-1024"]),
    ("pretrain", ["--depth", "0"]), ("pretrain", ["--device-batch-size", "many"]),
    ("pretrain", ["--resume-from-step", "-2"]), ("pretrain", ["--target-flops", "inf"]),
    ("chat", ["--max-tokens", "0"]), ("chat", ["-t", "3"]), ("chat", ["--step", "-1"]),
    ("train_tokenizer", ["--vocab-size", "100"]), ("train_tokenizer", ["--max-chars", "0"]),
    ("train_tokenizer", ["--doc-cap", "-1"]), ("train_tokenizer", ["--prefetch-shards", "-2"]),
    ("pretrain", ["--no-such-flag"]), ("sft", ["--depth", "4"]),
]


@pytest.mark.parametrize("module,argv", BAD_FLAGS, ids=[f"{m} {' '.join(a)}" for m, a in BAD_FLAGS])
def test_a_bad_flag_is_one_line_naming_it(module, argv, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(module, argv, monkeypatch)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert argv[0] in err and "see --help" in err and "usage" not in err


@pytest.mark.parametrize("module", ["pretrain", "sft", "rl", "evaluate", "chat", "serve", "train_tokenizer"])
def test_the_defaults_parse(module, monkeypatch):
    if module == "train_tokenizer":
        with pytest.raises(AssertionError, match="parsed"):  # got past parsing
            parse(module, [], monkeypatch)
    else:
        assert parse(module, [], monkeypatch) is not None


@pytest.mark.parametrize("script,argv", [("serve.py", ["--port", "99999"]), ("sft.py", ["--max-seq-len", "-8"]),
                                         ("train_tokenizer.py", ["--vocab-size", "0"])])
def test_a_bad_flag_exits_2_without_traceback(script, argv, base_dir):
    assert_one_line_failure(run([script, *argv], base_dir), 2, argv[0])


@pytest.mark.parametrize("where", ["a file", "below a file"])
def test_an_unusable_base_dir_is_one_line(tmp_path, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    base = blocker if where == "a file" else blocker / "nanochat"
    assert_one_line_failure(run(["pretrain.py", *TINY_PRETRAIN], base), 1, f"cannot create the folder {base}",
                            "NANOCHAT_BASE_DIR")


@pytest.mark.skipif(not CAN_MOUNT, reason="a read-only bind mount needs root and unshare")
@pytest.mark.parametrize("script", ["pretrain.py", "train_tokenizer.py"])
def test_a_read_only_base_dir_is_one_line(pretrain_base, tmp_path, script):
    base = tmp_path / "base"
    shutil.copytree(pretrain_base, base)
    argv = TINY_PRETRAIN if script == "pretrain.py" else ["--vocab-size", "300"]
    ro = f"mount --bind {base} {base} && mount -o remount,bind,ro {base} && exec \"$@\""
    proc = run([script, *argv], base, prefix=["unshare", "-m", "sh", "-c", ro, "sh"])
    assert_one_line_failure(proc, 1, "read-only", "NANOCHAT_BASE_DIR")


# ---- 6. one run per checkpoint folder ----

def hold_locks(base, stages, tag="d1"):
    """A process that starts a run of each stage on `tag` and stays alive; returns it once it holds the locks."""
    holder = subprocess.Popen([sys.executable, "-c", f"""
import time, common
for stage in {stages!r}:
    common.start_run(stage, {tag!r}, -1)
print("locked", flush=True)
time.sleep(120)
"""], cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "NANOCHAT_BASE_DIR": str(base)})
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_on_a_folder_stops_naming_the_pid(base_dir):
    holder = hold_locks(base_dir, ["base", "sft", "rl"])
    try:
        for stage, script in (("base", "pretrain.py"), ("sft", "sft.py"), ("rl", "rl.py")):
            with pytest.raises(NanochatError) as error:
                common.start_run(stage, "d1", -1)
            assert f"in use by another {script} run (PID {holder.pid} on " in str(error.value)
            assert one_line(error.value)
            common.start_run(stage, "d2", -1)  # another tag is another folder
    finally:
        holder.kill()
        holder.wait()
    for stage in ("base", "sft", "rl"):  # the kernel dropped the lock with the process
        common.start_run(stage, "d1", -1)
    common.start_run("base", "d1", -1)  # this process already holds it: starting again is fine


def test_a_second_pretrain_run_stops_before_touching_the_first(pretrain_base, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(pretrain_base, base)
    holder = hold_locks(base, ["base"])
    try:
        metrics = base / "base_checkpoints" / "d1" / "metrics.jsonl"
        metrics.write_text('{"step": 0, "loss": 5.0}\n')  # the first run's progress
        t0 = time.time()
        proc = run(["pretrain.py", *TINY_PRETRAIN], base)
        assert_one_line_failure(proc, 1, f"(PID {holder.pid} on ", "pass another --model-tag")
        assert metrics.read_text() == '{"step": 0, "loss": 5.0}\n' and time.time() - t0 < 120
        assert not list((base / "base_checkpoints" / "d1").glob("model_*"))
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("script,stage,flags", [("sft.py", "sft", SFT_FLAGS), ("rl.py", "rl", RL_FLAGS)])
def test_a_second_sft_or_rl_run_stops_naming_the_pid(tmp_path_factory, http_mirror, tmp_path, script, stage, flags):
    base = copy_of(chain_dir(tmp_path_factory, http_mirror), tmp_path / "base")
    metrics = base / common.CHECKPOINT_DIRS[stage] / "d2" / "metrics.jsonl"
    holder = hold_locks(base, [stage], tag="d2")
    try:
        metrics.write_text('{"step": 0, "loss": 5.0}\n')  # the first run's progress
        before = metrics.read_text()
        proc = run_script(base, http_mirror, script, *flags, check=False)
        assert_one_line_failure(proc, 1, f"in use by another {script} run (PID {holder.pid} on ")
        assert metrics.read_text() == before
    finally:
        holder.kill()
        holder.wait()
