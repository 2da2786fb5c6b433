"""TTT-E2E: a sliding-window Transformer whose last blocks learn at test time.

References:
- Tandon et al., "End-to-End Test-Time Training for Long Context", arXiv 2512.23675 (the method).
- The official JAX code, github.com/test-time-training/e2e; tests/data/ holds numbers it
  computed, and tests/test_parity.py holds this model to it.
- nanoGPT model.py (layout of this file), torchtitan llama3 (single-device model, parallelism
  applied from outside).

Data flow of `meta_loss` (the bilevel objective of the paper, section 2): the prefix blocks run
once over the whole sequence; the suffix (TTT) blocks run chunk by chunk in
`inner_loop.run_inner_loop`, updating their prime MLPs by clipped SGD; the outer loss is the
mean of the per-chunk losses, and its backward is the full second-order meta-gradient.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from . import compiled
from .config import TTTConfig
from .flops import FlopsEstimate, estimate_flops
from .inner_loop import run_inner_loop
from .layers import Block, RMSNorm, rope_angles
from .model_folder import DEFAULT_SHARD_BYTES, read_config, read_model_state, write_model_folder
from .parallel import KeepOnDevice, SingleDevice


def check_token_ids(tokens: torch.Tensor, vocab_size: int, name: str) -> None:
    """tokens is a non-empty integer [batch, length] tensor of ids in the vocabulary."""
    if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"{name} must be an integer tensor [batch, length], got "
            f"{tuple(tokens.shape)} {tokens.dtype}"
        )
    if tokens.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (0 sequences)")
    if tokens.shape[1] == 0:
        raise ValueError(f"{name} is empty ({tuple(tokens.shape)}): give at least one token")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"{name} holds token id {low if low < 0 else high}, outside the "
            f"vocabulary 0..{vocab_size - 1}"
        )


def block_forward(block: Block, h: torch.Tensor, rope: torch.Tensor, window: int) -> torch.Tensor:
    return block(h, rope, window)


@dataclass
class MetaLossOutput:
    loss: torch.Tensor  # scalar: mean over sequences of the mean of per-chunk losses
    token_nll: torch.Tensor  # [B, T] per-token NLL (unmasked), position t predicts token t+1
    chunk_loss: torch.Tensor  # [B, n] inner loss of each chunk, before its own update
    inner_grad_norm: torch.Tensor  # [B, n] norm of each inner gradient before clipping ([B, n-1]
    #                                without the final update)
    fast_weights: list[torch.Tensor]  # theta after the last update, (w1, w3, w2) per TTT block


@dataclass
class LMOutput:
    loss: torch.Tensor  # scalar: masked mean NLL over all targets of the batch
    token_nll: torch.Tensor  # [B, T]


class TTTModel(nn.Module):
    def __init__(self, config: TTTConfig):
        super().__init__()
        self.config = config
        # what differs when the model is split or its saved tensors moved (parallel.py): tensor
        # parallelism and host offload replace these objects, never the methods below
        self.parallel = SingleDevice()
        self.offload = KeepOnDevice()
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)  # tied: also the output head
        self.blocks = nn.ModuleList(
            Block(c.d_model, c.n_heads, c.mlp_hidden, c.norm_eps, ttt=i >= c.n_prefix_blocks)
            for i in range(c.n_layers)
        )
        self.final_norm = RMSNorm(c.d_model, c.norm_eps)
        self.reset_parameters()

    # ---- structure -----------------------------------------------------------------------------
    @property
    def prefix_blocks(self) -> list[Block]:
        return list(self.blocks[: self.config.n_prefix_blocks])

    @property
    def ttt_blocks(self) -> list[Block]:
        return list(self.blocks[self.config.n_prefix_blocks :])

    def fast_weight_parameters(self) -> list[nn.Parameter]:
        """theta_0: w1, w3, w2 of every prime MLP, in block order."""
        return [
            w.weight
            for b in self.ttt_blocks
            for w in (b.prime_mlp.w1, b.prime_mlp.w3, b.prime_mlp.w2)
        ]

    def suffix_parameters(self) -> list[nn.Parameter]:
        """Slow weights the chunked suffix reads (its blocks minus theta_0, final norm, head)."""
        fast = {id(p) for p in self.fast_weight_parameters()}
        params = [p for b in self.ttt_blocks for p in b.parameters() if id(p) not in fast]
        return params + list(self.final_norm.parameters()) + [self.embed.weight]

    def reset_parameters(self) -> None:
        """Official init: every linear weight and the embedding ~ N(0, std^2), norm gains 1."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- pieces --------------------------------------------------------------------------------
    def rope(self, positions: torch.Tensor) -> torch.Tensor:
        return rope_angles(positions, self.config.head_dim, self.config.rope_theta)

    # Operations a tensor-parallel run computes differently are asked of self.parallel.
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits [..., V] (at least fp32) of final hidden states (gathered under TP)."""
        return self.parallel.logits(self, h)

    def token_nll(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.parallel.token_nll(self, h, targets)

    def head_nll_and_grad(
        self, normed: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tied head on final-normed states [N, d]: NLL [N] and d(sum_i w_i nll_i)/d normed."""
        return self.parallel.head_nll_and_grad(self, normed, targets, weights)

    def _check_tokens(self, tokens: torch.Tensor, multiple_of: int) -> None:
        check_token_ids(tokens, self.config.vocab_size, "tokens")
        seq = tokens.shape[1] - 1
        if seq <= 0 or seq % multiple_of:
            raise ValueError(
                f"tokens has T+1={tokens.shape[1]} columns: T must be a positive "
                f"multiple of chunk_size={multiple_of}"
            )

    def run_blocks(
        self, h: torch.Tensor, blocks: list[Block], seq_len: int | None = None
    ) -> torch.Tensor:
        """`blocks` over hidden states h [B, T, d] at absolute positions 0..T-1. seq_len: the
        whole sequence's length when h holds a slice of it (tensor-parallel prefix blocks gather
        the sequence before attention)."""
        positions = torch.arange(h.shape[1] if seq_len is None else seq_len, device=h.device)
        rope, window = self.rope(positions), self.config.attn_window
        remat = self.config.checkpoint_prefix and torch.is_grad_enabled()
        run = block_forward
        if self.config.compile:
            run, rope = functools.partial(compiled.run_block, self), torch.view_as_real(rope)
        with self.offload.prefix() if remat else nullcontext():
            for block in blocks:
                if remat:  # keeps the block's input (through saved-tensor hooks) only
                    h = checkpoint(run, block, h, rope, window, use_reentrant=False)
                else:
                    h = run(block, h, rope, window)
        return h

    def prefix(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embedding + the prefix blocks over the whole sequence (absolute positions)."""
        return self.parallel.prefix(self, input_ids)

    # ---- entry points --------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Plain pass over the whole sequence with theta_0 (no inner loop): logits [B, T, V].

        This is the SWA (or full-attention) transformer the TTT model reduces to at eta = 0.
        """
        return self.logits(self.run_blocks(self.prefix(input_ids), self.ttt_blocks))

    def lm_loss(self, tokens: torch.Tensor) -> LMOutput:
        """Ordinary next-token loss of the plain pass (the baseline's training step)."""
        self._check_tokens(tokens, 1)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        h = self.run_blocks(self.prefix(inputs), self.ttt_blocks)
        nll = self.token_nll(h, targets)
        mask = (targets != self.config.bos_token_id).float()
        return LMOutput(loss=(nll * mask).sum() / mask.sum().clamp_min(1.0), token_nll=nll)

    def meta_loss(
        self,
        tokens: torch.Tensor,
        eta: float | torch.Tensor | None = None,
        remat: str | None = None,
        final_update: bool = True,
    ) -> MetaLossOutput:
        """The TTT-E2E outer loss of a batch; `.loss.backward()` gives the meta-gradient.

        tokens: [B, T+1] (inputs tokens[:, :-1], targets tokens[:, 1:]); T a multiple of
        chunk_size. eta: inner learning rate (None = config.inner_lr). remat: override of
        config.remat ('none' | 'chunk' | 'nested'); all three give the same gradients.
        final_update=False (the trainer): the last chunk's inner step, which changes no loss, is
        not taken (inner_grad_norm has n-1 columns); loss and meta-gradient are the same.
        """
        self._check_tokens(tokens, self.config.chunk_size)
        eta = self.config.inner_lr if eta is None else eta
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        mask = targets != self.config.bos_token_id
        with self.offload.step():  # host offload of every saved tensor ('all'), if installed
            inner = run_inner_loop(
                self, self.prefix(inputs), targets, mask, eta, remat, final_update=final_update
            )
        return MetaLossOutput(
            loss=inner.chunk_loss.mean(1).mean(0),
            token_nll=inner.token_nll,
            chunk_loss=inner.chunk_loss,
            inner_grad_norm=inner.inner_grad_norm,
            fast_weights=inner.fast_weights,
        )

    def prefill(self, tokens: torch.Tensor, mode: str = "ttt"):
        """Consume prompts [B, P]: (DecodeState, NLL [B, P-1]); see decode.py."""
        from .decode import prefill

        return prefill(self, tokens, mode)

    def generate(self, prompts, max_new_tokens: int = 64, mode: str = "ttt", **sampling):
        """New token ids per prompt, decoding with continued TTT; see decode.generate."""
        from .decode import generate

        return generate(self, prompts, max_new_tokens, mode, **sampling)

    def estimate_flops(
        self, seq_len: int | None = None, remat: str | None = None, final_update: bool = False
    ) -> FlopsEstimate:
        return estimate_flops(self.config, seq_len, remat, final_update)

    # ---- weights on disk: config.json + model.safetensors (sharded above a size) ---------------
    def save_pretrained(
        self, directory: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES
    ) -> Path:
        """Hugging Face-style folder: config.json + model.safetensors, or shards + an index."""
        write_model_folder(
            directory, self.config.to_dict(), self.state_dict().items(), max_shard_bytes
        )
        return Path(directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **overrides) -> TTTModel:
        """Load a directory written by save_pretrained (config fields may be overridden)."""
        directory = Path(directory)
        config = TTTConfig.from_dict({**read_config(directory), **overrides})
        state = read_model_state(directory)
        model = cls(config)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = [
            f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
            for k, v in expected.items()
            if k in state and state[k].shape != v.shape
        ]
        if missing or unexpected or wrong:
            raise ValueError(
                f"{directory}: weights do not fit its config.json: missing "
                f"{missing[:5]}, unexpected {unexpected[:5]}, shape (file vs model) "
                f"{wrong[:5]}"
            )
        model.load_state_dict(state)
        return model
