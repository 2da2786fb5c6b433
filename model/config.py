"""TTTConfig: every size and knob of a TTT-E2E model, validated on construction, and the presets.

Field names are the paper's (k = window, b = chunk_size, theta = the prime MLPs' fast weights);
`convert.config_from_official` maps the official JAX config onto them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import InitVar, dataclass
from typing import Any, Literal, get_args

AttentionMode = Literal["sliding", "full"]
RematMode = Literal["none", "chunk", "nested"]
ATTENTION_MODES: tuple[str, ...] = get_args(AttentionMode)
REMAT_MODES: tuple[str, ...] = get_args(RematMode)


def ttt_blocks_for_fraction(n_layers: int, fraction: float) -> int:
    """Number of TTT blocks for a fraction of the layers: rounded half up, at least 1."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"ttt_fraction must be in (0, 1], got {fraction}")
    return max(1, math.floor(n_layers * fraction + 0.5))


@dataclass
class TTTConfig:
    """Sizes and hyper-parameters of one TTT-E2E model (architecture + inner loop + remat)."""

    vocab_size: int = 512
    """Vocabulary size V; the embedding is tied to the output head."""
    d_model: int = 64
    """Model width d."""
    n_layers: int = 4
    """Number of transformer blocks L."""
    n_heads: int = 4
    """Attention heads H; d_model / n_heads is the head size (even, for RoPE pairs)."""
    mlp_hidden: int = 128
    """Hidden width of every SwiGLU MLP (static and prime)."""
    n_ttt_blocks: int = 0
    """Number S of TTT blocks (the last S blocks carry a prime MLP); 0 means round(L/4), at least 1."""
    seq_len: int = 256
    """Training sequence length T (number of predicted tokens per window)."""
    window: int = 64
    """Sliding-window size k: keys per query, the query's own position included."""
    chunk_size: int = 32
    """TTT mini-batch b: tokens per inner step; seq_len must be a multiple of it."""
    attention: AttentionMode = "sliding"
    """'sliding' (window k) or 'full' (causal full attention, the baseline)."""
    inner_lr: float = 1.0
    """Inner-loop learning rate eta (official: training.optimizer_inner.lr); 0 disables TTT."""
    inner_clip: float = 1.0
    """Clip-by-global-norm threshold of each inner gradient (over all TTT blocks together)."""
    rope_theta: float = 500000.0
    """RoPE base; interleaved-pair convention."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon (all norms, QK-norm included)."""
    bos_token_id: int = 1
    """BOS id: positions whose target is BOS are masked out of every loss."""
    init_std: float = 0.02
    """Std of the normal init of every linear weight and the embedding."""
    remat: RematMode = "nested"
    """Rematerialization of the unrolled inner loop: 'none', 'chunk' or 'nested'."""
    compile: bool = False
    """Run the inner loop's chunk step compiled (torch.compile; inner gradient by torch.func)."""
    remat_group: int = 0
    """Chunks per group under 'nested' remat; 0 means ceil(sqrt(n_chunks))."""
    checkpoint_prefix: bool = False
    """Activation checkpointing of each prefix block (recompute in backward)."""
    ttt_fraction: InitVar[float | None] = None
    """Convenience: set n_ttt_blocks from a fraction of n_layers (not stored)."""

    def __post_init__(self, ttt_fraction: float | None) -> None:
        ints = (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "mlp_hidden",
            "seq_len",
            "window",
            "chunk_size",
        )
        for name in ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"TTTConfig.{name} must be a positive integer, got {value!r}")
        if ttt_fraction is not None:
            from_fraction = ttt_blocks_for_fraction(self.n_layers, ttt_fraction)
            if self.n_ttt_blocks not in (0, from_fraction):
                raise ValueError(
                    f"TTTConfig: n_ttt_blocks={self.n_ttt_blocks} disagrees with ttt_fraction="
                    f"{ttt_fraction} (= {from_fraction} of {self.n_layers} blocks); give one of them"
                )
            self.n_ttt_blocks = from_fraction
        elif self.n_ttt_blocks == 0:
            self.n_ttt_blocks = ttt_blocks_for_fraction(self.n_layers, 0.25)
        if not 1 <= self.n_ttt_blocks <= self.n_layers:
            raise ValueError(
                f"TTTConfig.n_ttt_blocks must be in [1, n_layers={self.n_layers}], "
                f"got {self.n_ttt_blocks}"
            )
        if self.d_model % self.n_heads:
            raise ValueError(
                f"TTTConfig: n_heads={self.n_heads} does not divide d_model={self.d_model}"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"TTTConfig: head size d_model/n_heads={self.head_dim} must be even "
                "(RoPE rotates pairs)"
            )
        if self.attention not in ATTENTION_MODES:
            raise ValueError(
                f"TTTConfig.attention must be one of {ATTENTION_MODES}, got {self.attention!r}"
            )
        if self.seq_len % self.chunk_size:
            raise ValueError(
                f"TTTConfig: seq_len={self.seq_len} is not a multiple of "
                f"chunk_size={self.chunk_size}"
            )
        if self.attention == "sliding" and self.chunk_size > self.window:
            raise ValueError(
                f"TTTConfig: chunk_size={self.chunk_size} > window={self.window}; "
                "a TTT chunk must fit in the attention window"
            )
        if self.remat not in REMAT_MODES:
            raise ValueError(f"TTTConfig.remat must be one of {REMAT_MODES}, got {self.remat!r}")
        if self.remat_group < 0:
            raise ValueError(f"TTTConfig.remat_group must be >= 0, got {self.remat_group}")
        if not self.inner_lr >= 0.0:
            raise ValueError(f"TTTConfig.inner_lr must be >= 0, got {self.inner_lr}")
        if not self.inner_clip > 0.0:
            raise ValueError(f"TTTConfig.inner_clip must be > 0, got {self.inner_clip}")
        if not self.rope_theta > 0.0 or not self.norm_eps > 0.0 or not self.init_std > 0.0:
            raise ValueError("TTTConfig: rope_theta, norm_eps and init_std must be > 0")
        if not 0 <= self.bos_token_id < self.vocab_size:
            raise ValueError(
                f"TTTConfig.bos_token_id={self.bos_token_id} is outside the "
                f"vocabulary [0, {self.vocab_size})"
            )

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_chunks(self) -> int:
        return self.seq_len // self.chunk_size

    @property
    def n_prefix_blocks(self) -> int:
        return self.n_layers - self.n_ttt_blocks

    @property
    def attn_window(self) -> int:
        """Keys per query actually used: the window, or the whole sequence under full attention."""
        return self.window if self.attention == "sliding" else self.seq_len

    def remat_group_size(self, n_chunks: int | None = None) -> int:
        n = self.n_chunks if n_chunks is None else n_chunks
        return self.remat_group or max(1, math.ceil(math.sqrt(n)))

    # ---- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TTTConfig:
        known = {f.name for f in dataclasses.fields(cls)} | {"ttt_fraction"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"TTTConfig: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> TTTConfig:
        """A validated copy with some fields changed (ttt_fraction re-derives n_ttt_blocks)."""
        if "ttt_fraction" in changes and "n_ttt_blocks" not in changes:
            changes["n_ttt_blocks"] = 0
        return dataclasses.replace(self, **changes)


# Paper sizes (layers / d / heads; E2E MLP width shrunk to keep the parameter count), Llama-3
# vocabulary, pretraining at T = 8K with k = 8K and b = 1K, 1/4 of the blocks TTT.
_PAPER = dict(
    vocab_size=128256,
    seq_len=8192,
    window=8192,
    chunk_size=1024,
    rope_theta=500000.0,
    inner_lr=1.0,
    bos_token_id=128000,
)
PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized: ~2.9M parameters, T = 4 windows = 8 chunks; a meta step in well under a second.
    "tiny": dict(
        vocab_size=4096,
        d_model=192,
        n_layers=4,
        n_heads=4,
        mlp_hidden=512,
        seq_len=512,
        window=128,
        chunk_size=64,
        bos_token_id=1,
    ),
    "125M": dict(_PAPER, d_model=768, n_layers=12, n_heads=12, mlp_hidden=1664),
    "350M": dict(_PAPER, d_model=1024, n_layers=24, n_heads=16, mlp_hidden=2304),
    "760M": dict(_PAPER, d_model=1536, n_layers=24, n_heads=16, mlp_hidden=3328),
    "1B": dict(_PAPER, d_model=2048, n_layers=24, n_heads=32, mlp_hidden=4352),
    "3B": dict(_PAPER, d_model=2560, n_layers=32, n_heads=32, mlp_hidden=5632),
}


# The fields parameter shapes determine: two configs that agree on them hold the same weights.
ARCHITECTURE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "mlp_hidden", "n_ttt_blocks")


def preset(name: str, **overrides: Any) -> TTTConfig:
    """The named preset as a TTTConfig, with any field overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return TTTConfig(**{**PRESETS[name], **overrides})
