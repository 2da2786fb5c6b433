"""The compiled chunk step: one inner step of the suffix as a pure function of tensors, whose
inner gradient comes from torch.func, compiled with torch.compile.

torch.compile cannot differentiate compiled code twice (pytorch issue 91469). The inner gradient
is therefore taken INSIDE the compiled function with `torch.func.grad_and_value`: AOTAutograd
traces it as ordinary forward operations, and the outer (meta) gradient through the compiled
graph is first order. Inside the region everything is plain math that Inductor fuses: the chunk
attention is the masked softmax of `kernels.attention.reference` (the registered twice-
differentiable ops cannot be transformed by torch.func: their autograd lacks setup_context), the
tied head's dl/dh the fused head's closed form w (softmax(h E^T) E - E[y]) carried through the
suffix by torch.func.vjp (or, `head_form = "autograd"`, torch.func's own gradient of the
cross-entropy).

What stays fixed across chunks and steps, so that one graph serves them all:
- the cache rows before the sequence start are masked by a tensor position (`first_valid`), not
  cut off (a cut changes the shapes of the first W/b chunks);
- the inner step size is a 0-d tensor (it ramps every step of the warm-up);
- the chunk's targets and mask are sliced outside.
Graphs: one per (grad mode, whether the chunk takes its inner step, autocast state, shapes).

Known torch bugs return silently wrong gradients for some torch.func-in-compile patterns
(pytorch issues 136662, 154284): tests/test_compiled.py compares every output and gradient of
this path with the eager one.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ttte2e.kernels.attention import reference

from .inner_loop import Carry, ChunkContext, ChunkOutput, clip_scale
from .layers import apply_rope, at_least_fp32

if TYPE_CHECKING:
    from .transformer import TTTModel


# TTTE2E_COMPILE=force: a compile failure raises (tests); otherwise it warns once and runs eager
FORCE_ENV = "TTTE2E_COMPILE"


def forced() -> bool:
    return os.environ.get(FORCE_ENV, "").lower() == "force"


def _block_chunk(block, h, cache_k, cache_v, rope, window, first_valid, fast):
    """A TTT block on one chunk over [cache; chunk] with every cache row kept and the rows before
    the sequence start masked (eager cuts them off: same values, fixed shapes here)."""
    attn = block.attn
    q, k, v = attn.project(block.attn_norm(h))
    keys = torch.cat((cache_k, k), dim=2)
    values = torch.cat((cache_v, v), dim=2)
    visible = reference.chunk_visibility(q.shape[2], keys.shape[2], window, 0, q.device)
    visible = visible & (torch.arange(keys.shape[2], device=q.device) >= first_valid)[None, :]
    o = reference.masked_attention(
        apply_rope(q, rope[-q.shape[2] :]), apply_rope(keys, rope), values, visible
    )
    a = h + block.attn_post_norm(attn._out(o))
    # contiguous: the next chunk's input layout must not depend on this one's buffer
    return (
        block._mlps(a, fast),
        keys[:, :, -window:].contiguous(),
        values[:, :, -window:].contiguous(),
    )


# How the compiled step takes the head's part of the inner gradient (both plain math):
# - "autograd": torch.func differentiates the cross-entropy; Inductor fuses its double backward.
# - "closed_form": dl/dh = w (softmax(h E^T) E - E[y]) written out (the fused head's formula),
#   and torch.func.vjp carries it through the suffix blocks.
# bench_meta_step.py --compile times both: the closed form was the faster (docs/benchmarks.md).
HEAD_FORMS = ("autograd", "closed_form")
head_form = "closed_form"


def _chunk_step(model, fast, caches, x, targets, mask, first_valid, eta, rope, update):
    """fast: 3 per TTT block [B, out, in]; caches: 2 per block [B, H, W, dh]; x [B, b, d];
    targets/mask [B, b]; first_valid, eta: 0-d tensors. Returns (new fast, new caches, nll [B, b],
    loss [B], grad norm [B, 1] or [B, 0])."""
    cfg = model.config
    window = caches[0].shape[2]
    weights = mask / mask.sum(-1, keepdim=True).clamp_min(1e-10)
    embed = model.embed.weight

    def normed_out(fast):
        h, new_caches = x, []
        for s, block in enumerate(model.ttt_blocks):
            h, k, v = _block_chunk(
                block,
                h,
                caches[2 * s],
                caches[2 * s + 1],
                rope,
                window,
                first_valid,
                tuple(fast[3 * s : 3 * s + 3]),
            )
            new_caches += [k, v]
        return model.final_norm(h), new_caches

    def head(normed):
        logits = at_least_fp32(F.linear(normed, embed))
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        return logits, nll.view_as(weights)

    def loss_of(fast):
        normed, new_caches = normed_out(fast)
        nll = head(normed)[1]
        loss = (nll * weights).sum(-1)
        # summed over sequences: each sequence's loss depends only on its own theta
        return loss.sum(), (loss, nll, new_caches)

    if not update:
        _, (loss, nll, new_caches) = loss_of(fast)
        return list(fast), new_caches, nll, loss, loss.new_zeros(loss.shape[0], 0)
    if head_form == "autograd":
        grads, (_, (loss, nll, new_caches)) = torch.func.grad_and_value(loss_of, has_aux=True)(fast)
    else:
        normed, pullback, new_caches = torch.func.vjp(normed_out, fast, has_aux=True)
        logits, nll = head(normed)
        loss = (nll * weights).sum(-1)
        probs = torch.softmax(logits, -1)
        grad_normed = weights[..., None] * (
            torch.matmul(probs.to(embed.dtype), embed) - embed[targets]
        )
        (grads,) = pullback(grad_normed.to(normed.dtype))
    norm = torch.sqrt(
        model.parallel.sum_over_shards(
            sum(at_least_fp32(g).pow(2).flatten(1).sum(1) for g in grads)
        )
    )
    step = eta * clip_scale(norm, cfg.inner_clip)
    scale = model.parallel.copy_to_shards(step.view(-1, 1, 1))
    new_fast = [t - scale * at_least_fp32(g) for t, g in zip(fast, grads)]
    return new_fast, new_caches, nll, loss, norm[:, None].detach()


@contextmanager
def _saved_tensor_hooks_set_aside():
    """No saved-tensor hooks while the chunk step runs: torch.func refuses to trace under them
    ("torch.func.{grad, vjp, ...} don't yet support saved tensor hooks"). So host offload moves
    the remat carries (saved outside this call) but not what the compiled step itself saves."""
    stack = []
    while (top := torch._C._autograd._top_saved_tensors_default_hooks(False)) is not None:
        stack.append(top)
        torch._C._autograd._pop_saved_tensors_default_hooks()
    try:
        yield
    finally:
        for pack, unpack in reversed(stack):
            torch._C._autograd._push_saved_tensors_default_hooks(pack, unpack)


def _block_forward(model, block, h, rope, window):
    return block(h, rope, window)


# The torch.compile backend: "inductor" generates fused code (what runs); "aot_eager" traces the
# same graphs (Dynamo, AOTAutograd's functionalization and joint forward/backward) and runs them
# without code generation: the tests that prove a tracing property use it, being cheap cold.
BACKENDS = ("inductor", "aot_eager")
backend = "inductor"

_compiled: dict[tuple[str, str], object] = {}
_failed: str | None = None  # the first compile error: everything runs eager after it


_warned_plan = False


def _call(name: str, fn, model, *args):
    """fn compiled (once per name) called on (model, *args); None when the model runs eager:
    once compilation has failed, or under a parallel plan that does not compile."""
    global _failed, _warned_plan
    if _failed is not None:
        return None
    if not model.parallel.compiles:
        if not _warned_plan:
            _warned_plan = True
            warnings.warn(
                f"TTTConfig.compile is set, but the model's parallel plan "
                f"({type(model.parallel).__name__}) runs eager",
                RuntimeWarning,
                stacklevel=3,
            )
        return None
    if backend not in BACKENDS:
        raise ValueError(f"compiled.backend {backend!r}: choose from {BACKENDS}")
    key = (name, backend)
    if key not in _compiled:
        # graphs per function: grad mode x inner step taken or not x first chunk (its zero
        # caches need no gradient) x batch 1 / other batch sizes (then symbolic) x autocast:
        # more than Dynamo's default limit of 8, after which it would run eager unannounced
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _compiled[key] = torch.compile(fn, fullgraph=True, backend=backend)
    try:
        return _compiled[key](model, *args)
    except torch._dynamo.exc.TorchDynamoException as error:  # tracing or code generation
        if forced():
            raise
        _failed = f"{type(error).__name__}: {error}".splitlines()[0]
        warnings.warn(
            f"torch.compile failed ({_failed}); the TTT model runs eager from now on "
            f"(set {FORCE_ENV}=force to raise instead)",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def run_block(model, block, h: torch.Tensor, rope: torch.Tensor, window: int) -> torch.Tensor:
    """A whole-sequence block (prefix, or the plain pass) compiled; first order only, so the
    attention there may be any fused kernel. rope: the real view [P, dh/2, 2]."""
    out = _call("block", _block_forward, model, block, h, rope, window)
    return block(h, rope, window) if out is None else out


def chunk_step(
    model: TTTModel, ctx: ChunkContext, c: int, fast, caches, x, create_graph: bool
) -> ChunkOutput | None:
    """inner_loop.chunk_step through the compiled function; None when compilation failed
    (warned once) and the caller runs eager."""
    b, window = ctx.chunk, ctx.window
    span = slice(c * b - ctx.offset, (c + 1) * b - ctx.offset)
    update = not (ctx.updates is not None and c >= ctx.updates)
    zero_eta = isinstance(ctx.eta, (int, float)) and ctx.eta == 0
    device = x.device
    eta = (
        ctx.eta
        if isinstance(ctx.eta, torch.Tensor)
        else torch.tensor(float(ctx.eta), device=device)
    )
    first_valid = torch.tensor(max(0, window - c * b), device=device)
    # theta_0 arrives as a stride-0 view over the batch, later theta contiguous: one layout
    fast = [t.contiguous() for t in fast]
    if not create_graph:  # one requires_grad pattern for every forward-only call
        fast, caches, x = [t.detach() for t in fast], [t.detach() for t in caches], x.detach()
    args = (
        model,
        fast,
        list(caches),
        x,
        ctx.targets[:, span],
        ctx.mask[:, span],
        first_valid,
        eta,
        torch.view_as_real(ctx.rope),
        update and not zero_eta,
    )
    with torch.no_grad() if not create_graph else nullcontext(), _saved_tensor_hooks_set_aside():
        out = _call("chunk_step", _chunk_step, *args)  # args[0] is the model
    if out is None:
        return None
    new_fast, new_caches, nll, loss, norm = out
    if update and zero_eta:
        new_fast = [t.clone() for t in new_fast]
        norm = torch.zeros_like(loss)[:, None]
    return ChunkOutput(Carry(list(new_fast), list(new_caches)), nll, loss, norm)
