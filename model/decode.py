"""Inference with continued test-time training (paper section 2.3.2): prefill, decode, generate.

Prefill is the training forward: the prefix blocks over the prompt, then the chunked inner loop
over every chunk whose targets are all known (the official chunk step itself, `_chunk_run`), so
its NLLs equal `meta_loss(...).token_nll`. What is left (1..b tokens) is the pending chunk: run
with the current fast weights, its suffix inputs kept for its TTT step.

Decode: one token at a time through every block with the current fast weights (a sliding-window
transformer step over cached pre-RoPE keys/values, buffer-local RoPE as in training). When the
token after a full pending chunk arrives, the chunk's targets are known and one TTT step runs on
it: the same chunk step as training, from the suffix caches as they were before the chunk. So
teacher-forced decoding reproduces the training NLLs, and the per-token cost does not grow with
the context: the state holds per block the last k positions, plus for the suffix blocks the k
positions before the pending chunk, its <= b suffix inputs and the fast weights.

Modes: 'ttt' (TTT-E2E), 'swa' (same weights, no TTT: eta = 0) and 'full' (full attention with a
growing KV cache, no TTT): the baselines from the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .inner_loop import _chunk_run, _LoopContext
from .layers import at_least_fp32

MODES = ("ttt", "swa", "full")


@dataclass
class DecodeState:
    """The decode state of a batch of sequences that have consumed the same number of tokens."""

    mode: str
    position: int                          # tokens consumed (absolute position of the next one)
    caches: list[list[torch.Tensor]]       # per block [K, V] pre-RoPE, [B, H, <=W, dh]
    fast: list[torch.Tensor]               # 3 per TTT block, [B, out, in] fp32: the current theta
    chunk_caches: list[torch.Tensor]       # 2 per TTT block: their caches before the pending chunk
    pending_inputs: torch.Tensor           # [B, r, d] suffix inputs of the pending chunk (r <= b)
    pending_tokens: torch.Tensor           # [B, r] its input tokens
    chunks_done: int = 0                   # TTT steps taken
    last_logits: torch.Tensor | None = None  # [B, V] logits for the next token
    inner_grad_norms: list[torch.Tensor] = field(default_factory=list)

    def nbytes(self) -> int:
        """Bytes held (KV caches, chunk snapshot, pending inputs, fast weights)."""
        tensors = [t for pair in self.caches for t in pair] + self.fast + self.chunk_caches
        tensors += [self.pending_inputs, self.pending_tokens]
        return sum(t.numel() * t.element_size() for t in tensors)


def _window(model, mode: str) -> int | None:
    return None if mode == "full" or model.config.attention == "full" else model.config.window


def _check_tokens(model, tokens: torch.Tensor, name: str) -> None:
    if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be an integer tensor [batch, length], got "
                         f"{tuple(tokens.shape)} {tokens.dtype}")
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(f"{name} is empty ({tuple(tokens.shape)}): give at least one token")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= model.config.vocab_size:
        raise ValueError(f"{name} holds token id {low if low < 0 else high}, outside the "
                         f"vocabulary 0..{model.config.vocab_size - 1}")


def _kv(block, h: torch.Tensor):
    _, k, v = block.attn.project(block.attn_norm(h))
    return k, v


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
    _check_tokens(model, tokens, "prompt")
    cfg = model.config
    batch, length = tokens.shape
    window = _window(model, mode)
    eta = 0.0 if mode != "ttt" else (cfg.inner_lr if eta is None else eta)
    positions = torch.arange(length, device=tokens.device)
    rope_abs = model.rope(positions)
    attn_window = length if window is None else window

    # prefix blocks over the whole prompt (absolute positions), keeping their last k keys/values
    h = model.embed(tokens)
    caches = []
    for block in model.prefix_blocks:
        k, v = _kv(block, h)
        caches.append([_keep(k, window), _keep(v, window)])
        h = block(h, rope_abs, attn_window)
    suffix_in = h

    b = cfg.chunk_size
    fast = [at_least_fp32(w.weight).unsqueeze(0).expand(batch, -1, -1).contiguous()
            for blk in model.ttt_blocks for w in (blk.prime_mlp.w1, blk.prime_mlp.w3,
                                                    blk.prime_mlp.w2)]
    nll_parts = []
    if window is None:
        # full attention, no TTT: the plain pass with theta_0, every key kept
        for s, block in enumerate(model.ttt_blocks):
            k, v = _kv(block, h)
            caches.append([k, v])
            h = block(h, rope_abs, length, tuple(fast[3 * s:3 * s + 3]))
        logits = model.logits(h)
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none"
        ).view(batch, length - 1)
        empty = suffix_in.new_zeros(batch, 0, cfg.d_model)
        state = DecodeState(mode, length, caches, fast, [], empty, tokens[:, :0],
                            last_logits=logits[:, -1])
        return state, nll

    n_heads, head_dim = cfg.n_heads, cfg.head_dim
    chunk_caches = [suffix_in.new_zeros(batch, n_heads, window, head_dim)
                    for _ in range(2 * len(model.ttt_blocks))]
    n_done = (length - 1) // b  # chunks whose targets are all inside the prompt
    if n_done:
        targets = tokens[:, 1:n_done * b + 1]
        ctx = _LoopContext(targets=targets, mask=(targets != cfg.bos_token_id).float(),
                           rope=model.rope(torch.arange(window + b, device=tokens.device)),
                           eta=eta, clip=cfg.inner_clip, window=window, chunk=b)
        n_fast = len(fast)
        for c in range(n_done):
            with torch.enable_grad():  # the inner gradient (no graph is kept)
                out = _chunk_run(model, ctx, c, False, *fast, *chunk_caches,
                                 suffix_in[:, c * b:(c + 1) * b])
            fast = list(out[:n_fast])
            chunk_caches = list(out[n_fast:n_fast + len(chunk_caches)])
            nll_parts.append(out[-3])
    # the pending chunk: its tokens through the suffix with the current theta
    start = n_done * b
    pending = suffix_in[:, start:]
    rope = model.rope(torch.arange(window + pending.shape[1], device=tokens.device))
    first_valid = max(0, window - start)
    h = pending
    for s, block in enumerate(model.ttt_blocks):
        ck, cv = chunk_caches[2 * s], chunk_caches[2 * s + 1]
        h, k, v = block.forward_chunk(h, ck, cv, rope, window, first_valid,
                                      tuple(fast[3 * s:3 * s + 3]))
        caches.append([torch.cat((ck, k), 2)[:, :, -window:], torch.cat((cv, v), 2)[:, :, -window:]])
    logits = model.logits(h)
    if pending.shape[1] > 1:
        nll_parts.append(torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), tokens[:, start + 1:].flatten(), reduction="none"
        ).view(batch, -1))
    # prefix caches padded to k rows (rows before the sequence start are masked by first_valid)
    for layer in range(len(model.prefix_blocks)):
        caches[layer] = [_pad_front(t, window) for t in caches[layer]]
    state = DecodeState(mode, length, caches, fast, chunk_caches, pending,
                        tokens[:, start:], chunks_done=n_done, last_logits=logits[:, -1])
    nll = torch.cat(nll_parts, 1) if nll_parts else suffix_in.new_zeros(batch, 0)
    return state, nll


@torch.no_grad()
def _ttt_step(model, state: DecodeState, next_tokens: torch.Tensor, eta: float) -> None:
    """The TTT step on the full pending chunk, now that the token after it is known."""
    cfg = model.config
    b, window, c = cfg.chunk_size, cfg.window, state.chunks_done
    targets = torch.cat((state.pending_tokens[:, 1:], next_tokens[:, None]), 1)
    ctx = _LoopContext(targets=targets, mask=(targets != cfg.bos_token_id).float(),
                       rope=model.rope(torch.arange(window + b, device=targets.device)),
                       eta=eta, clip=cfg.inner_clip, window=window, chunk=b, offset=c * b)
    with torch.enable_grad():  # the inner gradient (no graph is kept)
        out = _chunk_run(model, ctx, c, False, *state.fast, *state.chunk_caches,
                         state.pending_inputs)
    n_fast, n_cache = len(state.fast), len(state.chunk_caches)
    state.fast = list(out[:n_fast])
    state.chunk_caches = list(out[n_fast:n_fast + n_cache])
    n_prefix = len(model.prefix_blocks)
    for s in range(len(model.ttt_blocks)):
        # the suffix caches continue from the training step's own keys/values of this chunk
        state.caches[n_prefix + s] = [state.chunk_caches[2 * s], state.chunk_caches[2 * s + 1]]
    state.inner_grad_norms.append(out[-1])
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
    _check_tokens(model, tokens[:, None], "token")
    window = _window(model, state.mode)
    if window is not None and state.pending_tokens.shape[1] == cfg.chunk_size:
        step_eta = 0.0 if state.mode != "ttt" else (cfg.inner_lr if eta is None else eta)
        _ttt_step(model, state, tokens, step_eta)
    t = state.position
    cache_len = t if window is None else window
    rope = model.rope(torch.arange(cache_len + 1, device=tokens.device))
    first_valid = 0 if window is None else max(0, window - t)
    h = model.embed(tokens[:, None])
    n_prefix = len(model.prefix_blocks)
    for layer, block in enumerate(model.blocks):
        ck, cv = state.caches[layer]
        fast = None
        if layer >= n_prefix:
            s = layer - n_prefix
            fast = tuple(state.fast[3 * s:3 * s + 3])
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
