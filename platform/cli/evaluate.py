"""Command line of pipelines/evaluate.py."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ttte2e.model.decode import MODES
from ttte2e.platform.cli.parsing import cli, fail
from ttte2e.platform.train.config import CompileSetting, compile_enabled


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
    harness_tasks: str = ""
    """Also score lm-evaluation-harness tasks with each mode (needs the eval extra), e.g.
    niah_single_1,heldout: 'heldout' = rolling loglikelihood of --windows held-out windows of
    each --contexts length, as harness tasks."""
    harness_include_path: str = ""
    """Folder of extra task YAMLs for the harness."""
    harness_metadata: str = ""
    """JSON metadata for the tasks, e.g. {"max_seq_lengths": [4096, 8192]} for RULER."""
    harness_limit: int = 0
    """Documents per harness task (0: all)."""
    compile: CompileSetting = "auto"
    """Compile the inner loop's chunk step (prefill, decode's TTT steps): 'on', 'off', or 'auto'
    = on for CUDA, off on CPU. --compile / --no-compile are short for on / off."""


def _ints(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().upper()
        scale = 1024 if part.endswith("K") else 1
        out.append(int(float(part.rstrip("K")) * scale))
    return out


def main(argv: list[str] | None = None) -> dict:
    from ttte2e.platform.eval.long_context import loss_vs_context, niah, write_report

    args = cli(EvaluateOptions, argv, "Evaluate a TTT-E2E model.", "evaluate")
    try:
        if args.tracking_uri:
            from ttte2e.platform.registry.model_registry import check_store_exists, registry_uri

            args.tracking_uri = registry_uri(args.tracking_uri)  # credentials out of the URI
            if args.model.startswith("models:/"):
                check_store_exists(args.tracking_uri)
        from ttte2e.platform.registry.model_registry import load_model as load_with_tokenizer

        loaded = load_with_tokenizer(args.model, args.tracking_uri or None)
        model = loaded.model
        model.config.compile = compile_enabled(args.compile, next(model.parameters()).device.type)
        contexts = _ints(args.contexts)
        modes = tuple(m.strip() for m in args.modes.split(","))
        unknown = [m for m in modes if m not in MODES]
        if unknown:
            raise ValueError(f"unknown modes {unknown}; choose from {MODES}")
        metadata = _check_harness(args, loaded.tokenizer) if args.harness_tasks else None
        results = loss_vs_context(model, args.data, contexts, args.windows, modes)
        needles = None
        if args.niah:
            from ttte2e.platform.data.manifest import TOKENIZER_FILE, read_manifest
            from ttte2e.platform.data.storage import resolve

            tok = resolve(args.data).join(read_manifest(args.data)["tokenizer"]["file"])
            local = Path(args.out) / TOKENIZER_FILE
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(tok.read_bytes())
            needles = niah(
                model,
                str(local),
                args.data,
                contexts,
                [float(d) for d in args.niah_depths.split(",")],
                args.niah_trials,
            )
        scores = (
            _harness(args, model, loaded.tokenizer, contexts, modes, metadata)
            if args.harness_tasks
            else None
        )
    except (ValueError, FileNotFoundError, OSError) as e:
        fail("evaluate", e)
    report = write_report(results, needles, Path(args.out), model.config.window)
    if scores is not None:
        report["table"] += "\n\n" + _scores_table(scores)
        Path(report["report"]).write_text(report["table"] + "\n")
        (Path(args.out) / "harness.json").write_text(json.dumps(scores, indent=1))
    print(report["table"])
    print(f"report: {report['report']}\nplot  : {report['plot']}")
    if args.tracking_uri:
        from ttte2e.platform.registry.tracking import RunLogger, start_run

        run_id = start_run(
            args.tracking_uri,
            "ttte2e-eval",
            f"eval-{Path(args.model).name}",
            {"model": args.model, "data": args.data, "contexts": args.contexts},
        )
        logger = RunLogger(args.tracking_uri, run_id)
        for context, r in results.items():
            logger.metrics({f"loss_{m}": v["loss"] for m, v in r.items()}, context)
        for f in ("report.md", "loss_vs_context.png", "loss_vs_context.json") + (
            ("harness.json",) if scores is not None else ()
        ):
            logger.artifact(Path(args.out) / f)
        logger.end()
        report["run_id"] = run_id
    return dict(report, results=results, niah=needles, harness=scores)


def _check_harness(args, tokenizer) -> dict | None:
    """The --harness-* options checked before any scoring starts; returns the task metadata."""
    import importlib

    try:
        importlib.import_module("ttte2e.platform.eval.harness")
    except ImportError as e:
        raise ValueError(
            f"--harness-tasks needs lm-evaluation-harness ({e}): pip install -e '.[eval]'"
        ) from e
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer.json: the harness scores text")
    try:
        return json.loads(args.harness_metadata) if args.harness_metadata else None
    except json.JSONDecodeError as e:
        raise ValueError(f"--harness-metadata is not JSON ({e})") from e


def _harness(
    args, model, tokenizer, contexts: list[int], modes: tuple[str, ...], metadata: dict | None
) -> dict:
    """lm-evaluation-harness scores per mode; 'heldout' expands to this run's held-out tasks."""
    from ttte2e.platform.eval.harness import heldout_text_tasks, task_scores

    work = Path(args.out) / "harness"
    tasks, include = [], [args.harness_include_path] if args.harness_include_path else []
    for task in (t.strip() for t in args.harness_tasks.split(",")):
        if task == "heldout":
            tasks += heldout_text_tasks(
                args.data, contexts, args.windows, work / "tasks", tokenizer
            )
            include.append(str(work / "tasks"))
        elif task:
            tasks.append(task)
    return task_scores(
        model, tokenizer, tasks, modes, work, include or None, metadata, args.harness_limit or None
    )


def _scores_table(scores: dict) -> str:
    from ttte2e.platform.eval.long_context import MODE_LABELS

    modes = list(scores)
    rows = sorted(
        {(task, metric) for m in modes for task, ms in scores[m].items() for metric in ms}
    )
    lines = [
        "lm-evaluation-harness (ttte2e backend)",
        "",
        "| task | metric | " + " | ".join(MODE_LABELS[m] for m in modes) + " |",
        "|---|---|" + "---|" * len(modes),
    ]
    for task, metric in rows:
        cells = [scores[m].get(task, {}).get(metric) for m in modes]
        lines.append(
            f"| {task} | {metric} | "
            + " | ".join("n/a" if c is None else f"{c:.4g}" for c in cells)
            + " |"
        )
    return "\n".join(lines)
