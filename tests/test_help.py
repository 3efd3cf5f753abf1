"""What a new user meets first: the test summary, every stage's --help, and stages run out of order.

- the test summary names how many tests skipped for want of the sample data and how to supply it;
- `--help` of every script gives every flag a help text and shows its default; a short flag means one thing;
- a stage run before its parent fails with the parent's one-line message and downloads nothing;
- serve.py on a taken port fails at once, before loading any model;
- progress lines share one ETA format and write carriage returns only to a terminal.
"""
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

import common
from conftest import serve_directory

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = ["train_tokenizer.py", "pretrain.py", "sft.py", "rl.py", "evaluate.py", "chat.py", "serve.py"]


def test_summary_counts_the_skips_for_want_of_samples_and_names_the_fix(tmp_path):
    # a clone without the samples: this conftest, no NANOCHAT_TEST_DATA, no shared/data beside it
    (tmp_path / "repo" / "tests").mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "repo" / "tests")
    (tmp_path / "repo" / "tests" / "test_needs_samples.py").write_text(
        "import pytest\n"
        "def test_one(shared_data): pass\n"
        "def test_two(http_mirror): pass\n"
        "def test_other(): pytest.skip('no CUDA')\n"
        "def test_plain(): pass\n")
    env = {k: v for k, v in os.environ.items() if k != "NANOCHAT_TEST_DATA"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                            cwd=tmp_path / "repo", env=env, capture_output=True, text=True, timeout=120)
    lines = result.stdout.splitlines()
    assert lines[-1].startswith("1 passed, 3 skipped"), result.stdout
    hint = [line for line in lines if "for want of the real data samples" in line]
    assert hint == [lines[-2]], result.stdout  # one line, right above the counts
    assert hint[0].startswith("2 tests skipped") and "NANOCHAT_TEST_DATA=" in hint[0] and "shared/data" in hint[0]


# ---------------------------------------------------------------------------------------------
# --help: every flag has a help text and shows its default
# ---------------------------------------------------------------------------------------------

# Runs each script's own `if __name__ == "__main__"` with --help, but dumps its parser's flags and help text
# (one process for all: each would otherwise pay for importing torch).
DUMP_PARSERS = """
import argparse, json, runpy, sys
class Parsed(Exception):
    pass
def dump(parser, *args, **kwargs):
    flags = [{"options": a.option_strings, "default": repr(a.default), "has_default": a.default is not None and
              a.default is not argparse.SUPPRESS, "help": a.help} for a in parser._actions if a.option_strings]
    raise Parsed({"flags": flags, "help": parser.format_help()})
argparse.ArgumentParser.parse_args = dump
found = {}
for script in sys.argv[1:]:
    sys.argv = [script, "--help"]
    try:
        runpy.run_path(script, run_name="__main__")
    except Parsed as e:
        found[script.rsplit("/", 1)[-1]] = e.args[0]
print(json.dumps(found))
"""


@pytest.fixture(scope="module")
def parsers():
    """{script: {"flags": [...], "help": text}} of every script."""
    result = subprocess.run([sys.executable, "-c", DUMP_PARSERS, *[str(ROOT / s) for s in SCRIPTS]], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(found) == sorted(SCRIPTS), f"a script never parsed its flags: {sorted(found)}"
    return found


def help_entry(help_text, options):
    """The lines of `--help` that describe one flag: its option line up to the next flag or section."""
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"\s+" + re.escape(options[0]) + r"\b", line))
    end = start + 1
    while end < len(lines) and lines[end].startswith(" " * 8) and not lines[end].lstrip().startswith("-"):
        end += 1
    return " ".join(line.strip() for line in lines[start:end])


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_a_help_text_and_the_default_of_every_flag(parsers, script):
    parser = parsers[script]
    for flag in parser["flags"]:
        if flag["options"] == ["-h", "--help"]:
            continue
        assert flag["help"], f"{script} {flag['options']} has no help text"
        entry = help_entry(parser["help"], flag["options"])
        if flag["has_default"]:
            assert "(default: " in entry, f"{script} --help does not show the default of {flag['options']}: {entry}"
    # the one word for "never": -1 (0 is a real count wherever a flag takes one)
    for flag in parser["flags"]:
        text = flag["help"] or ""
        assert not re.search(r"\b0 *= *(never|off|disabled)", text), f"{script} {flag['options']}: {text}"


def test_a_flag_means_the_same_thing_in_every_script(parsers):
    meaning = {}  # short flag -> long flag
    for script, parser in parsers.items():
        for flag in parser["flags"]:
            short = [o for o in flag["options"] if not o.startswith("--")]
            long = [o for o in flag["options"] if o.startswith("--")]
            for s in short:
                meaning.setdefault(s, set()).add(long[0])
    assert all(len(longs) == 1 for longs in meaning.values()), meaning
    # and a shared long flag has the same default everywhere it samples: -t/--temperature of chat.py and serve.py
    defaults = {s: {f["options"][-1]: f["default"] for f in p["flags"]} for s, p in parsers.items()}
    assert defaults["chat.py"]["--temperature"] == defaults["serve.py"]["--temperature"]
    assert defaults["chat.py"]["--top-k"] == defaults["serve.py"]["--top-k"]


# ---------------------------------------------------------------------------------------------
# stages before their parent: the parent's message, nothing downloaded
# ---------------------------------------------------------------------------------------------

def run_stage(script, base, mirror, *args):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "NANOCHAT_MIRROR": mirror, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / script), *args, "--device-type", "cpu"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=180)


@pytest.fixture
def empty_mirror(tmp_path):
    """A real HTTP mirror with nothing on it: any download attempt is a 404 that the stage would report."""
    (tmp_path / "empty").mkdir()
    server, url = serve_directory(tmp_path / "empty")
    yield url
    server.shutdown()


@pytest.mark.parametrize("script, args, parent", [
    ("pretrain.py", ["--depth", "2"], "tokenizer"),
    ("sft.py", [], "pretrain.py"),
    ("rl.py", [], "sft.py"),
    ("evaluate.py", ["--stage", "base"], "pretrain.py"),
    ("evaluate.py", ["--stage", "sft"], "sft.py"),
    ("evaluate.py", ["--stage", "rl"], "rl.py"),
    ("chat.py", ["--stage", "sft", "-p", "hi"], "sft.py"),
])
def test_a_stage_before_its_parent_names_the_parent_and_downloads_nothing(base_dir, empty_mirror, script, args,
                                                                          parent):
    result = run_stage(script, base_dir, empty_mirror, *args)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    error = result.stderr.strip().splitlines()[-1]
    assert parent in error and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "download" not in (result.stdout + result.stderr).lower(), result.stdout + result.stderr
    written = [p.relative_to(base_dir).parts[0] for p in base_dir.rglob("*") if p.is_file()]
    assert not written, written  # no task_data, no eval_bundle, no shards, no empty checkpoint folder files


def test_serve_on_a_taken_port_fails_at_once_before_loading_a_model(base_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # no checkpoint exists either: the port is the first thing checked, so its message wins
        result = subprocess.run([sys.executable, str(ROOT / "serve.py"), "--port", str(port), "--device-type", "cpu"],
                                env={**os.environ, "NANOCHAT_BASE_DIR": str(base_dir)}, capture_output=True,
                                text=True, timeout=120)
    assert result.returncode == 1
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0] and "--port" in errors[0], result.stderr


# ---------------------------------------------------------------------------------------------
# progress: one format (`eta 1m05s`, common.format_duration) and carriage returns only on a terminal
# ---------------------------------------------------------------------------------------------

def test_download_progress_uses_the_one_eta_format():
    line = common.progress_line("shard_00000.parquet", 25e6, 100e6, time.time() - 10)  # 2.5 MB/s, 75 MB to go
    assert line.startswith("shard_00000.parquet  25.0/100.0 MB  2.5 MB/s")
    assert re.search(r"\| eta (\d+s|\d+m\d\ds)$", line) and "ETA" not in line
    assert line.endswith(f"eta {common.format_duration(30)}")


def test_progress_writes_carriage_returns_only_on_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(common, "_last_progress", [0.0])
    for done in range(1, 5):
        common.report_progress("ARC-Easy", done, done, 4, 1, time.time())
    logged = capsys.readouterr().out
    assert "\r" not in logged and logged.splitlines() == ["ARC-Easy: 1/4 (100.0%) | eta 0s",
                                                          "ARC-Easy: 4/4 (100.0%) | eta 0s"]  # first, then final
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    common.report_progress("ARC-Easy", 2, 1, 4, 1, time.time())
    assert capsys.readouterr().out == "\rARC-Easy: 2/4 (50.0%) | eta 0s"


def test_core_says_task_k_of_n_and_an_overall_eta(tmp_path, capsys):
    from test_core_eval import NextByteModel, make_bundle
    tokenizer = common.Tokenizer.train(iter(["abc"]), 256 + 9)
    make_bundle(tmp_path, [{"query": "ab", "choices": ["cde", "zzz"], "gold": 0}] * 3)
    (tmp_path / "eval_data" / "mc" / "gone.jsonl").write_text(json.dumps({"query": "a", "choices": ["b", "z"],
                                                                          "gold": 0}) + "\n")
    common.evaluate_core(NextByteModel(tokenizer.get_vocab_size()), tokenizer, bundle=str(tmp_path))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("CORE task")]
    assert [line.split()[2] for line in lines] == ["1/2", "2/2"]
    assert all(re.search(r"\| eta (\d+s|\d+m\d\ds)$", line) for line in lines) and lines[-1].endswith("eta 0s")
