"""FP8 training in model.py: the fp8 matmul against fp32, the layer filter, checkpoints, fp8_disabled, a short
training run against the same run without fp8, the support check. The CUDA tests (names with "cuda") skip
without a GPU of capability 8.9+; `python bench.py gpu` runs them."""
import functools

import pytest
import torch

import model
from model import Fp8Linear, GPTConfig, Linear, build_gpt, config_for_depth, enable_fp8, fp8_disabled

FP8_CUDA = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
needs_fp8_cuda = pytest.mark.skipif(not FP8_CUDA, reason="needs a CUDA GPU of capability 8.9+")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def fp8_and_plain_linear(in_features, out_features, recipe, device="cpu", seed=0):
    torch.manual_seed(seed)
    plain = Linear(in_features, out_features).to(device)
    torch.nn.init.normal_(plain.weight, std=in_features ** -0.5)
    fp8 = Linear(in_features, out_features).to(device)
    fp8.load_state_dict(plain.state_dict())
    fp8.__class__, fp8.fp8_recipe = Fp8Linear, recipe
    return fp8, plain


def forward_backward(layer, x, grad):
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y.backward(grad)
    return y, x.grad, layer.weight.grad


def tiny_config(**kw):
    # n_embd 128: the smallest width whose block matrices pass the fp8 filter
    return GPTConfig(**{**dict(sequence_len=64, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=128,
                               window_pattern="SL"), **kw})


# ---- the fp8 matmul ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe", model.FP8_RECIPES)
def test_fp8_linear_forward_and_both_gradients_match_fp32(recipe):
    fp8, plain = fp8_and_plain_linear(256, 384, recipe)
    x, grad = torch.randn(4, 32, 256), torch.randn(4, 32, 384)
    for name, got, want in zip(("output", "input grad", "weight grad"),
                               forward_backward(fp8, x, grad), forward_backward(plain, x, grad)):
        err = relative_error(got, want)
        # e4m3 keeps 3 mantissa bits (~3.5% rms error after a matmul), e5m2 gradients 2 bits
        limit = 0.06 if name == "output" else 0.1
        assert 1e-3 < err < limit, f"{recipe} {name}: relative error {err:.4f}"  # > 1e-3: fp8 really ran
        assert got.dtype == want.dtype and got.shape == want.shape


def test_rowwise_scales_survive_an_outlier_row_that_tensorwise_does_not():
    """One scale per row: a row 10^4 times larger than the others leaves the small rows' precision alone."""
    x = torch.randn(64, 256)
    x[0] *= 1e5  # tensorwise: the other rows land in e4m3's subnormals, or at zero
    errors = {}
    for recipe in model.FP8_RECIPES:
        fp8, plain = fp8_and_plain_linear(256, 128, recipe)
        with torch.no_grad():
            errors[recipe] = relative_error(fp8(x)[1:], plain(x)[1:])
    assert errors["rowwise"] < 0.06 and errors["tensorwise"] > 3 * errors["rowwise"], errors


def test_rows_not_a_multiple_of_16_run_the_plain_matmul():
    fp8, plain = fp8_and_plain_linear(128, 128, "tensorwise")
    x = torch.randn(1, 3, 128)  # e.g. a decode step: _scaled_mm on CUDA would refuse it
    with torch.no_grad():
        assert torch.equal(fp8(x), plain(x))


# ---- converting a model --------------------------------------------------------------------------------------

def test_filter_converts_every_block_matrix_and_nothing_else():
    with torch.device("meta"):
        gpt = model.GPT(config_for_depth(12, sequence_len=2048, vocab_size=32768))
    assert enable_fp8(gpt) == 12 * 6  # c_q, c_k, c_v, attn c_proj, c_fc, mlp c_proj per layer
    converted = {name for name, m in gpt.named_modules() if isinstance(m, Fp8Linear)}
    assert all(name.startswith("transformer.h.") and "ve_gate" not in name for name in converted)
    assert type(gpt.lm_head) is Linear and type(gpt.smear_gate) is Linear
    assert all(type(b.attn.ve_gate) is Linear for b in gpt.transformer.h if hasattr(b.attn, "ve_gate"))
    assert model.fp8_eligible(Linear(128, 4096)) and model.fp8_eligible(Linear(768, 3072))
    assert not model.fp8_eligible(Linear(64, 4096))     # too small to gain
    assert not model.fp8_eligible(Linear(768, 200))     # 200 is not a multiple of 16
    with torch.device("meta"):
        small = model.GPT(tiny_config(n_embd=64))
    assert enable_fp8(small) == 0
    with pytest.raises(ValueError, match="tensorwise, rowwise"):
        enable_fp8(gpt, "blockwise")


def test_state_dict_is_unchanged_and_loads_without_fp8():
    torch.manual_seed(0)
    gpt = build_gpt(tiny_config(), torch.device("cpu"))
    before = {k: v.clone() for k, v in gpt.state_dict().items()}
    enable_fp8(gpt, "rowwise")
    after = gpt.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) and after[k].dtype == before[k].dtype for k in before)
    plain = build_gpt(tiny_config(), torch.device("cpu"))
    plain.load_state_dict(after, strict=True)
    idx = torch.randint(0, 512, (2, 32))
    with torch.no_grad(), fp8_disabled(gpt):
        assert torch.equal(plain(idx), gpt(idx))


def test_fp8_disabled_gives_the_exact_fp32_results_and_restores_fp8():
    torch.manual_seed(0)
    plain = build_gpt(tiny_config(), torch.device("cpu"))
    with torch.no_grad():  # random weights everywhere, so that every fp8 layer changes the output
        for p in plain.parameters():
            p.uniform_(-0.1, 0.1)
    gpt = build_gpt(tiny_config(), torch.device("cpu"))
    gpt.load_state_dict(plain.state_dict())
    enable_fp8(gpt)
    idx, targets = torch.randint(0, 512, (4, 64)), torch.randint(0, 512, (4, 64))
    with torch.no_grad():
        want = plain(idx, targets)
        fp8_loss = gpt(idx, targets)
        with fp8_disabled(gpt):
            assert torch.equal(gpt(idx, targets), want)
        assert torch.equal(gpt(idx, targets), fp8_loss) and not torch.equal(fp8_loss, want)


def synthetic_batches(steps, B, T, vocab, seed=0):
    """Half of the next tokens follow a fixed permutation of the current one, half are random: a learnable
    signal with a loss floor well above zero, so relative loss differences mean something."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(vocab, generator=g)
    for _ in range(steps):
        x = torch.empty(B, T + 1, dtype=torch.long)
        x[:, 0] = torch.randint(0, vocab, (B,), generator=g)
        noise = torch.randint(0, vocab, (B, T), generator=g)
        follow = torch.rand(B, T, generator=g) < 0.5
        for t in range(T):
            x[:, t + 1] = torch.where(follow[:, t], perm[x[:, t]], noise[:, t])
        yield x[:, :-1], x[:, 1:]


@functools.cache
def train_losses(fp8_recipe, steps=40, vocab_size=256):
    torch.manual_seed(0)
    gpt = build_gpt(tiny_config(vocab_size=vocab_size), torch.device("cpu"))
    if fp8_recipe:
        assert enable_fp8(gpt, fp8_recipe) == 12
    optimizer = gpt.setup_optimizer(unembedding_lr=0.02, embedding_lr=0.5, matrix_lr=0.04)
    losses = []
    for x, y in synthetic_batches(steps, 8, 64, vocab_size):
        loss = gpt(x, y)
        loss.backward()
        optimizer.step()
        gpt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("recipe", model.FP8_RECIPES)
def test_tiny_gpt_trains_with_fp8_as_well_as_without(recipe):
    plain, fp8 = train_losses(None), train_losses(recipe)
    tail = lambda losses: sum(losses[-5:]) / 5
    assert tail(plain) < 0.85 * plain[0]  # it learned something (from 5.5 to about 4.4; the floor is 3.5)
    assert abs(tail(fp8) - tail(plain)) < 0.03 * tail(plain), (tail(fp8), tail(plain))


# ---- support check -------------------------------------------------------------------------------------------

def test_support_check_names_the_gpu_and_the_fix(monkeypatch):
    model.check_fp8_support("cpu")  # runs on the CPU
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ValueError) as error:
        model.check_fp8_support("cuda")
    message = str(error.value)
    assert "\n" not in message and "8.9" in message and "A100" in message and "8.0" in message
    assert "without --fp8" in message
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    model.check_fp8_support("cuda")
    with pytest.raises(ValueError, match="mps"):
        model.check_fp8_support("mps")


# ---- CUDA ----------------------------------------------------------------------------------------------------

@needs_fp8_cuda
@pytest.mark.parametrize("recipe", model.FP8_RECIPES)
def test_fp8_linear_matches_bf16_on_cuda(recipe):
    fp8, plain = fp8_and_plain_linear(768, 3072, recipe, device="cuda")
    x = torch.randn(8, 256, 768, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(8, 256, 3072, device="cuda", dtype=torch.bfloat16)
    for got, want in zip(forward_backward(fp8, x, grad), forward_backward(plain, x, grad)):
        assert 1e-3 < relative_error(got, want) < 0.1 and got.dtype == want.dtype


@needs_fp8_cuda
def test_compiled_fp8_gpt_on_cuda_trains_and_honours_fp8_disabled():
    """The default recipe only: each compile of the model costs tens of seconds (rowwise: the eager test above).
    Its short-window layer runs FA3 or, without it, compiled FlexAttention inside the compiled model."""
    torch.manual_seed(0)
    config = tiny_config(sequence_len=256, n_embd=256, n_head=2, n_kv_head=2)
    gpt = build_gpt(config, torch.device("cuda"))
    enable_fp8(gpt, "tensorwise")
    compiled = torch.compile(gpt, dynamic=False)
    optimizer = gpt.setup_optimizer()
    losses = []
    for x, y in synthetic_batches(10, 8, 256, 512):
        loss = compiled(x.cuda(), y.cuda())
        loss.backward()
        optimizer.step()
        gpt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    x = torch.randint(0, 512, (2, 256), device="cuda")
    plain = build_gpt(config, torch.device("cuda"))
    plain.load_state_dict(gpt.state_dict())
    with torch.no_grad():
        fp8_logits = compiled(x)
        with fp8_disabled(gpt):  # the compiled graph must see the switch (it recompiles once)
            off = compiled(x)
        assert relative_error(off, plain(x)) < 1e-2
        assert relative_error(fp8_logits, plain(x)) > relative_error(off, plain(x))  # fp8 did change the logits
        torch.testing.assert_close(compiled(x), fp8_logits)  # and is back on after the block
