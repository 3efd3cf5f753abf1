"""Sliding-window attention through FlexAttention against the SDPA path (model.attention). On the CPU FlexAttention
runs eagerly and forward only (it has no CPU backward), which is enough to check its mask; the CUDA test (name
with "cuda", skipped without a GPU) runs the compiled kernels forward and backward in bf16."""
import pytest
import torch

import model
from model import attention

# eager FlexAttention is the CPU reference here, not a speed claim
pytestmark = [pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
              pytest.mark.usefixtures("one_thread")]  # tiny models: see conftest.py


@pytest.mark.parametrize("T, window, H, Hkv", [(256, 64, 4, 4), (200, 128, 4, 2), (384, 1, 2, 2)])
def test_flex_matches_the_sdpa_path_on_cpu(T, window, H, Hkv):
    """T not a multiple of the 128-position blocks, grouped-query heads, a window of one position."""
    torch.manual_seed(0)
    q = torch.randn(2, T, H, 32)
    k, v = (torch.randn(2, T, Hkv, 32) for _ in range(2))
    with torch.no_grad():
        torch.testing.assert_close(attention(q, k, v, window, impl="flex"), attention(q, k, v, window, impl="sdpa"),
                                   atol=1e-5, rtol=1e-4)


def test_block_mask_is_built_once_per_length_window_and_device():
    a = model.flex_block_mask(256, 64, torch.device("cpu"))
    assert model.flex_block_mask(256, 64, torch.device("cpu")) is a
    assert model.flex_block_mask(256, 128, torch.device("cpu")) is not a


def test_cpu_keeps_the_sdpa_path():
    """FlexAttention has no CPU backward, and eager FlexAttention is slower than the blocked SDPA path there."""
    q = torch.randn(1, 256, 2, 32, requires_grad=True)
    attention(q, q, q, 64).sum().backward()  # would raise inside FlexAttention
    assert q.grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_matches_the_sdpa_path_on_cuda():
    """Forward and backward in bf16, grouped-query heads; one shape, since each one compiles the kernels."""
    torch.manual_seed(0)
    dtype, T, window = model.COMPUTE_DTYPE, 1024, 256
    q = torch.randn(2, T, 4, 128, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, T, 2, 128, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    grad = torch.randn_like(q)
    results = {}
    for impl in ("flex", "sdpa", None):
        out = attention(q, k, v, window, impl=impl)
        results[impl] = (out, *torch.autograd.grad(out, (q, k, v), grad))
    for got, want in zip(results["flex"], results["sdpa"]):
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    if not model.USE_FA3:  # training on CUDA without FA3 picks FlexAttention for windowed layers
        for got, want in zip(results[None], results["flex"]):
            torch.testing.assert_close(got, want)
