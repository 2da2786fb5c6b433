"""Command line of pipelines/prepare_data.py: PrepareOptions' fields are the flags;
`--verify OUTPUT` checks a finished dataset instead (exit 1 on damage)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Annotated

import tyro

from ttte2e.platform.cli.parsing import cli, fail
from ttte2e.platform.data.manifest import DataError, verify_dataset
from ttte2e.platform.data.prepare import PrepareOptions, prepare
from ttte2e.platform.data.storage import StorageError

DESCRIPTION = (
    "Tokenize raw text into TTT-E2E token shards. `--verify OUTPUT` checks a finished "
    "dataset instead (exit 1 on damage)."
)


@dataclass
class PrepareCommand:
    options: Annotated[PrepareOptions, tyro.conf.OmitArgPrefixes]
    ray: bool = True
    """Tokenize in Ray Data tasks (--no-ray: in this process, for debugging)."""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["--verify"]:
            if len(argv) != 2:
                raise ValueError("usage: prepare_data.py --verify OUTPUT")
            # sizes, checksums of every shard and of its row-group list, the tokenizer file
            sys.exit(1 if verify_dataset(argv[1]) else 0)
        cmd = cli(PrepareCommand, argv, DESCRIPTION, "prepare_data")
        prepare(cmd.options, use_ray=cmd.ray)
    except (DataError, StorageError, FileNotFoundError, ValueError) as e:
        fail("prepare_data", e)
