"""Command line of pipelines/ablate.py: the training flags of pretrain_3b.py (the base config of
every trial) plus the sweep's own."""

from __future__ import annotations

import sys

from ttte2e.platform.tune.sweep import KNOBS
from ttte2e.platform.cli.train import parse


def _values(text: str) -> list[int]:
    try:
        out = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        print(f"ablate: error: --values {text!r}: comma-separated integers", file=sys.stderr)
        sys.exit(2)
    return out


def main(description: str, defaults: dict, argv: list[str] | None = None) -> dict | None:
    from ttte2e.platform.train.config import ConfigError

    def add_sweep_flags(parser):
        group = parser.add_argument_group("sweep")
        group.add_argument("--grid", default="all", help=f"knob(s) to sweep: {', '.join(KNOBS)} "
                           "or all (comma-separated)")
        group.add_argument("--values", default="", help="the values of a single --grid knob "
                           "(default: the paper's grid scaled to the preset)")
        group.add_argument("--no-baseline", dest="baseline", action="store_false",
                           help="skip the SWA baseline trials")
        group.add_argument("--scheduler", choices=("none", "asha"), default="none",
                           help="asha: stop trials whose held-out loss trails early")
        group.add_argument("--grace-steps", type=int, default=0,
                           help="ASHA: steps before a trial may be stopped (default 2 evaluations)")
        group.add_argument("--max-concurrent", type=int, default=0,
                           help="trials at once (default: as many as the cluster's CPUs/GPUs fit)")

    cfg, args = parse(argv, description, defaults, extend=add_sweep_flags)
    knobs = list(KNOBS) if args.grid == "all" else [k.strip() for k in args.grid.split(",")]
    values = {}
    if args.values:
        if len(knobs) != 1:
            print("ablate: error: --values goes with a single --grid knob", file=sys.stderr)
            sys.exit(2)
        values[knobs[0]] = _values(args.values)
    try:
        if args.plan:
            raise ConfigError("--plan is pretrain_3b.py's; a sweep's trials are ordinary runs")
        from ttte2e.platform.tune.sweep import run_sweep

        out = run_sweep(cfg, knobs, values, args.baseline, args.scheduler, args.grace_steps,
                        args.max_concurrent)
    except ConfigError as e:
        print(f"ablate: error: {e}", file=sys.stderr)
        sys.exit(2)
    if out["interrupted"]:
        sys.exit(130)
    if out["errors"]:
        sys.exit(1)
    return out

