"""The training checkpoint format: what a checkpoint folder holds, when it is complete, which one
a run resumes from, and whether a new invocation may resume it.

A checkpoint folder (`<storage>/<run name>/checkpoint_<step>`) holds ds/ (DeepSpeed: parameters,
optimizer partitions, lr schedule), model/ (config.json + safetensors + tokenizer.json),
trainer_state.json (step, data position, metric history, configs, geometry) and rng/rank<r>.pt;
`write` makes a rank's part of it and `restore` reads it back. Every rank uploads its own files
(under Ray Train through its report; in one process the trainer copies the folder); after all of
them are stored, rank 0 writes COMPLETE.json last: every file with its size, and a sha256 for
the files of model/. A folder without it (a crash mid-save) or whose files differ from it (cut
short, damaged) is incomplete: every reader refuses it, naming what is wrong, and the choice of
the checkpoint to resume skips it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ttte2e.model.model_folder import CONFIG_FILE, write_model_folder, write_tokenizer
from ttte2e.platform.data.storage import Location, resolve

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
COMPLETE_FILE = "COMPLETE.json"
DS_TAG = "ds"
MODEL_DIR = "model"
RNG_DIR = "rng"
PREFIX = "checkpoint_"


class CheckpointError(ValueError):
    """A checkpoint is incomplete, damaged, or does not belong to this run."""


def dir_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


# ---- writing and reading one checkpoint (every rank its part) ----------------------------------
def _rng_state() -> dict:
    return dict(
        torch=torch.get_rng_state(),
        numpy=np.random.get_state(),
        python=random.getstate(),
        cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    )


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write(
    folder: Path,
    engine,
    rank: int,
    state: dict | None,
    model_config: dict,
    weights: dict | None,
    tokenizer: bytes | None,
) -> dict[str, dict]:
    """This rank's part of a checkpoint into a local folder: its DeepSpeed partition (ds/) and
    random state (rng/rank<r>.pt); rank 0 (state, weights given) also model/ (the whole weights,
    config, the dataset's tokenizer) and trainer_state.json. Returns file_list of the folder."""
    engine.save_checkpoint(str(folder), tag=DS_TAG)
    (folder / RNG_DIR).mkdir(exist_ok=True)
    torch.save(_rng_state(), folder / RNG_DIR / f"rank{rank}.pt")
    if state is not None:
        write_model_folder(folder / MODEL_DIR, model_config, weights.items())
        if tokenizer is not None:
            write_tokenizer(folder / MODEL_DIR, tokenizer)
        (folder / STATE_FILE).write_text(json.dumps(state, indent=1))
    return file_list(folder)


def restore(folder: Path, engine, rank: int) -> dict:
    """Parameters, optimizer partitions, lr schedule and this rank's random state from a local
    copy of a checkpoint; returns its trainer state."""
    state = read_state(folder)
    engine.load_checkpoint(
        str(folder), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    rng = Path(folder) / RNG_DIR / f"rank{rank}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    return state


@contextmanager
def local_copy(loc: Location, parts: tuple[str, ...] = ()) -> Iterator[Path]:
    """A local folder with the checkpoint's files (the folder itself when local; a temporary
    download of it, or of only `parts`, from S3)."""
    if not loc.is_s3:
        yield Path(loc.path)
        return
    with tempfile.TemporaryDirectory(prefix="ttte2e-restore-") as tmp:
        for part in parts or ("",):
            src = loc.join(part) if part else loc
            src.download(Path(tmp) / part if part else Path(tmp))
        if parts and loc.join(STATE_FILE).exists():
            (Path(tmp) / STATE_FILE).write_bytes(loc.join(STATE_FILE).read_bytes())
        yield Path(tmp)


def file_list(folder: str | Path) -> dict[str, dict]:
    """{relative path: {bytes, sha256 for model/ files}} of a local folder about to be uploaded."""
    root = Path(folder)
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        entry = {"bytes": path.stat().st_size}
        if rel.startswith(MODEL_DIR + "/"):
            entry["sha256"] = _sha256_file(path)
        out[rel] = entry
    return out


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_complete(checkpoint: Location, files: dict[str, dict], step: int) -> None:
    """The marker, written after every rank's files are stored (the commit point)."""
    checkpoint.join(COMPLETE_FILE).write_bytes(
        json.dumps(dict(step=step, files=files), indent=1, sort_keys=True).encode()
    )


def problems(
    checkpoint: Location, parts: tuple[str, ...] = (), checksums: bool = True
) -> list[str]:
    """What makes this checkpoint incomplete (empty: complete). parts limits the check to files
    under those folders (e.g. ("model",) for readers of the weights only); sizes come from one
    listing, checksums are recomputed for model/ files."""
    marker = checkpoint.join(COMPLETE_FILE)
    if not marker.exists():
        return [f"no {COMPLETE_FILE} (the save did not finish: a crash mid-checkpoint)"]
    try:
        files = json.loads(marker.read_bytes())["files"]
    except (ValueError, KeyError):
        return [f"{COMPLETE_FILE} is damaged"]
    present = {f.uri[len(checkpoint.uri) + 1 :]: f for f in checkpoint.list_files()}
    out = []
    for rel, entry in files.items():
        if parts and not rel.startswith(tuple(p.rstrip("/") + "/" for p in parts)):
            continue
        loc = present.get(rel)
        if loc is None:
            out.append(f"{rel} missing")
            continue
        size = loc.size()
        if size != entry["bytes"]:
            out.append(f"{rel} has {size} bytes, {entry['bytes']} were written")
        elif (
            checksums
            and "sha256" in entry
            and hashlib.sha256(loc.read_bytes()).hexdigest() != entry["sha256"]
        ):
            out.append(f"{rel} does not match its sha256")
    return out


def verify(uri: str, parts: tuple[str, ...] = ()) -> Location:
    """The checkpoint at uri, refused with CheckpointError when it is not complete."""
    loc = resolve(uri)
    if not loc.join(STATE_FILE).exists():
        raise CheckpointError(f"{uri} is not a training checkpoint (no {STATE_FILE})")
    found = problems(loc, parts)
    if found:
        raise CheckpointError(
            f"{uri} is an incomplete checkpoint: "
            + "; ".join(found[:5])
            + (f" (and {len(found) - 5} more)" if len(found) > 5 else "")
        )
    return loc


def model_folder(uri: str) -> Location:
    """The model folder of `uri`: a training checkpoint's model/ (the checkpoint, or its model/
    itself, must be complete with model/ intact) or a plain model folder (config.json +
    safetensors). CheckpointError when it is neither or the checkpoint is damaged."""
    loc = resolve(uri)
    owner = loc if loc.join(STATE_FILE).exists() else None
    if owner is None and loc.path.rstrip("/").endswith("/" + MODEL_DIR):
        parent = resolve(loc.uri.rstrip("/").rsplit("/", 1)[0])
        owner = parent if parent.join(STATE_FILE).exists() else None
    if owner is not None:
        verify(owner.uri, parts=(MODEL_DIR,))
    if loc.join(MODEL_DIR, CONFIG_FILE).exists():
        return loc.join(MODEL_DIR)
    if loc.join(CONFIG_FILE).exists():
        return loc
    if not loc.exists():
        raise CheckpointError(f"{uri} does not exist")
    raise CheckpointError(
        f"{uri}: neither a model folder ({CONFIG_FILE} + safetensors) nor a "
        f"training checkpoint ({MODEL_DIR}/{CONFIG_FILE})"
    )


def local_model_folder(directory: str | Path) -> Path:
    """model_folder for a local copy of a checkpoint or model folder (no checks)."""
    directory = Path(directory)
    inner = directory / MODEL_DIR
    return inner if (inner / CONFIG_FILE).is_file() else directory


def read_state(uri: str | Path) -> dict:
    loc = resolve(str(uri))
    state = loc.join(STATE_FILE)
    if not state.exists():
        raise CheckpointError(f"{uri} is not a training checkpoint: no {STATE_FILE}")
    return json.loads(state.read_bytes())


def checkpoint_names(run_dir: Location) -> list[str]:
    """The checkpoint folders of a run folder, newest first (complete or not)."""
    if not run_dir.exists():
        return []
    # checkpoint folders only (Ray Train keeps its own checkpoint_manager_snapshot.json beside)
    tops = {f.uri[len(run_dir.uri) + 1 :].split("/", 1)[0] for f in run_dir.list_files()}
    return sorted((n for n in tops if re.fullmatch(rf"{PREFIX}\d+", n)), reverse=True)


def latest_complete(run_dir: Location, checksums: bool = True) -> Location | None:
    """The newest complete checkpoint of a run folder; incomplete newer ones are skipped, each
    named in the log. checksums=False: sizes only (workers after the driver checked)."""
    for name in checkpoint_names(run_dir):
        loc = run_dir.join(name)
        found = problems(loc, checksums=checksums)
        if not found:
            return loc
        log.info(f"[checkpoint] skipping {loc.uri}: {'; '.join(found[:3])}")
    return None


def resume_source(
    storage: str, name: str, resume_from: str = "", checksums: bool = True
) -> str | None:
    """The checkpoint an invocation continues: the newest complete one of the run (same name
    under storage), else resume_from (which must be complete), else None (a fresh run). The
    driver checks sizes and model/ checksums; workers (checksums=False) sizes only."""
    latest = latest_complete(resolve(storage).join(name), checksums)
    if latest is not None:
        return latest.uri
    if resume_from:
        if checksums:
            verify(resume_from)
        return resume_from
    return None


# ---- which runs may continue from a checkpoint ----------------------------------------------------
# Fields whose change makes the recorded data position, schedule or optimizer state mean something
# else: resuming with any of them different would skip or repeat tokens or re-bend the schedule.
RESUME_FIELDS = (
    "data_key",
    "seq_len",
    "batch_tokens",
    "sequences",
    "workers",
    "seed",
    "steps",
    "lr",
    "min_lr",
    "warmup_fraction",
    "eta_ramp",
    "zero_stage",
    "tensor_parallel",
)
# what an identity recorded before a field existed meant
_IDENTITY_DEFAULTS = dict(tensor_parallel=1)


def run_identity(train: dict, geometry: dict, data_key: str) -> dict:
    """What a resumed run must share with its checkpoint (recorded in trainer_state.json)."""
    return dict(
        data_key=data_key,
        seq_len=geometry["seq_len"],
        batch_tokens=train["batch_tokens"],
        sequences=geometry["sequences"],
        workers=train["workers"],
        seed=train["seed"],
        steps=geometry["steps"],
        lr=train["lr"],
        min_lr=train["min_lr"],
        warmup_fraction=train["warmup_fraction"],
        eta_ramp=train["eta_ramp"],
        zero_stage=train["zero_stage"],
        tensor_parallel=train.get("tensor_parallel", 1),
    )


def resume_differences(saved: dict, now: dict, extend_steps: bool = False) -> dict:
    """{field: (checkpoint, this run)} of the identity fields that differ; with extend_steps a
    larger step count is allowed (the cosine schedule is re-stretched over the new total from the
    checkpoint's step on: a documented, explicit choice)."""
    saved = {**_IDENTITY_DEFAULTS, **saved}
    diff = {k: (saved.get(k), now.get(k)) for k in RESUME_FIELDS if saved.get(k) != now.get(k)}
    if extend_steps and "steps" in diff and (now["steps"] or 0) > (saved.get("steps") or 0):
        diff.pop("steps")
    return diff
