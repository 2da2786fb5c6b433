"""Capacity plan of a training run, without training: parameters, FLOPs per token, memory per GPU,
wall-clock for the token budget; with `--tensor-parallel auto` / `--offload auto` the layout that
fits with the fewest bytes moved. Estimates from the config; the assumptions are printed with them.

Memory model (bytes per GPU; m sequences of T tokens per micro-batch; N tensor-parallel ranks; D
data-parallel ranks share the ZeRO state). What the forward saves was counted with saved-tensor
hooks (tests/test_plan.py counts it again at small shapes and compares), not assumed:
- weights 4P/N' (fp32; bf16 is autocast), gradients 4P/N' (/D under ZeRO-2), AdamW m + v 8P/N'
  (/D under ZeRO-1 and 2); N' = N for the split weights, 1 for the norm gains. Under bf16,
  autocast's bf16 copies of the split weights (2P/N': the matmuls save them for the backward).
  ZeRO 1/2 (DeepSpeed with fp32 parameters): its fp32 copy of the rank's partition (4P/(N' D))
  and two gradient buckets of BUCKET_ELEMENTS fp32 (contiguous_gradients, overlap_comm).
- prefix blocks (first order), per token and block, fp32: 21 d + 4 I floats (the norms keep their
  input, the normalised and the scaled value; q/k norms, rotated q/k and v, attention output and
  its flattened copy, SwiGLU's h1, silu(h1), h3 and their product); under bf16 autocast 48 d bytes
  stay fp32 (the residual stream, the norms) and 25 d + 8.75 I bytes are bf16. Under tensor
  parallelism the prefix runs sequence-parallel: only the two gathered matmul inputs (2 d, in the
  compute dtype) are whole, the rest is 1/N. checkpoint_prefix keeps each block's input (its
  slice) and one block's full set during its recompute.
- suffix: the input h (T d fp32, whole on every rank) and its gradient; the inner-loop carry per
  sequence and TTT block: fast weights 3 d I fp32 and KV caches 2 (k + b) d fp32 (also under bf16:
  they are built from the fp32 residual stream; a cache is a view of [cache; chunk]), 1/N each;
  remat 'none' keeps n = T/b carries and every chunk's graph, 'chunk' n carries, 'nested'
  ceil(n/g) + g; plus one chunk's double-backward graph (a least-squares fit to hook counts at
  small shapes; the whole step is checked by bench_parallel): 45 b d (whole) + 24 b I + 2.65 k d
  + 3 d I floats per TTT block and the LM head's b V (its probabilities, vocabulary split over N;
  remat 'none' keeps one per chunk), plus b V while its backward runs.
- offload moves to pinned host memory what it names: 'carries' the carries, 'prefix' the
  checkpointed block inputs, 'all' both plus every stored prefix activation and the suffix input;
  the host needs that much per GPU (printed), each tensor rounded up to a power of two as the
  pinned allocator does. The inner loop keeps only the last carry referenced, so moved carries
  leave the device during the forward.
- reserve: 1 GiB (CUDA context, NCCL buffers) + 5% of the rest (allocator fragmentation); the
  capacity is the memory torch reports (USABLE_GIB: 79.1 GiB on an H100), not the name's figure.
Validated (pipelines/bench/bench_parallel.py): the measured peak of one meta step per rank at
TP=1 and TP=2, fp32 and CPU bf16 autocast, against `step` below; and a 3B tensor-parallel rank on
fake tensors (pipelines/bench/fake_plan_check.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ttte2e.model import TTTConfig, count_parameters, estimate_flops
from ttte2e.platform.train.config import (
    BUCKET_ELEMENTS,
    ConfigError,
    TrainConfig,
    batch_geometry,
)
from ttte2e.platform.train.offload import OFFLOAD_MODES

GPU_SPECS = {  # dense bf16 TFLOP/s, memory GiB (the one table: plans and the trainer's MFU)
    "h100": (989.0, 80),
    "h200": (989.0, 141),
    "a100": (312.0, 80),
    "l40s": (362.0, 48),
    "a10g": (125.0, 24),
    "l4": (121.0, 24),
}
# What a process can hold: torch.cuda.get_device_properties(...).total_memory, GiB (below the
# name's figure: ECC, the driver's reservations); the CUDA context and NCCL's buffers come out of
# it too (counted in the reserve)
USABLE_GIB = {"h100": 79.1, "h200": 139.8, "a100": 79.3, "l40s": 44.4, "a10g": 22.1, "l4": 21.9}


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU by its device name (e.g. 'NVIDIA H100 80GB HBM3'); None if
    unknown."""
    name = device_name.lower()
    for key, (tflops, _) in GPU_SPECS.items():
        if key in name:
            return tflops
    return None


GIB = 1 << 30


@dataclass
class MemoryEstimate:
    seq_len: int
    weights: float
    grads: float
    optimizer: float
    prefix_activations: float
    suffix_carries: float
    suffix_working: float
    autocast_copies: float = 0.0  # bf16 copies of the weights autocast keeps for the backward
    zero_buffers: float = 0.0  # DeepSpeed's fp32 partition copy and gradient buckets
    host: float = 0.0  # pinned host memory the offload needs, per GPU (rounded as allocated)
    tensor_parallel: int = 1
    offload: str = "none"

    @property
    def step(self) -> float:
        """What one meta step adds on top of the weights and optimizer state (its peak)."""
        return (
            self.grads
            + self.autocast_copies
            + self.prefix_activations
            + self.suffix_carries
            + self.suffix_working
        )

    @property
    def state(self) -> float:
        """What stays allocated between steps: weights, optimizer state, ZeRO's buffers."""
        return self.weights + self.optimizer + self.zero_buffers

    @property
    def reserve(self) -> float:
        """The CUDA context and NCCL's buffers (1 GiB) + 5% allocator fragmentation."""
        return GIB + 0.05 * (self.state + self.step)

    @property
    def total(self) -> float:
        return self.state + self.step + self.reserve


def _split_parameters(model: TTTConfig) -> tuple[int, int]:
    """(parameters split under tensor parallelism, whole ones: the norm gains)."""
    total = count_parameters(model)
    whole = (
        model.n_layers * (4 * model.d_model + 2 * model.head_dim)
        + model.d_model
        + 2 * model.n_ttt_blocks * model.d_model
    )
    return total - whole, whole


def memory_per_gpu(
    model: TTTConfig,
    seq_len: int,
    zero_stage: int,
    gpus: int,
    micro_batch: int,
    bf16: bool = True,
    tensor_parallel: int = 1,
    offload: str = "none",
) -> MemoryEstimate:
    """gpus: the data-parallel ranks that share the ZeRO state."""
    m = model.replace(seq_len=seq_len)
    n_tp = tensor_parallel
    split, whole = _split_parameters(m)
    p = split / n_tp + whole
    d, hidden, t, b, k, v = (
        m.d_model,
        m.mlp_hidden,
        seq_len,
        m.chunk_size,
        m.attn_window,
        m.vocab_size,
    )
    n_prefix, n_suffix = m.n_prefix_blocks, m.n_ttt_blocks
    # prefix, bytes per token and block: (whole on every rank, split over the ranks)
    if bf16:
        gathered, full = 2 * 2 * d, 48 * d + 25 * d + 8.75 * hidden
    else:
        gathered, full = 2 * 4 * d, 4 * (21 * d + 4 * hidden)
    per_block = (gathered + (full - gathered) / n_tp) if n_tp > 1 else full
    if m.checkpoint_prefix:
        kept = n_prefix * 4 * d / n_tp  # each block's input: its slice of the residual stream
        prefix_kept, prefix_live = micro_batch * t * kept, micro_batch * t * per_block
    else:
        prefix_kept, prefix_live = micro_batch * t * n_prefix * per_block, 0.0
    n = t // b
    # the KV caches are float32 under autocast too: Carry.initial makes them from the (fp32)
    # suffix input, and [cache; chunk] promotes the bf16 keys
    fast, cache = 3 * d * hidden * 4 / n_tp, 2 * (k + b) * d * 4 / n_tp
    carry = n_suffix * (fast + cache)
    if m.remat == "nested":
        g = m.remat_group_size(n)
        carries = math.ceil(n / g) + g
    else:
        carries = n
    # the fused head keeps one [b, V] float32 buffer (the probabilities) per chunk; its backward
    # adds one more while it runs
    head_kept = head_backward = b * v * 4 / n_tp
    chunk_graph = (
        n_suffix * 4 * (45 * b * d + (24 * b * hidden + 2.65 * k * d + 3 * d * hidden) / n_tp)
        + head_kept
    )
    suffix_in = 2 * t * d * 4  # the prefix output and its gradient, whole on every rank
    kept_carries = micro_batch * carries * carry
    unrolled = micro_batch * n * chunk_graph if m.remat == "none" else 0.0
    working = micro_batch * (suffix_in + chunk_graph + head_backward) + prefix_live
    # host: all of it is there at the end of the forward; on the GPU, what the backward has
    # brought back at a time (the carry, or the prefix block, it is working on)
    # pinned host memory is allocated per tensor, each rounded up to a power of two
    host = 0.0
    if offload in ("carries", "all") and m.remat != "none":
        per_carry = n_suffix * (
            3 * _pinned(micro_batch * d * hidden * 4 / n_tp)
            + 2 * _pinned(micro_batch * (k + b) * d * 4 / n_tp)
        )
        host += carries * per_carry
        kept_carries = micro_batch * carry
    if offload in ("prefix", "all") and m.checkpoint_prefix:
        host += n_prefix * _pinned(micro_batch * t * 4 * d / n_tp)
        prefix_kept = 0.0
    if offload == "all" and not m.checkpoint_prefix:
        host += _pinned(prefix_kept / max(1, n_prefix)) * n_prefix
        prefix_kept = micro_batch * t * per_block
    # autocast casts each weight a matmul uses to bf16 once per forward and the matmuls save the
    # copies for the backward: the split weights, once
    copies = 2 * split / n_tp if bf16 else 0.0
    # ZeRO 1/2 (DeepSpeed, fp32 parameters): a float32 copy of the rank's partition, and the
    # gradient buckets (contiguous_gradients; two with overlap_comm), fp32
    if zero_stage >= 1:
        zero_buffers = 4 * p / gpus + 2 * 4 * BUCKET_ELEMENTS
    else:
        zero_buffers = 0.0
    return MemoryEstimate(
        seq_len=t,
        weights=4 * p,
        grads=4 * p / (gpus if zero_stage >= 2 else 1),
        optimizer=8 * p / (gpus if zero_stage >= 1 else 1),
        prefix_activations=prefix_kept,
        suffix_carries=kept_carries + unrolled,
        suffix_working=working,
        autocast_copies=copies,
        zero_buffers=zero_buffers,
        host=host,
        tensor_parallel=n_tp,
        offload=offload,
    )


def _pinned(nbytes: float) -> float:
    """Bytes the pinned host allocator takes for a tensor of nbytes (the next power of two)."""
    return float(1 << max(0, math.ceil(math.log2(max(nbytes, 1)))))


OFFLOAD_ORDER = OFFLOAD_MODES  # by what they move, least first


def tensor_parallel_choices(model: TTTConfig, gpus_per_node: int) -> list[int]:
    from ttte2e.platform.train.tensor_parallel import layout_problems

    sizes = [1 << i for i in range(8) if (1 << i) <= gpus_per_node]
    return [n for n in sizes if not layout_problems(model, n)]


def communication_bytes(
    model: TTTConfig, seq_len: int, tensor_parallel: int, bf16: bool = True
) -> float:
    """Bytes a rank sends per sequence for tensor parallelism (ring collectives): the prefix's
    4 gathers / reduce-scatters per block (forward, recompute-free backward) and the suffix's 3
    all-reduces per TTT block and chunk, in the forward, the inner gradient and the outer
    backward (2 ways each)."""
    n = tensor_parallel
    if n == 1:
        return 0.0
    act = 2 if bf16 else 4
    d, t = model.d_model, seq_len
    share = (n - 1) / n
    prefix = model.n_prefix_blocks * 4 * 2 * t * d * act * share
    suffix = model.n_ttt_blocks * 3 * 4 * 2 * t * d * 4 * share
    return prefix + suffix


def choose_layout(
    model: TTTConfig,
    seq_len: int,
    zero_stage: int,
    workers: int,
    gpus_per_node: int,
    sequences: int,
    micro_batch: int,
    bf16: bool,
    gpu_bytes: float,
    tensor_parallel,
    offload,
) -> tuple[int, str, list[dict]]:
    """(tensor parallel size, offload mode, the candidates considered): the fitting candidate that
    moves the fewest bytes (tensor-parallel traffic + host copies, both ways), else the smallest."""
    from ttte2e.platform.train.tensor_parallel import layout_problems

    if tensor_parallel != "auto":
        problems = layout_problems(model, int(tensor_parallel))
        if int(tensor_parallel) > gpus_per_node:
            problems.append(
                f"tensor parallelism {tensor_parallel} is more than the "
                f"{gpus_per_node} GPUs of a node"
            )
        if problems:
            raise ConfigError("; ".join(problems))
    if offload != "auto" and offload not in OFFLOAD_ORDER:
        raise ConfigError(f"--offload {offload!r}: choose one of {OFFLOAD_ORDER} or auto")
    sizes = (
        tensor_parallel_choices(model, gpus_per_node)
        if tensor_parallel == "auto"
        else [int(tensor_parallel)]
    )
    modes = OFFLOAD_ORDER if offload == "auto" else (offload,)
    candidates = []
    for n in sizes:
        dp = max(1, workers // n)
        if tensor_parallel == "auto" and (workers % n or sequences % (dp * micro_batch)):
            continue
        for mode in modes:
            if offload == "auto" and (
                (mode == "carries" and model.remat == "none")
                or (mode == "prefix" and not model.checkpoint_prefix)
            ):
                continue
            e = memory_per_gpu(model, seq_len, zero_stage, dp, micro_batch, bf16, n, mode)
            moved = communication_bytes(model, seq_len, n, bf16) * micro_batch + 2 * e.host
            candidates.append(
                dict(
                    tensor_parallel=n,
                    offload=mode,
                    total=e.total,
                    moved=moved,
                    fits=e.total <= gpu_bytes,
                )
            )
    if not candidates:
        raise ConfigError(
            f"--tensor-parallel auto: no size up to a node's {gpus_per_node} GPUs "
            f"splits the model and {sequences} sequences per step over {workers} "
            "GPUs (data-parallel ranks x tensor-parallel)"
        )
    fitting = [c for c in candidates if c["fits"]]
    best = (
        min(fitting, key=lambda c: (c["moved"], c["tensor_parallel"]))
        if fitting
        else min(candidates, key=lambda c: c["total"])
    )
    return best["tensor_parallel"], best["offload"], candidates


def capacity_plan(
    cfg: TrainConfig,
    nodes: int,
    gpus_per_node: int,
    gpu: str = "h100",
    mfu: float = 0.3,
    contexts: tuple[int, ...] = (8192, 131072),
) -> dict:
    if gpu.lower() not in GPU_SPECS:
        raise ValueError(f"unknown GPU {gpu!r}; known: {sorted(GPU_SPECS)}")
    if nodes < 1 or gpus_per_node < 1 or not 0 < mfu <= 1:
        raise ValueError("nodes and gpus-per-node must be >= 1 and mfu in (0, 1]")
    model = cfg.model_config()
    gpus = nodes * gpus_per_node
    peak, mem_gib = GPU_SPECS[gpu.lower()]
    usable_gib = USABLE_GIB[gpu.lower()]
    bf16 = cfg.precision != "fp32"
    flops = {}
    for t in sorted(set(contexts) | {model.seq_len}):
        f = estimate_flops(model, seq_len=t)
        flops[t] = dict(meta=f.meta_step, swa=f.swa_step, full_attention=f.full_attention_step)
    meta_terms = estimate_flops(model).meta_terms.table()
    layouts = {}
    for t in sorted(set(contexts) | {model.seq_len}):
        sequences = max(1, cfg.batch_tokens // t)
        layouts[t] = choose_layout(
            model.replace(seq_len=t),
            t,
            cfg.zero_stage,
            gpus,
            gpus_per_node,
            sequences,
            cfg.micro_batch,
            bf16,
            usable_gib * GIB,
            cfg.tensor_parallel,
            cfg.offload,
        )
    tp, offload, _ = layouts[model.seq_len]
    plan_cfg = TrainConfig(
        **{**cfg.to_dict(), "workers": gpus, "tensor_parallel": tp, "offload": offload}
    )
    try:
        geometry = batch_geometry(plan_cfg, model)
        micro = geometry.micro_batch
        steps, accumulation = geometry.steps, geometry.accumulation
    except ValueError as e:
        micro, steps, accumulation = (
            cfg.micro_batch,
            cfg.steps or cfg.tokens // cfg.batch_tokens,
            None,
        )
        geometry_note = str(e)
    else:
        geometry_note = ""
    tokens = steps * cfg.batch_tokens
    seconds = tokens * flops[model.seq_len]["meta"] / (gpus * peak * 1e12 * mfu)
    memory = {}
    for t in contexts:
        n, mode, _ = layouts[t]
        memory[t] = memory_per_gpu(
            model, t, cfg.zero_stage, max(1, gpus // n), micro, bf16, n, mode
        )
    return dict(
        preset=cfg.preset,
        model=model,
        parameters=count_parameters(model),
        gpus=gpus,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        gpu=gpu.lower(),
        gpu_memory_gib=mem_gib,
        usable_gib=usable_gib,
        peak_tflops=peak,
        mfu=mfu,
        flops=flops,
        meta_terms=meta_terms,
        memory=memory,
        tokens=tokens,
        steps=steps,
        accumulation=accumulation,
        geometry_note=geometry_note,
        seconds=seconds,
        zero_stage=cfg.zero_stage,
        tensor_parallel=tp,
        offload=offload,
        auto=dict(tensor_parallel=cfg.tensor_parallel == "auto", offload=cfg.offload == "auto"),
    )


def format_plan(plan: dict) -> str:
    m: TTTConfig = plan["model"]
    lines = [
        f"Capacity plan: preset {plan['preset']} on {plan['nodes']} x {plan['gpus_per_node']} "
        f"{plan['gpu'].upper()} ({plan['gpus']} GPUs, {plan['gpu_memory_gib']} GiB each), "
        f"ZeRO-{plan['zero_stage']}, remat {m.remat}, checkpoint_prefix {m.checkpoint_prefix}",
        f"  parameters        {plan['parameters'] / 1e9:.3f} B ({m.n_layers} layers, d {m.d_model}, "
        f"{m.n_heads} heads, MLP {m.mlp_hidden}, {m.n_ttt_blocks} TTT blocks, vocab {m.vocab_size})",
        f"  layout at T={m.seq_len}  tensor-parallel {plan['tensor_parallel']}"
        + (" (auto)" if plan["auto"]["tensor_parallel"] else "")
        + f" x data-parallel {plan['gpus'] // plan['tensor_parallel']}, offload {plan['offload']}"
        + (" (auto)" if plan["auto"]["offload"] else ""),
        "  training FLOPs per token (forward + backward):",
        "      T        TTT-E2E meta   SWA step      full attention   meta/full",
    ]
    for t, f in plan["flops"].items():
        lines.append(
            f"      {t:<8} {f['meta']:.3e}      {f['swa']:.3e}     {f['full_attention']:.3e}"
            f"        {f['meta'] / f['full_attention']:.2f}"
        )
    meta = plan["flops"][m.seq_len]["meta"]
    lines.append(f"  meta step at T={m.seq_len} by term (FLOPs per token, share):")
    for name, value in plan["meta_terms"]:
        if value:
            lines.append(f"      {name:<31} {value:.3e}  {value / meta:6.1%}")
    lines.append("  memory per GPU (GiB), micro-batch 1 sequence:")
    lines.append(
        "      T        TP offload  weights  grads  AdamW  ZeRO-buf  bf16-copies  prefix-act  "
        "TTT-carries  TTT-work  reserve  total   host"
    )
    for t, e in plan["memory"].items():
        fits = (
            f"fits {plan['usable_gib']} GiB usable"
            if e.total / GIB <= plan["usable_gib"]
            else f"DOES NOT FIT {plan['usable_gib']} GiB usable"
        )
        lines.append(
            f"      {t:<8} {e.tensor_parallel:<2} {e.offload:<7} {e.weights / GIB:7.1f}"
            f" {e.grads / GIB:6.1f} {e.optimizer / GIB:6.1f} {e.zero_buffers / GIB:9.1f}"
            f" {e.autocast_copies / GIB:12.1f} {e.prefix_activations / GIB:11.1f} {e.suffix_carries / GIB:12.1f}"
            f" {e.suffix_working / GIB:9.1f} {e.reserve / GIB:8.1f} {e.total / GIB:6.1f}"
            f" {e.host / GIB:6.1f}  ({fits})"
        )
    days = plan["seconds"] / 86400
    lines += [
        f"  token budget      {plan['tokens'] / 1e9:.1f} B tokens = {plan['steps']:,} steps "
        f"(gradient accumulation {plan['accumulation']})"
        + (f"  [{plan['geometry_note']}]" if plan["geometry_note"] else ""),
        f"  wall-clock        {plan['seconds'] / 3600:,.0f} h ({days:.1f} days) at {plan['mfu']:.0%} "
        f"MFU of {plan['peak_tflops']:.0f} TFLOP/s bf16 per GPU (meta step FLOPs at T = {m.seq_len})",
        "  (estimates: see ttte2e/platform/train/plan.py for the memory model and its assumptions;"
        " host: pinned host memory per GPU the offload needs)",
    ]
    return "\n".join(lines)
