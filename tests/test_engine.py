"""Engine tests: calculator safety, UTF-8 streaming, conversation trimming, cached vs uncached decoding,
the tool round trip and dropping finished rows. Tiny tokenizer and model built here, CPU only."""
import threading
import time

import pytest
import torch

import common
from common import Engine, Tokenizer, Utf8Streamer, build_chat_prompt, display_text, reply_to_content, use_calculator

TRAIN_TEXT = ["hello world, the quick brown fox jumps over the lazy dog. " * 20,
              "what is 2+3? it is 5. count the r in strawberry. " * 20, "café naïve über " * 5]


def make_tokenizer():
    return Tokenizer.train(iter(TRAIN_TEXT), 300)  # byte-level for anything rare: emoji split into 4 tokens


def make_model(vocab_size, seed=0, device="cpu", sequence_len=128):
    """A tiny GPT with weights big enough that its output depends on the context (the default init
    zeroes the projections and makes lm_head almost flat, which would make greedy decoding ties)."""
    from model import GPTConfig, build_gpt
    config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=64,
                       window_pattern="SL")
    model = build_gpt(config, device)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[1] ** -0.5)
    return model.eval()


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


# ---- calculator ----

@pytest.mark.parametrize("expr, expected", [
    ("2+3", "5"), ("1,000 * 3", "3000"), ("7/2", "3.5"), ("(4 - 6) * -3", "6"), ("17 // 5 + 17 % 5", "5"),
    ("2**10", "1024"), ("2**-1", "0.5"), ("'strawberry'.count('r')", "3"), ('"a,b,c".count(",")', "2"),
])
def test_calculator_evaluates_arithmetic_and_count(expr, expected):
    assert use_calculator(expr) == expected


@pytest.mark.parametrize("expr", [
    "__import__('os').system('echo hi')", "(1).__class__", "'abc'.upper()", "open('x')", "x + 1",
    "[i for i in range(10**9)]", "sum(range(10**9))", "2**10**10", "10**400", "9**999999", "(-8)**0.5",
    "1/0", "1e308 * 10", "True + 1", "'ab' * 10**9", "'a' + 'b'", "lambda: 1", "2+", "", "1" * 300,
    "'a'.count('a', 0)", "print('hi')",
])
def test_calculator_refuses_code_and_huge_work(expr):
    start = time.perf_counter()
    assert use_calculator(expr) is None
    assert time.perf_counter() - start < 0.5  # refused quickly, nothing big computed


def test_calculator_works_from_threads():
    results = {}

    def work(i):
        results[i] = (use_calculator(f"{i} * 3"), use_calculator("2**10**10"))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert results == {i: (str(3 * i), None) for i in range(4)}


# ---- streaming text ----

def test_streamer_never_emits_half_characters(tok):
    text = "héllo 🙂 世界, naïve"
    ids = tok.encode(text)
    streamer = Utf8Streamer(tok)
    pieces = [streamer.push(i) for i in ids]
    pieces.append(streamer.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(ids) > len(text) and "" in pieces[:-1]  # multi-byte tokens really were held back


def test_streamer_shows_tool_calls_readably(tok):
    sp = tok.encode_special
    call = [sp("<|python_start|>")] + tok.encode("2+3") + [sp("<|python_end|>")]
    output = [sp("<|output_start|>")] + tok.encode("5") + [sp("<|output_end|>")]
    reply = tok.encode("it is ") + call + output + tok.encode(" 5.") + [sp("<|assistant_end|>")]
    assert display_text(tok, reply) == "it is [calculator: 2+3 = 5] 5."
    assert display_text(tok, call + tok.encode(" hm")) == "[calculator: 2+3] hm"  # no result: bracket closed
    assert reply_to_content(tok, reply) == [
        {"type": "text", "text": "it is "}, {"type": "python", "text": "2+3"},
        {"type": "python_output", "text": "5"}, {"type": "text", "text": " 5."}]
    assert reply_to_content(tok, tok.encode("plain") + [sp("<|assistant_end|>")] + tok.encode("x")) == "plain"


# ---- conversation trimming ----

def test_build_chat_prompt_trims_oldest_turns_keeps_system(tok):
    messages = [{"role": "system", "content": "be brief"}]
    for i in range(6):
        messages += [{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": f"answer {i}"}]
    messages.append({"role": "user", "content": "last question"})
    full, dropped, budget = build_chat_prompt(tok, messages, max_context=10_000, max_tokens=10)
    assert dropped == 0 and budget == 10 and full[-1] == tok.encode_special("<|assistant_start|>")
    ids, dropped, budget = build_chat_prompt(tok, messages, max_context=len(full) // 2, max_tokens=10)
    assert 0 < dropped < 6 and len(ids) + 10 <= len(full) // 2 and budget == 10
    text = tok.decode(ids)
    assert text.startswith("<|bos|><|user_start|>be brief\n\n")  # system text kept, folded into the first turn
    assert "last question" in text and f"answer {5}" in text and "question 0" not in text
    expected, _ = tok.render_conversation({"messages": messages[:1] + messages[1 + 2 * dropped:]}, max_tokens=10**9)
    assert ids == expected + [tok.encode_special("<|assistant_start|>")]
    # the reply room is at most half the context; the last message stays and the reply gets what is left
    last = [{"role": "user", "content": "last question " * 3}]
    alone, _, _ = build_chat_prompt(tok, last, max_context=10_000, max_tokens=1)
    ids, dropped, budget = build_chat_prompt(tok, last, max_context=len(alone) + 3, max_tokens=100)
    assert ids == alone and budget == 3
    with pytest.raises(ValueError, match="too long"):
        build_chat_prompt(tok, last, max_context=len(alone), max_tokens=10)
    with pytest.raises(ValueError, match="end with a user message"):
        build_chat_prompt(tok, messages[:-1], max_context=10_000, max_tokens=10)


# ---- decoding ----

def test_sampling_temperature_top_k_top_p_and_seed():
    from common import sample_next_token
    logits = torch.log(torch.tensor([[0.05, 0.6, 0.05, 0.25, 0.05]])).expand(2000, -1)
    draw = lambda seed, **kw: sample_next_token(logits, torch.Generator().manual_seed(seed), **kw)
    assert set(draw(0, temperature=0.0).tolist()) == {1}
    assert set(draw(0, top_k=1).tolist()) == {1} and set(draw(0, top_p=0.5).tolist()) == {1}
    assert set(draw(0, top_k=2).tolist()) == {1, 3} and set(draw(0, top_p=0.8).tolist()) == {1, 3}
    assert set(draw(0, top_k=2, top_p=0.5).tolist()) == {1}
    counts = torch.bincount(draw(0), minlength=5) / 2000
    assert torch.allclose(counts, logits[0].exp(), atol=0.04)  # plain sampling follows the distribution
    assert torch.equal(draw(7, temperature=0.8), draw(7, temperature=0.8)) and not torch.equal(draw(7), draw(8))

def test_cached_greedy_matches_uncached(tok):
    model = make_model(tok.get_vocab_size())
    prompt = tok.encode("the quick brown fox", prepend="<|bos|>")
    uncached = list(model.generate(prompt, max_tokens=20, temperature=0.0))
    engine = Engine(model, tok)
    columns = [column for column, _ in engine.generate(prompt, num_samples=3, max_tokens=20, temperature=0.0)]
    cached = [column[0] for column in columns]
    assert all(len(set(column)) == 1 for column in columns)  # every row saw the same prefilled cache
    stops = engine.stop_tokens
    n = next((i for i, t in enumerate(uncached) if t in stops), len(uncached) - 1) + 1  # the engine ends a row there
    assert cached == uncached[:n] and len(set(cached)) > 2  # a real sequence, not one repeated token
    # one-token prompt: prefill of a single position works too
    assert next(engine.generate(prompt[:1], max_tokens=1, temperature=0.0))[0][0] == \
        model(torch.tensor([prompt[:1]]))[0, -1].argmax().item()


class Scripted(torch.nn.Module):
    """Wraps a GPT and pushes its logits towards a script: `plan(position, logits)` edits the (B, V) logits
    of the next generated position in place. Records the batch size of every call."""

    def __init__(self, model, prompt_len, plan):
        super().__init__()
        self.model, self.config, self.prompt_len, self.plan, self.batch_sizes = model, model.config, prompt_len, plan, []
        self.get_device, self.new_kv_cache = model.get_device, model.new_kv_cache

    def forward(self, idx, kv_cache=None):
        logits = self.model(idx, kv_cache=kv_cache).clone()
        self.batch_sizes.append(idx.size(0))
        position = (kv_cache.get_pos() if kv_cache is not None else idx.size(1)) - self.prompt_len
        self.plan(position, logits[:, -1])
        return logits


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_tool_call_gets_calculator_output_injected(tok, device):
    sp = tok.encode_special
    call = [sp("<|python_start|>")] + tok.encode("12*7") + [sp("<|python_end|>")]
    prompt = tok.encode("what is 12*7?", prepend="<|bos|>")

    def plan(position, logits):  # write the call, then try to end the reply right away
        logits[:, call[position] if position < len(call) else sp("<|assistant_end|>")] += 1000

    engine = Engine(Scripted(make_model(tok.get_vocab_size(), device=device), len(prompt), plan), tok)
    sequences, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=30, temperature=1.0, top_k=5)
    output = [sp("<|output_start|>")] + tok.encode("84") + [sp("<|output_end|>")]
    for sequence, mask in zip(sequences, masks):
        reply, reply_mask = sequence[len(prompt):], mask[len(prompt):]
        assert reply == call + output  # the model wanted to stop; the engine forced the result in first
        assert mask[:len(prompt)] == [0] * len(prompt) and reply_mask == [1] * len(call) + [0] * len(output)
    assert display_text(tok, reply) == "[calculator: 12*7 = 84]"


def test_finished_rows_leave_the_batch(tok):
    """Rows that stop early are dropped from the cache; the rest must keep decoding from their own history:
    every sampled token must be among the top 3 that an uncached forward of that row's sequence gives."""
    end = tok.encode_special("<|assistant_end|>")
    model = make_model(tok.get_vocab_size(), seed=1)

    def plan(position, logits):  # make <|assistant_end|> about as likely as the 2nd choice: rows stop at random
        logits[:, end] = -1e9
        logits[:, end] = logits.topk(2, dim=-1).values[:, 1] - 0.01

    prompt = tok.encode("hello world", prepend="<|bos|>")
    scripted = Scripted(model, len(prompt), plan)
    sequences, masks = Engine(scripted, tok).generate_batch(prompt, num_samples=6, max_tokens=40, temperature=2.0, top_k=3, seed=3)
    lengths = [len(s) for s in sequences]
    assert len(set(lengths)) > 2, lengths
    decode_batches = scripted.batch_sizes[1:]
    assert decode_batches[0] == 6 and decode_batches == sorted(decode_batches, reverse=True) and decode_batches[-1] < 6
    assert sum(decode_batches) < 6 * len(decode_batches)  # finished rows were not computed
    for sequence in sequences:
        with torch.inference_mode():
            logits = scripted(torch.tensor([sequence]))[0]  # uncached; the plan only reads the last position
            for t in range(len(prompt), len(sequence)):
                row = logits[t - 1].clone()
                plan(None, row[None])
                assert sequence[t] in row.topk(3).indices.tolist()
