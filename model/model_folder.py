"""The model folder's on-disk format, owned here (Hugging Face layout):

    config.json                     {"format": "ttte2e-model", "format_version": 1} + TTTConfig.to_dict();
                                    written last (a folder with it is finished). The schema is
                                    docs/model_format.md (docs/model_config.schema.json): a reader
                                    needs only safetensors + torch and the key names there
    model.safetensors               the weights, or above a size
    model-0000i-of-0000N.safetensors + model.safetensors.index.json (weight_map)
    tokenizer.json                  optional: the tokenizer text generation uses

Training checkpoints hold one as model/ (platform/train/checkpoint.py), the registry logs or
references one (platform/registry/), pipelines/import_official.py writes one.

The writer takes tensors one at a time and writes a shard as soon as it is full, so a converter
streaming a large checkpoint holds at most one shard (plus the array being converted) in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
# Beside tokenizer.json so that transformers' AutoTokenizer loads the folder's tokenizer (RULER's
# tasks in lm-evaluation-harness size their prompts with it) without reading our config.json.
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 1024**3
FORMAT = "ttte2e-model"
# Raise on any change a reader must know about (a key renamed, a field's meaning changed); adding
# a config field with a default that keeps old behaviour does not need it.
FORMAT_VERSION = 1


class ShardWriter:
    def __init__(self, directory: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        if max_shard_bytes < 1:
            raise ValueError("max_shard_bytes must be >= 1")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        for old in list(self.directory.glob("model*.safetensors")) + [self.directory / INDEX]:
            old.unlink(missing_ok=True)  # a previous export must not leave stale shards behind
        self.max_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.pending or any(name in names for _, names in self.shards):
            raise ValueError(f"tensor {name!r} written twice")
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.detach().contiguous().cpu()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        temp = f"shard-{len(self.shards) + 1:05d}.tmp.safetensors"
        save_file(self.pending, str(self.directory / temp), metadata={"format": "pt"})
        self.shards.append((temp, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            os.replace(self.directory / self.shards[0][0], self.directory / WEIGHTS)
            return [WEIGHTS]
        weight_map, files = {}, []
        for i, (temp, names) in enumerate(self.shards, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.directory / temp, self.directory / final)
            weight_map.update({name: final for name in names})
            files.append(final)
        (self.directory / INDEX).write_text(
            json.dumps(
                {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, indent=1
            )
        )
        return files


# TTTConfig fields that say how this process runs the model, not what the model is: a folder
# written with compile=True must not compile wherever it is loaded
RUN_SETTINGS = ("compile",)


def write_model_folder(
    directory: str | Path,
    config_dict: dict,
    tensors: Iterable[tuple[str, torch.Tensor]],
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> list[str]:
    writer = ShardWriter(directory, max_shard_bytes)
    for name, tensor in tensors:
        writer.add(name, tensor)
    files = writer.close()
    # config last: a folder with a config.json is a finished export
    kept = {k: v for k, v in config_dict.items() if k not in RUN_SETTINGS}
    stamped = {"format": FORMAT, "format_version": FORMAT_VERSION, **kept}
    (Path(directory) / CONFIG_FILE).write_text(json.dumps(stamped, indent=2))
    return files


def write_tokenizer(directory: str | Path, tokenizer_json: bytes) -> None:
    """tokenizer.json (the `tokenizers` library's file) and the tokenizer_config.json that lets
    AutoTokenizer read it as a fast tokenizer."""
    directory = Path(directory)
    (directory / TOKENIZER_FILE).write_bytes(tokenizer_json)
    (directory / TOKENIZER_CONFIG_FILE).write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}, indent=2)
    )


def read_config(directory: str | Path) -> dict:
    """The config.json of a model folder (a FileNotFoundError naming the folder when absent)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a TTT-E2E model directory: no {CONFIG_FILE}")
    return config_fields(json.loads(path.read_text()), path)


def config_fields(data: dict, where: str | Path = CONFIG_FILE) -> dict:
    """The TTTConfig fields of a config.json, its format stamp checked and removed (folders
    written before the stamp existed have the same layout: version 1)."""
    data = dict(data)
    name = data.pop("format", FORMAT)
    version = data.pop("format_version", 1)
    if name != FORMAT:
        raise ValueError(f"{where}: format {name!r} is not a TTT-E2E model folder ({FORMAT!r})")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(
            f"{where}: format_version {version!r}; this ttte2e reads versions 1 to "
            f"{FORMAT_VERSION} (a newer one wrote it: upgrade ttte2e)"
        )
    return data


def read_model_state(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a model folder (single file or sharded)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if (directory / INDEX).is_file():
        weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if not (directory / shard).is_file():
                raise FileNotFoundError(f"{directory}: shard {shard} named in {INDEX} is missing")
            part = load_file(str(directory / shard))
            wrong = [k for k in part if weight_map.get(k) != shard]
            if wrong:
                raise ValueError(
                    f"{directory}/{shard} holds tensors the index does not map to it: {wrong[:5]}"
                )
            state.update(part)
        absent = sorted(set(weight_map) - set(state))
        if absent:
            raise ValueError(f"{directory}: tensors in {INDEX} but in no shard: {absent[:5]}")
        return state
    if (directory / WEIGHTS).is_file():
        return load_file(str(directory / WEIGHTS))
    raise FileNotFoundError(
        f"{directory} is not a TTT-E2E model directory: no {WEIGHTS} or {INDEX}"
    )
