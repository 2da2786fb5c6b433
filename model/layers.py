"""Building blocks: RMSNorm, interleaved RoPE, SwiGLU, QK-normed attention, the (TTT) block.

Conventions of the official code (tests/data/README.md; what the official model computes): sandwich norms
(pre and post), QK-norm before RoPE with one [head_dim] gain shared by all heads, RoPE on
interleaved pairs (x[2i], x[2i+1]), no biases. Weights are nn.Linear ([out, in]); the converter
transposes the official [in, out] layout.

Fast weights (the prime MLP's w1/w3/w2 in TTT blocks) can be passed in explicitly, batched per
sequence ([B, out, in]), so every sequence carries its own copy through the inner loop.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ttte2e.kernels.attention import chunk_attention, sliding_window_attention

FastWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (w1, w3, w2), each [B, out, in]


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half types to float32; leave float32/float64 alone (float64 is used by FD tests)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class RMSNorm(nn.Module):
    """g * x / sqrt(mean(x^2) + eps), computed in float32, no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = at_least_fp32(x)
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * at_least_fp32(weight)).to(x.dtype)


def rope_angles(
    positions: torch.Tensor, head_dim: int, theta: float, angle_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """exp(1j * p * theta^(-2i/dh)) as complex64 [*positions.shape, head_dim/2]; angles built in
    float32 as the official code builds them. Decode rotates each key once at its absolute
    position: float64 angles there keep q.k's relative phase at float32 round-off at any
    position (float32 angles would be off by ~1e-3 rad at 32K)."""
    exponents = torch.arange(0, head_dim, 2, dtype=angle_dtype, device=positions.device) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    angles = positions.to(angle_dtype)[..., None] * inv_freq
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) as complex numbers (interleaved convention, not rotate-half);
    x: [B, H, P, dh], rotation: complex [P, dh/2] (one complex multiply: few ops under double
    backward) or its real view [P, dh/2, 2]."""
    if not rotation.is_complex():
        # [P, dh/2, 2] (cos, sin): the compiled path's form, as Inductor generates no code for
        # complex operators; the same rotation in real arithmetic
        pairs = at_least_fp32(x).unflatten(-1, (-1, 2))
        cos_sin = rotation.to(pairs.dtype)
        x0, x1, cos, sin = pairs[..., 0], pairs[..., 1], cos_sin[..., 0], cos_sin[..., 1]
        return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), -1).flatten(-2).to(x.dtype)
    xc = torch.view_as_complex(at_least_fp32(x).unflatten(-1, (-1, 2)).contiguous())
    if xc.dtype != rotation.dtype:
        rotation = rotation.to(xc.dtype)
    return torch.view_as_real(xc * rotation).flatten(-2).to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T for a shared [out, in] weight or a per-sequence batch [B, out, in]."""
    if weight.dim() == 2:
        return F.linear(x, weight)
    return torch.matmul(x, weight.transpose(-1, -2))


def swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """w2(silu(w1 x) * w3 x); weights shared or batched per sequence."""
    return linear(F.silu(linear(x, w1)) * linear(x, w3), w2)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor, fast: FastWeights | None = None) -> torch.Tensor:
        w1, w3, w2 = fast if fast is not None else (self.w1.weight, self.w3.weight, self.w2.weight)
        return swiglu(x, w1, w3, w2)


class Attention(nn.Module):
    """Multi-head attention with QK-norm and interleaved RoPE; the window is given per call."""

    def __init__(self, dim: int, n_heads: int, eps: float):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.k_norm = RMSNorm(self.head_dim, eps)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [B, P, d] -> [B, H, P, dh], head-major
        return x.unflatten(-1, (self.n_heads, self.head_dim)).transpose(1, 2)

    def project(self, x: torch.Tensor):
        """q, k (QK-normed, before RoPE) and v, each [B, H, P, dh]."""
        q = self.q_norm(self._heads(self.wq(x)))
        k = self.k_norm(self._heads(self.wk(x)))
        return q, k, self._heads(self.wv(x))

    def _out(self, o: torch.Tensor) -> torch.Tensor:
        return self.wo(o.transpose(1, 2).flatten(2))

    def forward(self, x: torch.Tensor, rope: torch.Tensor, window: int):
        """Whole sequence, absolute positions; rope = rotations for positions 0..P-1."""
        return self.forward_kv(x, rope, window)[0]

    def forward_kv(self, x: torch.Tensor, rope: torch.Tensor, window: int):
        """forward, also returning k (pre-RoPE) and v [B, H, P, dh] (a decode cache)."""
        q, k, v = self.project(x)
        o = sliding_window_attention(apply_rope(q, rope), apply_rope(k, rope), v, window)
        return self._out(o), k, v

    def forward_chunk(self, x, cache_k, cache_v, rope, window: int, first_valid_key: int):
        """One chunk over [cache; chunk] with buffer-local positions 0..W+b-1 (as the official code);
        cache rows before first_valid_key are before the sequence start.

        Returns the output and the chunk's k (pre-RoPE) and v, which the caller appends to the cache.
        """
        q, k, v = self.project(x)
        # cache rows before the sequence start are masked for every query: left out of the
        # matmuls (positions stay buffer-local, so the kept rows' rotations are unchanged)
        keys = torch.cat((cache_k[:, :, first_valid_key:], k), dim=2)
        values = torch.cat((cache_v[:, :, first_valid_key:], v), dim=2)
        o = chunk_attention(
            apply_rope(q, rope[-q.shape[2] :]),
            apply_rope(keys, rope[first_valid_key:]),
            values,
            window,
            0,
        )
        return self._out(o), k, v


class Block(nn.Module):
    """h -> h + post(attn(pre(h))) [-> + post(prime_mlp(pre(.)))] -> + post(mlp(pre(.)))."""

    def __init__(self, dim: int, n_heads: int, hidden: int, eps: float, ttt: bool):
        super().__init__()
        self.attn_norm = RMSNorm(dim, eps)
        self.attn = Attention(dim, n_heads, eps)
        self.attn_post_norm = RMSNorm(dim, eps)
        self.ttt = ttt
        if ttt:
            self.prime_norm = RMSNorm(dim, eps)
            self.prime_mlp = SwiGLU(dim, hidden)
            self.prime_post_norm = RMSNorm(dim, eps)
        self.mlp_norm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, hidden)
        self.mlp_post_norm = RMSNorm(dim, eps)

    def _mlps(self, a: torch.Tensor, fast: FastWeights | None) -> torch.Tensor:
        if self.ttt:
            a = a + self.prime_post_norm(self.prime_mlp(self.prime_norm(a), fast))
        return a + self.mlp_post_norm(self.mlp(self.mlp_norm(a)))

    def forward(self, h, rope, window: int, fast: FastWeights | None = None):
        return self.forward_kv(h, rope, window, fast)[0]

    def forward_kv(self, h, rope, window: int, fast: FastWeights | None = None):
        """forward, also returning the attention's k (pre-RoPE) and v (a decode cache)."""
        attn_out, k, v = self.attn.forward_kv(self.attn_norm(h), rope, window)
        a = h + self.attn_post_norm(attn_out)
        return self._mlps(a, fast), k, v

    def forward_attending(self, h, attend, fast: FastWeights | None = None):
        """The block with its attention core supplied: attend(q, k, v) -> o on QK-normed,
        un-rotated q, k and v [B, H, P, dh] (decode attends over its own KV buffers)."""
        q, k, v = self.attn.project(self.attn_norm(h))
        a = h + self.attn_post_norm(self.attn._out(attend(q, k, v)))
        return self._mlps(a, fast)

    def forward_chunk(
        self, h, cache_k, cache_v, rope, window: int, first_valid_key: int, fast: FastWeights
    ):
        attn_out, k, v = self.attn.forward_chunk(
            self.attn_norm(h), cache_k, cache_v, rope, window, first_valid_key
        )
        a = h + self.attn_post_norm(attn_out)
        return self._mlps(a, fast), k, v
