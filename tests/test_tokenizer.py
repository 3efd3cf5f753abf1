"""Tokenizer: training, save/load, encode/decode, conversation rendering and masks, train_tokenizer.py."""
import os
import pickle
import random
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import rustbpe
import torch

import common
from common import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

VOCAB = 600


@pytest.fixture(scope="module")
def corpus():
    # varied text so merges cover letters, digits, whitespace runs and multi-byte characters
    base = ["The quick brown fox jumps over the lazy dog. " * 3, "def f(x):\n    return x ** 2  # square\n",
            "Numbers 0123456789 and 3.14159 and 2026-11-25.", "Ünïcödé café naïve — 東京 서울 Москва 🙂🎉",
            "tabs\tand    spaces\n\n\nnewlines", "She'll say they've gone, we're done, I'd say it's fine."]
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyzéü東京서울"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 8))) for _ in range(3000)]
    return [f"{t} {i} " + " ".join(words[i * 50:(i + 1) * 50]) for i in range(60) for t in base]


@pytest.fixture(scope="module")
def tok(corpus):
    return Tokenizer.train(iter(corpus), VOCAB)


@pytest.mark.parametrize("text", [
    "Hello, world!", "👋🏽 emoji 🎉 family 👨‍👩‍👧", "中文字符和日本語のテキスト、한국어", "   \t\t  \n\n\n   x  \r\n",
    "0 12 345 6789 1234567890", "", "<|bos|> literal specials <|assistant_end|>", "\x00\x01 bytes \ufffd"])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_order_and_ids(tok):
    assert tok.get_vocab_size() == VOCAB
    num_ranks = VOCAB - len(SPECIAL_TOKENS)
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(num_ranks, VOCAB))
    assert tok.get_bos_token_id() == num_ranks
    assert SPECIAL_TOKENS[0] == "<|bos|>" and SPECIAL_TOKENS[-1] == "<|output_end|>"
    assert tok.id_to_token(VOCAB - 1) == "<|output_end|>"
    # special strings inside text are plain text: they never produce a special id
    assert not set(tok.encode("<|bos|><|user_start|>")) & set(range(num_ranks, VOCAB))


def test_digits_split_in_pairs(tok):
    pieces = [tok.id_to_token(i) for i in tok.encode("1234567")]
    assert all(len(p) <= 2 for p in pieces)


def test_encode_batch_prepend_append(tok):
    texts = ["a b c", "ünï", ""]
    rows = tok.encode(texts, prepend="<|bos|>", append=tok.encode_special("<|user_end|>"), num_threads=2)
    bos, end = tok.get_bos_token_id(), tok.encode_special("<|user_end|>")
    assert rows == [[bos] + tok.encode(t) + [end] for t in texts]


def test_matches_direct_rustbpe(corpus, tok):
    direct = rustbpe.Tokenizer()
    direct.train_from_iterator(iter(corpus), VOCAB - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    assert {bytes(k): v for k, v in direct.get_mergeable_ranks()} == tok.enc._mergeable_ranks
    sample = "The quick 東京 fox 12345"
    assert direct.encode(sample) == tok.encode(sample)


def test_too_small_vocab():
    with pytest.raises(common.NanochatError, match="too small"):
        Tokenizer.train(iter(["abc"]), 200)


def test_save_load_and_token_bytes(tok, base_dir):
    tok_dir = os.path.join(common.get_base_dir(), "tokenizer")
    tok.save(tok_dir)
    assert not [f for f in os.listdir(tok_dir) if ".tmp" in f]
    loaded = common.get_tokenizer()
    assert loaded.enc._mergeable_ranks == tok.enc._mergeable_ranks
    assert [loaded.encode_special(s) for s in SPECIAL_TOKENS] == [tok.encode_special(s) for s in SPECIAL_TOKENS]
    token_bytes = common.get_token_bytes("cpu")
    assert token_bytes.dtype == torch.long and token_bytes.shape == (VOCAB,)
    assert token_bytes[tok.get_bos_token_id():].sum() == 0
    text = "bytes per token, ünï 🙂"
    assert sum(token_bytes[i].item() for i in tok.encode(text)) == len(text.encode("utf-8"))


def test_load_reference_pickle(tok, tmp_path):
    with open(tmp_path / "tokenizer.pkl", "wb") as f:
        pickle.dump(tok.enc, f)  # the reference's format: a pickled tiktoken.Encoding
    loaded = Tokenizer.load(str(tmp_path))
    assert loaded.encode("héllo 12") == tok.encode("héllo 12")
    assert loaded.get_bos_token_id() == tok.get_bos_token_id()


def test_missing_tokenizer_names_the_script(base_dir):
    with pytest.raises(common.NanochatError, match="train_tokenizer.py"):
        common.get_tokenizer()


def spans(tok, ids, mask):
    """[(token string, mask)] for readable assertions."""
    return [(tok.id_to_token(i), m) for i, m in zip(ids, mask)]


def test_render_masks_every_part_type(tok):
    conv = {"messages": [
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute."},
            {"type": "python", "text": "2+3"},
            {"type": "python_output", "text": "5"},
            {"type": "text", "text": "It is 5."}]},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."}]}
    ids, mask = tok.render_conversation(conv)
    sp = tok.encode_special
    expected = [(sp("<|bos|>"), 0), (sp("<|user_start|>"), 0)] + [(i, 0) for i in tok.encode("What is 2+3?")] \
        + [(sp("<|user_end|>"), 0), (sp("<|assistant_start|>"), 0)] + [(i, 1) for i in tok.encode("Let me compute.")] \
        + [(sp("<|python_start|>"), 1)] + [(i, 1) for i in tok.encode("2+3")] + [(sp("<|python_end|>"), 1)] \
        + [(sp("<|output_start|>"), 0)] + [(i, 0) for i in tok.encode("5")] + [(sp("<|output_end|>"), 0)] \
        + [(i, 1) for i in tok.encode("It is 5.")] + [(sp("<|assistant_end|>"), 1)] \
        + [(sp("<|user_start|>"), 0)] + [(i, 0) for i in tok.encode("Thanks")] + [(sp("<|user_end|>"), 0)] \
        + [(sp("<|assistant_start|>"), 0)] + [(i, 1) for i in tok.encode("You're welcome.")] + [(sp("<|assistant_end|>"), 1)]
    assert list(zip(ids, mask)) == expected


def test_system_merged_into_first_user(tok):
    conv = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello"}]}
    ids, mask = tok.render_conversation(conv)
    merged = {"messages": [{"role": "user", "content": "Be brief.\n\nHi"}, {"role": "assistant", "content": "Hello"}]}
    assert (ids, mask) == tok.render_conversation(merged)
    assert conv["messages"][1]["content"] == "Hi"  # the caller's conversation is untouched


@pytest.mark.parametrize("messages", [
    [{"role": "assistant", "content": "x"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "?"}]}],
    [{"role": "user", "content": ["not", "a", "string"]}]])
def test_render_rejects_bad_conversations(tok, messages):
    with pytest.raises(ValueError):
        tok.render_conversation({"messages": messages})


def test_truncation(tok):
    conv = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok " * 200}]}
    full_ids, full_mask = tok.render_conversation(conv, max_tokens=10**6)
    ids, mask = tok.render_conversation(conv, max_tokens=50)
    assert len(full_ids) > 50 and (ids, mask) == (full_ids[:50], full_mask[:50])


def test_render_for_completion(tok):
    conv = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    prompt = tok.render_for_completion(conv)
    ids, _ = tok.render_conversation(conv)
    start = tok.encode_special("<|assistant_start|>")
    assert prompt[-1] == start and prompt == ids[:ids.index(start) + 1]
    assert len(conv["messages"]) == 2
    with pytest.raises(ValueError):
        tok.render_for_completion({"messages": conv["messages"][:1]})


def test_train_tokenizer_script(shared_data, base_dir, tmp_path):
    env = {**os.environ, "NANOCHAT_MIRROR": str(shared_data)}
    out = subprocess.run([sys.executable, "train_tokenizer.py", "--vocab-size", "512", "--max-chars", "2000000"],
                         cwd=os.path.dirname(os.path.dirname(__file__)), env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "trained vocab 512" in out.stdout and "val-shard" in out.stdout
    loaded = common.get_tokenizer()
    assert loaded.get_vocab_size() == 512
    # training stopped near --max-chars: only the first train shard (plus the validation shard) was fetched
    assert os.path.exists(os.path.join(base_dir, "base_data_climbmix", "shard_00000.parquet"))
    assert not os.path.exists(os.path.join(base_dir, "base_data_climbmix", "shard_00001.parquet"))


def test_train_tokenizer_without_network_fails_cleanly(base_dir):
    env = {k: v for k, v in os.environ.items() if k != "NANOCHAT_MIRROR"}
    env.update(NANOCHAT_DOWNLOAD_BACKOFF="0", HTTPS_PROXY="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    out = subprocess.run([sys.executable, "train_tokenizer.py", "--vocab-size", "512"],
                         cwd=os.path.dirname(os.path.dirname(__file__)), env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr and "NANOCHAT_MIRROR" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
