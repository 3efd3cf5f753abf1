"""The report card (common.py: format_value, round_ticks, curves_svg, report_section, generate_report): sections
in pipeline order, the BASE/SFT/RL summary, round axis ticks with labelled units, one step convention, no Python
`None`, figures rounded to what matters, and CORE's per-task scores said to be centered.
"""
import json
import math
import os
import pathlib
import re
import time
import xml.etree.ElementTree as ET

import pytest

import common

SVG = "{http://www.w3.org/2000/svg}"


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
    assert "| tokenizer | 1m00s |\n| pretrain | 9m00s |" in report  # per stage, in the order they ran
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
    assert titles == ["base d4: train loss", "base d4: val bpb", "sft d4: train loss"]
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


def panels(svg_path):
    """[(title, y-axis label, y tick values, x tick values)] of each panel of report_curves.svg."""
    texts = list(ET.parse(svg_path).getroot().iter(SVG + "text"))
    found, current = [], None
    for t in texts:
        if t.get("font-weight") == "bold":
            current = {"title": t.text, "ylabel": None, "y": [], "x": []}
            found.append(current)
        elif current and t.get("class") == "ytick":
            current["y"].append(float(t.text))
        elif current and t.get("class") == "xtick":
            current["x"].append(float(t.text))
        elif current and t.get("class") == "ylabel":
            current["ylabel"] = t.text
    return found


def is_round_step(values):
    """Evenly spaced by 1, 2 or 5 x 10^k, and every value a multiple of that step."""
    steps = {round(b - a, 12) for a, b in zip(values, values[1:])}
    if len(steps) != 1:
        return False
    step = steps.pop()
    mantissa = step / 10 ** math.floor(math.log10(step))
    return any(abs(mantissa - m) < 1e-9 for m in (1, 2, 5)) and all(abs(v / step - round(v / step)) < 1e-6
                                                                       for v in values)


@pytest.mark.parametrize("lo, hi", [(3.37, 5.84), (674, 899), (0, 899), (0.0012, 0.0042), (-0.31, 0.27),
                                    (2.5, 2.5), (1e5, 3.3e5)])
def test_ticks_are_round_and_cover_the_data(lo, hi):
    ticks, decimals = common.round_ticks(lo, hi)
    assert ticks[0] <= lo and ticks[-1] >= hi and 3 <= len(ticks) <= 11, ticks
    assert is_round_step(ticks), ticks
    assert all(float(f"{t:.{decimals}f}") == t for t in ticks)  # the labels show each tick exactly
    xticks, _ = common.round_ticks(lo, hi, integer=True)
    assert all(float(t).is_integer() for t in xticks) and is_round_step(xticks)


def test_chart_has_round_ticks_units_and_one_step_convention(base_dir, tmp_path):
    # pretraining: a loss per update, val bpb every 300 steps and after the last update (step 900)
    rows = [{"step": s, "loss": 5.84 - 2.47 * s / 899, **({"val_bpb": 1.9 - s / 1000} if s % 300 == 0 else {})}
            for s in range(900)] + [{"step": 900, "val_bpb": 1.0}]
    write_metrics(base_dir / "base_checkpoints" / "d4" / "metrics.jsonl", rows)
    write_metrics(base_dir / "chatrl_checkpoints" / "d4" / "metrics.jsonl",
                  [{"step": s, "reward": 0.1 * s, "loss": 0.5} for s in range(10)] + [{"step": 10, "pass@1": 0.2}])
    common.generate_report(copy_to=str(tmp_path))
    found = {p["title"]: p for p in panels(tmp_path / "report_curves.svg")}
    assert found["base d4: train loss"]["ylabel"] == "nats per token"
    assert found["base d4: val bpb"]["ylabel"] == "bits per byte"
    assert found["rl d4: reward"]["ylabel"] == "mean over samples"
    for panel in found.values():
        assert is_round_step(panel["y"]) and is_round_step(panel["x"]), panel
    loss = found["base d4: train loss"]
    assert loss["y"][0] <= 3.37 and loss["y"][-1] >= 5.84 and loss["x"][0] == 0 and loss["x"][-1] >= 899
    # RL steps start at 0 like every other stage: the reward at s is that of the update from s to s+1
    assert found["rl d4: reward"]["x"][0] == 0
    svg_text = (tmp_path / "report_curves.svg").read_text()
    report = (tmp_path / "report.md").read_text()
    assert common.STEP_CONVENTION in svg_text and common.STEP_CONVENTION in report


def test_report_shows_no_none_and_rounds_figures(base_dir):
    common.report_section("Base model training", {"val bpb": 0.812345678, "training time (s)": 3035.5389,
                                                  "tokens/s (last step)": None, "MFU %": 12.3456,
                                                  "tokens": 12_345_678, "lr": 2.5e-5, "steps": 900}, column="BASE")
    common.report_section("Chat RL", {"pass@1": None, "reward": 0.0}, column="RL")
    report = pathlib.Path(common.generate_report(copy_to=None)).read_text()
    assert "None" not in report
    assert "- training time (s): 3,036\n" in report and "- tokens/s (last step): -\n" in report
    assert "- val bpb: 0.8123\n" in report and "- MFU %: 12.3456\n" in report and "- lr: 2.50e-05\n" in report
    assert "- tokens: 12,345,678\n" in report and "- steps: 900\n" in report and "- reward: 0.0000\n" in report
    assert "| val bpb | 0.8123 | - | - |" in report


def test_core_per_task_scores_are_said_to_be_centered():
    import evaluate
    core = {"results": {"hellaswag": 0.30, "arc_easy": 0.50},
            "centered_results": {"hellaswag": 0.0667, "arc_easy": 0.3333},
            "core_metric": 0.2, "missing": [], "partial": False}
    table = evaluate.core_table(core)
    assert "centered = (accuracy - random baseline) / (1 - random baseline)" in table
    assert "| task | accuracy | centered |" in table and "| arc_easy | 0.5000 | +0.3333 |" in table
