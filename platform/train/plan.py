"""Capacity plan of a training run, without training: parameters, FLOPs per token, memory per GPU,
wall-clock for the token budget. Estimates from the config; the assumptions are printed with them.

Memory model (bytes, per GPU, micro-batch m sequences of T tokens, N = GPUs sharing ZeRO state):
- weights 4P (fp32 parameters; bf16 is autocast), gradients 4P (/N under ZeRO-2), AdamW m + v 8P
  (/N under ZeRO-1 and 2).
- prefix activations (first-order blocks), per token and block: about 2(10 d + 3 I) bytes in bf16
  (4x instead of 2x in fp32) when stored; with checkpoint_prefix only the block input (2 d) is kept,
  plus one block's full activations during its recompute.
- suffix (TTT blocks): the inner-loop carry per sequence is the fast weights (3 d I fp32 per TTT
  block) plus the KV caches (2 k d per TTT block); remat 'none' keeps one carry per chunk plus the
  whole unrolled graph, 'chunk' one per chunk, 'nested' n/g + g (g = group size); add one chunk's
  double-backward working set, about 8 (k + b) d per TTT block per sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ttte2e.model import TTTConfig, count_parameters, estimate_flops
from ttte2e.platform.train.config import TrainConfig, batch_geometry

GPU_SPECS = {  # dense bf16 TFLOP/s, memory GiB (the one table: plans and the trainer's MFU)
    "h100": (989.0, 80), "h200": (989.0, 141), "a100": (312.0, 80), "l40s": (362.0, 48),
    "a10g": (125.0, 24), "l4": (121.0, 24)}


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

    @property
    def total(self) -> float:
        return (self.weights + self.grads + self.optimizer + self.prefix_activations
                + self.suffix_carries + self.suffix_working)


def memory_per_gpu(model: TTTConfig, seq_len: int, zero_stage: int, gpus: int, micro_batch: int,
                   bf16: bool = True) -> MemoryEstimate:
    m = model.replace(seq_len=seq_len)
    p = count_parameters(m)
    d, hidden, t, b = m.d_model, m.mlp_hidden, seq_len, m.chunk_size
    k = m.attn_window
    act = 2 if bf16 else 4
    n_prefix, n_suffix = m.n_layers - m.n_ttt_blocks, m.n_ttt_blocks
    if m.checkpoint_prefix:
        prefix = micro_batch * t * (n_prefix * act * d + act * (10 * d + 3 * hidden))
    else:
        prefix = micro_batch * t * n_prefix * act * (10 * d + 3 * hidden)
    n = t // b
    carry = n_suffix * (3 * d * hidden * 4 + 2 * k * d * act)
    if m.remat == "nested":
        g = m.remat_group_size(n)
        carries = math.ceil(n / g) + g
    else:
        carries = n
    unrolled = 0 if m.remat != "none" else n * n_suffix * 8 * (k + b) * d * act
    return MemoryEstimate(
        seq_len=t, weights=4 * p,
        grads=4 * p / (gpus if zero_stage >= 2 else 1),
        optimizer=8 * p / (gpus if zero_stage >= 1 else 1),
        prefix_activations=prefix,
        suffix_carries=micro_batch * carries * carry + micro_batch * unrolled,
        suffix_working=micro_batch * n_suffix * 8 * (k + b) * d * act)


def capacity_plan(cfg: TrainConfig, nodes: int, gpus_per_node: int, gpu: str = "h100",
                  mfu: float = 0.3, contexts: tuple[int, ...] = (8192, 131072)) -> dict:
    if gpu.lower() not in GPU_SPECS:
        raise ValueError(f"unknown GPU {gpu!r}; known: {sorted(GPU_SPECS)}")
    if nodes < 1 or gpus_per_node < 1 or not 0 < mfu <= 1:
        raise ValueError("nodes and gpus-per-node must be >= 1 and mfu in (0, 1]")
    model = cfg.model_config()
    gpus = nodes * gpus_per_node
    peak, mem_gib = GPU_SPECS[gpu.lower()]
    plan_cfg = TrainConfig(**{**cfg.to_dict(), "workers": gpus})
    flops = {}
    for t in sorted(set(contexts) | {model.seq_len}):
        f = estimate_flops(model, seq_len=t)
        flops[t] = dict(meta=f.meta_step, swa=f.swa_step, full_attention=f.full_attention_step)
    try:
        geometry = batch_geometry(plan_cfg, model)
        micro = geometry.micro_batch
        steps, accumulation = geometry.steps, geometry.accumulation
    except ValueError as e:
        micro, steps, accumulation = cfg.micro_batch, cfg.steps or cfg.tokens // cfg.batch_tokens, None
        geometry_note = str(e)
    else:
        geometry_note = ""
    tokens = steps * cfg.batch_tokens
    seconds = tokens * flops[model.seq_len]["meta"] / (gpus * peak * 1e12 * mfu)
    memory = {t: memory_per_gpu(model, t, cfg.zero_stage, gpus, micro,
                                bf16=cfg.precision != "fp32") for t in contexts}
    return dict(preset=cfg.preset, model=model, parameters=count_parameters(model), gpus=gpus,
                nodes=nodes, gpus_per_node=gpus_per_node, gpu=gpu.lower(), gpu_memory_gib=mem_gib,
                peak_tflops=peak, mfu=mfu, flops=flops, memory=memory, tokens=tokens, steps=steps,
                accumulation=accumulation, geometry_note=geometry_note, seconds=seconds,
                zero_stage=cfg.zero_stage)


def format_plan(plan: dict) -> str:
    m: TTTConfig = plan["model"]
    lines = [
        f"Capacity plan: preset {plan['preset']} on {plan['nodes']} x {plan['gpus_per_node']} "
        f"{plan['gpu'].upper()} ({plan['gpus']} GPUs, {plan['gpu_memory_gib']} GiB each), "
        f"ZeRO-{plan['zero_stage']}, remat {m.remat}, checkpoint_prefix {m.checkpoint_prefix}",
        f"  parameters        {plan['parameters'] / 1e9:.3f} B ({m.n_layers} layers, d {m.d_model}, "
        f"{m.n_heads} heads, MLP {m.mlp_hidden}, {m.n_ttt_blocks} TTT blocks, vocab {m.vocab_size})",
        "  training FLOPs per token (forward + backward):",
        "      T        TTT-E2E meta   SWA step      full attention   meta/full",
    ]
    for t, f in plan["flops"].items():
        lines.append(f"      {t:<8} {f['meta']:.3e}      {f['swa']:.3e}     {f['full_attention']:.3e}"
                     f"        {f['meta'] / f['full_attention']:.2f}")
    lines.append("  memory per GPU (GiB), micro-batch 1 sequence:")
    lines.append("      T        weights  grads  AdamW  prefix-act  TTT-carries  TTT-work  total")
    for t, e in plan["memory"].items():
        fits = "fits" if e.total / GIB <= plan["gpu_memory_gib"] else "DOES NOT FIT"
        lines.append(f"      {t:<8} {e.weights / GIB:7.1f} {e.grads / GIB:6.1f} {e.optimizer / GIB:6.1f}"
                     f" {e.prefix_activations / GIB:11.1f} {e.suffix_carries / GIB:12.1f}"
                     f" {e.suffix_working / GIB:9.1f} {e.total / GIB:6.1f}  ({fits})")
    days = plan["seconds"] / 86400
    lines += [
        f"  token budget      {plan['tokens'] / 1e9:.1f} B tokens = {plan['steps']:,} steps "
        f"(gradient accumulation {plan['accumulation']})" + (
            f"  [{plan['geometry_note']}]" if plan["geometry_note"] else ""),
        f"  wall-clock        {plan['seconds'] / 3600:,.0f} h ({days:.1f} days) at {plan['mfu']:.0%} "
        f"MFU of {plan['peak_tflops']:.0f} TFLOP/s bf16 per GPU (meta step FLOPs at T = {m.seq_len})",
        "  (estimates: see ttte2e/platform/train/plan.py for the memory model and its assumptions)",
    ]
    return "\n".join(lines)
