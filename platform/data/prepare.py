"""Raw text -> tokenized parquet shards + manifest (the data issue's `prepare_data`).

Inputs: a file or a folder (recursive) of .jsonl / .jsonl.gz / .jsonl.zst (one JSON object per
line, text in a configurable field), .parquet (text column) and .txt / .txt.gz / .txt.zst (one
document per file, e.g. books); local paths or s3:// URIs.

Each input file is one Ray Data task: it streams its documents (bounded memory), tokenizes them
with HF `tokenizers`, puts BOS before each document, splits train/held-out by a hash of the
document's identity, and writes shards of about `shard_tokens` tokens (whole documents).

Shard layout (format 2), made for random access to training windows: the shard's token stream
(its documents in order, BOS before each) is cut into parquet row groups of exactly
`row_group_tokens` tokens (the last one shorter), so a reader decodes only the row groups a
window spans. A row is the piece of one document inside one row group: `tokens` (list<int32>),
`num_tokens`, `source` (file#line or file#row), `piece` (0 = the document's start, with its BOS).
Integrity: the footer's key-value metadata `ttte2e.row_groups` lists a sha256 (128 bits) of each
row group's tokens; the manifest records the sha256 of that list, the file's bytes and sha256.

Atomic commit: shards are written first, `manifest.json` last. A folder without a manifest is not
a dataset (readers refuse it); a later run cleans such leftovers. The manifest lists every shard
with rows, tokens, bytes and sha256, the tokenizer's identity and hash, BOS/EOS ids, the options,
and the counts of everything skipped by policy.

Policy for bad input: unreadable/corrupt/truncated files, invalid JSON, a missing or non-string
text field: a DataError naming the file and line/row (the job stops; nothing is dropped
silently). Invalid UTF-8: replaced (U+FFFD) and counted. Documents with no tokens and documents
under `min_tokens`: skipped and counted.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

from ttte2e.platform.cluster.ray_runtime import forwarded_env
from ttte2e.platform.data.manifest import (
    FORMAT_VERSION,
    MANIFEST,
    ROW_GROUPS_KEY,
    SHARD_FIELDS,
    SHARD_SCHEMA,
    TOKENIZER_FILE,
    DataError,
    list_digest,
    read_manifest,
    row_group_digest,
    verify_dataset,
    write_manifest,
)
from ttte2e.platform.data.storage import Location, resolve

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".txt", ".txt.gz", ".txt.zst")
TEXT_SUFFIXES = (".txt", ".txt.gz", ".txt.zst")
_BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "[BOS]")
_EOS_CANDIDATES = ("<|end_of_text|>", "</s>", "<eos>", "[EOS]")


@dataclass
class PrepareOptions:
    """Options of prepare_data (recorded in the manifest)."""

    input: str
    """Input file or folder: local path or s3:// URI."""
    output: str
    """Output folder (local or s3://) for shards + manifest."""
    tokenizer: str
    """tokenizer.json path or s3:// URI, or 'train:<vocab>' to train a byte-level BPE on the input."""
    text_field: str = "text"
    """Field holding the text in jsonl objects / parquet columns."""
    min_tokens: int = 0
    """Drop documents with fewer tokens than this (the paper drops DCLM documents under 8192)."""
    val_fraction: float = 0.0
    """Fraction of documents held out (by a hash of their identity) into the 'val' split."""
    shard_tokens: int = 16_000_000
    """Tokens per output shard (a shard closes at the first document end past this)."""
    row_group_tokens: int = 2048
    """Tokens per parquet row group: the unit a training reader decodes. A window of T+1 tokens
    reads about (T + row_group_tokens) tokens; smaller groups mean larger footers."""
    bos_token: str = ""
    """BOS token string; empty = detect (<|begin_of_text|>, <s>, <bos>)."""
    append_eos: bool = False
    """Also append EOS after every document (the official pipeline does not)."""
    overwrite: bool = False
    """Replace an output that already holds a different dataset."""
    train_tokenizer_max_bytes: int = 200_000_000
    """With 'train:<vocab>', train on at most this much text."""
    input_format: Literal["text", "official-zarr"] = "text"
    """'text': files of documents (above); 'official-zarr': the official code's token store (a
    zarr group with 1-D `train` and `val` arrays of ids, BOS before every document), converted
    without re-tokenizing; --tokenizer names the tokenizer it was made with."""


@dataclass
class FileStats:
    documents_read: int = 0
    documents_written: int = 0
    tokens_written: int = 0
    empty_documents: int = 0
    short_documents: int = 0
    short_documents_tokens: int = 0
    non_utf8_documents: int = 0

    def add(self, other: FileStats) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


# ---- reading ---------------------------------------------------------------------------------
def _decode(raw: bytes) -> tuple[str, bool]:
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def _compressed_stream(loc: Location):
    stream = loc.open_input()
    if loc.path.endswith(".gz"):
        return pa.CompressedInputStream(stream, "gzip")
    if loc.path.endswith(".zst"):
        return pa.CompressedInputStream(stream, "zstd")
    return stream


def _iter_lines(loc: Location) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line) of a (compressed) text file, streaming in 1 MiB reads."""
    codec = "gzip" if loc.path.endswith(".gz") else "zstd" if loc.path.endswith(".zst") else None
    number, pending = 0, b""
    with _compressed_stream(loc) as stream:
        while True:
            try:
                chunk = stream.read(1 << 20)
            except (OSError, pa.ArrowException) as e:
                what = f"corrupt or truncated {codec} stream" if codec else "read error"
                raise DataError(f"{loc.uri}: {what} after line {number}: {e}") from e
            if not chunk:
                break
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            for line in lines:
                number += 1
                yield number, line
    if pending:
        yield number + 1, pending


def iter_documents(loc: Location, text_field: str) -> Iterator[tuple[str, str, bool]]:
    """(source id, text, had invalid UTF-8) for every document of one input file."""
    name = loc.path
    if name.endswith(TEXT_SUFFIXES):
        try:
            with _compressed_stream(loc) as stream:
                raw = stream.read()
        except (OSError, pa.ArrowException) as e:
            raise DataError(
                f"{loc.uri}: corrupt or truncated "
                f"{'gzip' if name.endswith('.gz') else 'zstd'} stream: {e}"
            ) from e
        text, bad = _decode(raw)
        yield f"{loc.uri}", text, bad
    elif name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")):
        for number, raw in _iter_lines(loc):
            if not raw.strip():
                continue
            line, bad = _decode(raw)
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{loc.uri}: line {number}: invalid JSON ({e.msg})") from e
            if not isinstance(obj, dict) or text_field not in obj:
                keys = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
                raise DataError(
                    f"{loc.uri}: line {number}: no text field '{text_field}' (found: {keys})"
                )
            text = obj[text_field]
            if text is None:
                text = ""
            if not isinstance(text, str):
                raise DataError(
                    f"{loc.uri}: line {number}: field '{text_field}' is "
                    f"{type(text).__name__}, not a string"
                )
            yield f"{loc.uri}#L{number}", text, bad
    elif name.endswith(".parquet"):
        try:
            parquet = pq.ParquetFile(loc.open_random_access())
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{loc.uri}: not a readable parquet file: {e}") from e
        if text_field not in parquet.schema_arrow.names:
            raise DataError(
                f"{loc.uri}: no column '{text_field}' (columns: {parquet.schema_arrow.names})"
            )
        column_type = parquet.schema_arrow.field(text_field).type
        if not (
            pa.types.is_string(column_type)
            or pa.types.is_large_string(column_type)
            or pa.types.is_binary(column_type)
            or pa.types.is_large_binary(column_type)
        ):
            raise DataError(f"{loc.uri}: column '{text_field}' is {column_type}, not text")
        row = 0
        try:
            for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
                for value in batch.column(0).to_pylist():
                    row += 1
                    if value is None:
                        yield f"{loc.uri}#R{row}", "", False
                    elif isinstance(value, bytes):
                        text, bad = _decode(value)
                        yield f"{loc.uri}#R{row}", text, bad
                    else:
                        yield f"{loc.uri}#R{row}", value, False
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{loc.uri}: corrupt parquet data after row {row}: {e}") from e
    else:
        raise DataError(f"{loc.uri}: unsupported file type (supported: {', '.join(SUFFIXES)})")


def discover_inputs(uri: str) -> tuple[list[Location], list[str]]:
    """Input files (sorted) and the files skipped for an unsupported extension."""
    loc = resolve(uri)
    loc.ensure_bucket()
    if not loc.exists():
        raise FileNotFoundError(f"input {uri} does not exist")
    if not loc.is_dir():
        if not loc.path.endswith(SUFFIXES):
            raise DataError(f"{uri}: unsupported file type (supported: {', '.join(SUFFIXES)})")
        return [loc], []
    files = loc.list_files()
    chosen = [f for f in files if f.path.endswith(SUFFIXES)]
    skipped = [f.uri for f in files if not f.path.endswith(SUFFIXES)]
    if not chosen:
        raise DataError(
            f"input {uri} holds no supported files ({', '.join(SUFFIXES)}); "
            f"found {len(files)} other file(s)"
        )
    return chosen, skipped


# ---- tokenizer -------------------------------------------------------------------------------
@dataclass
class TokenizerInfo:
    json: str
    source: str
    sha256: str
    vocab_size: int
    bos_id: int
    eos_id: int | None
    bos_token: str
    trained: bool = False


def _special_id(tokenizer, candidates, explicit: str = "") -> tuple[int | None, str]:
    for token in [explicit] if explicit else list(candidates):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id, token
    return None, ""


def load_tokenizer(spec: str, opts: PrepareOptions, inputs: list[Location]) -> TokenizerInfo:
    from tokenizers import Tokenizer

    trained = spec.startswith("train:")
    if trained:
        try:
            vocab = int(spec.split(":", 1)[1])
        except ValueError as e:
            raise ValueError(f"--tokenizer {spec!r}: expected train:<vocab size>") from e
        text = train_bpe(inputs, opts, vocab)
    else:
        loc = resolve(spec)
        if not loc.exists():
            raise FileNotFoundError(f"tokenizer {spec} does not exist")
        raw = loc.read_bytes()
        try:
            text = raw.decode("utf-8")
            Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a plain Exception on bad JSON
            raise DataError(f"tokenizer {spec} does not parse as a tokenizer.json: {e}") from e
    tokenizer = Tokenizer.from_str(text)
    bos_id, bos_token = _special_id(tokenizer, _BOS_CANDIDATES, opts.bos_token)
    if bos_id is None:
        raise DataError(
            f"tokenizer {spec}: no BOS token found (tried "
            f"{[opts.bos_token] if opts.bos_token else list(_BOS_CANDIDATES)}); "
            "pass --bos-token"
        )
    eos_id, _ = _special_id(tokenizer, _EOS_CANDIDATES)
    if opts.append_eos and eos_id is None:
        raise DataError(f"tokenizer {spec}: --append-eos but no EOS token found")
    return TokenizerInfo(
        json=text,
        source=spec,
        sha256=hashlib.sha256(text.encode()).hexdigest(),
        vocab_size=tokenizer.get_vocab_size(),
        bos_id=bos_id,
        eos_id=eos_id,
        bos_token=bos_token,
        trained=trained,
    )


def train_bpe(inputs: list[Location], opts: PrepareOptions, vocab_size: int) -> str:
    """Byte-level BPE trained on (up to train_tokenizer_max_bytes of) the input: demos/tests."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def texts():
        budget = opts.train_tokenizer_max_bytes
        for loc in inputs:
            for _, text, _ in iter_documents(loc, opts.text_field):
                if budget <= 0:
                    return
                budget -= len(text)
                yield text

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts(), trainer=trainer)
    return tokenizer.to_str()


# ---- tokenize + write one input file ---------------------------------------------------------
_TOKENIZERS: dict[str, object] = {}


def _tokenizer_from(json_text: str):
    from tokenizers import Tokenizer

    key = hashlib.sha256(json_text.encode()).hexdigest()
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = Tokenizer.from_str(json_text)
    return _TOKENIZERS[key]


def _is_val(source: str, fraction: float) -> bool:
    if fraction <= 0:
        return False
    bucket = int(hashlib.sha256(source.encode()).hexdigest()[:12], 16) / float(1 << 48)
    return bucket < fraction


def _shard_bytes(docs: list[tuple[list[int], str]], group_tokens: int) -> tuple[bytes, dict]:
    """A shard of whole documents cut into row groups of group_tokens tokens; returns the file and
    its manifest facts (rows, row groups, the sha256 of its row-group digest list)."""
    import numpy as np

    flat = (
        np.concatenate([np.asarray(ids, dtype=np.int32) for ids, _ in docs])
        if docs
        else np.zeros(0, np.int32)
    )
    doc_starts = np.concatenate([[0], np.cumsum([len(ids) for ids, _ in docs])])
    groups, digests, doc, piece = [], [], 0, 0
    for lo in range(0, flat.size, group_tokens):
        hi = min(lo + group_tokens, flat.size)
        rows = []
        while doc < len(docs) and doc_starts[doc] < hi:
            a, b = max(lo, doc_starts[doc]), min(hi, doc_starts[doc + 1])
            rows.append((flat[a:b], docs[doc][1], piece))
            if doc_starts[doc + 1] > hi:  # the document goes on in the next row group
                piece += 1
                break
            doc, piece = doc + 1, 0
        groups.append(rows)
        digests.append(row_group_digest(flat[lo:hi]))
    meta = json.dumps({"tokens_per_group": group_tokens, "sha256": digests}).encode()
    schema = SHARD_SCHEMA.with_metadata({ROW_GROUPS_KEY: meta})
    sink = io.BytesIO()
    # statistics are of no use to a reader that addresses row groups by position; they only
    # grow the footer every reader loads
    with pq.ParquetWriter(sink, schema, compression="zstd", write_statistics=False) as writer:
        for rows in groups:
            pieces = [r[0] for r in rows]
            offsets = np.concatenate([[0], np.cumsum([p.size for p in pieces])]).astype(np.int32)
            tokens = pa.ListArray.from_arrays(
                pa.array(offsets, pa.int32()), pa.array(np.concatenate(pieces), pa.int32())
            )
            table = pa.table(
                {
                    "tokens": tokens,
                    "num_tokens": pa.array([p.size for p in pieces], pa.int32()),
                    "source": pa.array([r[1] for r in rows], pa.string()),
                    "piece": pa.array([r[2] for r in rows], pa.int32()),
                },
                schema=schema,
            )
            writer.write_table(table, row_group_size=len(rows))
    return sink.getvalue(), dict(
        rows=sum(len(g) for g in groups),
        row_groups=len(groups),
        row_group_tokens=group_tokens,
        row_groups_sha256=list_digest(meta),
    )


class _Shards:
    """Whole documents of one task -> shards of about shard_tokens per split, and their records."""

    def __init__(self, file_index: int, input_uri: str, output_uri: str, opts: PrepareOptions):
        self.index, self.input_uri, self.opts = file_index, input_uri, opts
        self.out = resolve(output_uri)
        self.records: list[dict] = []
        self.pending: dict[str, list] = {"train": [], "val": []}
        self.pending_tokens = {"train": 0, "val": 0}
        self.seq = {"train": 0, "val": 0}

    def add(self, split: str, tokens, source: str) -> None:
        self.pending[split].append((tokens, source))
        self.pending_tokens[split] += len(tokens)
        if self.pending_tokens[split] >= self.opts.shard_tokens:
            self.flush(split)

    def flush(self, split: str) -> None:
        rows = self.pending[split]
        if not rows:
            return
        data, facts = _shard_bytes(rows, self.opts.row_group_tokens)
        rel = f"{split}/part-{self.index:05d}-{self.seq[split]:04d}.parquet"
        self.out.join(rel).write_bytes(data)
        self.records.append(
            dict(
                kind="shard",
                path=rel,
                split=split,
                documents=len(rows),
                tokens=sum(len(r[0]) for r in rows),
                bytes=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
                input=self.input_uri,
                **facts,
            )
        )
        self.seq[split] += 1
        self.pending[split], self.pending_tokens[split] = [], 0

    def close(self, stats: FileStats) -> list[dict]:
        self.flush("train"), self.flush("val")
        return self.records + [dict(kind="stats", input=self.input_uri, **asdict(stats))]


def process_file(
    file_index: int,
    input_uri: str,
    output_uri: str,
    opts: PrepareOptions,
    tok: TokenizerInfo,
    batch_docs: int = 256,
    relative_name: str = "",
) -> list[dict]:
    """Tokenize one input file and write its shards; returns shard records + one stats record.

    The held-out split hashes the document's identity relative to the input root
    (relative_name + line/row), so it does not change when the data moves (local -> S3)."""
    loc = resolve(input_uri)
    tokenizer = _tokenizer_from(tok.json)
    stats = FileStats()
    shards = _Shards(file_index, input_uri, output_uri, opts)

    def tokenize(batch: list[tuple[str, str, bool]]) -> None:
        encodings = tokenizer.encode_batch([text for _, text, _ in batch], add_special_tokens=False)
        for (source, _, bad), enc in zip(batch, encodings):
            ids = enc.ids
            stats.non_utf8_documents += int(bad)
            if not ids:
                stats.empty_documents += 1
                continue
            if len(ids) < opts.min_tokens:
                stats.short_documents += 1
                stats.short_documents_tokens += len(ids)
                continue
            tokens = [tok.bos_id] + ids + ([tok.eos_id] if opts.append_eos else [])
            identity = (relative_name or input_uri.rsplit("/", 1)[-1]) + source[len(input_uri) :]
            split = "val" if _is_val(identity, opts.val_fraction) else "train"
            stats.documents_written += 1
            stats.tokens_written += len(tokens)
            shards.add(split, tokens, source)

    batch: list[tuple[str, str, bool]] = []
    for doc in iter_documents(loc, opts.text_field):
        stats.documents_read += 1
        batch.append(doc)
        if len(batch) >= batch_docs:
            tokenize(batch)
            batch = []
    tokenize(batch) if batch else None
    return shards.close(stats)


def process_store_range(
    task_index: int,
    split: str,
    lo: int,
    hi: int,
    length: int,
    output_uri: str,
    opts: PrepareOptions,
    tok: TokenizerInfo,
) -> list[dict]:
    """Convert the documents starting in [lo, hi) of an official token store's split (their ids
    as they are, BOS included) into shards; returns shard records + one stats record."""
    from ttte2e.platform.data import official_zarr

    stats = FileStats()
    where = f"{opts.input.rstrip('/')}/{split}"
    shards = _Shards(task_index, f"{where}[{lo}:{hi}]", output_uri, opts)
    for ids, source in official_zarr.range_documents(
        opts.input, split, lo, hi, length, tok.bos_id, tok.vocab_size, stats
    ):
        if ids.size < 2:
            stats.empty_documents += 1  # a BOS followed directly by the next BOS
            continue
        if ids.size - 1 < opts.min_tokens:
            stats.short_documents += 1
            stats.short_documents_tokens += int(ids.size - 1)
            continue
        stats.documents_written += 1
        stats.tokens_written += int(ids.size)
        shards.add(split, ids, f"{opts.input.rstrip('/')}/{source}")
    return shards.close(stats)


# ---- the whole job ---------------------------------------------------------------------------
def _dataset_key(opts: PrepareOptions, tok: TokenizerInfo, inputs: list[tuple[str, int]]) -> str:
    """inputs: (address, size) of every input file or store array."""
    options = {k: v for k, v in asdict(opts).items() if k not in ("overwrite", "output")}
    if options["input_format"] == "text":  # datasets made before the option keep their key
        del options["input_format"]
    ident = dict(options=options, tokenizer=tok.sha256, inputs=inputs, version=FORMAT_VERSION)
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _prepare_output(out: Location, key: str, overwrite: bool) -> bool:
    """True when this exact dataset already exists (nothing to do)."""
    out.ensure_bucket()
    if not out.exists():
        return False
    manifest = out.join(MANIFEST)
    if manifest.exists():
        existing = json.loads(manifest.read_bytes())
        if existing.get("dataset_key") == key and not overwrite:
            problems = verify_dataset(out.uri)
            if problems:
                raise DataError(
                    f"{out.uri} holds this dataset but it is damaged ("
                    + "; ".join(problems[:5])
                    + "); pass --overwrite to rebuild it"
                )
            return True
        if not overwrite:
            raise DataError(
                f"{out.uri} already holds a different dataset (dataset_key "
                f"{existing.get('dataset_key')} != {key}); pass --overwrite to replace it"
            )
        log.info(f"--overwrite: deleting the dataset in {out.uri}")
        out.delete()
        return False
    ours = ("train/", "val/", TOKENIZER_FILE)
    files = out.list_files() if out.is_dir() else [out]
    foreign = [f.uri for f in files if not f.uri[len(out.uri) + 1 :].startswith(ours)]
    if foreign and not overwrite:
        raise DataError(
            f"{out.uri} is not empty and holds no dataset manifest (e.g. "
            f"{foreign[:3]}); pass --overwrite to replace it"
        )
    if files:
        log.info(f"{out.uri}: removing {len(files)} file(s) left by an unfinished run")
        out.delete()
    return False


def _log_tokenizer(tok: TokenizerInfo) -> None:
    log.info(
        f"tokenizer: {'trained BPE' if tok.trained else tok.source}, vocab {tok.vocab_size}, "
        f"BOS {tok.bos_token!r} = {tok.bos_id}, sha256 {tok.sha256[:12]}"
    )


def _start_output(
    opts: PrepareOptions, tok: TokenizerInfo, identity: list
) -> tuple[str, dict | None]:
    """(dataset key, the manifest when the output already holds this dataset, else None)."""
    out = resolve(opts.output)
    key = _dataset_key(opts, tok, identity)
    if _prepare_output(out, key, opts.overwrite):
        log.info(f"{opts.output} already holds this dataset ({key}); nothing to do")
        return key, read_manifest(opts.output)
    out.join(TOKENIZER_FILE).write_bytes(tok.json.encode())
    return key, None


def _text_task(
    index: int, uri: str, rel: str, output: str, opts: PrepareOptions, tok: TokenizerInfo
) -> list[dict]:
    return process_file(index, uri, output, opts, tok, relative_name=rel)


def _text_jobs(opts: PrepareOptions, use_ray: bool):
    inputs, skipped_files = discover_inputs(opts.input)
    log.info(
        f"input: {len(inputs)} file(s) under {opts.input}"
        + (f"; {len(skipped_files)} skipped (unsupported type)" if skipped_files else "")
    )
    for uri in skipped_files:
        log.info(f"  skipped (unsupported type): {uri}")
    tok = load_tokenizer(opts.tokenizer, opts, inputs)
    _log_tokenizer(tok)
    key, done = _start_output(opts, tok, [(f.uri, f.size()) for f in inputs])
    if done is not None:
        return done
    root = resolve(opts.input).uri
    jobs = [
        (i, f.uri, f.uri[len(root) + 1 :] if f.uri != root else f.uri.rsplit("/", 1)[-1])
        for i, f in enumerate(inputs)
    ]
    records = _run(_text_task, jobs, opts, tok, use_ray)
    return records, dict(files=len(inputs), skipped_unsupported=skipped_files), tok, key


def _official_zarr_jobs(opts: PrepareOptions, use_ray: bool):
    from ttte2e.platform.data import official_zarr

    if opts.tokenizer.startswith("train:"):
        raise ValueError(
            "--input-format official-zarr: the ids are already tokenized; pass the "
            "tokenizer.json they were made with (--tokenizer), not train:<vocab>"
        )
    if opts.val_fraction:
        raise ValueError(
            "--input-format official-zarr keeps the store's own train/val split; "
            "--val-fraction must be 0"
        )
    if opts.append_eos:
        raise ValueError(
            "--input-format official-zarr: --append-eos would change the released "
            "token stream (it has BOS before every document and no EOS)"
        )
    tok = load_tokenizer(opts.tokenizer, opts, [])
    _log_tokenizer(tok)
    lengths = official_zarr.check_store(opts.input, tok.bos_id, tok.vocab_size)
    log.info(
        f"input: official token store {opts.input}: "
        + ", ".join(f"{s} {n:,} tokens" for s, n in lengths.items())
        + "; documents cut at BOS, ids kept"
    )
    key, done = _start_output(opts, tok, official_zarr.store_identity(opts.input, lengths))
    if done is not None:
        return done
    jobs = [(i, *r) for i, r in enumerate(official_zarr.ranges(lengths, opts.shard_tokens))]
    records = _run(process_store_range, jobs, opts, tok, use_ray)
    return (records, dict(format="official-zarr", tasks=len(jobs), tokens=lengths), tok, key)


def prepare(opts: PrepareOptions, use_ray: bool = True) -> dict:
    """Run the whole job; returns the manifest."""
    if not 0.0 <= opts.val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {opts.val_fraction}")
    if opts.min_tokens < 0 or opts.shard_tokens <= 0 or opts.row_group_tokens <= 0:
        raise ValueError("min_tokens must be >= 0, shard_tokens and row_group_tokens > 0")
    start = time.time()
    jobs = _official_zarr_jobs if opts.input_format == "official-zarr" else _text_jobs
    result = jobs(opts, use_ray)
    if isinstance(result, dict):  # the output already holds this dataset
        return result
    records, inputs_facts, tok, key = result
    out = resolve(opts.output)
    shards = sorted((r for r in records if r["kind"] == "shard"), key=lambda r: r["path"])
    totals = FileStats()
    for r in records:
        if r["kind"] == "stats":
            totals.add(FileStats(**{k: v for k, v in r.items() if k not in ("kind", "input")}))
    if totals.documents_written == 0:
        raise DataError(
            f"input {opts.input} produced no documents ({asdict(totals)}): empty "
            "input, or every document was empty or under --min-tokens"
        )
    splits = {
        s: dict(
            documents=sum(r["documents"] for r in shards if r["split"] == s),
            tokens=sum(r["tokens"] for r in shards if r["split"] == s),
            shards=sum(1 for r in shards if r["split"] == s),
        )
        for s in ("train", "val")
    }
    manifest = dict(
        format_version=FORMAT_VERSION,
        dataset_key=key,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        options=asdict(opts),
        tokenizer=dict(
            source=tok.source,
            trained=tok.trained,
            sha256=tok.sha256,
            vocab_size=tok.vocab_size,
            bos_id=tok.bos_id,
            eos_id=tok.eos_id,
            bos_token=tok.bos_token,
            file=TOKENIZER_FILE,
        ),
        inputs=inputs_facts,
        counts=asdict(totals),
        splits=splits,
        shards=[{k: r[k] for k in SHARD_FIELDS} for r in shards],
        seconds=round(time.time() - start, 2),
    )
    write_manifest(out, manifest)  # the commit point
    log.info(
        f"done: {splits['train']['documents']} train / {splits['val']['documents']} held-out "
        f"documents, {totals.tokens_written} tokens in {len(shards)} shard(s); skipped: "
        f"{totals.empty_documents} empty, {totals.short_documents} under {opts.min_tokens} "
        f"tokens; {totals.non_utf8_documents} with invalid UTF-8 (replaced) -> "
        f"{out.join(MANIFEST).uri}"
    )
    return manifest


def _run(
    work, jobs: list[tuple], opts: PrepareOptions, tok: TokenizerInfo, use_ray: bool
) -> list[dict]:
    """work(*job, output, opts, tok) for every job: one Ray Data task each, or here in turn."""
    if not use_ray:
        return [r for job in jobs for r in work(*job, opts.output, opts, tok)]
    return _run_with_ray(work, jobs, opts, tok)


def _run_with_ray(work, jobs: list[tuple], opts: PrepareOptions, tok: TokenizerInfo) -> list[dict]:
    import ray

    from ttte2e.platform.cluster.ray_runtime import ensure_ray

    ensure_ray()
    output, options = opts.output, opts
    # Workers may have been started before this process set its storage variables (or on other
    # nodes): ship the driver's S3 endpoint and credentials with the task (never logged).
    storage_env = forwarded_env()

    def task(batch: dict) -> dict:
        os.environ.update(storage_env)
        records = []
        for job in batch["job"]:
            records += work(*json.loads(job), output, options, tok)
        return {"record": [json.dumps(r) for r in records]}

    dataset = ray.data.from_items([{"job": json.dumps(job)} for job in jobs])
    results = dataset.map_batches(task, batch_size=1).take_all()
    return [json.loads(row["record"]) for row in results]
