"""Public attention ops. The caller picks the op by use; each op picks its fastest path, or the
caller names one (`backend=`).

- `sliding_window_attention`: causal attention with a window of k keys over a whole sequence
  (prefix blocks). First-order gradients only.
    auto: flash-attn (GPU, fp16/bf16, when installed) > our Triton kernel (GPU) > blocked PyTorch
    (CPU; O(T * k) memory, never T x T). A window covering the sequence is plain causal SDPA.
- `chunk_attention`: b queries over a [cache + chunk] buffer (TTT suffix). Differentiable twice.
    fused (default): registered ops with a hand-written double backward (chunk.py); Triton
    forward/backward on GPU, dense PyTorch per chunk elsewhere.
    math: matmul + softmax through autograd (reference.py), the path the official code runs.
  `chunk_backend("math")` switches the default for a block of code (benchmarks, parity checks).

Files: reference.py (plain PyTorch, what every path is compared with), triton_swa.py (kernels),
chunk.py (the registered ops and the double backward), flash.py (flash-attn dispatch),
self_check.py (on a GPU, the Triton kernels are checked against PyTorch before their first
automatic use; a failure warns and falls back, or raises under TTTE2E_ATTENTION=triton).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from . import chunk, flash, reference, self_check, triton_swa

PREFIX_BACKENDS = ("auto", "flash", "triton", "blocked", "naive")
CHUNK_BACKENDS = ("fused", "triton", "math")
_default_chunk_backend = "fused"


def _one_dtype(q, k, v):
    """The registered ops run below autocast, so cast here as autocast would for the matmuls (the
    suffix concatenates a float32 cache with bf16 keys under autocast); else promote."""
    device = q.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def prefix_backend(device_type: str, dtype: torch.dtype) -> str:
    """What `auto` runs for the prefix on this device and dtype (before the Triton self-check)."""
    if device_type == "cuda" and flash.flash_attn_func is not None and dtype in flash.DTYPES:
        return "flash"
    if (
        device_type in self_check.TRITON_DEVICES
        and triton_swa.AVAILABLE
        and dtype in triton_swa.SUPPORTED_DTYPES
    ):
        return "triton"
    return "blocked"


def sliding_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, backend: str = "auto"
) -> torch.Tensor:
    """Causal attention where query t sees keys t-window+1..t; q, k, v: [B, H, T, dh]."""
    if backend not in PREFIX_BACKENDS:
        raise ValueError(
            f"unknown prefix attention backend {backend!r}; choose one of {PREFIX_BACKENDS}"
        )
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if backend == "auto":
        if window >= q.shape[-2]:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        backend = prefix_backend(q.device.type, q.dtype)
        if self_check.forced() and triton_swa.usable(q):
            backend = "triton"  # TTTE2E_ATTENTION=triton: ours, even where flash-attn is
        if backend == "triton" and (
            torch.compiler.is_compiling() or not self_check.triton_allowed(q)
        ):
            # compiled: SDPA per block, which torch.compile traces (the registered Triton ops
            # have no fake implementation)
            backend = "blocked"
    if backend == "flash":
        return flash.sliding_window_attention(q, k, v, window)
    if backend == "triton":
        if not triton_swa.usable(q):
            raise RuntimeError(
                f"the Triton kernel needs a GPU (or TRITON_INTERPRET=1 on CPU) and "
                f"fp16/bf16/fp32; got {q.device.type} {q.dtype}"
            )
        return chunk.window_attention(*_one_dtype(q, k, v), window, 0, use_triton=True)
    if backend == "naive":
        return reference.naive_sliding_window_attention(q, k, v, window)
    return reference.blocked_sliding_window_attention(q, k, v, window)


def chunk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    first_valid_key: int = 0,
    backend: str | None = None,
) -> torch.Tensor:
    """b queries (the last b of the buffer) over [cache + chunk]; q [B,H,b,dh], k/v [B,H,W+b,dh].
    Supports create_graph=True and a second backward on every backend."""
    backend = backend or _default_chunk_backend
    if backend not in CHUNK_BACKENDS:
        raise ValueError(
            f"unknown chunk attention backend {backend!r}; choose one of {CHUNK_BACKENDS}"
        )
    if backend == "math":
        return reference.chunk_attention(q, k, v, window, first_valid_key)
    if backend == "triton" and not triton_swa.usable(q):
        raise RuntimeError(
            f"the Triton kernel needs a GPU (or TRITON_INTERPRET=1 on CPU) and "
            f"fp16/bf16/fp32; got {q.device.type} {q.dtype}"
        )
    q, k, v = _one_dtype(q, k, v)
    use_triton = backend == "triton" or (triton_swa.usable(q) and self_check.triton_allowed(q))
    return chunk.window_attention(q, k, v, window, first_valid_key, use_triton=use_triton)


@contextlib.contextmanager
def chunk_backend(name: str):
    """Run a block of code with another default chunk attention backend ('fused' or 'math')."""
    global _default_chunk_backend
    if name not in CHUNK_BACKENDS:
        raise ValueError(
            f"unknown chunk attention backend {name!r}; choose one of {CHUNK_BACKENDS}"
        )
    previous, _default_chunk_backend = _default_chunk_backend, name
    try:
        yield
    finally:
        _default_chunk_backend = previous


__all__ = [
    "sliding_window_attention",
    "chunk_attention",
    "chunk_backend",
    "prefix_backend",
    "reference",
    "chunk",
    "triton_swa",
    "flash",
    "self_check",
]
