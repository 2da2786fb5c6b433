"""Command line of pipelines/ablate.py: the training flags of pretrain_3b.py (the base config of
every trial, from the sweep's recipe) plus the sweep's own."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Annotated, Literal, Optional

import tyro

from ttte2e.platform.cli.parsing import RecipeError, cli, fail, given, recipe_argument
from ttte2e.platform.cli.train import ModelFlags, recipe_config
from ttte2e.platform.train.config import ConfigError, TrainConfig
from ttte2e.platform.tune.sweep import KNOBS


@dataclass
class SweepOptions:
    grid: str = "all"
    """Knob(s) to sweep: window, chunk, layers, or all (comma-separated)."""
    values: str = ""
    """The values of a single --grid knob, comma-separated (default: the paper's grid scaled to
    the preset)."""
    baseline: bool = True
    """Train the SWA baseline trials (--no-baseline skips them)."""
    scheduler: Literal["none", "asha"] = "none"
    """asha: stop trials whose held-out loss trails early."""
    grace_steps: int = 0
    """ASHA: steps before a trial may be stopped (0 = two evaluations)."""
    max_concurrent: int = 0
    """Trials at once (0 = as many as the cluster's CPUs/GPUs fit)."""


@dataclass
class SweepCommand:
    train: Annotated[TrainConfig, tyro.conf.OmitArgPrefixes]
    model: Annotated[ModelFlags, tyro.conf.OmitArgPrefixes]
    sweep: Annotated[SweepOptions, tyro.conf.OmitArgPrefixes]
    ttt_fraction: Optional[float] = None
    """[model] Fraction of the blocks that are TTT blocks; sets n_ttt_blocks."""
    config: str = ""
    """Recipe: a YAML file (or a name in recipes/) whose settings the other flags override."""


def _values(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        fail("ablate", f"--values {text!r}: comma-separated integers")


def main(description: str, recipe: str = "", argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--plan" in argv:
        fail("ablate", "--plan is pretrain_3b.py's; a sweep's trials are ordinary runs")
    given_recipe, argv = recipe_argument(argv)
    try:
        base = recipe_config(given_recipe or recipe) if (given_recipe or recipe) else TrainConfig()
    except (RecipeError, TypeError) as e:
        fail("ablate", e)
    cmd = cli(SweepCommand, argv, description, "ablate",
              SweepCommand(train=base, model=ModelFlags(), sweep=SweepOptions(),
                           config=given_recipe or recipe))
    overrides = {**base.model_overrides, **given(cmd.model)}
    if cmd.ttt_fraction is not None:
        overrides["ttt_fraction"] = cmd.ttt_fraction
    cfg = dataclasses.replace(cmd.train, model_overrides=overrides)
    opts = cmd.sweep
    knobs = list(KNOBS) if opts.grid == "all" else [k.strip() for k in opts.grid.split(",")]
    values = {}
    if opts.values:
        if len(knobs) != 1:
            fail("ablate", "--values goes with a single --grid knob")
        values[knobs[0]] = _values(opts.values)
    try:
        from ttte2e.platform.tune.sweep import run_sweep

        out = run_sweep(cfg, knobs, values, opts.baseline, opts.scheduler, opts.grace_steps,
                        opts.max_concurrent)
    except ConfigError as e:
        fail("ablate", e)
    if out["interrupted"]:
        sys.exit(130)
    if out["errors"]:
        sys.exit(1)
    return out
