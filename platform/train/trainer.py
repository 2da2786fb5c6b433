"""The meta-training loop as a library: a `Trainer` that runs in one plain process or as one
worker of a Ray Train group.

`Trainer(spec, placement, reporter)`: model -> DeepSpeed engine (ZeRO 0/1/2, AdamW 0.9/0.95,
clip, warm-up + cosine), `restore` (the newest complete checkpoint of the run, else
--resume-from), `train_step` (gradient accumulation, the non-finite stop, metrics), `evaluate`
(held-out loss with and without TTT), `save` (train/checkpoint.py writes the folder; the
reporter stores it) and `fit` (all of it, from the restored step to the end or --stop-after).

What differs between one process and Ray is passed in: the `Placement` (rank, world, device,
node ids, tensor-parallel groups) and the `Reporter` (Ray's `ray.train.report`, or
`LocalReporter`, which copies checkpoints into the run folder itself). Checkpoints are the same
files either way, so a run started in one resumes in the other. train/worker.py is the Ray
wrapper; `run_local` builds a one-process placement (a gloo group of one, so DeepSpeed runs as
it does under Ray).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

from ttte2e.model import TTTConfig, TTTModel, estimate_flops, inner_lr_at
from ttte2e.model.model_folder import CONFIG_FILE
from ttte2e.platform.data.storage import Location, resolve
from ttte2e.platform.data.stream import StreamPosition, StreamSpec, WindowReader, worker_stream
from ttte2e.platform.registry.tracking import RunLogger
from ttte2e.platform.train import checkpoint as ckpt
from ttte2e.platform.train.config import (
    BatchGeometry,
    ConfigError,
    TrainConfig,
    batch_geometry,
    compile_enabled,
    zero_optimization,
)
from ttte2e.platform.train.offload import apply_offload
from ttte2e.platform.train.tensor_parallel import (
    DeepSpeedMPU,
    ParallelGroups,
    build_groups,
    full_state_dict,
    parallelize,
)
from ttte2e.platform.train.validation import held_out_metrics

log = logging.getLogger(__name__)


# ---- schedule ----------------------------------------------------------------------------------
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
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.lr,
                "betas": [0.9, 0.95],
                "eps": 1e-8,
                "weight_decay": cfg.weight_decay,
                "torch_adam": True,
            },
        },
        "zero_optimization": zero_optimization(cfg.zero_stage),
        # bf16 is autocast in MetaObjective: parameters, master weights and grads stay fp32
        "bf16": {"enabled": False},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


# ---- what the driver hands a worker, and where it runs -----------------------------------------
@dataclass
class RunSpec:
    """One run, as the driver hands it to every worker (credentials travel separately)."""

    train: TrainConfig  # credentials redacted
    model: TTTConfig
    run_name: str
    identity: dict  # what a resumed run must share with its checkpoint
    tracking_uri: str | None = None
    run_id: str | None = None
    use_gpu: bool = False

    @property
    def run_dir(self) -> Location:
        return resolve(self.train.storage).join(self.run_name)


@dataclass
class Placement:
    """Where this process sits in the run: rank, world, device, the node of every rank, the
    tensor-parallel groups (None without tensor parallelism), and whether the input stream may
    read in Ray Data actors (a Ray Train worker; one plain process reads in itself)."""

    rank: int
    world: int
    device: torch.device
    nodes: list[str]
    groups: ParallelGroups | None = None
    ray_data: bool = False

    @property
    def data_rank(self) -> int:
        return self.groups.data_rank if self.groups else self.rank

    @property
    def data_size(self) -> int:
        return self.groups.data_size if self.groups else self.world


class Reporter(Protocol):
    """Where a worker's metrics and checkpoints go (Ray Train's report, LocalReporter, or a Tune
    trial's TuneReporter)."""

    def report(
        self, metrics: dict, checkpoint: Path | None = None, name: str | None = None
    ) -> None:
        """Metrics of a step; with `checkpoint`, that step's checkpoint folder to store."""

    def committed(self, metrics: dict) -> None:
        """Rank 0, after the checkpoint reported with these metrics is complete (COMPLETE.json
        written): whoever may stop the run on a report sees it only now."""


@dataclass
class LocalReporter:
    """One process without Ray: a checkpoint is copied into the run folder (local or s3://) and
    only the newest `keep` are kept, as Ray Train's CheckpointConfig(num_to_keep) does."""

    run_dir: Location
    keep: int

    def report(
        self, metrics: dict, checkpoint: Path | None = None, name: str | None = None
    ) -> None:
        if checkpoint is None:  # metrics go to MLflow and the trainer state already
            return
        self.run_dir.join(name).upload(checkpoint)
        for old in ckpt.checkpoint_names(self.run_dir)[self.keep :]:
            self.run_dir.join(old).delete()

    def committed(self, metrics: dict) -> None:
        pass


class NonFiniteLoss(FloatingPointError):
    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def _all_reduce(values: list[float], device, op: str = "sum") -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def _peak_flops(cfg: TrainConfig, device: torch.device) -> float | None:
    if cfg.peak_tflops > 0:
        return cfg.peak_tflops * 1e12
    if device.type == "cuda":
        from ttte2e.platform.train.plan import peak_tflops

        tflops = peak_tflops(torch.cuda.get_device_name(device))
        return None if tflops is None else tflops * 1e12
    return None


def _dataset_tokenizer(data: str) -> bytes | None:
    from ttte2e.platform.data.manifest import read_manifest

    info = read_manifest(data).get("tokenizer") or {}
    loc = resolve(data).join(info["file"]) if info.get("file") else None
    return loc.read_bytes() if loc is not None and loc.exists() else None


class Progress:
    """Training progress: a live bar on a terminal; in a log (a Ray job, a file), a line every
    5% of the run (and the first and last step) with loss, tokens/s and the time left."""

    def __init__(self, total: int, start: int, name: str, enabled: bool):
        self.total, self.start, self.enabled = total, start, enabled
        self.began = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                initial=start,
                desc=f"meta-train {name}",
                unit="step",
                dynamic_ncols=True,
            )

    def update(self, record: dict) -> None:
        if not self.enabled:
            return
        step = record["step"]
        done = step - self.start
        left = (time.perf_counter() - self.began) / done * (self.total - step)
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}", refresh=False
            )
            self.bar.update(1)
            return
        every = max(1, self.total // 20)
        if step == 1 or step % every == 0 or step == self.total or done == 1:
            mfu = (
                "n/a"
                if record["mfu"] is None
                else (f"{record['mfu']:.1%} (HFU {record['hfu']:.1%}, with recomputation)")
            )
            log.info(
                "[train] step %d/%d loss %.4f lr %.2e eta %.2f inner-norm %.3f (clipped "
                "%.0f%%) %s tok/s MFU %s; %s left",
                step,
                self.total,
                record["loss"],
                record["lr"],
                record["eta"],
                record["inner_grad_norm"],
                100 * record["inner_clip_fraction"],
                f"{record['tokens_per_s']:,.0f}",
                mfu,
                _duration(left),
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


def import_deepspeed(device: torch.device):
    """deepspeed, told the accelerator instead of detecting it (it warns when it falls back to
    the CPU), and without torch's deprecation notice for a collective its ZeRO code calls."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
        category=FutureWarning,
    )
    import deepspeed

    return deepspeed


class Trainer:
    """One worker's meta-training (one process, or one rank of a group)."""

    def __init__(self, spec: RunSpec, placement: Placement, reporter: Reporter):
        deepspeed = import_deepspeed(placement.device)

        self.spec, self.placement, self.reporter = spec, placement, reporter
        cfg, model_cfg = spec.train, spec.model
        self.cfg, self.model_cfg = cfg, model_cfg
        self.geometry = batch_geometry(cfg, model_cfg)
        self.device = placement.device
        precision = (
            cfg.precision
            if cfg.precision != "auto"
            else ("bf16" if self.device.type == "cuda" else "fp32")
        )
        groups = placement.groups

        torch.manual_seed(cfg.seed)  # identical init on every rank (DeepSpeed broadcasts rank 0's)
        # the checkpoints keep model_cfg: whether to compile is this run's choice, not the model's
        self.model = TTTModel(
            model_cfg.replace(compile=compile_enabled(cfg.compile, self.device.type))
        )
        if cfg.init_from:
            self._load_parameters(cfg.init_from)
        if groups:  # the whole model (initialised or loaded) is split in place
            parallelize(self.model, groups.tensor)
        apply_offload(self.model, cfg.offload)
        self.objective = MetaObjective(
            self.model, torch.bfloat16 if precision == "bf16" else None
        ).to(self.device)
        self.total = self.geometry.steps
        warmup = warmup_steps(cfg, self.total)

        def schedule(optimizer):
            return torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda s: lr_factor(s, self.total, warmup, cfg.lr, cfg.min_lr)
            )

        # with tensor parallelism ZeRO partitions and all-reduces over the data-parallel group
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.objective,
            model_parameters=self.objective.parameters(),
            config=deepspeed_config(cfg, self.geometry),
            lr_scheduler=schedule,
            mpu=DeepSpeedMPU(groups) if groups else None,
        )
        self.state = dict(step=0, position=StreamPosition().to_dict(), history=[], evals=[])
        lead = placement.rank == 0
        # the dataset's tokenizer goes into every checkpoint's model/ folder: a checkpoint (and a
        # registered model) is then all that text generation needs
        self.tokenizer = _dataset_tokenizer(cfg.data) if lead else None
        self.logger = RunLogger(spec.tracking_uri, spec.run_id) if lead else RunLogger(None, None)
        # MFU counts the model's FLOPs (no recomputation); HFU what the hardware runs (with it)
        self.model_flops = estimate_flops(
            model_cfg.replace(checkpoint_prefix=False), remat="none"
        ).meta_step
        self.hardware_flops = estimate_flops(model_cfg).meta_step
        self.peak = _peak_flops(cfg, self.device)
        self._val_windows = None

    def _load_parameters(self, uri: str) -> None:
        source = resolve(uri)
        # a training checkpoint: only its model/ is read; a plain model folder: all of it
        in_checkpoint = source.join(ckpt.MODEL_DIR, CONFIG_FILE).exists()
        parts = (ckpt.MODEL_DIR,) if in_checkpoint else ()
        with ckpt.local_copy(source, parts=parts) as folder:
            loaded = TTTModel.from_pretrained(ckpt.local_model_folder(folder))
        self.model.load_state_dict(loaded.state_dict())

    # ---- restore / save ------------------------------------------------------------------------
    def restore(self) -> bool:
        """Continue from the newest complete checkpoint of the run (after a restart: one this
        run wrote; the driver checked the first one), else --resume-from. False: a fresh run."""
        p = self.placement
        source = ckpt.resume_source(
            self.cfg.storage,
            self.spec.run_name,
            self.cfg.resume_from,
            checksums=False,
        )
        if not source:
            return False
        tp = self.geometry.tensor_parallel
        with ckpt.local_copy(resolve(source)) as folder:
            state = ckpt.read_state(folder)
            saved_tp = state.get("tensor_parallel", 1)
            if state["world_size"] != p.world or saved_tp != tp:  # the driver checked; a guard
                raise ConfigError(
                    f"checkpoint written by {state['world_size']} workers, tensor-"
                    f"parallel {saved_tp}; resume with the same layout (got "
                    f"{p.world} workers, tensor-parallel {tp})"
                )
            ckpt.restore(folder, self.engine, p.rank)
        self.state = state
        if p.rank == 0:
            log.info(
                "[train] resumed at step %d (data position %s)", state["step"], state["position"]
            )
        return True

    def save(self, metrics: dict) -> None:
        """A checkpoint of the current step: every rank writes its part into a local folder,
        the reporter stores it, and after every rank's files are stored rank 0 commits it
        (COMPLETE.json)."""
        p = self.placement
        name = ckpt.dir_name(self.state["step"])
        weights = full_state_dict(self.model) if p.groups else None  # every TP rank takes part
        with tempfile.TemporaryDirectory(prefix="ttte2e-ckpt-") as tmp:
            state = None
            if p.rank == 0:
                state = dict(
                    self.state,
                    world_size=p.world,
                    tensor_parallel=self.geometry.tensor_parallel,
                    nodes=p.nodes,
                    mlflow_run_id=self.spec.run_id,
                    torch_threads=torch.get_num_threads(),
                    train=self.cfg.to_dict(),
                    model=self.model_cfg.to_dict(),
                    geometry=dataclasses.asdict(self.geometry),
                    identity=self.spec.identity,
                )
                if weights is None:
                    weights = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
            files = ckpt.write(
                Path(tmp),
                self.engine,
                p.rank,
                state,
                self.model_cfg.to_dict(),
                weights if p.rank == 0 else None,
                self.tokenizer,
            )
            if p.world > 1 and dist.is_initialized():
                every: list = [None] * p.world
                dist.all_gather_object(every, files)
                files = {k: v for part in every for k, v in part.items()}
            self.reporter.report(metrics, checkpoint=Path(tmp), name=name)
        if p.world > 1 and dist.is_initialized():
            dist.barrier()  # every rank's files are stored (report uploads before it returns)
        if p.rank == 0:
            ckpt.write_complete(self.spec.run_dir.join(name), files, self.state["step"])
            self.reporter.committed(metrics)

    # ---- step / evaluate -----------------------------------------------------------------------
    def train_step(self, step: int, windows: torch.Tensor) -> dict:
        """One optimizer step on this rank's windows of the global batch; returns its record.
        NonFiniteLoss (on every rank together) before anything non-finite is applied."""
        g, device = self.geometry, self.device
        started = time.perf_counter()
        eta = eta_at(self.cfg, self.model_cfg, step, self.total)
        lr = self.scheduler.get_last_lr()[0]
        sums = np.zeros(5)  # loss, inner-norm sum, inner-norm max, clipped, count
        for mb in range(g.accumulation):
            x = windows[mb * g.micro_batch : (mb + 1) * g.micro_batch]
            loss, chunk_loss, inner_norm = self.engine(x, eta)
            bad = not (
                torch.isfinite(loss).item()
                and torch.isfinite(chunk_loss).all().item()
                and torch.isfinite(inner_norm).all().item()
            )
            # every rank stops together: a rank raising alone would leave the others in a collective
            if _all_reduce([float(bad)], device)[0]:
                raise NonFiniteLoss(
                    f"non-finite meta-loss, chunk (inner) loss or inner-gradient norm at step "
                    f"{step} (micro-batch {mb}, eta {eta:g}, lr {lr:g}); nothing was applied or "
                    "checkpointed",
                    step,
                )
            self.engine.backward(loss)
            self.engine.step()
            n = inner_norm.float()
            sums += [
                loss.item(),
                n.sum().item(),
                0.0,
                (n > self.model_cfg.inner_clip).sum().item(),
                n.numel(),
            ]
            sums[2] = max(sums[2], n.max().item())
        totals = _all_reduce([sums[0], sums[1], sums[3], sums[4]], device)
        inner_max = _all_reduce([sums[2]], device, op="max")[0]
        seconds = time.perf_counter() - started
        grad_norm = self.engine.get_global_grad_norm()
        tokens_per_s = g.tokens_per_step / seconds
        world, peak = self.placement.world, self.peak
        # an inner gradient is taken only with more than one chunk
        count = max(totals[3], 1.0)
        return dict(
            step=step + 1,
            loss=totals[0] / (world * g.accumulation),
            lr=lr,
            eta=eta,
            grad_norm=float(grad_norm) if grad_norm is not None else None,
            inner_grad_norm=totals[1] / count,
            inner_grad_norm_max=inner_max,
            inner_clip_fraction=totals[2] / count,
            tokens_per_s=tokens_per_s,
            step_seconds=seconds,
            mfu=(tokens_per_s * self.model_flops / (world * peak)) if peak else None,
            hfu=(tokens_per_s * self.hardware_flops / (world * peak)) if peak else None,
        )

    def evaluate(self) -> dict:
        """Held-out loss with TTT and with the same weights without it (eta = 0), overall and
        beyond the first window; every rank scores its share of the windows, a training
        micro-batch at a time."""
        p = self.placement
        if self._val_windows is None:
            val = WindowReader(self.cfg.data, "val", self.model_cfg.seq_len, self.cfg.seed)
            n_val = min(self.cfg.eval_windows, val.windows_per_epoch)
            windows = val.windows(0, n_val)[p.data_rank :: p.data_size]
            self._val_windows = torch.from_numpy(windows).to(self.device)
        self.objective.eval()
        try:
            return held_out_metrics(
                self.model,
                self._val_windows,
                self.model_cfg.inner_lr,
                self.objective.autocast(self.device),
                self.geometry.micro_batch,
                reduce=lambda v: _all_reduce(v, self.device),
            )
        finally:
            self.objective.train()

    # ---- the loop ------------------------------------------------------------------------------
    def stream(self, stop: int) -> Iterator[tuple[StreamPosition, np.ndarray]]:
        """This rank's batches from the restored data position to step `stop` (one stream per
        data-parallel rank: the tensor-parallel ranks of a group read the same windows)."""
        cfg, p = self.cfg, self.placement
        spec = StreamSpec(
            cfg.data, self.model_cfg.seq_len, self.geometry.sequences, p.data_size, cfg.seed
        )
        start = StreamPosition.from_dict(self.state["position"])
        return worker_stream(
            spec,
            p.data_rank,
            start,
            stop - self.state["step"],
            use_ray_data=p.ray_data and cfg.stream == "ray_data",
            cpus=cfg.data_cpus,
        )

    def fit(self) -> dict:
        """Restore, then train to the end (or --stop-after more steps) with evaluations and
        checkpoints; returns the trainer state (step, position, history, evals)."""
        cfg, total, rank = self.cfg, self.total, self.placement.rank
        self.restore()
        stop = total if not cfg.stop_after else min(total, self.state["step"] + cfg.stop_after)
        resumed_at_end = self.state["step"] >= stop
        progress = Progress(total, self.state["step"], self.spec.run_name, enabled=rank == 0)
        try:
            for step, (position, windows) in zip(
                range(self.state["step"], stop), self.stream(stop)
            ):
                # a Ray Data batch may be read-only: torch needs a writable array to share it
                windows = np.require(windows, requirements="W")
                record = self.train_step(step, torch.from_numpy(windows).to(self.device))
                self.state["history"].append(record)
                self.state["step"], self.state["position"] = step + 1, position.to_dict()
                last = step + 1 == total
                evaluated = bool(cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last
                if evaluated:
                    metrics = self.evaluate()
                    self.state["evals"].append(dict(step=step + 1, **metrics))
                    if rank == 0:
                        _log_eval(step + 1, metrics)
                        self.logger.metrics(
                            {k: v for k, v in metrics.items() if v is not None}, step + 1
                        )
                if rank == 0:
                    self.logger.metrics({k: v for k, v in record.items() if k != "step"}, step + 1)
                progress.update(record)
                # every report carries the latest held-out metrics (what a Tune scheduler compares)
                report = self._report_metrics(record)
                if (step + 1) % cfg.checkpoint_every == 0 or last or step + 1 == stop:
                    self.save(report)
                elif evaluated:
                    self.reporter.report(report)
        finally:
            progress.close()
        if resumed_at_end and self.state["history"]:
            # resumed at the run's last step (the previous invocation ended after its final
            # checkpoint, before its caller saw the report): report that step's metrics again,
            # so a Tune trial or fit's result ends on the final step instead of an older report
            self.reporter.report(self._report_metrics(self.state["history"][-1]))
        return self.state

    def _report_metrics(self, record: dict) -> dict:
        evals = self.state["evals"][-1] if self.state["evals"] else {}
        return {k: v for k, v in {**record, **evals}.items() if v is not None}


def _log_eval(step: int, metrics: dict) -> None:
    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}"

    log.info(
        "[eval] step %d: held-out loss %s (same weights without TTT %s); beyond the first "
        "window %s (without TTT %s)",
        step,
        fmt(metrics["val_loss"]),
        fmt(metrics["val_loss_no_ttt"]),
        fmt(metrics["val_loss_beyond_window"]),
        fmt(metrics["val_loss_beyond_window_no_ttt"]),
    )


# ---- one plain process -------------------------------------------------------------------------
def single_process_group() -> None:
    """A gloo process group of one (what DeepSpeed needs), with the variables a launcher would
    set (DeepSpeed reads LOCAL_RANK). Created once and kept for the life of the process:
    DeepSpeed caches its groups, so a later run in the same process reuses this one."""
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise ConfigError(
                "--local runs one process, but this process is already one rank "
                f"of a group of {dist.get_world_size()}"
            )
        return
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        os.environ[key] = "1" if key == "WORLD_SIZE" else "0"
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def check_local_layout(cfg: TrainConfig) -> None:
    """One process runs one worker without tensor parallelism."""
    if cfg.workers != 1 or cfg.tensor_parallel != 1:
        raise ConfigError(
            f"--local runs one process: --workers {cfg.workers} --tensor-parallel "
            f"{cfg.tensor_parallel} needs Ray (drop --local), or use --workers 1"
        )


def run_local(spec: RunSpec, reporter: Reporter | None = None) -> dict:
    """The whole run in this process (no Ray Train): one worker on this machine's first GPU, or
    the CPU. reporter: LocalReporter unless given (a Tune trial's). Returns the trainer state."""
    check_local_layout(spec.train)
    single_process_group()
    placement = Placement(
        0, 1, torch.device("cuda" if spec.use_gpu else "cpu"), [f"local:{socket.gethostname()}"]
    )
    reporter = reporter or LocalReporter(spec.run_dir, spec.train.keep_checkpoints)
    return Trainer(spec, placement, reporter).fit()


def build_placement(
    rank: int,
    world: int,
    device: torch.device,
    nodes: list[str],
    tensor_parallel: int,
    ray_data: bool = False,
) -> Placement:
    """The placement of a rank of an initialised process group; tensor-parallel groups must not
    span nodes."""
    groups = build_groups(tensor_parallel) if tensor_parallel > 1 else None
    if groups:
        tp = tensor_parallel
        for g in range(world // tp):
            if len(set(nodes[g * tp : (g + 1) * tp])) > 1:
                raise ConfigError(
                    f"tensor-parallel group {g} (ranks {g * tp}..{g * tp + tp - 1}) "
                    "was placed on more than one node; give each node a multiple "
                    f"of {tp} workers (--placement PACK)"
                )
    return Placement(rank, world, device, nodes, groups, ray_data)


__all__ = [
    "LocalReporter",
    "MetaObjective",
    "NonFiniteLoss",
    "Placement",
    "Reporter",
    "RunSpec",
    "Trainer",
    "build_placement",
    "deepspeed_config",
    "eta_at",
    "lr_factor",
    "run_local",
    "single_process_group",
    "warmup_steps",
]
