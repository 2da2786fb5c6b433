"""flash-attn's sliding-window attention for the prefix (GPU, fp16/bf16, first order only).

flash-attn is the optional `gpu` extra; without it (or on CPU) the public op falls back to our
Triton kernel or blocked PyTorch. Its layout is [B, T, H, dh] and `window_size=(left, right)`
lets query i see keys i-left..i+right: our window of k keys, the query's own included, is
(k - 1, 0) with causal=True.
"""

from __future__ import annotations

import torch

try:
    from flash_attn import flash_attn_func
except ImportError:  # not installed, or built for another torch/CUDA
    flash_attn_func = None

DTYPES = (torch.float16, torch.bfloat16)


def usable(q: torch.Tensor) -> bool:
    return flash_attn_func is not None and q.is_cuda and q.dtype in DTYPES


def sliding_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int
) -> torch.Tensor:
    """q, k, v: [B, H, T, dh] -> [B, H, T, dh]; query t sees keys t-window+1..t."""
    if flash_attn_func is None:
        raise RuntimeError("flash-attn is not installed (the `gpu` extra)")
    out = flash_attn_func(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        causal=True,
        window_size=(window - 1, 0),
    )
    return out.transpose(1, 2)
