"""The TTT inner loop over the suffix blocks, chunk by chunk, and its rematerialization.

For each chunk c (as the official code does): run the suffix blocks on the chunk with the current fast
weights theta_c (attention over a per-block cache of the W previous positions + the chunk), take
the masked mean next-token loss l_c, its partial gradient w.r.t. theta_c (create_graph=True when
the meta-gradient is wanted), clip it by its global norm over all suffix blocks (per sequence), and
step theta_{c+1} = theta_c - eta * clipped gradient. Every sequence of the batch has its own theta
(a [B, ...] copy of theta_0), its own losses and its own clip norm.

Rematerialization (`remat`):
- 'none':   the whole unrolled loop (forward + inner-gradient graphs) is kept for backward.
- 'chunk':  only the carry (fast weights, KV caches) at chunk boundaries is kept; each chunk is
            recomputed in backward (with its inner-gradient graph) and differentiated there.
- 'nested': only the carry at group boundaries (G chunks, G ~ sqrt(n)) is kept; in backward a group
            is recomputed chunk-remat'd, so at most n/G + G carries are alive: O(sqrt(n)).
torch.utils.checkpoint keeps each region's inputs referenced from the saved graph, so nesting it
does not free the inner carries; `_Remat` below saves exactly what it is given.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from ttte2e.kernels.lm_head import nll_and_hidden_grad

from .layers import at_least_fp32

if TYPE_CHECKING:
    from .transformer import TTTModel


def inner_lr_at(step: int, warmup_steps: int, inner_lr: float) -> float:
    """Inner learning rate during pretraining: linear from 0.1x to 1x of inner_lr over warm-up."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return inner_lr
    return inner_lr * (0.1 + 0.9 * step / warmup_steps)


@dataclass
class InnerLoopOutput:
    chunk_loss: torch.Tensor       # [B, n] inner loss of each chunk, before its own update
    token_nll: torch.Tensor        # [B, T] unmasked per-token NLL
    inner_grad_norm: torch.Tensor  # [B, n] global norm of each inner gradient before clipping
    fast_weights: list[torch.Tensor]  # final theta, (w1, w3, w2) per TTT block, each [B, out, in]
    caches: list[torch.Tensor]        # final (k, v) per TTT block, each [B, H, W, dh]


@dataclass
class _LoopContext:
    targets: torch.Tensor  # [B, T]
    mask: torch.Tensor     # [B, T] float, 0 where the target is BOS
    rope: torch.Tensor  # complex rotations for buffer-local positions 0..W+b-1
    eta: float | torch.Tensor
    clip: float
    window: int
    chunk: int
    offset: int = 0        # targets/mask start at this sequence position (decode: the chunk's)


def _clip_scale(norm: torch.Tensor, clip: float) -> torch.Tensor:
    """optax clip_by_global_norm: keep g when norm < clip, else g * clip / norm (in the graph)."""
    return torch.where(norm < clip, torch.ones_like(norm), clip / norm.clamp_min(clip))


def _chunk_run(model: "TTTModel", ctx: _LoopContext, c: int, create_graph: bool,
               *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One inner step on chunk c. tensors = 3S fast weights, 2S caches, the chunk's suffix input.

    Returns 3S new fast weights, 2S new caches, nll [B, b], loss [B], inner grad norm [B].
    With create_graph=False nothing is kept for an outer backward (forward-only / remat forward).
    """
    blocks = model.ttt_blocks
    n_fast, n_cache = 3 * len(blocks), 2 * len(blocks)
    fast = list(tensors[:n_fast])
    caches = list(tensors[n_fast:n_fast + n_cache])
    x = tensors[n_fast + n_cache]
    if not create_graph:
        fast = [t.detach().requires_grad_() for t in fast]
        caches = [t.detach() for t in caches]
        x = x.detach()
    b, window = ctx.chunk, ctx.window
    first_valid = max(0, window - c * b)  # cache rows before the sequence start stay masked
    h, new_caches = x, []
    for s, block in enumerate(blocks):
        cache_k, cache_v = caches[2 * s], caches[2 * s + 1]
        h, k, v = block.forward_chunk(h, cache_k, cache_v, ctx.rope, window, first_valid,
                                      tuple(fast[3 * s:3 * s + 3]))
        new_caches += [torch.cat((cache_k, k), 2)[:, :, -window:],
                       torch.cat((cache_v, v), 2)[:, :, -window:]]
    span = slice(c * b - ctx.offset, (c + 1) * b - ctx.offset)
    mask = ctx.mask[:, span]
    weights = mask / mask.sum(-1, keepdim=True).clamp_min(1e-10)  # l = sum_t weights_t * nll_t
    # the fused head returns dl/dh_final as well: the inner gradient starts from it
    normed = model.final_norm(h)
    nll, grad_normed = nll_and_hidden_grad(normed.flatten(0, 1), model.embed.weight,
                                           ctx.targets[:, span].flatten(), weights.flatten())
    nll = nll.view_as(mask)
    loss = (nll * weights).sum(-1)
    if isinstance(ctx.eta, (int, float)) and ctx.eta == 0:
        new_fast = [t.clone() for t in fast]  # the inner loop does nothing: plain SWA
        norm = torch.zeros_like(loss)
    else:
        # Under autocast the inner gradient's values depend on create_graph (the recorded double-
        # backward ops run in reduced precision); take it the same way in a remat forward as in
        # its recompute, so both see identical values.
        grads = torch.autograd.grad(normed, fast, grad_normed.view_as(normed),
                                    create_graph=create_graph or torch.is_autocast_enabled(x.device.type))
        # theta, the inner gradients and the clip norm stay float32 (also under bf16 autocast)
        norm = torch.sqrt(sum(at_least_fp32(g).pow(2).flatten(1).sum(1) for g in grads))
        scale = (ctx.eta * _clip_scale(norm, ctx.clip)).view(-1, 1, 1)
        new_fast = [t - scale * at_least_fp32(g) for t, g in zip(fast, grads)]
    out = (*new_fast, *new_caches, nll, loss, norm.detach())
    if not create_graph:
        out = tuple(t.detach() for t in out)
    return out


def _run_chunks(model: "TTTModel", ctx: _LoopContext, first_chunk: int, create_graph: bool,
                remat_chunks: bool, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Consecutive chunks from first_chunk; tensors = carry (5S) + their suffix input [B, G*b, d].

    Returns the carry after the last chunk, nll [B, G*b], loss [B, G], grad norm [B, G].
    """
    n_carry = 5 * len(model.ttt_blocks)
    carry, x = tensors[:n_carry], tensors[n_carry]
    params = model.suffix_parameters()
    nlls, losses, norms = [], [], []
    for i, xs in enumerate(torch.split(x, ctx.chunk, dim=1)):
        step = functools.partial(_chunk_run, model, ctx, first_chunk + i)
        if remat_chunks:
            out = _Remat.apply(step, n_carry + 1, *carry, xs, *params)
        else:
            out = step(create_graph, *carry, xs)
        carry = out[:n_carry]
        nlls.append(out[-3]), losses.append(out[-2]), norms.append(out[-1])
    return (*carry, torch.cat(nlls, 1), torch.stack(losses, 1), torch.stack(norms, 1))


class _Remat(torch.autograd.Function):
    """Run `run(create_graph, *tensors)` keeping no graph; recompute it with graph in backward.

    `tensors` are saved (the carry); `params` are the module weights `run` uses, passed so that
    their gradients are returned through this node (correct under autograd.grad, DDP and ZeRO
    hooks, unlike a backward() inside backward). The last output (grad norm) is not differentiable.
    """

    @staticmethod
    def forward(ctx, run: Callable, n_tensors: int, *args: torch.Tensor):
        tensors, params = args[:n_tensors], args[n_tensors:]
        ctx.run, ctx.params = run, params
        # the recompute in backward must see the same autocast state as this forward
        device = tensors[0].device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.requires = [t.requires_grad for t in tensors]
        ctx.save_for_backward(*tensors)
        ctx.set_materialize_grads(False)
        with torch.enable_grad():
            out = tuple(t.detach() for t in run(False, *tensors))
        ctx.mark_non_differentiable(out[-1])
        return out

    @staticmethod
    def backward(ctx, *grad_out: torch.Tensor | None):
        tensors = [t.detach().requires_grad_(r) for t, r in zip(ctx.saved_tensors, ctx.requires)]
        nones = (None, None) + (None,) * (len(tensors) + len(ctx.params))
        device, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            out = ctx.run(True, *tensors)
        pairs = [(o, g) for o, g in zip(out, grad_out) if g is not None and o.requires_grad]
        wrt = [t for t in tensors if t.requires_grad] + [p for p in ctx.params if p.requires_grad]
        if not pairs or not wrt:
            return nones
        grads = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                         allow_unused=True))
        t_grads = [next(grads) if t.requires_grad else None for t in tensors]
        p_grads = [next(grads) if p.requires_grad else None for p in ctx.params]
        return (None, None, *t_grads, *p_grads)


def run_inner_loop(model: "TTTModel", suffix_in: torch.Tensor, targets: torch.Tensor,
                   mask: torch.Tensor, eta: float | torch.Tensor, remat: str | None = None,
                   remat_group: int | None = None) -> InnerLoopOutput:
    """The chunked TTT loop over the suffix blocks for a batch.

    suffix_in: [B, T, d] output of the prefix blocks; targets [B, T]; mask [B, T] (0 = BOS target).
    When no outer gradient is wanted (grad mode off, or nothing requires grad) the inner gradients
    are still taken, but no graph is kept.
    """
    cfg = model.config
    remat = cfg.remat if remat is None else remat
    batch, seq, _ = suffix_in.shape
    b, window = cfg.chunk_size, cfg.attn_window
    if seq % b:
        raise ValueError(f"sequence length {seq} is not a multiple of chunk_size {b}")
    n_chunks = seq // b
    positions = torch.arange(window + b, device=suffix_in.device)
    ctx = _LoopContext(targets=targets, mask=mask.to(torch.float32),
                       rope=model.rope(positions), eta=eta, clip=cfg.inner_clip,
                       window=window, chunk=b)
    carry: list[torch.Tensor] = []
    for block in model.ttt_blocks:
        mlp = block.prime_mlp
        carry += [w.weight.unsqueeze(0).expand(batch, -1, -1) for w in (mlp.w1, mlp.w3, mlp.w2)]
    heads, head_dim = cfg.n_heads, cfg.head_dim
    for _ in model.ttt_blocks:
        carry += [suffix_in.new_zeros(batch, heads, window, head_dim) for _ in range(2)]

    params = model.suffix_parameters()
    wants_outer = torch.is_grad_enabled() and (
        suffix_in.requires_grad or any(p.requires_grad for p in params))
    if not wants_outer:
        with torch.enable_grad():
            out = _run_chunks(model, ctx, 0, False, False, *carry, suffix_in)
        outs = [out]
    elif remat == "none":
        outs = [_run_chunks(model, ctx, 0, True, False, *carry, suffix_in)]
    elif remat in ("chunk", "nested"):
        group = 1 if remat == "chunk" else (remat_group or cfg.remat_group_size(n_chunks))
        outs = []
        for g, x_group in enumerate(torch.split(suffix_in, group * b, dim=1)):
            run = functools.partial(_group_run, model, ctx, g * group, remat == "nested")
            out = _Remat.apply(run, len(carry) + 1, *carry, x_group, *params)
            carry = list(out[:len(carry)])
            outs.append(out)
    else:
        raise ValueError(f"unknown remat mode {remat!r}; choose 'none', 'chunk' or 'nested'")
    n_carry = 5 * len(model.ttt_blocks)
    final = outs[-1][:n_carry]
    return InnerLoopOutput(
        chunk_loss=torch.cat([o[-2] for o in outs], 1),
        token_nll=torch.cat([o[-3] for o in outs], 1),
        inner_grad_norm=torch.cat([o[-1] for o in outs], 1),
        fast_weights=list(final[:3 * len(model.ttt_blocks)]),
        caches=list(final[3 * len(model.ttt_blocks):]),
    )


def _group_run(model: "TTTModel", ctx: _LoopContext, first_chunk: int, nested: bool,
               create_graph: bool, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # Recomputing a group (create_graph=True) under 'nested' remats each of its chunks in turn.
    return _run_chunks(model, ctx, first_chunk, create_graph, nested and create_graph, *tensors)


__all__: Sequence[str] = ["InnerLoopOutput", "inner_lr_at", "run_inner_loop"]
