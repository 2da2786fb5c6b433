"""Command line of pipelines/import_official.py."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

from ttte2e.model import TTTConfig
from ttte2e.model.model_folder import TOKENIZER_FILE


def _override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    hints = typing.get_type_hints(TTTConfig)
    fields = {f.name for f in dataclasses.fields(TTTConfig)}
    if not sep or key not in fields:
        raise argparse.ArgumentTypeError(f"--set {text!r}: expected FIELD=VALUE with FIELD one of "
                                         f"{sorted(fields)}")
    kind = hints[key]
    if kind is bool:
        return key, value.lower() in ("1", "true", "yes")
    return key, kind(value)


def main(argv: list[str] | None = None) -> dict:
    from ttte2e.model.official_checkpoint import OfficialCheckpointError, import_official_checkpoint

    parser = argparse.ArgumentParser(description="Import an official TTT-E2E checkpoint.")
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint manager root (holds step folders): path, s3:// or gs://")
    parser.add_argument("--preset", default="auto",
                        help="125m | 350m | 760m | 1b | 3b (checked against every stored shape), "
                             "or auto (architecture from the shapes)")
    parser.add_argument("--out", required=True, help="output model folder")
    parser.add_argument("--step", type=int, default=None, help="step to read (default: latest)")
    parser.add_argument("--set", dest="overrides", type=_override, action="append", default=[],
                        metavar="FIELD=VALUE", help="config field the shapes do not fix, e.g. "
                        "seq_len=131072 (repeatable)")
    parser.add_argument("--max-shard-gb", type=float, default=5.0,
                        help="safetensors shard size limit (GB)")
    parser.add_argument("--tokenizer", default="",
                        help="tokenizer.json to save beside the weights (the official checkpoints "
                             "use Llama 3's tokenizer; give its tokenizer.json to generate text)")
    parser.add_argument("--register", default="", help="register the folder in MLflow under NAME "
                        "(by reference: the version points at --out)")
    parser.add_argument("--alias", default="candidate", help="alias of the registered version")
    parser.add_argument("--tracking-uri", default="",
                        help="MLflow tracking URI for --register (default: MLFLOW_TRACKING_URI, "
                             "else sqlite beside --out)")
    args = parser.parse_args(argv)
    try:
        config, files = import_official_checkpoint(
            args.checkpoint, args.out, args.preset, args.step,
            max_shard_bytes=int(args.max_shard_gb * 1024**3), **dict(args.overrides))
    except (OfficialCheckpointError, ValueError, FileNotFoundError) as e:
        print(f"import_official: error: {e}", file=sys.stderr)
        sys.exit(2)
    out = Path(args.out).resolve()
    print(f"imported {args.checkpoint} -> {out} ({', '.join(files)}; "
          f"{config.n_layers} layers, d {config.d_model}, {config.n_ttt_blocks} TTT blocks)")
    print(f"  load with TTTModel.from_pretrained({str(out)!r})")
    result = dict(out=str(out), files=files, config=config.to_dict())
    if args.tokenizer:
        from ttte2e.platform.data.storage import resolve

        (out / TOKENIZER_FILE).write_bytes(resolve(args.tokenizer).read_bytes())
        print(f"  tokenizer: {args.tokenizer} -> {out / TOKENIZER_FILE}")
    if args.register:
        from ttte2e.platform.registry.model_registry import RegistryError, register
        from ttte2e.platform.registry.tracking import tracking_uri

        uri = tracking_uri(args.tracking_uri, str(out.parent))
        try:
            reg = register(str(out), args.register, uri, alias=args.alias, weights="reference")
        except RegistryError as e:
            print(f"import_official: error: {e}", file=sys.stderr)
            sys.exit(2)
        print(f"  registered as {reg['uri']} (version {reg['version']}) in {reg['tracking_uri']}")
        result.update(registered=args.register, version=reg["version"], tracking_uri=uri)
    return result
