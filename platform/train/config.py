"""What a distributed training run is: TrainConfig, its batch geometry and the pre-flight checks.

Every check here runs in the driver before any worker starts, so bad input (unknown preset, a
dataset without a manifest, a tokenizer that does not fit the model, too little data, more workers
than the cluster has, storage that cannot be written, ZeRO-3) is one clear error, not a crashed
worker group.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import tyro

from ttte2e.model import PRESETS, TTTConfig, preset
from ttte2e.platform.train.offload import OFFLOAD_MODES, OffloadMode

CompileSetting = Literal["auto", "on", "off"]


def compile_enabled(setting: CompileSetting, device_type: str) -> bool:
    """Whether a run compiles the model: 'auto' compiles on CUDA only (on a CPU the first
    compile takes longer than a short run saves)."""
    return setting == "on" or (setting == "auto" and device_type == "cuda")


class ConfigError(ValueError):
    """A training run's configuration or inputs are unusable; the message says which and why."""


@dataclass
class TrainConfig:
    """A meta-training run (pretraining or context extension) on Ray Train + DeepSpeed."""

    preset: str = "3B"
    """Model preset (ttte2e.model.PRESETS); any model field can be overridden (model_overrides)."""
    # not a flag: the command lines give one flag per model field (platform/cli/train.py)
    model_overrides: Annotated[dict, tyro.conf.Suppress] = field(default_factory=dict)
    """TTTConfig fields changed from the preset, e.g. {'seq_len': 32768}."""
    data: str = ""
    """Prepared dataset (pipelines/prepare_data.py output): local path or s3:// URI."""
    storage: str = "runs"
    """Where checkpoints go (Ray Train storage_path): local path or s3:// URI."""
    name: str = ""
    """Run name (a folder under storage). Re-running with the same name resumes it."""
    resume_from: str = ""
    """Resume from this checkpoint folder (model, optimizer, schedule, data position)."""
    init_from: str = ""
    """Start from this checkpoint's parameters only (fresh optimizer, schedule and data)."""
    workers: int = 1
    """Training workers (one per GPU on GPU clusters)."""
    tensor_parallel: int | Literal["auto"] = 1
    """Workers per tensor-parallel group (consecutive ranks on one node): attention heads, MLP
    widths and the vocabulary split over them; workers = data-parallel ranks x this. 'auto' (with
    --plan): the smallest that fits."""
    offload: OffloadMode | Literal["auto"] = "none"
    """Host offload of what the backward keeps: 'none', 'carries' (the inner loop's remat
    carries), 'prefix' (checkpointed prefix block inputs), 'all' (every saved tensor); 'auto'
    (with --plan): the least offload that fits."""
    device: Literal["auto", "cpu", "gpu"] = "auto"
    """'cpu', 'gpu', or 'auto' (GPUs when the cluster has one per worker)."""
    cpus_per_worker: float = 0.5
    """CPUs reserved per training worker (leave some for Ray Data)."""
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Placement of the workers: PACK, SPREAD or STRICT_SPREAD (one per node)."""
    data_cpus: float = 0.25
    """CPUs per Ray Data operator of each worker's input stream."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 0, 1 or 2 (3 breaks higher-order backward and is refused)."""
    compile: CompileSetting = "auto"
    """Compile the meta step (torch.compile; the inner gradient by torch.func): 'on', 'off', or
    'auto' = on for CUDA, off on CPU. --compile / --no-compile are short for on / off."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """'fp32', 'bf16' (autocast; fast weights, inner grads and clip norm stay fp32) or 'auto'
    (bf16 on GPU, fp32 on CPU)."""
    batch_tokens: int = 1 << 20
    """Global batch in tokens per optimizer step (a multiple of seq_len)."""
    micro_batch: int = 1
    """Sequences per worker per forward/backward; gradient accumulation covers the rest."""
    tokens: int = 54_000_000_000
    """Token budget (paper: 54B = 1x Chinchilla at 3B; 164B for its headline run)."""
    steps: int = 0
    """Optimizer steps; 0 = tokens / batch_tokens."""
    lr: float = 8e-4
    """Peak outer learning rate."""
    min_lr: float = 1e-5
    """Final learning rate of the cosine decay."""
    warmup_fraction: float = 0.1
    """Fraction of the steps of linear warm-up (outer lr, and the inner eta ramp)."""
    eta_ramp: bool = True
    """Ramp the inner learning rate 0.1x -> 1x over the warm-up (off: eta = inner_lr throughout)."""
    weight_decay: float = 0.1
    """AdamW weight decay (all parameters, as the paper)."""
    grad_clip: float = 1.0
    """Outer global-norm gradient clip."""
    eval_every: int = 500
    """Score the held-out split every N steps and at the end (0 = only at the end)."""
    eval_windows: int = 32
    """Held-out windows per evaluation (split over the workers)."""
    checkpoint_every: int = 1000
    """Checkpoint every N steps and at the end."""
    keep_checkpoints: int = 3
    """Checkpoints kept in storage (the newest)."""
    stop_after: int = 0
    """End this invocation after N more steps, with a checkpoint (0 = run to the end); running
    the same command again (same name) resumes. For time-limited allocations."""
    max_failures: int = 3
    """Worker-group restarts from the last checkpoint before the run fails (-1 = no limit; errors
    no restart can fix, e.g. a bad setting or the same non-finite step twice, are never retried)."""
    extend_steps: bool = False
    """Allow resuming a run with a larger --steps (the cosine schedule is re-stretched over the
    new total from the checkpoint's step on); any other change of the run refuses to resume."""
    stream: Literal["ray_data", "in_worker"] = "ray_data"
    """Input stream: 'ray_data' (reading in Ray Data actors) or 'in_worker' (no Ray Data)."""
    tracking_uri: str = ""
    """MLflow tracking URI; empty = MLFLOW_TRACKING_URI or sqlite beside local storage; 'off'."""
    experiment: str = "ttte2e"
    """MLflow experiment."""
    register_as: str = ""
    """Register the final checkpoint in the MLflow model registry under this name (empty = no)."""
    register_alias: str = "candidate"
    """Alias the registered version gets (promote it with pipelines/registry.py promote)."""
    peak_tflops: float = 0.0
    """Per-device peak TFLOP/s for MFU; 0 = from the GPU model (on CPU MFU is reported n/a)."""
    seed: int = 0
    """Seed of the model init and the data order."""

    # ---- derived -------------------------------------------------------------------------------
    def model_config(self) -> TTTConfig:
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        overrides = dict(self.model_overrides)
        for name, value in overrides.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"model field {name} = {value}: not a finite number")
        try:
            if "ttt_fraction" in overrides:  # a convenience: the fraction picks n_ttt_blocks
                return preset(self.preset).replace(**overrides)
            return preset(self.preset, **overrides)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model: {e}") from None

    def run_name(self) -> str:
        return self.name or f"{self.preset.lower()}-{uuid.uuid4().hex[:6]}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return cls(**data)


@dataclass(frozen=True)
class BatchGeometry:
    """How one optimizer step's global batch is spread: data-parallel ranks x micro_batch x
    accumulation (the tensor-parallel ranks of a group share their sequences)."""

    seq_len: int
    sequences: int  # per optimizer step, all workers
    workers: int
    micro_batch: int
    accumulation: int
    steps: int
    tensor_parallel: int = 1

    @property
    def data_parallel(self) -> int:
        return self.workers // self.tensor_parallel

    @property
    def per_worker(self) -> int:
        """Sequences per data-parallel rank per step."""
        return self.sequences // self.data_parallel

    @property
    def tokens_per_step(self) -> int:
        return self.sequences * self.seq_len


def batch_geometry(cfg: TrainConfig, model: TTTConfig) -> BatchGeometry:
    t = model.seq_len
    if cfg.batch_tokens < t or cfg.batch_tokens % t:
        raise ConfigError(
            f"batch_tokens {cfg.batch_tokens} is not a positive multiple of seq_len {t}"
        )
    sequences = cfg.batch_tokens // t
    if cfg.workers < 1 or cfg.micro_batch < 1:
        raise ConfigError("workers and micro_batch must be >= 1")
    tp = tensor_parallel_size(cfg)
    if cfg.workers % tp:
        raise ConfigError(
            f"--tensor-parallel {tp} does not divide --workers {cfg.workers} "
            "(workers = data-parallel ranks x tensor-parallel)"
        )
    dp = cfg.workers // tp
    if sequences % (dp * cfg.micro_batch):
        raise ConfigError(
            f"{sequences} sequences per step (batch_tokens / seq_len) do not split "
            f"into {dp} data-parallel ranks ({cfg.workers} workers / tensor-"
            f"parallel {tp}) x micro_batch {cfg.micro_batch}"
        )
    steps = cfg.steps or cfg.tokens // cfg.batch_tokens
    if steps < 1:
        raise ConfigError(
            f"token budget {cfg.tokens} is less than one batch of {cfg.batch_tokens} tokens"
        )
    return BatchGeometry(
        t, sequences, cfg.workers, cfg.micro_batch, sequences // (dp * cfg.micro_batch), steps, tp
    )


def literal_choices(kind) -> tuple | None:
    """The values a Literal type (or a union of Literals) allows; None for any other type."""
    if typing.get_origin(kind) is Literal:
        return typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        parts = [literal_choices(a) for a in typing.get_args(kind)]
        if all(p is not None for p in parts):
            return tuple(v for p in parts for v in p)
    return None


def check_choices(obj) -> None:
    """Every field typed as a choice (Literal) of a dataclass holds one of its values: the command
    line checks them as it parses; this covers configs built in code or read from files."""
    for name, kind in typing.get_type_hints(type(obj)).items():
        allowed = literal_choices(kind)
        value = getattr(obj, name)
        if allowed is not None and value not in allowed:
            raise ConfigError(
                f"--{name.replace('_', '-')} {value!r}: choose one of "
                + ", ".join(map(str, allowed))
            )


def tensor_parallel_size(cfg: TrainConfig) -> int:
    """The run's tensor-parallel size ('auto' is resolved by --plan, not by a run)."""
    tp = cfg.tensor_parallel
    if tp == "auto":
        raise ConfigError(
            "--tensor-parallel auto is a --plan choice (the plan prints the size "
            "it picks); give a number to train"
        )
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ConfigError(f"--tensor-parallel {tp!r}: a positive integer")
    return tp


def check_parallel_layout(cfg: TrainConfig, model: TTTConfig) -> None:
    """Tensor parallelism and offload settings that cannot work, named before anything starts."""
    from ttte2e.platform.train.tensor_parallel import layout_problems

    tp = tensor_parallel_size(cfg)
    problems = layout_problems(model, tp)
    if problems:
        raise ConfigError("; ".join(problems) + f" (preset {cfg.preset})")
    if cfg.offload == "auto":
        raise ConfigError(
            "--offload auto is a --plan choice (the plan prints the mode it picks); "
            f"give one of {', '.join(OFFLOAD_MODES)} to train"
        )
    if cfg.offload == "carries" and model.remat == "none":
        raise ConfigError(
            "--offload carries moves the inner loop's remat carries to host memory: "
            "remat 'none' keeps no carries (use --remat chunk or nested)"
        )
    if tp > 1 and cfg.placement in ("SPREAD", "STRICT_SPREAD"):
        raise ConfigError(
            f"--placement {cfg.placement} spreads workers over nodes; a tensor-"
            "parallel group runs within one node: use PACK or STRICT_PACK"
        )
    if cfg.offload == "prefix" and not model.checkpoint_prefix:
        raise ConfigError(
            "--offload prefix moves the checkpointed prefix block inputs to host "
            "memory: it needs --checkpoint-prefix True"
        )


def check_options(cfg: TrainConfig) -> tuple[TTTConfig, BatchGeometry]:
    """Checks that need no data, storage or cluster."""
    model = cfg.model_config()
    if cfg.zero_stage == 3:
        with_tp = (
            " (and tensor parallelism already splits the weights; ZeRO-1/2 shard the "
            "optimizer over the data-parallel ranks)"
            if cfg.tensor_parallel not in (1, "1")
            else ""
        )
        raise ConfigError(
            "ZeRO stage 3 partitions parameters and breaks the repeated/higher-order "
            f"backward of the meta-objective; use zero_stage 1 or 2{with_tp}"
        )
    if cfg.zero_stage not in (0, 1, 2):
        raise ConfigError(f"zero_stage {cfg.zero_stage}: choose 0, 1 or 2")
    check_choices(cfg)
    if cfg.resume_from and cfg.init_from:
        raise ConfigError(
            "resume_from and init_from are exclusive (resume continues a run; "
            "init_from starts a new one from parameters)"
        )
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{f.name} = {value}: not a finite number")
    for name in ("lr", "grad_clip", "cpus_per_worker", "data_cpus"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name} must be > 0, got {getattr(cfg, name)}")
    for name in ("min_lr", "weight_decay", "peak_tflops", "steps", "eval_every", "stop_after"):
        if getattr(cfg, name) < 0:
            raise ConfigError(
                f"{name} must be >= 0, got {getattr(cfg, name)}"
                + (" (0 = tokens / batch_tokens)" if name == "steps" else "")
                + (" (0 = only at the end)" if name == "eval_every" else "")
                + (" (0 = run to the end)" if name == "stop_after" else "")
            )
    if cfg.min_lr > cfg.lr:
        raise ConfigError(f"min_lr {cfg.min_lr} is above the peak lr {cfg.lr}")
    if cfg.tokens < 1:
        raise ConfigError(f"tokens must be >= 1, got {cfg.tokens}")
    if cfg.max_failures < -1:
        raise ConfigError(f"max_failures must be >= 0, or -1 for no limit; got {cfg.max_failures}")
    for name in ("name", "experiment"):
        value = getattr(cfg, name)
        if value and (not re.fullmatch(r"[A-Za-z0-9][\w.-]*", value) or ".." in value):
            raise ConfigError(
                f"{name} {value!r}: a plain name (letters, digits, '_', '-', '.'; "
                "no '/' or '..'): runs live in folders under --storage"
            )
    if not 0 <= cfg.warmup_fraction < 1:
        raise ConfigError("warmup_fraction must be in [0, 1)")
    if cfg.checkpoint_every < 1 or cfg.keep_checkpoints < 1 or cfg.eval_windows < 1:
        raise ConfigError("checkpoint_every, keep_checkpoints and eval_windows must be >= 1")
    if cfg.register_as:
        if cfg.tracking_uri == "off":
            raise ConfigError("register_as needs MLflow: drop --tracking-uri off")
        if not re.fullmatch(r"[\w.-]+", cfg.register_as):
            raise ConfigError(
                f"register_as {cfg.register_as!r}: use letters, digits, '_', '-', '.'"
            )
        if not re.fullmatch(r"[A-Za-z_][\w-]*", cfg.register_alias or "_"):
            raise ConfigError(f"register_alias {cfg.register_alias!r}: a name like candidate")
    geometry = batch_geometry(cfg, model)
    check_parallel_layout(cfg, model)
    return model, geometry


def check_data(cfg: TrainConfig, model: TTTConfig, geometry: BatchGeometry) -> dict:
    """The dataset exists, its tokenizer fits the model, and it holds a global batch and an
    evaluation's worth of windows. Returns facts for the log."""
    from ttte2e.platform.data.manifest import DataError, check_shard_sizes, read_manifest
    from ttte2e.platform.data.stream import WindowReader

    if not cfg.data:
        raise ConfigError(
            "no dataset given (--data: a folder written by pipelines/prepare_data.py)"
        )
    try:
        manifest = read_manifest(cfg.data)
        # every shard the run reads exists with its recorded size (one listing of the folder);
        # checksums are verified as each row group is first read
        check_shard_sizes(cfg.data, manifest)
    except (DataError, OSError) as e:
        raise ConfigError(str(e)) from None
    tok = manifest["tokenizer"]
    if tok["vocab_size"] > model.vocab_size:
        raise ConfigError(
            f"{cfg.data}: tokenizer has {tok['vocab_size']} tokens, the model's "
            f"vocabulary only {model.vocab_size} (preset {cfg.preset}); use a model "
            "with vocab_size >= the tokenizer's, or re-tokenize"
        )
    if tok["bos_id"] != model.bos_token_id:
        raise ConfigError(
            f"{cfg.data}: tokenizer BOS id {tok['bos_id']} != the model's "
            f"bos_token_id {model.bos_token_id}"
        )
    train = WindowReader(cfg.data, "train", model.seq_len, cfg.seed)
    if train.windows_per_epoch < geometry.sequences:
        raise ConfigError(
            f"{cfg.data}: the train split packs into {train.windows_per_epoch} "
            f"windows of T+1 = {model.seq_len + 1} tokens, fewer than one global "
            f"batch of {geometry.sequences}"
        )
    try:
        val = WindowReader(cfg.data, "val", model.seq_len, cfg.seed)
        val_windows = val.windows_per_epoch
    except ValueError:
        val_windows = 0
    if val_windows < 1:
        raise ConfigError(
            f"{cfg.data}: the held-out split has no window of T+1 = "
            f"{model.seq_len + 1} tokens (prepare with a larger --val-fraction)"
        )
    steps_per_epoch = train.windows_per_epoch // geometry.sequences
    return dict(
        dataset_key=manifest["dataset_key"],
        train_windows=train.windows_per_epoch,
        val_windows=val_windows,
        skipped_per_epoch=train.windows_per_epoch - steps_per_epoch * geometry.sequences,
        steps_per_epoch=steps_per_epoch,
        epochs=geometry.steps / steps_per_epoch,
        vocab=tok["vocab_size"],
    )


def check_storage(uri: str) -> None:
    """The storage folder can be written (a probe file is written and removed)."""
    from ttte2e.platform.data.storage import resolve

    try:
        loc = resolve(uri)
        loc.ensure_bucket()
        probe = loc.join(f".write-probe-{uuid.uuid4().hex[:8]}")
        probe.write_bytes(b"ok")
        probe.delete()
    except (OSError, ValueError) as e:
        raise ConfigError(f"storage {uri!r} cannot be written: {e}") from None


@dataclass(frozen=True)
class Preflight:
    """What the pre-flight found: the config with absolute URIs, and the facts of its run."""

    cfg: TrainConfig
    model: TTTConfig
    geometry: BatchGeometry
    data: dict  # check_data's facts
    tracking_uri: str | None  # None: MLflow off


def preflight(cfg: TrainConfig) -> Preflight:
    """The checks a run (and a sweep, for its base config) passes before Ray starts: options,
    data, storage, the MLflow store. Local paths become absolute (workers run in other folders
    and on other nodes)."""
    from ttte2e.platform.data.storage import resolve
    from ttte2e.platform.registry import tracking
    from ttte2e.platform.registry.model_registry import check_tracking

    model, geometry = check_options(cfg)
    cfg = dataclasses.replace(
        cfg,
        **{
            k: resolve(getattr(cfg, k)).uri
            for k in ("data", "storage", "resume_from", "init_from")
            if getattr(cfg, k)
        },
    )
    facts = check_data(cfg, model, geometry)
    check_storage(cfg.storage)
    uri = tracking.tracking_uri(cfg.tracking_uri, cfg.storage)
    if uri:
        try:  # before Ray starts: a dead server costs seconds, not a cluster start
            check_tracking(uri)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(
                f"MLflow tracking at {tracking.redact(uri)} is unusable "
                f"({type(e).__name__}: {tracking.redact(str(e))[:300]}); fix it or "
                "pass --tracking-uri off"
            ) from None
    return Preflight(cfg, model, geometry, facts, uri)


def cpus_needed(cfg: TrainConfig) -> float:
    """CPUs a run reserves: its workers and their Ray Data readers."""
    data = 0 if cfg.stream == "in_worker" else cfg.data_cpus * cfg.workers
    return cfg.workers * cfg.cpus_per_worker + data


def check_group_fits_a_node(cfg: TrainConfig, nodes: list[dict], use_gpu: bool) -> None:
    """A tensor-parallel group's workers must fit on one node (nodes: each alive node's Ray
    resources)."""
    tp = tensor_parallel_size(cfg)
    if tp == 1 or not nodes:
        return
    unit, need = ("GPU", 1.0) if use_gpu else ("CPU", cfg.cpus_per_worker)
    most = max(int(n.get(unit, 0) // need + 1e-9) for n in nodes)
    if most < tp:
        raise ConfigError(
            f"--tensor-parallel {tp} is larger than a node holds: the largest node "
            f"fits {most} workers ({unit}s per worker {need:g}); a tensor-parallel "
            "group runs within one node"
        )


def check_resources(cfg: TrainConfig, resources: dict) -> bool:
    """Whether to use GPUs; refuses a run that asks for more than the cluster has."""
    gpus, cpus = resources.get("GPU", 0), resources.get("CPU", 0)
    use_gpu = cfg.device == "gpu" or (cfg.device == "auto" and gpus >= cfg.workers)
    if use_gpu and gpus < cfg.workers:
        raise ConfigError(f"{cfg.workers} GPU workers requested, the cluster has {gpus:g} GPUs")
    data = 0 if cfg.stream == "in_worker" else cfg.data_cpus * cfg.workers
    need = cpus_needed(cfg)
    if need > cpus + 1e-9:
        raise ConfigError(
            f"{cfg.workers} workers x {cfg.cpus_per_worker} CPUs + {data:g} CPUs of "
            f"data readers = {need:g} CPUs; the cluster has {cpus:g} CPUs"
        )
    return use_gpu


# DeepSpeed's gradient buckets, in elements (fp32 gradients: 4 bytes each). Its default, 5e8,
# reserves 2 GB per bucket (two with overlap_comm) on every GPU; 5e7 (200 MB) still sends few,
# large messages. plan.py counts the buckets.
BUCKET_ELEMENTS = 50_000_000


def zero_optimization(stage: int) -> dict:
    """ZeRO settings. Stage 1 (the default) reduces the gradients once per optimizer step, at the
    last micro-step of the accumulation, overlapped with that backward (overlap_comm; DeepSpeed
    skips the reduction in the other micro-steps); stage 2 reduce-scatters at every micro-step,
    trading that traffic for 1/D of the gradient memory."""
    if stage == 0:
        return {"stage": 0}
    return {
        "stage": stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_scatter": True,
        "reduce_bucket_size": BUCKET_ELEMENTS,
        "allgather_bucket_size": BUCKET_ELEMENTS,
    }
