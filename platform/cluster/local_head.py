"""A private single-node Ray cluster started with `ray start --head`, for `ray job submit` on one
machine (the demo and its test). Every port is chosen free, the temp dir is private, and stop()
ends exactly the processes this cluster started, by PID: never `ray stop`, which would stop every
Ray cluster of this user on a shared machine.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class LocalRayCluster:
    def __init__(self, num_cpus: int | None = None):
        self.num_cpus = num_cpus
        self.temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # sockets: keep the path short
        self.gcs_port, self.dashboard_port, *self._more = _free_ports(7)
        self.env = {
            **os.environ,
            "RAY_USAGE_STATS_ENABLED": "0",
            # token auth would need a token file in $HOME shared with other clusters; the
            # dashboard is bound to 127.0.0.1 instead
            "RAY_AUTH_MODE": "disabled",
        }
        # every process the head starts (raylet, workers) finds this cluster through RAY_ADDRESS,
        # never another one on the machine (Ray Train's placement-group cleaner looks it up)
        self.env["RAY_ADDRESS"] = self.gcs_address

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _ray(self) -> str:
        exe = Path(sys.executable).parent / "ray"
        return str(exe) if exe.exists() else "ray"

    def start(self) -> LocalRayCluster:
        client, agent, agent_grpc, runtime_env, metrics = self._more[:5]
        cmd = [
            self._ray(),
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={self.gcs_port}",
            f"--dashboard-port={self.dashboard_port}",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}",
            f"--metrics-export-port={metrics}",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
        ]
        if self.num_cpus:
            cmd.append(f"--num-cpus={self.num_cpus}")
        log.info(
            f"starting a private Ray head (dashboard {self.address}, temp dir {self.temp_dir})"
        )
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True)
        if proc.returncode:
            self.stop()
            raise RuntimeError(f"ray start failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        self._wait_for_dashboard()
        return self

    def _wait_for_dashboard(self, timeout: float = 90) -> None:
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.address}/api/version", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"the Ray dashboard at {self.address} did not come up in {timeout} s")

    def submit(self, entrypoint: list[str], working_dir: str, env_vars: dict | None = None) -> int:
        """`ray job submit` (waits, streaming the job's output); returns its exit status."""
        import json

        # our own excludes name .venv and .git; Ray's defaults (the same two) only add a notice
        # per job that it now skips them
        runtime_env = {"excludes": [".venv", "runs", ".git", "*.egg-info", "__pycache__"]}
        if env_vars:
            runtime_env["env_vars"] = env_vars
        cmd = [
            self._ray(),
            "job",
            "submit",
            "--address",
            self.address,
            "--working-dir",
            working_dir,
            "--runtime-env-json",
            json.dumps(runtime_env),
            "--",
            *entrypoint,
        ]
        env = {**self.env, "RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES": ""}
        return subprocess.run(cmd, env=env).returncode

    def pids(self) -> list[int]:
        """Processes of this cluster: their command line names its private temp dir or its GCS
        address (the client server names only that), and their children."""
        import psutil

        ours, marks = set(), (self.temp_dir, f":{self.gcs_port} ")
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                line = " ".join(p.info["cmdline"] or []) + " "
                if any(mark in line for mark in marks):
                    ours.add(p.pid)
                    ours.update(c.pid for c in p.children(recursive=True))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        ours.discard(os.getpid())
        return sorted(ours)

    def stop(self) -> None:
        import psutil

        pids = self.pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        procs = []
        for pid in pids:
            try:
                procs.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                pass
        # the GCS server and the autoscaler's monitor linger ~15 s after SIGTERM once the rest is
        # gone; they hold nothing worth a graceful end (this cluster is private and disposable)
        _, alive = psutil.wait_procs(procs, timeout=3)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        log.info(f"stopped the private Ray head ({len(pids)} processes)")

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
