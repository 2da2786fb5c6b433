"""The fused LM-head op (kernels/lm_head) against its autograd reference: what each keeps for the
backward, peak memory and time of forward + backward, in one run.

    python pipelines/bench/bench_lm_head.py                  # N 1024, d 512, V 32768, fp32, ~1 min
    python pipelines/bench/bench_lm_head.py --vocab 131072   # the paper's vocabulary size (more memory)

One inner-loop chunk's head: nll and dl/dh of N rows, then a backward through both (what the outer
backward does). "kept" is counted with saved-tensor hooks (unique storages); "peak" is the step's
peak resident memory above the memory before it, in a fresh process per cell.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from bench_common import read_status, reset_peak  # this folder is on sys.path


def _inputs(rows: int, dim: int, vocab: int):
    gen = torch.Generator().manual_seed(0)
    h = (torch.randn(rows, dim, generator=gen) / dim**0.5).requires_grad_()
    embed = (torch.randn(vocab, dim, generator=gen) * 0.02).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    weights = torch.full((rows,), 1.0 / rows)
    return h, embed, targets, weights


def _op(path: str):
    from ttte2e.kernels.lm_head import nll_and_hidden_grad, reference

    return nll_and_hidden_grad if path == "fused" else reference.nll_and_hidden_grad


def _step(op, h, embed, targets, weights):
    nll, grad_h = op(h, embed, targets, weights)
    torch.autograd.backward([nll.sum(), grad_h.square().sum()])


def kept_bytes(path: str, rows: int, dim: int, vocab: int) -> int:
    h, embed, targets, weights = _inputs(rows, dim, vocab)
    seen: dict[int, int] = {}

    def pack(t):
        if t is not h and t is not embed:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = _op(path)(h, embed, targets, weights)
    del out
    return sum(seen.values())


def probe(path: str, rows: int, dim: int, vocab: int) -> dict:
    """In a fresh process: one warm-up step at small N, then the measured step."""
    op = _op(path)
    _step(op, *_inputs(8, dim, vocab))
    inputs = _inputs(rows, dim, vocab)
    before = read_status("VmRSS")
    reset_peak()
    _step(op, *inputs)
    return dict(peak=read_status("VmHWM") - before)


def run_probe(path: str, rows: int, dim: int, vocab: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--_probe", json.dumps([path, rows, dim, vocab])]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True, timeout=1800)
    return json.loads(out.stdout.strip().splitlines()[-1])


def step_seconds(path: str, rows: int, dim: int, vocab: int, repeats: int) -> float:
    op, inputs = _op(path), _inputs(rows, dim, vocab)
    _step(op, *inputs)
    samples = []
    for _ in range(repeats):
        for t in inputs[:2]:
            t.grad = None
        start = time.perf_counter()
        _step(op, *inputs)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--_probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._probe:
        print(json.dumps(probe(*json.loads(args._probe))))
        return
    shape = (args.rows, args.dim, args.vocab)
    nv = args.rows * args.vocab * 4
    print(
        f"LM head of one chunk: N {args.rows}, d {args.dim}, V {args.vocab}, fp32; one [N, V] "
        f"float32 buffer = {nv / 2**20:.0f} MiB"
    )
    rows = {}
    for path in ("fused", "reference"):
        rows[path] = dict(
            kept=kept_bytes(path, *shape),
            **run_probe(path, *shape),
            seconds=step_seconds(path, *shape, args.repeats),
        )
    print(f"{'path':<10} {'kept MiB':>9} {'[N,V] bufs':>10} {'peak MiB':>9} {'step s':>7}")
    for path, r in rows.items():
        print(
            f"{path:<10} {r['kept'] / 2**20:9.1f} {r['kept'] / nv:10.2f} "
            f"{r['peak'] / 2**20:9.1f} {r['seconds']:7.3f}"
        )
    f, ref = rows["fused"], rows["reference"]
    print(
        f"fused / reference: kept {f['kept'] / ref['kept']:.2f}x, peak {f['peak'] / ref['peak']:.2f}x, "
        f"time {f['seconds'] / ref['seconds']:.2f}x"
    )


if __name__ == "__main__":
    main()
