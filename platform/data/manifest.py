"""The prepared dataset's on-disk format (format 2), owned here: what a dataset folder holds, the
manifest that commits it, the shard schema and the checksums that make reads verifiable.

    <dataset>/manifest.json       written last: the commit point (a folder without it is no dataset)
    <dataset>/tokenizer.json      the tokenizer the shards were made with (hash in the manifest)
    <dataset>/{train,val}/...     parquet shards, row groups of exactly row_group_tokens tokens

Each shard's footer key `ttte2e.row_groups` lists a sha256 (128 bits) of each row group's tokens;
the manifest records the sha256 of that list, the file's bytes and its sha256. Writing is
platform/data/prepare.py's, reading platform/data/stream.py's; both go through this file.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq

from ttte2e.platform.data.storage import Location, resolve

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 2
SHARD_SCHEMA = pa.schema(
    [
        ("tokens", pa.list_(pa.int32())),
        ("num_tokens", pa.int32()),
        ("source", pa.string()),
        ("piece", pa.int32()),
    ]
)
ROW_GROUPS_KEY = b"ttte2e.row_groups"
SHARD_FIELDS = (
    "path",
    "split",
    "documents",
    "rows",
    "tokens",
    "row_groups",
    "row_group_tokens",
    "bytes",
    "sha256",
    "row_groups_sha256",
    "input",
)
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")


class DataError(ValueError):
    """Bad input data; the message names the file and, where it applies, the line or row."""


def read_manifest(uri: str) -> dict:
    """The manifest of a finished dataset; a folder without one is refused."""
    out = resolve(uri)
    loc = out.join(MANIFEST)
    if not loc.exists():
        raise DataError(
            f"{uri} is not a finished dataset: no {MANIFEST} (a run that did not "
            "complete, or not a dataset folder)"
        )
    try:
        manifest = json.loads(loc.read_bytes())
    except json.JSONDecodeError as e:
        raise DataError(f"{loc.uri} is damaged: not valid JSON ({e.msg})") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(
            f"{uri} is a format-{version} dataset; this version reads format "
            f"{FORMAT_VERSION} (row-group shards with checksums): re-run "
            "pipelines/prepare_data.py on the same input with --overwrite"
        )
    return manifest


def write_manifest(out: Location, manifest: dict) -> None:
    """Commit a dataset: the manifest is written after every shard and the tokenizer."""
    out.join(MANIFEST).write_bytes(json.dumps(manifest, indent=1).encode())


# ---- integrity ---------------------------------------------------------------------------------
def row_group_digest(tokens) -> str:
    """sha256 (128 bits) of a row group's tokens as little-endian int32."""
    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(tokens, dtype="<i4").tobytes()).hexdigest()[:32]


def list_digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def shard_size_problems(uri: str, manifest: dict, splits=SPLITS) -> list[str]:
    """Shards of `splits` that are missing or whose size differs from the manifest, from one
    listing of the dataset folder (cheap on S3): one line per damaged shard."""
    root = resolve(uri)
    sizes = {f.uri[len(root.uri) + 1 :]: f.size() for f in root.list_files()}
    problems = []
    for shard in manifest["shards"]:
        if shard["split"] not in splits:
            continue
        where = root.join(shard["path"]).uri
        if shard["path"] not in sizes:
            problems.append(f"{where}: missing")
        elif sizes[shard["path"]] != shard["bytes"]:
            problems.append(
                f"{where}: {sizes[shard['path']]} bytes, the manifest says "
                f"{shard['bytes']} (truncated or replaced)"
            )
    return problems


def check_shard_sizes(uri: str, manifest: dict, splits=SPLITS) -> None:
    problems = shard_size_problems(uri, manifest, splits)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise DataError(
            f"{uri}: {len(problems)} damaged shard(s): " + "; ".join(problems[:5]) + more
        )


def row_group_digests(parquet_file, shard: dict, where: str) -> list[str]:
    """The footer's per-row-group digests, checked against the manifest's hash of the list."""
    meta = (parquet_file.schema_arrow.metadata or {}).get(ROW_GROUPS_KEY)
    if meta is None or list_digest(meta) != shard["row_groups_sha256"]:
        raise DataError(
            f"{where}: its row-group checksums do not match the manifest "
            "(damaged or replaced shard)"
        )
    digests = json.loads(meta)["sha256"]
    if len(digests) != shard["row_groups"] or parquet_file.num_row_groups != shard["row_groups"]:
        raise DataError(
            f"{where}: {parquet_file.num_row_groups} row groups, the manifest says "
            f"{shard['row_groups']} (damaged or replaced shard)"
        )
    return digests


def verify_dataset(uri: str) -> list[str]:
    """Every shard's size and sha256 and its footer's checksum list, and the tokenizer file,
    against the manifest. Returns the problems (empty: the dataset is intact)."""
    manifest = read_manifest(uri)
    root = resolve(uri)
    problems = shard_size_problems(uri, manifest)
    damaged = {p.split(": ", 1)[0] for p in problems}
    for shard in manifest["shards"]:
        loc = root.join(shard["path"])
        if loc.uri in damaged:
            continue
        try:
            data = loc.read_bytes()
            if hashlib.sha256(data).hexdigest() != shard["sha256"]:
                problems.append(
                    f"{loc.uri}: sha256 differs from the manifest (content replaced or damaged)"
                )
                continue
            row_group_digests(pq.ParquetFile(io.BytesIO(data)), shard, loc.uri)
        except (OSError, pa.ArrowException, DataError) as e:
            problems.append(f"{loc.uri}: {e}")
    tok = root.join(manifest["tokenizer"]["file"])
    if not tok.exists():
        problems.append(f"{tok.uri}: missing")
    elif hashlib.sha256(tok.read_bytes()).hexdigest() != manifest["tokenizer"]["sha256"]:
        problems.append(f"{tok.uri}: sha256 differs from the manifest")
    log.info(
        f"{uri}: {len(manifest['shards'])} shard(s), "
        f"{sum(s['bytes'] for s in manifest['shards']):,} bytes checked: "
        + ("intact" if not problems else f"{len(problems)} problem(s)")
    )
    for line in problems:
        log.info(f"  DAMAGED {line}")
    return problems
