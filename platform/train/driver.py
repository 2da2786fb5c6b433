"""The training run's driver: pre-flight, resume choice, MLflow run, then the Trainer in this
process (`local=True`) or on Ray Train.

`fit`: the shared pre-flight (train/config.py), the checkpoint to continue (train/checkpoint.py
owns the format), the MLflow run, then either train/trainer.py's `run_local` (one process, no
Ray) or a TorchTrainer running train/worker.py's `train_loop` with RunConfig(storage,
FailureConfig, CheckpointConfig); at the end a plot, result.json and, when asked, the registered
model. Both write the same checkpoints: a run continues in either.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from ttte2e.model import TTTConfig, count_parameters
from ttte2e.model.config import ARCHITECTURE_FIELDS
from ttte2e.model.model_folder import CONFIG_FILE, config_fields
from ttte2e.platform.data.storage import resolve
from ttte2e.platform.redact import redact, redact_config
from ttte2e.platform.registry.tracking import RunLogger
from ttte2e.platform.train import checkpoint as ckpt
from ttte2e.platform.train.checkpoint import CheckpointError, read_state
from ttte2e.platform.train.config import (
    ConfigError,
    TrainConfig,
    check_group_fits_a_node,
    check_resources,
    preflight,
)
from ttte2e.platform.train.trainer import (
    LocalReporter,
    NonFiniteLoss,
    RunSpec,
    check_local_layout,
    run_local,
)
from ttte2e.platform.train.worker import FATAL_FILE, NON_FINITE_FILE, TuneReporter, train_loop

log = logging.getLogger(__name__)


def check_resume(uri: str, identity: dict, cfg: TrainConfig) -> dict:
    """Refuses to continue a checkpoint of another run geometry (data, batch, sequence length,
    seed, steps, workers, schedule): its data position and schedule would mean something else."""
    state = read_state(uri)
    saved = state.get("identity")
    if saved is None:
        raise ConfigError(
            f"{uri} records no run identity (written by an older version); start a "
            "new run with --init-from it"
        )
    diff = ckpt.resume_differences(saved, identity, cfg.extend_steps)
    if diff:
        fields = ", ".join(f"{k} (checkpoint {a!r}, now {b!r})" for k, (a, b) in diff.items())
        allowed = " (--extend-steps allows a larger --steps)" if "steps" in diff else ""
        raise ConfigError(
            f"cannot resume {uri} with a different run: {fields}; use the "
            f"checkpoint's settings, a new --name, or --init-from it{allowed}"
        )
    return state


def check_init_from(uri: str, model_cfg: TTTConfig) -> None:
    """--init-from is a training checkpoint (model/ inside) or a model folder (config.json +
    safetensors, e.g. pipelines/import_official.py output) of the same architecture."""
    try:
        folder = ckpt.model_folder(uri)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    saved = config_fields(json.loads(folder.join(CONFIG_FILE).read_bytes()), uri)
    diff = {
        k: (saved.get(k), getattr(model_cfg, k))
        for k in ARCHITECTURE_FIELDS
        if saved.get(k) != getattr(model_cfg, k)
    }
    if diff:
        raise ConfigError(
            f"{uri}: its architecture differs from this run's model (field: (saved, run)) {diff}"
        )


# ---- the driver ---------------------------------------------------------------------------------
def plot_run(state: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    hist, evals = state["history"], state["evals"]
    left.plot([h["step"] for h in hist], [h["loss"] for h in hist], label="train meta-loss")
    for key, style, label in (
        ("val_loss", "o-", "held-out, TTT"),
        ("val_loss_no_ttt", "s--", "held-out, same weights, no TTT"),
    ):
        left.plot([e["step"] for e in evals], [e[key] for e in evals], style, label=label)
    left.set_xlabel("step"), left.set_ylabel("loss (nats/token)"), left.legend()
    right.plot(
        [h["step"] for h in hist], [h["inner_grad_norm"] for h in hist], label="inner grad norm"
    )
    right.plot([h["step"] for h in hist], [h["eta"] for h in hist], label="eta")
    right.set_xlabel("step"), right.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _register_final(checkpoint: str, cfg: TrainConfig, uri: str) -> dict:
    """Register the final checkpoint. A failure here ends the job with an error (exit status 2)
    that says the checkpoint is safe and gives the command that registers it later."""
    from ttte2e.platform.registry.model_registry import register

    try:
        out = register(checkpoint, cfg.register_as, uri, alias=cfg.register_alias)
    except Exception as e:  # noqa: BLE001 - whatever failed, the trained model must not be lost
        raise ConfigError(
            f"training finished (checkpoint {checkpoint}) but registering it as "
            f"{cfg.register_as!r} failed ({type(e).__name__}: {redact(str(e))[:300]}); register "
            f"it with: python pipelines/registry.py register {checkpoint} --name "
            f"{cfg.register_as} --alias {cfg.register_alias} --tracking-uri {redact(uri)}"
        ) from None
    log.info(f"[registry] {out['uri']} -> version {out['version']} ({out['weights']} weights)")
    return out


def _raise_fatal(run_dir) -> None:
    """The error no restart could fix, as the driver's error (one line, exit 2)."""
    marker = run_dir.join(FATAL_FILE)
    if marker.exists():
        record = json.loads(marker.read_bytes())
        raise ConfigError(f"training stopped ({record['kind']}): {record['error']}") from None


def _tune_callbacks() -> list:
    from ray.tune.integration.ray_train import TuneReportCallback

    return [TuneReportCallback()]


def _tune_reporter(spec: RunSpec):
    """A Tune trial running the Trainer in its own process: checkpoints to the run folder, every
    report to Tune."""
    return TuneReporter(LocalReporter(spec.run_dir, spec.train.keep_checkpoints))


def _local_device(cfg: TrainConfig) -> bool:
    """Whether a --local run uses this machine's GPU; refuses layouts one process cannot run."""
    import torch

    check_local_layout(cfg)
    if cfg.device == "gpu" and not torch.cuda.is_available():
        raise ConfigError("--device gpu: this machine has no CUDA device")
    return cfg.device == "gpu" or (cfg.device == "auto" and torch.cuda.is_available())


def _launch_ray(spec: RunSpec, cfg: TrainConfig, report_to_tune: bool) -> None:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ttte2e.platform.cluster.ray_runtime import forwarded_env

    storage = resolve(cfg.storage)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=dict(spec=spec, env=forwarded_env()),
        scaling_config=ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=spec.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
            placement_strategy=cfg.placement,
        ),
        run_config=RunConfig(
            name=spec.run_name,
            storage_path=storage.path,
            storage_filesystem=storage.fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            callbacks=_tune_callbacks() if report_to_tune else None,
        ),
    )
    trainer.fit()


def fit(
    cfg: TrainConfig,
    parent_run_id: str | None = None,
    report_to_tune: bool = False,
    local: bool = False,
) -> dict:
    """Run (or resume) a training run; returns where its results are and its metric history.
    local: the Trainer in this process, without Ray Train (one worker). parent_run_id: the
    MLflow run this run's run is a child of (a sweep). report_to_tune: send the reports to the
    Ray Tune trial this runs in (platform/tune/sweep.py): the workers' (Ray Train), or this
    process's own (local)."""
    from ttte2e.platform.registry import tracking

    checked = preflight(cfg)
    cfg, model_cfg, geometry, facts = checked.cfg, checked.model, checked.geometry, checked.data
    uri = checked.tracking_uri
    name = cfg.run_name()
    storage = resolve(cfg.storage)
    identity = ckpt.run_identity(cfg.to_dict(), dataclasses.asdict(geometry), facts["dataset_key"])
    try:
        source = ckpt.resume_source(cfg.storage, name, cfg.resume_from)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    if source:
        resumed = check_resume(source, identity, cfg)
        log.info(f"[resume] {redact(source)} (step {resumed['step']} of {geometry.steps})")
    if cfg.init_from:
        check_init_from(cfg.init_from, model_cfg)
    if local:
        use_gpu = _local_device(cfg)
    else:
        from ttte2e.platform.cluster.ray_runtime import ensure_ray

        ensure_ray()
        import ray

        use_gpu = check_resources(cfg, ray.cluster_resources())
        check_group_fits_a_node(
            cfg, [n["Resources"] for n in ray.nodes() if n.get("Alive")], use_gpu
        )
    where = (
        f"in this process ({'a Tune trial' if report_to_tune else '--local'})"
        if local
        else f"{cfg.workers} {'GPU' if use_gpu else 'CPU'} workers"
    )
    log.info(
        f"[plan] {cfg.preset}: {count_parameters(model_cfg) / 1e6:.1f}M parameters, "
        f"T={model_cfg.seq_len} k={model_cfg.window} b={model_cfg.chunk_size}, "
        f"{model_cfg.n_ttt_blocks}/{model_cfg.n_layers} TTT blocks; {geometry.steps} steps x "
        f"{geometry.tokens_per_step:,} tokens = {geometry.steps * geometry.tokens_per_step:,} "
        f"tokens ({facts['epochs']:.2f} epochs of {redact(cfg.data)}: {facts['train_windows']} "
        f"windows per epoch in a shuffled order, the last {facts['skipped_per_epoch']} of each "
        f"epoch's order not read, fewer than one batch); {where} x micro-batch "
        f"{geometry.micro_batch} x accumulation {geometry.accumulation}; ZeRO-{cfg.zero_stage}"
        + (
            f" over {geometry.data_parallel} data-parallel ranks x tensor-parallel "
            f"{geometry.tensor_parallel}"
            if geometry.tensor_parallel > 1
            else ""
        )
        + (f"; offload {cfg.offload}" if cfg.offload != "none" else "")
    )

    run_id = None
    if uri:
        artifacts = tracking.artifact_location(uri)  # a server keeps its own artifact store
        params = {
            **{f"model.{k}": v for k, v in model_cfg.to_dict().items()},
            **{f"train.{k}": v for k, v in cfg.to_dict().items()},
            "model.parameters": count_parameters(model_cfg),
            "train.run_name": name,
            **{f"geometry.{k}": v for k, v in dataclasses.asdict(geometry).items()},
        }
        try:
            run_id = tracking.start_run(uri, cfg.experiment, name, params, artifacts, parent_run_id)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(
                f"MLflow tracking at {redact(uri)} is unusable ({type(e).__name__}: "
                f"{redact(str(e))[:300]}); fix it or pass --tracking-uri off"
            ) from None
        log.info(f"[tracking] MLflow run {run_id} ({redact(uri)})")

    spec = RunSpec(
        train=TrainConfig.from_dict(redact_config(cfg.to_dict())),
        model=model_cfg,
        run_name=name,
        identity=identity,
        tracking_uri=uri,
        run_id=run_id,
        use_gpu=use_gpu,
    )
    logger = RunLogger(uri, run_id)
    run_dir = storage.join(name)
    for stale in (FATAL_FILE, NON_FINITE_FILE):  # from an earlier invocation of this run
        if run_dir.join(stale).exists():
            run_dir.join(stale).delete()
    try:
        if local:
            try:
                run_local(spec, _tune_reporter(spec) if report_to_tune else None)
            except NonFiniteLoss as e:  # one process has no restart to try: the run ends
                raise ConfigError(f"training stopped: {e}") from None
        else:
            _launch_ray(spec, cfg, report_to_tune)
    except BaseException:
        logger.end("FAILED")
        _raise_fatal(run_dir)
        raise
    if run_dir.join(FATAL_FILE).exists():
        logger.end("FAILED")
        _raise_fatal(run_dir)
    # the run's newest complete checkpoint, by this format's own marker: Ray Train's record of
    # its checkpoints can lag behind (a process stopped right after the last save)
    final = ckpt.latest_complete(run_dir, checksums=False)
    if final is None:
        raise ConfigError(
            f"training of {name} ended without a complete checkpoint in {redact(run_dir.uri)}"
        )
    ckpt_uri = final.uri
    state = read_state(ckpt_uri)

    def write_outputs(folder: Path) -> list[Path]:
        (folder / "metrics.json").write_text(
            json.dumps(dict(history=state["history"], evals=state["evals"]), indent=1)
        )
        return [plot_run(state, folder / "curves.png"), folder / "metrics.json"]

    logger.tag("checkpoint_uri", ckpt_uri)
    for f in run_dir.write_files(write_outputs):
        logger.artifact(f)
    finished = state["step"] >= geometry.steps
    if finished:
        logger.end()
    else:
        log.info(
            f"[paused] at step {state['step']} of {geometry.steps} (--stop-after); run the same "
            f"command again (--name {name}) to continue"
        )
    summary = dict(
        checkpoint=ckpt_uri,
        run_name=name,
        finished=finished,
        step=state["step"],
        run_id=run_id,
        tracking_uri=redact(uri) if uri else None,
        plot=f"{run_dir.uri}/curves.png",
        final_eval=state["evals"][-1:] or None,
    )
    run_dir.join("result.json").write_bytes(json.dumps(summary, indent=1).encode())
    registered = None
    if finished and cfg.register_as and uri:
        registered = _register_final(ckpt_uri, cfg, uri)
        summary["registered"] = registered
        run_dir.join("result.json").write_bytes(json.dumps(summary, indent=1).encode())
    final = state["evals"][-1] if state["evals"] else {}
    log.info(
        f"[done] {state['step']} steps; final train loss {state['history'][-1]['loss']:.4f}; "
        f"held-out {final.get('val_loss', float('nan')):.4f} (no TTT "
        f"{final.get('val_loss_no_ttt', float('nan')):.4f})"
    )
    log.info(f"  checkpoint : {ckpt_uri}  (model: TTTModel.from_pretrained('<checkpoint>/model'))")
    log.info(f"  plots      : {run_dir.uri}/curves.png")
    if run_id:
        log.info(f"  MLflow run : {run_id} in {redact(uri)}")
    if registered:
        log.info(
            f"  registered : {registered['uri']} (version {registered['version']}, weights "
            f"{registered['weights']})"
        )
    return dict(summary, tracking_uri=uri, history=state["history"], evals=state["evals"])
