"""Benchmark the attention ops on the CPU: the suffix op in the meta-train step, the prefix op's memory.

    python pipelines/bench_attention.py                  # everything (~10 min on 2 cores)
    python pipelines/bench_attention.py --only step      # or: memory, prefix

step:   meta-train step (loss forward + backward, float32, remat 'chunk') with the suffix chunk
        attention 'fused' (registered ops, hand-written double backward) vs 'math' (matmul +
        softmax through autograd, what the official code runs); interleaved rounds, medians,
        ratio fused / math measured in the same run.
memory: peak resident memory of one such step, fused vs math, each in a fresh process.
prefix: peak memory and time of sliding-window attention forward + backward at T = 16K,
        blocked (O(T * k)) vs the dense T x T path, each in a fresh process.
Memory = VmHWM during the measured work minus VmRSS just before it (peak reset via clear_refs).
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

from ttte2e.kernels.attention import chunk_backend, reference
from ttte2e.model import TTTConfig, TTTModel

# (name, model fields, batch): the meta-step benchmark size of bench_meta_step.py, and one where
# the window is long relative to the model width, so attention weighs more in the step.
STEP_CONFIGS = [
    ("bench", dict(vocab_size=4096, d_model=256, n_layers=8, n_ttt_blocks=2, n_heads=4,
                   mlp_hidden=512, seq_len=1024, window=256, chunk_size=128), 2),
    ("long-window", dict(vocab_size=2048, d_model=128, n_layers=4, n_ttt_blocks=2, n_heads=2,
                         mlp_hidden=256, seq_len=2048, window=1024, chunk_size=128), 1),
]
PREFIX = dict(seq=16384, window=1024, heads=1, head_dim=64)


def _read_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure(work) -> dict:
    before = _read_status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    start = time.perf_counter()
    work()
    seconds = time.perf_counter() - start
    return dict(peak_mb=(_read_status("VmHWM") - before) / 2**20, seconds=seconds)


def _make(fields: dict, batch: int):
    torch.manual_seed(0)
    cfg = TTTConfig(**fields)
    return TTTModel(cfg), torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1))


def _step(model, tokens, backend: str) -> None:
    model.zero_grad(set_to_none=True)
    with chunk_backend(backend):
        model.meta_loss(tokens, remat="chunk").loss.backward()


def step_times(rounds: int) -> list[dict]:
    rows = []
    for name, fields, batch in STEP_CONFIGS:
        model, tokens = _make(fields, batch)
        samples: dict[str, list[float]] = {"fused": [], "math": []}
        for backend in samples:  # warm-up
            _step(model, tokens, backend)
        for _ in range(rounds):
            for backend in samples:
                start = time.perf_counter()
                _step(model, tokens, backend)
                samples[backend].append(time.perf_counter() - start)
        fused, math_ = statistics.median(samples["fused"]), statistics.median(samples["math"])
        rows.append(dict(config=name, fused_s=fused, math_s=math_, fused_over_math=fused / math_))
    return rows


def _probe(kind: str, arg) -> dict:
    if kind == "step":
        name, backend = arg
        fields, batch = next((f, b) for n, f, b in STEP_CONFIGS if n == name)
        model, tokens = _make(fields, batch)
        return _measure(lambda: _step(model, tokens, backend))
    path = arg
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, PREFIX["heads"], PREFIX["seq"], PREFIX["head_dim"], generator=gen)
               .requires_grad_() for _ in range(3))
    fn = (reference.blocked_sliding_window_attention if path == "blocked"
          else reference.naive_sliding_window_attention)
    return _measure(lambda: fn(q, k, v, PREFIX["window"]).sum().backward())


def run_probe(kind: str, arg) -> dict:
    cmd = [sys.executable, __file__, "--_probe", json.dumps([kind, arg])]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"probe {kind} {arg} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["step", "memory", "prefix"], default=None)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--json", default=None, help="also write all results to this file")
    parser.add_argument("--_probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._probe:
        print(json.dumps(_probe(*json.loads(args._probe))))
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    results: dict = {}
    if args.only in (None, "step"):
        print(f"\nmeta-train step (remat 'chunk', float32), median of {args.rounds} interleaved rounds")
        print("| config | fused s | math s | fused / math |")
        print("|---|---|---|---|")
        results["step"] = step_times(args.rounds)
        for r in results["step"]:
            print(f"| {r['config']} | {r['fused_s']:.3f} | {r['math_s']:.3f} | {r['fused_over_math']:.2f} |")
    if args.only in (None, "memory"):
        print("\nmeta-train step peak memory (MB above the pre-step RSS), fresh process per cell")
        print("| config | fused MB | math MB | fused / math |")
        print("|---|---|---|---|")
        results["memory"] = []
        for name, _, _ in STEP_CONFIGS:
            fused = run_probe("step", [name, "fused"])["peak_mb"]
            math_ = run_probe("step", [name, "math"])["peak_mb"]
            results["memory"].append(dict(config=name, fused_mb=fused, math_mb=math_))
            print(f"| {name} | {fused:.0f} | {math_:.0f} | {fused / math_:.2f} |")
    if args.only in (None, "prefix"):
        print(f"\nprefix attention forward + backward, {PREFIX}, float32, fresh process per path")
        print("| path | peak MB | seconds |")
        print("|---|---|---|")
        results["prefix"] = {}
        for path in ("blocked", "dense T x T"):
            r = results["prefix"][path] = run_probe("prefix", "blocked" if path == "blocked" else "naive")
            print(f"| {path} | {r['peak_mb']:.0f} | {r['seconds']:.2f} |")
        p = results["prefix"]
        print(f"blocked / dense: memory {p['blocked']['peak_mb'] / p['dense T x T']['peak_mb']:.3f}, "
              f"time {p['blocked']['seconds'] / p['dense T x T']['seconds']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
