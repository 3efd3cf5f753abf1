"""bench.py train on the CPU with a tiny model: --compare-with trains another checkout's model.py in the same run,
each checkout in a process of its own."""
import shutil
import subprocess
import sys

from conftest import ROOT


def test_train_compare_with_alternates_two_checkouts(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(ROOT / "model.py", other / "model.py")  # the same code: the same losses, step for step
    proc = subprocess.run([sys.executable, "bench.py", "train", "--depth", "1", "--seq-len", "32",
                           "--device-batch-size", "2", "--vocab-size", "256", "--steps", "2", "--threads", "1",
                           "--ceiling-size", "64", "--compare-with", str(other)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    ours = [line.split("loss")[-1] for line in lines if line.startswith("step") and "(this)" in line]
    theirs = [line.split("loss")[-1] for line in lines if line.startswith("step") and f"({other})" in line]
    assert len(ours) == len(theirs) == 2 and ours == theirs
    assert any(line.startswith(f"this / {other}: ") and "x tokens/s" in line for line in lines)
    missing = subprocess.run([sys.executable, "bench.py", "train", "--compare-with", str(tmp_path / "nothing")],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and "no model.py in" in missing.stderr and "Traceback" not in missing.stderr


def test_train_compare_with_a_checkout_that_fails_ends_with_one_line(tmp_path):
    (tmp_path / "model.py").write_text("def config_for_depth(*args, **kwargs):\n    raise ValueError('cannot build')\n")
    proc = subprocess.run([sys.executable, "bench.py", "train", "--depth", "1", "--seq-len", "32",
                           "--device-batch-size", "2", "--vocab-size", "256", "--steps", "1", "--threads", "1",
                           "--ceiling-size", "64", "--compare-with", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.rstrip().splitlines()[-1] == \
        f"bench.py: the training process of {tmp_path} exited; its error is printed above"
    assert "ValueError: cannot build" in proc.stderr and "EOFError" not in proc.stderr
