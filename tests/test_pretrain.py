"""pretrain.py end to end on the real shards (tiny model): it learns, resumes exactly after SIGKILL, gives the
torchrun (2 processes learn like one; 2 nodes on 127.0.0.1 equal 2 processes), evaluate.py runs on its checkpoint, and bad
input fails in one line. Plus the one-dial derivations and schedules against the reference's numbers."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import torch

import pretrain
from common import NanochatError, Tokenizer
from conftest import ROOT

# total batch 1024 = 4 seqs x 128 tokens x 2: one process accumulates 2 micro-steps, two processes 1 each
TINY = ["--depth", "2", "--head-dim", "64", "--max-seq-len", "128", "--device-batch-size", "4",
        "--total-batch-size", "1024", "--num-iterations", "20", "--eval-every", "10", "--eval-tokens", "4096",
        "--core-metric-every", "-1", "--sample-every", "-1", "--warmup-steps", "0", "--save-every", "10",
        "--matrix-lr", "0.5", "--unembedding-lr", "0.2", "--embedding-lr", "3", "--device-type", "cpu"]


@pytest.fixture(scope="module")
def tiny_base(shared_data, tmp_path_factory):
    """A base dir with a 512-token vocabulary trained on real text and the real shards linked in."""
    base = tmp_path_factory.mktemp("pretrain_base")
    texts = pq.read_table(shared_data / "pretrain" / "shard_00000.parquet").column("text").to_pylist()[:200]
    Tokenizer.train(iter(texts), 512).save(str(base / "tokenizer"))
    (base / "base_data_climbmix").mkdir()
    for shard in sorted((shared_data / "pretrain").glob("*.parquet")):
        os.symlink(shard, base / "base_data_climbmix" / shard.name)
    return base


def env_for(base, **extra):
    return {**os.environ, "NANOCHAT_BASE_DIR": str(base), "OMP_NUM_THREADS": "1", **extra}


def run(cmd, base, check=True, **extra):
    proc = subprocess.run(cmd, cwd=ROOT, env=env_for(base, **extra), capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def metrics(base, tag):
    with open(base / "base_checkpoints" / tag / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def losses(records):
    return [r["loss"] for r in records if "loss" in r]


@pytest.fixture(scope="module")
def reference_run(tiny_base, http_mirror):
    # CORE at the last step too (it does not touch training): the eval bundle comes from the mirror
    run([sys.executable, "pretrain.py", *TINY, "--model-tag", "ref", "--core-metric-every", "20",
         "--core-metric-max-per-task", "2"], tiny_base, NANOCHAT_MIRROR=http_mirror)
    return metrics(tiny_base, "ref")


def test_tiny_run_learns(reference_run):
    assert [r["step"] for r in reference_run] == list(range(21))
    for r in reference_run[:-1]:
        assert {"loss", "lrm", "dt", "tok_per_sec", "mfu"} <= r.keys()
    bpb = {r["step"]: r["val_bpb"] for r in reference_run if "val_bpb" in r}
    assert sorted(bpb) == [0, 10, 20]
    assert bpb[20] < 0.8 * bpb[0], bpb
    assert -1 <= reference_run[-1]["core_metric"] <= 1


def test_exact_resume_after_sigkill(tiny_base, reference_run):
    ckpt = tiny_base / "base_checkpoints" / "killed"
    proc = subprocess.Popen([sys.executable, "pretrain.py", *TINY, "--model-tag", "killed"], cwd=ROOT,
                            env=env_for(tiny_base), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (ckpt / "meta_000010.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    with open(ckpt / "metrics.jsonl", "a") as f:
        f.write('{"step": 12, "lo')  # as if the kill had landed mid-write
    run([sys.executable, "pretrain.py", *TINY, "--model-tag", "killed", "--resume-from-step", "10"], tiny_base)
    resumed = metrics(tiny_base, "killed")
    assert [r["step"] for r in resumed] == list(range(21))
    assert losses(resumed) == losses(reference_run)  # bit for bit
    assert resumed[-1]["val_bpb"] == reference_run[-1]["val_bpb"]


@pytest.fixture(scope="module")
def ddp_run(tiny_base):
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "pretrain.py",
         *TINY, "--model-tag", "ddp"], tiny_base)
    return metrics(tiny_base, "ddp")


def test_torchrun_two_processes_learn_like_one(ddp_run, reference_run):
    # as in the reference, two ranks read other row groups than one process does: close, not equal
    assert [r["step"] for r in ddp_run] == list(range(21))
    bpb = {r["step"]: r["val_bpb"] for r in ddp_run if "val_bpb" in r}
    assert bpb[20] < 0.8 * bpb[0]
    assert bpb[20] == pytest.approx(reference_run[-1]["val_bpb"], rel=0.15)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_c10d_same_losses(tiny_base, ddp_run):
    endpoint = f"127.0.0.1:{free_port()}"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
              "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=tiny", "pretrain.py", *TINY,
              "--model-tag", "nodes"]
    nodes = [subprocess.Popen(launch, cwd=ROOT, env=env_for(tiny_base), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs[0][-3000:] + outputs[1][-3000:]
    assert losses(metrics(tiny_base, "nodes")) == pytest.approx(losses(ddp_run), rel=1e-4)  # same ranks, same data


EVAL = ["evaluate.py", "--stage", "base", "--model-tag", "ref", "--max-per-task", "2", "--device-batch-size", "4",
        "--split-tokens", "1024", "--device-type", "cpu"]


def core_of(stdout):
    return float(stdout.split("CORE metric: ")[1].split()[0])


@pytest.fixture(scope="module")
def base_eval_output(tiny_base, reference_run, http_mirror):
    return run([sys.executable, *EVAL, "--eval", "bpb,core,sample"], tiny_base, NANOCHAT_MIRROR=http_mirror).stdout


def test_evaluate_base_on_checkpoint(tiny_base, reference_run, base_eval_output):
    out = base_eval_output
    val_bpb = float(out.split("val bpb: ")[1].split()[0])
    assert val_bpb == pytest.approx(reference_run[-1]["val_bpb"], rel=0.2)  # fewer tokens than in training
    assert "train bpb: " in out and "partial: 20 of 22 tasks, missing squad, coqa" in out
    assert "'The capital of France is" in out
    assert (tiny_base / "base_eval" / "base_model_000020.csv").exists()


def test_evaluate_base_under_torchrun(tiny_base, base_eval_output, http_mirror):
    """Examples strided over 2 ranks and summed: the same CORE as one process."""
    proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *EVAL,
                "--eval", "core,bpb"], tiny_base, NANOCHAT_MIRROR=http_mirror)
    assert core_of(proc.stdout) == pytest.approx(core_of(base_eval_output), abs=1e-6)
    assert "val bpb: " in proc.stdout


@pytest.mark.parametrize("flags,needs,message", [
    (["--device-batch-size", "3"], "", "change --total-batch-size or --device-batch-size"),
    ([], "no_tokenizer", "run `python train_tokenizer.py`"),
    ([], "no_data", "run `python train_tokenizer.py`"),
])
def test_bad_input_is_one_line(tiny_base, tmp_path, monkeypatch, flags, needs, message):
    base = tiny_base
    if needs:  # a base dir lacking the tokenizer or the shards
        base = tmp_path / "base"
        (base / "base_data_climbmix").mkdir(parents=True)
        if needs == "no_data":
            os.symlink(tiny_base / "tokenizer", base / "tokenizer")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    with pytest.raises(NanochatError) as error:  # a SystemExit: the script prints it and exits with 1
        pretrain.main([*TINY, *flags])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_bad_input_exits_without_traceback(tiny_base):
    proc = run([sys.executable, "pretrain.py", *TINY, "--device-batch-size", "3"], tiny_base, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "--total-batch-size 1024 is not a multiple" in proc.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="--device-batch-size auto probes GPU memory")
def test_auto_device_batch_size(tiny_base):
    proc = run([sys.executable, "pretrain.py", *TINY, "--device-batch-size", "auto", "--total-batch-size", "65536",
                "--num-iterations", "2", "--model-tag", "auto", "--device-type", "cuda", "--no-compile"], tiny_base)
    chosen = int(proc.stdout.split("--device-batch-size auto: ")[1].split()[0])
    assert chosen & (chosen - 1) == 0 and 1 <= chosen <= 512


# ---- derivations and schedules, against the reference's table (§20) ----

class Args:
    aspect_ratio, head_dim, max_seq_len, window_pattern = 64, 128, 2048, "SSSL"
    total_batch_size, num_iterations, target_flops, target_param_data_ratio, weight_decay = -1, -1, -1.0, 12, 0.28


@pytest.mark.parametrize("depth,scaling,batch,wd,steps", [
    (12, 110_100_912, 524_288, 0.280, 2_520), (20, 435_160_240, 1_048_576, 0.100, 4_980),
    (24, 729_810_624, 1_048_576, 0.0597, 8_352), (32, 1_677_724_672, 2_097_152, 0.0368, 9_600),
])
def test_one_dial_matches_reference_table(depth, scaling, batch, wd, steps):
    config = pretrain.model_config(Args, depth, 32768)
    plan = pretrain.plan_run(Args, config, pretrain.model_config(Args, 12, 32768), 1.0, 32, 8)
    assert plan["scaling_params"] == scaling and plan["total_batch"] == batch
    assert plan["num_iterations"] == steps and plan["weight_decay"] == pytest.approx(wd, abs=6e-4)
    assert plan["grad_accum"] == batch // (32 * 2048 * 8)


def test_schedules():
    N = 5568  # the d24 speedrun: warmup 40, constant to step 1949, warmdown 3619 steps to 0.05
    lrm = [pretrain.lr_multiplier(it, N, 40, 0.65, 0.05) for it in range(N)]
    assert lrm[0] == pytest.approx(1 / 40) and lrm[39] == 1.0 and lrm[1949] == 1.0 and lrm[1950] < 1.0
    assert lrm[-1] == pytest.approx(1 / 3619 + (1 - 1 / 3619) * 0.05)
    assert pretrain.muon_momentum(0, N, 0.65) == pytest.approx(0.85)
    assert pretrain.muon_momentum(400, N, 0.65) == pytest.approx(0.97)
    assert pretrain.muon_momentum(N - 1, N, 0.65) == pytest.approx(0.97 - 0.07 * 3618 / 3619)
    assert pretrain.muon_weight_decay(0, N, 0.2) == pytest.approx(0.2)
    assert pretrain.muon_weight_decay(N // 2, N, 0.2) == pytest.approx(0.1)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_run_learns_like_full_precision(tiny_base, reference_run, recipe):
    """--fp8 on the CPU (torch._scaled_mm runs there, slowly): the same run, within a few percent."""
    proc = run([sys.executable, "pretrain.py", *TINY, "--model-tag", f"fp8{recipe}", "--fp8", "--fp8-recipe", recipe],
               tiny_base)
    assert "fp8 " + recipe + ": 12 layers" in proc.stdout
    got = metrics(tiny_base, f"fp8{recipe}")
    assert got[-1]["val_bpb"] == pytest.approx(reference_run[-1]["val_bpb"], rel=0.03)
    # (this tiny run's high LRs make the last full-precision steps spike: compare the steps before)
    assert losses(got)[:15] == pytest.approx(losses(reference_run)[:15], rel=0.05)


def test_keep_rest_run_says_no_token_was_repeated(tiny_base):
    """--keep-rest: the run learns, and its report section says it saw every token once (one pass); without it
    the report has no distinct-token count (the crops were dropped)."""
    flags = TINY + ["--num-iterations", "6", "--eval-every", "-1", "--save-every", "-1"]  # the last one wins
    proc = run([sys.executable, "pretrain.py", *flags, "--keep-rest", "--model-tag", "kr"], tiny_base)
    assert "data: 6,144 tokens in 1 pass(es) over the training shards, every one distinct" in proc.stdout
    section = (tiny_base / "report" / "base-model-training.md").read_text()
    assert "- passes over the data: 1" in section and "- distinct tokens: 6144" in section
    proc = run([sys.executable, "pretrain.py", *flags, "--model-tag", "crop"], tiny_base)
    assert "crops of long documents dropped" in proc.stdout
    assert "- distinct tokens: -" in (tiny_base / "report" / "base-model-training.md").read_text()
