"""sft.py: best-fit packing with truncation to the row, NaN-free loss, exact resume, clear errors."""
import ast
import math
import types

import pytest
import torch

from common import NanochatError, Tokenizer
from model import GPTConfig, build_gpt
from sft import new_packer_state, resolve_sizes, sft_batches, sft_loss
from test_chain import SFT_FLAGS, SFT_STEPS, chain_dir, copy_of, read_jsonl, run_script, tear_last_line

WORDS = "the cat sat on a mat while seven dogs ran far away from home and then came back".split()


def tiny_tokenizer():
    text = " ".join(WORDS * 50)
    return Tokenizer.train(iter([text]), 300)


def conversations():
    """Short chats, chats longer than a 16-token row, and one whose user turn alone fills the row."""
    convs = []
    for i in range(40):
        answer = " ".join(WORDS[: 2 + (i * 7) % 15] * (1 + i % 3))
        convs.append({"messages": [{"role": "user", "content": WORDS[i % len(WORDS)]},
                                   {"role": "assistant", "content": answer}]})
    convs.insert(5, {"messages": [{"role": "user", "content": " ".join(WORDS * 3)},
                                  {"role": "assistant", "content": "ok"}]})
    return convs


def test_packing_truncates_to_the_row_skips_unlearnable_and_never_stalls():
    tokenizer, data = tiny_tokenizer(), conversations()
    batches = sft_batches(data, tokenizer, batch_size=2, seq_len=16, device="cpu", state=new_packer_state(0),
                          buffer_size=8)
    consumed = []
    for _ in range(60):  # more rows than the data holds: the packer must wrap around, not stall
        inputs, targets, state = next(batches)
        assert inputs.shape == targets.shape == (2, 16)
        assert ((targets >= 0).sum(dim=1) > 0).all(), "every row has something to learn"
        assert torch.equal(inputs[:, 1:], targets[:, :-1].where(targets[:, :-1] >= 0, inputs[:, 1:]))
        consumed.append(state["consumed"])
    assert all(b > a for a, b in zip(consumed, consumed[1:])), "each batch packs at least one conversation"
    assert state["epoch"] >= 1 and state["truncated"] > 0 and state["skipped"] >= 1


def test_packer_state_rebuilds_the_same_next_batches():
    tokenizer, data = tiny_tokenizer(), conversations()
    kwargs = dict(batch_size=3, seq_len=24, device="cpu", buffer_size=6)
    run = sft_batches(data, tokenizer, state=new_packer_state(0), **kwargs)
    batches = [next(run) for _ in range(8)]
    resumed = sft_batches(data, tokenizer, state=batches[3][2], **kwargs)
    for expected in batches[4:]:
        got = next(resumed)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]) and got[2] == expected[2]


def test_loss_without_supervised_tokens_is_zero_not_nan():
    model = build_gpt(GPTConfig(sequence_len=16, vocab_size=300, n_layer=1, n_head=2, n_kv_head=2, n_embd=32), "cpu")
    inputs = torch.randint(0, 300, (2, 16))
    loss = sft_loss(model, inputs, torch.full((2, 16), -1))
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    targets = torch.full((2, 16), -1)
    targets[0, 3] = 7
    per_token = model(inputs, targets, loss_reduction="none").view(2, 16)
    assert math.isclose(sft_loss(model, inputs, targets).item(), per_token[0, 3].item(), rel_tol=1e-5)


def test_sizes_come_from_the_base_run_unless_overridden():
    base_meta = {"max_seq_len": 2048, "device_batch_size": 16, "total_batch_size": 1048576,
                 "model_config": {"sequence_len": 2048}}
    flags = dict(max_seq_len=None, device_batch_size=None, total_batch_size=None)
    assert resolve_sizes(types.SimpleNamespace(**flags), base_meta, 8) == (2048, 16, 1048576, 4)
    # a smaller micro-batch shape: one micro-batch per step unless a total is given
    small = dict(flags, max_seq_len=256, device_batch_size=4)
    assert resolve_sizes(types.SimpleNamespace(**small), base_meta, 1) == (256, 4, 1024, 1)
    assert resolve_sizes(types.SimpleNamespace(**dict(small, total_batch_size=4096)), base_meta, 1)[3] == 4
    with pytest.raises(NanochatError, match="--total-batch-size 1000"):
        resolve_sizes(types.SimpleNamespace(**dict(small, total_batch_size=1000)), base_meta, 1)


def test_short_rows_run_a_whole_epoch_without_nan(tmp_path_factory, http_mirror, tmp_path):
    """seq 32 is shorter than most conversations: they are cut, the epoch still ends (no --num-iterations)."""
    base = copy_of(chain_dir(tmp_path_factory, http_mirror), tmp_path / "base")
    run_script(base, http_mirror, "sft.py", "--mmlu-epochs", 0, "--gsm8k-epochs", 0, "--identity-epochs", 0,
               "--simple-spelling-size", 0, "--spelling-bee-size", 0, "--max-seq-len", 32, "--device-batch-size", 8,
               "--eval-every", -1, "--chatcore-every", -1, "--model-tag", "d2")
    rows = [r for r in read_jsonl(base / "chatsft_checkpoints" / "d2" / "metrics.jsonl") if "loss" in r]
    assert rows and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["progress"] == 1.0 and rows[-1]["truncated"] > 0
    assert rows[-1]["epoch"] <= 1


def test_resume_gives_the_same_losses(tmp_path_factory, http_mirror, tmp_path):
    chain = chain_dir(tmp_path_factory, http_mirror)
    expected = [r for r in read_jsonl(chain / "chatsft_checkpoints" / "d2" / "metrics.jsonl") if "loss" in r]
    base = copy_of(chain, tmp_path / "base")
    # as if the chain's run had been killed after its step-25 checkpoint, mid-way through writing a metrics
    # line; evals do not change training
    tear_last_line(base / "chatsft_checkpoints" / "d2" / "metrics.jsonl")
    run_script(base, http_mirror, "sft.py", *SFT_FLAGS, "--resume-from-step", 25, "--eval-every", -1,
               "--chatcore-every", -1)
    got = [r for r in read_jsonl(base / "chatsft_checkpoints" / "d2" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in got] == list(range(SFT_STEPS))
    assert [r["loss"] for r in got] == [r["loss"] for r in expected]
    assert [r["truncated"] for r in got] == [r["truncated"] for r in expected]
    a = torch.load(chain / "chatsft_checkpoints" / "d2" / f"model_{SFT_STEPS:06d}.pt")
    b = torch.load(base / "chatsft_checkpoints" / "d2" / f"model_{SFT_STEPS:06d}.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_missing_mmlu_split_is_one_clear_line(tmp_path_factory, http_mirror, tmp_path):
    base = copy_of(chain_dir(tmp_path_factory, http_mirror), tmp_path / "base")
    proc = run_script(base, http_mirror, "sft.py", check=False)  # default mixture wants MMLU auxiliary_train
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "auxiliary_train" in proc.stderr and "--mmlu-epochs 0" in proc.stderr


def test_two_processes_train_and_resume_exactly(tmp_path_factory, http_mirror, tmp_path):
    """torchrun, 2 CPU ranks (gloo): each rank packs its own stride of the data and saves its packer and
    optimizer shard; a resume from the middle repeats the losses. (The base has one optimizer shard.)"""
    base = copy_of(chain_dir(tmp_path_factory, http_mirror), tmp_path / "base")
    flags = ["--mmlu-epochs", 0, "--identity-epochs", 0, "--simple-spelling-size", 0, "--spelling-bee-size", 0,
             "--device-batch-size", 2, "--total-batch-size", 512, "--num-iterations", 4, "--save-every", 2,
             "--eval-every", -1, "--chatcore-every", -1, "--model-tag", "d2"]
    first = run_script(base, http_mirror, "sft.py", *flags, nproc=2)
    assert "1 optimizer shard(s) for 2 rank(s)" in first.stdout
    ckpt = base / "chatsft_checkpoints" / "d2"
    assert (ckpt / "optim_000004_rank0.pt").exists() and (ckpt / "optim_000004_rank1.pt").exists()
    expected = [r["loss"] for r in read_jsonl(ckpt / "metrics.jsonl")]
    run_script(base, http_mirror, "sft.py", *flags, "--resume-from-step", 2, nproc=2)
    assert [r["loss"] for r in read_jsonl(ckpt / "metrics.jsonl")] == expected and len(expected) == 4


def test_short_spelling_bee_is_the_call_and_its_result(shared_data, base_dir, monkeypatch):
    """--spelling-bee-short-frac 1: the reply is the calculator call, its output and '#### N', nothing else;
    the call the engine runs gives N, so copying it into the answer is graded correct."""
    from common import SpellingBee, extract_answer, use_calculator
    monkeypatch.setenv("NANOCHAT_MIRROR", str(shared_data))
    short, reasoned = SpellingBee(size=20, short_frac=1.0), SpellingBee(size=20)
    for i in range(20):
        parts = short[i]["messages"][-1]["content"]
        assert [p["type"] for p in parts] == ["python", "python_output", "text"]
        literal, letter = parts[0]["text"].removesuffix("')").split(".count('")
        word = ast.literal_eval(literal.strip()).strip()
        assert word in short[i]["messages"][0]["content"]
        assert use_calculator(parts[0]["text"]) == parts[1]["text"] == str(word.count(letter))
        assert parts[2]["text"] == f"\n\n#### {parts[1]['text']}"
        assert short.evaluate(short[i], parts[2]["text"]) and not short.evaluate(short[i], "#### 99")
        # the same question and answer as the reasoned style, only the reply differs
        assert short[i]["messages"][0] == reasoned[i]["messages"][0]
        assert extract_answer(reasoned[i]["messages"][-1]["content"][-1]["text"]) == parts[1]["text"]
        assert reasoned[i]["messages"][-1]["content"][0]["text"].startswith("We need to count")


def test_short_call_repeats_the_questions_tokens_for_the_word(shared_data, monkeypatch):
    """The word in a short answer's call is the question's own tokens for it, one for one, in nearly every
    example (quoted or bare, after a space or at the start); writing it the one way, ' word', would respell
    most of them (quoted words are split apart from their space by the pre-tokenizer)."""
    from common import SpellingBee, Tokenizer
    monkeypatch.setenv("NANOCHAT_MIRROR", str(shared_data))
    bee = SpellingBee(size=600, short_frac=1.0)
    examples = [bee[i]["messages"] for i in range(len(bee))]
    tok = Tokenizer.train(iter([m[0]["content"] for m in examples] * 3), 1024)
    def word_tokens_in_question(question, literal):
        word_ids = [t for t in tok.encode(literal) if tok.decode([t]).strip(" '\"")]  # the quotes dropped
        return f",{','.join(map(str, word_ids))}," in f",{','.join(map(str, tok.encode(question)))},"
    calls = [(m[0]["content"], m[1]["content"][0]["text"].split(".count(")[0]) for m in examples]
    kept = sum(word_tokens_in_question(q, literal) for q, literal in calls)
    respelled = sum(word_tokens_in_question(q, f"' {ast.literal_eval(literal.strip()).strip()}'")
                    for q, literal in calls)
    assert kept >= 0.9 * len(calls) and respelled < 0.5 * len(calls), (kept, respelled)


def test_short_frac_mixes_the_two_answers_over_the_same_questions(shared_data, monkeypatch):
    """A share of short answers: about that share of the examples is short, the questions do not change
    with it, and a larger share keeps every example a smaller one made short."""
    from common import SpellingBee
    monkeypatch.setenv("NANOCHAT_MIRROR", str(shared_data))
    def short_ones(frac, n=1000):
        bee = SpellingBee(size=n, short_frac=frac)
        return {i for i in range(n) if bee[i]["messages"][-1]["content"][0]["type"] == "python"}, bee
    third, bee_third = short_ones(0.3)
    half, bee_half = short_ones(0.5)
    assert 250 < len(third) < 350 and 450 < len(half) < 550 and third < half
    assert all(bee_third[i]["messages"][0] == bee_half[i]["messages"][0] for i in range(1000))
    assert short_ones(0.0)[0] == set() and len(short_ones(1.0)[0]) == 1000


def test_mixture_flags_pick_the_style_and_the_shares(shared_data, base_dir, monkeypatch):
    from sft import build_train_mixture, parse_args
    monkeypatch.setenv("NANOCHAT_MIRROR", str(shared_data))
    args = parse_args(["--mmlu-epochs", "0", "--smoltalk-epochs", "0", "--identity-epochs", "2",
                       "--identity-size", "7", "--simple-spelling-size", "0", "--spelling-bee-size", "50",
                       "--spelling-bee-short-frac", "1", "--gsm8k-epochs", "2", "--gsm8k-size", "30"])
    mixture = build_train_mixture(args)
    assert len(mixture) == 50 + 2 * 30 + 2 * 7
    replies = [mixture[i]["messages"][-1]["content"] for i in range(len(mixture))]
    short = [r for r in replies if isinstance(r, list) and r[0]["type"] == "python"]
    assert len(short) == 50 and sum(isinstance(r, list) for r in replies) == 50 + 2 * 30  # GSM8K's are parts
    identity = [mixture[i]["messages"][0]["content"] for i in range(len(mixture)) if isinstance(replies[i], str)]
    assert len(identity) == 14 and len(set(identity)) <= 7  # the first 7 conversations, twice
    with pytest.raises(SystemExit):
        parse_args(["--spelling-bee-short-frac", "1.5"])
