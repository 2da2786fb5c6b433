"""Compile every Triton attention kernel ahead of time for the GPUs we launch on, here, no GPU needed.

    python pipelines/bench/check_kernels_aot.py                # sm_90 (H100) and sm_100 (B200)
    python pipelines/bench/check_kernels_aot.py --arch 90 --head-dims 80 --dtypes bf16

Each kernel of kernels/attention/triton_swa.py is compiled (triton -> PTX -> ptxas, the ptxas that
ships with triton) with exactly the launch a GPU run makes: the launch settings of
`launch_settings(..., gpu=True)`, the argument specialization triton's launcher derives from the
tensors (strides equal to 1 become constants, 16-divisible ones are marked so), for the head dims
of the model presets and 128, in bf16 and fp32. One line per kernel and configuration: shared
memory against the architecture's per-block limit, registers, spill bytes and stack from ptxas's
verbose report. Exit 1 on a compile error, a shared-memory overflow, or register spills above
--max-spill-bytes (default 512): a kernel that spills kilobytes runs, but several times slower,
and nothing else on this machine would notice; a few hundred bytes outside the inner loop cost
little (ptxas's register allocation varies that much between neighbouring settings). The test
suite runs this script (tests/test_kernels_aot.py). It runs without TRITON_INTERPRET (the
interpreter replaces the kernels with Python functions).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile
import time

if __name__ == "__main__":  # before triton is imported: real kernels, not Python functions
    os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from ttte2e.kernels.attention import triton_swa  # noqa: E402
from ttte2e.model.config import PRESETS  # noqa: E402

# Shared memory one block may use (opt-in maximum): H100 (sm_90) and B200 (sm_100) both 227 KiB
SHARED_LIMIT = {90: 232_448, 100: 232_448}
GPU_NAMES = {90: "H100", 100: "B200"}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def preset_head_dims() -> list[int]:
    return sorted({p["d_model"] // p["n_heads"] for p in PRESETS.values()} | {128})


def launches_for(head_dim: int, dtype: torch.dtype):
    """Every kernel launch of a training step at this head dim, built on meta tensors with the
    layouts the model hands over: the prefix reads [B, T, H, dh] views, the suffix contiguous
    [cache + chunk] buffers with invalid cache rows (the first chunks)."""
    heads = 4

    def meta(*shape):
        return torch.empty(*shape, device="meta", dtype=dtype)

    seq, window = 1024, 256
    # prefix: q, k, v are transposed views of [B, T, H, dh] projections
    q, k, v = (meta(1, seq, heads, head_dim).transpose(1, 2) for _ in range(3))
    out, lse, prefix_fwd = triton_swa.forward_launches(q, k, v, window, 0, gpu=True)
    _, prefix_bwd = triton_swa.backward_launches(q, k, v, out, lse, out, window, 0, gpu=True)
    yield from (("prefix", launch) for launch in prefix_fwd + prefix_bwd)
    # suffix chunk: b queries over [cache + chunk], the backward's grad_out in fp32 under autocast
    chunk, cache = 256, 512
    q = meta(1, heads, chunk, head_dim)
    k, v = meta(1, heads, cache + chunk, head_dim), meta(1, heads, cache + chunk, head_dim)
    out, lse, fwd = triton_swa.forward_launches(q, k, v, window, 64, gpu=True)
    grad_out = torch.empty(out.shape, device="meta", dtype=torch.float32)
    _, bwd = triton_swa.backward_launches(q, k, v, out, lse, grad_out, window, 64, gpu=True)
    _, dd = triton_swa.double_backward_launches(
        q, k, v, out, lse, grad_out, q, k, v, window, 64, gpu=True
    )
    yield from (("suffix", launch) for launch in fwd + bwd + dd)


def _compile_inputs(launch, arch: int):
    """(ASTSource, options) as triton's launcher would build them for this launch on `arch`."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kernel = launch.kernel
    kwargs = {**launch.constexprs, **launch.settings.launch_options()}
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound, specialization, options
    )
    return ASTSource(kernel, signature, constexprs, attrs), options.__dict__


def _ptxas_report(ptx: str, arch: int) -> dict:
    """Registers, spill bytes and stack of the PTX as ptxas -v reports them (what the GPU runs)."""
    gpu_name = f"sm_{arch}a"
    with tempfile.TemporaryDirectory() as folder:
        src = os.path.join(folder, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        done = subprocess.run(
            [get_ptxas(arch).path, "-v", f"--gpu-name={gpu_name}", src, "-o", src + ".cubin"],
            capture_output=True,
            text=True,
        )
    if done.returncode:
        raise RuntimeError(f"ptxas failed: {done.stderr[-500:]}")
    log = done.stderr

    def number(pattern):
        found = re.search(pattern, log)
        return int(found.group(1)) if found else None

    return {
        "registers": number(r"Used (\d+) registers"),
        "spill_stores": number(r"(\d+) bytes spill stores") or 0,
        "spill_loads": number(r"(\d+) bytes spill loads") or 0,
        "stack": number(r"(\d+) bytes stack frame") or 0,
    }


def compile_one(job: dict) -> dict:
    """Compile one launch (in a worker process); returns the report row."""
    head_dim, dtype, arch = job["head_dim"], DTYPES[job["dtype"]], job["arch"]
    # rebuilt here from its name: launches hold kernels, which do not pickle
    launch = next(
        lch
        for w, lch in launches_for(head_dim, dtype)
        if (w, lch.name) == (job["where"], job["kernel"])
    )
    settings = launch.settings
    row = dict(
        job,
        block_m=settings.block_m,
        block_n=settings.block_n,
        block_d=settings.block_d,
        num_warps=settings.num_warps or 4,
        num_stages=settings.num_stages or 3,
        shared_limit=SHARED_LIMIT[arch],
    )
    start = time.perf_counter()
    try:
        src, options = _compile_inputs(launch, arch)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        row["shared"] = compiled.metadata.shared
        row.update(_ptxas_report(compiled.asm["ptx"], arch))
        row["error"] = None
    except Exception as e:  # noqa: BLE001 - a compile error is the finding, reported per row
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def verdict(row: dict, max_spill_bytes: int) -> str:
    if row["error"]:
        return "COMPILE ERROR"
    if row["shared"] > row["shared_limit"]:
        return "SHARED OVERFLOW"
    spilled = max(row["spill_stores"], row["spill_loads"])
    if spilled > max_spill_bytes:
        return "SPILLS"
    return "ok, small spill" if spilled else "ok"


def supported_archs() -> list[int]:
    archs = [90]
    try:
        if not os.path.exists(get_ptxas(100).path):  # ptxas-blackwell ships with triton >= 3.3
            raise FileNotFoundError("ptxas-blackwell")
        make_backend(GPUTarget("cuda", 100, 32))
        archs.append(100)
    except Exception:  # noqa: BLE001 - this triton cannot target sm_100: say so, check sm_90
        print("this triton cannot compile for sm_100 (B200): checking sm_90 only")
    return archs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", choices=sorted(SHARED_LIMIT))
    parser.add_argument("--head-dims", type=int, nargs="+", default=preset_head_dims())
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--max-spill-bytes", type=int, default=512, help="fail above this many spilled bytes"
    )
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    if not triton_swa.AVAILABLE:
        print("triton is not installed: nothing to compile")
        return 1
    archs = args.arch or supported_archs()
    jobs = [
        dict(arch=arch, dtype=dtype, head_dim=head_dim, where=where, kernel=launch.name)
        for arch in archs
        for dtype in args.dtypes
        for head_dim in args.head_dims
        for where, launch in launches_for(head_dim, DTYPES[dtype])
    ]
    start = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(compile_one, jobs))
    print(
        f"{'gpu':<10} {'dtype':<5} {'dh':>4}  {'kernel':<31} {'tiles m/n/d':<12} {'w/s':<4}  "
        f"{'shared / limit (bytes)':<22} {'regs':>4} {'spill st/ld':>12}  verdict"
    )
    failed = 0
    for row in rows:
        state = verdict(row, args.max_spill_bytes)
        failed += state.isupper()
        gpu = f"{GPU_NAMES[row['arch']]} sm_{row['arch']}"
        name = f"{row['where']} {row['kernel']}"
        tiles = f"{row['block_m']}/{row['block_n']}/{row['block_d']}"
        if row["error"]:
            print(f"{gpu:<10} {row['dtype']:<5} {row['head_dim']:>4}  {name:<31} {state}: "
                  f"{row['error']}")  # fmt: skip
            continue
        print(
            f"{gpu:<10} {row['dtype']:<5} {row['head_dim']:>4}  {name:<31} {tiles:<12} "
            f"{row['num_warps']}/{row['num_stages']:<2}  "
            f"{row['shared']:>9,} / {row['shared_limit']:<10,} {row['registers']:>4} "
            f"{row['spill_stores']:>5}/{row['spill_loads']:<6}  {state}"
        )
    elapsed = time.perf_counter() - start
    print(
        f"{len(rows)} compiles ({len(args.head_dims)} head dims x {len(args.dtypes)} dtypes x "
        f"{len(archs)} GPUs), {failed} failed, {elapsed:.0f} s with {args.jobs} processes "
        f"(triton {triton.__version__})"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
