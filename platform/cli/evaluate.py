"""Command line of pipelines/evaluate.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ttte2e.model.decode import MODES
from ttte2e.platform.cli.parsing import cli, fail


@dataclass
class EvaluateOptions:
    model: str
    """Model folder, training checkpoint, s3:// copy, or models:/NAME/VERSION | models:/NAME@ALIAS."""
    data: str
    """Prepared dataset (its val split is used)."""
    contexts: str = "1K,2K,4K"
    """Context lengths, e.g. 1K,2K,8K."""
    windows: int = 8
    """Held-out windows per context."""
    modes: str = ",".join(MODES)
    """Comma-separated: ttt (TTT-E2E), swa (no TTT), full (full attention)."""
    niah: bool = False
    """Also run single-needle-in-a-haystack."""
    niah_depths: str = "0,0.25,0.5,0.75,1"
    """Needle depths (fractions of the context)."""
    niah_trials: int = 4
    """Needles per context and depth."""
    out: str = "runs/eval"
    """Report, JSON and PNG go here."""
    tracking_uri: str = ""
    """Log the report to this MLflow URI."""


def _ints(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().upper()
        scale = 1024 if part.endswith("K") else 1
        out.append(int(float(part.rstrip("K")) * scale))
    return out


def main(argv: list[str] | None = None) -> dict:
    from ttte2e.platform.eval.long_context import load_model, loss_vs_context, niah, write_report

    args = cli(EvaluateOptions, argv, "Evaluate a TTT-E2E model.", "evaluate")
    try:
        if args.tracking_uri:
            from ttte2e.platform.registry.model_registry import check_store_exists, registry_uri

            args.tracking_uri = registry_uri(args.tracking_uri)  # credentials out of the URI
            if args.model.startswith("models:/"):
                check_store_exists(args.tracking_uri)
        model = load_model(args.model, args.tracking_uri or None)
        contexts = _ints(args.contexts)
        modes = tuple(m.strip() for m in args.modes.split(","))
        unknown = [m for m in modes if m not in MODES]
        if unknown:
            raise ValueError(f"unknown modes {unknown}; choose from {MODES}")
        results = loss_vs_context(model, args.data, contexts, args.windows, modes)
        needles = None
        if args.niah:
            from ttte2e.platform.data.manifest import TOKENIZER_FILE, read_manifest
            from ttte2e.platform.data.storage import resolve

            tok = resolve(args.data).join(read_manifest(args.data)["tokenizer"]["file"])
            local = Path(args.out) / TOKENIZER_FILE
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(tok.read_bytes())
            needles = niah(model, str(local), args.data, contexts,
                           [float(d) for d in args.niah_depths.split(",")], args.niah_trials)
    except (ValueError, FileNotFoundError, OSError) as e:
        fail("evaluate", e)
    report = write_report(results, needles, Path(args.out), model.config.window)
    print(report["table"])
    print(f"report: {report['report']}\nplot  : {report['plot']}")
    if args.tracking_uri:
        from ttte2e.platform.registry.tracking import RunLogger, start_run

        run_id = start_run(args.tracking_uri, "ttte2e-eval", f"eval-{Path(args.model).name}",
                           {"model": args.model, "data": args.data, "contexts": args.contexts})
        logger = RunLogger(args.tracking_uri, run_id)
        for context, r in results.items():
            logger.metrics({f"loss_{m}": v["loss"] for m, v in r.items()}, context)
        for f in ("report.md", "loss_vs_context.png", "loss_vs_context.json"):
            logger.artifact(Path(args.out) / f)
        logger.end()
        report["run_id"] = run_id
    return dict(report, results=results, niah=needles)
