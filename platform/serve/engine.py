"""The decode loop of one serving replica: requests in, text events out, concurrent requests'
tokens computed together.

One thread owns the model. Each generating request is a row of one batched decode state (rows
at different positions, as model/decode.py supports); every loop iteration

  1. admits waiting requests while fewer than `max_batch` are active: a session's state is
     resumed (platform/serve/sessions.py), or a fresh prompt waits to be read;
  2. reads at most `read_chunk` tokens of unread prompts, in pieces, round robin over the
     requests reading (several short prompts in one iteration, a long one over several): a
     fresh prompt's first piece by `prefill`, every later piece, and a resumed session's new
     message, by `extend` (several tokens in one pass per block). That budget bounds how long
     the other rows wait between two of their tokens (chunked prefill);
  3. runs one decode step over the generating rows, each feeding its last sampled token. A
     request whose prompt is read samples its first token and joins them.

A row leaves the batch when it finishes (stop token, stop string, max_tokens) or its client went
away; its state is then saved to the session store (write-through to storage), or dropped for a
request without a session, and only then does the request end (a client's next turn never finds
its session busy). The session's history is the prompt as sent plus the text of the generated
tokens that were fed. A reply that ends at max_tokens has its last token fed too (one more step
for that row), so its history is exactly prompt + reply, what the client sends back next turn,
even when the reply ends inside a multi-byte character. A stop token (BOS) is not fed; at a stop
string the token that completed it is not fed, and the history holds the reply plus the part of
the stop string before that token: what the chat template puts after a reply, so the next turn
continues it.

Events (plain dicts; they cross process boundaries in Ray Serve):
  {"event": "start", "prompt_tokens", "cached_tokens", "restarted", "source"}
  {"event": "text", "text": delta}
  {"event": "end", "finish_reason": "stop" | "length", "completion_tokens", "state_bytes"}
  {"event": "error", "status", "code", "message", "param"}
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from ttte2e.model.decode import MODES, DecodeState, decode_step, extend, prefill, sample_next
from ttte2e.platform.serve.sessions import (
    SessionBusy,
    SessionConflict,
    SessionNotFound,
    SessionStore,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineSettings:
    mode: str = "ttt"  # 'ttt', or the baselines 'swa' / 'full'
    max_batch: int = 32  # requests active together (generating rows + prompts being read)
    max_prompt_tokens: int = 8192  # tokens one request may ask a replica to read
    read_chunk: int = 256  # prompt tokens read between two decode steps (all requests)
    max_tokens: int = 1024  # the largest max_tokens a request may ask for
    max_context: int | None = None  # position limit (None: ttt/swa states do not grow)
    max_sessions_on_device: int = 64
    max_host_bytes: int = 1 << 30
    session_storage: str | None = None  # a folder or s3:// prefix: snapshots survive replicas

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: choose one of {MODES}")
        for name in ("max_batch", "max_prompt_tokens", "max_tokens", "read_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings (not included in the text)
    ignore_eos: bool = False  # keep generating past BOS (benchmarks: replies of fixed length)


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str | list[int]  # the whole conversation so far: text, or token ids
    sampling: Sampling = Sampling()
    session_id: str | None = None
    strict: bool = False  # continue the session or fail (404 / 409), never start over


class RequestError(Exception):
    """A request refused with an HTTP status (OpenAI-style error body)."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param

    def event(self) -> dict:
        return dict(
            event="error", status=self.status, code=self.code, message=self.message,
            param=self.param,
        )  # fmt: skip


@dataclass(eq=False)
class _Job:
    request: GenerationRequest
    emit: object  # callable(event dict), thread-safe
    cancelled: bool = False
    state: DecodeState | None = None  # while its prompt is read (None: nothing read yet)
    feed: deque = field(default_factory=deque)  # unread prompt tokens, then the token to feed
    reading: bool = True  # feed holds prompt tokens
    sampled: list[int] = field(default_factory=list)
    fed: int = 0  # sampled tokens fed to the model
    sent: str = ""
    closing: bool = False  # max_tokens reached: the last token is fed, then the row leaves
    generator: torch.Generator | None = None
    finish_reason: str | None = None


def _durable(written, end: dict, session_id: str) -> dict:
    error = written.exception()
    if error is None:
        return end
    log.warning("session %s: its snapshot was not written to storage (%s)", session_id, error)
    return dict(end, storage_error=f"{type(error).__name__}: {error}")


class Engine:
    def __init__(self, model, tokenizer, settings: EngineSettings = EngineSettings()):
        if tokenizer is None:
            raise ValueError("serving needs the model's tokenizer (tokenizer.json beside it)")
        self.model, self.tokenizer, self.settings = model.eval(), tokenizer, settings
        self.device = next(model.parameters()).device
        self.bos = model.config.bos_token_id
        self.store = SessionStore(
            model, settings.max_sessions_on_device, settings.max_host_bytes,
            settings.session_storage,
        )  # fmt: skip
        self._incoming: queue.Queue[_Job] = queue.Queue()
        self._waiting: deque[_Job] = deque()
        self._reading: deque[_Job] = deque()
        self._rows: list[_Job] = []
        self._batch: DecodeState | None = None
        self.counters = dict(steps=0, row_steps=0, max_rows=0, read_pieces=0, requests=0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ttte2e-decode", daemon=True)
        self._thread.start()

    # ---- the caller's side ---------------------------------------------------------------------
    def submit(self, request: GenerationRequest, emit) -> _Job:
        """Queue a request; `emit(event)` is called from the decode thread."""
        s = request.sampling
        if not 1 <= s.max_tokens <= self.settings.max_tokens:
            raise RequestError(
                400, "max_tokens_out_of_range",
                f"max_tokens must be in [1, {self.settings.max_tokens}], got {s.max_tokens}",
                "max_tokens",
            )  # fmt: skip
        if self._stop.is_set():
            raise RequestError(503, "shutting_down", "this replica is shutting down")
        job = _Job(request, emit)
        self._incoming.put(job)
        return job

    async def stream(self, request: GenerationRequest):
        """The request's events as an async iterator (ends after 'end' or 'error'); the request
        is cancelled when the consumer stops early."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        try:
            job = self.submit(request, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        except RequestError as e:
            yield e.event()
            return
        try:
            while True:
                event = await events.get()
                yield event
                if event["event"] in ("end", "error"):
                    return
        finally:
            job.cancelled = True

    def close(self) -> None:
        self._stop.set()
        self._incoming.put(None)  # wakes the loop
        self._thread.join(timeout=30)
        self.store.flush()  # snapshots of the turns already ended reach storage

    def stats(self) -> dict:
        return dict(
            self.counters, active=len(self._rows), waiting=len(self._waiting),
            sessions=self.store.stats(),
        )  # fmt: skip

    # ---- the decode thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._admit(block=not (self._rows or self._reading or self._waiting))
                if self._reading:
                    self._read(self.settings.read_chunk)
                if self._rows:
                    self._step()
            except Exception as e:  # noqa: BLE001 - a failed step fails its requests, not the replica
                self._fail_all(e)
        self._fail_all(RequestError(503, "shutting_down", "this replica is shutting down"))

    def _admit(self, block: bool) -> None:
        try:
            job = self._incoming.get(timeout=0.5) if block else self._incoming.get_nowait()
            while True:
                if job is not None:
                    self._waiting.append(job)
                job = self._incoming.get_nowait()
        except queue.Empty:
            pass
        while self._waiting and len(self._rows) + len(self._reading) < self.settings.max_batch:
            job = self._waiting.popleft()
            if job.cancelled:
                continue
            try:
                self._start(job)
            except RequestError as e:
                job.emit(e.event())

    def _start(self, job: _Job) -> None:
        req = job.request
        resumed = None
        if req.session_id is not None:
            try:
                resumed = self.store.resume(req.session_id, req.prompt, req.strict)
            except SessionBusy as e:
                raise RequestError(409, "session_busy", str(e)) from None
            except SessionConflict as e:
                raise RequestError(409, "session_conflict", str(e)) from None
            except SessionNotFound as e:
                raise RequestError(404, "session_not_found", str(e)) from None
            except ValueError as e:
                raise RequestError(400, "invalid_session_id", str(e)) from None
        try:
            if resumed is not None and resumed.state is not None:
                unread, cached = self._tokens(resumed.unread, first=False), resumed.cached
            else:
                unread, cached = self._tokens(req.prompt, first=True), 0
            self._check_limits(unread, cached, req.sampling.max_tokens)
        except RequestError:
            if resumed is not None:
                self.store.put_back(req.session_id, resumed)
            raise
        self.counters["requests"] += 1
        job.emit(
            dict(
                event="start",
                prompt_tokens=cached + len(unread),
                cached_tokens=cached,
                restarted=bool(resumed and resumed.restarted),
                source=resumed.source if resumed else "none",
            )
        )
        if req.sampling.temperature > 0:
            seed = req.sampling.seed
            seed = int(torch.randint(0, 2**62, ())) if seed is None else seed
            job.generator = torch.Generator(device=self.device).manual_seed(seed)
        job.state = resumed.state if resumed is not None else None
        job.feed.extend(unread)
        if job.feed:
            self._reading.append(job)
        else:  # the prompt is exactly the history: its next-token logits are ready
            self._done_reading(job)

    def _tokens(self, prompt, first: bool) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt).ids
            # documents start with BOS in training (prepare_data), so a conversation does too
            return ([self.bos] if first else []) + ids
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise RequestError(
                400, "invalid_token_id", f"token ids {bad[:5]} are outside [0, {vocab})", "prompt"
            )
        return list(prompt)

    def _check_limits(self, unread: list[int], cached: int, max_tokens: int) -> None:
        settings = self.settings
        if cached == 0 and not unread:
            raise RequestError(400, "empty_prompt", "the prompt is empty", "prompt")
        if len(unread) > settings.max_prompt_tokens:
            raise RequestError(
                400, "prompt_too_long",
                f"the prompt has {len(unread)} tokens to read; this server reads at most "
                f"{settings.max_prompt_tokens} per request",
                "prompt",
            )  # fmt: skip
        total = cached + len(unread) + max_tokens
        if settings.max_context is not None and total > settings.max_context:
            raise RequestError(
                400, "context_length_exceeded",
                f"{cached + len(unread)} prompt tokens + max_tokens exceed this server's context "
                f"of {settings.max_context} tokens",
                "max_tokens",
            )  # fmt: skip

    def _read(self, budget: int) -> None:
        while self._reading and budget > 0:
            job = self._reading.popleft()
            if job.cancelled:
                self._finish(job, job.state)
                continue
            n = min(budget, len(job.feed))
            budget -= n
            piece = torch.tensor([[job.feed.popleft() for _ in range(n)]], device=self.device)
            if job.state is None:
                job.state, _ = prefill(self.model, piece, self.settings.mode)
            else:
                extend(self.model, job.state, piece)
            self.counters["read_pieces"] += 1
            if job.feed:
                self._reading.append(job)  # its next piece after the other readers' (round robin)
            else:
                self._done_reading(job)

    def _done_reading(self, job: _Job) -> None:
        """The prompt is read: sample the first token, then join the generating rows."""
        job.reading = False
        self._sampled(job, job.state.last_logits)
        if job.finish_reason is not None and not job.closing:
            self._finish(job, job.state)
        else:
            self._join(job)

    def _join(self, job: _Job) -> None:
        state, job.state = job.state, None
        self._batch = state if self._batch is None else DecodeState.concat([self._batch, state])
        self._rows.append(job)

    def _step(self) -> None:
        inputs = []
        for job in self._rows:
            inputs.append(job.feed.popleft())
            job.fed += 1
        tokens = torch.tensor(inputs, device=self.device)
        logits = decode_step(self.model, self._batch, tokens)
        self.counters["steps"] += 1
        self.counters["row_steps"] += len(self._rows)
        self.counters["max_rows"] = max(self.counters["max_rows"], len(self._rows))
        leaving = []
        for i, job in enumerate(self._rows):
            if job.cancelled or job.closing:
                leaving.append(i)
            else:
                self._sampled(job, logits[i : i + 1])
                if job.finish_reason is not None and not job.closing:
                    leaving.append(i)
        if leaving:
            self._leave(leaving)

    def _leave(self, rows: list[int]) -> None:
        for i in rows:
            self._finish(self._rows[i], self._batch.select(torch.tensor([i], device=self.device)))
        keep = [i for i in range(len(self._rows)) if i not in set(rows)]
        self._rows = [self._rows[i] for i in keep]
        self._batch = self._batch.select(torch.tensor(keep, device=self.device)) if keep else None

    def _sampled(self, job: _Job, logits: torch.Tensor) -> None:
        """Sample the next token from [1, V] logits, emit the text it adds; queue it or finish."""
        s = job.request.sampling
        token = int(sample_next(logits, None, s.temperature, s.top_p, 1.0, job.generator)[0])
        if token == self.bos and not s.ignore_eos:  # BOS would start the next document
            job.finish_reason = "stop"
        else:
            job.sampled.append(token)
            if len(job.sampled) >= s.max_tokens:
                job.finish_reason = "length"
        text = self.tokenizer.decode(job.sampled)
        for stop in s.stop:
            at = text.find(stop)
            if at >= 0:
                text, job.finish_reason = text[:at], "stop"
        if job.finish_reason is None:
            # held back: what may begin a stop string, and an incomplete UTF-8 character
            hold = max((len(x) - 1 for x in s.stop), default=0)
            text = text[: len(text) - hold] if hold else text
            text = text.rstrip("\ufffd")
        if text.startswith(job.sent) and len(text) > len(job.sent):
            job.emit(dict(event="text", text=text[len(job.sent) :]))
            job.sent = text
        if job.finish_reason is None or job.finish_reason == "length":
            job.feed.append(token)
            job.closing = job.finish_reason is not None

    def _finish(self, job: _Job, state: DecodeState | None) -> None:
        """Save the row's state to its session (or drop it) and end the request."""
        req = job.request
        end = dict(
            event="end",
            finish_reason=job.finish_reason,
            completion_tokens=len(job.sampled),
            state_bytes=state.nbytes() if state is not None else 0,
        )
        written = None
        if req.session_id is not None:
            if state is None or job.reading:  # gone before its prompt was read: drop the state
                self.store.release(req.session_id)
            else:
                fed = job.sampled[: job.fed]
                if isinstance(req.prompt, str):
                    history = req.prompt + self.tokenizer.decode(fed)
                else:
                    history = list(req.prompt) + fed
                written = self.store.save(req.session_id, state, history)
        if job.cancelled:
            return
        if written is None:
            job.emit(end)
        else:  # acknowledged once durable; the decode loop goes on meanwhile
            written.add_done_callback(lambda f: job.emit(_durable(f, end, req.session_id)))

    def _fail_all(self, error: Exception) -> None:
        if not isinstance(error, RequestError):
            error = RequestError(500, "internal_error", f"{type(error).__name__}: {error}")
        started = self._rows + list(self._reading)
        waiting = list(self._waiting)
        self._rows, self._batch = [], None
        self._reading.clear()
        self._waiting.clear()
        for job in started:  # their states are mid-request: dropped (storage keeps the last turn)
            if job.request.session_id is not None:
                self.store.release(job.request.session_id)
        for job in started + waiting:
            job.emit(error.event())
