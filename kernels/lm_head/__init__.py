"""Tied LM head + cross-entropy that also returns the gradient of the weighted loss w.r.t. the
hidden state: the first step of every TTT inner gradient.

`nll_and_hidden_grad(h, E, y, w)` returns nll_i = -log softmax(h_i E^T)[y_i] and
g = d(sum_i w_i nll_i)/dh = (w * (softmax(h E^T) - onehot(y))) E. The inner loop backpropagates
g through the suffix (autograd.grad(h, theta, g, create_graph=True)); the outer backward then
differentiates g once. Autograd's double backward of cross-entropy makes ~20 elementwise passes over
the [N, V] logits per chunk; this op keeps softmax(z) and makes ~6, with the same 6 matmuls.
Its backward is first order only (the meta-gradient never differentiates it again).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import reference


class _NLLAndHiddenGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, embed, targets, weights):
        logits = torch.matmul(h, embed.t())
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        lse = torch.logsumexp(logits, dim=-1)
        nll = lse - logits.gather(1, targets[:, None]).squeeze(1)
        probs = logits.sub_(lse[:, None]).exp_()  # softmax, reusing the logits buffer
        rows = torch.arange(h.shape[0], device=h.device)
        w = weights.to(probs.dtype)
        g_logits = probs * w[:, None]
        g_logits[rows, targets] -= w
        grad_h = torch.matmul(g_logits.to(h.dtype), embed)
        ctx.save_for_backward(h, embed, targets, w, probs, g_logits)
        return nll, grad_h

    @staticmethod
    @once_differentiable
    def backward(ctx, d_nll, d_grad_h):
        h, embed, targets, w, probs, g_logits = ctx.saved_tensors
        rows = torch.arange(h.shape[0], device=h.device)
        # d logits = p * (w * (dG - <p, dG>) + d_nll) - onehot * d_nll, with dG = dgh E^T
        coeff = None
        d_embed = None
        if d_grad_h is not None:
            d_g = torch.matmul(d_grad_h.to(embed.dtype), embed.t())
            d_g = d_g.to(probs.dtype)
            d_g -= (probs * d_g).sum(-1, keepdim=True)
            coeff = d_g.mul_(w[:, None])
            d_embed = torch.matmul(g_logits.t().to(d_grad_h.dtype), d_grad_h)
        if d_nll is not None:
            d_nll = d_nll.to(probs.dtype)
            coeff = d_nll[:, None].expand_as(probs).clone() if coeff is None else coeff.add_(
                d_nll[:, None])
        d_logits = coeff.mul_(probs)
        if d_nll is not None:
            d_logits[rows, targets] -= d_nll
        d_logits = d_logits.to(h.dtype)
        d_h = torch.matmul(d_logits, embed)
        d_embed_logits = torch.matmul(d_logits.t(), h)
        d_embed = d_embed_logits if d_embed is None else d_embed + d_embed_logits
        return d_h, d_embed, None, None


def nll_and_hidden_grad(h: torch.Tensor, embed: torch.Tensor, targets: torch.Tensor,
                        weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """h [N, d], embed [V, d], targets [N] (int64), weights [N] -> (nll [N], dl/dh [N, d])."""
    return _NLLAndHiddenGrad.apply(h, embed, targets, weights)


__all__ = ["nll_and_hidden_grad", "reference"]
