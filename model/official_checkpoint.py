"""Read checkpoints written by the official TTT-E2E code (orbax: per-item OCDBT key-value stores
holding zarr arrays) without JAX. tensorstore reads the stores (local, s3://, gs://); names are
the official parameter keys; tests/data/official_ckpt_tiny_a is an example the official saver wrote.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import numpy as np

if TYPE_CHECKING:
    from .config import TTTConfig


class OfficialCheckpointError(ValueError):
    """An official checkpoint is missing, incomplete or not what was expected; says which part."""


def kvstore_spec(uri: str) -> dict:
    """tensorstore kvstore spec for a folder: local path, file://, s3://bucket/key, gs://bucket/key.
    S3 endpoint/credentials from TTTE2E_S3_ENDPOINT / AWS_ENDPOINT_URL and AWS_* (as storage.py)."""
    uri = uri.rstrip("/")
    if uri.startswith(("s3://", "gs://")):
        parsed = urlparse(uri)
        spec = {
            "driver": "s3" if uri.startswith("s3://") else "gcs",
            "bucket": parsed.netloc,
            "path": parsed.path.lstrip("/") + "/",
        }
        if spec["driver"] == "s3":
            endpoint = os.environ.get("TTTE2E_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
            if endpoint:
                spec["endpoint"] = endpoint
            spec["aws_region"] = (
                os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
            )
        elif os.environ.get("TTTE2E_GCS_USER_PROJECT"):  # Requester Pays buckets
            spec["user_project"] = os.environ["TTTE2E_GCS_USER_PROJECT"]
        return spec
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return {"driver": "file", "path": os.path.abspath(path) + "/"}


def _read(kv_spec: dict, key: str) -> bytes | None:
    import tensorstore as ts

    store = ts.KvStore.open(kv_spec).result()
    result = store.read(key).result()
    return bytes(result.value) if result.state == "value" else None


def _list(kv_spec: dict) -> list[str]:
    import tensorstore as ts

    store = ts.KvStore.open(kv_spec).result()
    return [k.decode() if isinstance(k, bytes) else k for k in store.list().result()]


def checkpoint_steps(root: str) -> list[int]:
    """Finished steps under a checkpoint manager root (folders named by a plain decimal step)."""
    spec = kvstore_spec(root)
    steps = set()
    for key in _list(spec):
        head = key.split("/", 1)[0]
        if head.isdigit() and "/" in key:
            steps.add(int(head))
    return sorted(steps)


def resolve_step(path: str, step: int | None) -> int:
    """The given step (checked to exist) or the latest one."""
    steps = checkpoint_steps(path)
    if not steps:
        raise OfficialCheckpointError(
            f"{path}: no checkpoint step folders (expected folders "
            "named by step number, e.g. 4799/)"
        )
    if step is None:
        return steps[-1]
    if step not in steps:
        raise OfficialCheckpointError(f"{path}: no step {step}; steps present: {steps}")
    return step


def _item_spec(root: str, step: int, item: str) -> dict:
    spec = kvstore_spec(root)
    return {**spec, "path": f"{spec['path']}{step}/{item}/"}


def official_array_names(root: str, step: int, item: str = "model_weights") -> dict[str, list]:
    """{array name: expected shape} from the item's orbax _METADATA (None leaves skipped)."""
    raw = _read(_item_spec(root, step, item), "_METADATA")
    if raw is None:
        raise OfficialCheckpointError(
            f"{root}/{step}/{item}: no _METADATA (not an orbax item, or an unfinished write)"
        )
    meta = json.loads(raw)
    names = {}
    for entry in meta["tree_metadata"].values():
        value = entry["value_metadata"]
        if value.get("value_type") == "None" or value.get("skip_deserialize"):
            continue
        name = ".".join(str(k["key"]) for k in entry["key_metadata"])
        names[name] = value.get("write_shape")
    return names


def iter_official_checkpoint(
    path: str, step: int | None = None, item: str = "model_weights"
) -> Iterator[tuple[str, np.ndarray]]:
    """(official name, array) one array at a time: at most one array in memory."""
    import tensorstore as ts

    step = resolve_step(path, step)
    meta = json.loads(_read(_item_spec(path, step, item), "_METADATA") or b"{}")
    driver = "zarr3" if meta.get("use_zarr3") else "zarr"
    base = _item_spec(path, step, item)
    for name, shape in official_array_names(path, step, item).items():
        spec = {"driver": driver, "kvstore": {"driver": "ocdbt", "base": base, "path": name}}
        try:
            array = ts.open(spec, open=True, read=True).result().read().result()
        except Exception as e:  # noqa: BLE001 - tensorstore raises ValueError/RuntimeError kinds
            raise OfficialCheckpointError(
                f"{path}/{step}/{item}: array {name!r} cannot be read "
                f"({type(e).__name__}: {str(e)[:300]})"
            ) from None
        if shape is not None and list(array.shape) != list(shape):
            raise OfficialCheckpointError(
                f"{path}/{step}/{item}: array {name!r} has shape "
                f"{list(array.shape)}, metadata says {shape}"
            )
        yield name, np.asarray(array)


def read_official_checkpoint(path: str, step: int | None = None) -> dict[str, np.ndarray]:
    """The parameters of an official checkpoint by official name (latest step when none)."""
    return dict(iter_official_checkpoint(path, step))


# Fields the parameter shapes do not determine: the paper's values (Llama-3 tokenizer, T = k = 8K,
# b = 1K, eta 1); override them for other checkpoints.
PAPER_FIELDS = dict(
    vocab_size=128256,
    seq_len=8192,
    window=8192,
    chunk_size=1024,
    rope_theta=500000.0,
    inner_lr=1.0,
    bos_token_id=128000,
)


def official_config(
    path: str, preset_name: str = "auto", step: int | None = None, **overrides
) -> tuple[TTTConfig, int]:
    """(config, step) for an official checkpoint: a named preset (checked against every stored
    shape) or 'auto' (architecture inferred from the shapes, other fields PAPER_FIELDS)."""
    from .config import PRESETS, TTTConfig, preset
    from .convert import config_from_shapes, official_shapes

    step = resolve_step(path, step)
    stored = {k: tuple(v) for k, v in official_array_names(path, step).items()}
    if "language_model.lm_head.weight" in stored:
        raise OfficialCheckpointError(f"{path}: untied output head (lm_head) is not supported")
    if preset_name.lower() == "auto":
        try:
            config = config_from_shapes(stored, **{**PAPER_FIELDS, **overrides})
        except (ValueError, TypeError) as e:
            raise OfficialCheckpointError(f"{path}/{step}: {e}") from None
    else:
        names = {k.lower(): k for k in PRESETS}
        if preset_name.lower() not in names:
            raise OfficialCheckpointError(
                f"unknown preset {preset_name!r}; choose auto or one of {sorted(PRESETS)}"
            )
        config = preset(names[preset_name.lower()], **overrides)
    expected = official_shapes(config)
    problems = [f"missing {k}" for k in expected if k not in stored]
    problems += [f"unexpected {k}" for k in stored if k not in expected]
    problems += [
        f"{k}: stored {list(stored[k])}, preset {preset_name} needs {list(v)}"
        for k, v in expected.items()
        if k in stored and stored[k] != tuple(v)
    ]
    if problems:
        raise OfficialCheckpointError(
            f"{path}/{step} does not match preset {preset_name}: "
            + "; ".join(problems[:8])
            + (f" (+{len(problems) - 8} more)" if len(problems) > 8 else "")
        )
    assert isinstance(config, TTTConfig)
    return config, step


def import_official_checkpoint(
    path: str,
    out_dir: str,
    preset_name: str = "auto",
    step: int | None = None,
    max_shard_bytes: int | None = None,
    **overrides,
) -> tuple[TTTConfig, list[str]]:
    """Official checkpoint -> our model folder (config.json + safetensors), array by array."""
    from .convert import convert_official_array
    from .model_folder import DEFAULT_SHARD_BYTES, write_model_folder

    config, step = official_config(path, preset_name, step, **overrides)
    tensors = (
        (ours, tensor)
        for name, array in iter_official_checkpoint(path, step)
        for ours, tensor in convert_official_array(
            name, array, config.n_layers, config.n_ttt_blocks
        ).items()
    )
    files = write_model_folder(
        out_dir, config.to_dict(), tensors, max_shard_bytes or DEFAULT_SHARD_BYTES
    )
    return config, files
