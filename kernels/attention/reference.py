"""Plain PyTorch attention ops: the reference every faster path is compared with.

Layout everywhere: q, k, v are [batch, heads, positions, head_dim]. Visibility is by position:
key j is visible to query t iff t - window < j <= t (the query's own position included) and the key
is valid (zero-padded cache rows before the sequence start are not).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# The official code replaces masked scores by -0.7 * float32 max (not -inf), so a fully masked
# row could never produce NaN; every row here sees at least its own position.
_MASK_FILL = -0.7 * torch.finfo(torch.float32).max  # finite in float32 and float64


def window_mask(q_positions: torch.Tensor, k_positions: torch.Tensor, window: int) -> torch.Tensor:
    """Boolean [Tq, Tk] mask, True where key is visible: q - window < k <= q."""
    diff = q_positions[:, None] - k_positions[None, :]
    return (diff >= 0) & (diff < window)


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor
) -> torch.Tensor:
    """Dense attention with an explicit boolean mask (True = visible), softmax in float32.

    Built from matmul + softmax only, so it supports gradients of gradients (create_graph=True):
    this is the math path the TTT suffix needs.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-1, -2))
    if scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.float()
    scores = scores * scale
    scores = scores.masked_fill(~visible, _MASK_FILL)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v)


def naive_sliding_window_attention(q, k, v, window: int) -> torch.Tensor:
    """O(T^2) reference: full [T, T] mask with the sliding window (window >= T = causal)."""
    positions = torch.arange(q.shape[-2], device=q.device)
    return masked_attention(q, k, v, window_mask(positions, positions, window))


def blocked_sliding_window_attention(q, k, v, window: int, block_size: int | None = None):
    """Sliding-window causal attention in O(T * window) time and memory (never T x T).

    Queries are cut into blocks; a block [s, e) only looks at keys [s - window + 1, e).
    First-order gradients only are needed where this runs (the prefix), so each block uses SDPA.
    """
    seq = q.shape[-2]
    if window >= seq:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    block = block_size or max(32, min(window, 256))
    # Additive masks, one per distinct block shape: SDPA saves the mask it is given for its
    # backward, so a bool mask (converted per call) would keep a [block, block + window] float
    # copy per block, ~(block + window) floats per token; every full block shares one here.
    masks: dict[tuple[int, int], torch.Tensor] = {}
    out = []
    for start in range(0, seq, block):
        end = min(seq, start + block)
        k_start = max(0, start - window + 1)
        shape = (end - start, end - k_start)
        if shape not in masks:
            q_pos = torch.arange(start, end, device=q.device)
            k_pos = torch.arange(k_start, end, device=q.device)
            masks[shape] = torch.zeros(shape, dtype=q.dtype, device=q.device).masked_fill(
                ~window_mask(q_pos, k_pos, window), float("-inf")
            )
        out.append(
            F.scaled_dot_product_attention(
                q[..., start:end, :],
                k[..., k_start:end, :],
                v[..., k_start:end, :],
                attn_mask=masks[shape],
            )
        )
    return torch.cat(out, dim=-2)


def chunk_visibility(n_q: int, n_k: int, window: int, first_valid_key: int, device) -> torch.Tensor:
    """Boolean [n_q, n_k] mask of the last n_q of n_k positions: window, and no key below
    first_valid_key."""
    q_pos = torch.arange(n_k - n_q, n_k, device=device)
    k_pos = torch.arange(n_k, device=device)
    return window_mask(q_pos, k_pos, window) & (k_pos >= first_valid_key)[None, :]


def chunk_attention(q, k, v, window: int, first_valid_key: int = 0) -> torch.Tensor:
    """Attention of a chunk of b queries over a [cache + chunk] buffer of W + b keys.

    Query i sits at buffer index W + i (W = buffer length - b); keys with buffer index below
    first_valid_key (cache rows before the sequence start) are masked. Differentiable twice.
    """
    visible = chunk_visibility(q.shape[-2], k.shape[-2], window, first_valid_key, q.device)
    return masked_attention(q, k, v, visible)
