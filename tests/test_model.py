"""Tests of model.py: architecture, sizes, attention paths, KV cache, loss, optimizer, standalone use, errors.
The distributed (torchrun) test is in test_model_ddp.py."""
import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import model
from model import GPT, GPTConfig, KVCache, MuonAdamW, attention, build_gpt, config_for_depth

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


def tiny_config(**kw):
    cfg = dict(sequence_len=256, vocab_size=100, n_layer=3, n_head=4, n_kv_head=2, n_embd=32, window_pattern="SL")
    cfg.update(kw)
    return GPTConfig(**cfg)


def randomized_model(config, seed=0):
    """A model whose every parameter is random and non-zero, so that each path (smear, backout, value
    embeddings, zero-initialized projections) actually changes the output."""
    torch.manual_seed(seed)
    gpt = build_gpt(config, torch.device("cpu"))
    with torch.no_grad():
        for p in gpt.parameters():
            p.uniform_(-0.5, 0.5)
    return gpt.eval()


# ---- architecture ----------------------------------------------------------------------------------------------

def test_state_dict_keys_match_reference_names():
    gpt = build_gpt(tiny_config(n_layer=4), torch.device("cpu"))
    expected = {"transformer.wte.weight", "lm_head.weight", "resid_lambdas", "x0_lambdas", "smear_gate.weight",
                "smear_lambda", "backout_lambda"}
    for i in range(4):
        expected |= {f"transformer.h.{i}.attn.{n}.weight" for n in ("c_q", "c_k", "c_v", "c_proj")}
        expected |= {f"transformer.h.{i}.mlp.{n}.weight" for n in ("c_fc", "c_proj")}
    for i in (1, 3):  # alternating value embeddings, always including the last layer
        expected |= {f"value_embeds.{i}.weight", f"transformer.h.{i}.attn.ve_gate.weight"}
    assert set(gpt.state_dict()) == expected
    assert gpt.transformer.wte.weight.shape == (128, 32)  # vocab 100 padded to a multiple of 64
    assert gpt.lm_head.weight.shape == (128, 32)
    assert gpt.value_embeds["1"].weight.shape == (128, 16)  # n_kv_head * head_dim
    assert gpt.transformer.h[1].attn.ve_gate.weight.shape == (2, 12)
    assert gpt.smear_gate.weight.shape == (1, 24)
    logits = gpt(torch.randint(0, 100, (2, 5)))
    assert logits.shape == (2, 5, 100) and logits.dtype == torch.float32
    assert logits.abs().max() <= 15.0  # softcap


def test_init_table():
    torch.manual_seed(42)
    L, D = 5, 64
    gpt = build_gpt(GPTConfig(sequence_len=64, vocab_size=512, n_layer=L, n_head=2, n_kv_head=2, n_embd=D),
                    torch.device("cpu"))
    s = 3 ** 0.5 * D ** -0.5
    assert abs(gpt.transformer.wte.weight.std().item() - 0.8) < 0.03
    assert abs(gpt.lm_head.weight.std().item() - 0.001) < 1e-4
    block = gpt.transformer.h[0]
    assert block.attn.c_q.weight.abs().max() <= s and block.attn.c_q.weight.abs().max() > 0.9 * s
    assert block.mlp.c_fc.weight.abs().max() <= 0.4 * s
    assert block.attn.c_proj.weight.eq(0).all() and block.mlp.c_proj.weight.eq(0).all()
    gate = gpt.transformer.h[0].attn.ve_gate.weight  # layer 0 has a value embedding when L is odd
    assert gate.min() >= 0 and gate.max() <= 0.02
    assert gpt.smear_lambda.item() == 0 and gpt.backout_lambda.item() == pytest.approx(0.2)
    torch.testing.assert_close(gpt.resid_lambdas, torch.linspace(1.15, 1.05, L))
    torch.testing.assert_close(gpt.x0_lambdas, torch.linspace(0.20, 0.05, L))
    assert all(not t.is_meta for t in [*gpt.parameters(), gpt.cos, gpt.sin])


def test_window_sizes_pattern_tiles_and_last_layer_is_long():
    gpt = build_gpt(tiny_config(n_layer=6, window_pattern="sssl", sequence_len=2048), torch.device("cpu"))
    assert gpt.window_sizes == [512, 512, 512, 2048, 512, 2048]
    gpt = build_gpt(tiny_config(n_layer=3, window_pattern="S", sequence_len=512), torch.device("cpu"))
    assert gpt.window_sizes == [128, 128, 512]


@pytest.mark.parametrize("depth, total, scaling, flops", [
    (12, 286_261_730, 110_100_912, 7.597e8),
    (24, 1_384_122_122, 729_810_624, 4.775e9),
])
def test_sizes_and_flops_match_reference_table(depth, total, scaling, flops):
    with torch.device("meta"):
        gpt = GPT(config_for_depth(depth))
    counts = gpt.num_scaling_params()
    assert counts["total"] == total
    assert counts["transformer_matrices"] + counts["lm_head"] == scaling
    assert gpt.estimate_flops() == pytest.approx(flops, rel=5e-4)
    if depth == 24:
        assert counts["wte"] == counts["lm_head"] == 50_331_648 and counts["value_embeds"] == 603_979_776
        assert counts["transformer_matrices"] == 679_478_976 and counts["scalars"] == 74


def test_flops_count_survives_swapped_linear_layers():
    """The reference's fp8 bug: counting only its own Linear class misses swapped-in layers."""
    class OtherLinear(torch.nn.Linear):
        pass
    with torch.device("meta"):
        gpt = GPT(config_for_depth(4))
        before = gpt.estimate_flops()
        old = gpt.transformer.h[0].mlp.c_fc
        gpt.transformer.h[0].mlp.c_fc = OtherLinear(old.in_features, old.out_features, bias=False)
    assert gpt.estimate_flops() == before


# ---- attention -------------------------------------------------------------------------------------------------

def naive_attention(q, k, v, window):
    """softmax(q k^T / sqrt(d)) v with an explicit mask; q (B,Tq,H,d), k/v (B,Tk,Hkv,d)."""
    Tq, Tk, H, Hkv = q.size(1), k.size(1), q.size(2), k.size(2)
    k, v = k.repeat_interleave(H // Hkv, dim=2), v.repeat_interleave(H // Hkv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.size(-1))
    rows = torch.arange(Tk - Tq, Tk)[:, None]
    cols = torch.arange(Tk)[None, :]
    visible = (cols <= rows) & (rows - cols <= window)
    return torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(~visible, float("-inf")).softmax(-1), v)


@pytest.mark.parametrize("Tq, Tk, H, Hkv, window", [
    (50, 50, 4, 4, 1000),   # causal, full
    (50, 50, 4, 4, 49),     # window exactly the prefix: still full
    (50, 50, 4, 4, 7),      # sliding window
    (150, 150, 2, 2, 64),   # sliding window, several blocks plus padding
    (70, 70, 6, 2, 0),      # GQA, each query sees only itself
    (70, 70, 6, 3, 20),     # GQA, sliding window
    (1, 40, 4, 2, 1000),    # decode step, full
    (1, 40, 4, 2, 9),       # decode step, window shorter than the cache
    (9, 40, 4, 2, 1000),    # a chunk of queries after cached keys
    (9, 40, 4, 4, 5),       # a chunk after cached keys, windowed
])
def test_pytorch_attention_matches_naive_softmax(Tq, Tk, H, Hkv, window):
    torch.manual_seed(0)
    q = torch.randn(2, Tq, H, 16, requires_grad=True)
    k = torch.randn(2, Tk, Hkv, 16, requires_grad=True)
    v = torch.randn(2, Tk, Hkv, 16, requires_grad=True)
    out = attention(q, k, v, window, impl="sdpa")
    ref = naive_attention(q, k, v, window)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_attention_paths_agree_on_cuda():
    torch.manual_seed(0)
    dtype = model.COMPUTE_DTYPE
    for T, window in ((256, 255), (256, 64)):
        q, k, v = (torch.randn(2, T, 4, 64, device="cuda", dtype=dtype) for _ in range(3))
        ref = naive_attention(q.float(), k.float(), v.float(), window)
        torch.testing.assert_close(attention(q, k, v, window, impl="sdpa").float(), ref, atol=2e-2, rtol=2e-2)
        if model.USE_FA3:
            torch.testing.assert_close(attention(q, k, v, window, impl="fa3").float(), ref, atol=2e-2, rtol=2e-2)


# ---- loss ------------------------------------------------------------------------------------------------------

def test_chunked_loss_equals_plain_cross_entropy():
    gpt = randomized_model(tiny_config())
    idx = torch.randint(0, 100, (3, 40))
    targets = torch.randint(0, 100, (3, 40))
    targets[0, :7] = -1  # ignored positions
    results = []
    for chunked in (True, False):
        gpt.chunked_loss = chunked
        gpt.zero_grad(set_to_none=True)
        loss = gpt(idx, targets)
        (loss * 3).backward()  # a non-unit upstream gradient
        results.append((loss.detach(), [p.grad.clone() for p in gpt.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    logits = gpt(idx)
    per_token = gpt(idx, targets, loss_reduction="none")
    manual = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none")
    torch.testing.assert_close(per_token, manual)
    assert per_token.shape == (120,) and per_token[:7].eq(0).all()
    with torch.no_grad():
        torch.testing.assert_close(gpt(idx, targets, loss_reduction="sum"), manual.sum())


def test_relu_squared_gives_autograds_values_and_gradients_bit_for_bit():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 17, 64).to(dtype)
        x[0, 0, :4] = 0.0  # the relu's edge
        upstream = torch.randn(3, 17, 64).to(dtype)
        results = []
        for fn in (model.relu_squared, lambda t: F.relu(t).square()):
            leaf = x.clone().requires_grad_()
            y = fn(leaf)
            y.backward(upstream)
            results.append((y.detach(), leaf.grad))
        (y1, g1), (y2, g2) = results
        assert torch.equal(y1, y2) and torch.equal(g1, g2), dtype
        assert g1[x <= 0].eq(0).all()


def test_softcap_cross_entropy_in_many_chunks():
    torch.manual_seed(0)
    x = torch.randn(50, 16, requires_grad=True)
    w = (torch.randn(70, 16) * 3).requires_grad_()  # large logits: the softcap matters
    targets = torch.randint(0, 70, (50,))
    targets[::9] = -1
    loss = model.softcap_cross_entropy(x, w, targets, chunk_rows=7)
    grads = torch.autograd.grad(loss * 2, (x, w))
    ref = F.cross_entropy(model.softcap(x @ w.t()), targets, ignore_index=-1)
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, torch.autograd.grad(ref * 2, (x, w))):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


# ---- KV cache --------------------------------------------------------------------------------------------------

def cache_for(gpt, batch_size, seq_len):
    c = gpt.config
    return KVCache(batch_size, c.n_kv_head, seq_len, c.n_embd // c.n_head, c.n_layer, "cpu", dtype=torch.float32)


@torch.no_grad()
def test_kv_cache_decode_matches_full_forward():
    """Batch-1 prefill copied into 3 rows, then per-row different tokens decoded one at a time; the sequences
    (180 tokens) are longer than the short window (128), so the windows are exercised."""
    gpt = randomized_model(tiny_config())
    assert gpt.window_sizes[0] == 128
    torch.manual_seed(1)
    prompt = torch.randint(0, 100, (1, 50))
    seqs = torch.cat([prompt.expand(3, -1), torch.randint(0, 100, (3, 130))], dim=1)
    full = gpt(seqs)
    prefill_cache = cache_for(gpt, 1, 50)
    prompt_logits = gpt(prompt, kv_cache=prefill_cache)
    torch.testing.assert_close(prompt_logits[0], full[0, :50], atol=1e-4, rtol=1e-4)
    cache = cache_for(gpt, 3, 180)
    cache.prefill(prefill_cache)
    assert cache.get_pos() == 50 and cache.cache_seqlens.tolist() == [50, 50, 50]
    decoded = [gpt(seqs[:, t:t + 1], kv_cache=cache) for t in range(50, 180)]
    torch.testing.assert_close(torch.cat(decoded, dim=1), full[:, 50:], atol=1e-4, rtol=1e-4)
    assert cache.get_pos() == 180
    # chunks of several tokens after cached ones (chunked prefill) give the same logits too
    cache.reset()
    chunks = [gpt(seqs[:, s:s + 37], kv_cache=cache) for s in range(0, 180, 37)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_greedy_generation_with_cache_equals_without():
    gpt = randomized_model(tiny_config(), seed=3)
    prompt = [5, 17, 42, 8, 99, 1]
    naive = list(gpt.generate(prompt, max_tokens=25, temperature=0.0))
    cache = cache_for(gpt, 1, len(prompt) + 25)
    logits = gpt(torch.tensor([prompt]), kv_cache=cache)
    cached = []
    for _ in range(25):
        next_id = logits[0, -1].argmax().item()
        cached.append(next_id)
        logits = gpt(torch.tensor([[next_id]]), kv_cache=cache)
    assert cached == naive
    sampled = list(gpt.generate(prompt, max_tokens=10, temperature=1.0, top_k=5, seed=7))
    assert sampled == list(gpt.generate(prompt, max_tokens=10, temperature=1.0, top_k=5, seed=7))


# ---- optimizer -------------------------------------------------------------------------------------------------

def test_adamw_groups_match_torch_adamw():
    torch.manual_seed(0)
    gpt = build_gpt(tiny_config(n_embd=64, n_head=4, n_kv_head=4), torch.device("cpu"))
    ours = gpt.setup_optimizer(unembedding_lr=0.004, embedding_lr=0.2, scalar_lr=0.5)
    adamw_groups = [g for g in ours.param_groups if g["kind"] == "adamw"]
    scale = (64 / 768) ** -0.5
    assert [(g["lr"], g["betas"], g["weight_decay"]) for g in adamw_groups] == [
        (0.004 * scale, (0.8, 0.96), 0.01), (0.2 * scale, (0.8, 0.995), 0.001), (0.1 * scale, (0.8, 0.995), 0.01),
        (0.005, (0.8, 0.95), 0.05), (0.5, (0.96, 0.95), 0.0), (0.2, (0.8, 0.95), 0.0)]
    assert all(g["initial_lr"] == g["lr"] and g["eps"] == 1e-10 for g in adamw_groups)
    params = [p for g in adamw_groups for p in g["params"]]
    clones = [p.detach().clone().requires_grad_() for p in params]
    mine = MuonAdamW([{**g, "params": list(g["params"])} for g in adamw_groups])
    it = iter(clones)
    theirs = torch.optim.AdamW([dict(params=[next(it) for _ in g["params"]], lr=g["lr"], betas=g["betas"],
                                     eps=g["eps"], weight_decay=g["weight_decay"]) for g in adamw_groups])
    for step in range(10):
        for p, c in zip(params, clones):
            p.grad = torch.randn_like(p)
            c.grad = p.grad.clone()
        for g in mine.param_groups:  # a schedule changing the lr every step
            g["lr"] = g["initial_lr"] * (1 - step / 20)
        for g, tg in zip(mine.param_groups, theirs.param_groups):
            tg["lr"] = g["lr"]
        mine.step()
        theirs.step()
    for p, c in zip(params, clones):
        torch.testing.assert_close(p, c, rtol=1e-5, atol=1e-6)


def test_muon_groups_and_update_is_near_semi_orthogonal():
    gpt = build_gpt(tiny_config(), torch.device("cpu"))
    muon_groups = [g for g in gpt.setup_optimizer(matrix_lr=0.03, weight_decay=0.1).param_groups
                   if g["kind"] == "muon"]
    shapes = [tuple(g["params"][0].shape) for g in muon_groups]
    assert shapes == sorted(set(shapes)) and all(len({p.shape for p in g["params"]}) == 1 for g in muon_groups)
    assert sum(len(g["params"]) for g in muon_groups) == len(list(gpt.transformer.h.parameters()))
    assert all(g["lr"] == 0.03 and g["momentum"] == 0.95 and g["weight_decay"] == 0.1 for g in muon_groups)
    torch.manual_seed(0)
    for shape in ((96, 32), (32, 96), (48, 48)):  # tall, wide, square
        w = torch.nn.Parameter(torch.randn(shape))
        w.grad = torch.randn(shape)
        before = w.detach().clone()
        opt = MuonAdamW([dict(kind="muon", params=[w], lr=0.1, momentum=0.0, beta2=1.0, ns_steps=5,
                              weight_decay=0.0)])
        opt.step()
        update = (before - w.detach()) / (0.1 * math.sqrt(max(1, shape[0] / shape[1])))
        sv = torch.linalg.svdvals(update)
        assert sv.max() / sv.min() < 2.0, sv
        assert update.norm().item() == pytest.approx(math.sqrt(min(shape)), rel=1e-4)  # Muon+
        assert (update * w.grad).sum() > 0  # a descent direction


def test_muon_cautious_weight_decay_only_where_update_agrees():
    w = torch.nn.Parameter(torch.randn(16, 16))
    w.grad = torch.zeros(16, 16)  # zero gradient -> zero update; decay mask g*p >= 0 holds everywhere
    before = w.detach().clone()
    MuonAdamW([dict(kind="muon", params=[w], lr=0.1, momentum=0.0, beta2=0.9, ns_steps=5,
                    weight_decay=0.5)]).step()
    torch.testing.assert_close(w.detach(), before * (1 - 0.05))


def test_standalone_model_py_trains_in_empty_dir(tmp_path):
    shutil.copy(os.path.join(ROOT, "model.py"), tmp_path / "model.py")
    script = textwrap.dedent("""
        import torch, model
        assert model.__file__.startswith(%r)
        torch.manual_seed(0)
        config = model.GPTConfig(sequence_len=64, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
        gpt = model.build_gpt(config, torch.device("cpu"))
        optimizer = gpt.setup_optimizer()
        x = torch.randint(0, 256, (4, 32))
        y = torch.roll(x, -1, dims=1)
        losses = []
        for step in range(20):
            loss = gpt(x, y)
            loss.backward()
            optimizer.step()
            gpt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        print(losses[0], losses[-1])
        assert losses[-1] < 0.5 * losses[0], losses
    """ % str(tmp_path))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NANOCHAT_DTYPE")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


# ---- errors ----------------------------------------------------------------------------------------------------

def test_bad_input_gives_clear_errors():
    with pytest.raises(ValueError, match="window_pattern 'SXL'.*S.*L"):
        GPTConfig(window_pattern="SXL")
    with pytest.raises(ValueError, match="not divisible by n_head"):
        GPTConfig(n_embd=100, n_head=3, n_kv_head=3)
    with pytest.raises(ValueError, match="not divisible by n_kv_head"):
        GPTConfig(n_embd=96, n_head=6, n_kv_head=4)
    with pytest.raises(ValueError, match="head_dim"):
        config_for_depth(4, head_dim=63)
    gpt = build_gpt(tiny_config(sequence_len=8), torch.device("cpu"))
    with pytest.raises(ValueError, match="rotary cache of 80 positions"):
        gpt(torch.zeros(1, 81, dtype=torch.long))
    cache = cache_for(gpt, 1, 4)
    with pytest.raises(ValueError, match="KV cache holds 4 positions"):
        gpt(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="batch-1"):
        cache_for(gpt, 2, 4).prefill(cache_for(gpt, 2, 4))


def test_compute_dtype_override_and_bad_value():
    code = "import model; print(model.COMPUTE_DTYPE)"
    env = dict(os.environ, NANOCHAT_DTYPE="bfloat16", PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "torch.bfloat16", out.stderr
    env["NANOCHAT_DTYPE"] = "fp8"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "NANOCHAT_DTYPE='fp8' is not supported" in out.stderr
    if not torch.cuda.is_available():
        assert model.COMPUTE_DTYPE == (getattr(torch, os.environ["NANOCHAT_DTYPE"]) if "NANOCHAT_DTYPE" in os.environ
                                       else torch.float32)
