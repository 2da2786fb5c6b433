"""Command line of the training entry scripts: every TrainConfig field is a flag, and so is every
model field (TTTConfig), which overrides the preset (e.g. `--preset tiny --window 64`)."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from ttte2e.model import TTTConfig
from ttte2e.platform.cli.options import field_docs
from ttte2e.platform.train.config import ConfigError, TrainConfig

_MODEL_SKIP = {"ttt_fraction"}  # an InitVar; n_ttt_blocks is the field


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_fields(parser, cls, defaults: dict, skip: set, model: bool) -> None:
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = hints[f.name]
        help_text = docs.get(f.name, "").replace("%", "%%")
        if model:
            # None = keep the preset's value
            parser.add_argument(_flag(f.name), dest=f"model.{f.name}", default=None,
                                type=(lambda v: v.lower() in ("1", "true", "yes")) if kind is bool
                                else kind, help=f"[model] {help_text}")
            continue
        default = defaults.get(f.name, f.default)
        if kind is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction,
                                default=default, help=help_text)
        else:
            parser.add_argument(_flag(f.name), type=kind, default=default,
                                help=f"{help_text} (default: {default!r})")


def build_parser(description: str, defaults: dict | None = None) -> argparse.ArgumentParser:
    defaults = defaults or {}
    parser = argparse.ArgumentParser(description=description)
    group = parser.add_argument_group("plan (print the capacity plan and exit, no training)")
    group.add_argument("--plan", action="store_true", help="print the capacity plan and exit")
    group.add_argument("--nodes", type=int, default=1, help="nodes for --plan")
    group.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node for --plan")
    group.add_argument("--gpu", default="h100", help="GPU model for --plan (h100, h200, a100)")
    group.add_argument("--mfu", type=float, default=0.3, help="assumed MFU for --plan's wall-clock")
    train = parser.add_argument_group("training run")
    _add_fields(train, TrainConfig, defaults, {"model_overrides"}, model=False)
    model = parser.add_argument_group("model fields (override the preset)")
    _add_fields(model, TTTConfig, {}, _MODEL_SKIP, model=True)
    model.add_argument("--ttt-fraction", dest="model.ttt_fraction", type=float, default=None,
                       help="[model] fraction of the blocks that are TTT blocks (rounded, >= 1); "
                            "sets n_ttt_blocks (give one of the two)")
    return parser


def check_plan_options(args) -> None:
    from ttte2e.platform.train.plan import GPU_SPECS

    if args.nodes < 1 or args.gpus_per_node < 1:
        raise ConfigError(f"--nodes {args.nodes} / --gpus-per-node {args.gpus_per_node}: each "
                          "must be >= 1")
    if args.gpu.lower() not in GPU_SPECS:
        raise ConfigError(f"--gpu {args.gpu!r}: unknown GPU; known: {sorted(GPU_SPECS)}")
    if not 0 < args.mfu <= 1:
        raise ConfigError(f"--mfu {args.mfu}: a fraction in (0, 1]")


def parse(argv: list[str] | None, description: str, defaults: dict | None = None,
          model_defaults: dict | None = None, extend=None) -> tuple[TrainConfig, argparse.Namespace]:
    """(TrainConfig, the parsed namespace incl. the --plan options and whatever flags
    extend(parser) adds)."""
    parser = build_parser(description, defaults)
    if extend is not None:
        extend(parser)
    args = parser.parse_args(argv)
    values = vars(args)
    overrides = dict(model_defaults or {})
    overrides.update({k[len("model."):]: v for k, v in values.items()
                      if k.startswith("model.") and v is not None})
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in values.items() if k in train_fields},
                      model_overrides=overrides)
    return cfg, args


def run_main(description: str, defaults: dict, model_defaults: dict | None = None,
             require_init: bool = False, argv: list[str] | None = None) -> dict | None:
    """The entry scripts' main: --plan prints the capacity plan; otherwise train. Bad input is
    one line on stderr and exit status 2, before any worker starts."""
    import sys

    cfg, args = parse(argv, description, defaults, model_defaults)
    try:
        if args.plan:
            check_plan_options(args)
            from ttte2e.platform.train.plan import capacity_plan, format_plan

            print(format_plan(capacity_plan(cfg, args.nodes, args.gpus_per_node, args.gpu,
                                            args.mfu)))
            return None
        if require_init and not cfg.init_from and not cfg.resume_from:
            raise ConfigError("--init-from <pretraining checkpoint> is required")
        from ttte2e.platform.train.driver import fit

        return fit(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
