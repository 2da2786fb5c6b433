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
the tests can count what would move. `HostOffload(emulate_copies=True)` makes the CPU move what
CUDA does to the backward's view of it: a packed tensor is copied, and `poison_sources()` fills
the originals still alive with NaN (as the allocator would reuse their memory), so a backward
that read an original instead of its copy (a use-after-free on a GPU) gives NaN gradients.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager, nullcontext
from typing import Literal, get_args

import torch
import torch.nn as nn

from ttte2e.model import TTTModel
from ttte2e.model.parallel import KeepOnDevice

OffloadMode = Literal["none", "carries", "prefix", "all"]
OFFLOAD_MODES: tuple[str, ...] = get_args(OffloadMode)

MIN_BYTES = 1 << 16  # smaller tensors cost more to move than they free


class HostOffload:
    """Saved-tensor hooks that move tensors to host memory (each saved tensor once, however many
    ops save it); counts what they moved and the most held at once."""

    def __init__(self, min_bytes: int = MIN_BYTES, emulate_copies: bool = False):
        self.min_bytes = min_bytes
        self.emulate_copies = emulate_copies
        # emulate_copies: the originals' storages (an alias may die while its memory lives on)
        self._sources: list[tuple[weakref.ref, torch.dtype]] = []
        self.peak_source_bytes = 0  # emulate_copies: the most original bytes alive at a pack
        self.tensors = 0  # moved so far
        self.bytes = 0
        self.live_bytes = 0  # in host memory now (freed with the graph that saved it)
        self.peak_bytes = 0
        self._stream = None
        # a tensor that several ops save (a norm's input, a matmul's) is moved once: id ->
        # (the tensor, its copy), both weakly, so a reused id never matches a dead tensor
        self._copies: dict[int, tuple[weakref.ref, weakref.ref]] = {}

    def _held(self, t: torch.Tensor, kept: torch.Tensor, size: int) -> None:
        self.live_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self._copies[id(t)] = (weakref.ref(t), weakref.ref(kept))
        weakref.finalize(kept, self._released, id(t), size)

    def _released(self, key: int, size: int) -> None:
        self.live_bytes -= size
        entry = self._copies.get(key)
        if entry is not None and entry[1]() is None:
            del self._copies[key]

    @contextmanager
    def hooks(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield

    def _pack(self, t: torch.Tensor):
        base = t._base if t._base is not None else t
        size = t.numel() * t.element_size()
        if isinstance(base, nn.Parameter):
            return (None, t)
        if size < self.min_bytes or t.layout != torch.strided:
            return (None, t.detach())  # kept in place (detached: see below)
        seen = self._copies.get(id(t))
        if seen is not None and seen[0]() is t and seen[1]() is not None:
            return (t.device if t.device.type == "cuda" else None, seen[1]())
        self.tensors += 1
        self.bytes += size
        if t.device.type != "cuda":
            # already in host memory: nothing to move. Detached, as the host copy is: a saved
            # output kept as itself would hold its own grad_fn (a cycle that outlives the step);
            # autograd re-attaches the grad_fn on unpack
            kept = t.detach()
            if self.emulate_copies:
                kept = kept.clone()
                self._sources.append((weakref.ref(t.untyped_storage()), t.dtype))
                alive = sum(a.untyped_storage().nbytes() for a in self.live_sources())
                self.peak_source_bytes = max(self.peak_source_bytes, alive)
            self._held(t, kept, size)
            return (None, kept)
        if self._stream is None:
            self._stream = torch.cuda.Stream(t.device)
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self._stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(self._stream):
            host.copy_(t, non_blocking=True)
        t.record_stream(self._stream)  # the GPU copy is freed only after the copy ran
        self._held(t, host, size)
        return (t.device, host)

    def live_sources(self) -> list[torch.Tensor]:
        """emulate_copies: the memory of each packed original still alive, as a flat tensor."""
        alive, seen = [], set()
        for ref, dtype in self._sources:
            storage = ref()
            if storage is None or id(storage) in seen:
                continue
            seen.add(id(storage))
            alive.append(torch.empty(0, dtype=dtype).set_(storage))
        return alive

    def poison_sources(self) -> int:
        """emulate_copies: fill the memory of every packed original still alive with NaN (as
        the allocator would reuse it once the copy is made); returns how many."""
        alive = self.live_sources()
        with torch.no_grad():
            for t in alive:
                if t.is_floating_point():
                    t.fill_(float("nan"))
        return len(alive)

    def _unpack(self, packed):
        device, t = packed
        if device is None:
            return t
        torch.cuda.current_stream(device).wait_stream(self._stream)
        return t.to(device, non_blocking=True)


class HostOffloadPlacement(KeepOnDevice):
    """The model's `offload` object (model/parallel.py) for one --offload mode: the named part's
    saved tensors go through the HostOffload hooks; the rest stay on the device."""

    def __init__(self, mode: OffloadMode, offload: HostOffload):
        self.mode, self.offload = mode, offload

    def carries(self):
        return self.offload.hooks() if self.mode == "carries" else nullcontext()

    def prefix(self):
        return self.offload.hooks() if self.mode == "prefix" else nullcontext()

    def step(self):
        return self.offload.hooks() if self.mode == "all" else nullcontext()


def apply_offload(
    model: TTTModel, mode: OffloadMode, min_bytes: int = MIN_BYTES, emulate_copies: bool = False
) -> HostOffload:
    """Install `mode` as the model's offload placement, replacing any installed before; returns
    the counter of what moved. 'none' restores the default (nothing moves)."""
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"offload {mode!r}: choose one of {', '.join(OFFLOAD_MODES)}")
    offload = HostOffload(min_bytes, emulate_copies)
    model.offload = KeepOnDevice() if mode == "none" else HostOffloadPlacement(mode, offload)
    return offload


__all__ = ["HostOffload", "HostOffloadPlacement", "OFFLOAD_MODES", "OffloadMode", "apply_offload"]
