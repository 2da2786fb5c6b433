"""Memory per rank and time of one meta step under tensor parallelism and host offload, beside the
capacity plan's prediction for the same shapes (platform/train/plan.py).

    python pipelines/bench/bench_parallel.py            # the cells below, ~3 min on 2 CPU cores
    python pipelines/bench/bench_parallel.py --seq-len 4096

Each cell runs in a fresh process (TP=2: two processes over gloo, the cores split between them):
a short warm-up step, then one meta step of the benchmark shapes; memory is the rank's peak
resident memory during that step minus its resident memory just before it (VmHWM after
/proc/self/clear_refs), the larger of the ranks. That is what the step adds on top of the
weights: the gradients, what the forward keeps for the backward, and the backward's transients;
the plan's `step` figure predicts exactly that. fp32, and bf16 under CPU autocast (which casts
as CUDA's does: bf16 matmuls, weight copies cached for the backward, fp32 caches and residual).
One line per cell: `peak per rank (precision P, TP N, offload O): measured X MiB, plan Y MiB`.

Offload on CPU is a no-op move (the tensors stay in host memory, which is the CPU's memory), so
its cell shows the bytes the hooks would move, beside the plan's host-memory figure, and a peak
that does not drop: on a GPU the moved bytes leave the device.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from bench_common import read_status, reset_peak  # this folder is on sys.path

from ttte2e.model import TTTConfig, TTTModel

BENCH = dict(
    vocab_size=2048,
    d_model=256,
    n_layers=4,
    n_heads=4,
    mlp_hidden=1024,
    n_ttt_blocks=1,
    seq_len=8192,
    window=1024,
    chunk_size=256,
    remat="nested",
    bos_token_id=1,
)
# (precision, tensor-parallel ranks, offload)
CELLS = (
    ("fp32", 1, "none"),
    ("fp32", 2, "none"),
    ("bf16", 1, "none"),
    ("bf16", 2, "none"),
    ("fp32", 1, "all"),
)


def _tokens(config: TTTConfig, seq_len: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(2, config.vocab_size, (1, seq_len + 1), generator=gen)


def _step(model: TTTModel, tokens: torch.Tensor, precision: str) -> None:
    model.zero_grad(set_to_none=True)
    # as the trainer's MetaObjective: the forward under autocast, the backward after it
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = model.meta_loss(tokens).loss
    loss.backward()


def _measure_rank(
    fields: dict,
    tp: int,
    offload: str,
    precision: str,
    rank: int = 0,
    init_file: str = "",
    out_file: str = "",
) -> dict:
    from ttte2e.platform.train.offload import apply_offload

    if tp > 1:
        import torch.distributed as dist

        from ttte2e.platform.train.tensor_parallel import parallelize

        torch.set_num_threads(max(1, (os.cpu_count() or 2) // tp))
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=tp)
    config = TTTConfig(**fields)
    torch.manual_seed(0)
    model = TTTModel(config)
    if tp > 1:
        parallelize(model, dist.group.WORLD)
    counter = apply_offload(model, offload)
    warm = config.chunk_size * 2 * tp  # a short step first: the allocator's first-use costs
    _step(model, _tokens(config, warm), precision)
    model.zero_grad(set_to_none=True)
    tokens = _tokens(config, config.seq_len)
    counter.bytes = counter.tensors = 0
    before = read_status("VmRSS")
    reset_peak()
    start = time.perf_counter()
    _step(model, tokens, precision)
    seconds = time.perf_counter() - start
    out = dict(
        peak_bytes=read_status("VmHWM") - before,
        seconds=seconds,
        offloaded_bytes=counter.peak_bytes,
    )
    if tp > 1:
        gathered = [None] * tp
        dist.all_gather_object(gathered, out)
        dist.destroy_process_group()
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump(
                    dict(
                        peak_bytes=max(g["peak_bytes"] for g in gathered),
                        seconds=max(g["seconds"] for g in gathered),
                        offloaded_bytes=max(g["offloaded_bytes"] for g in gathered),
                    ),
                    f,
                )
    return out


def _spawned(
    rank: int, fields: dict, tp: int, offload: str, precision: str, init_file: str, out_file: str
):
    _measure_rank(fields, tp, offload, precision, rank, init_file, out_file)


def measure_cell(fields: dict, tp: int, offload: str, precision: str) -> dict:
    """Runs in the fresh process of one cell."""
    if tp == 1:
        return _measure_rank(fields, 1, offload, precision)
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "out.json")
        mp.start_processes(
            _spawned,
            args=(fields, tp, offload, precision, init_file, out_file),
            nprocs=tp,
            start_method="spawn",
        )
        with open(out_file) as f:
            return json.load(f)


def run_cell(fields: dict, tp: int, offload: str, precision: str) -> dict:
    # small allocations from the heap, large ones mapped: freed memory goes back to the system,
    # so the peak is the tensors', not the allocator's fragmentation
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--_cell", json.dumps([fields, tp, offload, precision])]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode:
        raise RuntimeError(
            f"cell {precision} tp={tp} offload={offload} failed:\n{out.stderr[-3000:]}"
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from ttte2e.platform.train.plan import memory_per_gpu

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=BENCH["seq_len"])
    parser.add_argument("--_cell", help=argparse.SUPPRESS)
    parser.add_argument("--only", choices=("fp32", "bf16"), help="only the cells of this precision")
    args = parser.parse_args()
    if args._cell:
        fields, tp, offload, precision = json.loads(args._cell)
        print(json.dumps(measure_cell(fields, tp, offload, precision)))
        return
    fields = dict(BENCH, seq_len=args.seq_len)
    config = TTTConfig(**fields)
    print(
        f"one meta step, 1 sequence of T={config.seq_len}, d {config.d_model}, "
        f"{config.n_layers} layers ({config.n_ttt_blocks} TTT), MLP {config.mlp_hidden}, "
        f"vocab {config.vocab_size}, k {config.window}, b {config.chunk_size}, remat "
        f"{config.remat}; memory per rank in MiB (the step's peak above the weights)"
    )
    rows = {}
    for precision, tp, offload in CELLS:
        if args.only and precision != args.only:
            continue
        got = run_cell(fields, tp, offload, precision)

        def plan(mode):
            return memory_per_gpu(
                config,
                config.seq_len,
                zero_stage=0,
                gpus=1,
                micro_batch=1,
                bf16=precision == "bf16",
                tensor_parallel=tp,
                offload=mode,
            )

        # on CPU the offloaded tensors stay where they are: the peak to compare is the plan's
        # without offload; with offload the plan's GPU and host figures are printed beside it
        resident, moved = plan("none"), plan(offload)
        rows[precision, tp, offload] = dict(got, plan=resident.step)
        line = (
            f"peak per rank (precision {precision}, TP {tp}, offload {offload}): measured "
            f"{got['peak_bytes'] / 2**20:.1f} MiB, plan {resident.step / 2**20:.1f} MiB "
            f"(plan / measured {resident.step / got['peak_bytes']:.2f}); "
            f"{got['seconds']:.2f} s/step"
        )
        if offload != "none":
            line += (
                f"; offload moved {got['offloaded_bytes'] / 2**20:.1f} MiB at most at once, "
                f"plan host {moved.host / 2**20:.1f} MiB, plan GPU {moved.step / 2**20:.1f} MiB"
            )
        print(line, flush=True)
    for precision in ("fp32", "bf16"):
        one, two = rows.get((precision, 1, "none")), rows.get((precision, 2, "none"))
        if one and two:
            print(
                f"{precision}: TP=2 / TP=1 per rank: memory "
                f"{two['peak_bytes'] / one['peak_bytes']:.2f}x (plan "
                f"{two['plan'] / one['plan']:.2f}x); time per token "
                f"{two['seconds'] / one['seconds']:.2f}x (2 processes sharing {os.cpu_count()} "
                "cores, gloo)"
            )


if __name__ == "__main__":
    main()
