"""Ablations with Ray Tune: the paper's Figure 4 (window size k, TTT mini-batch b, number of TTT
blocks) on our hardware, every trial a real training run of the platform's trainer.

The grids scale the paper's 760M grids (T = k = 8K, b = 1K, 24 blocks) to the base config:
k in {T/8, T/4, T/2, T}; b in {k/8, k/4, k/2, k}; TTT blocks {1, 3, 6, 12} of 24 as fractions of
the blocks (every count from 1 to L for models of <= 8 blocks). The SWA baseline is the same
architecture trained with inner_lr 0 (the prime MLPs become static MLPs: equal parameter count);
the window grid trains it at every k, the other two once at the base k (it depends on neither).
Combinations the model refuses (b > k, T % b != 0, ...) are listed and dropped before launch.

Each trial is a Tune function trainable running train/driver.fit. A one-worker trial runs the
Trainer in the trial's own process (Ray's pattern for small trials: `tune.with_resources` gives
the trial the run's CPUs or GPU; its reports go to Tune through worker.TuneReporter), with no
worker group to start. A trial of several workers starts a TorchTrainer (Ray Train V2 refuses
Tuner(TorchTrainer)) whose rank-0 reports reach Tune through TuneReportCallback. Either way every
report carries the latest held-out metrics, so an ASHA scheduler can stop weak trials early, and
checkpoints are the same files in the same run folders. Trial runs are named after their config,
so an interrupted sweep resumes (Tuner.restore, same --name) with every unfinished trial
continuing from its last checkpoint.

MLflow: one parent run per sweep, a child run per trial (fit's run); the table and the plots
are written to the sweep's storage and logged to the parent run.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from ttte2e.model import TTTConfig
from ttte2e.platform.cluster.ray_runtime import forwarded_env
from ttte2e.platform.data.storage import resolve
from ttte2e.platform.redact import redact
from ttte2e.platform.train.config import (
    ConfigError,
    Preflight,
    TrainConfig,
    check_parallel_layout,
    cpus_needed,
)

log = logging.getLogger(__name__)

KNOBS = ("window", "chunk", "layers")
KNOB_LABELS = {
    "window": "sliding-window size k (tokens)",
    "chunk": "TTT mini-batch size b (tokens)",
    "layers": "blocks with TTT",
}
TABLE_FIELDS = (
    "knob",
    "value",
    "method",
    "window",
    "chunk_size",
    "n_ttt_blocks",
    "status",
    "step",
    "val_loss",
    "val_loss_beyond_window",
    "val_loss_no_ttt",
    "run",
)
METRICS = ("val_loss", "val_loss_beyond_window", "val_loss_no_ttt")


@dataclass(frozen=True)
class Trial:
    """One training run of a sweep: TTT-E2E or its SWA baseline at one (k, b, TTT blocks)."""

    method: str  # "ttt" or "swa"
    window: int
    chunk_size: int
    n_ttt_blocks: int

    @property
    def name(self) -> str:
        if self.method == "swa":
            return f"swa-k{self.window}"
        return f"ttt-k{self.window}-b{self.chunk_size}-l{self.n_ttt_blocks}"

    def model_overrides(self) -> dict:
        out = dict(window=self.window, chunk_size=self.chunk_size, n_ttt_blocks=self.n_ttt_blocks)
        if self.method == "swa":
            out["inner_lr"] = 0.0
        return out

    def value(self, knob: str) -> int:
        return {"window": self.window, "chunk": self.chunk_size, "layers": self.n_ttt_blocks}[knob]


def paper_values(model: TTTConfig, knob: str) -> list[int]:
    """The paper's grid for `knob`, scaled to the base model."""
    if knob == "window":
        return [model.seq_len // d for d in (8, 4, 2, 1)]
    if knob == "chunk":
        return [max(1, model.window // d) for d in (8, 4, 2, 1)]
    if knob == "layers":
        n = model.n_layers
        if n <= 8:
            return list(range(1, n + 1))
        return sorted({max(1, round(n * f)) for f in (1 / 24, 3 / 24, 6 / 24, 12 / 24)})
    raise ConfigError(f"unknown knob {knob!r}; choose from {KNOBS}")


@dataclass
class SweepPlan:
    trials: list[Trial]  # distinct, in launch order
    by_knob: dict[str, list[Trial]]  # the trials each knob's table and plot are made of
    rejected: list[tuple[str, str]]  # (what, why)


def plan_sweep(
    base: TrainConfig,
    knobs: list[str],
    values: dict[str, list[int]] | None = None,
    baseline: bool = True,
) -> SweepPlan:
    """The trials of a sweep over `knobs` (paper grids unless `values` gives a knob's values);
    combinations the model refuses are rejected here, with the reason. Raises when none is left."""
    model = base.model_config()
    values = values or {}
    for knob in knobs:
        if knob not in KNOBS:
            raise ConfigError(f"unknown grid {knob!r}; choose from {KNOBS} or all")
    by_knob: dict[str, list[Trial]] = {}
    rejected: list[tuple[str, str]] = []
    ordered: dict[str, Trial] = {}
    k0, b0, l0 = model.window, model.chunk_size, model.n_ttt_blocks
    for knob in knobs:
        grid = values.get(knob) or paper_values(model, knob)
        wanted = []
        for v in grid:
            k, b, n = {"window": (v, b0, l0), "chunk": (k0, v, l0), "layers": (k0, b0, v)}[knob]
            wanted.append(Trial("ttt", k, b, n))
            if baseline and (knob == "window" or not any(t.method == "swa" for t in wanted)):
                wanted.append(Trial("swa", k, b0 if knob != "window" else b, l0))
        valid = []
        for trial in wanted:
            why = _refusal(base, trial)
            if why:
                rejected.append((f"{knob}={trial.value(knob)} ({trial.name})", why))
            else:
                valid.append(trial)
        if not any(t.method == "ttt" for t in valid):
            continue  # a baseline alone is no ablation
        by_knob[knob] = valid
        for trial in valid:
            ordered.setdefault(trial.name, trial)
    if not ordered:
        raise ConfigError(
            "no valid trial in this sweep: " + "; ".join(f"{what}: {why}" for what, why in rejected)
        )
    return SweepPlan(list(ordered.values()), by_knob, rejected)


def _refusal(base: TrainConfig, trial: Trial) -> str | None:
    if trial.chunk_size > trial.window:
        return f"b={trial.chunk_size} > k={trial.window} (a TTT mini-batch must fit the window)"
    cfg = dataclasses.replace(
        base, model_overrides={**base.model_overrides, **trial.model_overrides()}
    )
    try:
        model = cfg.model_config()
        check_parallel_layout(cfg, model)  # a trial's sizes must split over --tensor-parallel
    except (ConfigError, ValueError) as e:
        return str(e)
    if model.seq_len % model.chunk_size:
        return f"T={model.seq_len} is not a multiple of b={model.chunk_size}"
    return None


# ---- the trial ----------------------------------------------------------------------------------
def trial_config(base: TrainConfig, trial: Trial, sweep: dict) -> TrainConfig:
    return dataclasses.replace(
        base,
        name=f"{sweep['name']}-{trial.name}",
        storage=sweep["trial_storage"],
        model_overrides={**base.model_overrides, **trial.model_overrides()},
        register_as="",
        resume_from="",
        stop_after=0,
    )


def runs_in_trial(cfg: TrainConfig, in_trial: bool = True) -> bool:
    """Whether a trial runs the Trainer in its own process (one worker) rather than starting a
    TorchTrainer (a worker group)."""
    return in_trial and cfg.workers == 1


def trial_resources(cfg: TrainConfig, cluster: dict, in_trial: bool = True) -> dict:
    """What Tune reserves for one trial: a trial that trains in its own process reserves what
    its run needs (cpus_needed: its Ray Data readers' CPUs too, as it reads its data itself, so
    as many trials run at once as with worker groups), and a GPU when trials use GPUs; one that
    starts a TorchTrainer reserves next to nothing, its workers reserve their own."""
    if not runs_in_trial(cfg, in_trial):
        return {"CPU": 0.01}
    resources = {"CPU": cpus_needed(cfg)}
    if cfg.device == "gpu" or (cfg.device == "auto" and cluster.get("GPU", 0) >= 1):
        resources["GPU"] = 1
    return resources


def run_trial(config: dict, base: dict, sweep: dict) -> None:
    """The Tune function trainable: one training run of the sweep, in this process (one worker)
    or as a TorchTrainer."""
    from ttte2e.platform.logs import setup_logging
    from ttte2e.platform.train.driver import fit

    os.environ.update(sweep["env"])  # storage / MLflow endpoints of the driver, never logged
    trial = Trial(**config["trial"])
    cfg = trial_config(TrainConfig.from_dict(base), trial, sweep)
    setup_logging(prefix=f"[{trial.name}] ")  # a trial's lines in the sweep's log
    parent = sweep.get("parent_run_id")
    if runs_in_trial(cfg, sweep.get("in_trial", True)):
        fit_with_restarts(cfg, lambda: fit(cfg, parent, report_to_tune=True, local=True))
    else:
        fit(cfg, parent_run_id=parent, report_to_tune=True)


def fit_with_restarts(cfg: TrainConfig, run):
    """run() (a fit in this process), run again after a failure, up to cfg.max_failures times
    (-1: no limit), as Ray Train restarts a worker group: each time the run continues from its
    last complete checkpoint. Errors no restart can fix (a bad setting, a damaged checkpoint or
    dataset, a non-finite loss) end the trial at once."""
    from ttte2e.platform.train.worker import unfixable

    for restarts in itertools.count():
        try:
            return run()
        except Exception as e:  # noqa: BLE001 - re-raised unless a restart may fix it
            if unfixable(e) is not None or 0 <= cfg.max_failures <= restarts:
                raise
            limit = cfg.max_failures if cfg.max_failures >= 0 else "no limit"
            log.warning(
                f"[train] failed ({type(e).__name__}: {redact(str(e))[:300]}); restart "
                f"{restarts + 1} of {limit} from the last checkpoint"
            )


# ---- the sweep ----------------------------------------------------------------------------------
def sweep_base(base: TrainConfig) -> TrainConfig:
    """Every report of a trial must carry held-out metrics (Tune compares them): evaluation at
    least 8 times per run, and checkpoints only at evaluation steps."""
    from ttte2e.platform.train.config import batch_geometry

    steps = batch_geometry(base, base.model_config()).steps
    every = base.eval_every if 0 < base.eval_every <= steps else max(1, steps // 8)
    checkpoint = every * max(1, math.ceil(base.checkpoint_every / every))
    return dataclasses.replace(base, eval_every=every, checkpoint_every=checkpoint)


def max_concurrent(base: TrainConfig, resources: dict) -> int:
    """Trials that fit the cluster at once (CPUs, and GPUs when trials use them)."""
    by_cpu = int(resources.get("CPU", 0) // cpus_needed(base)) if cpus_needed(base) else 1
    gpus = resources.get("GPU", 0)
    if base.device == "gpu" or (base.device == "auto" and gpus >= base.workers):
        by_cpu = min(by_cpu, int(gpus // base.workers))
    return max(1, by_cpu)


def run_sweep(
    base: TrainConfig,
    knobs: list[str],
    values: dict[str, list[int]] | None = None,
    baseline: bool = True,
    scheduler: str = "none",
    grace_steps: int = 0,
    concurrent: int = 0,
    in_trial: bool = True,
) -> dict:
    """Run (or resume: same base.name) a sweep; returns where its table and plots are.
    in_trial=False: one-worker trials start a TorchTrainer too (pipelines/bench/bench_sweep.py
    compares the two).

    Outside a cluster (no RAY_ADDRESS) the sweep starts a private Ray head with a dashboard and
    stops it at the end: when a scheduler stops a trial, its TorchTrainer controller dies with
    it, and Ray Train's placement-group cleaner, which frees the trial's workers, finds the
    cluster through RAY_ADDRESS and the dashboard (without it the freed CPUs stay reserved and
    later trials wait forever)."""
    import ray

    from ttte2e.platform.train.config import preflight

    # everything that can be refused is refused before a head starts
    if scheduler not in ("none", "asha"):
        raise ConfigError(f"scheduler {scheduler!r}: choose none or asha")
    base = sweep_base(base)
    plan = plan_sweep(base, knobs, values, baseline)
    for what, why in plan.rejected:
        log.info(f"[sweep] rejected {what}: {why}")
    # pre-flight once, for the base config: every trial shares data, storage, MLflow and
    # resources (each trial's model was checked by plan_sweep)
    checked = preflight(base)
    args = (checked, plan, knobs, baseline, scheduler, grace_steps, concurrent, in_trial)
    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        return _run_sweep(*args)
    from ttte2e.platform.cluster.local_head import LocalRayCluster

    with LocalRayCluster() as cluster:
        os.environ["RAY_ADDRESS"] = cluster.gcs_address
        try:
            return _run_sweep(*args)
        finally:
            ray.shutdown()
            os.environ.pop("RAY_ADDRESS", None)


def _run_sweep(
    checked: Preflight,
    plan: SweepPlan,
    knobs: list[str],
    baseline: bool,
    scheduler: str,
    grace_steps: int,
    concurrent: int,
    in_trial: bool,
) -> dict:
    from ray import tune

    from ttte2e.platform.cluster.ray_runtime import ensure_ray
    from ttte2e.platform.registry import tracking
    from ttte2e.platform.train.config import check_resources

    base, model, geometry, uri = checked.cfg, checked.model, checked.geometry, checked.tracking_uri
    ensure_ray()
    import ray

    check_resources(base, ray.cluster_resources())
    name = base.name or time.strftime(f"ablate-{base.preset.lower()}-%Y%m%d-%H%M%S")
    storage = resolve(base.storage)
    sweep_dir = storage.join(name)
    n_concurrent = concurrent or max_concurrent(base, ray.cluster_resources())
    log.info(
        f"[sweep] {name}: {len(plan.trials)} trials ({', '.join(t.name for t in plan.trials)}), "
        f"{geometry.steps} steps each, {n_concurrent} at a time; scheduler {scheduler}; "
        + (
            "each trial trains in its own process"
            if runs_in_trial(base, in_trial)
            else f"each trial starts a TorchTrainer of {base.workers} workers"
        )
    )

    parent = None
    if uri:
        artifacts = tracking.artifact_location(uri)  # a server keeps its own artifact store
        params = {
            **{f"train.{k}": v for k, v in base.to_dict().items()},
            "sweep.knobs": ",".join(knobs),
            "sweep.trials": len(plan.trials),
            "sweep.scheduler": scheduler,
            "sweep.baseline": baseline,
            **{
                f"sweep.values.{k}": ",".join(str(t.value(k)) for t in v)
                for k, v in plan.by_knob.items()
            },
        }
        parent = tracking.start_run(uri, base.experiment, name, params, artifacts)
        log.info(
            f"[tracking] MLflow sweep run {parent} ({tracking.redact(uri)}); a child run per trial"
        )

    # trials log to the sweep's store (their default would be a second sqlite file per folder)
    base = dataclasses.replace(base, tracking_uri=uri or "off")
    sweep = dict(
        name=name,
        trial_storage=storage.join(name, "runs").uri,
        parent_run_id=parent,
        env=forwarded_env(),
        in_trial=in_trial,
    )
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base.to_dict(), sweep=sweep),
        trial_resources(base, ray.cluster_resources(), in_trial),
    )
    asha = None
    if scheduler == "asha":
        # stop_last_trials=False: a trial that reaches the last step ends by itself (with its
        # final checkpoint), it is not stopped at its last report
        asha = RecordingASHA(
            sweep_dir.join("stopped.json").uri,
            time_attr="step",
            max_t=geometry.steps,
            reduction_factor=2,
            grace_period=grace_steps or 2 * base.eval_every,
            stop_last_trials=False,
        )
    experiment = storage.join(name, "tune")
    planned = sweep_dir.join("sweep.json")
    if tune.Tuner.can_restore(experiment.path, storage_filesystem=storage.fs):
        before = json.loads(planned.read_bytes()) if planned.exists() else None
        if before is not None and before["trials"] != [t.name for t in plan.trials]:
            raise ConfigError(
                f"sweep {name!r} exists with trials {before['trials']}; this command "
                f"asks for {[t.name for t in plan.trials]}: rerun it unchanged to "
                "resume, or pick a new --name"
            )
        log.info(
            f"[sweep] resuming {experiment.uri}: finished trials are kept, the others continue "
            "from their last checkpoint"
        )
        tuner = tune.Tuner.restore(
            experiment.path,
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=storage.fs,
        )
    else:
        planned.write_bytes(
            json.dumps(
                dict(trials=[t.name for t in plan.trials], knobs=knobs, base=base.to_dict()),
                indent=1,
            ).encode()
        )
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search([dataclasses.asdict(t) for t in plan.trials])},
            tune_config=tune.TuneConfig(
                metric="val_loss",
                mode="min",
                scheduler=asha,
                max_concurrent_trials=n_concurrent,
                trial_name_creator=_trial_name,
                trial_dirname_creator=_trial_name,
            ),
            run_config=tune.RunConfig(
                name="tune",
                storage_path=storage.join(name).path,
                storage_filesystem=storage.fs,
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
    logger = tracking.RunLogger(uri, parent)
    try:
        grid = tuner.fit()
    except BaseException:
        logger.end("FAILED")
        raise
    stopped = (
        json.loads(sweep_dir.join("stopped.json").read_bytes())
        if sweep_dir.join("stopped.json").exists()
        else {}
    )
    rows = table_rows(plan, grid, geometry.steps, name, stopped)
    # Ctrl-C / SIGINT: Tune saves the sweep and returns; what is neither done, failed nor stopped
    # by the scheduler is unfinished
    interrupted = any(r["status"].startswith(("unfinished", "not run")) for r in rows)
    files = sweep_dir.write_files(lambda folder: write_results(rows, plan, folder, model))
    for f in files:
        logger.artifact(f)
    best = min(
        (r for r in rows if r["method"] == "ttt" and r["val_loss"] is not None),
        key=lambda r: r["val_loss"],
        default=None,
    )
    if best:
        logger.metrics({"best_val_loss": best["val_loss"]}, 0)
        logger.tag("best_trial", best["run"])
    if uri:
        for r in rows:
            if r["status"].startswith("stopped early"):
                logger._do(
                    "close stopped trial runs",
                    lambda r=r: tracking.end_named_run(
                        uri, base.experiment, r["run"], "KILLED", r["status"]
                    ),
                )
    errors = [r for r in rows if r["status"].startswith("error")]
    logger.end("KILLED" if interrupted else "FAILED" if errors else "FINISHED")
    log.info(next(f for f in files if f.name == "ablation.md").read_text())
    out = dict(
        name=name,
        table=f"{sweep_dir.uri}/ablation.csv",
        markdown=f"{sweep_dir.uri}/ablation.md",
        plots=[f"{sweep_dir.uri}/{f.name}" for f in files if f.suffix == ".png"],
        rows=rows,
        run_id=parent,
        tracking_uri=tracking.redact(uri) if uri else None,
        rejected=plan.rejected,
        errors=len(errors),
        interrupted=interrupted,
    )
    log.info(f"[sweep] table : {out['table']} (+ .md)")
    for p in out["plots"]:
        log.info(f"[sweep] plot  : {p}")
    if parent:
        log.info(f"[sweep] MLflow: run {parent} in {out['tracking_uri']}")
    if interrupted:
        unfinished = sum(r["status"].startswith(("unfinished", "not run")) for r in rows)
        log.info(
            f"[sweep] INTERRUPTED with {unfinished} table rows unfinished; rerun the same command "
            f"(--name {name}) to resume"
        )
    else:
        log.info(
            f"[sweep] done: {len(plan.trials)} trials, {len(stopped)} stopped early by ASHA, "
            f"{len(errors)} failed"
        )
    return out


class RecordingASHA(ASHAScheduler):
    """ASHA that also writes which trials it stopped (and at which step) to a JSON file: a trial
    it stops and one an interruption cut short look the same in Tune's results."""

    def __init__(self, record_uri: str, **options):
        super().__init__(**options)
        self.record_uri = record_uri

    def on_trial_result(self, tune_controller, trial, result):
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP:
            record = resolve(self.record_uri)
            done = json.loads(record.read_bytes()) if record.exists() else {}
            done[_trial_name(trial)] = result.get("step")
            record.write_bytes(json.dumps(done, indent=1).encode())
        return action


def _trial_name(trial) -> str:
    return Trial(**trial.config["trial"]).name


# ---- results ------------------------------------------------------------------------------------
def table_rows(
    plan: SweepPlan, grid, total_steps: int, sweep_name: str, stopped: dict | None = None
) -> list[dict]:
    stopped = stopped or {}
    by_name = {}
    for result in grid:
        trial = Trial(**result.config["trial"])
        metrics = result.metrics or {}
        step = metrics.get("step")
        if result.error is not None:
            status = f"error: {type(result.error).__name__}"
        elif step is None:
            status = "no result"
        elif step < total_steps:
            status = (
                f"stopped early (ASHA) at step {step}"
                if trial.name in stopped
                else f"unfinished (sweep interrupted) at step {step}"
            )
        else:
            status = "complete"
        by_name[trial.name] = dict(status=status, step=step, **{m: metrics.get(m) for m in METRICS})
    rows = []
    for knob, trials in plan.by_knob.items():
        for trial in trials:
            facts = by_name.get(
                trial.name, dict(status="not run", step=None, **{m: None for m in METRICS})
            )
            rows.append(
                dict(
                    knob=knob,
                    value=trial.value(knob),
                    method=trial.method,
                    window=trial.window,
                    chunk_size=trial.chunk_size,
                    n_ttt_blocks=trial.n_ttt_blocks,
                    run=f"{sweep_name}-{trial.name}",
                    **facts,
                )
            )
    return rows


def _fmt(v) -> str:
    return "n/a" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def write_results(rows: list[dict], plan: SweepPlan, out: Path, model: TTTConfig) -> list[Path]:
    """ablation.csv (every row), ablation.md (a table per knob) and ablation_<knob>.png."""
    csv_path = out / "ablation.csv"
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=TABLE_FIELDS)
    writer.writeheader()
    writer.writerows({k: r.get(k) for k in TABLE_FIELDS} for r in rows)
    csv_path.write_text(buffer.getvalue())
    lines = []
    for knob in plan.by_knob:
        lines += [
            f"### {KNOB_LABELS[knob]}",
            "",
            "| value | method | k | b | TTT blocks | val loss | beyond window | "
            "no-TTT eval | status |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in (r for r in rows if r["knob"] == knob):
            method = "TTT-E2E" if r["method"] == "ttt" else "SWA"
            lines.append(
                f"| {r['value']} | {method} | {r['window']} | {r['chunk_size']} | "
                f"{r['n_ttt_blocks']} | {_fmt(r['val_loss'])} | "
                f"{_fmt(r['val_loss_beyond_window'])} | {_fmt(r['val_loss_no_ttt'])} | "
                f"{r['status']} |"
            )
        lines.append("")
    if plan.rejected:
        lines += ["Rejected before launch:", ""] + [f"- {w}: {y}" for w, y in plan.rejected] + [""]
    md_path = out / "ablation.md"
    md_path.write_text("\n".join(lines))
    files = [csv_path, md_path]
    for knob in plan.by_knob:
        files.append(plot_knob(rows, knob, out / f"ablation_{knob}.png", model))
    (out / "ablation.json").write_text(json.dumps(rows, indent=1))
    return files + [out / "ablation.json"]


def plot_knob(rows: list[dict], knob: str, path: Path, model: TTTConfig) -> Path:
    """Validation loss (left) and loss beyond the first window (right) versus the knob, TTT-E2E
    against SWA: a line over k for the window grid, its one value as a level line otherwise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [r for r in rows if r["knob"] == knob]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, title in (
        (axes[0], "val_loss", "held-out loss"),
        (axes[1], "val_loss_beyond_window", "loss beyond the first window"),
    ):
        for method, style, label in (("ttt", "o-", "TTT-E2E"), ("swa", "s--", "SWA")):
            pts = sorted(
                (r["value"], r[metric])
                for r in mine
                if r["method"] == method and r[metric] is not None
            )
            if not pts:
                continue
            if method == "swa" and knob != "window":
                ax.axhline(
                    pts[0][1], linestyle="--", color="tab:orange", label=f"SWA (k={model.window})"
                )
            else:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
        if knob in ("window", "chunk"):
            ax.set_xscale("log", base=2)
        ticks = sorted({r["value"] for r in mine})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel(KNOB_LABELS[knob]), ax.set_ylabel("loss (nats/token)"), ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
