"""What the model asks of its placement: the few operations that differ when it is split.

A TTTModel holds two plain objects (not modules, not methods):
- `model.parallel`: a `SingleDevice` by default. Tensor parallelism
  (ttte2e.platform.train.tensor_parallel) replaces it with a subclass whose prefix runs
  sequence-parallel, whose head is split over the vocabulary and whose sums and copies run over
  the group. Everything else in the model is the same code on one device or N.
- `model.offload`: a `KeepOnDevice` by default: where the backward's longest-kept tensors live.
  Host offload (ttte2e.platform.train.offload) replaces it with saved-tensor-hook contexts.

Reading transformer.py and inner_loop.py, every call that a parallel run changes goes through
one of these two objects.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ttte2e.kernels.lm_head import nll_and_hidden_grad

from .layers import at_least_fp32

if TYPE_CHECKING:
    from .transformer import TTTModel


def nll_of_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token NLL [B, P] of logits [B, P, V] for targets [B, P]."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(
        targets
    )


class SingleDevice:
    """The whole model on one device: every operation is the plain one."""

    # whether TTTConfig(compile=True) compiles the model under this plan (compiled.py)
    compiles = True

    def prefix(self, model: TTTModel, input_ids: torch.Tensor) -> torch.Tensor:
        """Embedding + the prefix blocks over the whole sequence."""
        return model.run_blocks(model.embed(input_ids), model.prefix_blocks)

    def logits(self, model: TTTModel, h: torch.Tensor) -> torch.Tensor:
        """Logits [..., V] (at least fp32) of final hidden states."""
        return at_least_fp32(F.linear(model.final_norm(h), model.embed.weight))

    def token_nll(self, model: TTTModel, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nll_of_logits(self.logits(model, h), targets)

    def head_nll_and_grad(
        self, model: TTTModel, normed: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tied head on final-normed states [N, d]: NLL [N] and d(sum_i w_i nll_i)/d normed."""
        return nll_and_hidden_grad(normed, model.embed.weight, targets, weights)

    def sum_over_shards(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum of a per-shard partial (the inner gradient's squared norm) over the shards."""
        return partial

    def copy_to_shards(self, whole: torch.Tensor) -> torch.Tensor:
        """A whole value (the inner step size) used by every shard: its gradient sums them."""
        return whole


class KeepOnDevice:
    """Saved tensors stay where they were made."""

    def carries(self) -> AbstractContextManager:
        """Around the inner loop's remat carries (fast weights and KV caches per group)."""
        return nullcontext()

    def prefix(self) -> AbstractContextManager:
        """Around the checkpointed prefix blocks (their saved inputs)."""
        return nullcontext()

    def step(self) -> AbstractContextManager:
        """Around a whole meta step (every saved tensor)."""
        return nullcontext()


__all__ = ["KeepOnDevice", "SingleDevice", "nll_of_logits"]
