"""Command line of pipelines/lm_eval_harness.py: the harness's CLI with `ttte2e` registered."""

from __future__ import annotations

import importlib
import sys


def main(argv: list[str] | None = None) -> None:
    try:
        importlib.import_module("ttte2e.platform.eval.harness")  # registers the backend
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:
        raise SystemExit(
            f"lm-evaluation-harness is not installed ({e}); pip install -e '.[eval]'"
        ) from e
    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    cli_evaluate()
