"""Continuous batching (common.DecodeBatch and the KV cache's rows at different positions): requests with
different prompts, lengths and settings decoded together get the tokens each gets alone; a request joining
mid-way leaves the others' tokens unchanged; a calculator call in one row while others decode; lower-precision
decode weights. Tiny models on the CPU."""
import pytest
import torch

from common import DecodeBatch, Engine, reply_parts
from test_engine import make_model, make_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def prompts_of(tok):
    """Prompts of different lengths; the longest (~190 tokens) reaches past the short layers' 128-token window."""
    bos = tok.get_bos_token_id()
    texts = ["hello world", "what is 2+3? it is", "the quick brown fox jumps over the lazy dog. " * 4,
             "count the r in strawberry. " * 9]
    return [[bos] + tok.encode(text) for text in texts]


SETTINGS = [dict(temperature=0.0, top_k=None, top_p=None, seed=1), dict(temperature=1.0, top_k=20, top_p=None, seed=7),
            dict(temperature=0.8, top_k=None, top_p=0.9, seed=3), dict(temperature=0.0, top_k=None, top_p=None, seed=5)]


def alone(engine, prompt, max_tokens, s):
    """The tokens Engine.generate gives this request by itself, up to and including its terminal token."""
    tokens = []
    for column, _ in engine.generate(prompt, 1, max_tokens, s["temperature"], s["top_k"], s["top_p"], s["seed"]):
        tokens.append(column[0])
        if column[0] in engine.stop_tokens:
            break
    return tokens


def run_batch(batch, requests, joins):
    """Decode requests [(prompt, max_tokens, settings)], request i joining before step joins[i]; returns each
    request's tokens."""
    got, names, step = [[] for _ in requests], {}, 0
    while step <= max(joins) or batch.rows:
        for i, at in enumerate(joins):
            if at == step:
                prompt, max_tokens, s = requests[i]
                names[id(batch.join(prompt, max_tokens, **s))] = i
        if batch.rows:
            for row, token, _ in batch.step():
                got[names[id(row)]].append(token)
        step += 1
    return got


def test_ragged_rows_give_the_logits_each_gets_alone(tok):
    model = make_model(tok.get_vocab_size(), sequence_len=512)
    engine = Engine(model, tok)
    prompts = prompts_of(tok)
    batch_cache = model.new_kv_cache(6, 512)  # spare rows: a forward runs only the first ones
    for i, prompt in enumerate(prompts):
        batch_cache.set_row(i, engine.prefill(prompt)[1], i + 1)
    assert len(set(batch_cache.lengths[:4])) == 4
    next_ids = [5, 6, 7, 8]
    with torch.inference_mode():
        together = engine.step(next_ids, batch_cache)
        for i, prompt in enumerate(prompts):
            cache = model.new_kv_cache(1, 512)
            cache.prefill(engine.prefill(prompt)[1])
            single = engine.step([next_ids[i]], cache)
            torch.testing.assert_close(together[i:i + 1], single, atol=1e-4, rtol=1e-4)
    assert batch_cache.lengths[:4] == [len(p) + 1 for p in prompts]


def test_requests_decoded_together_get_the_tokens_they_get_alone(tok):
    model = make_model(tok.get_vocab_size(), sequence_len=512)
    engine = Engine(model, tok)
    requests = [(p, n, s) for p, n, s in zip(prompts_of(tok), (30, 12, 45, 25), SETTINGS)]
    expected = [alone(engine, *r) for r in requests]
    assert all(expected) and len({len(e) for e in expected}) > 1  # different lengths: rows leave at different steps
    batch = DecodeBatch(engine, max_rows=4, seq_len=512)
    assert run_batch(batch, requests, joins=[0, 0, 0, 0]) == expected
    # requests joining mid-way (and rows freed by finished ones reused) change nobody's tokens
    batch = DecodeBatch(engine, max_rows=2, seq_len=512)
    got, pending, names, step = [[] for _ in requests], list(range(4)), {}, 0
    while pending or batch.rows:
        while pending and len(batch.rows) < batch.max_rows and step >= 3 * pending[0]:
            i = pending.pop(0)
            names[id(batch.join(*requests[i][:2], **requests[i][2]))] = i
        if batch.rows:
            for row, token, _ in batch.step():
                got[names[id(row)]].append(token)
        step += 1
    assert got == expected
    assert batch.rows == [] and batch.logits is None


def test_a_row_that_leaves_frees_its_place_for_the_next(tok):
    engine = Engine(make_model(tok.get_vocab_size(), sequence_len=512), tok)
    prompts = prompts_of(tok)
    batch = DecodeBatch(engine, max_rows=2, seq_len=512)
    first, second = batch.join(prompts[0], 50, **SETTINGS[0]), batch.join(prompts[1], 50, **SETTINGS[1])
    for _ in range(3):
        batch.step()
    with pytest.raises(ValueError, match="full"):
        batch.join(prompts[2], 10)
    batch.leave(first)  # its client went away
    assert batch.rows == [second]
    third = batch.join(prompts[3], 20, **SETTINGS[3])
    got = []
    while third in batch.rows:
        got += [token for row, token, _ in batch.step() if row is third]
    assert got == alone(engine, prompts[3], 20, SETTINGS[3])


class Steered(torch.nn.Module):
    """The model, with some tokens forced by the row's last input token (rules: token -> next token), so one row
    calls the calculator while the others decode freely; the stop tokens and <|python_start|> are masked in
    free rows, so those run to max_tokens without a call of their own."""

    def __init__(self, model, rules, masked):
        super().__init__()
        self.model, self.config, self.rules, self.masked = model, model.config, rules, masked
        self.get_device, self.new_kv_cache = model.get_device, model.new_kv_cache

    def forward(self, idx, kv_cache=None):
        logits = self.model(idx, kv_cache=kv_cache)
        logits[:, -1, self.masked] = -1e4
        for row, token in enumerate(idx[:, -1].tolist()):
            if token in self.rules:
                logits[row, -1, self.rules[token]] = 1e4
        return logits


def test_a_calculator_call_in_one_row_while_others_decode(tok):
    special = tok.encode_special
    call = tok.encode("2+3")
    trigger = tok.encode("?")[0]
    chain = [trigger, special("<|python_start|>"), *call, special("<|python_end|>")]
    rules = dict(zip(chain, chain[1:]))
    rules[special("<|output_end|>")] = special("<|assistant_end|>")
    masked = [special("<|python_start|>"), special("<|assistant_end|>"), tok.get_bos_token_id()]
    engine = Engine(Steered(make_model(tok.get_vocab_size(), sequence_len=512), rules, masked), tok)
    bos = tok.get_bos_token_id()
    calc_prompt = [bos] + tok.encode("what is 2+3") + [trigger]
    prompts = prompts_of(tok)
    requests = [(prompts[0], 20, SETTINGS[1]), (calc_prompt, 20, SETTINGS[0]), (prompts[2], 20, SETTINGS[2])]
    expected = [alone(engine, *r) for r in requests]
    got = run_batch(DecodeBatch(engine, max_rows=3, seq_len=512), requests, joins=[0, 2, 1])
    assert got == expected
    parts = [(kind, tok.decode(ids)) for kind, ids in reply_parts(tok, got[1])]
    assert parts == [("python", "2+3"), ("python_output", "5")] and got[1][-1] == special("<|assistant_end|>")
    assert len(got[0]) == len(got[2]) == 20 and special("<|python_start|>") not in got[0] + got[2]


def test_decode_weights_in_fp32_give_the_training_models_logits(tok):
    """set_decode_dtype fuses c_q, c_k, c_v into one matrix and rotates/norms q and k together: with grouped-query
    heads (4 query, 2 kv), a prefill and cached one-token steps give the unconverted model's logits."""
    import copy
    from model import GPTConfig, build_gpt, set_decode_dtype
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=64, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    model = build_gpt(config, "cpu").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * (p.shape[-1] ** -0.5 if p.dim() == 2 else 0.5))
    decoding = copy.deepcopy(model)
    assert set_decode_dtype(decoding, "fp32") == "fp32"
    assert all(b.attn.c_qkv is not None and not hasattr(b.attn, "c_q") for b in decoding.transformer.h)
    ids = torch.tensor([prompts_of(tok)[1]])
    with torch.inference_mode():
        torch.testing.assert_close(decoding(ids), model(ids), rtol=1e-5, atol=1e-5)
        caches = [m.new_kv_cache(1, ids.size(1)) for m in (model, decoding)]
        for t in range(ids.size(1)):  # one token at a time through the KV cache
            expected, got = (m(ids[:, t:t + 1], kv_cache=c) for m, c in zip((model, decoding), caches))
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["bf16", "int8", "int8a8"])
def test_lower_precision_decode_weights_stay_close_to_fp32(tok, dtype):
    from model import DecodeLinear, GPTConfig, build_gpt, set_decode_dtype
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=128, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2, n_embd=128)
    model = build_gpt(config, "cpu").eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape) * p.shape[1] ** -0.5)
    ids = torch.tensor([prompts_of(tok)[2]])
    with torch.inference_mode():
        reference = model(ids)
        assert set_decode_dtype(model, dtype) == dtype
        quantized = model(ids)
    assert isinstance(model.lm_head, DecodeLinear) and quantized.shape == reference.shape
    # relative logit error of a few percent at most (int8: 1/254 of each channel's largest weight per weight)
    assert (quantized - reference).norm() / reference.norm() < 0.05
    assert (quantized.argmax(-1) == reference.argmax(-1)).float().mean() > 0.9
    with pytest.raises(ValueError, match="int8"):
        set_decode_dtype(build_gpt(GPTConfig(sequence_len=32, vocab_size=64, n_layer=1, n_head=1, n_kv_head=1,
                                             n_embd=96), "cpu"), "int8")


@pytest.mark.parametrize("dtype", ["int8", "int8a8"])
def test_quantized_rows_decoded_together_get_the_tokens_they_get_alone(tok, dtype):
    engine = Engine(make_model(tok.get_vocab_size(), sequence_len=512), tok, decode_dtype=dtype)
    assert engine.decode_dtype == dtype
    requests = [(p, n, s) for p, n, s in zip(prompts_of(tok), (20, 12, 25, 16), SETTINGS)]
    expected = [alone(engine, *r) for r in requests]
    assert run_batch(DecodeBatch(engine, max_rows=4, seq_len=512), requests, joins=[0, 1, 1, 4]) == expected


@pytest.mark.parametrize("dtype", ["fp32", "int8a8"])
def test_compiled_decode_steps_give_the_eager_tokens_without_recompiling(tok, dtype):
    """GPT.compile_decode: after DecodeBatch.warm_up (what serve.py runs at start), requests joining at different
    steps (rows at different positions, 1 to 4 rows, rows leaving) get the tokens the eager engine gives each
    alone, and no position or batch size compiles again. Engine.generate's one-row cache may take one more graph
    (torch.compile specializes sizes of 1)."""
    import torch._dynamo
    eager = Engine(make_model(tok.get_vocab_size(), sequence_len=512), tok, decode_dtype=dtype)
    compiled = Engine(make_model(tok.get_vocab_size(), sequence_len=512), tok, decode_dtype=dtype, compile=True)
    requests = [(p, n, s) for p, n, s in zip(prompts_of(tok), (20, 12, 25, 16), SETTINGS)]
    expected = [alone(eager, *r) for r in requests]
    torch._dynamo.reset()
    batch = DecodeBatch(compiled, max_rows=4, seq_len=512)
    batch.warm_up()
    assert batch.rows == [] and compiled.model.compiled_decode is not None
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert run_batch(batch, requests, joins=[0, 1, 1, 4]) == expected
    assert compiled.model.compiled_decode is not None  # a recompile would have failed it over to eager decoding
    with torch._dynamo.config.patch(recompile_limit=3, fail_on_recompile_limit_hit=True):
        assert alone(compiled, *requests[1]) == expected[1]
    assert compiled.model.compiled_decode is not None


def test_a_failing_compile_falls_back_to_eager_decoding(tok):
    """Where torch.compile cannot work (no C++ compiler), decoding warns once and goes on eagerly, same tokens."""
    eager = Engine(make_model(tok.get_vocab_size()), tok)
    broken = Engine(make_model(tok.get_vocab_size()), tok)

    def no_compiler(*args):
        raise RuntimeError("no working C++ compiler found")
    broken.model.compiled_decode = no_compiler
    prompt = prompts_of(tok)[1]
    with pytest.warns(UserWarning, match="compiled decoding failed.*no working C"):
        got = alone(broken, prompt, 10, SETTINGS[1])
    assert broken.model.compiled_decode is None and got == alone(eager, prompt, 10, SETTINGS[1])


class CountingTokens(torch.nn.Module):
    """The model, recording how many positions each forward with a KV cache computes."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.computed = model, model.config, []
        self.get_device, self.new_kv_cache = model.get_device, model.new_kv_cache

    def forward(self, idx, kv_cache=None):
        self.computed.append(idx.size(1))
        return self.model(idx, kv_cache=kv_cache)


def test_the_next_turn_of_a_conversation_prefills_only_what_is_new(tok):
    """Engine(prefix_tokens=N), as serve.py runs it: a prompt that extends a stored one (the conversation's last
    prompt, then its reply and a new message) copies the stored keys and values and computes only the rest, with
    the logits and cache of a full prefill; stored prompts beyond N positions in all go, least recently used first."""
    model = make_model(tok.get_vocab_size(), sequence_len=512)
    counting = CountingTokens(model)
    first = prompts_of(tok)[2]
    second = first + tok.encode(" a reply, then the next question?")
    plain, cached = Engine(model, tok), Engine(counting, tok, prefix_tokens=len(first) + len(second))
    with torch.inference_mode():
        cached.prefill(first)
        logits, cache = cached.prefill(second)
        assert counting.computed == [len(first), len(second) - len(first)]
        expected_logits, expected_cache = plain.prefill(second)
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cache.k_cache, expected_cache.k_cache, atol=1e-5, rtol=1e-5)
    assert cache.lengths == [len(second)] and cache.prev_embedding is not None
    assert list(cached.prefixes) == [tuple(first), tuple(second)]
    third = prompts_of(tok)[1]
    with torch.inference_mode():
        cached.prefill(third)  # no room for all three: the least recently used goes
    assert list(cached.prefixes) == [tuple(second), tuple(third)]
    with torch.inference_mode():
        cached.prefill(second + [5] * (len(first) + len(second)))  # longer than the whole cache: not stored
    assert list(cached.prefixes) == [tuple(third), tuple(second)]  # the prefix it used is now the most recent
    assert alone(cached, second, 12, SETTINGS[1]) == alone(plain, second, 12, SETTINGS[1])
