"""One tensor-parallel rank of a production-size meta step, run on fake tensors: shapes, strides and
collectives are real, no memory is allocated and no number is computed.

    python pipelines/bench/fake_plan_check.py                       # 3B, T 131072, TP 8 (~8 min)
    python pipelines/bench/fake_plan_check.py --seq-len 16384 --layers 4

Under FakeTensorMode with a fake process group of --tp ranks, `parallelize`, `meta_loss` (bf16
autocast, as the trainer runs it) and the backward execute end to end, so a shape, stride or
contiguity error anywhere in the tensor-parallel meta step at these sizes shows here, not on the
cluster. The bytes of every tensor alive at once are tracked (storages, freed when Python drops
them) and the peak above the weights is printed beside the capacity plan's `step` figure for the
same config. What it cannot see: the CUDA allocator's rounding and fragmentation, and the GPU-only
paths (the CPU dispatch runs the blocked PyTorch attention where a GPU runs Triton / flash-attn).
"""

from __future__ import annotations

import argparse
import time
import weakref

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import ttte2e.model.transformer as transformer
from ttte2e.model import TTTModel, preset
from ttte2e.platform.train.plan import memory_per_gpu
from ttte2e.platform.train.tensor_parallel import parallelize

MIB = 1 << 20


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages every op's outputs hold, alive at once, and their peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = id(storage)  # storages keep their Python object while alive
        if key in self._seen:
            return
        self._seen.add(key)
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._freed, key, size)

    def _freed(self, key: int, size: int) -> None:
        self.live -= size
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out


def run(preset_name: str, seq_len: int, tp: int, layers: int | None) -> dict:
    changes = dict(seq_len=seq_len, checkpoint_prefix=True)
    if layers:
        changes.update(n_layers=layers, n_ttt_blocks=max(1, layers // 4))
    config = preset(preset_name, **changes)
    # the token range check reads values (a host sync fake tensors do not have)
    check, transformer.check_token_ids = transformer.check_token_ids, lambda *a, **k: None
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp)
    start = time.perf_counter()
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            model = TTTModel(config)
            parallelize(model, dist.group.WORLD)
            tokens = torch.randint(2, config.vocab_size, (1, seq_len + 1))
            tracker = LiveBytes()
            with tracker:
                for p in model.parameters():
                    tracker.add(p)
                weights = tracker.live
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = model.meta_loss(tokens).loss
                forward_peak = tracker.peak
                loss.backward()
            missing = [n for n, p in model.named_parameters() if p.grad is None]
    finally:
        transformer.check_token_ids = check
        dist.destroy_process_group()
    if missing:
        raise RuntimeError(f"no gradient reached {missing[:5]}")
    plan = memory_per_gpu(config, seq_len, 0, 1, 1, bf16=True, tensor_parallel=tp)
    return dict(
        config=config,
        weights=weights,
        tracked=tracker.peak - weights,
        forward=forward_peak - weights,
        plan=plan.step,
        plan_weights=plan.weights,
        seconds=time.perf_counter() - start,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="3B")
    parser.add_argument("--seq-len", type=int, default=131072)
    parser.add_argument("--tp", type=int, default=8)
    parser.add_argument("--layers", type=int, help="fewer layers (a quick check of the widths)")
    args = parser.parse_args()
    r = run(args.preset, args.seq_len, args.tp, args.layers)
    c = r["config"]
    print(
        f"{args.preset}: {c.n_layers} layers ({c.n_ttt_blocks} TTT), d {c.d_model}, T {c.seq_len}, "
        f"k {c.attn_window}, b {c.chunk_size}, remat {c.remat}, checkpoint_prefix, bf16 autocast; "
        f"parallelize + meta_loss + backward ran on fake tensors in {r['seconds']:.0f} s"
    )
    print(
        f"weights per rank: tracked {r['weights'] / MIB:,.0f} MiB, plan {r['plan_weights'] / MIB:,.0f} MiB"
    )
    print(
        f"peak per rank (precision bf16, TP {args.tp}, fake tensors): tracked "
        f"{r['tracked'] / MIB:,.0f} MiB (forward {r['forward'] / MIB:,.0f} MiB), plan "
        f"{r['plan'] / MIB:,.0f} MiB (plan / tracked {r['plan'] / r['tracked']:.2f})"
    )


if __name__ == "__main__":
    main()
