"""The BOS-aligned best-fit loader: packing (the reference's choices), rank striding, exact resume, bits per byte."""
import itertools
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from common import NanochatError, Tokenizer, bestfit_batches, evaluate_bpb, iter_doc_batches, pack_batches
from model import GPTConfig, build_gpt


@pytest.fixture(scope="module")
def byte_tokenizer():
    """256 byte tokens and the specials, no merges: a document of n ASCII characters is n tokens (+ BOS)."""
    return Tokenizer.train(iter(["abc"]), 256 + 9)


def write_shard(path, texts, row_group_size):
    pq.write_table(pa.table({"text": texts}), path, row_group_size=row_group_size)
    return str(path)


def test_best_fit_rows_hand_computed(tmp_path, byte_tokenizer):
    # documents of 5,3,8,2,6,1 characters -> 6,4,9,3,7,2 tokens with BOS; rows hold T+1 = 10 tokens
    texts = [chr(ord("a") + i) * n for i, n in enumerate([5, 3, 8, 2, 6, 1])]
    files = [write_shard(tmp_path / "s0.parquet", texts, 64)]
    rows, state = next(pack_batches(byte_tokenizer, 2, 9, files, 0, 1, buffer_size=4))
    doc = [byte_tokenizer.encode(t, prepend=byte_tokenizer.get_bos_token_id()) for t in texts]
    # row 0: the largest that fits is the 9-token doc; 1 slot left, nothing fits -> crop the shortest (2 tokens)
    assert rows[0].tolist() == doc[2] + doc[5][:1]
    # row 1: 7 tokens fit, then exactly the 3-token doc
    assert rows[1].tolist() == doc[4] + doc[3]
    assert state == {"next": [1, 0, 0, 0], "buffer": []}  # the first batch starts from nothing


def reference_rows(docs, B, T, buffer_size, batch_docs=128):
    """The reference's packer, written as literally as it reads: before each pick a list buffer is refilled,
    a batch of documents at a time, to at least buffer_size; the longest document that fits under a strict >,
    else the shortest (min) cropped. The documents repeat epoch after epoch."""
    source, buffer, rows = itertools.cycle(docs), [], []
    for _ in range(B):
        row = []
        while len(row) < T + 1:
            while len(buffer) < buffer_size:
                buffer += [next(source) for _ in range(batch_docs)]
            space, best, best_len = T + 1 - len(row), -1, 0
            for i, doc in enumerate(buffer):
                if len(doc) <= space and len(doc) > best_len:
                    best, best_len = i, len(doc)
            if best >= 0:
                row += buffer.pop(best)
            else:
                shortest = min(range(len(buffer)), key=lambda i: len(buffer[i]))
                row += buffer.pop(shortest)[:space]
        rows.append(row)
    return rows


def test_ties_take_the_first_document_like_the_reference(tmp_path, byte_tokenizer):
    # 4,4,4,3,3 tokens, rows of 9: the first two 4-token documents, then the first 3-token one cropped to BOS
    texts = ["aaa", "bbb", "ccc", "dd", "ee"]
    files = [write_shard(tmp_path / "s0.parquet", texts, 64)]
    bos = byte_tokenizer.get_bos_token_id()
    rows, _ = next(pack_batches(byte_tokenizer, 1, 8, files, 0, 1, buffer_size=5))
    assert byte_tokenizer.decode(rows[0].tolist()) == "<|bos|>aaa<|bos|>bbb<|bos|>"
    # many documents of few distinct lengths (many ties), a small buffer: every batch equals the reference's
    texts = [chr(ord("a") + i % 26) * (1 + (7 * i) % 9) for i in range(60)]
    files = [write_shard(tmp_path / "s1.parquet", texts, 20)]  # row groups of 20 = batches of 20 documents
    docs = [[bos] + list(t.encode()) for t in texts]  # byte tokens: ids are the bytes
    ours = next(pack_batches(byte_tokenizer, 40, 15, files, 0, 1, buffer_size=30))[0].tolist()
    assert ours == reference_rows(docs, 40, 15, 30, batch_docs=20)


def test_rows_start_with_bos_and_targets_shift(tmp_path, byte_tokenizer):
    texts = [chr(ord("a") + i % 26) * (1 + (7 * i) % 23) for i in range(100)]
    files = [write_shard(tmp_path / "s0.parquet", texts, 16)]
    loader = bestfit_batches(byte_tokenizer, 4, 16, "train", files=files, buffer_size=10)
    bos = byte_tokenizer.get_bos_token_id()
    for _ in range(20):
        x, y, _ = next(loader)
        assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
        assert (x[:, 0] == bos).all()
        assert (x[:, 1:] == y[:, :-1]).all()
    loader.close()


def test_keep_rest_puts_every_token_of_every_document_in_exactly_one_row(tmp_path, byte_tokenizer):
    # 90 documents, each one distinct character repeated 1..70 times, many longer than a row of T+1 = 17;
    # one row group and buffer_size 1: the buffer takes all 90 at once and refills only when it is empty,
    # so the first `total` tokens of the rows are exactly the documents' tokens
    texts = [chr(33 + i) * (1 + (37 * i) % 70) for i in range(90)]
    files = [write_shard(tmp_path / "s0.parquet", texts, 90)]
    total = sum(len(t) + 1 for t in texts)  # + BOS
    bos = byte_tokenizer.get_bos_token_id()
    for keep_rest in (True, False):
        batches = pack_batches(byte_tokenizer, 5, 16, files, 0, 1, buffer_size=1, keep_rest=keep_rest)
        tokens = []
        while len(tokens) < total:
            rows, state = next(batches)
            tokens += rows.flatten().tolist()
        first_pass = tokens[:total]
        counts = {t: first_pass.count(ord(t[0])) for t in texts}
        if keep_rest:
            assert first_pass.count(bos) == len(texts)  # one BOS per document: the rest of a crop has none
            assert all(counts[t] == len(t) for t in texts)
            assert len(tokens) == total or tokens[total] == bos  # then the second epoch starts afresh
        else:  # the reference's crop throws tokens away: the first pass holds documents of the next epoch
            assert sum(counts.values()) < sum(len(t) for t in texts)


@pytest.mark.parametrize("keep_rest", [False, True])
def test_resume_reproduces_the_next_batches_exactly(tmp_path, byte_tokenizer, keep_rest):
    # two files with several row groups, small buffer: the run crosses row groups, files and epochs
    texts = [chr(ord("a") + i % 26) * (1 + (11 * i) % 29) for i in range(120)]
    files = [write_shard(tmp_path / "s0.parquet", texts[:60], 8), write_shard(tmp_path / "s1.parquet", texts[60:], 8)]
    loader = bestfit_batches(byte_tokenizer, 3, 16, "train", files=files, rank=1, world_size=2, buffer_size=12,
                             keep_rest=keep_rest)
    batches = [next(loader) for _ in range(60 if not keep_rest else 100)]
    loader.close()
    assert batches[-1][2]["next"][0] >= 2, "the test should cross an epoch boundary"
    if keep_rest:
        assert any(len(key) == 4 for _, _, state in batches for key in state["buffer"]), "rests in the state"
    for k in (1, 7, 23, 41):
        resumed = bestfit_batches(byte_tokenizer, 3, 16, "train", files=files, rank=1, world_size=2,
                                  buffer_size=12, state=batches[k][2], keep_rest=keep_rest)
        for x, y, state in batches[k:k + 15]:
            rx, ry, rstate = next(resumed)
            assert torch.equal(rx, x) and torch.equal(ry, y) and rstate == state
        resumed.close()


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_stride_row_groups_of_each_file(tmp_path, world_size):
    # 2 files of 3 row groups: rank r reads row groups r, r+W, ... of each file, as in the reference
    files = [write_shard(tmp_path / f"s{i}.parquet", [f"{i}-{j}" for j in range(30)], 10) for i in range(2)]
    seen = []
    for rank in range(world_size):
        first_epoch = []
        for (epoch, pq_idx, rg_idx, offset), texts in iter_doc_batches(files, rank, world_size, batch_docs=4):
            if epoch > 1:
                break
            assert rg_idx % world_size == rank
            first_epoch += texts
        seen.append(first_epoch)
    everything = [t for rank_texts in seen for t in rank_texts]
    assert sorted(everything) == sorted(f"{i}-{j}" for i in range(2) for j in range(30))  # each doc exactly once


def test_rank_without_row_groups_is_an_error(tmp_path, byte_tokenizer):
    files = [write_shard(tmp_path / "s0.parquet", ["abc"] * 10, 10)]  # one row group, two ranks
    loader = bestfit_batches(byte_tokenizer, 1, 8, "train", files=files, rank=1, world_size=2)
    with pytest.raises(NanochatError, match="fewer GPUs"):
        next(loader)


def test_real_shards(shared_data, byte_tokenizer):
    files = sorted(str(p) for p in (shared_data / "pretrain").glob("*.parquet"))[:2]
    loader = bestfit_batches(byte_tokenizer, 2, 256, "train", files=files, buffer_size=50)
    x, y, state = next(loader)
    text = byte_tokenizer.decode(x[0].tolist())
    assert text.startswith("<|bos|>") and len(state["buffer"]) == 0
    x, y, state = next(loader)
    assert len(state["buffer"]) >= 50 - 8  # buffered document positions travel with the batch
    loader.close()


def test_bpb_hand_computed():
    """A model with a zero lm_head predicts uniformly: every token costs ln(V) nats. With target byte
    lengths 1, 2, 3 and a special token (0 bytes, not counted) and an ignored -1: 3 ln 4 / (6 ln 2) = 1."""
    model = build_gpt(GPTConfig(sequence_len=8, vocab_size=4, n_layer=1, n_head=1, n_kv_head=1, n_embd=32), "cpu")
    torch.nn.init.zeros_(model.lm_head.weight)
    token_bytes = torch.tensor([1, 2, 3, 0])
    x = torch.tensor([[0, 1, 2, 3, 0]])
    y = torch.tensor([[0, 1, 2, 3, -1]])
    batches = iter([(x, y, None), (x, y, None)])
    bpb = evaluate_bpb(model, batches, 2, token_bytes)
    assert bpb == pytest.approx(2 * 3 * math.log(4) / (math.log(2) * 12), rel=1e-6)
    assert bpb == pytest.approx(1.0, rel=1e-6)
