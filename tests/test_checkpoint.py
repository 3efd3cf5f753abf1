"""Checkpoints: round trip, crash safety, latest-written default, clear errors, the reference's layout."""
import json
import os

import pytest
import torch

import common
from model import GPTConfig, build_gpt

VOCAB = 300
CONFIG = dict(sequence_len=32, vocab_size=VOCAB, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, window_pattern="SL")


@pytest.fixture
def tokenizer(base_dir):
    text = [f"checkpoint {i} tests {i * 7} with some words and more words" for i in range(300)]
    tok = common.Tokenizer.train(iter(text), VOCAB)
    assert tok.get_vocab_size() == VOCAB
    tok.save(os.path.join(common.get_base_dir(), "tokenizer"))
    return tok


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return build_gpt(GPTConfig(**{**CONFIG, **overrides}), "cpu")


def trained_model_and_optimizer():
    model = tiny_model()
    optimizer = model.setup_optimizer()
    idx = torch.randint(0, VOCAB, (2, 16))
    model(idx, targets=idx).backward()
    optimizer.step()
    return model, optimizer


def meta_for(step, **config_overrides):
    return {"step": step, "val_bpb": 1.5, "model_config": {**CONFIG, **config_overrides}, "user_config": {"depth": 2}}


def test_round_trip_model_optimizer_meta(tokenizer):
    model, optimizer = trained_model_and_optimizer()
    ckpt = common.checkpoint_dir("base", "d2")
    meta = meta_for(7)
    for rank in (0, 1):
        common.save_checkpoint(ckpt, 7, model.state_dict(), optimizer.state_dict(), meta, rank=rank)
    assert sorted(os.listdir(ckpt)) == ["meta_000007.json", "model_000007.pt", "optim_000007_rank0.pt", "optim_000007_rank1.pt"]
    model_state, optim_state, loaded_meta = common.load_checkpoint(ckpt, 7, "cpu", load_optimizer=True, rank=1)
    assert loaded_meta == meta
    assert all(torch.equal(model_state[k], v) for k, v in model.state_dict().items())
    fresh = tiny_model(seed=1).setup_optimizer()
    fresh.load_state_dict(optim_state)
    saved, restored = optimizer.state_dict(), fresh.state_dict()
    assert saved["state"].keys() == restored["state"].keys()
    for k in saved["state"]:
        for name, value in saved["state"][k].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(restored["state"][k][name]))
    loaded, tok, meta2 = common.load_model("base", "cpu", phase="train")
    assert loaded.training and meta2["step"] == 7 and tok.get_vocab_size() == VOCAB
    idx = torch.randint(0, VOCAB, (1, 12))
    assert torch.equal(loaded(idx), model(idx))


def test_optimizer_shard_missing_is_none(tokenizer):
    model = tiny_model()
    ckpt = common.checkpoint_dir("sft", "d2")
    common.save_checkpoint(ckpt, 1, model.state_dict(), None, meta_for(1))
    _, optim_state, _ = common.load_checkpoint(ckpt, 1, "cpu", load_optimizer=True, rank=3)
    assert optim_state is None


def test_interrupted_writes_keep_previous_checkpoint(tokenizer, monkeypatch):
    model = tiny_model()
    ckpt = common.checkpoint_dir("base", "d2")
    common.save_checkpoint(ckpt, 1, model.state_dict(), None, meta_for(1))
    real_save = torch.save

    def crash_half_way(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)  # the process dies with half the bytes on disk
        raise KeyboardInterrupt

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(torch, "save", crash_half_way)
        common.save_checkpoint(ckpt, 2, tiny_model(seed=5).state_dict(), None, meta_for(2))

    def crash_writing_meta(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as m, pytest.raises(OSError):  # model written, meta not: step 3 is no checkpoint
        m.setattr(json, "dump", crash_writing_meta)
        common.save_checkpoint(ckpt, 3, tiny_model(seed=6).state_dict(), None, meta_for(3))
    assert sorted(os.listdir(ckpt)) == ["meta_000001.json", "model_000001.pt", "model_000003.pt"]
    assert common.find_last_step(ckpt) == 1
    loaded, _, meta = common.load_model("base", "cpu")
    assert meta["step"] == 1
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_default_is_most_recently_written(tokenizer):
    model = tiny_model()
    old = common.checkpoint_dir("base", "d4")
    common.save_checkpoint(old, 100, model.state_dict(), None, meta_for(100))
    new = common.checkpoint_dir("base", "d2")
    common.save_checkpoint(new, 30, model.state_dict(), None, meta_for(30))
    common.save_checkpoint(new, 10, model.state_dict(), None, meta_for(10))  # a restarted run, fewer steps
    for path, t in ((f"{old}/meta_000100.json", 1000), (f"{new}/meta_000030.json", 2000), (f"{new}/meta_000010.json", 3000)):
        os.utime(path, (t, t))
    _, _, meta = common.load_model("base", "cpu")
    assert meta["step"] == 10  # not d4 (largest depth) and not step 30 (largest step)
    _, _, meta = common.load_model("base", "cpu", model_tag="d4")
    assert meta["step"] == 100
    _, _, meta = common.load_model("base", "cpu", model_tag="d2", step=30)
    assert meta["step"] == 30


def test_clear_errors(tokenizer):
    with pytest.raises(common.NanochatError, match="pretrain.py"):
        common.load_model("base", "cpu")
    with pytest.raises(common.NanochatError, match="does not exist"):
        common.load_checkpoint(os.path.join(common.get_base_dir(), "nowhere"), 1, "cpu")
    with pytest.raises(common.NanochatError, match="no checkpoints in"):
        common.find_last_tag(os.path.join(common.get_base_dir(), "nowhere"))
    ckpt = common.checkpoint_dir("base", "d2")
    common.save_checkpoint(ckpt, 1, tiny_model().state_dict(), None, meta_for(1))
    with pytest.raises(common.NanochatError, match="no checkpoint"):
        common.load_model("base", "cpu", step=None, model_tag="d9")
    model_path = os.path.join(ckpt, "model_000001.pt")
    with open(model_path, "r+b") as f:
        f.truncate(os.path.getsize(model_path) // 2)
    with pytest.raises(common.NanochatError, match="truncated or corrupt"):
        common.load_model("base", "cpu")
    common.save_checkpoint(ckpt, 2, tiny_model(vocab_size=320).state_dict(), None, meta_for(2, vocab_size=320))
    with pytest.raises(common.NanochatError, match="tokenizer vocab 300 != checkpoint vocab 320"):
        common.load_model("base", "cpu")


def test_reference_layout_loads_with_same_logits(tokenizer):
    """A checkpoint as the reference writes it: compiled-model key prefixes, bf16 embeddings,
    the reference's meta fields and an old config without window_pattern (meaning all-long windows)."""
    model = tiny_model(window_pattern="L")
    with torch.no_grad():  # the reference keeps embeddings in bf16: make ours hold bf16-representable values
        for name, p in model.named_parameters():
            if "wte" in name or "value_embeds" in name:
                p.copy_(p.to(torch.bfloat16).float())
    state = {"_orig_mod." + k: (v.to(torch.bfloat16) if ("wte" in k or "value_embeds" in k) else v)
             for k, v in model.state_dict().items()}
    assert "_orig_mod.transformer.h.0.attn.c_q.weight" in state and "_orig_mod.lm_head.weight" in state
    config = {k: v for k, v in CONFIG.items() if k != "window_pattern"}
    meta = {"step": 500, "val_bpb": 0.91, "model_config": config,
            "user_config": {"run": "dummy", "depth": 2, "aspect_ratio": 32}, "device_batch_size": 2,
            "max_seq_len": 32, "total_batch_size": 64, "dataloader_state_dict": {"pq_idx": 0, "rg_idx": 3, "epoch": 1},
            "loop_state": {"min_val_bpb": 0.91, "smooth_train_loss": 3.2, "total_training_time": 12.5}}
    ckpt = os.path.join(common.get_base_dir(), "base_checkpoints", "d2")
    os.makedirs(ckpt)
    torch.save(state, os.path.join(ckpt, "model_000500.pt"))
    with open(os.path.join(ckpt, "meta_000500.json"), "w") as f:
        json.dump(meta, f)
    loaded, _, loaded_meta = common.load_model("base", "cpu")
    assert loaded.config.window_pattern == "L" and loaded_meta["loop_state"]["total_training_time"] == 12.5
    assert loaded.transformer.wte.weight.dtype == model.transformer.wte.weight.dtype
    idx = torch.randint(0, VOCAB, (2, 20))
    assert torch.equal(loaded(idx), model(idx))


RANK_SCRIPT = """
import sys, torch, common
ddp, rank, local_rank, world_size, device = common.compute_init("cpu")
assert ddp and world_size == 2 and local_rank == rank and torch.distributed.get_backend() == "gloo", (ddp, world_size)
state = {"w": torch.full((3,), float(rank))}
common.save_checkpoint(sys.argv[1], 4, {"w": torch.ones(3)}, {"rank": rank, "state": state}, {"step": 4}, rank=rank)
common.compute_cleanup()
assert not torch.distributed.is_initialized()
"""


def test_two_gloo_ranks_write_their_optimizer_shards(tmp_path):
    """The torchrun environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_*) -> a gloo group on CPU; each rank
    writes its own shard; the meta appears once all shards are on disk; teardown leaves no group."""
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(tmp_path)], cwd=root,
                              env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": root},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    for rank in range(2):
        _, optim_state, meta = common.load_checkpoint(str(tmp_path), 4, "cpu", load_optimizer=True, rank=rank)
        assert optim_state["rank"] == rank and torch.equal(optim_state["state"]["w"], torch.full((3,), float(rank)))
    assert meta == {"step": 4}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_on_cuda_keeps_model_dtypes(tokenizer):
    """A CPU-written checkpoint loads on the GPU with the dtypes the model uses there (bf16 embeddings on
    cc >= 8.0), holding the saved values rounded to those dtypes."""
    model = tiny_model()
    common.save_checkpoint(common.checkpoint_dir("base", "d2"), 1, model.state_dict(), None, meta_for(1))
    loaded, _, _ = common.load_model("base", "cuda")
    assert {k: v.dtype for k, v in loaded.state_dict().items()} == {k: v.dtype for k, v in build_gpt(GPTConfig(**CONFIG), "cuda").state_dict().items()}
    for k, v in loaded.state_dict().items():
        assert torch.equal(v.cpu(), model.state_dict()[k].to(v.dtype)), k
    assert torch.isfinite(loaded(torch.randint(0, VOCAB, (1, 12), device="cuda"))).all()
