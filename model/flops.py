"""Training FLOPs per token: TTT-E2E meta step vs the plain (SWA or full attention) step.

Counting rules (matmuls only, 2 FLOPs per multiply-add; norms, RoPE, softmax and the SGD update
are O(d) per token and left out):
- per layer and token: projections 8 d^2, SwiGLU 6 d I, attention 4 d * keys (QK^T and PV);
  head 2 d V. A backward pass costs 2x the forward it differentiates.
- plain step: forward with `keys` = the average number of visible keys, min(t+1, k), + backward.
- meta step: prefix blocks as in the plain step (+1 forward with checkpoint_prefix). Per chunk the
  suffix runs a forward F (attention over the whole [W + b] buffer, as the math path computes it),
  an inner backward G (activation gradients from the head down to the first prime MLP, plus the
  prime weight gradients) and the outer backward through both, 2 (F + G). Remat recomputes F + G
  once ('chunk') or twice ('nested': the group, then each chunk); 'none' never.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import TTTConfig

_RECOMPUTES = {"none": 0, "chunk": 1, "nested": 2}


@dataclass(frozen=True)
class FlopsEstimate:
    meta_step: float       # TTT-E2E meta-train step (forward + second-order backward), per token
    swa_step: float        # same architecture, no inner loop, same window: fwd + bwd, per token
    full_attention_step: float  # same architecture with causal full attention, fwd + bwd, per token

    @property
    def meta_over_swa(self) -> float:
        return self.meta_step / self.swa_step


def _mean_keys(seq_len: int, window: int) -> float:
    """Average over t = 0..T-1 of min(t + 1, window)."""
    full = min(seq_len, window)
    return (full * (full + 1) / 2 + (seq_len - full) * window) / seq_len


def estimate_flops(config: TTTConfig, seq_len: int | None = None,
                   remat: str | None = None) -> FlopsEstimate:
    """FLOPs per token of one training step at seq_len (default config.seq_len)."""
    c = config
    seq = seq_len or c.seq_len
    remat = remat or c.remat
    if remat not in _RECOMPUTES:
        raise ValueError(f"unknown remat mode {remat!r}")
    d, hidden, n_suffix = c.d_model, c.mlp_hidden, c.n_ttt_blocks
    proj, mlp, head = 8 * d * d, 6 * d * hidden, 2 * d * c.vocab_size

    def attn(keys: float) -> float:
        return 4 * d * keys

    def plain_forward(keys: float) -> float:
        return c.n_layers * (proj + mlp + attn(keys)) + n_suffix * mlp + head

    swa = 3 * plain_forward(_mean_keys(seq, c.attn_window))
    full = 3 * plain_forward(_mean_keys(seq, seq))

    prefix = c.n_prefix_blocks * (proj + mlp + attn(_mean_keys(seq, c.attn_window)))
    prefix_cost = (4 if c.checkpoint_prefix else 3) * prefix
    buffer_keys = c.attn_window + c.chunk_size
    suffix_fwd = n_suffix * (proj + 2 * mlp + attn(buffer_keys)) + head
    # inner backward: first TTT block = static MLP activation grads + prime MLP weight and hidden
    # grads (no input grad); each later block = full activation grads + prime weight grads.
    inner_bwd = (head + mlp + (4 / 3) * mlp
                 + (n_suffix - 1) * (proj + attn(buffer_keys) + mlp + 2 * mlp))
    suffix_cost = (3 + _RECOMPUTES[remat]) * (suffix_fwd + inner_bwd)
    return FlopsEstimate(meta_step=prefix_cost + suffix_cost, swa_step=swa,
                         full_attention_step=full)


def count_parameters(config: TTTConfig) -> int:
    """Parameters of TTTModel(config), without building it (tied embedding/head)."""
    c = config
    d, hidden = c.d_model, c.mlp_hidden
    block = 4 * d * d + 2 * c.head_dim + 4 * d + 3 * d * hidden  # attention, QK gains, norms, MLP
    prime = 2 * d + 3 * d * hidden                               # prime norms + prime MLP
    return c.vocab_size * d + c.n_layers * block + c.n_ttt_blocks * prime + d
