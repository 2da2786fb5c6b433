"""Connect to the Ray cluster a job runs in, or start a private local one.

Under `ray job submit` (RAY_ADDRESS set) we join that cluster. Otherwise a local cluster with a
private temp dir and usage stats off: on a shared machine a bare ray.init() could join another
user's cluster.
"""

from __future__ import annotations

import os
import tempfile


def ensure_ray(num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    # short path: Ray's unix sockets live under it and must stay < 108 characters
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _temp_dir=temp_dir,
             log_to_driver=True)
