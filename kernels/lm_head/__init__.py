"""Tied LM head + cross-entropy that also returns the gradient of the weighted loss w.r.t. the
hidden state: the first step of every TTT inner gradient.

`nll_and_hidden_grad(h, E, y, w)` returns nll_i = -log softmax(h_i E^T)[y_i] and
g = d(sum_i w_i nll_i)/dh = (w * (softmax(h E^T) - onehot(y))) E. The inner loop backpropagates
g through the suffix (autograd.grad(h, theta, g, create_graph=True)); the outer backward then
differentiates g once. Autograd's double backward of cross-entropy makes ~20 elementwise passes over
the [N, V] logits per chunk; this op keeps one [N, V] buffer for its backward, softmax(z) (the
weighted copy w (p - onehot) that dl/dh and dL/dE need is never formed: both are rebuilt from p
and the target rows), and makes ~5 passes, with the same 6 matmuls. Its backward is first order
only (the meta-gradient never differentiates it again).

Vocabulary-sharded (tensor parallelism): with `group`, `embed` is this rank's rows
[vocab_offset, vocab_offset + V/N) of the tied embedding, h and the returned nll / dl/dh are whole
(the same on every rank of the group). The softmax's max, sum and target logit, dl/dh and, in
backward, <p, dG> and dL/dh are summed over the group; dL/dE stays this rank's rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from . import reference


def _reduce(t: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(t, op=op, group=group)
    return t


class _NLLAndHiddenGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, embed, targets, weights, group=None, vocab_offset=0):
        logits = torch.matmul(h, embed.t())
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        if group is None:
            local, held = targets, None
            lse = torch.logsumexp(logits, dim=-1)
            target_logit = logits.gather(1, targets[:, None]).squeeze(1)
        else:
            local = targets - vocab_offset
            held = (local >= 0) & (local < embed.shape[0])  # rows whose target this rank holds
            local = torch.where(held, local, torch.zeros_like(local))
            top = _reduce(logits.detach().amax(-1), group, dist.ReduceOp.MAX)
            lse = top + torch.log(_reduce(torch.exp(logits - top[:, None]).sum(-1), group))
            target_logit = _reduce(
                torch.where(
                    held, logits.gather(1, local[:, None]).squeeze(1), torch.zeros_like(lse)
                ),
                group,
            )
        nll = lse - target_logit
        probs = logits.sub_(lse[:, None]).exp_()  # softmax, reusing the logits buffer
        w = weights.to(probs.dtype)
        held = torch.ones_like(w) if held is None else held.to(w.dtype)
        # dl/dh = (w * (p - onehot)) E = w * (p E) - w * E[y]: the weighted [N, V] copy of p
        # is never formed (nor kept for the backward, which rebuilds what it needs from p)
        grad_h = torch.matmul(probs.to(h.dtype), embed).mul_(w[:, None].to(h.dtype))
        grad_h -= (w * held)[:, None].to(h.dtype) * embed[local].to(h.dtype)
        grad_h = _reduce(grad_h, group)
        ctx.group = group
        # the backward runs under the forward's autocast (as torch.amp.custom_bwd does, for any
        # device type): its matmuls in the compute dtype, as autograd runs those of the math path
        device = h.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(h, embed, local, held, w, probs)
        # an output no loss depends on (dl/dh of a chunk whose step is unused: the last one) gets
        # None, not zeros: its two [N, V] x d matmuls are skipped
        ctx.set_materialize_grads(False)
        return nll, grad_h

    @staticmethod
    @once_differentiable
    def backward(ctx, d_nll, d_grad_h):
        device, enabled, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            return _NLLAndHiddenGrad._backward(ctx, d_nll, d_grad_h)

    @staticmethod
    def _backward(ctx, d_nll, d_grad_h):
        h, embed, local, held, w, probs = ctx.saved_tensors
        if d_nll is None and d_grad_h is None:
            return None, None, None, None, None, None
        group = ctx.group
        rows = torch.arange(h.shape[0], device=h.device)
        # d logits = p * (w * (dG - <p, dG>) + d_nll) - onehot * d_nll, with dG = dgh E^T
        coeff = None
        d_embed = None
        if d_grad_h is not None:
            d_g = torch.matmul(d_grad_h.to(embed.dtype), embed.t())
            d_g = d_g.to(probs.dtype)
            # <p, dG> per row as a batched dot product: no [N, V] temporary
            d_g -= _reduce(torch.matmul(probs.unsqueeze(1), d_g.unsqueeze(2)).squeeze(2), group)
            coeff = d_g.mul_(w[:, None])
            # d E from dl/dh = (w (p - onehot)) E: p^T (w dgh) - onehot^T (w dgh)
            scaled = d_grad_h * w[:, None].to(d_grad_h.dtype)
            d_embed = torch.matmul(probs.t().to(d_grad_h.dtype), scaled)
            d_embed.index_add_(
                0, local, (scaled * -held[:, None].to(scaled.dtype)).to(d_embed.dtype)
            )
        if d_nll is not None:
            d_nll = d_nll.to(probs.dtype)
            coeff = (
                d_nll[:, None].expand_as(probs).clone()
                if coeff is None
                else coeff.add_(d_nll[:, None])
            )
        d_logits = coeff.mul_(probs)
        if d_nll is not None:
            d_logits[rows, local] -= d_nll * held
        d_logits = d_logits.to(h.dtype)
        d_h = _reduce(torch.matmul(d_logits, embed), group)
        d_embed_logits = torch.matmul(d_logits.t(), h)
        d_embed = d_embed_logits if d_embed is None else d_embed + d_embed_logits
        return d_h, d_embed, None, None, None, None


def nll_and_hidden_grad(
    h: torch.Tensor,
    embed: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    group=None,
    vocab_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """h [N, d], embed [V, d], targets [N] (int64), weights [N] -> (nll [N], dl/dh [N, d]).
    group: a torch.distributed group over which the vocabulary is sharded (embed = rows
    vocab_offset.. of the full table), or None."""
    return _NLLAndHiddenGrad.apply(h, embed, targets, weights, group, vocab_offset)


__all__ = ["nll_and_hidden_grad", "reference"]
