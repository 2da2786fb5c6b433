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
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .config import REMAT_MODES
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
    chunk_loss: torch.Tensor  # [B, n] inner loss of each chunk, before its own update
    token_nll: torch.Tensor  # [B, T] unmasked per-token NLL
    inner_grad_norm: torch.Tensor  # [B, n] global norm of each inner gradient before clipping
    fast_weights: list[torch.Tensor]  # final theta, (w1, w3, w2) per TTT block, each [B, out, in]


@dataclass
class Carry:
    """What one chunk step hands the next: per TTT block its fast weights theta (w1, w3, w2),
    each [B, out, in], and its attention cache (k, v) of the W positions before the chunk, each
    [B, H, W, dh] pre-RoPE (rows before the sequence start are zeros, masked)."""

    fast: list[torch.Tensor]  # 3 per TTT block, block order
    caches: list[torch.Tensor]  # 2 per TTT block, block order

    @classmethod
    def initial(cls, model: TTTModel, batch: int, like: torch.Tensor, window: int) -> Carry:
        """theta_0 (each sequence its own view of it) and empty caches of `window` rows."""
        cfg = model.config
        fast = [w.unsqueeze(0).expand(batch, -1, -1) for w in model.fast_weight_parameters()]
        # heads held here: all of them, or a tensor-parallel rank's share
        caches = [
            like.new_zeros(batch, block.attn.n_heads, window, cfg.head_dim)
            for block in model.ttt_blocks
            for _ in range(2)
        ]
        return cls(fast, caches)

    def block_fast(self, s: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(self.fast[3 * s : 3 * s + 3])

    def block_cache(self, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.caches[2 * s], self.caches[2 * s + 1]

    # torch.autograd.Function (the remat below) takes and returns flat tensor tuples
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (*self.fast, *self.caches)

    @classmethod
    def from_tensors(cls, tensors: Sequence[torch.Tensor], n_blocks: int) -> Carry:
        return cls(list(tensors[: 3 * n_blocks]), list(tensors[3 * n_blocks : 5 * n_blocks]))


@dataclass
class ChunkContext:
    """What every chunk step of one sequence batch shares."""

    targets: torch.Tensor  # [B, >= chunks * b] next tokens, from sequence position `offset`
    mask: torch.Tensor  # like targets, float, 0 where the target is BOS
    rope: torch.Tensor  # complex rotations for buffer-local positions 0..W+b-1
    eta: float | torch.Tensor
    clip: float
    window: int
    chunk: int
    offset: int = 0  # targets/mask start at this sequence position (decode: the chunk's)
    updates: int | None = None  # chunks that take their inner step (None: every one)

    @classmethod
    def build(
        cls,
        model: TTTModel,
        targets: torch.Tensor,
        eta: float | torch.Tensor,
        window: int,
        mask: torch.Tensor | None = None,
        offset: int = 0,
        updates: int | None = None,
    ) -> ChunkContext:
        cfg = model.config
        mask = targets != cfg.bos_token_id if mask is None else mask
        positions = torch.arange(window + cfg.chunk_size, device=targets.device)
        return cls(
            targets=targets,
            mask=mask.to(torch.float32),
            rope=model.rope(positions),
            eta=eta,
            clip=cfg.inner_clip,
            window=window,
            chunk=cfg.chunk_size,
            offset=offset,
            updates=updates,
        )


@dataclass
class ChunkOutput:
    carry: Carry | None  # after the step(s); None for all but the last group under remat
    nll: torch.Tensor  # [B, b * steps] per-token NLL with the weights before each step
    loss: torch.Tensor  # [B, steps] each chunk's masked mean NLL (the inner loss)
    grad_norm: torch.Tensor  # [B, updates] each inner gradient's global norm before clipping


def clip_scale(norm: torch.Tensor, clip: float) -> torch.Tensor:
    """optax clip_by_global_norm: keep g when norm < clip, else g * clip / norm (in the graph)."""
    return torch.where(norm < clip, torch.ones_like(norm), clip / norm.clamp_min(clip))


def chunk_step(
    model: TTTModel, ctx: ChunkContext, c: int, carry: Carry, x: torch.Tensor, create_graph: bool
) -> ChunkOutput:
    """One inner step on chunk c (x: its suffix input [B, b, d]): the suffix blocks with the
    current theta, the chunk's loss, its clipped gradient step. nll/loss/grad_norm are [B, b],
    [B], [B, 1] ([B, 0] when the chunk takes no step: c >= ctx.updates). With create_graph=False
    nothing is kept for an outer backward (forward-only / remat forward)."""
    fast, caches = carry.fast, carry.caches
    if model.config.compile:
        from . import compiled  # here: compiled.py builds on this module

        out = compiled.chunk_step(model, ctx, c, fast, caches, x, create_graph)
        if out is not None:  # None: compilation failed (warned once); run eager
            return out
    if not create_graph:
        fast = [t.detach().requires_grad_() for t in fast]
        caches = [t.detach() for t in caches]
        x = x.detach()
    b, window = ctx.chunk, ctx.window
    first_valid = max(0, window - c * b)  # cache rows before the sequence start stay masked
    h, new_caches = x, []
    for s, block in enumerate(model.ttt_blocks):
        cache_k, cache_v = caches[2 * s], caches[2 * s + 1]
        h, k, v = block.forward_chunk(
            h, cache_k, cache_v, ctx.rope, window, first_valid, tuple(fast[3 * s : 3 * s + 3])
        )
        new_caches += [
            torch.cat((cache_k, k), 2)[:, :, -window:],
            torch.cat((cache_v, v), 2)[:, :, -window:],
        ]
    span = slice(c * b - ctx.offset, (c + 1) * b - ctx.offset)
    mask = ctx.mask[:, span]
    weights = mask / mask.sum(-1, keepdim=True).clamp_min(1e-10)  # l = sum_t weights_t * nll_t
    # the fused head returns dl/dh_final as well: the inner gradient starts from it
    normed = model.final_norm(h)
    nll, grad_normed = model.head_nll_and_grad(
        normed.flatten(0, 1), ctx.targets[:, span].flatten(), weights.flatten()
    )
    nll = nll.view_as(mask)
    loss = (nll * weights).sum(-1)
    if ctx.updates is not None and c >= ctx.updates:
        # training's last chunk: theta after it changes no loss, so no inner gradient is taken
        new_fast, norm = list(fast), loss.new_zeros(loss.shape[0], 0)
    elif isinstance(ctx.eta, (int, float)) and ctx.eta == 0:
        new_fast = [t.clone() for t in fast]  # the inner loop does nothing: plain SWA
        norm = torch.zeros_like(loss)[:, None]
    else:
        # Under autocast the inner gradient's values depend on create_graph (the recorded double-
        # backward ops run in reduced precision); take it the same way in a remat forward as in
        # its recompute, so both see identical values.
        grads = torch.autograd.grad(
            normed,
            fast,
            grad_normed.view_as(normed),
            create_graph=create_graph or torch.is_autocast_enabled(x.device.type),
        )
        # theta, the inner gradients and the clip norm stay float32 (also under bf16 autocast)
        # global over every TTT block (and over tensor-parallel shards: sum_over_shards)
        norm = torch.sqrt(
            model.parallel.sum_over_shards(
                sum(at_least_fp32(g).pow(2).flatten(1).sum(1) for g in grads)
            )
        )
        # the step size is one number per sequence applied to every shard of theta
        step = ctx.eta * clip_scale(norm, ctx.clip)
        scale = model.parallel.copy_to_shards(step.view(-1, 1, 1))
        new_fast = [t - scale * at_least_fp32(g) for t, g in zip(fast, grads)]
        norm = norm[:, None]
    norm = norm.detach()
    if not create_graph:
        new_fast = [t.detach() for t in new_fast]
        new_caches = [t.detach() for t in new_caches]
        nll, loss = nll.detach(), loss.detach()
    return ChunkOutput(Carry(new_fast, new_caches), nll, loss, norm)


def run_chunks(
    model: TTTModel,
    ctx: ChunkContext,
    first_chunk: int,
    carry: Carry,
    x: torch.Tensor,
    create_graph: bool = False,
    remat_chunks: bool = False,
) -> ChunkOutput:
    """The suffix-chunk loop: consecutive chunk steps from first_chunk over x [B, G*b, d].
    remat_chunks: keep only each chunk's carry, recompute the chunk in backward."""
    n_blocks = len(model.ttt_blocks)
    params = model.suffix_parameters()
    nlls, losses, norms = [], [], []
    for i, xs in enumerate(torch.split(x, ctx.chunk, dim=1)):
        if remat_chunks:
            run = functools.partial(_flat_chunk_step, model, ctx, first_chunk + i, n_blocks)
            flat = _Remat.apply(
                run, 5 * n_blocks + 1, model.config.compile, *carry.tensors(), xs, *params
            )
            out = ChunkOutput(Carry.from_tensors(flat, n_blocks), *flat[-3:])
        else:
            out = chunk_step(model, ctx, first_chunk + i, carry, xs, create_graph)
        carry = out.carry
        nlls.append(out.nll), losses.append(out.loss), norms.append(out.grad_norm)
    return ChunkOutput(carry, torch.cat(nlls, 1), torch.stack(losses, 1), torch.cat(norms, 1))


def _flat_chunk_step(model, ctx, c, n_blocks, create_graph, *tensors):
    out = chunk_step(
        model, ctx, c, Carry.from_tensors(tensors, n_blocks), tensors[-1], create_graph
    )
    return (*out.carry.tensors(), out.nll, out.loss, out.grad_norm)


def _flat_group(model, ctx, first_chunk, nested, n_blocks, create_graph, *tensors):
    # Recomputing a group (create_graph=True) under 'nested' remats each of its chunks in turn.
    out = run_chunks(
        model,
        ctx,
        first_chunk,
        Carry.from_tensors(tensors, n_blocks),
        tensors[-1],
        create_graph,
        nested and create_graph,
    )
    return (*out.carry.tensors(), out.nll, out.loss, out.grad_norm)


def _kept(t):
    # detached: a hook that returns the tensor itself makes every saved output hold its own
    # grad_fn, a reference cycle that keeps the graph parts autograd.grad does not traverse
    # (those towards the slow weights) alive after the run; autograd re-attaches the grad_fn
    # when it unpacks, so nothing else changes
    return t.detach()


def _unpacked(t):
    return t


class _Remat(torch.autograd.Function):
    """Run `run(create_graph, *tensors)` keeping no graph; recompute it with graph in backward.

    `tensors` are saved (the carry); `params` are the module weights `run` uses, passed so that
    their gradients are returned through this node (correct under autograd.grad, DDP and ZeRO
    hooks, unlike a backward() inside backward). The last output (grad norm) is not differentiable.
    """

    @staticmethod
    def forward(ctx, run: Callable, n_tensors: int, compiled: bool, *args: torch.Tensor):
        tensors, params = args[:n_tensors], args[n_tensors:]
        ctx.run, ctx.params = run, params
        # the recompute in backward must see the same autocast state as this forward
        device = tensors[0].device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.requires = [t.requires_grad for t in tensors]
        ctx.save_for_backward(*tensors)
        ctx.set_materialize_grads(False)
        # only the carry is kept: what the run saves internally is dropped at once, so no saved-
        # tensor hook (host offload) may move it. The compiled step runs this forward under
        # no_grad: it saves nothing (and torch.func refuses saved-tensor hooks).
        hooks = (
            nullcontext()
            if compiled
            else torch.autograd.graph.saved_tensors_hooks(_kept, _unpacked)
        )
        with torch.enable_grad(), hooks:
            out = tuple(t.detach() for t in run(False, *tensors))
        ctx.mark_non_differentiable(out[-1])
        return out

    @staticmethod
    def backward(ctx, *grad_out: torch.Tensor | None):
        tensors = [t.detach().requires_grad_(r) for t, r in zip(ctx.saved_tensors, ctx.requires)]
        nones = (None, None, None) + (None,) * (len(tensors) + len(ctx.params))
        device, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            out = ctx.run(True, *tensors)
        pairs = [(o, g) for o, g in zip(out, grad_out) if g is not None and o.requires_grad]
        wrt = [t for t in tensors if t.requires_grad] + [p for p in ctx.params if p.requires_grad]
        if not pairs or not wrt:
            return nones
        grads = iter(
            torch.autograd.grad(
                [o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True
            )
        )
        t_grads = [next(grads) if t.requires_grad else None for t in tensors]
        p_grads = [next(grads) if p.requires_grad else None for p in ctx.params]
        return (None, None, None, *t_grads, *p_grads)


def run_inner_loop(
    model: TTTModel,
    suffix_in: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    eta: float | torch.Tensor,
    remat: str | None = None,
    remat_group: int | None = None,
    final_update: bool = True,
) -> InnerLoopOutput:
    """The chunked TTT loop over the suffix blocks for a batch.

    suffix_in: [B, T, d] output of the prefix blocks; targets [B, T]; mask [B, T] (0 = BOS target).
    When no outer gradient is wanted (grad mode off, or nothing requires grad) the inner gradients
    are still taken, but no graph is kept. final_update=False (training) skips the last chunk's
    inner step, which no loss depends on: inner_grad_norm is then [B, n-1] and fast_weights the
    theta the last chunk ran with.
    """
    cfg = model.config
    remat = cfg.remat if remat is None else remat
    batch, seq, _ = suffix_in.shape
    b, window = cfg.chunk_size, cfg.attn_window
    if seq % b:
        raise ValueError(f"sequence length {seq} is not a multiple of chunk_size {b}")
    if remat not in REMAT_MODES:
        raise ValueError(f"unknown remat mode {remat!r}; choose one of {', '.join(REMAT_MODES)}")
    n_chunks = seq // b
    ctx = ChunkContext.build(
        model, targets, eta, window, mask, updates=None if final_update else n_chunks - 1
    )
    carry = Carry.initial(model, batch, suffix_in, window)
    n_blocks = len(model.ttt_blocks)

    params = model.suffix_parameters()
    wants_outer = torch.is_grad_enabled() and (
        suffix_in.requires_grad or any(p.requires_grad for p in params)
    )
    if not wants_outer:
        with torch.enable_grad():
            outs = [run_chunks(model, ctx, 0, carry, suffix_in)]
    elif remat == "none":
        outs = [run_chunks(model, ctx, 0, carry, suffix_in, create_graph=True)]
    else:
        group = 1 if remat == "chunk" else (remat_group or cfg.remat_group_size(n_chunks))
        outs = []
        for g, x_group in enumerate(torch.split(suffix_in, group * b, dim=1)):
            run = functools.partial(_flat_group, model, ctx, g * group, remat == "nested", n_blocks)
            with model.offload.carries():
                flat = _Remat.apply(
                    run, 5 * n_blocks + 1, model.config.compile, *carry.tensors(), x_group, *params
                )
            carry = Carry.from_tensors(flat, n_blocks)
            # only the last carry stays referenced here: the earlier ones live on in what _Remat
            # saved (moved to the host under carry offload), not twice on the device
            outs.append(ChunkOutput(None, *flat[-3:]))
        outs[-1] = ChunkOutput(carry, *flat[-3:])
    return InnerLoopOutput(
        chunk_loss=torch.cat([o.loss for o in outs], 1),
        token_nll=torch.cat([o.nll for o in outs], 1),
        inner_grad_norm=torch.cat([o.grad_norm for o in outs], 1),
        fast_weights=outs[-1].carry.fast,
    )


__all__: Sequence[str] = [
    "Carry",
    "ChunkContext",
    "ChunkOutput",
    "InnerLoopOutput",
    "chunk_step",
    "inner_lr_at",
    "run_chunks",
    "run_inner_loop",
]
