"""speedrun.sh (the report card it ends with: test_report.py).

The end-to-end test (marker e2e, deselect with -m "not e2e") runs the whole pipeline with the micro preset
against the shared data served on 127.0.0.1, then checks every artifact, chats with the result through
serve.py and chat.py, and checks that a re-run resumes instead of redoing work.
"""
import json
import os
import pathlib
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# speedrun.sh
# ---------------------------------------------------------------------------------------------

STAGES = ["tokenizer", "pretrain", "base_eval", "sft", "sft_eval", "rl", "rl_eval", "ask", "report"]


def run_speedrun(cwd, timeout, **env_vars):
    """speedrun.sh with the installed packages (no venv), this interpreter, and env_vars on top."""
    env = {k: v for k, v in os.environ.items() if k not in ("NANOCHAT_MIRROR", "VIRTUAL_ENV", "PRESET", "DEPTH", "NPROC")}
    env.update(NO_VENV="1", PYTHON=sys.executable, PYTHONIOENCODING="utf-8", **env_vars)
    return subprocess.run(["bash", str(ROOT / "speedrun.sh")], cwd=cwd, env=env, capture_output=True,
                          text=True, encoding="utf-8", errors="replace", timeout=timeout)


def closed_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_without_mirror_fails_within_seconds_naming_the_fix(base_dir, tmp_path):
    # every HTTPS request goes through a proxy on a closed local port: no network, deterministically
    proxy = f"http://127.0.0.1:{closed_port()}"
    t0 = time.time()
    result = run_speedrun(tmp_path, 60, PRESET="micro", https_proxy=proxy, HTTPS_PROXY=proxy, no_proxy="", NO_PROXY="")
    assert result.returncode == 1
    assert time.time() - t0 < 30
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and "NANOCHAT_MIRROR=" in errors[0] and "download" in errors[0], result.stderr
    assert "preset micro" in result.stdout  # the preset is printed before anything else happens
    assert not list((base_dir / "speedrun").glob("*.done"))
    # no stage ran, so the folder is not tied to micro: another preset is not refused (it too fails offline)
    assert not (base_dir / "speedrun" / "config").exists() and not (base_dir / "speedrun" / "started").exists()
    result = run_speedrun(tmp_path, 60, PRESET="cpu", https_proxy=proxy, HTTPS_PROXY=proxy, no_proxy="", NO_PROXY="")
    assert result.returncode == 1 and "preset cpu" in result.stdout
    assert "holds a run" not in result.stderr and "NANOCHAT_MIRROR=" in result.stderr, result.stderr


def test_failing_stage_stops_the_run_with_its_name_and_log(base_dir, tmp_path):
    empty_mirror = tmp_path / "empty_mirror"
    empty_mirror.mkdir()
    result = run_speedrun(tmp_path, 120, PRESET="micro", NANOCHAT_MIRROR=str(empty_mirror))
    assert result.returncode == 1
    log = base_dir / "speedrun" / "tokenizer.log"
    assert f"stage 'tokenizer' failed; log: {log}" in result.stderr
    assert "0 shards" in log.read_text()  # the stage's own error is in its log
    assert not (base_dir / "speedrun" / "tokenizer.done").exists()
    assert not (base_dir / "speedrun" / "pretrain.log").exists()  # nothing after the failure ran
    # stamps of one preset never count for another: a different preset on the same base dir is refused
    result = run_speedrun(tmp_path, 60, PRESET="cpu", NANOCHAT_MIRROR=str(empty_mirror))
    assert result.returncode == 1 and "micro depth=2" in result.stderr and "remove" in result.stderr


def sse_events(response):
    events = []
    for line in response.read().decode("utf-8").splitlines():
        if line.startswith("data: "):
            events.append(json.loads(line[6:]))
    return events


def serve_and_ask(env):
    """Start serve.py on a free port, wait for it to print its address, stream one answer (reference protocol)."""
    import http.client
    serve = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--stage", "rl", "--port", "0", "--device-type", "cpu"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        output, port, deadline = [], None, time.time() + 120
        while port is None and time.time() < deadline and serve.poll() is None:
            output.append(serve.stderr.readline())
            m = re.search(r"http://127\.0\.0\.1:(\d+)/", output[-1])
            port = m and int(m.group(1))
        assert port, "serve.py did not start: " + "".join(output)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        body = {"messages": [{"role": "user", "content": "Why is the sky blue?"}], "temperature": 1.0, "max_tokens": 8}
        conn.request("POST", "/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
        return sse_events(response)
    finally:
        serve.terminate()
        serve.wait(timeout=30)


@pytest.mark.e2e
def test_speedrun_micro_end_to_end(http_mirror, base_dir, tmp_path):
    t0 = time.time()
    result = run_speedrun(tmp_path, 900, PRESET="micro", NANOCHAT_MIRROR=http_mirror)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    print(f"speedrun micro: {time.time() - t0:.0f}s")
    # every artifact
    assert (base_dir / "tokenizer" / "tokenizer.json").exists() and (base_dir / "tokenizer" / "token_bytes.pt").exists()
    for family in ("base_checkpoints", "chatsft_checkpoints", "chatrl_checkpoints"):
        assert list((base_dir / family / "d2").glob("model_*.pt")), family
        assert (base_dir / family / "d2" / "metrics.jsonl").exists(), family
    assert sorted(p.stem for p in (base_dir / "speedrun").glob("*.done")) == sorted(STAGES)
    report = (tmp_path / "report.md").read_text()
    assert report == (base_dir / "report" / "report.md").read_text()
    for title in ("Tokenizer training", "Base model training", "Base model evaluation", "Chat SFT",
                  "Chat evaluation sft", "Chat RL", "Chat evaluation rl"):
        assert f"\n## {title}\n" in report, title
    table = dict((line.split("|")[1].strip(), [c.strip() for c in line.split("|")[2:5]])
                 for line in report.splitlines() if line.startswith("| ") and line.count("|") == 5)
    for metric, column in (("val bpb", 0), ("CORE", 0), ("val bpb", 1), ("ChatCORE", 1), ("ChatCORE", 2),
                           ("GSM8K", 2), ("pass@1", 2)):
        assert re.fullmatch(r"-?\d+\.\d+", table[metric][column]), (metric, column, table[metric])
    svg = ET.parse(tmp_path / "report_curves.svg").getroot()
    titles = [t.text for t in svg.iter("{http://www.w3.org/2000/svg}text") if t.get("font-weight") == "bold"]
    assert {"base d2: train loss", "base d2: val bpb", "sft d2: train loss", "rl d2: reward"} <= set(titles), titles
    assert "None" not in report and "centered = (accuracy - random baseline)" in report
    # the demo ends with the RL model's answer to one question, in the output and in the report card
    reply = (base_dir / "speedrun" / "reply.txt").read_text().strip()
    assert 'asked "How many r are in strawberry?", the RL model replied:' in result.stdout and reply in result.stdout
    assert "\n## Demo question\n" in report and f"- reply: {reply}" in report
    assert "- passes over the data: " in report and "- task: spellingbee" in report  # micro: 1 shard, read twice
    assert result.stdout.rstrip().splitlines()[-2:] == [
        f"chat in the terminal:  python {ROOT}/chat.py", f"chat in the browser:   python {ROOT}/serve.py   (then open the address it prints)"]

    # re-running resumes: finished stages are skipped, an un-stamped one runs again
    (base_dir / "speedrun" / "rl_eval.done").unlink()
    result = run_speedrun(tmp_path, 300, PRESET="micro", NANOCHAT_MIRROR=http_mirror)
    assert result.returncode == 0, result.stderr[-4000:]
    skipped = re.findall(r"\] (\w+): done earlier, skipping", result.stdout)
    assert skipped == [s for s in STAGES if s != "rl_eval"]

    # chat with the result: serve.py streams an answer, chat.py answers one prompt
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "PYTHONIOENCODING": "utf-8"}
    events = serve_and_ask(env)
    assert events[-1] == {"done": True} and any("token" in e for e in events[:-1]), events
    chat = subprocess.run([sys.executable, str(ROOT / "chat.py"), "--stage", "rl", "-p", "Hello!", "--max-tokens", "8",
                           "--device-type", "cpu"], env=env, capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0 and chat.stdout.endswith("\n"), chat.stderr


@pytest.mark.parametrize("preset", ["gpu8", "cpu", "micro"])
def test_preset_flags_parse_in_every_stage(preset):
    """Every stage accepts its preset's flags (a renamed flag or a value it no longer takes would only fail
    minutes or hours into a run), and the demo presets use every token once, the short SpellingBee mixture
    and RL on SpellingBee."""
    import evaluate
    import pretrain
    import rl
    import sft
    script = (ROOT / "speedrun.sh").read_text()
    block = script[script.index('case "$PRESET" in'):script.index("esac") + 4]
    names = ["PRETRAIN", "BASE_EVAL", "SFT", "RL", "CHAT_EVAL"]
    shell = f'PRESET={preset}; NGPU=0; PY={sys.executable}\n{block}\nprintf "%s|" ' + " ".join(f'"${n}"' for n in names)
    out = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, check=True).stdout
    flags = dict(zip(names, (value.split() for value in out.split("|"))))  # a value spans lines
    for parse, name in ((sft.parse_args, "SFT"), (rl.parse_args, "RL")):
        parse(flags[name])  # gpu8's are empty: the stages' defaults
    evaluate.parse_args(["--stage", "base", *flags["BASE_EVAL"]])
    evaluate.parse_args(["--stage", "sft", *flags["CHAT_EVAL"]])
    args = pretrain.parse_args(flags["PRETRAIN"])
    if preset == "gpu8":
        assert args.target_param_data_ratio == 8 and not args.keep_rest  # the reference's recipe
        return
    assert args.keep_rest
    args = sft.parse_args(flags["SFT"])
    assert args.spelling_bee_short_frac > 0 and args.spelling_bee_size > 0 and args.simple_spelling_size == 0
    assert rl.parse_args(flags["RL"]).task == "spellingbee"
