"""CORE (common.py, used by evaluate.py and pretrain.py): core.yaml parsing, prompts, continuation spans, scoring on hand-made
items with a model whose predictions are known, centering, partial bundles, the bundle download."""
import csv
import json
import zipfile

import pytest
import torch
import torch.nn as nn

import common
from common import Tokenizer
from conftest import serve_directory


@pytest.fixture(scope="module")
def byte_tokenizer():
    return Tokenizer.train(iter(["abc"]), 256 + 9)  # byte tokens only: "abc" -> [97, 98, 99]


class NextByteModel(nn.Module):
    """Predicts token t+1 after token t with high confidence: "abcd" is certain, "zzz" is not."""

    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size, self.rotary_len = vocab_size, 10_000

    def get_device(self):
        return torch.device("cpu")

    def forward(self, idx):
        return 10.0 * nn.functional.one_hot((idx + 1) % self.vocab_size, self.vocab_size).float()


def test_parse_core_yaml():
    text = 'icl_tasks:\n-\n  label: jeopardy\n  dataset_uri: world_knowledge/jeopardy_all.jsonl\n' \
           '  num_fewshot: [10]\n  icl_task_type: language_modeling\n  continuation_delimiter: "\\nAnswer: "\n' \
           '  has_categories: true\n-\n  label: copa\n  num_fewshot: [0]\n  icl_task_type: multiple_choice\n'
    tasks = common.parse_core_yaml(text)
    assert tasks == [
        {"label": "jeopardy", "dataset_uri": "world_knowledge/jeopardy_all.jsonl", "num_fewshot": [10],
         "icl_task_type": "language_modeling", "continuation_delimiter": "\nAnswer: ", "has_categories": True},
        {"label": "copa", "num_fewshot": [0], "icl_task_type": "multiple_choice"}]


def test_parse_real_core_yaml(shared_data):
    tasks = common.parse_core_yaml((shared_data / "eval_bundle" / "core.yaml").read_text())
    assert len(tasks) == 22
    by_label = {t["label"]: t for t in tasks}
    assert by_label["arc_easy"]["continuation_delimiter"] == "\nAnswer: "
    assert by_label["winograd"]["icl_task_type"] == "schema" and by_label["agi_eval_lsat_ar"]["num_fewshot"] == [3]


def test_prompts():
    shot = {"query": "Q1", "choices": ["x", "y"], "gold": 1}
    assert common.render_core_mc({"query": "Q2", "choices": ["a", "b"]}, " A: ", [shot]) == \
        ["Q1 A: y\n\nQ2 A: a", "Q1 A: y\n\nQ2 A: b"]
    shot = {"context_options": ["c1", "c2"], "continuation": "k", "gold": 0}
    assert common.render_core_schema({"context_options": ["o1", "o2"], "continuation": "end"}, " ", [shot]) == \
        ["c1 k\n\no1 end", "c1 k\n\no2 end"]
    shot = {"context": "  ctx1 ", "continuation": "ans1"}
    assert common.render_core_lm({"context": "ctx2 ", "continuation": "ans2"}, "\nAnswer: ", [shot]) == \
        ["ctx1\nAnswer: ans1\n\nctx2\nAnswer:", "ctx1\nAnswer: ans1\n\nctx2\nAnswer: ans2"]


def test_continuation_spans():
    assert common.continuation_spans("multiple_choice", [[1, 2, 3, 4], [1, 2, 5], [1, 2, 3, 6, 7]]) == \
        [(2, 4), (2, 3), (2, 5)]
    assert common.continuation_spans("schema", [[1, 2, 8, 9], [3, 8, 9]]) == [(2, 4), (1, 3)]
    assert common.continuation_spans("language_modeling", [[1, 2], [1, 2, 3, 4]]) == [(2, 4)]
    with pytest.raises(ValueError):
        common.continuation_spans("language_modeling", [[1, 5], [1, 2, 3]])


@pytest.mark.parametrize("task_type,items,expected", [
    # the option continuing the byte sequence ("cde" after "ab") has the lower mean loss
    ("multiple_choice", [{"query": "ab", "choices": ["cde", "zzz"], "gold": 0},
                         {"query": "ab", "choices": ["zzz", "cde"], "gold": 1},
                         {"query": "ab", "choices": ["cde", "zzz"], "gold": 1}], 2 / 3),
    ("schema", [{"context_options": ["xab", "xzz"], "continuation": "cde", "gold": 0},
                {"context_options": ["xzz", "xab"], "continuation": "cde", "gold": 0}], 1 / 2),
    # LM: correct only when greedy decoding reproduces the continuation exactly
    ("language_modeling", [{"context": "abc", "continuation": "def"}, {"context": "abc", "continuation": "dxf"},
                           {"context": "pqr", "continuation": "stu"}, {"context": "pqr", "continuation": "s"}], 3 / 4),
])
def test_scoring_hand_made_items(byte_tokenizer, task_type, items, expected):
    model = NextByteModel(byte_tokenizer.get_vocab_size())
    task = {"icl_task_type": task_type, "num_fewshot": [0], "continuation_delimiter": ""}
    assert common.evaluate_core_task(model, byte_tokenizer, items, task) == pytest.approx(expected)


def make_bundle(root, items):
    (root / "eval_data" / "mc").mkdir(parents=True)
    (root / "core.yaml").write_text("icl_tasks:\n-\n  label: good\n  dataset_uri: mc/good.jsonl\n  num_fewshot: [1]\n"
                                    "  icl_task_type: multiple_choice\n  continuation_delimiter: \"\"\n-\n"
                                    "  label: gone\n  dataset_uri: mc/gone.jsonl\n  num_fewshot: [0]\n"
                                    "  icl_task_type: multiple_choice\n")
    (root / "eval_meta_data.csv").write_text("Eval Task,Random baseline\ngood,50\ngone,25\n")
    (root / "eval_data" / "mc" / "good.jsonl").write_text("\n".join(json.dumps(i) for i in items) + "\n")


def test_core_centered_and_partial(tmp_path, byte_tokenizer):
    # 3 of 4 right against a 50% baseline: centered (0.75 - 0.5) / 0.5 = 0.5; the missing task is named
    right = {"query": "ab", "choices": ["cde", "zzz"], "gold": 0}
    items = [right, right, right, {**right, "gold": 1}]
    make_bundle(tmp_path, items)
    core = common.evaluate_core(NextByteModel(byte_tokenizer.get_vocab_size()), byte_tokenizer, bundle=str(tmp_path))
    assert core["results"] == {"good": pytest.approx(0.75)}
    assert core["core_metric"] == pytest.approx(0.5)
    assert core["partial"] and core["missing"] == ["gone"]
    common.write_core_csv(tmp_path / "out.csv", core)
    rows = list(csv.reader(open(tmp_path / "out.csv")))
    assert rows[0] == ["Task", "Accuracy", "Centered"] and rows[2][0] == "CORE" and "gone" in rows[3][0]


def test_bundle_from_mirror_and_real_sample(base_dir, http_mirror, monkeypatch, byte_tokenizer):
    """Under NANOCHAT_MIRROR the unpacked files are fetched; the sample lacks squad and coqa -> partial CORE."""
    monkeypatch.setenv("NANOCHAT_MIRROR", http_mirror)
    bundle = common.ensure_eval_bundle()
    assert (base_dir / "eval_bundle" / "core.yaml").exists()
    assert not list((base_dir / "eval_bundle").rglob("*.lock")) and len(list(base_dir.iterdir())) == 1
    core = common.evaluate_core(NextByteModel(byte_tokenizer.get_vocab_size()), byte_tokenizer, max_per_task=3,
                                  bundle=bundle)
    assert sorted(core["missing"]) == ["coqa", "squad"] and len(core["results"]) == 20
    assert all(0.0 <= acc <= 1.0 for acc in core["results"].values())


def test_bundle_zip_download(base_dir, shared_data, tmp_path, monkeypatch):
    """Without a mirror the zip is downloaded (here from a local server) and unpacked in place."""
    staging = tmp_path / "site"
    staging.mkdir()
    with zipfile.ZipFile(staging / "eval_bundle.zip", "w") as z:
        for path in (shared_data / "eval_bundle").rglob("*"):
            if path.is_file():
                z.write(path, "eval_bundle/" + str(path.relative_to(shared_data / "eval_bundle")))
    server, url = serve_directory(staging)
    try:
        monkeypatch.setattr(common, "EVAL_BUNDLE_URL", url + "/eval_bundle.zip")
        bundle = common.ensure_eval_bundle()
    finally:
        server.shutdown()
    assert (base_dir / "eval_bundle" / "eval_data" / "world_knowledge" / "arc_easy.jsonl").exists()
    assert [p.name for p in base_dir.iterdir()] == ["eval_bundle"]  # no temp files left behind
