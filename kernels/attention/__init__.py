"""Public attention ops. The caller picks the op by use; each op picks its fastest path.

- `sliding_window_attention`: causal attention with a window of k keys over a whole sequence
  (prefix blocks, plain forward). First-order gradients only. CPU: blocked PyTorch, O(T*k).
- `chunk_attention`: b queries over a [cache + chunk] buffer (TTT suffix). Supports
  create_graph=True and a second backward (math path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference
from .reference import chunk_attention


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             window: int) -> torch.Tensor:
    """Causal attention where query t sees keys t-window+1..t; q, k, v: [B, H, T, dh]."""
    if window >= q.shape[-2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return reference.blocked_sliding_window_attention(q, k, v, window)


__all__ = ["sliding_window_attention", "chunk_attention", "reference"]
