"""Every Triton kernel compiles for H100 (sm_90) and B200 (sm_100) at the launch settings a GPU run
uses, within the shared-memory limit and without heavy spills (pipelines/bench/check_kernels_aot.py;
ptxas ships with triton, no GPU needed)."""

import json
import os
import subprocess
import sys

import pytest

from ttte2e.kernels.attention import triton_swa

from conftest import REPO

pytestmark = pytest.mark.skipif(not triton_swa.AVAILABLE, reason="needs triton")
SCRIPT = REPO / "pipelines" / "bench" / "check_kernels_aot.py"


def test_every_kernel_compiles_for_h100_and_b200_within_limits(tmp_path):
    rows_file = tmp_path / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", str(rows_file)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    rows = json.loads(rows_file.read_text())
    # each kernel of a training step, for sm_90 and sm_100, every preset head dim and 128, 2 dtypes
    kernels = {(r["where"], r["kernel"]) for r in rows}
    assert {("prefix", "forward"), ("suffix", "double backward dk dv")} <= kernels
    assert len(kernels) == 9
    assert {r["arch"] for r in rows} == {90, 100}
    assert {64, 80, 96, 128} <= {r["head_dim"] for r in rows}
    assert len(rows) == 9 * 2 * 2 * len({r["head_dim"] for r in rows})
    for r in rows:
        assert r["error"] is None and 0 < r["shared"] <= 232_448 and r["registers"] <= 255, r


def test_the_verdict_fails_overflows_errors_and_heavy_spills():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import check_kernels_aot as aot
    finally:
        sys.path.remove(str(SCRIPT.parent))
    row = dict(error=None, shared=100_000, shared_limit=232_448, spill_stores=0, spill_loads=0)
    assert aot.verdict(row, 512) == "ok"
    assert aot.verdict(dict(row, spill_stores=300), 512) == "ok, small spill"
    assert aot.verdict(dict(row, spill_loads=2048), 512) == "SPILLS"
    assert aot.verdict(dict(row, shared=232_449), 512) == "SHARED OVERFLOW"
    assert aot.verdict(dict(row, error="CompilationError: x"), 512) == "COMPILE ERROR"
