"""`python bench.py gpu --smoke`: every section of the GPU check runs (tiny model, no compile on a CPU), so the
full command cannot rot on machines without a GPU."""
import os
import pathlib
import subprocess
import sys
import tempfile

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_bench(*argv, timeout=180):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "bench.py", "gpu", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def table_rows(stdout):
    """The table's rows as dicts by column name; the dashes under the header give the column widths."""
    lines = stdout.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("section"))
    spans, pos = [], 0
    for dashes in lines[i + 1].split("  "):
        spans.append((pos, pos + len(dashes)))
        pos += len(dashes) + 2
    names = [lines[i][a:b].strip() for a, b in spans]
    return [{n: line[a:b].strip() for n, (a, b) in zip(names, spans)} for line in lines[i + 2:] if line.strip()]


def test_smoke_runs_every_section_and_prints_one_table():
    proc = run_bench("--smoke")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = table_rows(proc.stdout)
    variants = 2 if torch.cuda.is_available() else 1  # on a GPU the decode steps are also timed compiled
    log = pathlib.Path(tempfile.gettempdir(), "bench_gpu.log")  # what each section printed: why one failed
    why = proc.stdout + (log.read_text()[-4000:] if log.exists() else "")
    assert [r["section"] for r in rows] == ["cuda tests"] + ["train d2"] * 4 + ["train d3"] * 2 \
        + ["device batch auto"] + ["decode"] * 3 * variants + ["serve"], why
    assert not any(r["result"].startswith("FAILED") for r in rows), why
    train = [r for r in rows if r["section"].startswith("train")]
    assert [("SSSL" in r["config"], "fp8" in r["config"]) for r in train] == [
        (True, False), (True, True), (False, False), (False, True), (True, False), (True, True)]
    decode = [r for r in rows if r["section"] == "decode"]
    assert [r["config"].split("batch ")[1].split(",")[0] for r in decode] == [b for b in ("1", "8", "32")
                                                                             for _ in range(variants)]
    assert all(float(r["tokens/s"].replace(",", "")) > 0 for r in train + decode)
    assert rows[-1]["result"].startswith("first token")
    if not torch.cuda.is_available():  # the rows that need a GPU say so instead of failing; fp8 runs on the CPU
        assert {r["section"] for r in rows if r["result"] == "skipped: needs CUDA"} == {"cuda tests",
                                                                                        "device batch auto"}
        assert all(r["peak mem"].endswith("GiB") and r["result"].endswith(" s in all") for r in train)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_full_check_without_a_gpu_says_so_in_one_line():
    proc = run_bench(timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "--smoke" in proc.stderr
