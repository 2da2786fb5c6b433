"""Benchmark: TTT-E2E meta-train step vs the SWA-only training step (time, FLOPs, peak memory).

    python pipelines/bench/bench_meta_step.py                 # time ratios + both memory tables
    python pipelines/bench/bench_meta_step.py --only time     # or: memory, heavy, profile
    python pipelines/bench/bench_meta_step.py --compile       # eager vs compiled side by side

Time: one step = loss forward + backward (no optimizer), float32, the benchmark config below.
The modes run interleaved for several rounds and the median per mode is used, so machine noise
hits all of them alike; ratios are to the SWA step measured in the same run.
The meta step is the trainer's (final_update=False: the last chunk's unused inner step is not
taken), as `estimate_flops` counts it.
Profile: self CPU time and call count per operator class (matmuls, attention ops, fused head, rest)
of one step of each mode under torch.profiler: where the time beyond the FLOPs ratio goes.
Memory: peak resident memory (VmHWM) during one step minus resident memory just before it, each
in a fresh subprocess that has run no earlier step (the peak is reset via /proc/self/clear_refs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from bench_common import read_status, reset_peak  # this folder is on sys.path

from ttte2e.model import TTTConfig, TTTModel
from ttte2e.model.config import REMAT_MODES

MODES = REMAT_MODES
# The size at which the official JAX code was measured on this kind of 2-core CPU.
BENCH = dict(
    vocab_size=4096,
    d_model=256,
    n_layers=8,
    n_ttt_blocks=2,
    n_heads=4,
    mlp_hidden=512,
    seq_len=1024,
    window=256,
    chunk_size=128,
)
BENCH_BATCH = 2
# Fast-weight heavy: the fast weights (3 d I per TTT block) dwarf one chunk's activations.
HEAVY = dict(
    vocab_size=4096,
    d_model=512,
    n_layers=4,
    n_ttt_blocks=1,
    n_heads=4,
    mlp_hidden=2048,
    seq_len=2048,
    window=256,
    chunk_size=32,
)
HEAVY_BATCH = 1


def make(cfg_fields: dict, batch: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = TTTConfig(**cfg_fields)
    model = TTTModel(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1))
    return model, tokens


def step(model: TTTModel, tokens: torch.Tensor, mode: str) -> None:
    model.zero_grad(set_to_none=True)
    if mode == "swa":
        out = model.lm_loss(tokens)
    else:
        out = model.meta_loss(tokens, remat=mode, final_update=False)
    out.loss.backward()


MATMULS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::dot")


def _op_class(name: str) -> str:
    if name in MATMULS:
        return "matmuls"
    if "attention" in name or "sdpa" in name or "flash" in name:
        return "attention ops"
    if "NLLAndHiddenGrad" in name:
        return "fused LM head (non-matmul)"
    return "elementwise, copies, reductions"


def profile_table(rounds: int) -> dict:
    """Self CPU time and operator count per class, per step, for the SWA step and each meta
    step: one profiled step per mode per round, interleaved, averaged over rounds."""
    from torch.profiler import ProfilerActivity, profile

    model, tokens = make(BENCH, BENCH_BATCH)
    modes = ("swa",) + MODES
    out: dict[str, dict[str, list[float]]] = {m: {} for m in modes}
    for mode in modes:  # warm-up
        step(model, tokens, mode)
    for _ in range(rounds):
        for mode in modes:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(model, tokens, mode)
            for event in prof.key_averages():
                seconds_ops = out[mode].setdefault(_op_class(event.key), [0.0, 0.0])
                seconds_ops[0] += event.self_cpu_time_total / 1e6 / rounds
                seconds_ops[1] += event.count / rounds
    return out


def time_ratios(rounds: int, steps: int) -> list[dict]:
    model, tokens = make(BENCH, BENCH_BATCH)
    modes = ("swa",) + MODES
    samples: dict[str, list[float]] = {m: [] for m in modes}
    for mode in modes:  # warm-up
        step(model, tokens, mode)
    for _ in range(rounds):
        for mode in modes:
            start = time.perf_counter()
            for _ in range(steps):
                step(model, tokens, mode)
            samples[mode].append((time.perf_counter() - start) / steps)
    swa = statistics.median(samples["swa"])
    rows = []
    for mode in MODES:
        flops = model.estimate_flops(remat=mode)
        t = statistics.median(samples[mode])
        rows.append(
            dict(
                mode=mode,
                step_s=t,
                swa_s=swa,
                time_ratio=t / swa,
                flops_ratio=flops.meta_over_swa,
                time_over_flops=(t / swa) / flops.meta_over_swa,
            )
        )
    return rows


# The 3B preset's structure (32 layers, 8 TTT blocks, T 8192, k 8192, b 1024) with tiny widths:
# the number of host-side calls depends on the structure, not on the widths.
STRUCTURE_3B = dict(
    vocab_size=256,
    d_model=64,
    n_layers=32,
    n_ttt_blocks=8,
    n_heads=1,  # the compiled step keeps b x (k + b) attention tensors per head: memory
    mlp_hidden=64,
    seq_len=8192,
    window=8192,
    chunk_size=1024,
)


def host_calls(model: TTTModel, tokens: torch.Tensor, mode: str) -> int:
    """Host-side calls of one meta step, from torch.profiler events: every aten call the program
    makes (not those an aten op makes inside itself, e.g. a matmul's own resolve_conj), every
    generated kernel and every compiled-graph launch. Eager: its aten calls, forward and
    backward; compiled: the launches, their kernels and extern calls (matmuls), and the eager
    glue between graphs."""
    import torch._inductor.config as inductor_config
    from torch.profiler import ProfilerActivity, profile

    inductor_config.cpp.enable_kernel_profile = True  # each generated kernel is an event
    step(model, tokens, mode)  # warm-up (and compilation)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(model, tokens, mode)

    def inside_an_op(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::") or "cpp_fused" in parent.name:
                return True
            parent = parent.cpu_parent
        return False

    counted = 0
    for event in prof.events():
        name = event.name
        launch = any(
            key in name
            for key in (
                "Torch-Compiled Region",  # a compiled frame (forward graph)
                "CompiledFunctionBackward",  # its backward graph
                "cpp_fused",  # a generated kernel
                "cpp_kernel",
            )
        )
        if launch or (name.startswith("aten::") and not inside_an_op(event)):
            counted += 1
    return counted


def compiled_report(rounds: int, steps: int, parts: tuple[str, ...]) -> dict:
    """Eager and compiled meta steps side by side: compile time and graphs, time/FLOPs per remat
    mode at the bench config, host-side calls per step at the 3B structure, and the first step
    of a second process (the Inductor cache)."""

    from ttte2e.model import compiled

    # a compile failure must stop the benchmark, not fall back to eager and be timed as compiled
    os.environ[compiled.FORCE_ENV] = "force"
    out: dict = dict(first_step_s={}, time=[], calls=[])
    if "time" in parts:
        _compiled_times(rounds, steps, out)
    if "calls" in parts:
        _compiled_calls(out)
    if "memory" in parts:
        _compiled_memory(out)
    return out


def _compiled_memory(out: dict) -> None:
    print(
        "\npeak step memory, eager vs compiled (MB above the pre-step RSS; a fresh process per "
        "cell, measured on its second step: the first compiles)"
    )
    print("| n | T | remat | eager | compiled | compiled / eager |")
    print("|---|---|---|---|---|---|")
    out["memory"] = []
    for n in (8, 16):
        fields = dict(BENCH, seq_len=n * BENCH["chunk_size"])
        for mode in MODES:
            eager = run_probe(fields, BENCH_BATCH, mode, warm=True)["peak_bytes"] / 2**20
            compiled = (
                run_probe(dict(fields, compile=True), BENCH_BATCH, mode, warm=True)["peak_bytes"]
                / 2**20
            )
            out["memory"].append(dict(n=n, mode=mode, eager_mb=eager, compiled_mb=compiled))
            print(
                f"| {n} | {fields['seq_len']} | {mode} | {eager:.0f} | {compiled:.0f} | "
                f"{compiled / eager:.2f} |"
            )


def _compiled_times(rounds: int, steps: int, out: dict) -> None:
    import torch._dynamo.utils as dynamo_utils

    model, tokens = make(BENCH, BENCH_BATCH)
    print("\ncompile (bench config): the first compiled step of each remat mode, this process")
    for mode in MODES:
        model.config.compile = True
        start = time.perf_counter()
        step(model, tokens, mode)
        out["first_step_s"][mode] = time.perf_counter() - start
        print(f"  first compiled step (remat {mode}): {out['first_step_s'][mode]:.1f} s")
    model.config.compile = True
    step(model, tokens, "swa")  # the compiled SWA step's graphs too
    out["graphs"] = dynamo_utils.counters["stats"]["unique_graphs"]
    print(f"  graphs compiled (3 remat modes + the SWA step): {out['graphs']}")
    # a fresh process with an empty Inductor cache, then another one reading that cache
    with tempfile.TemporaryDirectory(prefix="ttte2e-inductor-") as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        for key in ("cold", "warm"):
            probe = subprocess.run(
                [sys.executable, __file__, "--_compile_probe"],
                capture_output=True,
                text=True,
                check=True,
                timeout=1800,
                env=env,
            )
            out[f"{key}_process_first_step_s"] = float(probe.stdout.strip().splitlines()[-1])
    print(
        f"  a new process, first compiled step (remat chunk): empty Inductor cache "
        f"{out['cold_process_first_step_s']:.1f} s, cache from the process before "
        f"{out['warm_process_first_step_s']:.1f} s"
    )

    variants = [("swa", False), ("swa", True)] + [(m, c) for m in MODES for c in (False, True)]
    samples: dict = {v: [] for v in variants}
    for _ in range(rounds):
        for mode, compiled in variants:
            model.config.compile = compiled
            start = time.perf_counter()
            for _ in range(steps):
                step(model, tokens, mode)
            samples[(mode, compiled)].append((time.perf_counter() - start) / steps)
    median = {v: statistics.median(t) for v, t in samples.items()}
    print(
        f"\ntime/FLOPs: (meta step s / eager SWA step s) / FLOPs ratio, {BENCH} batch "
        f"{BENCH_BATCH}, median of {rounds} interleaved rounds"
    )
    for mode in MODES:
        flops = model.estimate_flops(remat=mode).meta_over_swa
        eager = median[(mode, False)] / median[("swa", False)] / flops
        compiled = median[(mode, True)] / median[("swa", False)] / flops
        against_compiled_swa = median[(mode, True)] / median[("swa", True)] / flops
        out["time"].append(
            dict(
                mode=mode,
                eager=eager,
                compiled=compiled,
                compiled_vs_compiled_swa=against_compiled_swa,
                eager_s=median[(mode, False)],
                compiled_s=median[(mode, True)],
            )
        )
        print(
            f"time/FLOPs (bench config, remat {mode}): eager {eager:.2f}, compiled "
            f"{compiled:.2f}   (steps {median[(mode, False)]:.3f} s -> "
            f"{median[(mode, True)]:.3f} s; against the compiled SWA step: "
            f"{against_compiled_swa:.2f})"
        )
    print(
        f"  SWA step: eager {median[('swa', False)]:.3f} s, compiled {median[('swa', True)]:.3f} s"
    )
    # the head's part of the inner gradient inside the compiled step: autograd or closed form
    from ttte2e.model import compiled as compiled_step

    model.config.compile = True
    forms = {form: [] for form in compiled_step.HEAD_FORMS}
    default_form = compiled_step.head_form
    for form in forms:  # warm-up: each form is its own set of graphs
        compiled_step.head_form = form
        step(model, tokens, "chunk")
    for _ in range(rounds):
        for form, samples_ in forms.items():
            compiled_step.head_form = form
            start = time.perf_counter()
            for _ in range(steps):
                step(model, tokens, "chunk")
            samples_.append((time.perf_counter() - start) / steps)
    compiled_step.head_form = default_form
    out["head_forms_s"] = {form: statistics.median(t) for form, t in forms.items()}
    print(
        "  compiled step's head (remat chunk): "
        + ", ".join(f"{form} {t:.3f} s" for form, t in out["head_forms_s"].items())
    )


def _compiled_calls(out: dict) -> None:
    big, big_tokens = make(STRUCTURE_3B, 1)
    print(f"\nhost-side calls per meta step, {STRUCTURE_3B} batch 1")
    for mode in reversed(MODES):  # 'none' (the whole unrolled loop kept) last: the most memory
        big.config.compile = False
        eager = host_calls(big, big_tokens, mode)
        big.config.compile = True
        compiled = host_calls(big, big_tokens, mode)
        out["calls"].append(dict(mode=mode, eager=eager, compiled=compiled))
        print(
            f"calls per meta step (3B structure, remat {mode}): eager {eager:,}, "
            f"compiled {compiled:,}   (ratio {eager / compiled:.1f})"
        )


def compile_probe() -> float:
    """In a fresh process: the first compiled step (remat chunk) at the bench config."""
    model, tokens = make(BENCH, BENCH_BATCH)
    model.config.compile = True
    start = time.perf_counter()
    step(model, tokens, "chunk")
    return time.perf_counter() - start


def memory_probe(cfg_fields: dict, batch: int, mode: str, warm: bool = False) -> dict:
    """Runs in a fresh process: peak RSS during one step minus RSS just before it. warm: after
    one step first (compilation), its memory handed back to the system (malloc_trim)."""
    model, tokens = make(cfg_fields, batch)
    if warm:
        import ctypes
        import gc

        step(model, tokens, mode)
        model.zero_grad(set_to_none=True)
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = read_status("VmRSS")
    reset_peak()
    start = time.perf_counter()
    step(model, tokens, mode)
    seconds = time.perf_counter() - start
    return dict(peak_bytes=read_status("VmHWM") - before, seconds=seconds)


def run_probe(cfg_fields: dict, batch: int, mode: str, warm: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--_probe", json.dumps([cfg_fields, batch, mode, warm])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=1800)
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_table(chunk_counts: list[int]) -> list[dict]:
    rows = []
    for n in chunk_counts:
        fields = dict(BENCH, seq_len=n * BENCH["chunk_size"])
        swa = run_probe(fields, BENCH_BATCH, "swa")["peak_bytes"]
        row = dict(n_chunks=n, seq_len=fields["seq_len"], swa_mb=swa / 2**20)
        for mode in MODES:
            peak = run_probe(fields, BENCH_BATCH, mode)["peak_bytes"]
            row[f"{mode}_mb"] = peak / 2**20
            row[f"{mode}_over_swa"] = peak / swa
        rows.append(row)
    return rows


def heavy_table(repeats: int, checkpoint_prefix: bool) -> dict:
    result = {}
    fields = dict(HEAVY, checkpoint_prefix=checkpoint_prefix)
    for mode in MODES:
        probes = [run_probe(fields, HEAVY_BATCH, mode) for _ in range(repeats)]
        result[mode] = dict(
            peak_mb=statistics.median(p["peak_bytes"] for p in probes) / 2**20,
            seconds=statistics.median(p["seconds"] for p in probes),
        )
    result["nested_over_chunk_mem"] = result["nested"]["peak_mb"] / result["chunk"]["peak_mb"]
    result["nested_over_none_mem"] = result["nested"]["peak_mb"] / result["none"]["peak_mb"]
    result["nested_over_chunk_time"] = result["nested"]["seconds"] / result["chunk"]["seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--only",
        choices=["time", "memory", "heavy", "profile", "calls"],
        default=None,
        help="one table; with --compile: time, calls or memory",
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=2, help="steps per mode per round")
    parser.add_argument("--chunks", default="8,16,32", help="chunk counts n for the memory table")
    parser.add_argument("--heavy-repeats", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write all results to this file")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="eager and compiled meta steps side by side (time/FLOPs, host calls, compile time) "
        "instead of the eager tables; on CPU the default is eager, as in training",
    )
    parser.add_argument("--_probe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_compile_probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._compile_probe:
        print(compile_probe())
        return
    if args.compile:
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs"
        )
        parts = ("time", "calls", "memory") if args.only is None else (args.only,)
        results = compiled_report(args.rounds, args.steps, parts)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        return
    if args._probe:
        print(json.dumps(memory_probe(*json.loads(args._probe))))
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    results: dict = {}
    if args.only in (None, "time"):
        print(
            f"\nmeta step vs SWA-only step, {BENCH} batch {BENCH_BATCH}, "
            f"median of {args.rounds} interleaved rounds"
        )
        print("| remat | meta step s | SWA step s | time ratio | FLOPs ratio | time / FLOPs |")
        print("|---|---|---|---|---|---|")
        results["time"] = time_ratios(args.rounds, args.steps)
        for r in results["time"]:
            print(
                f"| {r['mode']} | {r['step_s']:.3f} | {r['swa_s']:.3f} | {r['time_ratio']:.2f} | "
                f"{r['flops_ratio']:.2f} | {r['time_over_flops']:.2f} |"
            )
    if args.only in (None, "profile"):
        results["profile"] = prof = profile_table(args.rounds)
        swa_flops = TTTModel(TTTConfig(**BENCH)).estimate_flops()
        print(
            f"\nself CPU seconds (operator calls) per step by class, torch.profiler, one step "
            f"per mode in each of {args.rounds} interleaved rounds; the profiler adds its own "
            "cost per call"
        )
        print("| class | SWA | " + " | ".join(f"meta {m}" for m in MODES) + " |")
        print("|---|---|" + "---|" * len(MODES))
        classes = sorted({c for row in prof.values() for c in row})
        for cls in classes + ["in operators"]:
            cells = [
                [sum(v[i] for v in prof[m].values()) for i in (0, 1)]
                if cls == "in operators"
                else prof[m].get(cls, [0.0, 0.0])
                for m in ("swa",) + MODES
            ]
            print(f"| {cls} | " + " | ".join(f"{s:.3f} ({n:,.0f})" for s, n in cells) + " |")
        print(
            "\n| remat | FLOPs ratio | in-operator time ratio | / FLOPs ratio | beyond the "
            "FLOPs ratio: matmuls + attention | the rest | rest: extra calls x us per call |"
        )
        print("|---|---|---|---|---|---|---|")
        dense = ("matmuls", "attention ops")
        for mode in MODES:
            ratio = (
                TTTModel(TTTConfig(**BENCH)).estimate_flops(remat=mode).meta_step
                / swa_flops.swa_step
            )
            total = {m: sum(v[0] for v in prof[m].values()) for m in ("swa", mode)}
            mm = {m: sum(prof[m].get(c, [0.0])[0] for c in dense) for m in ("swa", mode)}
            rest = {m: total[m] - mm[m] for m in ("swa", mode)}
            calls = {
                m: sum(v[1] for c, v in prof[m].items() if c not in dense) for m in ("swa", mode)
            }
            beyond = total[mode] - ratio * total["swa"]
            # What exceeds FLOPs-proportional time, split by class.
            mm_beyond = mm[mode] - ratio * mm["swa"]
            rest_beyond = rest[mode] - ratio * rest["swa"]
            per_call = rest[mode] / calls[mode] * 1e6
            results.setdefault("profile_summary", {})[mode] = dict(
                flops_ratio=ratio,
                time_ratio=total[mode] / total["swa"],
                beyond_s=beyond,
                dense_beyond_s=mm_beyond,
                rest_beyond_s=rest_beyond,
                rest_calls=calls[mode],
                swa_rest_calls=calls["swa"],
                us_per_rest_call=per_call,
            )
            time_ratio = total[mode] / total["swa"]
            print(
                f"| {mode} | {ratio:.2f} | {time_ratio:.2f} | {time_ratio / ratio:.2f} | "
                f"{mm_beyond:.3f} s | {rest_beyond:.3f} s | "
                f"{calls[mode] - calls['swa']:,.0f} x {per_call:.1f} us "
                f"(SWA {rest['swa'] / calls['swa'] * 1e6:.1f} us) |"
            )
    if args.only in (None, "memory"):
        chunks = [int(n) for n in args.chunks.split(",")]
        print("\npeak step memory (MB above the pre-step RSS), fresh process per cell")
        print("| n | T | SWA | none | chunk | nested | nested / SWA |")
        print("|---|---|---|---|---|---|---|")
        results["memory"] = memory_table(chunks)
        for r in results["memory"]:
            print(
                f"| {r['n_chunks']} | {r['seq_len']} | {r['swa_mb']:.0f} | {r['none_mb']:.0f} | "
                f"{r['chunk_mb']:.0f} | {r['nested_mb']:.0f} | {r['nested_over_swa']:.2f} |"
            )
    if args.only in (None, "heavy"):
        print(f"\nfast-weight heavy: {HEAVY} batch {HEAVY_BATCH}")
        results["heavy"] = {}
        for prefix_ckpt in (False, True):
            heavy = results["heavy"][f"checkpoint_prefix={prefix_ckpt}"] = heavy_table(
                args.heavy_repeats, prefix_ckpt
            )
            print(f"\ncheckpoint_prefix={prefix_ckpt}")
            print("| remat | peak MB | step s |")
            print("|---|---|---|")
            for mode in MODES:
                print(f"| {mode} | {heavy[mode]['peak_mb']:.0f} | {heavy[mode]['seconds']:.2f} |")
            print(
                f"nested/chunk memory {heavy['nested_over_chunk_mem']:.2f} (target <= 0.5), "
                f"nested/none memory {heavy['nested_over_none_mem']:.2f} (target <= 0.3), "
                f"nested/chunk time {heavy['nested_over_chunk_time']:.2f} (target <= 1.5)"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
