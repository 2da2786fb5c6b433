"""TTT-E2E model: config + presets, transformer, inner loop with remat, FLOPs, converters."""

from .config import PRESETS, TTTConfig, preset
from .decode import (
    DecodeState,
    decode_step,
    extend,
    generate,
    prefill,
    prefill_prompts,
    stream_generate,
)
from .flops import FlopsEstimate, count_parameters, estimate_flops
from .inner_loop import inner_lr_at
from .transformer import LMOutput, MetaLossOutput, TTTModel

__all__ = [
    "PRESETS",
    "TTTConfig",
    "preset",
    "TTTModel",
    "MetaLossOutput",
    "LMOutput",
    "estimate_flops",
    "count_parameters",
    "FlopsEstimate",
    "inner_lr_at",
    "DecodeState",
    "prefill",
    "decode_step",
    "extend",
    "generate",
    "prefill_prompts",
    "stream_generate",
]
