"""Windowed attention as three registered ops, so the TTT suffix can take gradients of gradients
without running autograd through an unfused softmax.

    ttte2e::window_attention_fwd   (q, k, v)            -> (out, lse)
    ttte2e::window_attention_bwd   (q, k, v, out, lse, dout) -> (dq, dk, dv)
    ttte2e::window_attention_bwd_bwd  the autograd of the bwd op: a hand-derived double backward
    that recomputes the probabilities from lse (nothing b x (W+b) is stored between passes).

Queries are the last Tq of Tk positions (a chunk over [cache + chunk], or Tq = Tk for a whole
sequence); key j is visible to query t iff t - window < j <= t and j >= first_valid_key.
All three run our Triton kernels (`use_triton`; the double backward as three tiled passes) or
dense PyTorch (b x (W+b) per chunk: the size the suffix works in; `double_backward` below is
also the reference the Triton double backward is tested against). The forward saves only q, k,
v, out and lse; the math path keeps the fp32 scores, the probabilities and every intermediate of
softmax's own double backward.

Double backward, with c = 1/sqrt(dh), S = c Q K^T, P = softmax(S), dP = dO V^T,
D = rowsum(P * dP), dS = P * (dP - D), and (gQ, gK, gV) the cotangents of (dQ, dK, dV):
    G = c (gQ K^T + Q gK^T),  E = rowsum(G * P)
    g_dP = P * (G - E)
    g_P  = dO gV^T + G * (dP - D) - E * dP,   g_S = P * (g_P - rowsum(P * g_P))
    grad Q  = c (g_S K + dS gK)        grad K = c (g_S^T Q + dS^T gQ)
    grad V  = g_dP^T dO                grad dO = g_dP V + P gV
out and lse enter the bwd op detached: they are caches of functions of q, k, v that the formula
differentiates through in full. A third order is refused (the formula is not differentiable).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import triton_swa
from .reference import chunk_visibility


def _f32(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _scores(q: Tensor, k: Tensor) -> Tensor:
    """c Q K^T in float32 (float64 stays float64); c is folded into the small q side."""
    return torch.matmul(_f32(q) * (1.0 / math.sqrt(q.shape[-1])), _f32(k).transpose(-1, -2))


def _probs(q: Tensor, k: Tensor, lse: Tensor, window: int, first_valid_key: int) -> Tensor:
    """P = exp(c Q K^T - lse), zero where not visible."""
    scores = _scores(q, k)
    visible = chunk_visibility(q.shape[-2], k.shape[-2], window, first_valid_key, q.device)
    return scores.sub_(lse[..., None].to(scores.dtype)).exp_().masked_fill_(~visible, 0.0)


def torch_forward(q, k, v, window: int, first_valid_key: int) -> tuple[Tensor, Tensor]:
    scores = _scores(q, k)
    visible = chunk_visibility(q.shape[-2], k.shape[-2], window, first_valid_key, q.device)
    scores.masked_fill_(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = scores.sub_(lse[..., None]).exp_()
    out = torch.matmul(probs.to(v.dtype), v)
    return out, lse.float() if lse.dtype != torch.float64 else lse


def torch_backward(q, k, v, out, lse, grad_out, window: int, first_valid_key: int):
    c = 1.0 / math.sqrt(q.shape[-1])
    probs = _probs(q, k, lse, window, first_valid_key)
    do = _f32(grad_out)
    delta = (do * _f32(out)).sum(-1, keepdim=True)
    dv = torch.matmul(probs.transpose(-1, -2), do)
    d_scores = torch.matmul(do, _f32(v).transpose(-1, -2)).sub_(delta).mul_(probs)
    dq = torch.matmul(d_scores, _f32(k)).mul_(c)
    dk = torch.matmul(d_scores.transpose(-1, -2), _f32(q)).mul_(c)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def double_backward(q, k, v, lse, grad_out, g_dq, g_dk, g_dv, window: int, first_valid_key: int):
    """Gradients of (dq, dk, dv) = bwd(q, k, v, dO) w.r.t. q, k, v and dO; see the module doc.
    Temporaries are [.., b, W+b]; the ones no longer needed are reused in place."""
    c = 1.0 / math.sqrt(q.shape[-1])
    qf, kf, vf, do = _f32(q), _f32(k), _f32(v), _f32(grad_out)
    gq = None if g_dq is None else _f32(g_dq)
    gk = None if g_dk is None else _f32(g_dk)
    gv = None if g_dv is None else _f32(g_dv)
    probs = _probs(q, k, lse, window, first_valid_key)
    d_probs = torch.matmul(do, vf.transpose(-1, -2))
    delta = (probs * d_probs).sum(-1, keepdim=True)
    d_probs.sub_(delta)  # dP - D from here on
    d_scores = probs * d_probs

    if gq is not None and gk is not None:  # G = c (gQ K^T + Q gK^T) as one matmul over [dh | dh]
        g_ds = torch.matmul(torch.cat((gq, qf), -1) * c, torch.cat((kf, gk), -1).transpose(-1, -2))
    elif gq is not None:
        g_ds = torch.matmul(gq * c, kf.transpose(-1, -2))
    elif gk is not None:
        g_ds = torch.matmul(qf * c, gk.transpose(-1, -2))
    else:
        g_ds = torch.zeros_like(probs)
    e = (g_ds * probs).sum(-1, keepdim=True)
    # g_P = G * (dP - D) - E * dP = G * (dP - D) - E * ((dP - D) + D)
    g_p = (g_ds * d_probs).sub_(d_probs * e).sub_(e * delta)
    if gv is not None:
        g_p += torch.matmul(do, gv.transpose(-1, -2))
    g_dp = g_ds.sub_(e).mul_(probs)  # reuses G's buffer
    g_s = g_p.sub_((probs * g_p).sum(-1, keepdim=True)).mul_(probs)  # reuses g_P's buffer

    if gk is not None:  # grad Q = c (g_S K + dS gK) as one matmul over [W+b | W+b]
        grad_q = torch.matmul(torch.cat((g_s, d_scores), -1), torch.cat((kf, gk), -2)).mul_(c)
    else:
        grad_q = torch.matmul(g_s, kf).mul_(c)
    grad_k = torch.matmul(g_s.transpose(-1, -2), qf)
    if gq is not None:
        grad_k += torch.matmul(d_scores.transpose(-1, -2), gq)
    grad_k.mul_(c)
    grad_v = torch.matmul(g_dp.transpose(-1, -2), do)
    grad_do = torch.matmul(g_dp, vf)
    if gv is not None:
        grad_do += torch.matmul(probs, gv)
    return (grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), grad_do.to(grad_out.dtype))


# --- registered ops ---------------------------------------------------------------------------


def _kernel_or_torch(name: str, q: Tensor, kernel, torch_path):
    """Run a Triton kernel; if it fails to compile or launch (a triton error, e.g. OutOfResources
    on a specialization the self-check did not compile), self_check warns and marks the device,
    dtype and head dim (or raises when forced) and this call runs the PyTorch path; so do the
    later backward calls of ops recorded before the failure."""
    from . import self_check  # self_check imports this module

    if self_check.failed_before(q):
        return torch_path()
    try:
        return kernel()
    except triton_swa.TRITON_ERRORS as error:
        self_check.kernel_failed(q, name, error)
        return torch_path()


@torch.library.custom_op("ttte2e::window_attention_fwd", mutates_args=())
def window_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, window: int, first_valid_key: int, use_triton: bool
) -> tuple[Tensor, Tensor]:
    def torch_path():
        return torch_forward(q, k, v, window, first_valid_key)

    if use_triton:
        return _kernel_or_torch(
            "forward",
            q,
            lambda: triton_swa.attention_forward(q, k, v, window, first_valid_key),
            torch_path,
        )
    return torch_path()


@window_attention_fwd.register_fake
def _(q, k, v, window, first_valid_key, use_triton):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=lse_dtype)


@torch.library.custom_op("ttte2e::window_attention_bwd", mutates_args=())
def window_attention_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    grad_out: Tensor,
    window: int,
    first_valid_key: int,
    use_triton: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    def torch_path():
        return torch_backward(q, k, v, out, lse, grad_out, window, first_valid_key)

    if use_triton:
        return _kernel_or_torch(
            "backward",
            q,
            lambda: triton_swa.attention_backward(
                q, k, v, out, lse, grad_out, window, first_valid_key
            ),
            torch_path,
        )
    return torch_path()


@window_attention_bwd.register_fake
def _(q, k, v, out, lse, grad_out, window, first_valid_key, use_triton):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, window, first_valid_key, use_triton = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.window, ctx.first_valid_key, ctx.use_triton = window, first_valid_key, use_triton


def _fwd_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    # a differentiable call: under create_graph=True the bwd op records its own autograd node
    dq, dk, dv = window_attention_bwd(
        q,
        k,
        v,
        out.detach(),
        lse.detach(),
        grad_out,
        ctx.window,
        ctx.first_valid_key,
        ctx.use_triton,
    )
    return dq, dk, dv, None, None, None


window_attention_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


@torch.library.custom_op("ttte2e::window_attention_bwd_bwd", mutates_args=())
def window_attention_bwd_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    grad_out: Tensor,
    g_dq: Tensor | None,
    g_dk: Tensor | None,
    g_dv: Tensor | None,
    window: int,
    first_valid_key: int,
    use_triton: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of window_attention_bwd's outputs w.r.t. (q, k, v, grad_out); not differentiable."""

    def torch_path():
        return double_backward(q, k, v, lse, grad_out, g_dq, g_dk, g_dv, window, first_valid_key)

    if use_triton:
        return _kernel_or_torch(
            "double backward",
            q,
            lambda: triton_swa.attention_double_backward(
                q, k, v, out, lse, grad_out, g_dq, g_dk, g_dv, window, first_valid_key
            ),
            torch_path,
        )
    return torch_path()


@window_attention_bwd_bwd.register_fake
def _(q, k, v, out, lse, grad_out, g_dq, g_dk, g_dv, window, first_valid_key, use_triton):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(grad_out)


def _bwd_setup_context(ctx, inputs, output):
    q, k, v, out, lse, grad_out, window, first_valid_key, use_triton = inputs
    ctx.save_for_backward(q, k, v, out, lse, grad_out)
    ctx.window, ctx.first_valid_key, ctx.use_triton = window, first_valid_key, use_triton


def _bwd_backward(ctx, g_dq, g_dk, g_dv):
    if torch.is_grad_enabled():
        raise RuntimeError(
            "window attention supports gradients of gradients (second order) but "
            "not a third order: use ttte2e.kernels.attention.reference for that"
        )
    q, k, v, out, lse, grad_out = ctx.saved_tensors
    grad_q, grad_k, grad_v, grad_do = window_attention_bwd_bwd(
        q,
        k,
        v,
        out,
        lse,
        grad_out,
        g_dq,
        g_dk,
        g_dv,
        ctx.window,
        ctx.first_valid_key,
        ctx.use_triton,
    )
    return grad_q, grad_k, grad_v, None, None, grad_do, None, None, None


window_attention_bwd.register_autograd(_bwd_backward, setup_context=_bwd_setup_context)


def window_attention(
    q: Tensor, k: Tensor, v: Tensor, window: int, first_valid_key: int = 0, use_triton: bool = False
) -> Tensor:
    """Attention of the last Tq of Tk positions, differentiable twice; q [B,H,Tq,dh], k/v [B,H,Tk,dh]."""
    if q.shape[-2] > k.shape[-2]:
        raise ValueError(f"more queries ({q.shape[-2]}) than keys ({k.shape[-2]})")
    if not 0 <= first_valid_key <= k.shape[-2] - q.shape[-2]:
        raise ValueError(
            f"first_valid_key {first_valid_key} must lie in the cache part "
            f"[0, {k.shape[-2] - q.shape[-2]}]"
        )
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return window_attention_fwd(q, k, v, window, first_valid_key, use_triton)[0]
