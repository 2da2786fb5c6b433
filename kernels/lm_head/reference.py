"""Plain autograd reference of the fused LM-head op (see __init__.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nll_and_hidden_grad(
    h: torch.Tensor, embed: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """nll_i = CE(h_i E^T, y_i); dl/dh for l = sum_i w_i nll_i, differentiable (create_graph)."""
    if not h.requires_grad:
        h = h.detach().requires_grad_()
    with torch.enable_grad():
        logits = F.linear(h, embed)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        nll = F.cross_entropy(logits, targets, reduction="none")
        (grad_h,) = torch.autograd.grad((weights * nll).sum(), h, create_graph=True)
    return nll, grad_h
