"""Inference with continued test-time training (paper section 2.3.2): prefill, decode, generate.

Prefill is the training forward: the prefix blocks over the prompt, then the chunked inner loop
over every chunk whose targets are all known (the inner loop's own `run_chunks`), so its NLLs
equal `meta_loss(...).token_nll`. What is left (1..b tokens) is the pending chunk: run
with the current fast weights, its suffix inputs kept for its TTT step.

Decode: one token at a time through every block with the current fast weights. Each block keeps
its keys and values in a preallocated buffer written in place (`KVBuffer`): a ring of k slots
for sliding-window attention, a linear buffer for the full-attention baseline; each key is
rotated once, at its absolute position (RoPE scores depend on position differences only, so this
equals training's buffer-local rotation to round-off). When the token after a full pending chunk
arrives, the chunk's targets are known and one TTT step runs on it: the same chunk step as
training, from the suffix caches as they were before the chunk, with autograd recording the fast
weights' graph only. So teacher-forced decoding reproduces the training NLLs, and the per-token
cost does not grow with the context: the state holds per block k keys/values, plus for the
suffix blocks the k positions before the pending chunk, its <= b suffix inputs and the fast
weights.

Every row of a batch has its own position, pending chunk and TTT-step count, so prompts of
different lengths decode together (`generate` prefills each length once and merges the states;
rows whose chunk is full take their TTT step together, grouped by chunk index).

Modes: 'ttt' (TTT-E2E), 'swa' (same weights, no TTT: eta = 0, no TTT step in decode) and 'full'
(full attention with a growing KV buffer, no TTT): the baselines from the same code. A model
trained with attention='full' decodes 'ttt' / 'swa' as it trained: TTT over chunks, keys of the
whole training length (config.attn_window) kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .inner_loop import Carry, ChunkContext, chunk_step, run_chunks
from .layers import apply_rope, at_least_fp32, rope_angles
from .parallel import nll_of_logits
from .transformer import check_token_ids

MODES = ("ttt", "swa", "full")


def _rotations(model, positions: torch.Tensor) -> torch.Tensor:
    """RoPE rotations of absolute positions (any shape), float64 angles (see rope_angles)."""
    cfg = model.config
    return rope_angles(positions, cfg.head_dim, cfg.rope_theta, torch.float64)


@dataclass
class KVBuffer:
    """One block's rotated keys and values [B, H, S, dh], written in place, and the absolute
    position held in each slot [B, S] (-1: empty). window = k: a ring, slot = position % k;
    window None (full attention): slot = position, grown by doubling when full."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    window: int | None

    @classmethod
    def from_sequence(
        cls,
        model,
        k: torch.Tensor,
        v: torch.Tensor,
        next_position: int,
        window: int | None,
        capacity: int = 0,
    ) -> KVBuffer:
        """From un-rotated keys/values [B, H, n, dh] of positions next_position-n..next_position-1
        (rows at negative positions are padding and stay empty)."""
        batch, heads, n, dh = k.shape
        size = window if window is not None else max(capacity, next_position, 1)
        keep = min(n, size)
        pos = torch.arange(next_position - keep, next_position, device=k.device)
        k, v, pos = k[:, :, n - keep :], v[:, :, n - keep :], pos
        real = pos >= 0
        k, v, pos = k[:, :, real], v[:, :, real], pos[real]
        buf = cls(
            k.new_zeros(batch, heads, size, dh),
            v.new_zeros(batch, heads, size, dh),
            torch.full((batch, size), -1, dtype=torch.long, device=k.device),
            window,
        )
        slots = pos if window is None else pos % window
        buf.keys[:, :, slots] = apply_rope(k, _rotations(model, pos))
        buf.values[:, :, slots] = v
        buf.positions[:, slots] = pos
        return buf

    def _grow(self, needed: int, exact: bool = False) -> None:
        size = self.keys.shape[2]
        if needed <= size:
            return
        new = needed if exact else max(needed, 2 * size)
        pad = (0, 0, 0, new - size)
        self.keys, self.values = F.pad(self.keys, pad), F.pad(self.values, pad)
        self.positions = F.pad(self.positions, (0, new - size), value=-1)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rotation: torch.Tensor,
        position: torch.Tensor,
    ) -> torch.Tensor:
        """Write this token's key/value (each row at its own position [B]) and attend its query
        ([B, H, 1, dh], un-rotated) over the keys in the window: t - k < j <= t."""
        rows = torch.arange(q.shape[0], device=q.device)
        if self.window is None:
            self._grow(int(position.max()) + 1)
            slots = position
        else:
            slots = position % self.window
        self.keys[rows, :, slots] = apply_rope(k, rotation)[:, :, 0]
        self.values[rows, :, slots] = v[:, :, 0]
        self.positions[rows, slots] = position
        visible = self.positions >= 0
        if self.window is not None:
            visible &= self.positions > (position - self.window)[:, None]
        return F.scaled_dot_product_attention(
            apply_rope(q, rotation), self.keys, self.values, attn_mask=visible[:, None, None, :]
        )

    def attend_many(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rotation: torch.Tensor,
        positions: torch.Tensor,
    ) -> torch.Tensor:
        """attend() for n consecutive tokens per row at once (q, k, v [B, H, n, dh], positions
        [B, n]): each query sees the buffer's keys and the new ones in its window; the new keys
        are written after (in a ring they may replace keys the earlier queries still see)."""
        k_rot = apply_rope(k, rotation)
        keys = torch.cat((self.keys, k_rot), 2)
        key_pos = torch.cat((self.positions, positions), 1)[:, None, :]  # [B, 1, S + n]
        query_pos = positions[:, :, None]  # [B, n, 1]
        visible = (key_pos >= 0) & (key_pos <= query_pos)
        if self.window is not None:
            visible &= key_pos > query_pos - self.window
        out = F.scaled_dot_product_attention(
            apply_rope(q, rotation),
            keys,
            torch.cat((self.values, v), 2),
            attn_mask=visible[:, None],
        )
        # a ring keeps the last k of them (writing more would put two keys in one slot)
        keep = k.shape[2] if self.window is None else min(k.shape[2], self.window)
        k_rot, v, positions = k_rot[:, :, -keep:], v[:, :, -keep:], positions[:, -keep:]
        if self.window is None:
            self._grow(int(positions.max()) + 1)
            slots = positions
        else:
            slots = positions % self.window
        rows = torch.arange(q.shape[0], device=q.device)[:, None]
        self.keys[rows, :, slots] = k_rot.transpose(1, 2)
        self.values[rows, :, slots] = v.transpose(1, 2)
        self.positions[rows, slots] = positions
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.positions))

    @classmethod
    def concat(cls, buffers: Sequence[KVBuffer]) -> KVBuffer:
        """Rows of several buffers as one (full attention: padded to the largest)."""
        for buf in buffers:
            buf._grow(max(b.keys.shape[2] for b in buffers), exact=True)
        return cls(
            torch.cat([b.keys for b in buffers]),
            torch.cat([b.values for b in buffers]),
            torch.cat([b.positions for b in buffers]),
            buffers[0].window,
        )


@dataclass
class DecodeState:
    """The decode state of a batch of sequences; each row has its own position and chunk."""

    mode: str
    positions: torch.Tensor  # [B] tokens consumed (absolute position of the next one)
    kv: list[KVBuffer]  # per block
    chunk: Carry  # theta (fp32) and the suffix caches before the pending chunk
    pending_inputs: torch.Tensor  # [B, b, d] suffix inputs of the pending chunk (first r rows)
    pending_tokens: torch.Tensor  # [B, b] its input tokens
    pending_count: torch.Tensor  # [B] r: tokens in the pending chunk
    chunks_done: torch.Tensor  # [B] TTT steps taken
    last_logits: torch.Tensor  # [B, V] logits for the next token

    @property
    def fast(self) -> list[torch.Tensor]:
        """The current fast weights theta, 3 per TTT block."""
        return self.chunk.fast

    def nbytes(self) -> int:
        """Bytes held (KV buffers, chunk snapshot, pending chunk, fast weights)."""
        tensors = list(self.chunk.tensors()) + [self.pending_inputs, self.pending_tokens]
        return sum(b.nbytes() for b in self.kv) + sum(t.numel() * t.element_size() for t in tensors)

    def select(self, index: torch.Tensor) -> DecodeState:
        """The rows `index` (a 1-D tensor) as a new state (copies)."""
        return _select_rows(self, index)

    @classmethod
    def concat(cls, states: Sequence[DecodeState]) -> DecodeState:
        """The rows of several states (the same model and mode) decoded as one batch."""
        if len({s.mode for s in states}) != 1:
            raise ValueError("decode states of different modes cannot be merged")
        if len(states) == 1:
            return states[0]
        cat = torch.cat
        n = len(states[0].chunk.fast) // 3
        carry = Carry.from_tensors([cat(ts) for ts in zip(*(s.chunk.tensors() for s in states))], n)
        return cls(
            states[0].mode,
            cat([s.positions for s in states]),
            [KVBuffer.concat(bufs) for bufs in zip(*(s.kv for s in states))],
            carry,
            cat([s.pending_inputs for s in states]),
            cat([s.pending_tokens for s in states]),
            cat([s.pending_count for s in states]),
            cat([s.chunks_done for s in states]),
            cat([s.last_logits for s in states]),
        )


def _window(model, mode: str) -> int | None:
    """Keys a query sees: the trained attention window (the training length for a model trained
    with full attention), or None for the 'full' baseline (every key kept)."""
    return None if mode == "full" else model.config.attn_window


def _eta(model, mode: str, eta: float | None) -> float:
    return 0.0 if mode != "ttt" else (model.config.inner_lr if eta is None else eta)


@contextmanager
def _slow_weights_frozen(model):
    """Autograd records the inner gradient's graph over the fast weights only (no node, and
    nothing saved, for the slow weights' own gradients). Not for a model training meanwhile."""
    slow = [p for p in model.parameters() if p.requires_grad]
    for p in slow:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            yield
    finally:
        for p in slow:
            p.requires_grad_(True)


@torch.no_grad()
def prefill(
    model, tokens: torch.Tensor, mode: str = "ttt", eta: float | None = None, reserve: int = 0
) -> tuple[DecodeState, torch.Tensor]:
    """Consume a prompt: (state, NLL [B, P-1] of each prompt token after the first).
    reserve: tokens to be decoded after it (the 'full' baseline preallocates their keys)."""
    if mode not in MODES:
        raise ValueError(f"unknown decode mode {mode!r}; choose one of {MODES}")
    check_token_ids(tokens, model.config.vocab_size, "prompt")
    cfg = model.config
    batch, length = tokens.shape
    window = _window(model, mode)
    eta = _eta(model, mode, eta)
    rope_abs = model.rope(torch.arange(length, device=tokens.device))
    attn_window = length if window is None else window
    capacity = length + reserve

    # prefix blocks over the whole prompt (absolute positions), their last k keys/values kept
    h = model.embed(tokens)
    kv = []
    for block in model.prefix_blocks:
        h, k, v = block.forward_kv(h, rope_abs, attn_window)
        kv.append(KVBuffer.from_sequence(model, k, v, length, window, capacity))
    suffix_in = h

    b = cfg.chunk_size
    carry = Carry.initial(model, batch, suffix_in, window or 0)
    # theta is updated in place per row: a copy (a batch of one would view theta_0 itself)
    carry.fast = [at_least_fp32(t).clone(memory_format=torch.contiguous_format) for t in carry.fast]
    counts = torch.zeros(batch, dtype=torch.long, device=tokens.device)
    if window is None:
        # full attention, no TTT: the plain pass with theta_0, every key kept
        for s, block in enumerate(model.ttt_blocks):
            h, k, v = block.forward_kv(h, rope_abs, length, carry.block_fast(s))
            kv.append(KVBuffer.from_sequence(model, k, v, length, None, capacity))
        logits = model.logits(h)
        nll = nll_of_logits(logits[:, :-1], tokens[:, 1:])
        state = DecodeState(
            mode,
            counts + length,
            kv,
            carry,
            suffix_in.new_zeros(batch, 0, cfg.d_model),
            tokens.new_zeros(batch, 0),
            counts.clone(),
            counts.clone(),
            logits[:, -1],
        )
        return state, nll

    nll_parts = []
    n_done = (length - 1) // b  # chunks whose targets are all inside the prompt
    if n_done:
        ctx = ChunkContext.build(model, tokens[:, 1 : n_done * b + 1], eta, window)
        with _slow_weights_frozen(model):  # the inner gradients (no graph is kept)
            out = run_chunks(model, ctx, 0, carry, suffix_in[:, : n_done * b])
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
        kv.append(
            KVBuffer.from_sequence(
                model, torch.cat((ck, k), 2), torch.cat((cv, v), 2), length, window
            )
        )
    logits = model.logits(h)
    if pending.shape[1] > 1:
        nll_parts.append(nll_of_logits(logits[:, :-1], tokens[:, start + 1 :]))
    r = pending.shape[1]
    pending_inputs = suffix_in.new_zeros(batch, b, cfg.d_model)
    pending_inputs[:, :r] = pending
    pending_tokens = tokens.new_zeros(batch, b)
    pending_tokens[:, :r] = tokens[:, start:]
    state = DecodeState(
        mode,
        counts + length,
        kv,
        carry,
        pending_inputs,
        pending_tokens,
        counts + r,
        counts + n_done,
        logits[:, -1],
    )
    nll = torch.cat(nll_parts, 1) if nll_parts else suffix_in.new_zeros(batch, 0)
    return state, nll


def _ttt_steps(
    model, state: DecodeState, next_tokens: torch.Tensor, rows: torch.Tensor, eta: float
) -> None:
    """The TTT step of each row in `rows` (its pending chunk is full and the token after it is
    known), rows at the same chunk index together."""
    b = model.config.chunk_size
    window = _window(model, state.mode)
    done = state.chunks_done[rows]
    for c in done.unique().tolist():
        sel = rows[done == c]
        targets = torch.cat((state.pending_tokens[sel, 1:], next_tokens[sel, None]), 1)
        ctx = ChunkContext.build(model, targets, eta, window, offset=c * b)
        carry = Carry.from_tensors([t[sel] for t in state.chunk.tensors()], len(model.ttt_blocks))
        with _slow_weights_frozen(model):  # the inner gradient (no graph is kept)
            new = chunk_step(model, ctx, c, carry, state.pending_inputs[sel], False).carry
        for t, n in zip(state.chunk.tensors(), new.tensors()):
            t[sel] = n
    state.chunks_done[rows] += 1
    state.pending_count[rows] = 0


@torch.no_grad()
def decode_step(
    model, state: DecodeState, tokens: torch.Tensor, eta: float | None = None
) -> torch.Tensor:
    """Feed one token per sequence ([B]); returns the logits for the next one ([B, V])."""
    cfg = model.config
    batch = state.positions.shape[0]
    if tokens.dim() != 1 or tokens.shape[0] != batch:
        raise ValueError(
            f"decode_step takes one token per sequence ([{batch}]), got {tuple(tokens.shape)}"
        )
    check_token_ids(tokens[:, None], cfg.vocab_size, "token")
    tracks_chunks = state.mode == "ttt"  # 'swa': eta = 0, theta never moves; 'full': no chunks
    rows = torch.arange(batch, device=tokens.device)
    if tracks_chunks:
        full = (state.pending_count == cfg.chunk_size).nonzero()[:, 0]
        if full.numel():
            _ttt_steps(model, state, tokens, full, _eta(model, state.mode, eta))
    position = state.positions
    rotation = _rotations(model, position)[:, None, None]  # [B, 1, 1, dh/2]
    h = model.embed(tokens[:, None])
    n_prefix = len(model.prefix_blocks)
    for layer, block in enumerate(model.blocks):
        fast = None
        if layer >= n_prefix:
            fast = state.chunk.block_fast(layer - n_prefix)
            if layer == n_prefix and tracks_chunks:
                state.pending_inputs[rows, state.pending_count] = h[:, 0]
        buffer = state.kv[layer]
        h = block.forward_attending(
            h, lambda q, k, v: buffer.attend(q, k, v, rotation, position), fast
        )
    if tracks_chunks:
        state.pending_tokens[rows, state.pending_count] = tokens
        state.pending_count += 1
    state.positions = position + 1
    state.last_logits = model.logits(h)[:, -1]
    return state.last_logits


@torch.no_grad()
def extend(
    model, state: DecodeState, tokens: torch.Tensor, eta: float | None = None
) -> torch.Tensor:
    """Feed n tokens to one sequence ([1, n]) at once: what n decode_step calls give (to
    round-off), with one pass per block for each run of tokens between TTT steps (a chunk's
    step runs when the token after it is fed, as in decode_step). Returns the logits for the
    next token ([1, V]). What a server uses to read a conversation's new message."""
    if tokens.dim() != 2 or tokens.shape[0] != 1 or state.positions.shape[0] != 1:
        raise ValueError(f"extend feeds one sequence: tokens [1, n], got {tuple(tokens.shape)}")
    cfg = model.config
    check_token_ids(tokens, cfg.vocab_size, "token")
    tracks_chunks = state.mode == "ttt"
    b, done, total = cfg.chunk_size, 0, tokens.shape[1]
    row = torch.zeros(1, dtype=torch.long, device=tokens.device)
    while done < total:
        run = total - done
        if tracks_chunks:
            if int(state.pending_count[0]) == b:  # the chunk's targets are now all known
                _ttt_steps(model, state, tokens[:, done], row, _eta(model, state.mode, eta))
            run = min(run, b - int(state.pending_count[0]))
        _feed_run(model, state, tokens[:, done : done + run], tracks_chunks)
        done += run
    return state.last_logits


def _feed_run(model, state: DecodeState, tokens: torch.Tensor, tracks_chunks: bool) -> None:
    """n tokens of one sequence through every block with the current fast weights."""
    n = tokens.shape[1]
    positions = state.positions[:, None] + torch.arange(n, device=tokens.device)  # [1, n]
    rotation = _rotations(model, positions)[:, None]  # [1, 1, n, dh/2]
    h = model.embed(tokens)
    n_prefix = len(model.prefix_blocks)
    r = int(state.pending_count[0])
    for layer, block in enumerate(model.blocks):
        fast = None
        if layer >= n_prefix:
            fast = state.chunk.block_fast(layer - n_prefix)
            if layer == n_prefix and tracks_chunks:
                state.pending_inputs[:, r : r + n] = h
        buffer = state.kv[layer]
        h = block.forward_attending(
            h, lambda q, k, v: buffer.attend_many(q, k, v, rotation, positions), fast
        )
    if tracks_chunks:
        state.pending_tokens[:, r : r + n] = tokens
        state.pending_count += n
    state.positions = state.positions + n
    state.last_logits = model.logits(h)[:, -1]


def sample_next(
    logits: torch.Tensor,
    generated: torch.Tensor | None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """[B, V] logits -> [B] tokens: repetition penalty (CTRL: seen tokens' logits divided by it
    when positive, multiplied when negative), then greedy (temperature 0) or nucleus sampling."""
    logits = logits.float().clone()
    if repetition_penalty != 1.0 and generated is not None and generated.numel():
        seen = torch.gather(logits, 1, generated)
        logits.scatter_(
            1,
            generated,
            torch.where(seen > 0, seen / repetition_penalty, seen * repetition_penalty),
        )
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the smallest set reaching top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(1, order, sorted_p)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator)[:, 0]


def _as_rows(prompts, device) -> list[torch.Tensor]:
    """A [B, P] tensor or a list of token-id lists -> one 1-D tensor per prompt."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2 or prompts.shape[1] == 0:
            raise ValueError(f"prompts must be [B, P] with P >= 1, got {tuple(prompts.shape)}")
        return list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: give at least one token")
    return [torch.as_tensor(p, dtype=torch.long, device=device) for p in prompts]


def prefill_prompts(model, prompts, mode: str = "ttt", reserve: int = 0) -> DecodeState:
    """One decode state for prompts of any lengths: each length prefilled as one batch, the
    states merged (rows in the prompts' order)."""
    rows = _as_rows(prompts, next(model.parameters()).device)
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r.shape[0], []).append(i)
    states, order = [], []
    for members in groups.values():
        states.append(
            prefill(model, torch.stack([rows[i] for i in members]), mode, reserve=reserve)[0]
        )
        order += members
    state = DecodeState.concat(states)
    if order != sorted(order):
        back = torch.tensor(order, device=state.positions.device).argsort()
        state = _select_rows(state, back)
    return state


def _select_rows(state: DecodeState, index: torch.Tensor) -> DecodeState:
    n = len(state.chunk.fast) // 3
    return DecodeState(
        state.mode,
        state.positions[index],
        [KVBuffer(b.keys[index], b.values[index], b.positions[index], b.window) for b in state.kv],
        Carry.from_tensors([t[index] for t in state.chunk.tensors()], n),
        state.pending_inputs[index],
        state.pending_tokens[index],
        state.pending_count[index],
        state.chunks_done[index],
        state.last_logits[index],
    )


def stream_generate(
    model,
    prompt,
    max_new_tokens: int = 64,
    mode: str = "ttt",
    temperature: float = 0.0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    stop_tokens: tuple[int, ...] = (),
    seed: int | None = None,
    max_context: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield [B] new tokens one step at a time (finished sequences repeat their stop token).
    prompt: [B, P] or a list of token-id lists of any lengths (decoded as one batch)."""
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    device = next(model.parameters()).device
    rows = _as_rows(prompt, device)
    longest = max(r.shape[0] for r in rows)
    if max_context is not None and longest + max_new_tokens > max_context:
        raise ValueError(
            f"prompt of {longest} tokens + {max_new_tokens} new exceeds max_context {max_context}"
        )
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    state = prefill_prompts(model, rows, mode, reserve=max_new_tokens)
    # the repetition penalty's history: shorter prompts padded in front with their own first
    # token (a repeated id changes nothing)
    generated = torch.stack([torch.cat((r[:1].expand(longest - r.shape[0]), r)) for r in rows])
    done = torch.zeros(len(rows), dtype=torch.bool, device=device)
    stops = torch.tensor(list(stop_tokens) or [-1], device=device)
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


def generate(
    model,
    prompts: torch.Tensor | list,
    max_new_tokens: int = 64,
    mode: str = "ttt",
    on_token: Callable[[torch.Tensor], None] | None = None,
    **sampling,
) -> list[list[int]]:
    """New tokens for each prompt (stop token included when hit). prompts: [B, P] tensor or a list
    of token-id lists of any lengths: all decoded as one batch, each row at its own position."""
    stops = set(sampling.get("stop_tokens", ()))
    out: list[list[int]] | None = None
    for token in stream_generate(model, prompts, max_new_tokens, mode, **sampling):
        if on_token is not None:
            on_token(token)
        out = out if out is not None else [[] for _ in range(token.shape[0])]
        for j, t in enumerate(token.tolist()):
            if not (out[j] and out[j][-1] in stops):
                out[j].append(t)
    if out is None:
        out = [[] for _ in _as_rows(prompts, next(model.parameters()).device)]
    return out
