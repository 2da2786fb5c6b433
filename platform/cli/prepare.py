"""Command line of prepare_data: flags generated from PrepareOptions' fields and their docs."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from ttte2e.platform.cli.options import field_docs
from ttte2e.platform.data.manifest import DataError, verify_dataset
from ttte2e.platform.data.prepare import PrepareOptions, prepare
from ttte2e.platform.data.storage import StorageError


def parse_args(argv: list[str] | None = None) -> tuple[PrepareOptions, bool]:
    parser = argparse.ArgumentParser(
        description="Tokenize raw text into TTT-E2E token shards. "
                    "`--verify OUTPUT` checks a finished dataset instead (exit 1 on damage).")
    docs = field_docs(PrepareOptions)
    for f in dataclasses.fields(PrepareOptions):
        flag = "--" + f.name.replace("_", "-")
        help_text = docs.get(f.name, "")
        if f.default is dataclasses.MISSING:
            parser.add_argument(flag, required=True, help=help_text)
        elif isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true", help=help_text)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default,
                                help=f"{help_text} (default: {f.default!r})")
    parser.add_argument("--no-ray", action="store_true",
                        help="tokenize in this process instead of Ray Data (debugging)")
    args = vars(parser.parse_args(argv))
    no_ray = args.pop("no_ray")
    return PrepareOptions(**args), no_ray


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["--verify"]:
            if len(argv) != 2:
                raise ValueError("usage: prepare_data.py --verify OUTPUT")
            # sizes, checksums of every shard and of its row-group list, the tokenizer file
            sys.exit(1 if verify_dataset(argv[1]) else 0)
        opts, no_ray = parse_args(argv)
        prepare(opts, use_ray=not no_ray)
    except (DataError, StorageError, FileNotFoundError, ValueError) as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        sys.exit(2)
