"""Command line of the training entry scripts (pipelines/pretrain_3b.py, extend_context.py): a
recipe (recipes/*.yaml, or `--config FILE`) gives the settings, every TrainConfig field is a flag
that overrides it, and so is every model field (TTTConfig), which overrides the preset
(`--preset tiny --window 64`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Annotated

import tyro

from ttte2e.model import TTTConfig
from ttte2e.platform.cli.parsing import (
    RecipeError,
    cli,
    fail,
    given,
    overrides_class,
    read_recipe,
    recipe_argument,
    typed_values,
)
from ttte2e.platform.train.config import ConfigError, TrainConfig

# compile is a setting of the run (TrainConfig.compile, whose default depends on the device)
ModelFlags = overrides_class(
    TTTConfig, "ModelFlags", skip={"compile"}, note="(default: the preset's)"
)


@dataclass
class PlanOptions:
    """--plan prints the capacity plan (memory per GPU, wall-clock) and exits; no training."""

    plan: bool = False
    """Print the capacity plan and exit."""
    nodes: int = 1
    """Nodes for --plan."""
    gpus_per_node: int = 8
    """GPUs per node for --plan."""
    gpu: str = "h100"
    """GPU model for --plan (see train/plan.py GPU_SPECS)."""
    mfu: float = 0.3
    """Assumed MFU for --plan's wall-clock."""


@dataclass
class RunFlags:
    """The flags of a training run: TrainConfig's fields, the model fields over the preset, the
    recipe they override."""

    train: Annotated[TrainConfig, tyro.conf.OmitArgPrefixes]
    model: Annotated[ModelFlags, tyro.conf.OmitArgPrefixes]
    ttt_fraction: float | None = None
    """[model] Fraction of the blocks that are TTT blocks (rounded, >= 1); sets n_ttt_blocks
    (give one of the two)."""
    config: str = ""
    """Recipe: a YAML file (or a name in recipes/) whose settings the other flags override."""

    def run_config(self) -> TrainConfig:
        overrides = {**self.train.model_overrides, **given(self.model)}
        if self.ttt_fraction is not None:
            overrides["ttt_fraction"] = self.ttt_fraction
        return dataclasses.replace(self.train, model_overrides=overrides)


@dataclass
class TrainCommand(RunFlags):
    plan: Annotated[PlanOptions, tyro.conf.OmitArgPrefixes] = field(default_factory=PlanOptions)
    local: bool = False
    """Run in this process without Ray (one worker: for a debugger, or a single box); its
    checkpoints continue under Ray and the other way round."""


def recipe_config(recipe: str) -> TrainConfig:
    """The TrainConfig a recipe describes (its `model:` mapping: the model overrides)."""
    values = dict(read_recipe(recipe))
    model = values.pop("model", None) or {}
    if not isinstance(model, dict):
        raise RecipeError(f"recipe {recipe}: model: is a mapping of model fields")
    model = typed_values(TTTConfig, model, f"recipe {recipe} (model)")
    return TrainConfig(
        **typed_values(TrainConfig, values, f"recipe {recipe}"), model_overrides=model
    )


def parse_run(command: type, argv: list[str] | None, description: str, recipe: str, prog: str):
    """A RunFlags command parsed over the recipe (--config, else `recipe`): (TrainConfig,
    the command)."""
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = recipe_argument(argv) or recipe
    try:
        base = recipe_config(chosen) if chosen else TrainConfig()
    except (RecipeError, TypeError) as e:
        fail(prog, e)
    cmd = cli(
        command, argv, description, prog, command(train=base, model=ModelFlags(), config=chosen)
    )
    return cmd.run_config(), cmd


def parse(
    argv: list[str] | None, description: str, recipe: str = "", prog: str = "train"
) -> tuple[TrainConfig, PlanOptions]:
    """(TrainConfig, plan options): the recipe (--config, else `recipe`), then the flags."""
    cfg, cmd = parse_run(TrainCommand, argv, description, recipe, prog)
    return cfg, cmd.plan


def check_plan_options(plan: PlanOptions) -> None:
    from ttte2e.platform.train.plan import GPU_SPECS

    if plan.nodes < 1 or plan.gpus_per_node < 1:
        raise ConfigError(
            f"--nodes {plan.nodes} / --gpus-per-node {plan.gpus_per_node}: each must be >= 1"
        )
    if plan.gpu.lower() not in GPU_SPECS:
        raise ConfigError(f"--gpu {plan.gpu!r}: unknown GPU; known: {sorted(GPU_SPECS)}")
    if not 0 < plan.mfu <= 1:
        raise ConfigError(f"--mfu {plan.mfu}: a fraction in (0, 1]")


def run_main(
    description: str, recipe: str = "", require_init: bool = False, argv: list[str] | None = None
) -> dict | None:
    """The entry scripts' main: --plan prints the capacity plan; otherwise train. Bad input is
    one line on stderr and exit status 2, before any worker starts."""
    cfg, cmd = parse_run(TrainCommand, argv, description, recipe, "train")
    plan = cmd.plan
    try:
        if plan.plan:
            check_plan_options(plan)
            from ttte2e.platform.train.plan import capacity_plan, format_plan

            print(
                format_plan(capacity_plan(cfg, plan.nodes, plan.gpus_per_node, plan.gpu, plan.mfu))
            )
            return None
        if require_init and not cfg.init_from and not cfg.resume_from:
            raise ConfigError("--init-from <pretraining checkpoint> is required")
        from ttte2e.platform.train.driver import fit

        return fit(cfg, local=cmd.local)
    except ConfigError as e:
        import sys

        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
