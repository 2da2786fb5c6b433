"""Command line of pipelines/ablate.py: the training flags of pretrain_3b.py (the base config of
every trial, from the sweep's recipe) plus the sweep's own."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Annotated, Literal

import tyro

from ttte2e.platform.cli.parsing import fail
from ttte2e.platform.cli.train import RunFlags, parse_run
from ttte2e.platform.train.config import ConfigError
from ttte2e.platform.tune.sweep import KNOBS


@dataclass
class SweepOptions:
    grid: str = "all"
    """Knob(s) to sweep: window, chunk, layers, or all (comma-separated)."""
    values: str = ""
    """The values of a single --grid knob, comma-separated; empty: the paper's grid scaled to the
    preset."""
    baseline: bool = True
    """Train the SWA baseline trials (--no-baseline skips them)."""
    scheduler: Literal["none", "asha"] = "none"
    """asha: stop trials whose held-out loss trails early."""
    grace_steps: int = 0
    """ASHA: steps before a trial may be stopped (0 = two evaluations)."""
    max_concurrent: int = 0
    """Trials at once (0 = as many as the cluster's CPUs/GPUs fit)."""


@dataclass
class SweepCommand(RunFlags):
    sweep: Annotated[SweepOptions, tyro.conf.OmitArgPrefixes] = field(default_factory=SweepOptions)


def _values(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        fail("ablate", f"--values {text!r}: comma-separated integers")


def main(description: str, recipe: str = "", argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--plan" in argv:
        fail("ablate", "--plan is pretrain_3b.py's; a sweep's trials are ordinary runs")
    cfg, cmd = parse_run(SweepCommand, argv, description, recipe, "ablate")
    opts = cmd.sweep
    knobs = list(KNOBS) if opts.grid == "all" else [k.strip() for k in opts.grid.split(",")]
    values = {}
    if opts.values:
        if len(knobs) != 1:
            fail("ablate", "--values goes with a single --grid knob")
        values[knobs[0]] = _values(opts.values)
    try:
        from ttte2e.platform.tune.sweep import run_sweep

        out = run_sweep(
            cfg, knobs, values, opts.baseline, opts.scheduler, opts.grace_steps, opts.max_concurrent
        )
    except ConfigError as e:
        fail("ablate", e)
    if out["interrupted"]:
        sys.exit(130)
    if out["errors"]:
        sys.exit(1)
    return out
