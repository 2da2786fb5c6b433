"""Inference with continued test-time training (paper section 2.3.2): prefill, decode, generate.

Prefill is the training forward: the prefix blocks over the prompt, then the chunked inner loop
over every chunk whose targets are all known (the inner loop's own `run_chunks`), so its NLLs
equal `meta_loss(...).token_nll`. What is left (1..b tokens) is the pending chunk: run
with the current fast weights, its suffix inputs kept for its TTT step.

Decode: one token at a time through every block with the current fast weights (a sliding-window
transformer step over cached pre-RoPE keys/values, buffer-local RoPE as in training). When the
token after a full pending chunk arrives, the chunk's targets are known and one TTT step runs on
it: the same chunk step as training, from the suffix caches as they were before the chunk. So
teacher-forced decoding reproduces the training NLLs, and the per-token cost does not grow with
the context: the state holds per block the last k positions, plus for the suffix blocks the k
positions before the pending chunk, its <= b suffix inputs and the fast weights.

Modes: 'ttt' (TTT-E2E), 'swa' (same weights, no TTT: eta = 0) and 'full' (full attention with a
growing KV cache, no TTT): the baselines from the same code. A model trained with
attention='full' decodes 'ttt' / 'swa' as it trained: TTT over chunks, keys of the whole
training length (config.attn_window) kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .inner_loop import Carry, ChunkContext, chunk_step, run_chunks
from .layers import at_least_fp32
from .transformer import check_token_ids, nll_of_logits

MODES = ("ttt", "swa", "full")


@dataclass
class DecodeState:
    """The decode state of a batch of sequences that have consumed the same number of tokens."""

    mode: str
    position: int                          # tokens consumed (absolute position of the next one)
    caches: list[list[torch.Tensor]]       # per block [K, V] pre-RoPE, [B, H, <=W, dh]
    chunk: Carry                           # theta (fp32) and the suffix caches before the pending chunk
    pending_inputs: torch.Tensor           # [B, r, d] suffix inputs of the pending chunk (r <= b)
    pending_tokens: torch.Tensor           # [B, r] its input tokens
    chunks_done: int = 0                   # TTT steps taken
    last_logits: torch.Tensor | None = None  # [B, V] logits for the next token
    rope_table: torch.Tensor | None = None   # rotations of buffer-local positions 0..n-1

    def rotations(self, model, n: int) -> torch.Tensor:
        """Rotations of positions 0..n-1, from a table grown by doubling (the same values as
        model.rope(arange(n)): each row depends on its position only)."""
        if self.rope_table is None or self.rope_table.shape[0] < n:
            size = max(n, 2 * (0 if self.rope_table is None else self.rope_table.shape[0]))
            device = self.pending_tokens.device
            self.rope_table = model.rope(torch.arange(size, device=device))
        return self.rope_table[:n]

    @property
    def fast(self) -> list[torch.Tensor]:
        """The current fast weights theta, 3 per TTT block."""
        return self.chunk.fast

    def nbytes(self) -> int:
        """Bytes held (KV caches, chunk snapshot, pending inputs, fast weights)."""
        tensors = [t for pair in self.caches for t in pair] + list(self.chunk.tensors())
        tensors += [self.pending_inputs, self.pending_tokens]
        return sum(t.numel() * t.element_size() for t in tensors)


def _window(model, mode: str) -> int | None:
    """Keys a query sees: the trained attention window (the training length for a model trained
    with full attention), or None for the 'full' baseline (every key kept)."""
    return None if mode == "full" else model.config.attn_window


def _eta(model, mode: str, eta: float | None) -> float:
    return 0.0 if mode != "ttt" else (model.config.inner_lr if eta is None else eta)


def _keep(t: torch.Tensor, window: int | None) -> torch.Tensor:
    return t if window is None else t[:, :, -window:]


def _pad_front(t: torch.Tensor, window: int) -> torch.Tensor:
    """[B, H, n, dh] -> [B, H, window, dh], zeros before the sequence start (masked anyway)."""
    if t.shape[2] >= window:
        return t[:, :, -window:]
    pad = t.new_zeros(*t.shape[:2], window - t.shape[2], t.shape[3])
    return torch.cat((pad, t), 2)


@torch.no_grad()
def prefill(model, tokens: torch.Tensor, mode: str = "ttt", eta: float | None = None
            ) -> tuple[DecodeState, torch.Tensor]:
    """Consume a prompt: (state, NLL [B, P-1] of each prompt token after the first)."""
    if mode not in MODES:
        raise ValueError(f"unknown decode mode {mode!r}; choose one of {MODES}")
    check_token_ids(tokens, model.config.vocab_size, "prompt")
    cfg = model.config
    batch, length = tokens.shape
    window = _window(model, mode)
    eta = _eta(model, mode, eta)
    rope_abs = model.rope(torch.arange(length, device=tokens.device))
    attn_window = length if window is None else window

    # prefix blocks over the whole prompt (absolute positions), keeping their last k keys/values
    h = model.embed(tokens)
    caches = []
    for block in model.prefix_blocks:
        h, k, v = block.forward_kv(h, rope_abs, attn_window)
        caches.append([_keep(k, window), _keep(v, window)])
    suffix_in = h

    b = cfg.chunk_size
    carry = Carry.initial(model, batch, suffix_in, window or 0)
    carry.fast = [at_least_fp32(t).contiguous() for t in carry.fast]
    if window is None:
        # full attention, no TTT: the plain pass with theta_0, every key kept
        for s, block in enumerate(model.ttt_blocks):
            h, k, v = block.forward_kv(h, rope_abs, length, carry.block_fast(s))
            caches.append([k, v])
        logits = model.logits(h)
        nll = nll_of_logits(logits[:, :-1], tokens[:, 1:])
        empty = suffix_in.new_zeros(batch, 0, cfg.d_model)
        state = DecodeState(mode, length, caches, carry, empty, tokens[:, :0],
                            last_logits=logits[:, -1])
        return state, nll

    nll_parts = []
    n_done = (length - 1) // b  # chunks whose targets are all inside the prompt
    if n_done:
        ctx = ChunkContext.build(model, tokens[:, 1:n_done * b + 1], eta, window)
        with torch.enable_grad():  # the inner gradients (no graph is kept)
            out = run_chunks(model, ctx, 0, carry, suffix_in[:, :n_done * b])
        carry = out.carry
        nll_parts.append(out.nll)
    # the pending chunk: its tokens through the suffix with the current theta
    start = n_done * b
    pending = suffix_in[:, start:]
    rope = model.rope(torch.arange(window + pending.shape[1], device=tokens.device))
    first_valid = max(0, window - start)
    h = pending
    for s, block in enumerate(model.ttt_blocks):
        ck, cv = carry.block_cache(s)
        h, k, v = block.forward_chunk(h, ck, cv, rope, window, first_valid, carry.block_fast(s))
        caches.append([torch.cat((ck, k), 2)[:, :, -window:], torch.cat((cv, v), 2)[:, :, -window:]])
    logits = model.logits(h)
    if pending.shape[1] > 1:
        nll_parts.append(nll_of_logits(logits[:, :-1], tokens[:, start + 1:]))
    # prefix caches padded to k rows (rows before the sequence start are masked by first_valid)
    for layer in range(len(model.prefix_blocks)):
        caches[layer] = [_pad_front(t, window) for t in caches[layer]]
    state = DecodeState(mode, length, caches, carry, pending, tokens[:, start:],
                        chunks_done=n_done, last_logits=logits[:, -1])
    nll = torch.cat(nll_parts, 1) if nll_parts else suffix_in.new_zeros(batch, 0)
    return state, nll


@torch.no_grad()
def _ttt_step(model, state: DecodeState, next_tokens: torch.Tensor, eta: float) -> None:
    """The TTT step on the full pending chunk, now that the token after it is known."""
    c = state.chunks_done
    targets = torch.cat((state.pending_tokens[:, 1:], next_tokens[:, None]), 1)
    ctx = ChunkContext.build(model, targets, eta, _window(model, state.mode),
                             offset=c * model.config.chunk_size)
    with torch.enable_grad():  # the inner gradient (no graph is kept)
        state.chunk = chunk_step(model, ctx, c, state.chunk, state.pending_inputs, False).carry
    n_prefix = len(model.prefix_blocks)
    for s in range(len(model.ttt_blocks)):
        # the suffix caches continue from the training step's own keys/values of this chunk
        state.caches[n_prefix + s] = list(state.chunk.block_cache(s))
    state.pending_inputs = state.pending_inputs[:, :0]
    state.pending_tokens = state.pending_tokens[:, :0]
    state.chunks_done += 1


@torch.no_grad()
def decode_step(model, state: DecodeState, tokens: torch.Tensor, eta: float | None = None
                ) -> torch.Tensor:
    """Feed one token per sequence ([B]); returns the logits for the next one ([B, V])."""
    cfg = model.config
    if tokens.dim() != 1 or tokens.shape[0] != state.pending_tokens.shape[0]:
        raise ValueError(f"decode_step takes one token per sequence ([{state.pending_tokens.shape[0]}]),"
                         f" got {tuple(tokens.shape)}")
    check_token_ids(tokens[:, None], cfg.vocab_size, "token")
    window = _window(model, state.mode)
    if window is not None and state.pending_tokens.shape[1] == cfg.chunk_size:
        _ttt_step(model, state, tokens, _eta(model, state.mode, eta))
    t = state.position
    cache_len = t if window is None else window
    rope = state.rotations(model, cache_len + 1)
    first_valid = 0 if window is None else max(0, window - t)
    h = model.embed(tokens[:, None])
    n_prefix = len(model.prefix_blocks)
    for layer, block in enumerate(model.blocks):
        ck, cv = state.caches[layer]
        fast = None
        if layer >= n_prefix:
            fast = state.chunk.block_fast(layer - n_prefix)
            if layer == n_prefix and window is not None:
                state.pending_inputs = torch.cat((state.pending_inputs, h), 1)
        # full attention: the new query sees all t cached keys and itself
        span = cache_len + 1 if window is None else window
        h, k, v = block.forward_chunk(h, ck, cv, rope, span, first_valid, fast)
        state.caches[layer] = [_keep(torch.cat((ck, k), 2), window),
                               _keep(torch.cat((cv, v), 2), window)]
    if window is not None:
        state.pending_tokens = torch.cat((state.pending_tokens, tokens[:, None]), 1)
    state.position += 1
    state.last_logits = model.logits(h)[:, -1]
    return state.last_logits


def sample_next(logits: torch.Tensor, generated: torch.Tensor | None, temperature: float = 0.0,
                top_p: float = 1.0, repetition_penalty: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, V] logits -> [B] tokens: repetition penalty (CTRL: seen tokens' logits divided by it
    when positive, multiplied when negative), then greedy (temperature 0) or nucleus sampling."""
    logits = logits.float().clone()
    if repetition_penalty != 1.0 and generated is not None and generated.numel():
        seen = torch.gather(logits, 1, generated)
        logits.scatter_(1, generated, torch.where(seen > 0, seen / repetition_penalty,
                                                  seen * repetition_penalty))
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the smallest set reaching top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(1, order, sorted_p)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator)[:, 0]


def stream_generate(model, prompt: torch.Tensor, max_new_tokens: int = 64, mode: str = "ttt",
                    temperature: float = 0.0, top_p: float = 1.0,
                    repetition_penalty: float = 1.0, stop_tokens: tuple[int, ...] = (),
                    seed: int | None = None, max_context: int | None = None
                    ) -> Iterator[torch.Tensor]:
    """Yield [B] new tokens one step at a time (finished sequences repeat their stop token)."""
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    if max_context is not None and prompt.shape[-1] + max_new_tokens > max_context:
        raise ValueError(f"prompt of {prompt.shape[-1]} tokens + {max_new_tokens} new exceeds "
                         f"max_context {max_context}")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=prompt.device).manual_seed(seed)
    state, _ = prefill(model, prompt, mode)
    generated = prompt
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    stops = torch.tensor(list(stop_tokens) or [-1], device=prompt.device)
    logits = state.last_logits
    for _ in range(max_new_tokens):
        token = sample_next(logits, generated, temperature, top_p, repetition_penalty, generator)
        token = torch.where(done, generated[:, -1], token)
        done |= torch.isin(token, stops)
        generated = torch.cat((generated, token[:, None]), 1)
        yield token
        if bool(done.all()):
            return
        logits = decode_step(model, state, token)


def generate(model, prompts: torch.Tensor | list, max_new_tokens: int = 64, mode: str = "ttt",
             on_token: Callable[[torch.Tensor], None] | None = None, **sampling) -> list[list[int]]:
    """New tokens for each prompt (stop token included when hit). prompts: [B, P] tensor or a list
    of token-id lists (grouped by length, each group decoded as one batch)."""
    if isinstance(prompts, torch.Tensor):
        groups = {prompts.shape[1]: list(range(prompts.shape[0]))}
        rows = prompts
    else:
        if not prompts:
            raise ValueError("no prompts given")
        groups = {}
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty: give at least one token")
            groups.setdefault(len(p), []).append(i)
        rows = None
    results: list[list[int]] = [[] for _ in range(sum(len(v) for v in groups.values()))]
    stops = set(sampling.get("stop_tokens", ()))
    device = next(model.parameters()).device
    for length, members in groups.items():
        batch = rows[members] if rows is not None else torch.tensor(
            [prompts[i] for i in members], device=device)
        out: list[list[int]] = [[] for _ in members]
        for token in stream_generate(model, batch, max_new_tokens, mode, **sampling):
            if on_token is not None:
                on_token(token)
            for j, t in enumerate(token.tolist()):
                if not (out[j] and out[j][-1] in stops):
                    out[j].append(t)
        for j, i in enumerate(members):
            results[i] = out[j]
    return results
