"""Meta-training on Ray Train: each worker runs the TTT-E2E objective in a DeepSpeed ZeRO engine.

Driver (`fit`): pre-flight checks (train_config), the MLflow run, a TorchTrainer with
RunConfig(storage, FailureConfig, CheckpointConfig); at the end a plot and the final checkpoint's
URI. Worker (`train_loop`): model -> DeepSpeed engine (ZeRO 0/1/2, AdamW 0.9/0.95, clip, warm-up +
cosine), its own input stream from the checkpointed data position, gradient accumulation, the
held-out evaluation, metrics, checkpoints via ray.train.report.

The checkpoint format (what a folder holds, COMPLETE.json written last, which checkpoint a run
resumes from, what a resumed run must share with it) is platform/checkpoint.py's. Restoring a
complete checkpoint makes a resumed run continue exactly where the interrupted one stood.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from ttte2e.model import TTTConfig, TTTModel, count_parameters, estimate_flops, inner_lr_at
from ttte2e.model.config import ARCHITECTURE_FIELDS
from ttte2e.platform import checkpoint as ckpt
from ttte2e.platform.checkpoint import DS_TAG, STATE_FILE, CheckpointError, read_state
from ttte2e.platform.data import StreamPosition, StreamSpec, WindowReader, worker_stream
from ttte2e.platform.prepare import DataError
from ttte2e.platform.serving import TOKENIZER_FILE
from ttte2e.platform.storage import STORAGE_ENV_VARS, resolve
from ttte2e.platform.tracking import RunLogger, redact
from ttte2e.platform.train_config import (BatchGeometry, ConfigError, TrainConfig, batch_geometry,
                                          check_data, check_options, check_resources,
                                          check_storage)

# Dense bf16 peak per device (TFLOP/s), for MFU.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0,
                   "L4": 121.0}


def lr_factor(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    """Linear warm-up to 1 over `warmup` steps, then cosine to floor/peak at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return (floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))) / peak


def warmup_steps(cfg: TrainConfig, steps: int) -> int:
    return max(1, round(cfg.warmup_fraction * steps))


def eta_at(cfg: TrainConfig, model: TTTConfig, step: int, steps: int) -> float:
    if not cfg.eta_ramp:
        return model.inner_lr
    return inner_lr_at(step, warmup_steps(cfg, steps), model.inner_lr)


class MetaObjective(torch.nn.Module):
    """The module DeepSpeed wraps: forward = the meta-loss of a batch (optionally under bf16
    autocast; the inner loop keeps fast weights, inner grads and the clip norm in fp32)."""

    def __init__(self, model: TTTModel, autocast_dtype: torch.dtype | None = None):
        super().__init__()
        self.model = model
        self.autocast_dtype = autocast_dtype

    def forward(self, tokens: torch.Tensor, eta: float):
        with self.autocast(tokens.device):
            out = self.model.meta_loss(tokens, eta=eta)
        return out.loss, out.chunk_loss.detach(), out.inner_grad_norm

    def autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)


def deepspeed_config(cfg: TrainConfig, geometry: BatchGeometry) -> dict:
    return {
        "train_micro_batch_size_per_gpu": geometry.micro_batch,
        "gradient_accumulation_steps": geometry.accumulation,
        "gradient_clipping": cfg.grad_clip,
        # torch's AdamW (DeepSpeed's own maps to FusedAdam: a JIT build, and no CPU kernel)
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.lr, "betas": [0.9, 0.95], "eps": 1e-8,
                                                  "weight_decay": cfg.weight_decay,
                                                  "torch_adam": True}},
        "zero_optimization": {"stage": cfg.zero_stage},
        # bf16 is autocast in MetaObjective: parameters, master weights and grads stay fp32
        "bf16": {"enabled": False},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


# ---- evaluation ---------------------------------------------------------------------------------
def score(model: TTTModel, windows: torch.Tensor, eta: float, autocast) -> dict:
    """Sums for the held-out metrics: NLL and target counts overall and beyond the first window
    (positions whose context is longer than k: TTT is what carries it there)."""
    cfg = model.config
    mask = (windows[:, 1:] != cfg.bos_token_id).float()
    beyond = torch.zeros_like(mask)
    beyond[:, cfg.window:] = 1
    with torch.no_grad(), autocast:
        nll = model.meta_loss(windows, eta=eta).token_nll.float()
    return dict(nll=(nll * mask).sum().item(), count=mask.sum().item(),
                nll_beyond=(nll * mask * beyond).sum().item(),
                count_beyond=(mask * beyond).sum().item())


def held_out_metrics(model: TTTModel, windows: torch.Tensor, eta: float, autocast,
                     reduce=lambda v: v) -> dict:
    """val_loss / val_loss_beyond_window with TTT, and the same weights without it (eta = 0)."""
    out = {}
    for tag, e in (("", eta), ("_no_ttt", 0.0)):
        if windows.shape[0]:
            s = score(model, windows, e, autocast)
        else:
            s = dict(nll=0.0, count=0.0, nll_beyond=0.0, count_beyond=0.0)
        s = dict(zip(s, reduce(list(s.values()))))
        out[f"val_loss{tag}"] = s["nll"] / max(s["count"], 1)
        out[f"val_loss_beyond_window{tag}"] = (s["nll_beyond"] / s["count_beyond"]
                                               if s["count_beyond"] else None)
    return out


# ---- checkpoints --------------------------------------------------------------------------------
def _rng_state() -> dict:
    return dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def open_checkpoint(uri: str):
    """A ray.train.Checkpoint for a complete local or s3:// checkpoint folder."""
    from ray.train import Checkpoint

    try:
        loc = ckpt.verify(uri)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    return Checkpoint(loc.path, filesystem=loc.fs)


def resume_source(cfg: TrainConfig, name: str, log=print, checksums: bool = True) -> str | None:
    """The checkpoint this invocation continues: the newest complete one of the run (same name),
    else --resume-from (which must be complete), else None (a fresh run). The driver checks
    sizes and model/ checksums; workers (checksums=False) sizes only."""
    latest = ckpt.latest_complete(resolve(cfg.storage).join(name), log, checksums)
    if latest is not None:
        return latest.uri
    if cfg.resume_from:
        if checksums:
            open_checkpoint(cfg.resume_from)
        return cfg.resume_from
    return None


def check_resume(uri: str, identity: dict, cfg: TrainConfig) -> dict:
    """Refuses to continue a checkpoint of another run geometry (data, batch, sequence length,
    seed, steps, workers, schedule): its data position and schedule would mean something else."""
    state = read_state(uri)
    saved = state.get("identity")
    if saved is None:
        raise ConfigError(f"{uri} records no run identity (written by an older version); start a "
                          "new run with --init-from it")
    diff = ckpt.resume_differences(saved, identity, cfg.extend_steps)
    if diff:
        fields = ", ".join(f"{k} (checkpoint {a!r}, now {b!r})" for k, (a, b) in diff.items())
        allowed = " (--extend-steps allows a larger --steps)" if "steps" in diff else ""
        raise ConfigError(f"cannot resume {uri} with a different run: {fields}; use the "
                          f"checkpoint's settings, a new --name, or --init-from it{allowed}")
    return state


def check_init_from(uri: str, model_cfg: TTTConfig) -> None:
    """--init-from is a training checkpoint (model/ inside) or a model folder (config.json +
    safetensors, e.g. pipelines/import_official.py output) of the same architecture."""
    loc = resolve(uri)
    if loc.join(STATE_FILE).exists():
        try:
            ckpt.verify(uri, parts=(ckpt.MODEL_DIR,))
        except CheckpointError as e:
            raise ConfigError(str(e)) from None
    folder = loc.join("model") if loc.join("model", "config.json").exists() else loc
    if not folder.join("config.json").exists():
        raise ConfigError(f"{uri}: neither a training checkpoint (model/config.json) nor a model "
                          "folder (config.json + safetensors)")
    saved = json.loads(folder.join("config.json").read_bytes())
    diff = {k: (saved.get(k), getattr(model_cfg, k)) for k in ARCHITECTURE_FIELDS
            if saved.get(k) != getattr(model_cfg, k)}
    if diff:
        raise ConfigError(f"{uri}: its architecture differs from this run's model "
                          f"(field: (saved, run)) {diff}")


# ---- the worker ---------------------------------------------------------------------------------
def _device(use_gpu: bool) -> torch.device:
    if use_gpu:
        from ray.train.torch import get_device

        return get_device()
    return torch.device("cpu")


def _all_reduce(values: list[float], device, op: str = "sum") -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def _gather_node_ids(world: int) -> list[str]:
    """The Ray node id of every rank (recorded in checkpoints: where the run actually ran)."""
    import ray
    import torch.distributed as dist

    mine = ray.get_runtime_context().get_node_id()
    if world == 1 or not dist.is_initialized():
        return [mine]
    out: list = [None] * world
    dist.all_gather_object(out, mine)
    return out


def _peak_flops(cfg: TrainConfig, device: torch.device) -> float | None:
    if cfg.peak_tflops > 0:
        return cfg.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


# Errors no restart can fix are recorded in the run folder and end the worker group for good:
# Ray Train retries every worker error (FailureConfig), so the workers of a restarted group find
# the record and return at once, and the driver reports it.
FATAL_FILE = "FATAL.json"
NON_FINITE_FILE = "non_finite.json"


class NonFiniteLoss(FloatingPointError):
    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def _run_dir(loop: dict):
    return resolve(loop["train"]["storage"]).join(loop["run_name"])


def train_loop(loop: dict) -> None:
    """Ray Train worker entry point (TorchTrainer(train_loop_per_worker=...))."""
    os.environ.update(loop["storage_env"])
    run_dir = _run_dir(loop)
    if run_dir.join(FATAL_FILE).exists():
        return  # a restart after an error no restart can fix: nothing to do, the driver reports
    try:
        _train_loop(loop)
    except NonFiniteLoss as e:
        marker = run_dir.join(NON_FINITE_FILE)
        seen = json.loads(marker.read_bytes()).get("step") if marker.exists() else None
        if seen == e.step:
            _record_fatal(run_dir, FloatingPointError(f"{e} (the same step was non-finite after "
                                                      "a restart from the last checkpoint)"))
        else:
            marker.write_bytes(json.dumps(dict(step=e.step, error=str(e))).encode())
        raise
    except Exception as e:  # noqa: BLE001 - always re-raised
        unfixable = _unfixable(e)
        if unfixable is not None:
            _record_fatal(run_dir, unfixable)
        raise


def _unfixable(error: BaseException) -> BaseException | None:
    """The error (or its cause: Ray wraps errors raised in Ray Data actors) that no restart can
    fix: a bad setting, an incomplete checkpoint, damaged data."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, (ConfigError, CheckpointError, DataError)):
            return error
        error = getattr(error, "cause", None) or error.__cause__
        seen += 1
    return None


def _record_fatal(run_dir, error: Exception) -> None:
    run_dir.join(FATAL_FILE).write_bytes(json.dumps(
        dict(error=redact(str(error)), kind=type(error).__name__)).encode())


def _train_loop(loop: dict) -> None:
    import ray.train

    os.environ.update(loop["storage_env"])  # S3/tracking credentials of the driver, never logged
    import deepspeed
    from ray.train import Checkpoint

    cfg = TrainConfig.from_dict(loop["train"])
    model_cfg = TTTConfig.from_dict(loop["model"])
    geometry = batch_geometry(cfg, model_cfg)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = _device(loop["use_gpu"])
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda"
                                                               else "fp32")
    autocast_dtype = torch.bfloat16 if precision == "bf16" else None

    torch.manual_seed(cfg.seed)  # identical init on every rank (DeepSpeed also broadcasts rank 0's)
    model = TTTModel(model_cfg)
    if cfg.init_from:
        from ray.train import Checkpoint as RayCheckpoint

        source = resolve(cfg.init_from)
        with RayCheckpoint(source.path, filesystem=source.fs).as_directory() as d:
            folder = Path(d) / "model" if (Path(d) / "model" / "config.json").is_file() else Path(d)
            model.load_state_dict(TTTModel.from_pretrained(folder).state_dict())
    objective = MetaObjective(model, autocast_dtype).to(device)
    total, warmup = geometry.steps, warmup_steps(cfg, geometry.steps)

    def schedule(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, total, warmup, cfg.lr, cfg.min_lr))

    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    engine, _, _, scheduler = deepspeed.initialize(
        model=objective, model_parameters=objective.parameters(),
        config=deepspeed_config(cfg, geometry), lr_scheduler=schedule)

    state = dict(step=0, position=StreamPosition().to_dict(), history=[], evals=[])
    nodes = _gather_node_ids(world)
    run_dir = resolve(cfg.storage).join(loop["run_name"])
    # the newest complete checkpoint of this run (after a worker-group restart: one this fit
    # wrote; the driver checked the first one), else --resume-from
    source = resume_source(cfg, loop["run_name"], log=print if rank == 0 else lambda *_: None,
                           checksums=False)
    checkpoint = None
    if source:
        from ray.train import Checkpoint as RayCheckpoint

        loc = resolve(source)
        checkpoint = RayCheckpoint(loc.path, filesystem=loc.fs)
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = read_state(d)
            if state["world_size"] != world:  # checked by the driver; a guard for restarts
                raise ConfigError(f"checkpoint written by {state['world_size']} workers; resume "
                                  f"with the same number (got {world})")
            engine.load_checkpoint(d, tag=DS_TAG, load_optimizer_states=True,
                                   load_lr_scheduler_states=True)
            rng = Path(d) / "rng" / f"rank{rank}.pt"
            if rng.is_file():
                _set_rng_state(torch.load(rng, weights_only=False))
        if rank == 0:
            print(f"[train] resumed at step {state['step']} (data position {state['position']})",
                  flush=True)

    stop = total if not cfg.stop_after else min(total, state["step"] + cfg.stop_after)
    start = StreamPosition.from_dict(state["position"])
    spec = StreamSpec(cfg.data, model_cfg.seq_len, geometry.sequences, world, cfg.seed)
    stream = worker_stream(spec, rank, start, stop - state["step"],
                           use_ray_data=cfg.stream == "ray_data", cpus=cfg.data_cpus)
    val = WindowReader(cfg.data, "val", model_cfg.seq_len, cfg.seed)
    n_val = min(cfg.eval_windows, val.windows_per_epoch)
    val_windows = torch.from_numpy(val.windows(0, n_val)[rank::world]).to(device)

    # the dataset's tokenizer goes into every checkpoint's model/ folder: a checkpoint (and a
    # registered model) is then all that text generation needs
    tokenizer = _dataset_tokenizer(cfg.data) if rank == 0 else None
    logger = RunLogger(loop["tracking_uri"], loop["run_id"]) if rank == 0 else RunLogger(None, None)
    flops_per_token = estimate_flops(model_cfg).meta_step
    peak = _peak_flops(cfg, device)
    bar = None
    if rank == 0:
        from ray.experimental.tqdm_ray import tqdm

        bar = tqdm(total=total, desc=f"meta-train {loop['run_name']}", unit="step",
                   position=0)
        bar.update(state["step"])

    def save_and_report(metrics: dict) -> None:
        import torch.distributed as dist

        with tempfile.TemporaryDirectory(prefix="ttte2e-ckpt-") as tmp:
            engine.save_checkpoint(tmp, tag=DS_TAG)
            (Path(tmp) / "rng").mkdir(exist_ok=True)
            torch.save(_rng_state(), Path(tmp) / "rng" / f"rank{rank}.pt")
            if rank == 0:
                model.save_pretrained(Path(tmp) / "model")
                if tokenizer is not None:
                    (Path(tmp) / "model" / TOKENIZER_FILE).write_bytes(tokenizer)
                (Path(tmp) / STATE_FILE).write_text(json.dumps(
                    dict(state, world_size=world, nodes=nodes, mlflow_run_id=loop["run_id"],
                         torch_threads=torch.get_num_threads(), train=loop["train"],
                         model=model_cfg.to_dict(), geometry=dataclasses.asdict(geometry),
                         identity=loop["identity"]), indent=1))
            files = ckpt.file_list(tmp)
            if world > 1 and dist.is_initialized():
                every: list = [None] * world
                dist.all_gather_object(every, files)
                files = {k: v for part in every for k, v in part.items()}
            name = ckpt.dir_name(state["step"])
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=name)
        # every rank's files are stored (report uploads before it returns): commit
        if world > 1 and dist.is_initialized():
            dist.barrier()
        if rank == 0:
            ckpt.write_complete(run_dir.join(name), files, state["step"])

    for step in range(state["step"], stop):
        started = time.perf_counter()
        position, windows = next(stream)
        windows = torch.from_numpy(windows).to(device)
        eta = eta_at(cfg, model_cfg, step, total)
        lr = scheduler.get_last_lr()[0]
        sums = np.zeros(5)  # loss, inner-norm sum, inner-norm max, clipped, count
        for mb in range(geometry.accumulation):
            x = windows[mb * geometry.micro_batch:(mb + 1) * geometry.micro_batch]
            loss, chunk_loss, inner_norm = engine(x, eta)
            bad = not (torch.isfinite(loss).item() and torch.isfinite(chunk_loss).all().item()
                       and torch.isfinite(inner_norm).all().item())
            # every rank stops together: a rank raising alone would leave the others in a collective
            if _all_reduce([float(bad)], device)[0]:
                raise NonFiniteLoss(
                    f"non-finite meta-loss, chunk (inner) loss or inner-gradient norm at step "
                    f"{step} (micro-batch {mb}, eta {eta:g}, lr {lr:g}); nothing was applied or "
                    "checkpointed", step)
            engine.backward(loss)
            engine.step()
            n = inner_norm.float()
            sums += [loss.item(), n.sum().item(), 0.0, (n > model_cfg.inner_clip).sum().item(),
                     n.numel()]
            sums[2] = max(sums[2], n.max().item())
        totals = _all_reduce([sums[0], sums[1], sums[3], sums[4]], device)
        inner_max = _all_reduce([sums[2]], device, op="max")[0]
        seconds = time.perf_counter() - started
        grad_norm = engine.get_global_grad_norm()
        tokens_per_s = geometry.tokens_per_step / seconds
        record = dict(step=step + 1, loss=totals[0] / (world * geometry.accumulation),
                      lr=lr, eta=eta, grad_norm=float(grad_norm) if grad_norm is not None else None,
                      inner_grad_norm=totals[1] / totals[3], inner_grad_norm_max=inner_max,
                      inner_clip_fraction=totals[2] / totals[3], tokens_per_s=tokens_per_s,
                      step_seconds=seconds,
                      mfu=(tokens_per_s * flops_per_token / (world * peak)) if peak else None)
        state["history"].append(record)
        state["step"], state["position"] = step + 1, position.to_dict()
        last = step + 1 == total
        evaluated = (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last
        if evaluated:
            objective.eval()
            metrics = held_out_metrics(model, val_windows, model_cfg.inner_lr,
                                       objective.autocast(device),
                                       reduce=lambda v: _all_reduce(v, device))
            objective.train()
            state["evals"].append(dict(step=step + 1, **metrics))
            if rank == 0:
                def fmt(v):
                    return "n/a" if v is None else f"{v:.4f}"
                print(f"[eval] step {step + 1}: held-out loss {fmt(metrics['val_loss'])} (same "
                      f"weights without TTT {fmt(metrics['val_loss_no_ttt'])}); beyond the first "
                      f"window {fmt(metrics['val_loss_beyond_window'])} (without TTT "
                      f"{fmt(metrics['val_loss_beyond_window_no_ttt'])})", flush=True)
                logger.metrics({k: v for k, v in metrics.items() if v is not None}, step + 1)
        if rank == 0:
            logger.metrics({k: v for k, v in record.items() if k != "step"}, step + 1)
            bar.update(1)
            if step % max(1, total // 20) == 0 or last:
                mfu = "n/a" if record["mfu"] is None else f"{record['mfu']:.1%}"
                print(f"[train] step {step + 1}/{total} loss {record['loss']:.4f} lr {lr:.2e} "
                      f"eta {eta:.2f} inner-norm {record['inner_grad_norm']:.3f} (clipped "
                      f"{record['inner_clip_fraction']:.0%}) {tokens_per_s:,.0f} tok/s MFU {mfu}",
                      flush=True)
        # every report carries the latest held-out metrics (what a Ray Tune scheduler compares)
        report = {k: v for k, v in {**record, **(state["evals"][-1] if state["evals"] else {})}
                  .items() if v is not None}
        if (step + 1) % cfg.checkpoint_every == 0 or last or step + 1 == stop:
            save_and_report(report)
        elif evaluated:
            ray.train.report(report)
    if bar is not None:
        bar.close()


# ---- the driver ---------------------------------------------------------------------------------
def plot_run(state: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    hist, evals = state["history"], state["evals"]
    left.plot([h["step"] for h in hist], [h["loss"] for h in hist], label="train meta-loss")
    for key, style, label in (("val_loss", "o-", "held-out, TTT"),
                              ("val_loss_no_ttt", "s--", "held-out, same weights, no TTT")):
        left.plot([e["step"] for e in evals], [e[key] for e in evals], style, label=label)
    left.set_xlabel("step"), left.set_ylabel("loss (nats/token)"), left.legend()
    right.plot([h["step"] for h in hist], [h["inner_grad_norm"] for h in hist], label="inner grad norm")
    right.plot([h["step"] for h in hist], [h["eta"] for h in hist], label="eta")
    right.set_xlabel("step"), right.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _dataset_tokenizer(data: str) -> bytes | None:
    from ttte2e.platform.prepare import read_manifest

    info = read_manifest(data).get("tokenizer") or {}
    loc = resolve(data).join(info["file"]) if info.get("file") else None
    return loc.read_bytes() if loc is not None and loc.exists() else None


def _storage_env() -> dict:
    return {k: v for k, v in os.environ.items() if k in STORAGE_ENV_VARS}


def _register_final(checkpoint: str, cfg: TrainConfig, uri: str, log) -> dict:
    """Register the final checkpoint. A failure here ends the job with an error (exit status 2)
    that says the checkpoint is safe and gives the command that registers it later."""
    from ttte2e.platform.registry import register

    try:
        out = register(checkpoint, cfg.register_as, uri, alias=cfg.register_alias)
    except Exception as e:  # noqa: BLE001 - whatever failed, the trained model must not be lost
        raise ConfigError(
            f"training finished (checkpoint {checkpoint}) but registering it as "
            f"{cfg.register_as!r} failed ({type(e).__name__}: {redact(str(e))[:300]}); register "
            f"it with: python pipelines/registry.py register {checkpoint} --name "
            f"{cfg.register_as} --alias {cfg.register_alias} --tracking-uri {redact(uri)}") from None
    log(f"[registry] {out['uri']} -> version {out['version']} ({out['weights']} weights)")
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


def fit(cfg: TrainConfig, log=print, parent_run_id: str | None = None,
        report_to_tune: bool = False) -> dict:
    """Run (or resume) a training run; returns where its results are and its metric history.
    parent_run_id: the MLflow run this run's run is a child of (a sweep). report_to_tune: forward
    the workers' reports to the Ray Tune trial this runs in (platform/ablation.py)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ttte2e.platform.ray_runtime import ensure_ray
    from ttte2e.platform import tracking
    from ttte2e.platform.registry import check_tracking

    model_cfg, geometry = check_options(cfg)
    # workers run in other folders (and on other nodes): local paths become absolute
    cfg = dataclasses.replace(cfg, **{k: resolve(getattr(cfg, k)).uri for k in
                                      ("data", "storage", "resume_from", "init_from")
                                      if getattr(cfg, k)})
    facts = check_data(cfg, model_cfg, geometry)
    check_storage(cfg.storage)
    name = cfg.run_name()
    storage = resolve(cfg.storage)
    identity = ckpt.run_identity(cfg.to_dict(), dataclasses.asdict(geometry), facts["dataset_key"])
    source = resume_source(cfg, name, log)
    if source:
        resumed = check_resume(source, identity, cfg)
        log(f"[resume] {redact(source)} (step {resumed['step']} of {geometry.steps})")
    if cfg.init_from:
        check_init_from(cfg.init_from, model_cfg)
    uri = tracking.tracking_uri(cfg.tracking_uri, cfg.storage)
    if uri:
        try:  # before Ray starts: a dead server costs seconds, not a cluster start
            check_tracking(uri)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"MLflow tracking at {redact(uri)} is unusable ({type(e).__name__}: "
                              f"{redact(str(e))[:300]}); fix it or pass --tracking-uri off") from None
    ensure_ray()
    import ray

    use_gpu = check_resources(cfg, ray.cluster_resources())
    log(f"[plan] {cfg.preset}: {count_parameters(model_cfg) / 1e6:.1f}M parameters, "
        f"T={model_cfg.seq_len} k={model_cfg.window} b={model_cfg.chunk_size}, "
        f"{model_cfg.n_ttt_blocks}/{model_cfg.n_layers} TTT blocks; {geometry.steps} steps x "
        f"{geometry.tokens_per_step:,} tokens = {geometry.steps * geometry.tokens_per_step:,} "
        f"tokens ({facts['epochs']:.2f} epochs of {redact(cfg.data)}: {facts['train_windows']} "
        f"windows per epoch in a shuffled order, the last {facts['skipped_per_epoch']} of each "
        f"epoch's order not read, fewer than one batch); {cfg.workers} "
        f"{'GPU' if use_gpu else 'CPU'} workers x micro-batch {geometry.micro_batch} x "
        f"accumulation {geometry.accumulation}; ZeRO-{cfg.zero_stage}")

    run_id = None
    if uri:
        artifacts = tracking.artifact_location(uri)  # a server keeps its own artifact store
        params = {**{f"model.{k}": v for k, v in model_cfg.to_dict().items()},
                  **{f"train.{k}": v for k, v in cfg.to_dict().items()},
                  "model.parameters": count_parameters(model_cfg),
                  "train.run_name": name, **{f"geometry.{k}": v for k, v in
                                             dataclasses.asdict(geometry).items()}}
        try:
            run_id = tracking.start_run(uri, cfg.experiment, name, params, artifacts,
                                        parent_run_id)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"MLflow tracking at {redact(uri)} is unusable ({type(e).__name__}: "
                              f"{redact(str(e))[:300]}); fix it or pass --tracking-uri off") from None
        log(f"[tracking] MLflow run {run_id} ({redact(uri)})")

    resources = {"CPU": cfg.cpus_per_worker}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=dict(train=tracking.redact_config(cfg.to_dict()),
                               model=model_cfg.to_dict(), run_name=name, identity=identity,
                               use_gpu=use_gpu, tracking_uri=uri, run_id=run_id,
                               storage_env={**_storage_env(), **tracking.credential_env()}),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=cfg.placement),
        run_config=RunConfig(
            name=name, storage_path=storage.path, storage_filesystem=storage.fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            callbacks=_tune_callbacks() if report_to_tune else None),
    )
    logger = RunLogger(uri, run_id)
    run_dir = storage.join(name)
    for stale in (FATAL_FILE, NON_FINITE_FILE):  # from an earlier invocation of this run
        if run_dir.join(stale).exists():
            run_dir.join(stale).delete()
    try:
        result = trainer.fit()
    except BaseException:
        logger.end("FAILED")
        _raise_fatal(run_dir)
        raise
    if run_dir.join(FATAL_FILE).exists():
        logger.end("FAILED")
        _raise_fatal(run_dir)
    ckpt_path = result.checkpoint.path
    ckpt_uri = f"s3://{ckpt_path}" if storage.is_s3 else ckpt_path
    with result.checkpoint.as_directory() as d:
        state = read_state(d)
    local_out = Path(run_dir.path) if not storage.is_s3 else Path(tempfile.mkdtemp())
    plot = plot_run(state, local_out / "curves.png")
    (local_out / "metrics.json").write_text(json.dumps(
        dict(history=state["history"], evals=state["evals"]), indent=1))
    if storage.is_s3:
        for f in ("curves.png", "metrics.json"):
            run_dir.join(f).write_bytes((local_out / f).read_bytes())
    logger.tag("checkpoint_uri", ckpt_uri)
    logger.artifact(plot)
    logger.artifact(local_out / "metrics.json")
    finished = state["step"] >= geometry.steps
    if finished:
        logger.end()
    else:
        log(f"[paused] at step {state['step']} of {geometry.steps} (--stop-after); run the same "
            f"command again (--name {name}) to continue")
    summary = dict(checkpoint=ckpt_uri, run_name=name, finished=finished, step=state["step"],
                   run_id=run_id, tracking_uri=redact(uri) if uri else None,
                   plot=f"{run_dir.uri}/curves.png", final_eval=state["evals"][-1:] or None)
    run_dir.join("result.json").write_bytes(json.dumps(summary, indent=1).encode())
    registered = None
    if finished and cfg.register_as and uri:
        registered = _register_final(ckpt_uri, cfg, uri, log)
        summary["registered"] = registered
        run_dir.join("result.json").write_bytes(json.dumps(summary, indent=1).encode())
    final = state["evals"][-1] if state["evals"] else {}
    log(f"[done] {state['step']} steps; final train loss {state['history'][-1]['loss']:.4f}; "
        f"held-out {final.get('val_loss', float('nan')):.4f} (no TTT "
        f"{final.get('val_loss_no_ttt', float('nan')):.4f})")
    log(f"  checkpoint : {ckpt_uri}  (model: TTTModel.from_pretrained('<checkpoint>/model'))")
    log(f"  plots      : {run_dir.uri}/curves.png")
    if run_id:
        log(f"  MLflow run : {run_id} in {redact(uri)}")
    if registered:
        log(f"  registered : {registered['uri']} (version {registered['version']}, weights "
            f"{registered['weights']})")
    return dict(summary, tracking_uri=uri, history=state["history"], evals=state["evals"])
