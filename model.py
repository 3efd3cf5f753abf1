"""The GPT model, its attention backends, the KV cache and sampler, checkpoint loading, the Muon+AdamW optimizer and
fp8 training, in one file.

This file depends on torch and the Python standard library only: copy it alone into another project.

    import torch, model
    config = model.GPTConfig(sequence_len=512, vocab_size=32768, n_layer=6, n_head=6, n_kv_head=6, n_embd=384)
    gpt = model.build_gpt(config, torch.device("cpu"))        # meta construction + init in one call
    optimizer = gpt.setup_optimizer()
    loss = gpt(x, y); loss.backward(); optimizer.step(); gpt.zero_grad(set_to_none=True)

The same code runs on the CPU (fp32), MPS (fp32) and CUDA (bf16 from compute capability 8.0, FlashAttention-3 on
Hopper when its `flash_attn_interface` module is importable, else PyTorch attention). For several GPUs or nodes,
start with torchrun and call torch.distributed.init_process_group ("nccl", or "gloo" on CPUs) first: the optimizer
then averages the gradients itself (ZeRO-2: reduce-scatter, each rank updates a shard, all-gather); there is no
DistributedDataParallel. torch.compile(gpt) works too (the chunked loss stays eager).
Parameter names equal the reference nanochat's state-dict keys; load_gpt also reads its checkpoints. With
enable_fp8(gpt) the block matrices train in fp8 (CUDA capability 8.9+, or slowly on the CPU); fp8_disabled(gpt)
for evaluation. For inference, set_decode_dtype(gpt, "int8") stores the matrices in int8 (or bf16), and a KVCache
can hold rows at different positions (continuous batching: KVCache.set_row, move_row); gpt.compile_decode() runs
the decode steps through torch.compile.
"""
import contextlib
import ctypes
import functools
import importlib.util
import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from torch.optim.adamw import adamw


def _compute_dtype():
    """bf16 on CUDA from capability 8.0, else fp32; NANOCHAT_DTYPE overrides. fp32 on the CPU because bf16 matmuls
    are far slower than fp32 on CPUs without bf16 matrix units; on CPUs with AMX (Intel Sapphire Rapids and later)
    NANOCHAT_DTYPE=bfloat16 trains about 1.9x faster (measured at the CPU demo shape)."""
    name = os.environ.get("NANOCHAT_DTYPE")
    if name:
        if name not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"NANOCHAT_DTYPE={name!r} is not supported: use bfloat16, float16 or float32")
        return getattr(torch, name)
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0):
        return torch.bfloat16
    return torch.float32


COMPUTE_DTYPE = _compute_dtype()

# ---------------------------------------------------------------------------------------------------------------
# Attention backend: FlashAttention-3 on Hopper in bf16, otherwise PyTorch's scaled_dot_product_attention.


def _load_flash_attention_3():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        return None
    try:  # a local FA3 build exposes `flash_attn_interface`; the HF `kernels` package can fetch the same module
        import flash_attn_interface
        return flash_attn_interface
    except Exception:
        pass
    try:
        from kernels import get_kernel
        return get_kernel("varunneal/flash-attention-3").flash_attn_interface
    except Exception:
        return None


FA3 = _load_flash_attention_3()
USE_FA3 = FA3 is not None and COMPUTE_DTYPE == torch.bfloat16


def attention(q, k, v, window, impl=None, lengths=None):
    """Causal attention of q (B, Tq, H, hd) over k, v (B, Tk, Hkv, hd); the queries are the last Tq of the Tk
    positions. A query sees the keys at most `window` positions back (window >= Tk-1: the whole prefix).
    Returns (B, Tq, H, hd). impl: None (automatic), "fa3", "flex" (windowed layers through FlexAttention; chosen
    on CUDA without FA3 when training) or "sdpa". lengths (B,): rows at different positions (decoding, Tq 1):
    row b's query is its position lengths[b]-1 and sees only its first lengths[b] keys."""
    impl = impl or ("fa3" if USE_FA3 else "flex" if FLEX_ON_CUDA and q.is_cuda and q.requires_grad else "sdpa")
    Tq, Tk = q.size(1), k.size(1)
    full = window >= Tk - 1
    if lengths is not None:
        return _ragged_decode_attention(q, k, v, window, impl, lengths)
    if impl == "fa3":
        out = FA3.flash_attn_func(q, k, v, causal=True, window_size=(-1 if full else window, 0))
        return out[0] if isinstance(out, tuple) else out  # some FA3 builds also return the log-sum-exp
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # SDPA wants (B, H, T, hd)
    gqa = q.size(1) != k.size(1)
    if Tq == 1:  # decoding: the single query sees the last window+1 keys, no mask needed
        if not full:
            k, v = k[:, :, -(window + 1):], v[:, :, -(window + 1):]
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    elif Tq == Tk and full:  # the fast path: fused causal kernels on every device
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    elif Tq == Tk and impl == "flex":
        y = flex_sliding_window_attention(q, k, v, window)
    elif Tq == Tk:
        y = _sliding_window_attention(q, k, v, window)
    else:  # a chunk of queries after cached keys (inference only): a small explicit (Tq, Tk) mask
        rows = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]
        cols = torch.arange(Tk, device=q.device)[None, :]
        mask = (cols <= rows) & (rows - cols <= window)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return y.transpose(1, 2)


def _ragged_decode_attention(q, k, v, window, impl, lengths):
    """One query per row, rows at different positions: FA3 takes per-row cache lengths, SDPA a (B, 1, 1, Tk) mask."""
    if impl == "fa3":
        out = FA3.flash_attn_with_kvcache(q, k, v, cache_seqlens=lengths.int(), causal=True, window_size=(window, 0))
        return out[0] if isinstance(out, tuple) else out
    cols = torch.arange(k.size(1), device=q.device)[None, :]
    mask = (cols < lengths[:, None]) & (cols >= lengths[:, None] - 1 - window)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], enable_gqa=q.size(1) != k.size(1))
    return y.transpose(1, 2)


def _sliding_window_attention(q, k, v, window):
    """Sliding-window causal attention in O(T * window) time and memory, without a dense T x T mask.
    Queries are cut into blocks of c positions; block i attends to the keys [i*c - window, i*c + c), gathered
    with unfold over left-padded keys, under one small (n, c, c + window) mask shared by all batch rows and heads.
    q, k, v: (B, H, T, hd) with equal T; returns (B, H, T, hd)."""
    B, H, T, hd = q.shape
    if k.size(1) != H:  # grouped-query attention: give every query head its key/value head
        k, v = k.repeat_interleave(H // k.size(1), dim=1), v.repeat_interleave(H // v.size(1), dim=1)
    c = max(window, 64)
    n = -(-T // c)
    pad = n * c - T
    q = F.pad(q, (0, 0, 0, pad)).reshape(B * H, n, c, hd)
    k, v = (F.pad(t, (0, 0, window, pad)).unfold(2, c + window, c).transpose(-1, -2).reshape(B * H, n, c + window, hd)
            for t in (k, v))
    a = torch.arange(c, device=q.device)[:, None]               # query offset inside its block
    b = torch.arange(c + window, device=q.device)[None, :]      # key offset inside the block's key span
    start = torch.arange(n, device=q.device)[:, None, None] * c - window  # absolute position of key offset 0
    mask = (b >= a) & (b <= a + window) & (start + b >= 0)      # causal, within the window, not left padding
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return y.view(B, H, n * c, hd)[:, :, :T]


# ---------------------------------------------------------------------------------------------------------------
# Model


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"

    def __post_init__(self):
        problems = []
        if self.n_layer < 1 or self.n_head < 1 or self.n_kv_head < 1 or self.vocab_size < 1 or self.sequence_len < 1:
            problems.append("n_layer, n_head, n_kv_head, vocab_size and sequence_len must be positive")
        elif self.n_embd % self.n_head:
            problems.append(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}: pick a head count "
                            f"that divides it (n_embd = n_head * head_dim)")
        elif (self.n_embd // self.n_head) % 2:
            problems.append(f"head_dim {self.n_embd // self.n_head} is odd: rotary embeddings need an even head_dim")
        elif self.n_head % self.n_kv_head:
            problems.append(f"n_head {self.n_head} is not divisible by n_kv_head {self.n_kv_head}")
        if not self.window_pattern or set(self.window_pattern.upper()) - set("SL"):
            problems.append(f"window_pattern {self.window_pattern!r} may only contain S (short) and L (long) "
                            f"characters, e.g. SSSL or L")
        if problems:
            raise ValueError("; ".join(problems))


def config_for_depth(depth, aspect_ratio=64, head_dim=128, **overrides):
    """The reference's width rule: n_embd = depth * aspect_ratio rounded up to a multiple of head_dim."""
    if depth < 1 or aspect_ratio < 1 or head_dim < 2 or head_dim % 2:
        raise ValueError(f"depth {depth} and aspect ratio {aspect_ratio} must be positive and head_dim "
                         f"{head_dim} an even number >= 2")
    n_embd = -(-depth * aspect_ratio // head_dim) * head_dim
    n_head = n_embd // head_dim
    return GPTConfig(n_layer=depth, n_embd=n_embd, n_head=n_head, n_kv_head=n_head, **overrides)


def norm(x):
    return F.rms_norm(x, (x.size(-1),))  # RMSNorm without learnable parameters


class Linear(nn.Linear):
    """Bias-free linear layer whose (fp32 master) weight is cast to the activation dtype in forward."""
    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


def apply_rotary_emb(x, cos, sin):
    """Half-split rotary (rotation by -theta, as in the reference): with halves x1, x2 of the head dim,
    y = [x1 cos + x2 sin, x2 cos - x1 sin]. The tables hold [cos, cos] and [sin, -sin] over the full head dim,
    so this is x * cos + swap_halves(x) * sin: no slicing, whose backward would zero-fill full-size tensors."""
    return torch.addcmul(x * cos, x.roll(x.size(-1) // 2, dims=-1), sin)


def has_value_embedding(layer_idx, n_layer):
    return layer_idx % 2 == (n_layer - 1) % 2  # alternating layers, always including the last


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        D, kv_dim = config.n_embd, config.n_kv_head * self.head_dim
        self.c_q = Linear(D, D)
        self.c_k = Linear(D, kv_dim)
        self.c_v = Linear(D, kv_dim)
        self.c_proj = Linear(D, D)
        self.c_qkv = None  # decoding: c_q, c_k and c_v as one matrix (set_decode_dtype), one matmul instead of 3
        if has_value_embedding(layer_idx, config.n_layer):
            self.ve_gate = Linear(12, config.n_kv_head)  # per kv-head gate from the first 12 channels

    def forward(self, x, ve, cos, sin, window, cache=None):
        B, T, C = x.shape
        H, Hkv, hd = self.n_head, self.n_kv_head, self.head_dim
        if self.c_qkv is None:
            q, k = self.c_q(x).view(B, T, H, hd), self.c_k(x).view(B, T, Hkv, hd)
            v = self.c_v(x).view(B, T, Hkv, hd)
            q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
            q, k = norm(q) * 1.2, norm(k) * 1.2  # QK-norm, then a slightly sharper softmax than 1/sqrt(hd)
        else:  # decoding: one matmul, and q and k rotated and normed together (per head: the same values)
            qk, v = self.c_qkv(x).view(B, T, H + 2 * Hkv, hd).split([H + Hkv, Hkv], dim=2)
            q, k = (norm(apply_rotary_emb(qk, cos, sin)) * 1.2).split([H, Hkv], dim=2)
        if ve is not None:  # value embedding mixed in with a gate in (0, 3)
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :12]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, Hkv, hd)
        lengths = None
        if cache is not None:  # write this chunk at each row's positions, attend over the cache up to kv_len
            k_cache, v_cache, rows, slots, kv_len = cache  # this layer's (batch, time, heads, dim) cache
            if slots is None:  # rows at equal positions: a slice, and attention without a mask
                k_cache[:B, kv_len - T:kv_len] = k
                v_cache[:B, kv_len - T:kv_len] = v
            else:  # each row at its own position (continuous batching; T is 1)
                k_cache[rows, slots] = k
                v_cache[rows, slots] = v
                lengths = slots[:, 0] + 1
            full = lengths is not None and USE_FA3  # FA3 reads the cache whole, up to each row's length
            # the view keeps the head sizes plain ints when torch.compile traces the cache's sizes as symbols
            k, v = ((c[:B] if full else c[:B, :kv_len]).view(B, -1, Hkv, hd) for c in (k_cache, v_cache))
        y = attention(q, k, v, window, lengths=lengths)
        return self.c_proj(y.reshape(B, T, C))


class _ReluSquared(torch.autograd.Function):
    """relu(x)^2 that keeps one tensor for backward, r = relu(x), and computes the gradient 2 r g in one pass.
    Autograd's relu-then-square keeps two and runs four passes over the (batch, time, 4 x n_embd) activations
    (pow(r, 1), two products, the relu mask): the widest tensors of the step, where a CPU spends ~10% of it.
    The same values: 2 r g rounds once either way, and r = 0 wherever the mask was."""
    @staticmethod
    def forward(ctx, x):
        r = torch.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad):
        (r,) = ctx.saved_tensors
        return torch.addcmul(grad.new_zeros(()), grad, r, value=2.0)


def relu_squared(x):
    # inference (no autograd) keeps the plain ops: no Function call per layer in a decode step
    return _ReluSquared.apply(x) if torch.is_grad_enabled() and x.requires_grad else F.relu(x).square()


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(relu_squared(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, window, cache=None):
        x = x + self.attn(norm(x), ve, cos, sin, window, cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        """Declares the modules only: build under torch.device("meta"), then to_empty() and init_weights()
        (or call build_gpt, which does all three)."""
        super().__init__()
        self.config = config
        L, D = config.n_layer, config.n_embd
        padded_vocab = -(-config.vocab_size // 64) * 64  # multiple of 64 for efficient matmuls
        kv_dim = config.n_kv_head * (D // config.n_head)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(padded_vocab, D),
            h=nn.ModuleList([Block(config, i) for i in range(L)]),
        ))
        self.lm_head = Linear(D, padded_vocab)  # untied from wte
        self.resid_lambdas = nn.Parameter(torch.ones(L))
        self.x0_lambdas = nn.Parameter(torch.zeros(L))
        self.smear_gate = Linear(24, 1)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(padded_vocab, kv_dim)
                                           for i in range(L) if has_value_embedding(i, L)})
        self.window_sizes = self._window_sizes()
        self.rotary_len = 10 * config.sequence_len
        cos, sin = self._rotary_tables(self.rotary_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.chunked_loss = True  # lm_head + softcap + cross-entropy in row chunks (see softcap_cross_entropy)
        self.compiled_decode = None  # compile_decode(): decode steps through torch.compile

    def _window_sizes(self):
        """Left window per layer: L = the whole sequence, S = a quarter of it rounded up to 128; last layer L."""
        T = self.config.sequence_len
        pattern = self.config.window_pattern.upper()
        short = math.ceil(T / 4 / 128) * 128
        sizes = [T if pattern[i % len(pattern)] == "L" else short for i in range(self.config.n_layer)]
        sizes[-1] = T
        return sizes

    def _rotary_tables(self, length, base=100000, device=None):
        head_dim = self.config.n_embd // self.config.n_head
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
        angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
        cos, sin = angles.cos(), angles.sin()
        cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, -sin], dim=-1)  # see apply_rotary_emb
        return cos.to(COMPUTE_DTYPE)[None, :, None, :], sin.to(COMPUTE_DTYPE)[None, :, None, :]

    @torch.no_grad()
    def init_weights(self):
        """The reference initialization (uses the global RNG; seed it for reproducible weights)."""
        L, D = self.config.n_layer, self.config.n_embd
        s = 3 ** 0.5 * D ** -0.5  # uniform bound with std 1/sqrt(D)
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=0.8)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * s, 0.4 * s)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if hasattr(block.attn, "ve_gate"):
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        self.smear_lambda.fill_(0.0)
        self.backout_lambda.fill_(0.2)
        frac = torch.arange(L, dtype=torch.float32) / max(L - 1, 1)
        self.resid_lambdas.copy_(1.15 - 0.10 * frac)
        self.x0_lambdas.copy_(0.20 - 0.15 * frac)
        if COMPUTE_DTYPE != torch.float16:  # fp16 embeddings stay fp32: GradScaler cannot unscale fp16 grads
            for emb in [self.transformer.wte, *self.value_embeds.values()]:
                emb.to(dtype=COMPUTE_DTYPE)
        self.cos, self.sin = self._rotary_tables(self.rotary_len, device=self.lm_head.weight.device)

    def get_device(self):
        return self.transformer.wte.weight.device

    def num_scaling_params(self):
        """Parameter counts by kind; the horizon uses transformer_matrices + lm_head."""
        counts = dict(
            wte=self.transformer.wte.weight.numel(),
            value_embeds=sum(p.numel() for p in self.value_embeds.parameters()),
            lm_head=self.lm_head.weight.numel(),
            transformer_matrices=sum(p.numel() for p in self.transformer.h.parameters()),
            scalars=sum(p.numel() for p in (self.resid_lambdas, self.x0_lambdas, self.smear_gate.weight,
                                            self.smear_lambda, self.backout_lambda)),
        )
        counts["total"] = sum(counts.values())
        assert counts["total"] == sum(p.numel() for p in self.parameters()), "a parameter is not counted"
        return counts

    def estimate_flops(self):
        """Training FLOPs per token: 6 per matmul weight plus the attention scores and values per layer.
        Counts every nn.Linear (subclasses included), so it stays right when layers are swapped (e.g. for fp8)."""
        matmul_params = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        head_dim = self.config.n_embd // self.config.n_head
        attn = sum(12 * self.config.n_head * head_dim * min(w, self.config.sequence_len) for w in self.window_sizes)
        return 6 * matmul_params + attn

    def setup_optimizer(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0,
                        scalar_lr=0.5):
        """AdamW for embeddings, lm_head and scalars; Muon for every matrix in the blocks (one group per shape)."""
        dmodel_lr_scale = (self.config.n_embd / 768) ** -0.5

        def adamw(params, lr, betas, wd):
            return dict(kind="adamw", params=list(params), lr=lr, betas=betas, eps=1e-10, weight_decay=wd)
        groups = [
            adamw([self.lm_head.weight], unembedding_lr * dmodel_lr_scale, (0.8, 0.96), 0.01),
            adamw([self.transformer.wte.weight], embedding_lr * dmodel_lr_scale, (0.8, 0.995), 0.001),
            adamw(self.value_embeds.parameters(), embedding_lr * dmodel_lr_scale * 0.5, (0.8, 0.995), 0.01),
            adamw([self.resid_lambdas], scalar_lr * 0.01, (0.8, 0.95), 0.05),
            adamw([self.x0_lambdas], scalar_lr, (0.96, 0.95), 0.0),
            adamw([self.smear_gate.weight, self.smear_lambda, self.backout_lambda], 0.2, (0.8, 0.95), 0.0),
        ]
        matrices = list(self.transformer.h.parameters())
        for shape in sorted({tuple(p.shape) for p in matrices}):
            groups.append(dict(kind="muon", params=[p for p in matrices if tuple(p.shape) == shape], lr=matrix_lr,
                               momentum=0.95, beta2=0.9, ns_steps=5, weight_decay=weight_decay))
        assert sum(len(g["params"]) for g in groups) == len(list(self.parameters())), "a parameter has no group"
        for group in groups:
            group["initial_lr"] = group["lr"]
        return MuonAdamW(groups)

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        """idx (B, T) token ids. Returns fp32 logits (B, T, vocab_size) without targets, else the cross-entropy
        (ignore_index=-1; loss_reduction 'mean', 'sum' or 'none' for per-token losses of shape (B*T,)).
        With a KVCache: inference on its first B rows (see forward_cached)."""
        if kv_cache is not None:
            return self.forward_cached(idx, kv_cache)
        B, T = idx.shape
        self._check_positions(T)
        x = norm(self.transformer.wte(idx).to(COMPUTE_DTYPE))
        x = self.hidden_states(idx, self._smear(x), self.cos[:, :T], self.sin[:, :T])
        if isinstance(self.lm_head, DecodeLinear) or targets is None or not self.chunked_loss or \
                loss_reduction == "none":
            logits = self.logits(x)
            if targets is None:
                return logits
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction=loss_reduction)
        weight = self.lm_head.weight[:self.config.vocab_size]  # crop the vocab padding
        return softcap_cross_entropy(x.flatten(0, 1), weight, targets.flatten(), loss_reduction)

    def _check_positions(self, end):
        """Positions 0..end-1 must have rotary angles (the tables hold 10 x sequence_len)."""
        if end > self.rotary_len:
            raise ValueError(f"positions up to {end - 1} exceed the rotary cache of {self.rotary_len} "
                             f"positions (10 x sequence_len): use shorter inputs or a larger sequence_len")

    def hidden_states(self, idx, x, cos, sin, kv=None):
        """The blocks over the (smeared) embeddings x: -> the normalized last hidden states (B, T, n_embd).
        kv: None (training), or (k layers, v layers, rows, slots, kv_len) of a cached forward (cached_logits)."""
        x0, x_backout, L = x, None, self.config.n_layer
        # the scalars unbound once, not indexed in every layer: at batch 1 each op counts
        lambdas = zip(self.resid_lambdas.unbind(), self.x0_lambdas.unbind())
        for i, (block, (resid_lambda, x0_lambda)) in enumerate(zip(self.transformer.h, lambdas)):
            x = resid_lambda * x + x0_lambda * x0
            ve = self.value_embeds[str(i)](idx).to(x.dtype) if str(i) in self.value_embeds else None
            layer_cache = None if kv is None else (kv[0][i], kv[1][i], *kv[2:])  # this layer's k, v and the slots
            x = block(x, ve, cos, sin, self.window_sizes[i], layer_cache)
            if i == L // 2:
                x_backout = x
        return norm(x - self.backout_lambda.to(x.dtype) * x_backout)  # subtract part of the mid-depth stream

    def logits(self, x):
        """fp32 logits over the vocabulary (its padding cropped), softcapped."""
        if isinstance(self.lm_head, DecodeLinear):  # decode weights (set_decode_dtype), already cropped
            return softcap(self.lm_head(x).float())
        return softcap(F.linear(x, self.lm_head.weight[:self.config.vocab_size].to(x.dtype)).float())

    def _smear(self, x, prev=None):
        """Add to each position a gated share of the previous position's (pre-smear) embedding; prev (B, 1, D): the
        one before the first position (a KV cache keeps it between chunks), None at the start of a sequence."""
        if prev is not None:
            gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[..., :24]))
            return x + gate * torch.cat([prev.to(x.dtype), x[:, :-1]], dim=1)
        if x.size(1) == 1:
            return x
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[:, 1:, :24]))
        return torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)

    @torch.no_grad()  # the cache is written in place: no gradients through it
    def forward_cached(self, idx, kv_cache):
        """Inference on the first B rows of kv_cache: T new tokens a row (rows at different positions take T=1),
        their keys and values written at each row's length, which then advances by T. Returns fp32 logits
        (B, T, V). Decode steps go through the compiled cached_logits after compile_decode()."""
        B, T = idx.shape
        lengths = kv_cache.lengths[:B]
        if T > 1 and min(lengths) != max(lengths):
            raise ValueError(f"rows at different positions decode one token at a time, got {T}")
        end = max(lengths) + T
        self._check_positions(end)
        if end > kv_cache.k_cache.size(2):
            raise ValueError(f"the KV cache holds {kv_cache.k_cache.size(2)} positions, {end} needed")
        prev = kv_cache.prev_embedding
        compiled = T == 1 and self.compiled_decode is not None
        # positions as a tensor for rows at different positions, and always when compiled (one graph for both)
        positions = kv_cache.cache_seqlens[:B].long() if compiled or min(lengths) != max(lengths) else None
        args = (self, idx, kv_cache.k_layers, kv_cache.v_layers, positions, None if prev is None else prev[:B], end)
        try:
            logits, last = (self.compiled_decode if compiled else cached_logits)(*args)
        except Exception as e:
            if not compiled:
                raise
            # torch.compile needs a working C++ compiler (or Triton on a GPU): decode eagerly instead
            warnings.warn(f"compiled decoding failed ({type(e).__name__}: {str(e)[:200]}); decoding without it")
            self.compiled_decode = None
            logits, last = cached_logits(*args)
        if prev is None or prev.size(0) == B:
            # own memory, not a view of this step's activations; contiguous strides: a compiled step guards on them
            kv_cache.prev_embedding = last.clone(memory_format=torch.contiguous_format)
        else:  # a batch with spare rows (continuous batching): keep the others' slots
            prev[:B] = last
        kv_cache.advance(T)
        return logits

    def compile_decode(self):
        """Run decode steps (one token a row, forward_cached) through torch.compile: one graph for every batch size
        and position, ~1.7x the eager tokens/s at batch 1 on a CPU (bench.py decode --compile). The first step
        compiles (10-50 s on a 2-core CPU, less when torch's compile cache has it), and so does the first of each
        shape torch specializes: one row in a one-row cache, one row in a larger cache, several rows."""
        self.compiled_decode = torch.compile(cached_logits, dynamic=True)

    def new_kv_cache(self, batch_size, seq_len):
        """An empty KV cache for `batch_size` rows of up to `seq_len` positions, on the model's device."""
        c = self.config
        return KVCache(batch_size, c.n_kv_head, seq_len, c.n_embd // c.n_head, c.n_layer, self.get_device())

    @torch.inference_mode()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """Naive batch-1 sampler without a KV cache (the reference the Engine is tested against); yields ids."""
        device = self.get_device()
        rng = torch.Generator(device=device).manual_seed(seed)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            next_id = sample_next_token(self.forward(ids)[:, -1, :], rng, temperature, top_k)
            ids = torch.cat([ids, next_id[:, None]], dim=1)
            yield next_id.item()


def cached_logits(gpt, idx, k_layers, v_layers, positions, prev, kv_len):
    """gpt's forward of T tokens for each of B cached rows, as a function of tensors only (what compile_decode
    compiles; forward_cached keeps the cache's bookkeeping outside). k_layers, v_layers: per-layer views
    (batch, time, heads, dim) of the cache, written at positions + 0..T-1; positions (B,): each row's length, or
    None when every row's is kv_len - T (no mask needed); prev: the smear state or None; kv_len: the longest
    row's length after this step. Passing the layers as separate views lets torch.compile write them in place (a
    slice of one cache tensor made it copy the whole cache every step).
    -> (logits (B, T, V), the last position's embedding before smear (B, 1, n_embd))."""
    B, T = idx.shape
    if positions is None:
        rows = slots = None
        cos, sin = gpt.cos[:, kv_len - T:kv_len], gpt.sin[:, kv_len - T:kv_len]
    else:
        rows = torch.arange(B, device=idx.device)[:, None]
        slots = positions[:, None] + torch.arange(T, device=idx.device)  # (B, T) cache positions of the new tokens
        cos, sin = gpt.cos[0, slots], gpt.sin[0, slots]  # (B, T, 1, head_dim)
    x = norm(gpt.transformer.wte(idx).to(COMPUTE_DTYPE))
    x, last = gpt._smear(x, prev), x[:, -1:]
    x = gpt.hidden_states(idx, x, cos, sin, kv=(k_layers, v_layers, rows, slots, kv_len))
    return gpt.logits(x), last


class DecodeLinear(Linear):
    """A Linear for inference with lower-precision weights: "bf16" (weights in bfloat16), "int8" (weight-only
    int8, one scale per output channel, multiplied by torch's int8 weight-only kernel on bf16 activations) or
    "int8a8" (the same weights times activations quantized to int8 per row, one int8 matmul: on CPUs with
    VNNI ~4x faster than the weight-only kernel at 8 rows, which dequantizes the weights again for every row).
    Decoding reads every weight once per step, so fewer bytes per weight is what makes it faster."""

    def forward(self, x):
        rows = x.reshape(-1, x.size(-1))
        if self.dtype == "int8a8":  # activations quantized too, one scale per row: an int8 x int8 matmul
            # few ops, in place where possible: at batch 1 each costs more than its arithmetic
            row_scale = torch.linalg.vector_norm(rows, float("inf"), dim=-1, keepdim=True).clamp_min_(1e-12).div_(127)
            y = torch._int_mm((rows / row_scale).round_().to(torch.int8), self.qweight.t()) * (row_scale * self.scales)
        elif self.dtype == "int8":
            y = torch._weight_int8pack_mm(rows.to(torch.bfloat16), self.qweight, self.scales)
        else:
            y = F.linear(rows.to(torch.bfloat16), self.qweight)
        return y.view(*x.shape[:-1], y.size(-1)).to(x.dtype)


DECODE_DTYPES = ("auto", "fp32", "bf16", "int8", "int8a8")


def default_decode_dtype(gpt):
    """int8a8 on the CPU for models whose fp32 matrices outgrow the caches (over 32 MB), where decoding is bound
    by reading them: on d6 with vocab 32768 (93 MB; bench.py decode, one thread, loadavg 4.5) 1.64x the fp32
    tokens/s at batch 1 and 2.04x at batch 8 (weight-only int8: 1.53x, 1.40x); on a d4 trained 300 steps its val
    bpb was 2.83017 against fp32's 2.83036, greedy tokens identical. A smaller model is read from cache and fp32
    is faster (d4 with vocab 4096, 17 MB: 2.0 ms a step in fp32, 4.8 ms in int8). On GPUs the compute dtype."""
    matrices = [m for m in gpt.transformer.h.modules() if isinstance(m, Linear)] + [gpt.lm_head]
    big = sum(m.weight.numel() for m in matrices) * 4 > 32 * 2 ** 20
    if gpt.get_device().type == "cpu" and big and gpt.config.n_embd % 64 == 0:
        return "int8a8"
    return "bf16" if COMPUTE_DTYPE == torch.bfloat16 else "fp32"


@torch.no_grad()
def set_decode_dtype(gpt, dtype="auto"):
    """Store gpt's matrices (blocks and lm_head, cropped to the vocab) for inference in `dtype` (DECODE_DTYPES):
    the model can no longer train. "fp32": the matrices as they are. Where the compute dtype is not fp32 (GPUs),
    the whole model is first cast to it once, not in every matmul. Returns the dtype chosen; "int8" needs a
    model width that is a multiple of 64. Greedy tokens may change where the top two logits nearly tie; bench.py
    decode prints what each dtype costs in bits per byte."""
    if dtype not in DECODE_DTYPES:
        raise ValueError(f"decode dtype {dtype!r} is not one of {', '.join(DECODE_DTYPES)}")
    dtype = default_decode_dtype(gpt) if dtype == "auto" else dtype
    if dtype == "int8a8" and gpt.get_device().type != "cpu":  # CUDA's int8 x int8 matmul wants 17+ rows
        raise ValueError("decode dtype int8a8 runs on the CPU only: use bf16 on a GPU")
    if dtype.startswith("int8") and gpt.config.n_embd % 64:  # torch's CPU int8 kernel crashes on some input widths
        raise ValueError(f"decode dtype int8 needs a model width that is a multiple of 64, not {gpt.config.n_embd}: "
                         f"use bf16 or fp32")
    if COMPUTE_DTYPE != torch.float32:
        gpt.to(COMPUTE_DTYPE)
    for block in gpt.transformer.h:  # q, k, v from one matrix: fewer, larger matmuls per token
        attn = block.attn
        qkv = torch.cat([attn.c_q.weight, attn.c_k.weight, attn.c_v.weight])
        with torch.device("meta"):
            attn.c_qkv = Linear(qkv.size(1), qkv.size(0))
        attn.c_qkv.weight = nn.Parameter(qkv, requires_grad=False)
        del attn.c_q, attn.c_k, attn.c_v
    if dtype == "fp32":
        return dtype
    # the matrices, not the small gates: torch's CPU int8 kernel crashes on input widths like 12 or 60
    layers = [m for m in gpt.transformer.h.modules() if isinstance(m, Linear) and m.in_features % 64 == 0]
    layers.append(gpt.lm_head)
    for m in layers:
        weight = m.weight[:gpt.config.vocab_size] if m is gpt.lm_head else m.weight
        del m.weight
        if dtype.startswith("int8"):
            scales = weight.float().abs().amax(dim=1).clamp_min(1e-12) / 127
            m.register_buffer("qweight", (weight.float() / scales[:, None]).round().to(torch.int8))
            m.register_buffer("scales", scales.to(torch.bfloat16 if dtype == "int8" else torch.float32))
        else:
            m.register_buffer("qweight", weight.to(torch.bfloat16))
        m.dtype = dtype
        m.__class__ = DecodeLinear
    return dtype


def sample_next_token(logits, rng, temperature=1.0, top_k=None, top_p=None):
    """(B, V) logits -> (B,) token ids. temperature 0 is greedy; top_k keeps the k most likely tokens,
    top_p the smallest set of them whose probability reaches p; draws come from the seeded `rng`."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs, ids = sampling_probs(logits, temperature, top_k, top_p)
    choice = torch.multinomial(probs, 1, generator=rng)
    return (choice if ids is None else ids.gather(-1, choice)).squeeze(-1)


def sampling_probs(logits, temperature, top_k=None, top_p=None):
    """What sample_next_token draws from: (probabilities (B, k), their token ids (B, k) or None for all V)."""
    ids = None
    if top_k is not None and 0 < top_k < logits.size(-1):
        logits, ids = torch.topk(logits, top_k, dim=-1)  # sorted, most likely first
    logits = logits / temperature
    if top_p is not None and top_p < 1.0:
        if ids is None:
            logits, ids = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # the most likely token always has 0 before it: kept
        logits = logits.masked_fill(mass_before >= top_p, float("-inf"))
    return F.softmax(logits, dim=-1), ids


def build_gpt(config, device):
    """Construct on the meta device (no memory, no wasted init), allocate on `device`, initialize."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return model


def load_gpt(model_config, state_dict, device):
    """A GPT from a saved config dict and state dict, also as the reference saves them: keys of a
    torch.compile'd model lose their `_orig_mod.` prefix, checkpoints from before sliding windows get the
    all-"L" pattern, those from before the per-layer residual scalars get their neutral values, and tensors
    are cast to the dtypes this device uses (bf16 embeddings become fp32 on the CPU)."""
    state_dict = {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()}
    config = GPTConfig(**{"window_pattern": "L", **model_config})
    if "resid_lambdas" not in state_dict:
        state_dict["resid_lambdas"] = torch.ones(config.n_layer)
        state_dict["x0_lambdas"] = torch.zeros(config.n_layer)
    model = build_gpt(config, device)
    model.load_state_dict(state_dict, strict=True)  # copying into the fresh parameters casts the dtypes
    return model


def keep_freed_memory():
    """CPU training speed: glibc hands every freed block above 32 MB back to the OS and page-faults it in again
    at the next allocation, and a training step allocates and frees gigabytes in such blocks (activations,
    gradients). Tell glibc to keep freed memory for reuse instead (measured: ~85% fewer page faults, ~6% less
    CPU time per step at the CPU demo shape, +1 GiB peak RSS). Opt-in, for a training process with a steady
    allocation pattern: the heap never shrinks and can fragment when big allocations vary (a run that also
    materialized full (B*T, vocab) logits reached 24 GiB). No-op where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)            # M_MMAP_MAX = 0: big blocks come from the heap, not from mmap
        libc.mallopt(-1, 2 ** 31 - 1)  # M_TRIM_THRESHOLD: do not return the top of the heap to the OS
    except (OSError, AttributeError):
        pass


SOFTCAP = 15.0


def softcap(logits):
    return SOFTCAP * torch.tanh(logits / SOFTCAP)


@torch.compiler.disable  # under torch.compile(model) the loss stays eager: a graph break, not an unrolled loop
def softcap_cross_entropy(x, weight, targets, reduction="mean", chunk_rows=None):
    """cross_entropy(softcap(x @ weight.T), targets, ignore_index=-1) for x (N, D), weight (V, D), targets (N,),
    without ever holding the (N, V) logits: rows go through in chunks, and under autograd the gradients are
    computed chunk by chunk during the forward, while each chunk's logits are still in cache (one set of passes
    over the logits instead of three, and no (N, V) fp32 tensors in memory)."""
    need_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    # CPU: chunks of ~4M logits (16 MB), at least 256 rows, that stay in cache: 1024 rows for a 4096 vocab (5% faster
    # than 256 on 2 cores), 256 for 32768; GPUs: large chunks keep kernels busy
    chunk_rows = chunk_rows or (max(256, 2 ** 22 // weight.size(0)) if x.device.type == "cpu" else 4096)
    return _SoftcapCrossEntropy.apply(x, weight, targets, reduction, chunk_rows, need_grad)


class _SoftcapCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, reduction, chunk_rows, need_grad):
        (N, D), V, device = x.shape, weight.size(0), x.device
        w = weight.to(x.dtype)
        valid = targets != -1
        count = valid.sum().clamp_min(1) if reduction == "mean" else torch.ones((), device=device)
        row_weight = valid / count  # d loss / d (loss of row i)
        t_buf = torch.empty((min(chunk_rows, N), V), dtype=torch.float32, device=device)  # reused by every chunk
        e_buf = torch.empty_like(t_buf)
        minus_cap, one = torch.tensor(-SOFTCAP, device=device), torch.tensor(1.0, device=device)
        dx = torch.empty_like(x) if need_grad else None
        dw = torch.zeros((V, D), dtype=torch.float32, device=device) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=device)
        for s in range(0, N, chunk_rows):
            xc = x[s:s + chunk_rows]
            n, tc = xc.size(0), targets[s:s + chunk_rows].clamp_min(0)
            t, e, rows = t_buf[:n], e_buf[:n], torch.arange(n, device=device)
            if x.dtype == torch.float32:
                torch.mm(xc * (1 / SOFTCAP), w.t(), out=t)
            else:
                t.copy_((xc * (1 / SOFTCAP)) @ w.t())
            t.tanh_()  # the softcapped logits are z = 15 t
            torch.addcmul(minus_cap, t, one, value=SOFTCAP, out=e).exp_()  # exp(z - 15): z <= 15, no overflow
            sumexp = e.sum(dim=1)  # logsumexp(z) = 15 + log(sumexp)
            t_target = t[rows, tc]
            total += ((SOFTCAP + sumexp.log() - SOFTCAP * t_target) * valid[s:s + n]).sum()
            if need_grad:
                # d loss_i / d logit_ij = r_i (e_ij / S_i - [j = target_i]) (1 - t_ij^2); the row factor r_i / S_i
                # is applied to the small (n, D) operands rather than to the (n, V) block
                e.addcmul_(e, t.square_(), value=-1)
                e[rows, tc] -= sumexp * (1 - t_target.square())
                scale = (row_weight[s:s + n] / sumexp)[:, None]
                dx[s:s + n] = (e.to(x.dtype) @ w) * scale
                dw.addmm_(e.t(), xc.float() * scale)
        if need_grad:
            ctx.save_for_backward(dx, dw)
            ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        dx, dw = ctx.saved_tensors
        return dx * grad_out.to(dx.dtype), (dw * grad_out).to(ctx.weight_dtype), None, None, None, None


# ---------------------------------------------------------------------------------------------------------------
# Inference KV cache


class KVCache:
    """Keys and values of every layer, laid out (layers, batch, time, kv_heads, head_dim), plus the smear state.
    A forward of B rows uses the first B; they may sit at different positions (continuous batching: see
    set_row, move_row), each row's length in cache_seqlens and, on the host, in lengths."""
    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, device, dtype=COMPUTE_DTYPE):
        shape = (num_layers, batch_size, seq_len, num_heads, head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self._split_layers()
        self.cache_seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.lengths = [0] * batch_size  # cache_seqlens on the host: no device sync per step
        self.pos = 0  # the longest of the rows in use, where a forward of equal-length rows writes
        self.prev_embedding = None  # (batch, 1, n_embd): normalized embedding of the last token seen

    def _split_layers(self):
        # one view per layer, each a tensor of its own for torch.compile (see cached_logits); select, not unbind,
        # whose views cannot be written in place outside inference mode
        self.k_layers = [self.k_cache[i] for i in range(self.k_cache.size(0))]
        self.v_layers = [self.v_cache[i] for i in range(self.v_cache.size(0))]

    def reset(self):
        self.cache_seqlens.zero_()
        self.lengths = [0] * len(self.lengths)
        self.pos = 0
        self.prev_embedding = None

    def get_pos(self):
        return self.pos

    def advance(self, num_tokens):
        self.cache_seqlens += num_tokens
        self.lengths = [n + num_tokens for n in self.lengths]
        self.pos += num_tokens

    def prefill(self, other):
        """Copy a batch-1 cache's filled prefix (and smear state) into every row of this one."""
        if other.k_cache.size(1) != 1:
            raise ValueError(f"prefill copies from a batch-1 cache, got batch {other.k_cache.size(1)}")
        if other.pos > self.k_cache.size(2):
            raise ValueError(f"prefix of {other.pos} tokens does not fit a cache of {self.k_cache.size(2)}")
        n = other.pos
        self.k_cache[:, :, :n] = other.k_cache[:, :, :n]
        self.v_cache[:, :, :n] = other.v_cache[:, :, :n]
        self.cache_seqlens.fill_(n)
        self.lengths = [n] * len(self.lengths)
        self.pos = n
        prev = other.prev_embedding
        self.prev_embedding = None if prev is None else \
            prev.expand(self.k_cache.size(1), -1, -1).clone(memory_format=torch.contiguous_format)

    def keep_rows(self, rows):
        """Shrink the batch to `rows` (a LongTensor of indices), so finished samples stop costing compute."""
        self.k_cache = self.k_cache.index_select(1, rows)
        self.v_cache = self.v_cache.index_select(1, rows)
        self._split_layers()
        self.cache_seqlens = self.cache_seqlens.index_select(0, rows)
        self.lengths = [self.lengths[i] for i in rows.tolist()]
        if self.prev_embedding is not None:
            self.prev_embedding = self.prev_embedding.index_select(0, rows)

    def set_row(self, row, other, rows_in_use):
        """Put a batch-1 cache's filled prefix (a prefilled prompt) into `row`, next to rows at other positions;
        rows_in_use: how many rows the next forward runs (row included)."""
        n = other.pos
        if n > self.k_cache.size(2):
            raise ValueError(f"prefix of {n} tokens does not fit a cache of {self.k_cache.size(2)}")
        self.k_cache[:, row, :n] = other.k_cache[:, 0, :n]
        self.v_cache[:, row, :n] = other.v_cache[:, 0, :n]
        self.cache_seqlens[row] = n
        self.lengths[row] = n
        if self.prev_embedding is None:
            prev = other.prev_embedding
            self.prev_embedding = prev.new_zeros((self.k_cache.size(1), *prev.shape[1:]))
        self.prev_embedding[row] = other.prev_embedding[0]
        self.use_rows(rows_in_use)

    def move_row(self, src, dst, rows_in_use):
        """Row src takes the place of row dst (which is freed): keeps the rows in use at the front."""
        n = self.lengths[src]
        self.k_cache[:, dst, :n] = self.k_cache[:, src, :n]
        self.v_cache[:, dst, :n] = self.v_cache[:, src, :n]
        self.cache_seqlens[dst] = n
        self.lengths[dst] = n
        self.prev_embedding[dst] = self.prev_embedding[src]
        self.use_rows(rows_in_use)

    def use_rows(self, count):
        """The next forward runs the first `count` rows: it writes at the longest one's position."""
        self.pos = max(self.lengths[:count], default=0)


# ---------------------------------------------------------------------------------------------------------------
# Optimizer: AdamW for embeddings/scalars, Muon for the block matrices, ZeRO-2 sharding under torch.distributed

# torch >= 2.13 renamed the single-tensor collectives (the old names warn); older versions have only the old ones
reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

POLAR_EXPRESS_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def adamw_update(p, g, exp_avg, exp_avg_sq, step, lr, betas, eps, wd):
    """One AdamW step: p *= 1 - lr*wd; Adam moments with bias correction; math in fp32 even when p, g and the
    moments are stored in bf16. Runs torch's fused single-pass kernel on CPU and CUDA (measured 5x faster on the
    CPU than the same math written as separate tensor ops), its plain version elsewhere. `step`: a 0-D tensor."""
    adamw([p], [g], [exp_avg], [exp_avg_sq], [], [step], fused=p.device.type in ("cpu", "cuda"), foreach=False,
          amsgrad=False, beta1=betas[0], beta2=betas[1], lr=lr, weight_decay=wd, eps=eps, maximize=False)


def muon_update(p, g, momentum_buffer, second_moment, lr, momentum, beta2, wd, ns_steps):
    """Muon on a stack of same-shaped matrices p, g: (K, m, n). Updates p, the buffers and g in place."""
    m, n = p.shape[-2:]
    fro = lambda t: t.norm(dim=(-2, -1), keepdim=True)
    momentum_buffer.lerp_(g, 1 - momentum)
    g = g.lerp_(momentum_buffer, momentum)  # Nesterov
    x = g.to(torch.bfloat16) if COMPUTE_DTYPE == torch.bfloat16 else g
    x = x * (fro(x) / math.sqrt(m)) / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)  # MuonEq: equal row norms
    x = x / (1.01 * fro(x) + 1e-6)
    for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:  # Polar Express: x -> its nearest semi-orthogonal matrix
        # x <- a x + x (b A + c A^2) with A = x^T x (tall; mirrored for wide), each line one fused baddbmm
        A = x.mT @ x if m > n else x @ x.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        x = torch.baddbmm(x, x, B, beta=a) if m > n else torch.baddbmm(x, B, x, beta=a)
    g = x.to(p.dtype)
    g = g * (math.sqrt(min(m, n)) / fro(g).clamp_min(1e-12))  # Muon+: fixed Frobenius norm
    # NorMuon: normalize rows (or columns, for wide matrices) by a running second moment, keep the Frobenius norm
    second_moment.lerp_(g.square().mean(dim=-1 if m >= n else -2, keepdim=True), 1 - beta2)
    scaled = g * second_moment.clamp_min(1e-10).rsqrt()
    g = scaled * (fro(g) / fro(scaled).clamp_min(1e-12))
    lr = lr * math.sqrt(max(1.0, m / n))
    decay = (g * p >= 0).to(p.dtype) * (lr * wd)  # cautious weight decay: only where update and weight agree
    p.sub_(lr * g + decay * p)


class MuonAdamW(torch.optim.Optimizer):
    """Groups with kind="adamw" (lr, betas, eps, weight_decay) or kind="muon" (lr, momentum, beta2, ns_steps,
    weight_decay). Hyperparameters are read from the groups at every step, so schedules may change them freely.
    When torch.distributed is initialized with several ranks, step() also averages the gradients ZeRO-2 style:
    reduce-scatter, each rank updates its shard (and keeps only that shard's state), all-gather."""
    def __init__(self, param_groups):
        super().__init__(param_groups, defaults={})

    @torch.no_grad()
    def step(self):
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        jobs = []  # phase 1: start every gradient reduction; phase 2: update + start gathers; phase 3: copy back
        for group in self.param_groups:
            if group["kind"] == "adamw":
                jobs += [self._adamw_job(group, p, world, rank) for p in group["params"] if p.grad is not None]
            elif group["kind"] == "muon":
                if any(p.grad is not None for p in group["params"]):
                    jobs.append(self._muon_job(group, world, rank))
            else:
                raise ValueError(f"unknown optimizer group kind {group['kind']!r}: use 'adamw' or 'muon'")
        finishers = [job() for job in jobs]
        for finish in finishers:
            if finish is not None:
                finish()

    def _adamw_job(self, group, p, world, rank):
        grad = p.grad
        sharded = world > 1 and p.numel() >= 1024 and p.size(0) % world == 0
        if sharded:  # this rank owns rows [rank*s, (rank+1)*s)
            s = p.size(0) // world
            grad = torch.empty_like(p[:s])
            work = reduce_scatter(grad, p.grad, op=dist.ReduceOp.SUM, async_op=True)
            target = p[rank * s:(rank + 1) * s]
        elif world > 1:
            grad = p.grad.clone()
            work = dist.all_reduce(grad, op=dist.ReduceOp.SUM, async_op=True)
            target = p
        else:
            work, target = None, p

        def update():
            if work is not None:
                work.wait()
                grad.div_(world)  # SUM then divide: gloo has no AVG
            state = self.state[p]
            if not state:  # step: a tensor the kernel increments
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(target)
                state["exp_avg_sq"] = torch.zeros_like(target)
            adamw_update(target, grad, state["exp_avg"], state["exp_avg_sq"], state["step"], group["lr"],
                         group["betas"], group["eps"], group["weight_decay"])
            if not sharded:
                return None
            gather = all_gather(p, target.clone(), async_op=True)
            return gather.wait
        return update

    def _muon_job(self, group, world, rank):
        params = group["params"]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        K = len(params)
        chunk = -(-K // world)  # this rank updates params [rank*chunk, rank*chunk + chunk)
        grads = torch.stack([p.grad for p in params])
        if world > 1:
            if chunk * world > K:
                grads = torch.cat([grads, grads.new_zeros((chunk * world - K, *grads.shape[1:]))])
            own_grads = grads.new_empty((chunk, *grads.shape[1:]))
            work = reduce_scatter(own_grads, grads, op=dist.ReduceOp.SUM, async_op=True)
        else:
            own_grads, work = grads, None

        def update():
            if work is not None:
                work.wait()
                own_grads.div_(world)
            own = params[rank * chunk:(rank + 1) * chunk]  # may be short (or empty) on the last ranks
            stacked = torch.zeros((chunk, *params[0].shape), dtype=params[0].dtype, device=params[0].device)
            if own:
                stacked[:len(own)] = torch.stack(own)
            state = self.state[params[0]]
            if not state:
                m, n = stacked.shape[-2:]
                state["momentum_buffer"] = torch.zeros_like(stacked)
                state["second_momentum_buffer"] = stacked.new_zeros((chunk, m, 1) if m >= n else (chunk, 1, n))
            muon_update(stacked, own_grads.to(stacked.dtype), state["momentum_buffer"],
                        state["second_momentum_buffer"], group["lr"], group["momentum"], group["beta2"],
                        group["weight_decay"], group["ns_steps"])
            if world == 1:
                for p, new in zip(params, stacked):
                    p.copy_(new)
                return None
            gathered = stacked.new_empty((chunk * world, *stacked.shape[1:]))
            gather = all_gather(gathered, stacked, async_op=True)

            def finish():
                gather.wait()
                for p, new in zip(params, gathered):
                    p.copy_(new)
            return finish
        return update


# ---------------------------------------------------------------------------------------------------------------
# Sliding-window attention with FlexAttention: CUDA training without FA3, in O(T * window) block-sparse kernels

FLEX_ON_CUDA = torch.cuda.is_available() and importlib.util.find_spec("triton") is not None  # compiles to Triton
_BLOCK_MASKS = {}  # (T, window, device) -> BlockMask, for eager callers


def _window_block_mask(T, window, device):
    return create_block_mask(lambda b, h, q, k: (k <= q) & (q - k <= window), None, None, T, T, device=device)


def flex_block_mask(T, window, device):
    """The block mask of causal attention at most `window` positions back, over T queries and keys: built once per
    (T, window, device) in eager mode. Under torch.compile it is built inside the graph instead (one pass over T x T
    booleans, small next to the attention it masks): filling a cache while tracing makes dynamo compile the whole
    model a second time, to guard on the filled cache."""
    if torch.compiler.is_compiling():
        return _window_block_mask(T, window, device)
    key = (T, window, str(device))
    if key not in _BLOCK_MASKS:
        _BLOCK_MASKS[key] = _window_block_mask(T, window, device)
    return _BLOCK_MASKS[key]


@functools.cache
def _compiled_flex_attention():
    return torch.compile(flex_attention, dynamic=False)


def flex_sliding_window_attention(q, k, v, window):
    """Sliding-window causal attention through FlexAttention; q, k, v: (B, H, T, hd) with equal T.
    Compiled on CUDA (inside a compiled model the model's compile covers it); eager elsewhere, where it materializes
    the scores and has no backward on the CPU: a reference there. attention() picks it for training only: with
    dynamic=False, every new inference length would compile again."""
    compiled = q.is_cuda and not torch.compiler.is_compiling()
    fn = _compiled_flex_attention() if compiled else flex_attention
    return fn(q, k, v, block_mask=flex_block_mask(q.size(2), window, q.device), enable_gqa=q.size(1) != k.size(1))


# ---------------------------------------------------------------------------------------------------------------
# FP8 training: the block matrices multiply in float8 through torch._scaled_mm, forward and both backward matmuls,
# with dynamic scales. Weights stay in full precision, so checkpoints are ordinary ones.

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2  # e4m3: activations, weights; e5m2 (wider range): gradients
FP8_RECIPES = ("tensorwise", "rowwise")


def check_fp8_support(device):
    """Raise a one-line ValueError where fp8 matmuls cannot run. The CPU runs them (slowly), so they can be tested."""
    device = torch.device(device)
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    if capability is not None and capability < (8, 9):
        major, minor = capability
        raise ValueError(f"fp8 needs an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell); "
                         f"{torch.cuda.get_device_name(device)} has {major}.{minor}: train without --fp8")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"fp8 runs on CUDA (capability 8.9+) or the CPU, not on {device.type}: train without --fp8")


def to_fp8(x, dtype, dim=None):
    """Quantize 2-D x with a dynamic scale that maps its largest magnitude to the format's largest value: one scale
    for the tensor (dim None) or one per slice along `dim`, the axis a matmul contracts. Returns the fp8 tensor and
    the inverse scale (float32, what _scaled_mm multiplies back in)."""
    amax = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    fmax = torch.finfo(dtype).max
    scale = fmax / amax.float().clamp_min(1e-12)
    xq = (x.float() * scale).clamp(-fmax, fmax).to(dtype)  # saturate: e4m3 has no inf, an overflow would be NaN
    return xq, scale.reciprocal()


def _transposed(quantized):
    xq, inv = quantized
    # _scaled_mm checks the scales' strides too, and .contiguous() keeps a transposed (N, 1) tensor's strides
    return xq.t().contiguous(), inv.t().clone(memory_format=torch.contiguous_format)


def fp8_mm(a, b, out_dtype, fast_accum):
    """a @ b.T for quantized (tensor, inverse scale) pairs a (M, K) and b (N, K), both row-major: b.T is then the
    column-major second operand cuBLAS's fp8 kernels require. Row scales are (M, 1) for a and (N, 1) for b."""
    (aq, a_inv), (bq, b_inv) = a, b
    return torch._scaled_mm(aq, bq.t(), scale_a=a_inv, scale_b=b_inv.t(), out_dtype=out_dtype,
                            use_fast_accum=fast_accum)


class _Fp8Matmul(torch.autograd.Function):
    """y = x @ w.T with all three matmuls in fp8. Tensorwise keeps the fp8 x and w for backward (half the bytes
    of bf16) and transposes them there; rowwise keeps x and w themselves, because the backward matmuls contract
    along the other axis and so need scales along the other axis (as torchao's rowwise does)."""
    @staticmethod
    def forward(ctx, x, w, recipe):
        dim = -1 if recipe == "rowwise" else None
        xq, wq = to_fp8(x, E4M3, dim), to_fp8(w, E4M3, dim)
        ctx.recipe = recipe
        if recipe == "rowwise":
            ctx.save_for_backward(x, w)
        else:
            ctx.save_for_backward(*xq, *wq)
        return fp8_mm(xq, wq, x.dtype, fast_accum=True)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        if ctx.recipe == "rowwise":
            x, w = ctx.saved_tensors
            g_rows, g_cols = to_fp8(grad, E5M2, -1), to_fp8(grad, E5M2, 0)
            x_cols, w_cols = to_fp8(x, E4M3, 0), to_fp8(w, E4M3, 0)
        else:
            xq, x_inv, wq, w_inv = ctx.saved_tensors
            g_rows = g_cols = to_fp8(grad, E5M2)
            x_cols, w_cols = (xq, x_inv), (wq, w_inv)
        # accumulate the gradients in full precision (no fast accumulation), as the reference does
        dx = fp8_mm(g_rows, _transposed(w_cols), grad.dtype, fast_accum=False)              # grad @ w
        dw = fp8_mm(_transposed(g_cols), _transposed(x_cols), grad.dtype, fast_accum=False)  # grad.T @ x
        return dx, dw, None


class Fp8Linear(Linear):
    """A Linear whose matmuls run in fp8 while fp8_recipe is set ("tensorwise" or "rowwise"); None: plain Linear.
    enable_fp8 turns Linear modules into this class in place: parameters, state-dict keys and the optimizer's
    references to the weights stay the same."""
    fp8_recipe = None

    def forward(self, x):
        rows = x.numel() // x.size(-1)
        if self.fp8_recipe is None or rows % 16:  # _scaled_mm on CUDA needs every size a multiple of 16
            return super().forward(x)
        y = _Fp8Matmul.apply(x.reshape(rows, x.size(-1)), self.weight.to(x.dtype), self.fp8_recipe)
        return y.view(*x.shape[:-1], self.out_features)


def fp8_eligible(module):
    """The reference's filter: both sizes multiples of 16 (a _scaled_mm requirement) and at least 128 (smaller
    matrices lose more to the casts than fp8 gains). Picks every block matrix, not the value-embedding gates."""
    return (isinstance(module, Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0
            and min(module.in_features, module.out_features) >= 128)


def enable_fp8(gpt, recipe="tensorwise"):
    """Train gpt's eligible block matrices in fp8 (call before torch.compile); returns how many were converted.
    lm_head passes the filter but stays as it is: GPT.forward applies its weight directly, in the chunked loss."""
    if recipe not in FP8_RECIPES:
        raise ValueError(f"fp8 recipe {recipe!r} is not one of {', '.join(FP8_RECIPES)}")
    layers = [m for m in gpt.transformer.h.modules() if fp8_eligible(m)]
    for m in layers:
        m.__class__ = Fp8Linear
        m.fp8_recipe = recipe
    return len(layers)


@contextlib.contextmanager
def fp8_disabled(gpt):
    """Inside the block gpt's fp8 layers run as plain Linear (evaluation, sampling); a compiled gpt recompiles once
    for it, since the graphs are guarded on fp8_recipe."""
    layers = [(m, m.fp8_recipe) for m in gpt.modules() if isinstance(m, Fp8Linear)]
    for m, _ in layers:
        m.fp8_recipe = None
    try:
        yield gpt
    finally:
        for m, recipe in layers:
            m.fp8_recipe = recipe
