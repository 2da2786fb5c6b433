"""Every Triton kernel compiles for H100 (sm_90) and B200 (sm_100) at the launch settings a GPU run
uses, within the shared-memory limit and without heavy spills (pipelines/bench/check_kernels_aot.py;
ptxas ships with triton, no GPU needed).

The suite compiles a representative subset (36 of the script's 180 compiles, ~1 s each from an
empty Triton cache): every kernel launch on both architectures in both dtypes at head dim 80, the
3B preset's. Head dims 80-128 share their tile settings (the head dim pads to 128), and those
settings hold the matrix's largest shared memory (bf16, prefix backward dk dv on sm_100) and its
most registers and spills (fp32, double backward dq ddo). The whole matrix (every preset's head
dim) is the script's default, run by hand; its figures are in docs/benchmarks.md."""

import json
import os
import subprocess
import sys

import pytest

from ttte2e.kernels.attention import triton_swa

from conftest import REPO

pytestmark = pytest.mark.skipif(not triton_swa.AVAILABLE, reason="needs triton")
SCRIPT = REPO / "pipelines" / "bench" / "check_kernels_aot.py"


# the 3B preset's head dim: the tile settings of head dims 80-128 (see the docstring)
HEAD_DIM = 80


def test_every_kernel_compiles_for_h100_and_b200_within_limits(tmp_path):
    rows_file = tmp_path / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--head-dims", str(HEAD_DIM), "--json", str(rows_file)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    rows = json.loads(rows_file.read_text())
    # each kernel of a training step, for sm_90 and sm_100, in bf16 and fp32
    kernels = {(r["where"], r["kernel"]) for r in rows}
    assert {("prefix", "forward"), ("suffix", "double backward dk dv")} <= kernels
    assert len(kernels) == 9
    assert {r["arch"] for r in rows} == {90, 100}
    assert {r["dtype"] for r in rows} == {"bf16", "fp32"}
    assert {r["head_dim"] for r in rows} == {HEAD_DIM} and {r["block_d"] for r in rows} == {128}
    assert len(rows) == 9 * 2 * 2
    for r in rows:
        assert r["error"] is None and 0 < r["shared"] <= 232_448 and r["registers"] <= 255, r


def _script():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import check_kernels_aot
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return check_kernels_aot


def test_the_whole_matrix_covers_every_preset_head_dim_and_builds_its_launches():
    """What the suite does not compile is still laid out: the script's default head dims are
    every preset's and 128, and each builds its 9 launches (no compile: meta tensors)."""
    import torch

    from ttte2e.model.config import PRESETS

    aot = _script()
    dims = aot.preset_head_dims()
    assert set(dims) == {p["d_model"] // p["n_heads"] for p in PRESETS.values()} | {128}
    for head_dim in dims:
        for dtype in (torch.bfloat16, torch.float32):
            launches = [launch for _, launch in aot.launches_for(head_dim, dtype)]
            assert len(launches) == 9 and all(
                lch.settings.block_d >= head_dim for lch in launches
            ), head_dim


def test_the_verdict_fails_overflows_errors_and_heavy_spills():
    aot = _script()
    row = dict(error=None, shared=100_000, shared_limit=232_448, spill_stores=0, spill_loads=0)
    assert aot.verdict(row, 512) == "ok"
    assert aot.verdict(dict(row, spill_stores=300), 512) == "ok, small spill"
    assert aot.verdict(dict(row, spill_loads=2048), 512) == "SPILLS"
    assert aot.verdict(dict(row, shared=232_449), 512) == "SHARED OVERFLOW"
    assert aot.verdict(dict(row, error="CompilationError: x"), 512) == "COMPILE ERROR"
