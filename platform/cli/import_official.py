"""Command line of pipelines/import_official.py."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import tyro

from ttte2e.model import TTTConfig
from ttte2e.model.model_folder import TOKENIZER_FILE, write_tokenizer
from ttte2e.platform.cli.parsing import cli, fail


@dataclass
class ImportOptions:
    checkpoint: str
    """Checkpoint manager root (holds step folders): path, s3:// or gs://."""
    out: str
    """Output model folder."""
    preset: str = "auto"
    """125m | 350m | 760m | 1b | 3b (checked against every stored shape), or auto (architecture
    from the shapes)."""
    step: int | None = None
    """Step to read (default: the latest)."""
    overrides: Annotated[
        list[str], tyro.conf.arg(name="set", metavar="FIELD=VALUE"), tyro.conf.UseAppendAction
    ] = field(default_factory=list)
    """Config field the shapes do not fix, e.g. seq_len=131072."""
    max_shard_gb: float = 5.0
    """Safetensors shard size limit (GB)."""
    tokenizer: str = ""
    """tokenizer.json to save beside the weights (the official checkpoints use Llama 3's
    tokenizer; give its tokenizer.json to generate text)."""
    register: str = ""
    """Register the folder in MLflow under NAME (by reference: the version points at --out)."""
    alias: str = "candidate"
    """Alias of the registered version."""
    tracking_uri: str = ""
    """MLflow tracking URI for --register (default: MLFLOW_TRACKING_URI, else sqlite beside
    --out)."""


def _override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    hints = typing.get_type_hints(TTTConfig)
    fields = {f.name for f in dataclasses.fields(TTTConfig)}
    if not sep or key not in fields:
        raise ValueError(f"--set {text!r}: expected FIELD=VALUE with FIELD one of {sorted(fields)}")
    kind = hints[key]
    if kind is bool:
        return key, value.lower() in ("1", "true", "yes")
    choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None
    if choices is not None:
        if value not in choices:
            raise ValueError(f"--set {text!r}: {key} is one of {', '.join(choices)}")
        return key, value
    try:
        return key, kind(value)
    except ValueError:
        raise ValueError(f"--set {text!r}: {value!r} is not a {kind.__name__}") from None


def main(argv: list[str] | None = None) -> dict:
    from ttte2e.model.official_checkpoint import OfficialCheckpointError, import_official_checkpoint

    args = cli(ImportOptions, argv, "Import an official TTT-E2E checkpoint.", "import_official")
    try:
        overrides = dict(_override(o) for o in args.overrides)
        config, files = import_official_checkpoint(
            args.checkpoint,
            args.out,
            args.preset,
            args.step,
            max_shard_bytes=int(args.max_shard_gb * 1024**3),
            **overrides,
        )
    except (OfficialCheckpointError, ValueError, FileNotFoundError) as e:
        fail("import_official", e)
    out = Path(args.out).resolve()
    print(
        f"imported {args.checkpoint} -> {out} ({', '.join(files)}; "
        f"{config.n_layers} layers, d {config.d_model}, {config.n_ttt_blocks} TTT blocks)"
    )
    print(f"  load with TTTModel.from_pretrained({str(out)!r})")
    result = dict(out=str(out), files=files, config=config.to_dict())
    if args.tokenizer:
        from ttte2e.platform.data.storage import resolve

        write_tokenizer(out, resolve(args.tokenizer).read_bytes())
        print(f"  tokenizer: {args.tokenizer} -> {out / TOKENIZER_FILE}")
    if args.register:
        from ttte2e.platform.registry.model_registry import RegistryError, register
        from ttte2e.platform.registry.tracking import tracking_uri

        uri = tracking_uri(args.tracking_uri, str(out.parent))
        try:
            reg = register(str(out), args.register, uri, alias=args.alias, weights="reference")
        except RegistryError as e:
            fail("import_official", e)
        print(f"  registered as {reg['uri']} (version {reg['version']}) in {reg['tracking_uri']}")
        result.update(registered=args.register, version=reg["version"], tracking_uri=uri)
    return result
