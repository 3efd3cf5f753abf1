"""The whole chat pipeline at CI size on the real data samples, each stage a subprocess like a user runs it:
tokenizer -> pretrain (depth 2, seq 128) -> sft (a few dozen steps) -> rl (3 steps) -> chat eval of sft and rl.

The chain runs once per session and is cached on disk (`chain_dir`); test_sft, test_rl and test_chat_eval
copy it to resume from its checkpoints or to evaluate its models.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

SFT_STEPS, RL_STEPS = 30, 3
SFT_FLAGS = ["--mmlu-epochs", "0", "--identity-epochs", "1", "--simple-spelling-size", "300",
             "--spelling-bee-size", "300", "--num-iterations", str(SFT_STEPS), "--device-batch-size", "4",
             "--eval-every", "15", "--eval-tokens", "2048", "--chatcore-every", "1000", "--chatcore-max-cat", "4",
             "--chatcore-max-sample", "1", "--chatcore-max-new-tokens", "24", "--save-every", "5",
             "--init-lr-frac", "0.3"]  # the inherited LRs are tuned for big batches: too hot for 512 tokens
RL_FLAGS = ["--num-iterations", str(RL_STEPS), "--examples-per-step", "1", "--num-samples", "4",
            "--device-batch-size", "2", "--max-new-tokens", "32", "--eval-every", "3", "--eval-examples", "2",
            "--save-every", "1"]
EVAL_FLAGS = ["--max-problems", "2", "--max-new-tokens", "24", "--batch-size", "2"]


def run_script(base, mirror, script, *args, check=True, timeout=600, nproc=0):
    """Run a stage like a user does (under torchrun with `nproc` > 0 processes); returns the process."""
    # one thread: these models are so small that a second thread only adds synchronization
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), NANOCHAT_MIRROR=mirror, OMP_NUM_THREADS="1")
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else []
    proc = subprocess.run([sys.executable, *launcher, str(ROOT / script), *map(str, args)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def tear_last_line(path):
    """Cut the file inside its last line, as a kill during a write leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[:-10])


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def chain_dir(tmp_path_factory, mirror):
    """Base dir holding the finished chain; built on first use in the session, then reused."""
    root = tmp_path_factory.getbasetemp() / "sftrl_chain"
    if not (root / "chain_done").exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
        run_script(root, mirror, "train_tokenizer.py", "--vocab-size", 512, "--max-chars", 400_000)
        run_script(root, mirror, "pretrain.py", "--depth", 2, "--max-seq-len", 128, "--device-batch-size", 4,
                   "--total-batch-size", 512, "--num-iterations", 10, "--warmup-steps", 2, "--eval-every", -1,
                   "--core-metric-every", -1, "--sample-every", -1)
        (root / "sft.log").write_text(run_script(root, mirror, "sft.py", *SFT_FLAGS).stdout)
        run_script(root, mirror, "rl.py", *RL_FLAGS)
        for stage in ("sft", "rl"):
            (root / f"eval_{stage}.log").write_text(
                run_script(root, mirror, "evaluate.py", "--stage", stage, *EVAL_FLAGS).stdout)
        (root / "chain_done").touch()
    return root


def copy_of(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("chain_done", "*.lock"))
    return dst


@pytest.fixture(scope="module")
def chain(tmp_path_factory, http_mirror):
    return chain_dir(tmp_path_factory, http_mirror)


def test_every_stage_writes_checkpoint_and_metrics(chain):
    for stage_dir, step in (("base_checkpoints", 10), ("chatsft_checkpoints", SFT_STEPS),
                            ("chatrl_checkpoints", RL_STEPS)):
        ckpt = chain / stage_dir / "d2"
        for name in (f"model_{step:06d}.pt", f"meta_{step:06d}.json", f"optim_{step:06d}_rank0.pt", "metrics.jsonl"):
            assert (ckpt / name).exists(), f"{stage_dir}/d2/{name} missing"
    for stage in ("sft", "rl"):
        rows = (chain / "chat_eval" / f"{stage}_model_{SFT_STEPS if stage == 'sft' else RL_STEPS:06d}.csv")
        table = dict(line.split(",") for line in rows.read_text().splitlines()[1:])
        assert set(table) == {"ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "ChatCORE"}
        assert all(0.0 <= float(v) <= 1.0 for k, v in table.items() if k != "ChatCORE")


def test_sft_loss_falls_and_evals_run(chain):
    rows = read_jsonl(chain / "chatsft_checkpoints" / "d2" / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == SFT_STEPS
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.3, f"SFT loss did not fall: {first:.3f} -> {last:.3f}"
    assert [r["step"] for r in rows if "val_bpb" in r] == [0, 15, 30]
    chatcore = [r for r in rows if "chatcore" in r]
    assert [r["step"] for r in chatcore] == [SFT_STEPS] and chatcore[0]["chatcore"] is not None
    assert "starting the optimizer fresh" not in (chain / "sft.log").read_text()  # warm start from the base
    meta = json.loads((chain / "chatsft_checkpoints" / "d2" / f"meta_{SFT_STEPS:06d}.json").read_text())
    assert meta["max_seq_len"] == 128 and meta["model_config"]["n_layer"] == 2  # inherited from the base


def test_rl_samples_through_the_tool_and_logs_pass_at_k(chain):
    rows = read_jsonl(chain / "chatrl_checkpoints" / "d2" / "metrics.jsonl")
    steps = [r for r in rows if "reward" in r]
    assert [r["step"] for r in steps] == list(range(RL_STEPS))
    assert all(0 <= r["reward"] <= 1 and r["seq_len"] > 0 for r in steps)
    # the calculator ran on what the model wrote between <|python_start|> and <|python_end|>
    assert sum(r["calculator_calls"] for r in steps) > 0
    evals = [r for r in rows if "pass@1" in r]
    assert [r["step"] for r in evals] == [0, RL_STEPS]
    assert all(r["pass@1"] <= r["pass@2"] for r in evals)  # any-of-k can only grow with k
