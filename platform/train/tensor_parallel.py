"""Tensor ("state") parallelism of a TTTModel over a group of N ranks, applied from outside.

The layout of the official code's "state" mesh axis (Megatron's): attention heads split (q/k/v
rows, output columns; QK-norm gains shared), every SwiGLU (static and prime) split over its hidden
width (w1/w3 rows, w2 columns), the tied embedding split over the vocabulary. So the per-sequence
fast weights, their inner gradients, the KV caches and the remat carries are 1/N per rank. Norm
gains stay whole. Everything between the split regions is computed identically on every rank.

Two collectives carry it, each the other's backward, so any order of differentiation is exact
(the inner gradient is taken with create_graph=True and the outer backward goes through it):
- copy_to_group: identity forward; backward sums the ranks' partial gradients.
- sum_over_group: all-reduce forward; backward identity.
A region is entered through copy_to_group (hooked on the norm before it) and left through
sum_over_group (hooked on its output projection). In the prefix blocks (the whole sequence at
once) the sequence is split over the ranks outside the regions instead (sequence parallelism): a
region is entered by gathering the sequence (backward: reduce-scatter) and left by a
reduce-scatter (backward: gather), so norms, residuals and what they save are 1/N per rank. The
inner clip norm sums squared norms over the group (and the step size it gives enters every shard
through copy_to_group), and the head is the vocabulary-sharded fused op (kernels/lm_head).

`parallelize(model, group)` shards a whole (identically initialised or loaded) model in place:
it swaps split linears, norms and the embedding for their parallel versions, hooks the region
boundaries, and sets `model.parallel` to a `TensorParallel` plan (model/parallel.py: the prefix,
head and shard sums the model asks of it). `full_state_dict(model)` gathers the whole weights
back (what model folders hold).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ttte2e.kernels.lm_head import nll_and_hidden_grad
from ttte2e.model import TTTConfig, TTTModel
from ttte2e.model.layers import RMSNorm, at_least_fp32, rms_norm
from ttte2e.model.parallel import SingleDevice


# ---- collectives that are twice (any number of times) differentiable ---------------------------
class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _SumOverGroup.apply(grad, ctx.group), None


class _SumOverGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _CopyToGroup.apply(grad, ctx.group), None


def _own_slice(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    width = x.shape[dim] // dist.get_world_size(group)
    return x.narrow(dim, dist.get_rank(group) * width, width).contiguous()


def _all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """The ranks' x concatenated along dim, gathered into one buffer (one collective, no list
    of N tensors and no concatenation copy: dim is moved first, free for the sequence dim of a
    batch of 1)."""
    moved = x.movedim(dim, 0).contiguous()
    out = moved.new_empty((moved.shape[0] * dist.get_world_size(group),) + moved.shape[1:])
    dist.all_gather_single(out, moved, group=group)
    return out.movedim(0, dim).contiguous()


class _Gather(torch.autograd.Function):
    """The ranks' slices of `dim`, concatenated. Its backward depends on what follows: a sharded
    region (each rank's gradient is a partial: reduce-scatter) or replicated compute (each rank
    holds the whole gradient: its own slice)."""

    @staticmethod
    def forward(ctx, x, dim, group, partial_grads):
        ctx.dim, ctx.group, ctx.partial_grads = dim, group, partial_grads
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.partial_grads:
            return _ReduceScatter.apply(grad, ctx.dim, ctx.group), None, None, None
        return _OwnSlice.apply(grad, ctx.dim, ctx.group), None, None, None


class _ReduceScatter(torch.autograd.Function):
    """This rank's slice of `dim` of the sum of the ranks' partials."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        # one code path for NCCL and gloo (which has reduce-scatter since torch 2.13), so the
        # CPU tests run what a GPU runs
        moved = x.movedim(dim, 0).contiguous()
        out = moved.new_empty((moved.shape[0] // dist.get_world_size(group),) + moved.shape[1:])
        dist.reduce_scatter_single(out, moved, group=group)
        return out.movedim(0, dim).contiguous()

    @staticmethod
    def backward(ctx, grad):
        return _Gather.apply(grad, ctx.dim, ctx.group, True), None, None


class _OwnSlice(torch.autograd.Function):
    """This rank's slice of `dim` of a whole (replicated) tensor."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _own_slice(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _Gather.apply(grad, ctx.dim, ctx.group, False), None, None


def copy_to_group(x: torch.Tensor, group) -> torch.Tensor:
    """A whole (replicated) tensor entering a sharded region."""
    return _CopyToGroup.apply(x, group)


def sum_over_group(x: torch.Tensor, group) -> torch.Tensor:
    """The sum of the ranks' partials: a whole tensor, the same on every rank."""
    return _SumOverGroup.apply(x, group)


def gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    """The ranks' shards of the last dimension, concatenated in rank order."""
    return _Gather.apply(x, -1, group, False)


def gather_sequence(x: torch.Tensor, group, into_sharded_region: bool) -> torch.Tensor:
    """The ranks' slices of the sequence (dim 1) concatenated: into a sharded region (its input
    gradients are partials) or into compute every rank repeats (gradients whole)."""
    return _Gather.apply(x, 1, group, into_sharded_region)


def reduce_scatter_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """The ranks' partials summed, this rank's slice of the sequence (dim 1)."""
    return _ReduceScatter.apply(x, 1, group)


# ---- the layout -----------------------------------------------------------------------------------
def layout_problems(config: TTTConfig, size: int) -> list[str]:
    """What keeps `config` from splitting over `size` ranks (empty when it splits)."""
    if size < 1:
        return [f"tensor parallelism {size}: must be >= 1"]
    problems = []
    # seq_len: the prefix blocks split the sequence over the ranks between their matmuls
    for what, value in (
        ("n_heads", config.n_heads),
        ("mlp_hidden", config.mlp_hidden),
        ("vocab_size", config.vocab_size),
        ("seq_len", config.seq_len),
    ):
        if value % size:
            problems.append(f"tensor parallelism {size} does not divide {what}={value}")
    return problems


@dataclass
class TensorParallelLayout:
    group: object
    rank: int
    size: int
    # parameter name -> dimension it is split along (every other parameter is whole)
    split_dims: dict[str, int] = field(default_factory=dict)


class VocabShardedEmbedding(nn.Module):
    """This rank's rows [offset, offset + V/N) of the tied embedding; a lookup sums the ranks'
    (zero where another rank holds the id)."""

    def __init__(self, weight: torch.Tensor, offset: int, group):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.offset, self.group = offset, group

    def partial(self, ids: torch.Tensor) -> torch.Tensor:
        """This rank's rows, zero for the ids another rank holds (the lookup before the sum)."""
        local = ids - self.offset
        held = (local >= 0) & (local < self.weight.shape[0])
        rows = F.embedding(torch.where(held, local, torch.zeros_like(local)), self.weight)
        return rows * held.unsqueeze(-1).to(rows.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return sum_over_group(self.partial(ids), self.group)


def _split(linear: nn.Linear, dim: int, rank: int, size: int) -> None:
    width = linear.weight.shape[dim] // size
    shard = linear.weight.detach().narrow(dim, rank * width, width).clone()
    linear.weight = nn.Parameter(shard)
    linear.out_features, linear.in_features = shard.shape


def _enter(group):
    def hook(_module, _inputs, output):
        return copy_to_group(output, group)

    return hook


def _leave(group):
    def hook(_module, _inputs, output):
        return sum_over_group(output, group)

    return hook


def _gather_in(group):
    def hook(_module, _inputs, output):
        # the region's matmuls cast their input to the autocast dtype anyway: gather it cast
        # (half the bytes of the fp32 norm output under bf16), the same numbers
        device = output.device.type
        if torch.is_autocast_enabled(device):
            output = output.to(torch.get_autocast_dtype(device))
        return gather_sequence(output, group, into_sharded_region=True)

    return hook


def _scatter_out(group):
    def hook(_module, _inputs, output):
        return reduce_scatter_sequence(output, group)

    return hook


class SharedGainRMSNorm(RMSNorm):
    """An RMSNorm whose one gain is applied on every rank to its part (heads or tokens): the
    gain's gradient sums the ranks'."""

    def __init__(self, norm: RMSNorm, group):
        super().__init__(norm.weight.shape[0], norm.eps)
        self.weight = norm.weight
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, copy_to_group(self.weight, self.group), self.eps)


def _share_gain(owner: nn.Module, name: str, group) -> RMSNorm:
    norm = SharedGainRMSNorm(getattr(owner, name), group)
    setattr(owner, name, norm)
    return norm


class TensorParallel(SingleDevice):
    """The model's parallel plan over a tensor-parallel group (see the module docstring)."""

    # The collectives sit in autograd.Functions inside the inner gradient, which torch.func
    # (the compiled chunk step's inner gradient) cannot transform: a tensor-parallel run is eager
    compiles = False

    def __init__(self, layout: TensorParallelLayout):
        self.layout = layout
        self.group = layout.group

    def prefix(self, model: TTTModel, input_ids: torch.Tensor) -> torch.Tensor:
        """The prefix with the sequence split over the ranks wherever it is not in a sharded
        matmul region (Megatron's sequence parallelism): norms, residuals and what they save are
        1/N per rank; only the gathered inputs of the q/k/v and MLP matmuls are whole."""
        seq = input_ids.shape[1]
        if seq % self.layout.size:
            raise ValueError(
                f"sequence length {seq} does not split over {self.layout.size} "
                "tensor-parallel ranks"
            )
        h = reduce_scatter_sequence(model.embed.partial(input_ids), self.group)
        h = model.run_blocks(h, model.prefix_blocks, seq_len=seq)
        return gather_sequence(h, self.group, into_sharded_region=False)

    def logits(self, model: TTTModel, h: torch.Tensor) -> torch.Tensor:
        local = at_least_fp32(F.linear(model.final_norm(h), model.embed.weight))
        return gather_last_dim(local, self.group)

    def token_nll(self, model: TTTModel, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        normed = model.final_norm(h).flatten(0, 1)
        unused = torch.zeros(normed.shape[0], dtype=torch.float32, device=normed.device)
        nll, _ = self.head_nll_and_grad(model, normed, targets.flatten(), unused)
        return nll.view_as(targets)

    def head_nll_and_grad(
        self, model: TTTModel, normed: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return nll_and_hidden_grad(
            normed, model.embed.weight, targets, weights, self.group, model.embed.offset
        )

    def sum_over_shards(self, partial: torch.Tensor) -> torch.Tensor:
        return sum_over_group(partial, self.group)

    def copy_to_shards(self, whole: torch.Tensor) -> torch.Tensor:
        return copy_to_group(whole, self.group)


def parallelize(model: TTTModel, group) -> TensorParallelLayout:
    """Shard `model` in place over `group` (every rank holds the same whole model on entry)."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    problems = layout_problems(model.config, size)
    if problems:
        raise ValueError("; ".join(problems))
    layout = TensorParallelLayout(group, rank, size)
    if size == 1:
        return layout
    for i, block in enumerate(model.blocks):
        attn = block.attn
        for name in ("wq", "wk", "wv"):
            _split(getattr(attn, name), 0, rank, size)
            layout.split_dims[f"blocks.{i}.attn.{name}.weight"] = 0
        _split(attn.wo, 1, rank, size)
        layout.split_dims[f"blocks.{i}.attn.wo.weight"] = 1
        attn.n_heads //= size
        for name in ("q_norm", "k_norm"):
            _share_gain(attn, name, group)
        # prefix blocks hold 1/N of the sequence between regions; the suffix (chunk by chunk,
        # a few tokens at a time) holds it whole
        enter, leave = (_gather_in, _scatter_out) if not block.ttt else (_enter, _leave)
        if not block.ttt:
            for name in ("attn_norm", "attn_post_norm", "mlp_norm", "mlp_post_norm"):
                _share_gain(block, name, group)
        block.attn_norm.register_forward_hook(enter(group))
        attn.wo.register_forward_hook(leave(group))
        mlps = [("mlp", block.mlp_norm, block.mlp)]
        if block.ttt:
            mlps.append(("prime_mlp", block.prime_norm, block.prime_mlp))
        for name, norm, mlp in mlps:
            for w, dim in (("w1", 0), ("w3", 0), ("w2", 1)):
                _split(getattr(mlp, w), dim, rank, size)
                layout.split_dims[f"blocks.{i}.{name}.{w}.weight"] = dim
            norm.register_forward_hook(enter(group))
            mlp.register_forward_hook(leave(group))
    rows = model.config.vocab_size // size
    table = model.embed.weight.detach()[rank * rows : (rank + 1) * rows].clone()
    model.embed = VocabShardedEmbedding(table, rank * rows, group)
    layout.split_dims["embed.weight"] = 0

    model.parallel = TensorParallel(layout)
    for name, param in model.named_parameters():
        if name in layout.split_dims:
            # DeepSpeed's gradient-norm reduction counts a split parameter on every rank, a whole
            # one once (runtime/utils.py is_model_parallel_parameter)
            param.tensor_model_parallel = True
            param.partition_dim = layout.split_dims[name]
    return layout


def full_state_dict(model: TTTModel) -> dict[str, torch.Tensor]:
    """The whole weights of a (possibly) sharded model, on every rank of its group (CPU)."""
    layout = getattr(model.parallel, "layout", None)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if layout is None or layout.size == 1:
        return {k: v.cpu() for k, v in state.items()}
    out = {}
    for name, tensor in state.items():
        dim = layout.split_dims.get(name)
        if dim is None:
            out[name] = tensor.cpu()
            continue
        parts = [torch.empty_like(tensor) for _ in range(layout.size)]
        dist.all_gather(parts, tensor.contiguous(), group=layout.group)
        out[name] = torch.cat(parts, dim).cpu()
    return out


@dataclass
class ParallelGroups:
    """A rank's place in the data-parallel x tensor-parallel grid: world rank r is tensor-parallel
    rank r % N of group r // N (consecutive ranks, which Ray Train places on one node), and data-
    parallel rank r // N among the ranks with its tensor-parallel rank."""

    tensor: object
    data: object
    tensor_rank: int
    tensor_size: int
    data_rank: int
    data_size: int


def build_groups(tensor_parallel: int) -> ParallelGroups:
    """Create every group (each rank creates all of them, in the same order, as torch requires)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if tensor_parallel < 1 or world % tensor_parallel:
        raise ValueError(
            f"tensor parallelism {tensor_parallel} does not divide the {world} workers"
        )
    tensor = data = None
    for g in range(world // tensor_parallel):
        ranks = list(range(g * tensor_parallel, (g + 1) * tensor_parallel))
        group = dist.new_group(ranks)
        if rank in ranks:
            tensor = group
    for j in range(tensor_parallel):
        ranks = list(range(j, world, tensor_parallel))
        group = dist.new_group(ranks)
        if rank in ranks:
            data = group
    return ParallelGroups(
        tensor,
        data,
        rank % tensor_parallel,
        tensor_parallel,
        rank // tensor_parallel,
        world // tensor_parallel,
    )


class DeepSpeedMPU:
    """DeepSpeed's `mpu` interface over ParallelGroups: ZeRO partitions and all-reduces over the
    data-parallel group only; the gradient norm counts each split parameter once per shard."""

    def __init__(self, groups: ParallelGroups):
        self.groups = groups

    def get_model_parallel_rank(self) -> int:
        return self.groups.tensor_rank

    def get_model_parallel_world_size(self) -> int:
        return self.groups.tensor_size

    def get_model_parallel_group(self):
        return self.groups.tensor

    def get_data_parallel_rank(self) -> int:
        return self.groups.data_rank

    def get_data_parallel_world_size(self) -> int:
        return self.groups.data_size

    def get_data_parallel_group(self):
        return self.groups.data

    # the names newer DeepSpeed code asks for
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group


__all__ = [
    "DeepSpeedMPU",
    "ParallelGroups",
    "SharedGainRMSNorm",
    "TensorParallel",
    "TensorParallelLayout",
    "VocabShardedEmbedding",
    "build_groups",
    "copy_to_group",
    "full_state_dict",
    "gather_last_dim",
    "gather_sequence",
    "layout_problems",
    "parallelize",
    "reduce_scatter_sequence",
    "sum_over_group",
]
