"""Host offload of what the meta step's backward keeps (--offload), by saved-tensor hooks.

- 'carries': the inner loop's remat carries (fast weights and KV caches at group or chunk
  boundaries: what `_Remat` saves), which grow with T / b;
- 'prefix':  the inputs of the checkpointed prefix blocks (torch.utils.checkpoint saves them
  through the same hooks), which grow with T;
- 'all':     every tensor the forward saves for backward.
On CUDA a packed tensor is copied into pinned host memory on a side stream (overlapping the
forward's compute; the allocator keeps the GPU copy until the copy ends) and copied back when
the backward unpacks it. Parameters (and views of them) are never moved: they stay on the GPU
anyway. On CPU the move is a no-op: the tensor is kept as it is, so results are bit-identical and
the tests can count what would move.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn

from ttte2e.model import TTTModel

MIN_BYTES = 1 << 16  # smaller tensors cost more to move than they free


class HostOffload:
    """Saved-tensor hooks that move tensors to host memory; counts what they moved."""

    def __init__(self, min_bytes: int = MIN_BYTES):
        self.min_bytes = min_bytes
        self.tensors = 0
        self.bytes = 0
        self._stream = None

    @contextmanager
    def hooks(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield

    def _pack(self, t: torch.Tensor):
        base = t._base if t._base is not None else t
        size = t.numel() * t.element_size()
        if isinstance(base, nn.Parameter) or size < self.min_bytes or t.layout != torch.strided:
            return (None, t)
        self.tensors += 1
        self.bytes += size
        if t.device.type != "cuda":
            return (None, t)  # already in host memory: nothing to move
        if self._stream is None:
            self._stream = torch.cuda.Stream(t.device)
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self._stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(self._stream):
            host.copy_(t, non_blocking=True)
        t.record_stream(self._stream)  # the GPU copy is freed only after the copy ran
        return (t.device, host)

    def _unpack(self, packed):
        device, t = packed
        if device is None:
            return t
        torch.cuda.current_stream(device).wait_stream(self._stream)
        return t.to(device, non_blocking=True)


def apply_offload(model: TTTModel, mode: str, min_bytes: int = MIN_BYTES
                  ) -> tuple[HostOffload, object]:
    """Install `mode` on the model: (the counter, a context for the whole meta step: 'all')."""
    offload = HostOffload(min_bytes)
    if mode in ("carries",):
        model.offload_carries = offload.hooks
    elif mode == "prefix":
        model.offload_prefix = offload.hooks
    elif mode == "all":
        return offload, offload.hooks
    elif mode != "none":
        raise ValueError(f"offload {mode!r}: choose none, carries, prefix or all")
    return offload, nullcontext


__all__ = ["HostOffload", "apply_offload"]
