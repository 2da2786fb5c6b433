"""What the benchmark scripts share (they run as `python pipelines/bench/<script>.py`, so this
folder is on sys.path): the process's memory figures from /proc."""

from __future__ import annotations


def read_status(field: str) -> int:
    """A byte count of /proc/self/status (VmRSS: resident now; VmHWM: the peak since the last
    reset, see reset_peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    """Set VmHWM back to the current RSS (Linux clear_refs), so the next peak is this step's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
