"""speedrun.sh and the report card (common.py section 8).

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

import common

ROOT = pathlib.Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# report card
# ---------------------------------------------------------------------------------------------

def write_metrics(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_sections_summary_and_curves(base_dir, tmp_path):
    common.report_section("Chat evaluation sft", [{"ARC-Easy": 0.31, "ChatCORE": 0.05}, "| a | b |\n|---|---|"],
                          column="SFT")
    common.report_section("Base model training", {"depth": 4, "val bpb": 1.234567, "tokens": 12_345_678},
                          column="BASE")
    common.report_section("Base model evaluation", {"CORE": 0.1111}, column="BASE")
    common.report_section("Chat evaluation rl", {"ChatCORE": 0.07, "GSM8K": 0.02}, column="RL")
    # a re-run appended to pretraining's metrics: only the latest run (steps restart at 0) is drawn
    write_metrics(base_dir / "base_checkpoints" / "d4" / "metrics.jsonl",
                  [{"step": s, "loss": 9.0 - s} for s in range(5)]
                  + [{"step": s, "loss": 8.0 - s / 2} for s in range(10)] + [{"step": 9, "val_bpb": 2.5}])
    write_metrics(base_dir / "chatsft_checkpoints" / "d4" / "metrics.jsonl",
                  [{"step": 0, "loss": 3.0, "val_bpb": float("nan")}, {"step": 1, "loss": 2.0}])
    (base_dir / "chatsft_checkpoints" / "d4" / "metrics.jsonl").open("a").write('{"step": 2, "lo')  # torn line
    (base_dir / "speedrun").mkdir()
    for stage, seconds in [("tokenizer", 60), ("pretrain", 540)]:
        (base_dir / "speedrun" / f"{stage}.done").write_text(f"{seconds}\n")
        time.sleep(0.01)  # stamps are ordered by mtime

    path = common.generate_report(copy_to=str(tmp_path))
    report = pathlib.Path(path).read_text()
    assert pathlib.Path(path) == base_dir / "report" / "report.md"
    assert (tmp_path / "report.md").read_text() == report and (tmp_path / "report_curves.svg").exists()
    assert "total wall time: 10.0 min (600 s over 2 stages)" in report
    assert "estimated cost: $0.00" in report and f"{os.cpu_count()} cores" in report
    assert re.search(r"git commit: [0-9a-f]{7}", report)
    # summary: each figure in its column, '-' where a stage did not report it, rows in SUMMARY_METRICS order
    table = dict((line.split("|")[1].strip(), [c.strip() for c in line.split("|")[2:5]])
                 for line in report.splitlines() if line.startswith("| ") and line.count("|") == 5)
    assert table["val bpb"] == ["1.2346", "-", "-"]
    assert table["CORE"] == ["0.1111", "-", "-"]
    assert table["ChatCORE"] == ["-", "0.0500", "0.0700"]
    assert table["GSM8K"] == ["-", "-", "0.0200"]
    assert "depth" not in table  # only headline figures go in the summary
    assert list(table).index("val bpb") < list(table).index("CORE") < list(table).index("ARC-Easy")
    assert "- tokens: 12,345,678" in report and "| a | b |" in report
    # sections in pipeline order, not in the order they were written
    order = [report.index(f"## {t}") for t in ("Base model training", "Base model evaluation",
                                               "Chat evaluation sft", "Chat evaluation rl")]
    assert order == sorted(order)
    assert "![train loss and val bpb per stage](report_curves.svg)" in report

    svg = ET.parse(tmp_path / "report_curves.svg").getroot()
    ns = "{http://www.w3.org/2000/svg}"
    titles = [t.text for t in svg.iter(ns + "text") if t.get("font-weight") == "bold"]
    assert titles == ["base_checkpoints/d4: loss", "base_checkpoints/d4: val_bpb", "chatsft_checkpoints/d4: loss"]
    lines = [p.get("points").split() for p in svg.iter(ns + "polyline")]
    assert [len(points) for points in lines] == [10, 1, 2]
    # the first loss point (8.0, the maximum) sits at the top of its panel, the last (3.5) at the bottom
    first_y, last_y = float(lines[0][0].split(",")[1]), float(lines[0][-1].split(",")[1])
    assert first_y < last_y


def test_report_section_only_on_rank_zero(base_dir, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert common.report_section("Chat RL", {"x": 1}) is None
    common.log_metrics(str(base_dir / "metrics.jsonl"), step=0, loss=1.0)
    assert not (base_dir / "report" / "chat-rl.md").exists() and not (base_dir / "metrics.jsonl").exists()
    monkeypatch.setenv("RANK", "0")
    common.log_metrics(str(base_dir / "metrics.jsonl"), step=0, loss=1.0)
    assert common.read_metrics(str(base_dir / "metrics.jsonl")) == [{"step": 0, "loss": 1.0}]
    path = common.report_section("Chat RL", {"x": 1})
    assert path.endswith("chat-rl.md") and not [p for p in os.listdir(base_dir / "report") if ".tmp" in p]


def test_report_without_anything_still_renders(base_dir):
    report = pathlib.Path(common.generate_report(copy_to=None)).read_text()
    assert "total wall time: 0.0 min" in report and "| metric | BASE | SFT | RL |" in report
    ET.parse(base_dir / "report" / "report_curves.svg")
