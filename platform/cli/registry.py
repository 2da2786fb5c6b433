"""Command lines of pipelines/registry.py (register, promote, list) and pipelines/pull_model.py
(pull a registered model and generate text with it). Bad input is one `error:` line, exit 2."""

from __future__ import annotations

import argparse
import sys

from ttte2e.platform.registry.model_registry import (DEFAULT_MAX_LOGGED_BYTES, RegistryError, check_store_exists,
                                      describe, load_model,
                                      register, registry_uri, set_alias)


def _fail(prog: str, e: Exception) -> None:
    print(f"{prog}: error: {e}", file=sys.stderr)
    sys.exit(2)


def _tracking(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default: "
                        "MLFLOW_TRACKING_URI): sqlite:///path/mlflow.db or http://host:port")


def registry_main(argv: list[str] | None = None) -> dict | list:
    parser = argparse.ArgumentParser(description="The MLflow model registry of TTT-E2E models.")
    sub = parser.add_subparsers(dest="command", required=True)
    reg = sub.add_parser("register", help="register a checkpoint or model folder as a new version")
    reg.add_argument("source", help="training checkpoint or model folder (local or s3://)")
    reg.add_argument("--name", required=True, help="registered model name")
    reg.add_argument("--alias", default="candidate", help="alias of the new version ('' = none)")
    reg.add_argument("--weights", choices=("auto", "logged", "reference"), default="auto",
                     help="logged = copied into the MLflow artifact store; reference = the version "
                          "points at SOURCE (nothing uploaded); auto = logged up to --max-logged-mb")
    reg.add_argument("--max-logged-mb", type=float, default=DEFAULT_MAX_LOGGED_BYTES / 1024**2)
    reg.add_argument("--description", default="")
    _tracking(reg)
    promote = sub.add_parser("promote", help="point an alias (default champion) at a version")
    promote.add_argument("name", help="registered model name")
    promote.add_argument("version", help="version number, or @ALIAS (e.g. @candidate)")
    promote.add_argument("--to", default="champion", help="the alias to move (default: champion)")
    _tracking(promote)
    show = sub.add_parser("list", help="the versions of a registered model, with their aliases")
    show.add_argument("name")
    _tracking(show)
    args = parser.parse_args(argv)
    try:
        uri = registry_uri(args.tracking_uri)
        if args.command != "register":
            check_store_exists(uri)
        if args.command == "register":
            out = register(args.source, args.name, uri, alias=args.alias, weights=args.weights,
                           max_logged_bytes=int(args.max_logged_mb * 1024**2),
                           description=args.description)
            print(f"registered {out['uri']} (version {out['version']}; weights {out['weights']}"
                  f"{' at ' + out['weights_uri'] if out['weights'] == 'reference' else ''}; "
                  f"tokenizer {'attached' if out['tokenizer'] else 'MISSING'})")
            return out
        if args.command == "promote":
            version, before = set_alias(args.name, args.version, args.to, uri)
            print(f"models:/{args.name}@{args.to} -> version {version}"
                  f"{f' (was version {before})' if before else ' (new alias)'}")
            return dict(name=args.name, alias=args.to, version=version, previous=before)
        rows = describe(args.name, uri)
        for r in rows:
            print(f"v{r['version']:<4} {','.join(r['aliases']) or '-':<22} {r['weights']:<9} "
                  f"val_loss {r['val_loss'] or 'n/a':<9} {r['weights_uri']}")
        return rows
    except (RegistryError, FileNotFoundError, OSError) as e:
        _fail("registry", e)


def pull_main(argv: list[str] | None = None) -> dict:
    from ttte2e.platform.registry.serving import GENERATION_PARAMS, TextGenerator

    parser = argparse.ArgumentParser(description="Pull a registered model (or load a checkpoint) "
                                     "and generate text with continued test-time training.")
    parser.add_argument("model", help="models:/NAME@ALIAS, models:/NAME/VERSION, a checkpoint or a "
                        "model folder (local or s3://)")
    parser.add_argument("--prompt", action="append", default=[],
                        help="prompt text (repeatable); none = only pull and describe the model")
    defaults = {n: d for n, _, d in GENERATION_PARAMS}
    parser.add_argument("--max-new-tokens", type=int, default=defaults["max_new_tokens"])
    parser.add_argument("--temperature", type=float, default=defaults["temperature"],
                        help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=defaults["top_p"])
    parser.add_argument("--repetition-penalty", type=float, default=defaults["repetition_penalty"])
    parser.add_argument("--mode", choices=("ttt", "swa", "full"), default=defaults["mode"],
                        help="ttt = TTT-E2E; swa / full = the baselines from the same weights")
    parser.add_argument("--seed", type=int, default=defaults["seed"])
    _tracking(parser)
    args = parser.parse_args(argv)
    try:
        model, tokenizer = load_model(args.model, args.tracking_uri or None)
        cfg = model.config
        print(f"pulled {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
              f"parameters, {cfg.n_layers} layers ({cfg.n_ttt_blocks} with TTT), window "
              f"{cfg.window}, chunk {cfg.chunk_size}; tokenizer "
              f"{'attached' if tokenizer is not None else 'MISSING'}", flush=True)
        texts = []
        if args.prompt:
            generate = TextGenerator(model, tokenizer)
            texts = generate(args.prompt, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_p=args.top_p,
                             repetition_penalty=args.repetition_penalty, mode=args.mode,
                             seed=args.seed)
            for prompt, text in zip(args.prompt, texts):
                print(f"--- prompt: {prompt!r}\n{prompt}{text}\n---", flush=True)
    except (RegistryError, ValueError, FileNotFoundError, OSError) as e:
        _fail("pull_model", e)
    return dict(model=args.model, texts=texts)
