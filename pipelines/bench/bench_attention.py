"""Benchmark the attention ops on the CPU: the suffix op in the meta-train step, the prefix op's memory.

    python pipelines/bench/bench_attention.py                  # everything (~3 min on 2 cores)
    python pipelines/bench/bench_attention.py --only step      # or: memory, prefix

step:   meta-train step (loss forward + backward, float32, remat 'chunk') with the suffix chunk
        attention 'fused' (registered ops, hand-written double backward) vs 'math' (matmul +
        softmax through autograd, what the official code runs); interleaved rounds, medians,
        ratio fused / math measured in the same run.
memory: peak resident memory of one such step, fused vs math, each in a fresh process, also at a
        long-context shape (T 8K, k 4K, b 512; memory only, one step ~20 s).
prefix: peak memory and time of sliding-window attention forward + backward at T = 16K,
        blocked (O(T * k)) vs the dense T x T path, each in a fresh process.
Memory = VmHWM during the measured work minus VmRSS just before it (peak reset via clear_refs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from bench_common import read_status, reset_peak  # this folder is on sys.path

from ttte2e.kernels.attention import chunk_attention, chunk_backend, reference
from ttte2e.model import TTTConfig, TTTModel

# (name, model fields, batch): the meta-step benchmark size of bench_meta_step.py, and one where
# the window is long relative to the model width, so attention weighs more in the step.
STEP_CONFIGS = [
    (
        "bench",
        dict(
            vocab_size=4096,
            d_model=256,
            n_layers=8,
            n_ttt_blocks=2,
            n_heads=4,
            mlp_hidden=512,
            seq_len=1024,
            window=256,
            chunk_size=128,
        ),
        2,
    ),
    (
        "long-window",
        dict(
            vocab_size=2048,
            d_model=128,
            n_layers=4,
            n_ttt_blocks=2,
            n_heads=2,
            mlp_hidden=256,
            seq_len=2048,
            window=1024,
            chunk_size=128,
        ),
        1,
    ),
]
# Memory only (one step is ~20 s here): T 8K, k 4K, b 512, where the suffix attention's
# b x (k+b) matrices are a large part of one chunk's graph.
MEMORY_CONFIGS = STEP_CONFIGS + [
    (
        "long-context",
        dict(
            vocab_size=1024,
            d_model=256,
            n_layers=4,
            n_ttt_blocks=2,
            n_heads=4,
            mlp_hidden=512,
            seq_len=8192,
            window=4096,
            chunk_size=512,
        ),
        1,
    ),
]
PREFIX = dict(seq=16384, window=1024, heads=1, head_dim=64)
# One suffix block's attention on one chunk at a long-context shape: b = 512 queries over
# [k = 4096 cache + chunk], the pattern of the inner loop (output, inner gradient with
# create_graph=True, then the outer backward through both).
SUFFIX = dict(heads=4, chunk=512, window=4096, head_dim=64)


def _measure(work) -> dict:
    before = read_status("VmRSS")
    reset_peak()
    start = time.perf_counter()
    work()
    seconds = time.perf_counter() - start
    return dict(peak_mb=(read_status("VmHWM") - before) / 2**20, seconds=seconds)


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
        # one tiny step first: lazy imports on first use (torch.library's fake-tensor machinery
        # for the registered ops) would otherwise count as step memory
        tiny = dict(
            vocab_size=64,
            d_model=16,
            n_layers=2,
            n_ttt_blocks=1,
            n_heads=2,
            mlp_hidden=32,
            seq_len=32,
            window=16,
            chunk_size=8,
        )
        _step(*_make(tiny, 1), backend)
        fields, batch = next((f, b) for n, f, b in MEMORY_CONFIGS if n == name)
        model, tokens = _make(fields, batch)
        return _measure(lambda: _step(model, tokens, backend))
    if kind == "suffix":
        return _suffix_probe(arg)
    path = arg
    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(
            1, PREFIX["heads"], PREFIX["seq"], PREFIX["head_dim"], generator=gen
        ).requires_grad_()
        for _ in range(3)
    )
    fn = (
        reference.blocked_sliding_window_attention
        if path == "blocked"
        else reference.naive_sliding_window_attention
    )
    return _measure(lambda: fn(q, k, v, PREFIX["window"]).sum().backward())


def _suffix_probe(backend: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    n_keys = SUFFIX["window"] + SUFFIX["chunk"]

    def tensors(n_q, n_k, dh):
        return [
            torch.randn(1, SUFFIX["heads"], n, dh, generator=gen).requires_grad_()
            for n in (n_q, n_k, n_k)
        ]

    def pattern(q, k, v, window, saved: list | None = None):
        hooks = ((lambda t: saved.append(t) or t), (lambda t: t)) if saved is not None else None
        with contextlib.ExitStack() as stack:
            if hooks:
                stack.enter_context(torch.autograd.graph.saved_tensors_hooks(*hooks))
            out = chunk_attention(q, k, v, window, 0, backend=backend)
            inner = torch.autograd.grad((out * out).sum(), (q, k, v), create_graph=True)
        return out, inner

    q, k, v = tensors(8, 24, 8)  # warm-up: lazy imports would count as memory
    out, inner = pattern(q, k, v, 16)
    (out.sum() + sum((g * g).sum() for g in inner)).backward()

    q, k, v = tensors(SUFFIX["chunk"], n_keys, SUFFIX["head_dim"])
    inputs = {t.untyped_storage().data_ptr() for t in (q, k, v)}
    saved: list = []
    state: dict = {}

    def work():
        out, inner = pattern(q, k, v, SUFFIX["window"], saved)
        storages = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in saved
            if isinstance(t, torch.Tensor)
        }
        state["saved_mb"] = sum(n for p, n in storages.items() if p not in inputs) / 2**20
        (out.sum() + sum((g * g).sum() for g in inner)).backward()

    result = _measure(work)
    return dict(result, saved_mb=state["saved_mb"])


def run_probe(kind: str, arg) -> dict:
    cmd = [sys.executable, __file__, "--_probe", json.dumps([kind, arg])]
    # a fixed mmap threshold: freed large buffers go back to the OS, so RSS follows allocations
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"probe {kind} {arg} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["step", "memory", "suffix", "prefix"], default=None)
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
        print(
            f"\nmeta-train step (remat 'chunk', float32), median of {args.rounds} interleaved rounds"
        )
        print("| config | fused s | math s | fused / math |")
        print("|---|---|---|---|")
        results["step"] = step_times(args.rounds)
        for r in results["step"]:
            print(
                f"| {r['config']} | {r['fused_s']:.3f} | {r['math_s']:.3f} | {r['fused_over_math']:.2f} |"
            )
    if args.only in (None, "memory"):
        print("\nmeta-train step peak memory (MB above the pre-step RSS), fresh process per cell")
        print("| config | fused MB | math MB | fused / math |")
        print("|---|---|---|---|")
        results["memory"] = []
        for name, _, _ in MEMORY_CONFIGS:
            fused = run_probe("step", [name, "fused"])
            math_ = run_probe("step", [name, "math"])
            results["memory"].append(
                dict(config=name, fused_mb=fused["peak_mb"], math_mb=math_["peak_mb"])
            )
            print(
                f"| {name} | {fused['peak_mb']:.0f} | {math_['peak_mb']:.0f} | "
                f"{fused['peak_mb'] / math_['peak_mb']:.2f} |"
            )
    if args.only in (None, "suffix"):
        print(
            f"\nsuffix attention, one block and chunk: {SUFFIX}, batch 1, float32; output, inner "
            "gradient (create_graph=True), outer backward; fresh process per path"
        )
        print("| path | kept for the outer backward MB | peak MB | seconds |")
        print("|---|---|---|---|")
        results["suffix"] = {b: run_probe("suffix", b) for b in ("fused", "math")}
        for b, r in results["suffix"].items():
            print(f"| {b} | {r['saved_mb']:.0f} | {r['peak_mb']:.0f} | {r['seconds']:.2f} |")
        f, m = results["suffix"]["fused"], results["suffix"]["math"]
        print(
            f"fused / math: kept {f['saved_mb'] / m['saved_mb']:.2f}, peak {f['peak_mb'] / m['peak_mb']:.2f}, "
            f"time {f['seconds'] / m['seconds']:.2f}"
        )
    if args.only in (None, "prefix"):
        print(f"\nprefix attention forward + backward, {PREFIX}, float32, fresh process per path")
        print("| path | peak MB | seconds |")
        print("|---|---|---|")
        results["prefix"] = {}
        for path in ("blocked", "dense T x T"):
            r = results["prefix"][path] = run_probe(
                "prefix", "blocked" if path == "blocked" else "naive"
            )
            print(f"| {path} | {r['peak_mb']:.0f} | {r['seconds']:.2f} |")
        p = results["prefix"]
        print(
            f"blocked / dense: memory {p['blocked']['peak_mb'] / p['dense T x T']['peak_mb']:.3f}, "
            f"time {p['blocked']['seconds'] / p['dense T x T']['seconds']:.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
