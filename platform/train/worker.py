"""The per-worker training loop on Ray Train: the TTT-E2E meta-objective in a DeepSpeed ZeRO engine.

`train_loop` (what TorchTrainer runs on every worker): model -> DeepSpeed engine (ZeRO 0/1/2,
AdamW 0.9/0.95, clip, warm-up + cosine), its own input stream from the checkpointed data
position, gradient accumulation, the held-out evaluation, metrics, checkpoints via
ray.train.report. Restoring a complete checkpoint continues exactly where the interrupted run
stood. Errors no restart can fix are recorded in the run folder (FATAL.json) for the driver.
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

from ttte2e.model import TTTConfig, TTTModel, estimate_flops, inner_lr_at
from ttte2e.model.model_folder import write_model_folder, write_tokenizer
from ttte2e.platform.train import checkpoint as ckpt
from ttte2e.platform.train.checkpoint import DS_TAG, STATE_FILE, CheckpointError, read_state
from ttte2e.platform.data.stream import StreamPosition, StreamSpec, WindowReader, worker_stream
from ttte2e.platform.data.manifest import DataError
from ttte2e.platform.data.storage import resolve
from ttte2e.platform.registry.tracking import RunLogger, redact
from ttte2e.platform.train.config import (BatchGeometry, ConfigError, TrainConfig, batch_geometry)
from ttte2e.platform.train.offload import apply_offload
from ttte2e.platform.train.tensor_parallel import (DeepSpeedMPU, build_groups, full_state_dict,
                                                   parallelize)


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
            # the last chunk's inner step changes no loss: not taken (1/n of the inner gradients)
            out = self.model.meta_loss(tokens, eta=eta, final_update=False)
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
        from ttte2e.platform.train.plan import peak_tflops

        tflops = peak_tflops(torch.cuda.get_device_name(device))
        return None if tflops is None else tflops * 1e12
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

    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    tp = geometry.tensor_parallel
    groups = build_groups(tp) if tp > 1 else None
    dp_rank, dp_size = (groups.data_rank, groups.data_size) if groups else (rank, world)
    nodes = _gather_node_ids(world)
    if groups:
        for g in range(world // tp):
            if len(set(nodes[g * tp:(g + 1) * tp])) > 1:
                raise ConfigError(f"tensor-parallel group {g} (ranks {g * tp}..{g * tp + tp - 1}) "
                                  "was placed on more than one node; give each node a multiple "
                                  f"of {tp} workers (--placement PACK)")

    torch.manual_seed(cfg.seed)  # identical init on every rank (DeepSpeed also broadcasts rank 0's)
    model = TTTModel(model_cfg)
    if cfg.init_from:
        from ray.train import Checkpoint as RayCheckpoint

        source = resolve(cfg.init_from)
        with RayCheckpoint(source.path, filesystem=source.fs).as_directory() as d:
            folder = ckpt.local_model_folder(d)
            model.load_state_dict(TTTModel.from_pretrained(folder).state_dict())
    if groups:  # the whole model (initialised or loaded) is split in place
        parallelize(model, groups.tensor)
    apply_offload(model, cfg.offload)
    objective = MetaObjective(model, autocast_dtype).to(device)
    total, warmup = geometry.steps, warmup_steps(cfg, geometry.steps)

    def schedule(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, total, warmup, cfg.lr, cfg.min_lr))

    # with tensor parallelism ZeRO partitions and all-reduces over the data-parallel group only
    engine, _, _, scheduler = deepspeed.initialize(
        model=objective, model_parameters=objective.parameters(),
        config=deepspeed_config(cfg, geometry), lr_scheduler=schedule,
        mpu=DeepSpeedMPU(groups) if groups else None)

    state = dict(step=0, position=StreamPosition().to_dict(), history=[], evals=[])
    run_dir = resolve(cfg.storage).join(loop["run_name"])
    # the newest complete checkpoint of this run (after a worker-group restart: one this fit
    # wrote; the driver checked the first one), else --resume-from
    source = ckpt.resume_source(cfg.storage, loop["run_name"], cfg.resume_from,
                                log=print if rank == 0 else lambda *_: None, checksums=False)
    checkpoint = None
    if source:
        from ray.train import Checkpoint as RayCheckpoint

        loc = resolve(source)
        checkpoint = RayCheckpoint(loc.path, filesystem=loc.fs)
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = read_state(d)
            saved_tp = state.get("tensor_parallel", 1)
            if state["world_size"] != world or saved_tp != tp:  # the driver checked; a guard
                raise ConfigError(f"checkpoint written by {state['world_size']} workers, tensor-"
                                  f"parallel {saved_tp}; resume with the same layout (got "
                                  f"{world} workers, tensor-parallel {tp})")
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
    # one stream per data-parallel rank: the tensor-parallel ranks of a group read the same windows
    spec = StreamSpec(cfg.data, model_cfg.seq_len, geometry.sequences, dp_size, cfg.seed)
    stream = worker_stream(spec, dp_rank, start, stop - state["step"],
                           use_ray_data=cfg.stream == "ray_data", cpus=cfg.data_cpus)
    val = WindowReader(cfg.data, "val", model_cfg.seq_len, cfg.seed)
    n_val = min(cfg.eval_windows, val.windows_per_epoch)
    val_windows = torch.from_numpy(val.windows(0, n_val)[dp_rank::dp_size]).to(device)

    # the dataset's tokenizer goes into every checkpoint's model/ folder: a checkpoint (and a
    # registered model) is then all that text generation needs
    tokenizer = _dataset_tokenizer(cfg.data) if rank == 0 else None
    logger = RunLogger(loop["tracking_uri"], loop["run_id"]) if rank == 0 else RunLogger(None, None)
    # MFU counts the model's FLOPs (no recomputation); HFU what the hardware runs (with it)
    model_flops = estimate_flops(model_cfg.replace(checkpoint_prefix=False), remat="none").meta_step
    hardware_flops = estimate_flops(model_cfg).meta_step
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
            weights = full_state_dict(model) if groups else None  # every TP rank takes part
            if rank == 0:
                if weights is None:
                    model.save_pretrained(Path(tmp) / ckpt.MODEL_DIR)
                else:  # model/ always holds the whole weights
                    write_model_folder(Path(tmp) / ckpt.MODEL_DIR, model_cfg.to_dict(),
                                       weights.items())
                if tokenizer is not None:
                    write_tokenizer(Path(tmp) / ckpt.MODEL_DIR, tokenizer)
                (Path(tmp) / STATE_FILE).write_text(json.dumps(
                    dict(state, world_size=world, tensor_parallel=tp, nodes=nodes,
                         mlflow_run_id=loop["run_id"],
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

    resumed_at_end = state["step"] >= stop
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
                      mfu=(tokens_per_s * model_flops / (world * peak)) if peak else None,
                      hfu=(tokens_per_s * hardware_flops / (world * peak)) if peak else None)
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
                mfu = "n/a" if record["mfu"] is None else (
                    f"{record['mfu']:.1%} (HFU {record['hfu']:.1%}, with recomputation)")
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
    if resumed_at_end and state["history"]:
        # resumed at the run's last step (the previous invocation ended after its final
        # checkpoint, before its caller saw the report): report that step's metrics again, so a
        # Tune trial or fit's result ends on the final step instead of an older report
        ray.train.report({k: v for k, v in {**state["history"][-1],
                                            **(state["evals"][-1] if state["evals"] else {})}
                          .items() if v is not None})
    if bar is not None:
        bar.close()


def _dataset_tokenizer(data: str) -> bytes | None:
    from ttte2e.platform.data.manifest import read_manifest

    info = read_manifest(data).get("tokenizer") or {}
    loc = resolve(data).join(info["file"]) if info.get("file") else None
    return loc.read_bytes() if loc is not None and loc.exists() else None
