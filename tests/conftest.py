import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The official reference data lives in shared/ beside the repo (DEVELOPERS.md); override with
# TTTE2E_REFERENCE_DIR. Missing data is an error, not a skip: parity is the core contract.
REFERENCE_DIR = Path(os.environ.get("TTTE2E_REFERENCE_DIR", REPO.parent / "shared" / "reference"))


def reference_cases() -> list[Path]:
    cases = sorted(REFERENCE_DIR.glob("ttt_e2e_tiny_*.npz"))
    if not cases:
        raise FileNotFoundError(f"no ttt_e2e_tiny_*.npz under {REFERENCE_DIR}; set "
                                "TTTE2E_REFERENCE_DIR to the official reference folder")
    return cases


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
