"""Training FLOPs per token: TTT-E2E meta step vs the plain (SWA or full attention) step.

Counting rules (matmuls only, 2 FLOPs per multiply-add; norms, RoPE, softmax and the SGD update
are O(d) per token and left out):
- per layer and token: projections 8 d^2, SwiGLU 6 d I, attention 4 d * keys (QK^T and PV);
  head 2 d V. A backward pass costs 2x the forward it differentiates.
- plain step: forward with `keys` = the average number of visible keys, min(t+1, k), + backward.
- meta step (`MetaTerms`, one field per term): prefix blocks as in the plain step (+1 forward
  with checkpoint_prefix). Per chunk the suffix runs a forward F (attention over the cache rows
  inside the sequence, min(c b, k) for chunk c, + the chunk's b keys: dense, as the math path
  computes it), the fused LM head (logits and dl/dh: 2 head), the inner gradient G (activation
  gradients from the head down to the first prime MLP, plus the prime weight gradients; none for
  the slow weights) and the outer backward through all of them, 2 (F + G) + 4 head (for the last
  chunk 2 F + 2 head: no loss depends on its dl/dh and step; the trainer does not even take that
  inner gradient). Remat recomputes F, head and G once ('chunk') or twice ('nested': the group, then each
  chunk); 'none' never.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, fields

from .config import TTTConfig

_RECOMPUTES = {"none": 0, "chunk": 1, "nested": 2}


@dataclass(frozen=True)
class MetaTerms:
    """The meta step's FLOPs per token by term (they sum to FlopsEstimate.meta_step)."""

    prefix_forward: float
    prefix_backward: float
    prefix_recompute: float  # checkpoint_prefix: the prefix forward again in backward
    suffix_forward: float  # F: the suffix blocks over each chunk
    head_forward: float  # the fused head: logits and dl/dh of the inner loss
    inner_gradient: float  # G: dl/dh back through the suffix to theta
    outer_backward_forward: float  # the outer backward through F
    outer_backward_head: float  # through the head, its second order (dl/dh) included
    outer_backward_inner_gradient: float  # through G (second order)
    remat_recompute: float  # F + head + G again, per recompute

    @property
    def total(self) -> float:
        return sum(astuple(self))

    def table(self) -> list[tuple[str, float]]:
        return [(f.name.replace("_", " "), getattr(self, f.name)) for f in fields(self)]


@dataclass(frozen=True)
class FlopsEstimate:
    meta_step: float  # TTT-E2E meta-train step (forward + second-order backward), per token
    swa_step: float  # same architecture, no inner loop, same window: fwd + bwd, per token
    full_attention_step: float  # same architecture with causal full attention, fwd + bwd, per token
    meta_terms: MetaTerms | None = None

    @property
    def meta_over_swa(self) -> float:
        return self.meta_step / self.swa_step


def _mean_keys(seq_len: int, window: int) -> float:
    """Average over t = 0..T-1 of min(t + 1, window)."""
    full = min(seq_len, window)
    return (full * (full + 1) / 2 + (seq_len - full) * window) / seq_len


def _suffix_keys(seq_len: int, window: int, chunk: int) -> list[int]:
    """Keys a suffix query's attention computes in each chunk: the cache rows inside the
    sequence, min(c b, window) for chunk c, + the chunk's own b."""
    return [min(c * chunk, window) + chunk for c in range(max(1, seq_len // chunk))]


def estimate_flops(
    config: TTTConfig,
    seq_len: int | None = None,
    remat: str | None = None,
    final_update: bool = False,
) -> FlopsEstimate:
    """FLOPs per token of one training step at seq_len (default config.seq_len).
    final_update: the last chunk's inner step taken too (meta_loss's default; the trainer skips
    it)."""
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
    keys = _suffix_keys(seq, c.attn_window, c.chunk_size)
    n_chunks = len(keys)

    def suffix_fwd(k: float) -> float:
        return n_suffix * (proj + 2 * mlp + attn(k))

    # inner gradient: first TTT block = static MLP activation grads + prime MLP weight and hidden
    # grads (no input grad); each later block = full activation grads + prime weight grads. Its
    # attention backward computes dq and dk, dv of every key (2 attn): the cache rows' dk, dv are
    # not needed there (the cache does not depend on this chunk's theta), but one backward op
    # serves this and the outer backward, which needs them.
    def inner(k: float) -> float:
        return mlp + (4 / 3) * mlp + (n_suffix - 1) * (proj + 2 * attn(k) + mlp + 2 * mlp)

    # per token: chunk terms summed over the chunks they run in, / n_chunks. The last chunk's
    # theta and dl/dh reach no loss: never differentiated by the outer backward, and its inner
    # gradient not taken at all without final_update.
    def over(chunks: list[int], term) -> float:
        return sum(term(k) for k in chunks) / n_chunks

    used = keys[:-1]
    stepped = keys if final_update else used
    forward = over(keys, suffix_fwd)
    terms = MetaTerms(
        prefix_forward=prefix,
        prefix_backward=2 * prefix,
        prefix_recompute=prefix if c.checkpoint_prefix else 0.0,
        suffix_forward=forward,
        head_forward=2 * head,
        inner_gradient=over(stepped, inner),
        outer_backward_forward=2 * forward,
        outer_backward_head=2 * head + 2 * head * len(used) / n_chunks,
        outer_backward_inner_gradient=2 * over(used, inner),
        remat_recompute=_RECOMPUTES[remat] * (forward + 2 * head + over(stepped, inner)),
    )
    return FlopsEstimate(
        meta_step=terms.total, swa_step=swa, full_attention_step=full, meta_terms=terms
    )


def count_parameters(config: TTTConfig) -> int:
    """Parameters of TTTModel(config), without building it (tied embedding/head)."""
    c = config
    d, hidden = c.d_model, c.mlp_hidden
    block = 4 * d * d + 2 * c.head_dim + 4 * d + 3 * d * hidden  # attention, QK gains, norms, MLP
    prime = 2 * d + 3 * d * hidden  # prime norms + prime MLP
    return c.vocab_size * d + c.n_layers * block + c.n_ttt_blocks * prime + d
