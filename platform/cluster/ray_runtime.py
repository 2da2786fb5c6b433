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
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        _temp_dir=temp_dir,
        log_to_driver=True,
    )


def forwarded_env() -> dict[str, str]:
    """The variables a Ray worker, actor or trial needs from the process that starts it: the
    storage endpoint and credentials (S3), MLflow's settings and credentials. Values are never
    logged."""
    from ttte2e.platform.data.storage import STORAGE_ENV_VARS

    return {
        k: v
        for k, v in os.environ.items()
        if k in STORAGE_ENV_VARS or k.startswith(("MLFLOW_", "AWS_"))
    }
