"""Chat tasks (common.py section 6): conversation format and rendering masks of every task, graders on
right and wrong answers, slicing and mixtures, and task-data download from the real-source URLs, an
HTTP mirror and a local mirror directory.

Most tests build a tiny mirror directory of their own (parquet files in the Hugging Face schemas);
the ones marked by the `shared_data` / `http_mirror` fixtures use the real samples and skip without them.
"""
import http.server
import json
import os
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import common
from common import (ARC, GSM8K, MMLU, CustomJSON, HumanEval, MissingSplitError, SimpleSpelling, SmolTalk,
                    SpellingBee, TaskMixture, Tokenizer)

GSM8K_SOLUTION = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                  "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")
HUMANEVAL_PROBLEMS = [
    {"task_id": "Tiny/0", "entry_point": "total",
     "prompt": 'from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    """Sum of xs.\n    >>> total([1, 2])\n    3\n    """\n',
     "canonical_solution": "    return sum(xs)\n",
     "test": "def check(candidate):\n    assert candidate([1, 2]) == 3\n    assert candidate([]) == 0\n"},
    {"task_id": "Tiny/1", "entry_point": "shout",
     "prompt": 'def shout(s: str) -> str:\n    """Upper case and an exclamation mark."""\n',
     "canonical_solution": "    return s.upper() + '!'\n",
     "test": "def check(candidate):\n    assert candidate('hi') == 'HI!'\n"},
]
WORDS = ["strawberry", "banana", "apple", "kiwi", "mississippi", "rhythm", "letter", "cat", "dog", "zebra"]


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.fixture
def tiny_mirror(tmp_path, base_dir, monkeypatch):
    """A mirror directory laid out like shared/data with a few rows per source; NANOCHAT_MIRROR points at it."""
    m = tmp_path / "mirror"
    write_parquet(m / "mmlu/all/test-00000-of-00001.parquet", [
        {"question": f"Question {i}?", "subject": "astronomy", "choices": [f"c{i}{j}" for j in range(4)], "answer": i % 4}
        for i in range(6)])
    write_parquet(m / "arc/ARC-Easy/test-00000-of-00001.parquet", [
        {"id": "q1", "question": "Capital of France?", "choices": {"text": ["Rome", "Paris", "Oslo"], "label": ["A", "B", "C"]},
         "answerKey": "B"},
        {"id": "q2", "question": "2+2?", "choices": {"text": ["3", "4", "5", "6"], "label": ["1", "2", "3", "4"]},
         "answerKey": "2"}])
    write_parquet(m / "gsm8k/main/train-00000-of-00001.parquet", [
        {"question": "How many clips did Natalia sell?", "answer": GSM8K_SOLUTION},
        {"question": "What is 1000 + 234?", "answer": "It is 1000+234 = <<1000+234=1234>>1,234.\n#### 1,234"}])
    write_parquet(m / "humaneval/openai_humaneval/test-00000-of-00001.parquet", HUMANEVAL_PROBLEMS)
    write_parquet(m / "smoltalk/data/train-00000-of-00001.parquet", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}], "source": "x"},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "why?"},
                      {"role": "assistant", "content": "because"}, {"role": "user", "content": "ok"},
                      {"role": "assistant", "content": "bye"}], "source": "x"}])
    (m / "words").mkdir()
    (m / "words/words_alpha.txt").write_bytes("\r\n".join(WORDS).encode() + b"\r\n")  # CRLF like upstream
    (m / "identity").mkdir()
    (m / "identity/identity_conversations.jsonl").write_text(
        json.dumps([{"role": "user", "content": "who are you?"}, {"role": "assistant", "content": "nanochat"}]) + "\n")
    monkeypatch.setenv("NANOCHAT_MIRROR", str(m))
    return m


@pytest.fixture(scope="module")
def tok():
    # byte-level BPE with no merges: every byte is one token, so token positions follow the text
    return Tokenizer.from_ranks({bytes([i]): i for i in range(256)}, common.SPLIT_PATTERN)


def supervised_text(tok, conversation):
    """Decode the tokens with mask 1, and separately those with mask 0 after the first assistant_start."""
    ids, mask = tok.render_conversation(conversation)
    assert len(ids) == len(mask) and mask[0] == 0 and ids[0] == tok.get_bos_token_id()
    return tok.decode([t for t, m in zip(ids, mask) if m]), ids, mask


# ---- rendering of every task type ----

def test_multiple_choice_letters_and_masks(tiny_mirror, tok):
    arc, mmlu = ARC("ARC-Easy", "test"), MMLU("all", "test")
    assert arc.eval_type == mmlu.eval_type == "categorical" and len(arc) == 2 and len(mmlu) == 6
    for task in (arc, mmlu):
        for conversation in task:
            user, answer = conversation["messages"][0]["content"], conversation["messages"][1]["content"]
            assert answer in conversation["letters"]
            # each choice is followed directly by its letter: "=X" with no space, so the letter's token in the
            # prompt is the same token as the bare answer the model emits
            for letter in conversation["letters"]:
                assert f"={letter}\n" in user and f"= {letter}" not in user
            assert user.startswith("Multiple Choice question: ")
            assert user.endswith("\n\nRespond only with the letter of the correct answer.")
            learned, _, _ = supervised_text(tok, conversation)
            assert learned == answer + "<|assistant_end|>"  # only the letter (and the end) is learned
    by_question = {c["messages"][0]["content"].split("\n")[0]: c for c in arc}
    numeric = by_question["Multiple Choice question: 2+2?"]
    assert numeric["letters"] == ["1", "2", "3", "4"] and "- 4=2\n" in numeric["messages"][0]["content"]
    assert all(c["subject"] == "astronomy" for c in mmlu)
    letters = {c["messages"][0]["content"].split("\n")[0]: c["messages"][1]["content"] for c in mmlu}
    assert letters["Multiple Choice question: Question 5?"] == "B"  # answer index 1 -> B


def test_gsm8k_tool_call_parts_and_masks(tiny_mirror, tok):
    task = GSM8K("main", "train")
    conversation = next(c for c in task if "Natalia" in c["messages"][0]["content"])
    parts = conversation["messages"][1]["content"]
    assert [p["type"] for p in parts] == ["text", "python", "python_output", "text", "python", "python_output", "text"]
    assert parts[1]["text"] == "48/2" and parts[2]["text"] == "24" and parts[-1]["text"].endswith("#### 72")
    # the parts put back together give the original solution
    rebuilt = "".join(f"<<{p['text']}=" if p["type"] == "python" else p["text"] + (">>" if p["type"] == "python_output" else "")
                      for p in parts)
    assert rebuilt == GSM8K_SOLUTION
    learned, ids, mask = supervised_text(tok, conversation)
    assert "<|python_start|>48/2<|python_end|>" in learned  # the call is learned ...
    assert "<|output_start|>" not in learned and "24<|output_end|>" not in learned  # ... its result is not
    text = tok.decode(ids)
    assert "<|output_start|>24<|output_end|>" in text
    out_start = ids.index(tok.encode_special("<|output_start|>"))
    assert mask[out_start:out_start + 4] == [0, 0, 0, 0]
    user_end = ids.index(tok.encode_special("<|user_end|>"))
    assert not any(mask[:user_end + 2])  # everything up to and including <|assistant_start|> is context


def test_gsm8k_grading(tiny_mirror):
    task = GSM8K("main", "train")
    conversation = next(c for c in task if "1000" in c["messages"][0]["content"])  # reference "#### 1,234"
    assert task.evaluate(conversation, "The answer is\n#### 1234")
    assert task.evaluate(conversation, "#### 1,234")
    assert not task.evaluate(conversation, "#### 1235")
    assert not task.evaluate(conversation, "1234")  # no '#### ' marker: not an answer
    assert task.reward(conversation, "#### 1234") == 1.0 and task.reward(conversation, "#### -1234") == 0.0
    assert common.extract_answer("x #### -3.5 y") == "-3.5"


def test_humaneval_conversation_and_grading(tiny_mirror, tok):
    task = HumanEval()
    assert len(task) == 2 and task.eval_type == "generative"
    conversation = next(c for c in task if c["entry_point"] == "total")
    assert conversation["messages"][0]["content"] == HUMANEVAL_PROBLEMS[0]["prompt"]
    solution = conversation["messages"][1]["content"]
    assert solution.startswith(HUMANEVAL_PROBLEMS[0]["prompt"]) and solution.endswith("return sum(xs)\n")
    learned, _, _ = supervised_text(tok, conversation)
    assert learned == solution + "<|assistant_end|>"
    assert task.evaluate(conversation, solution)
    # fenced code without the prompt's import: the grader restores `from typing import List`
    assert task.evaluate(conversation, "Here:\n```python\ndef total(xs: List[int]) -> int:\n    return sum(xs)\n```\nDone.")
    assert not task.evaluate(conversation, "```python\ndef total(xs):\n    return 0\n```")  # wrong answer
    assert not task.evaluate(conversation, "def total(xs):\n    return sum(xs\n")  # syntax error
    assert not task.evaluate(conversation, "import sys\nsys.exit(0)\ndef total(xs):\n    return 0\n")  # exits before tests


def test_smoltalk_and_custom_json(tiny_mirror, tok, tmp_path):
    task = SmolTalk("train")
    assert len(task) == 2
    long = next(c for c in task if len(c["messages"]) == 5)
    assert long["messages"][0] == {"role": "system", "content": "be brief"}
    learned, ids, _ = supervised_text(tok, long)
    assert learned == "because<|assistant_end|>bye<|assistant_end|>"
    assert "be brief\n\nwhy?" in tok.decode(ids)  # the system prompt is folded into the first user turn
    identity = CustomJSON()  # the default identity file, from the mirror
    assert identity[0]["messages"][1]["content"] == "nanochat"
    path = tmp_path / "convs.jsonl"
    good = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({"messages": good * 2}) + "\n")
    assert [len(c["messages"]) for c in CustomJSON(str(path))] == [2, 4]
    path.write_text(json.dumps(good) + "\n" + json.dumps(good[:1] + good[:1]) + "\n")
    with pytest.raises(common.NanochatError, match=r"convs.jsonl:2: message 1 must be a assistant"):
        CustomJSON(str(path))
    with pytest.raises(common.NanochatError, match="not found"):
        CustomJSON(str(tmp_path / "missing.jsonl"))


def test_spelling_bee_parts_grading_and_determinism(tiny_mirror, tok):
    bee = SpellingBee(size=50, split="train")
    assert len(bee) == 50 and bee[7] == SpellingBee(size=50, split="train", start=7)[0]  # per-index RNG
    assert [bee[i] for i in range(5)] != [SpellingBee(size=5, split="test")[i] for i in range(5)]
    for conversation in bee:
        parts = conversation["messages"][1]["content"]
        assert [p["type"] for p in parts] == ["text", "python", "python_output", "text"]
        word, letter = eval(parts[1]["text"].replace(".count(", ",("))  # "'word'.count('l')" -> (word, letter)
        assert word in WORDS and len(letter) == 1
        assert parts[2]["text"] == str(word.count(letter)) == str(common.use_calculator(parts[1]["text"]))
        assert word in conversation["messages"][0]["content"]
        assert f"{word}:{','.join(word)}" in parts[0]["text"]
        assert bee.evaluate(conversation, f"so... #### {word.count(letter)}")
        assert not bee.evaluate(conversation, f"#### {word.count(letter) + 1}")
        assert bee.reward(conversation, f"#### {word.count(letter)}") == 1.0
    learned, _, mask = supervised_text(tok, bee[0])
    assert "<|python_start|>" in learned and "<|output_start|>" not in learned and sum(mask) > 0


def test_simple_spelling(tiny_mirror):
    train, test = SimpleSpelling(size=4, split="train"), SimpleSpelling(size=4, split="test")
    words = [c["messages"][0]["content"].removeprefix("Spell the word: ") for c in train]
    assert set(words) <= set(WORDS) and not set(words) & {c["messages"][0]["content"][16:] for c in test}
    conversation = train[0]
    assert conversation["messages"][1]["content"] == f"{words[0]}:{','.join(words[0])}"
    assert train.evaluate(conversation, f"{words[0]}:{','.join(words[0])}\n")
    assert not train.evaluate(conversation, f"{words[0]}:x")


# ---- slicing and mixtures ----

def test_slicing(tiny_mirror):
    full = MMLU("all", "test")
    questions = [c["messages"][0]["content"] for c in full]
    assert len(set(questions)) == 6
    for start, stop, step in [(0, None, 1), (1, 5, 2), (2, None, 3), (0, 100, 4), (5, 6, 1), (6, None, 1)]:
        part = MMLU("all", "test", start=start, stop=stop, step=step)
        assert [c["messages"][0]["content"] for c in part] == questions[start:stop:step]
    with pytest.raises(IndexError):
        full[6]
    # the order is numpy's default_rng(42) permutation of the rows (what datasets' shuffle(seed=42) gives)
    import numpy as np
    rows = [f"Question {i}?" for i in np.random.default_rng(42).permutation(6)]
    assert [q.split("\n")[0].removeprefix("Multiple Choice question: ") for q in questions] == rows


def test_mixture_determinism_and_oversampling(tiny_mirror):
    def build():
        return TaskMixture([ARC("ARC-Easy", "test"), MMLU("all", "test"), MMLU("all", "test"), SpellingBee(size=3)])
    mixture = build()
    assert len(mixture) == 2 + 6 + 6 + 3
    items = [json.dumps(c, sort_keys=True) for c in mixture]
    assert items == [json.dumps(c, sort_keys=True) for c in build()]  # same order every time
    mmlu_items = [json.dumps(c, sort_keys=True) for c in MMLU("all", "test")]
    assert all(items.count(m) == 2 for m in mmlu_items)  # passed twice = two epochs
    assert len(set(items)) == 2 + 6 + 3
    concatenated = [json.dumps(c, sort_keys=True) for task in build().tasks for c in task]
    assert sorted(items) == sorted(concatenated) and items != concatenated  # shuffled, not concatenated
    head = TaskMixture(build().tasks, stop=5)
    assert [json.dumps(c, sort_keys=True) for c in head] == items[:5]


# ---- task data sources ----

def test_real_source_urls(base_dir):
    assert common.hub_listing_url("cais/mmlu", "all", "auxiliary_train") == \
        "https://huggingface.co/api/datasets/cais/mmlu/parquet/all/auxiliary_train"
    assert common.source_for(common.hub_listing_url("openai/gsm8k", "main", "train"), "x") == \
        "https://huggingface.co/api/datasets/openai/gsm8k/parquet/main/train"
    assert common.WORDS_URL == "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"
    assert common.IDENTITY_URL == "https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl"
    expected = {("cais/mmlu", "all", "test"): "mmlu/all/test-00000-of-00001.parquet",
                ("allenai/ai2_arc", "ARC-Challenge", "validation"): "arc/ARC-Challenge/validation-00000-of-00001.parquet",
                ("openai/gsm8k", "main", "train"): "gsm8k/main/train-00000-of-00001.parquet",
                ("openai/openai_humaneval", "openai_humaneval", "test"): "humaneval/openai_humaneval/test-00000-of-00001.parquet",
                ("HuggingFaceTB/smol-smoltalk", "default", "test"): "smoltalk/data/test-00000-of-00001.parquet"}
    for key, relpath in expected.items():
        assert common.hub_mirror_relpath(*key) == relpath


@pytest.fixture
def fake_hub(tmp_path, monkeypatch, base_dir):
    """A 127.0.0.1 server answering the hub's parquet listing for one split with two shard URLs."""
    root = tmp_path / "hub"
    handler = lambda *a, **k: QuietHandler(*a, directory=str(root), **k)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    write_parquet(root / "files/0.parquet", [{"question": "a", "answer": "#### 1"}])
    write_parquet(root / "files/1.parquet", [{"question": "b", "answer": "#### 2"}, {"question": "c", "answer": "#### 3"}])
    listing = root / "api/datasets/openai/gsm8k/parquet/main/train"
    listing.parent.mkdir(parents=True)
    listing.write_text(json.dumps([f"{url}/files/0.parquet", f"{url}/files/1.parquet"]))
    monkeypatch.setattr(common, "HF_HUB", url)
    yield url
    server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_hub_listing_and_cache(fake_hub, base_dir):
    table = common.load_hub_dataset("openai/gsm8k", "main", "train")
    assert table.column("question").to_pylist() == ["a", "b", "c"]  # both shards, in listing order
    split_dir = base_dir / "task_data/openai--gsm8k/main/train"
    assert sorted(f for f in os.listdir(split_dir) if not f.endswith(".lock")) == \
        ["00000.parquet", "00001.parquet", "listing.json", "manifest.json"]
    assert len(GSM8K("main", "train")) == 3
    with pytest.raises(MissingSplitError, match="openai/gsm8k main/test"):
        GSM8K("main", "test")  # the hub answers 404 for a split it does not have


def test_load_from_http_mirror(http_mirror, base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_MIRROR", http_mirror)
    mmlu = MMLU("all", "test")
    assert len(mmlu) == 1995 and set("ABCD") >= {mmlu[i]["messages"][1]["content"] for i in range(50)}
    assert (base_dir / "task_data/cais--mmlu/all/test/manifest.json").exists()
    assert len(ARC("ARC-Challenge", "test")) == 1172
    assert len(CustomJSON()) == 996
    with pytest.raises(MissingSplitError, match="auxiliary_train"):
        MMLU("all", "auxiliary_train")
    monkeypatch.delenv("NANOCHAT_MIRROR")  # cached: no network needed any more
    assert MMLU("all", "test")[0] == mmlu[0]


def test_load_from_local_mirror(shared_data, base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_MIRROR", str(shared_data))
    with pytest.raises(MissingSplitError, match="cais/mmlu all/auxiliary_train"):
        TaskMixture([SmolTalk("train"), MMLU("all", "auxiliary_train")])
    mixture = TaskMixture([SmolTalk("train"), GSM8K("main", "train"), ARC("ARC-Easy", "train")])
    assert len(mixture) == 347 + 7473 + 2251
    assert len(SmolTalk("test")) == 36 and len(HumanEval()) == 164
    assert len(common.load_words()) == 370_099 and all(w.isalpha() for w in common.load_words()[:1000])
    assert (base_dir / "task_data/words/words_alpha.txt").exists()
    # every real GSM8K solution converts into parts that keep its final answer
    gsm8k = GSM8K("main", "test")
    for conversation in (gsm8k[i] for i in range(0, len(gsm8k), 7)):
        answer = common.extract_answer(common.last_text(conversation))
        assert answer is not None and gsm8k.evaluate(conversation, f"#### {answer}")


def test_real_humaneval_canonical_solutions_pass(shared_data, base_dir, monkeypatch):
    """Program assembly + sandbox on real problems: canonical solutions pass (every 4th problem, to keep
    the test fast; all 164 pass), a stub fails."""
    import concurrent.futures
    monkeypatch.setenv("NANOCHAT_MIRROR", str(shared_data))
    task = HumanEval()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        problems = [task[i] for i in range(0, len(task), 4)]
        results = list(pool.map(lambda c: task.evaluate(c, c["messages"][1]["content"]), problems))
    assert all(results), [c["entry_point"] for c, ok in zip(problems, results) if not ok]
    assert not task.evaluate(task[0], f"def {task[0]['entry_point']}(*args):\n    return None\n")
