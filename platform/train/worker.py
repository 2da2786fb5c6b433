"""The Trainer (train/trainer.py) on Ray: a Ray Train worker, or a Tune trial's own process.

`TuneReporter`: the reporter of a Tune trial that runs the Trainer in its own process.

`train_loop` (what TorchTrainer runs on every worker): the storage credentials, the process
group and this rank's placement from Ray Train's context, Ray's report as the reporter, and
the fatal marker: errors no restart can fix are recorded in the run folder (FATAL.json), so the
workers of a restarted group return at once and the driver reports the error.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from ttte2e.platform.data.manifest import DataError
from ttte2e.platform.logs import setup_logging
from ttte2e.platform.redact import redact
from ttte2e.platform.train.checkpoint import CheckpointError
from ttte2e.platform.train.config import ConfigError
from ttte2e.platform.train.trainer import (
    LocalReporter,
    NonFiniteLoss,
    RunSpec,
    Trainer,
    build_placement,
    import_deepspeed,
)

# Ray Train retries every worker error (FailureConfig); these records end the group for good.
FATAL_FILE = "FATAL.json"
NON_FINITE_FILE = "non_finite.json"


class RayReporter:
    """Metrics and checkpoints through ray.train.report (it uploads the folder to the run's
    storage before it returns)."""

    def report(
        self, metrics: dict, checkpoint: Path | None = None, name: str | None = None
    ) -> None:
        import ray.train

        if checkpoint is None:
            ray.train.report(metrics)
        else:
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(checkpoint),
                checkpoint_dir_name=name,
            )

    def committed(self, metrics: dict) -> None:
        pass  # Ray Train forwards the report itself (to a Tune trial: TuneReportCallback)


class TuneReporter:
    """A Tune trial that runs the Trainer in its own process (a one-worker trial): checkpoints go
    to the run folder as in one plain process (LocalReporter), and every report to Tune, whose
    scheduler compares them. A checkpoint's report reaches Tune once the checkpoint is complete:
    Tune may stop the trial at any report (and does not resume it from there)."""

    def __init__(self, stored: LocalReporter):
        self.stored = stored

    def report(
        self, metrics: dict, checkpoint: Path | None = None, name: str | None = None
    ) -> None:
        self.stored.report(metrics, checkpoint, name)
        if checkpoint is None:
            self._to_tune(metrics)

    def committed(self, metrics: dict) -> None:
        self._to_tune(metrics)

    @staticmethod
    def _to_tune(metrics: dict) -> None:
        from ray import tune

        tune.report(metrics)


def train_loop(config: dict) -> None:
    """Ray Train worker entry point (TorchTrainer(train_loop_per_worker=...)); config holds the
    RunSpec and the driver's storage/tracking credentials (never logged)."""
    spec: RunSpec = config["spec"]
    os.environ.update(config["env"])
    setup_logging()
    _quiet_ray_train_reports()
    run_dir = spec.run_dir
    if run_dir.join(FATAL_FILE).exists():
        return  # a restart after an error no restart can fix: nothing to do, the driver reports
    try:
        _run(spec)
    except NonFiniteLoss as e:
        marker = run_dir.join(NON_FINITE_FILE)
        seen = json.loads(marker.read_bytes()).get("step") if marker.exists() else None
        if seen == e.step:
            _record_fatal(
                run_dir,
                FloatingPointError(
                    f"{e} (the same step was non-finite after a restart from the last checkpoint)"
                ),
            )
        else:
            marker.write_bytes(json.dumps(dict(step=e.step, error=str(e))).encode())
        raise
    except Exception as e:  # noqa: BLE001 - always re-raised
        fatal = unfixable(e)
        if fatal is not None:
            _record_fatal(run_dir, fatal)
        raise


def _quiet_ray_train_reports() -> None:
    """Ray Train logs every rank's every report and checkpoint at INFO (two long lines per rank
    and report); our own lines say the step. Its modules name their loggers by file path."""
    import importlib

    logging.getLogger("ray.train").setLevel(logging.WARNING)
    for name in (
        "ray.train.v2._internal.execution.context",
        "ray.train.v2._internal.execution.storage",
    ):
        try:
            module = importlib.import_module(name)
        except ImportError:  # another Ray version: its lines stay
            continue
        for logger_name in (module.__name__, module.__file__):
            logging.getLogger(logger_name).setLevel(logging.WARNING)


def _run(spec: RunSpec) -> None:
    import ray
    import ray.train
    import torch.distributed as dist

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if spec.use_gpu:
        from ray.train.torch import get_device

        device = get_device()
    else:
        device = torch.device("cpu")
    import_deepspeed(device).init_distributed(
        dist_backend="nccl" if device.type == "cuda" else "gloo"
    )
    # the Ray node id of every rank (recorded in checkpoints: where the run actually ran)
    nodes = [ray.get_runtime_context().get_node_id()]
    if world > 1:
        nodes = [None] * world
        dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    placement = build_placement(
        rank, world, device, nodes, spec.train.tensor_parallel, ray_data=True
    )
    Trainer(spec, placement, RayReporter()).fit()


def unfixable(error: BaseException) -> BaseException | None:
    """The error (or its cause: Ray wraps errors raised in Ray Data actors) that no restart can
    fix: a bad setting, an incomplete checkpoint, damaged data."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, (ConfigError, CheckpointError, DataError)):
            return error
        error = getattr(error, "cause", None) or error.__cause__
        seen += 1
    return None


def _record_fatal(run_dir, error: Exception) -> None:
    run_dir.join(FATAL_FILE).write_bytes(
        json.dumps(dict(error=redact(str(error)), kind=type(error).__name__)).encode()
    )
