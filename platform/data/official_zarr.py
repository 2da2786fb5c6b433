"""The official TTT-E2E token store, read as prepare_data's input (`--input-format official-zarr`).

Layout (what the official loader reads): a zarr group (v2 or v3; local, s3:// or gs://) holding
one array per split, `train` and `val`: a long 1-D array of integer token ids (int32 in the
released stores, Blosc-zstd), the documents concatenated with BOS before each. Windows there are
slices of T+1 at multiples of T; ours are the same over our shards (platform/data/stream.py), so
the converted data trains on the same token stream.

The conversion keeps the ids as they are (no re-tokenizing) and the store's own train/val split,
and cuts the stream at BOS into documents: every BOS starts one (finding them is one vectorized
scan per block read, as cheap as the copy itself). The arrays are cut into ranges of about
`shard_tokens` tokens, each range one Ray Data task; a range starts at the first BOS at or after
its nominal start and ends at the first BOS at or after the next range's nominal start, so every
document lands in exactly one range and no task needs another's output. A task holds its range's
documents (about `shard_tokens` tokens, more only for a document longer than that) and reads the
store in blocks of READ_BLOCK tokens.
"""

from __future__ import annotations

import numpy as np

from ttte2e.model.official_checkpoint import kvstore_spec
from ttte2e.platform.data.manifest import SPLITS, DataError

READ_BLOCK = 1 << 22  # tokens per read: 16 MiB of int32


def _open(store: str, split: str):
    """The split's array (zarr v2 or v3), opened read-only."""
    import tensorstore as ts

    base = kvstore_spec(store)
    kv = ts.KvStore.open(base).result()
    # the metadata keys are read directly: a released store holds millions of chunk keys, and
    # every conversion task opens the array
    if kv.read(f"{split}/.zarray").result().state == "value":
        driver = "zarr"
    elif kv.read(f"{split}/zarr.json").result().state == "value":
        driver = "zarr3"
    else:  # only here is the store listed, to say what it holds
        keys = [k.decode() if isinstance(k, bytes) else k for k in kv.list().result()]
        found = sorted({k.split("/", 1)[0] for k in keys if "/" in k})
        raise DataError(
            f"{store}: no '{split}' array (an official token store holds "
            f"{' and '.join(SPLITS)}; found: {found or 'nothing'})"
        )
    spec = {"driver": driver, "kvstore": {**base, "path": base["path"] + split + "/"}}
    try:
        return ts.open(spec, read=True).result()
    except Exception as e:  # tensorstore raises ValueError/RuntimeError subclasses by status
        raise DataError(f"{store}/{split}: not a readable zarr array: {e}") from e


def _read(array, lo: int, hi: int, where: str, vocab_size: int) -> np.ndarray:
    block = np.asarray(array[lo:hi].read().result())
    if block.size and (int(block.min()) < 0 or int(block.max()) >= vocab_size):
        bad = int(np.flatnonzero((block < 0) | (block >= vocab_size))[0])
        raise DataError(
            f"{where}: token {int(block[bad])} at position {lo + bad} is outside the "
            f"tokenizer's vocabulary [0, {vocab_size}): the store was tokenized with "
            "another tokenizer (pass the one it was made with, --tokenizer)"
        )
    return block.astype(np.int32, copy=False)


def check_store(store: str, bos_id: int, vocab_size: int) -> dict[str, int]:
    """{split: tokens} after the checks that need no full read: both splits there, 1-D, integer
    ids, starting with the tokenizer's BOS, the first block's ids inside the vocabulary."""
    lengths = {}
    for split in SPLITS:
        array = _open(store, split)
        where = f"{store}/{split}"
        if array.rank != 1:
            raise DataError(
                f"{where}: shape {tuple(array.shape)}; the official layout is one "
                "1-D array of token ids per split"
            )
        if array.dtype.numpy_dtype.kind not in "iu":
            raise DataError(
                f"{where}: dtype {array.dtype.name}; token ids are integers (int32 "
                "in the official stores)"
            )
        length = int(array.shape[0])
        if length < 2:
            raise DataError(f"{where}: {length} token(s); nothing to train on")
        first = _read(array, 0, min(length, READ_BLOCK), where, vocab_size)
        if int(first[0]) != bos_id:
            raise DataError(
                f"{where}: the first token is {int(first[0])}, not the tokenizer's "
                f"BOS {bos_id}: not the official layout (BOS before every document), "
                "or another tokenizer"
            )
        lengths[split] = length
    return lengths


def ranges(lengths: dict[str, int], shard_tokens: int) -> list[tuple[str, int, int, int]]:
    """(split, nominal start, nominal end, array length) of every conversion task."""
    out = []
    for split in SPLITS:
        n = lengths[split]
        out += [(split, lo, min(lo + shard_tokens, n), n) for lo in range(0, n, shard_tokens)]
    return out


def _next_bos(array, pos: int, length: int, bos_id: int, where: str, vocab: int) -> int:
    """The first position >= pos holding BOS (length if none)."""
    if pos == 0 or pos >= length:
        return min(pos, length)
    while pos < length:
        block = _read(array, pos, min(length, pos + READ_BLOCK), where, vocab)
        hits = np.flatnonzero(block == bos_id)
        if hits.size:
            return pos + int(hits[0])
        pos += block.size
    return length


def range_documents(
    store: str, split: str, lo: int, hi: int, length: int, bos_id: int, vocab_size: int, stats
):
    """Yield (ids, source) for each document starting in this task's range; counts into stats."""
    array = _open(store, split)
    where = f"{store}/{split}"
    start = _next_bos(array, lo, length, bos_id, where, vocab_size)
    end = _next_bos(array, hi, length, bos_id, where, vocab_size)
    pending = np.zeros(0, np.int32)
    pending_at = start
    pos = start
    while pos < end:
        block = _read(array, pos, min(end, pos + READ_BLOCK), where, vocab_size)
        stream = np.concatenate((pending, block)) if pending.size else block
        offset = pending_at
        starts = np.flatnonzero(stream == bos_id)
        # every document but the last is complete; the last may go on in the next block
        for a, b in zip(starts[:-1], starts[1:]):
            stats.documents_read += 1
            yield stream[a:b], f"{split}#{offset + int(a)}"
        pending, pending_at = stream[starts[-1] :], offset + int(starts[-1])
        pos += block.size
    if pending.size:
        stats.documents_read += 1
        yield pending, f"{split}#{pending_at}"


def store_identity(store: str, lengths: dict[str, int]) -> list[tuple[str, int]]:
    """What the dataset key hashes for a store: each split's address and length."""
    return [(f"{store.rstrip('/')}/{split}", lengths[split]) for split in SPLITS]
