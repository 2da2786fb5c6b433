"""A decode state as bytes and back: what a server keeps of an idle conversation (host memory, a
file, an object store) so that it continues exactly where it stopped.

    blob = snapshot(model, state)          # safetensors bytes: every tensor + a small header
    state = restore(model, blob)           # the same DecodeState, on the model's device

The header names the format version, the decode mode, the batch rows, each block's buffer kind
(ring of k slots, or the full-attention baseline's growing buffer) and a fingerprint of the
model's architecture and TTT settings; `restore` refuses a blob of another version or model with
an error naming the difference. The fast weights are stored whole (a fresh state's theta_0 is a
view of the model's parameters: it is copied), so a snapshot of mode 'ttt' has the same size
after any number of tokens: the model's, not the conversation's.
"""

from __future__ import annotations

import hashlib
import json

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from .decode import DecodeState, KVBuffer
from .inner_loop import Carry

SNAPSHOT_VERSION = 1
# what decoding depends on besides the weights (architecture, positions, the TTT inner loop)
_FINGERPRINT_FIELDS = (
    "vocab_size",
    "d_model",
    "n_layers",
    "n_heads",
    "mlp_hidden",
    "n_ttt_blocks",
    "window",
    "chunk_size",
    "rope_theta",
    "inner_lr",
)
_STATE_TENSORS = (
    "positions",
    "pending_inputs",
    "pending_tokens",
    "pending_count",
    "chunks_done",
    "last_logits",
)


def model_fingerprint(model) -> str:
    """A short hash of the config fields a decode state depends on."""
    cfg = model.config
    fields = {name: getattr(cfg, name, None) for name in _FINGERPRINT_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def snapshot(model, state: DecodeState) -> bytes:
    """The state as safetensors bytes (tensors moved to the CPU, made contiguous)."""
    tensors = {name: getattr(state, name) for name in _STATE_TENSORS}
    for i, buf in enumerate(state.kv):
        tensors.update({f"kv.{i}.keys": buf.keys, f"kv.{i}.values": buf.values})
        tensors[f"kv.{i}.positions"] = buf.positions
    for i, t in enumerate(state.chunk.fast):
        tensors[f"fast.{i}"] = t
    for i, t in enumerate(state.chunk.caches):
        tensors[f"cache.{i}"] = t
    header = dict(
        version=str(SNAPSHOT_VERSION),
        mode=state.mode,
        rows=str(state.positions.shape[0]),
        windows=json.dumps([buf.window for buf in state.kv]),
        fingerprint=model_fingerprint(model),
    )
    cpu = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    return save_tensors(cpu, metadata=header)


def _header(blob: bytes) -> dict:
    """The safetensors metadata of a blob (its first 8 bytes give the JSON header's length)."""
    if len(blob) < 8:
        raise ValueError("not a decode snapshot: fewer than 8 bytes")
    size = int.from_bytes(blob[:8], "little")
    try:
        return json.loads(blob[8 : 8 + size]).get("__metadata__", {})
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"not a decode snapshot: unreadable header ({e})") from None


def restore(model, blob: bytes, device: torch.device | str | None = None) -> DecodeState:
    """The DecodeState a snapshot holds, on `device` (default: the model's)."""
    header = _header(blob)
    if header.get("version") != str(SNAPSHOT_VERSION):
        raise ValueError(
            f"decode snapshot version {header.get('version')!r}: this code reads version "
            f"{SNAPSHOT_VERSION}"
        )
    if header.get("fingerprint") != model_fingerprint(model):
        raise ValueError(
            "decode snapshot of another model (architecture or TTT settings differ: "
            f"fingerprint {header.get('fingerprint')} vs this model's {model_fingerprint(model)})"
        )
    device = torch.device(device) if device is not None else next(model.parameters()).device
    tensors = {name: t.to(device) for name, t in load_tensors(blob).items()}
    windows = json.loads(header["windows"])
    n_ttt = len(model.ttt_blocks)
    carry = Carry(
        [tensors[f"fast.{i}"] for i in range(3 * n_ttt)],
        [tensors[f"cache.{i}"] for i in range(2 * n_ttt)],
    )
    kv = [
        KVBuffer(
            tensors[f"kv.{i}.keys"], tensors[f"kv.{i}.values"], tensors[f"kv.{i}.positions"], w
        )
        for i, w in enumerate(windows)
    ]
    return DecodeState(
        header["mode"], tensors["positions"], kv, carry, *(tensors[n] for n in _STATE_TENSORS[1:])
    )


__all__ = ["SNAPSHOT_VERSION", "model_fingerprint", "restore", "snapshot"]
