"""Conversations that keep their decode state between requests (fast weights, key/value ring,
pending chunk, position), at a size set by the model, not by the conversation's length.

A session is its decode state plus what it has read: the conversation as text (or as token ids,
for token prompts), by length and sha256, and the number of tokens. A request's prompt (the whole
conversation so far, as OpenAI clients send it) either extends that history, and only the rest
is read, or it does not: the session starts over (`restarted`), or, for a strict client, the
request is refused (`SessionConflict`; `SessionNotFound` when there is no state to continue).
Nothing is mixed in silently. Text is compared as text, not as re-tokenized ids: a reply's tokens
need not be what its text encodes to, and the next turn still continues it.

Where a state lives, most recently used first: on the device (up to `max_on_device` sessions),
as snapshot bytes in host memory (up to `max_host_bytes`), then in storage (a local folder or
s3://, `<id>.safetensors` + `<id>.json`) if one is given, else dropped (the next turn re-reads
the conversation). With storage, every completed turn is also written there (write-through), so
a replica that dies loses at most the turn in flight (a turn is acknowledged once its snapshot is
written; the writes run beside the decode loop, in order): its successor, or another replica the
router sends the session to, reads the session's last snapshot (the JSON, written after the
snapshot, names the snapshot's hash: a half-written pair is ignored). A replica holding an older
state than storage's uses storage's; without storage it continues from its own older state: the
prompt still extends that older history, and the tokens after it are read again. A state
restored from any tier continues exactly as if it had never moved (model/decode_snapshot.py).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ttte2e.model.decode import DecodeState
from ttte2e.model.decode_snapshot import restore, snapshot
from ttte2e.platform.data.storage import resolve

_SESSION_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


class SessionConflict(ValueError):
    """A strict request's prompt does not extend its session's history."""


class SessionNotFound(LookupError):
    """A strict request names a session that has no state to continue (never created, or lost
    with a replica that had no storage)."""


class SessionBusy(RuntimeError):
    """Another request of the session is in flight."""


History = str | list[int]  # a conversation as text, or as token ids


def history_hash(history: History) -> str:
    if isinstance(history, str):
        return hashlib.sha256(history.encode("utf-8")).hexdigest()
    return hashlib.sha256(np.asarray(history, dtype=np.int64).tobytes()).hexdigest()


def _kind(history: History) -> str:
    return "text" if isinstance(history, str) else "tokens"


@dataclass
class _Record:
    tokens: int  # tokens read (the state's position)
    kind: str  # "text" or "tokens": what the history is
    size: int  # its length (characters or tokens)
    digest: str  # history_hash of it
    state: DecodeState | None = None  # on the device
    blob: bytes | None = None  # in host memory

    def extended_by(self, prompt: History) -> bool:
        return (
            self.kind == _kind(prompt)
            and self.size <= len(prompt)
            and history_hash(prompt[: self.size]) == self.digest
        )


@dataclass
class Resumed:
    """What a request starts from: `state` after `cached` tokens (None: read the whole prompt),
    the part of the prompt still to read (text or token ids, as the prompt), and where the state
    came from."""

    state: DecodeState | None
    unread: History
    cached: int
    restarted: bool
    source: str  # "device", "host", "storage", "none"
    _record: _Record | None = field(default=None, repr=False)


class SessionStore:
    def __init__(
        self,
        model,
        max_on_device: int = 8,
        max_host_bytes: int = 1 << 30,
        storage: str | None = None,
    ):
        if max_on_device < 1 or max_host_bytes < 0:
            raise ValueError("max_on_device must be >= 1 and max_host_bytes >= 0")
        self.model = model
        self.max_on_device, self.max_host_bytes = max_on_device, max_host_bytes
        self.storage = resolve(storage) if storage else None
        self._records: OrderedDict[str, _Record] = OrderedDict()  # least recently used first
        self._busy: set[str] = set()
        self._lock = threading.Lock()
        # one writer: a session's snapshots reach storage in the order of its turns
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="session-writer")

    # ---- a request's life: resume, then save (or release on failure) -------------------------
    def resume(self, session_id: str, prompt: History, strict: bool = False) -> Resumed:
        """The state to continue `prompt` (the whole conversation, text or token ids) from; marks
        the session busy until save / release."""
        _check_id(session_id)
        with self._lock:
            if session_id in self._busy:
                raise SessionBusy(f"session {session_id!r} is busy with another request")
            record, source = self._find(session_id)
            extends = record is not None and record.extended_by(prompt)
            if strict and record is None:
                raise SessionNotFound(
                    f"session {session_id!r} has no state here to continue (never created, or "
                    "lost); send the request without strict sessions to start it"
                )
            if strict and not extends:
                raise SessionConflict(
                    f"session {session_id!r}: the prompt does not extend the conversation it "
                    f"holds ({record.size} {'characters' if record.kind == 'text' else 'tokens'})"
                )
            self._busy.add(session_id)
            if not extends:
                self._records.pop(session_id, None)
                return Resumed(None, prompt, 0, record is not None, "none")
            state = record.state if record.state is not None else restore(self.model, record.blob)
            record.state, record.blob = None, None  # the request owns it until save
            resumed = Resumed(state, prompt[record.size :], record.tokens, False, source)
            resumed._record = record
            return resumed

    def save(self, session_id: str, state: DecodeState, history: History) -> Future | None:
        """The state after reading `history` (the conversation so far: what the request's prompt
        and its fed tokens were), most recently used. With storage, the snapshot is taken now and
        written by a background writer (in order): the returned future completes when the turn
        is durable, which is when a server should acknowledge it; the caller's thread (the decode
        loop) does not wait for storage."""
        if state.positions.shape[0] != 1:
            raise ValueError(f"a session holds one row, got {state.positions.shape[0]}")
        tokens = int(state.positions[0])
        record = _Record(tokens, _kind(history), len(history), history_hash(history), state=state)
        written = None
        if self.storage is not None:  # the bytes now: the state is mutated by the next turn
            blob = snapshot(self.model, state)
            written = self._writer.submit(self._write_storage, session_id, record, blob)
        with self._lock:
            self._busy.discard(session_id)
            self._records.pop(session_id, None)
            self._records[session_id] = record
            self._evict()
        return written

    def flush(self) -> None:
        """Wait for every storage write submitted so far."""
        self._writer.submit(lambda: None).result()

    def put_back(self, session_id: str, resumed: Resumed) -> None:
        """A request refused before it read anything: the session is as it was."""
        with self._lock:
            self._busy.discard(session_id)
            if resumed.state is not None:
                record = resumed._record
                record.state = resumed.state
                self._records.pop(session_id, None)
                self._records[session_id] = record
                self._evict()

    def release(self, session_id: str) -> None:
        """A request that failed: the session's state is dropped (its storage copy, if any, is
        the last completed turn's and stays)."""
        with self._lock:
            self._busy.discard(session_id)
            self._records.pop(session_id, None)

    # ---- tiers -----------------------------------------------------------------------------
    def _find(self, session_id: str) -> tuple[_Record | None, str]:
        record = self._records.get(session_id)
        if record is not None:
            self._records.move_to_end(session_id)
            newer = self._storage_tokens(session_id)
            if newer is None or newer <= record.tokens:
                return record, "device" if record.state is not None else "host"
            # another replica completed later turns of this session (the router is best effort)
        self.flush()  # this replica's own writes of the session first
        record = self._read_storage(session_id)
        if record is not None:
            self._records[session_id] = record
            self._records.move_to_end(session_id)
            return record, "storage"
        return None, "none"

    def _storage_tokens(self, session_id: str) -> int | None:
        if self.storage is None or not self.storage.join(f"{session_id}.json").exists():
            return None
        return json.loads(self.storage.join(f"{session_id}.json").read_bytes())["tokens"]

    def _evict(self) -> None:
        on_device = [sid for sid, r in self._records.items() if r.state is not None]
        for sid in on_device[: max(0, len(on_device) - self.max_on_device)]:
            record = self._records[sid]  # (in storage already, written at its save)
            record.blob, record.state = snapshot(self.model, record.state), None
        host = [sid for sid, r in self._records.items() if r.blob is not None]
        held = sum(len(self._records[sid].blob) for sid in host)
        for sid in host:  # least recently used first
            if held <= self.max_host_bytes:
                break
            held -= len(self._records[sid].blob)
            del self._records[sid]  # in storage already (if any): read back from there

    def _write_storage(self, session_id: str, record: _Record, blob: bytes) -> None:
        self.storage.join(f"{session_id}.safetensors").write_bytes(blob)
        meta = dict(
            tokens=record.tokens,
            kind=record.kind,
            size=record.size,
            digest=record.digest,
            snapshot_sha256=hashlib.sha256(blob).hexdigest(),
        )
        self.storage.join(f"{session_id}.json").write_bytes(json.dumps(meta).encode())

    def _read_storage(self, session_id: str) -> _Record | None:
        if self.storage is None or not self.storage.join(f"{session_id}.json").exists():
            return None
        meta = json.loads(self.storage.join(f"{session_id}.json").read_bytes())
        blob = self.storage.join(f"{session_id}.safetensors").read_bytes()
        if hashlib.sha256(blob).hexdigest() != meta["snapshot_sha256"]:
            return None  # a snapshot written after its record (a crash in between): not used
        return _Record(meta["tokens"], meta["kind"], meta["size"], meta["digest"], blob=blob)

    def stats(self) -> dict:
        with self._lock:
            device = sum(r.state is not None for r in self._records.values())
            host = [r.blob for r in self._records.values() if r.blob is not None]
            return dict(
                on_device=device,
                in_host=len(host),
                host_bytes=sum(map(len, host)),
                busy=len(self._busy),
            )


def _check_id(session_id: str) -> None:
    if not _SESSION_ID.match(session_id or ""):
        raise ValueError(f"session id {session_id!r}: use 1-128 letters, digits, '_', '-' or '.'")


__all__ = [
    "History",
    "Resumed",
    "SessionBusy",
    "SessionConflict",
    "SessionNotFound",
    "SessionStore",
    "history_hash",
]
