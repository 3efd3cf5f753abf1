"""evaluate.py, chat part: letter scoring with padding, generative grading through the tool, ChatCORE, errors."""
import pytest
import torch

from common import NanochatError, load_model
from common import CHAT_TASKS, chatcore, letter_token_ids, parse_chat_tasks, run_categorical, run_generative
from test_chain import chain_dir, run_script
from test_rl import OneQuestion, tool_calling_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


def test_chatcore_centers_on_chance_and_needs_every_task():
    perfect = {name: 1.0 for name in CHAT_TASKS}
    chance = {name: baseline for name, (_, baseline) in CHAT_TASKS.items()}
    assert chatcore(perfect) == 1.0 and chatcore(chance) == 0.0
    mixed = dict(chance, **{"ARC-Easy": 0.625, "GSM8K": 0.3})  # ARC-Easy centered: 0.5
    assert chatcore(mixed) == pytest.approx((0.5 + 0.3) / 6)
    assert chatcore({"ARC-Easy": 0.5}) is None
    assert chatcore({"ARC-Easy": 0.625, "MMLU": 0.25}, names=("ARC-Easy", "MMLU")) == pytest.approx(0.25)


def test_task_names_are_checked():
    assert parse_chat_tasks("") == list(CHAT_TASKS)
    assert parse_chat_tasks("GSM8K|ARC-Easy") == ["GSM8K", "ARC-Easy"]
    with pytest.raises(NanochatError, match="ARC-Hard"):
        parse_chat_tasks("ARC-Easy,ARC-Hard")


def test_categorical_batches_match_one_by_one(tmp_path_factory, http_mirror, monkeypatch):
    """Right-padding a batch must not change any answer; the answer is the best allowed letter."""
    chain = chain_dir(tmp_path_factory, http_mirror)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(chain))
    monkeypatch.setenv("NANOCHAT_MIRROR", http_mirror)
    model, tokenizer, _ = load_model("sft", "cpu")
    task = CHAT_TASKS["ARC-Challenge"][0]()
    batched = run_categorical(model, tokenizer, task, batch_size=4, max_problems=8)
    correct = 0
    for i in range(8):
        conversation = task[i]
        prompt = tokenizer.render_for_completion(conversation)
        with torch.no_grad():
            logits = model(torch.tensor([prompt]))[0, -1]
        letters = conversation["letters"]
        best = max(letters, key=lambda letter: logits[letter_token_ids(tokenizer, [letter])[0]].item())
        correct += task.evaluate(conversation, best)
    assert batched == (correct, 8)


def test_generative_grading_sees_the_tool_output():
    """The tiny model writes '<|python_start|>2+3<|python_end|>', the engine answers 5, then '#### 5'."""
    tokenizer, model = tool_calling_model()
    assert run_generative(model, tokenizer, OneQuestion(3), num_samples=2, max_new_tokens=16) == (3, 3)


def test_unknown_task_is_one_clear_line(tmp_path, http_mirror):
    proc = run_script(tmp_path, http_mirror, "evaluate.py", "--stage", "sft", "--tasks", "MMLU,Jeopardy", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "Jeopardy" in proc.stderr and "ARC-Easy" in proc.stderr
