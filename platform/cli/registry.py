"""Command lines of pipelines/registry.py (register, promote, list) and pipelines/pull_model.py
(pull a registered model and generate text with it). Bad input is one `error:` line, exit 2."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal, Union

import tyro

from ttte2e.platform.cli.parsing import cli, fail
from ttte2e.platform.registry.model_registry import (
    DEFAULT_MAX_LOGGED_BYTES,
    RegistryError,
    check_store_exists,
    describe,
    load_model,
    register,
    registry_uri,
    set_alias,
)
from ttte2e.platform.registry.serving import GENERATION_DEFAULTS

TRACKING_HELP = (
    "MLflow tracking URI: sqlite:///path/mlflow.db or http://host:port; empty: MLFLOW_TRACKING_URI"
)


@dataclass
class Register:
    """Register a checkpoint or model folder as a new version."""

    source: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="SOURCE")]
    """Training checkpoint or model folder (local or s3://)."""
    name: str
    """Registered model name."""
    alias: str = "candidate"
    """Alias of the new version ('' = none)."""
    weights: Literal["auto", "logged", "reference"] = "auto"
    """logged = copied into the MLflow artifact store; reference = the version points at SOURCE
    (nothing uploaded); auto = logged up to --max-logged-mb."""
    max_logged_mb: float = DEFAULT_MAX_LOGGED_BYTES / 1024**2
    """auto: the largest model folder (MB) copied into MLflow."""
    description: str = ""
    """Description of the version."""
    tracking_uri: Annotated[str, tyro.conf.arg(help=TRACKING_HELP)] = ""


@dataclass
class Promote:
    """Point an alias (default champion) at a version."""

    name: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="NAME")]
    """Registered model name."""
    version: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="VERSION")]
    """Version number, or @ALIAS (e.g. @candidate)."""
    to: str = "champion"
    """The alias to move."""
    tracking_uri: Annotated[str, tyro.conf.arg(help=TRACKING_HELP)] = ""


@dataclass
class ListVersions:
    """The versions of a registered model, with their aliases."""

    name: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="NAME")]
    """Registered model name."""
    tracking_uri: Annotated[str, tyro.conf.arg(help=TRACKING_HELP)] = ""


Command = Union[  # noqa: UP007 - tyro reads subcommands from a typing.Union
    Annotated[Register, tyro.conf.subcommand("register")],
    Annotated[Promote, tyro.conf.subcommand("promote")],
    Annotated[ListVersions, tyro.conf.subcommand("list")],
]


def registry_main(argv: list[str] | None = None) -> dict | list:
    args = cli(Command, argv, "The MLflow model registry of TTT-E2E models.", "registry")
    try:
        uri = registry_uri(args.tracking_uri)
        if not isinstance(args, Register):
            check_store_exists(uri)
        if isinstance(args, Register):
            out = register(
                args.source,
                args.name,
                uri,
                alias=args.alias,
                weights=args.weights,
                max_logged_bytes=int(args.max_logged_mb * 1024**2),
                description=args.description,
            )
            print(
                f"registered {out['uri']} (version {out['version']}; weights {out['weights']}"
                f"{' at ' + out['weights_uri'] if out['weights'] == 'reference' else ''}; "
                f"tokenizer {'attached' if out['tokenizer'] else 'MISSING'})"
            )
            return out
        if isinstance(args, Promote):
            version, before = set_alias(args.name, args.version, args.to, uri)
            print(
                f"models:/{args.name}@{args.to} -> version {version}"
                f"{f' (was version {before})' if before else ' (new alias)'}"
            )
            return dict(name=args.name, alias=args.to, version=version, previous=before)
        rows = describe(args.name, uri)
        for r in rows:
            print(
                f"v{r['version']:<4} {','.join(r['aliases']) or '-':<22} {r['weights']:<9} "
                f"val_loss {r['val_loss'] or 'n/a':<9} {r['weights_uri']}"
            )
        return rows
    except (RegistryError, FileNotFoundError, OSError) as e:
        fail("registry", e)


@dataclass
class PullOptions:
    model: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="MODEL")]
    """models:/NAME@ALIAS, models:/NAME/VERSION, a checkpoint or a model folder (local or
    s3://)."""
    prompt: Annotated[list[str], tyro.conf.UseAppendAction] = field(default_factory=list)
    """Prompt text; none = only pull and describe the model."""
    max_new_tokens: int = GENERATION_DEFAULTS["max_new_tokens"]
    """Tokens to generate per prompt."""
    temperature: float = GENERATION_DEFAULTS["temperature"]
    """Sampling temperature; 0 = greedy."""
    top_p: float = GENERATION_DEFAULTS["top_p"]
    """Nucleus sampling: the smallest set of tokens reaching this probability."""
    repetition_penalty: float = GENERATION_DEFAULTS["repetition_penalty"]
    """CTRL repetition penalty (1 = none)."""
    mode: Literal["ttt", "swa", "full"] = GENERATION_DEFAULTS["mode"]
    """ttt = TTT-E2E; swa / full = the baselines from the same weights."""
    seed: int = GENERATION_DEFAULTS["seed"]
    """Sampling seed."""
    tracking_uri: Annotated[str, tyro.conf.arg(help=TRACKING_HELP)] = ""


def pull_main(argv: list[str] | None = None) -> dict:
    from ttte2e.platform.registry.serving import TextGenerator

    args = cli(
        PullOptions,
        argv,
        "Pull a registered model (or load a checkpoint) and generate "
        "text with continued test-time training.",
        "pull_model",
    )
    try:
        model, tokenizer = load_model(args.model, args.tracking_uri or None)
        cfg = model.config
        print(
            f"pulled {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
            f"parameters, {cfg.n_layers} layers ({cfg.n_ttt_blocks} with TTT), window "
            f"{cfg.window}, chunk {cfg.chunk_size}; tokenizer "
            f"{'attached' if tokenizer is not None else 'MISSING'}",
            flush=True,
        )
        texts = []
        if args.prompt:
            generate = TextGenerator(model, tokenizer)
            texts = generate(
                args.prompt,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                repetition_penalty=args.repetition_penalty,
                mode=args.mode,
                seed=args.seed,
            )
            for prompt, text in zip(args.prompt, texts):
                print(f"--- prompt: {prompt!r}\n{prompt}{text}\n---", flush=True)
    except (RegistryError, ValueError, FileNotFoundError, OSError) as e:
        fail("pull_model", e)
    return dict(model=args.model, texts=texts)
