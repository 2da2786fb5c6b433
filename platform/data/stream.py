"""Token shards (a prepared dataset) -> training windows, shuffled, shardable, resumable, verified.

Packing as in the official pipeline: the documents of a split are concatenated (BOS already
before each one; shards in manifest order), and window w is tokens [w*T, w*T + T + 1) of that
stream, stepping by T: every token is a target exactly once per epoch; a window may span
documents and shards.

Order as the official loader's (grain `MapDataset.shuffle(seed)` over window indices): each epoch
visits the windows in a pseudo-random permutation drawn from (seed, epoch), a Feistel network
over the window indices (`WindowPermutation`: bijective, O(1) memory, any position looked up
directly). Step s of an epoch uses positions [s*G, (s+1)*G) of that order (G = global batch in
windows); rank r of R gets positions [s*G + r*G/R, s*G + (r+1)*G/R). So a global batch is G
windows from unrelated places of the split, the stream position is just (epoch, step), and a
resumed run reads nothing before its position. The W mod G windows at the end of an epoch's order
(fewer than one global batch; a different set each epoch) are not read: the plan line says how
many.

Reading: a window decodes only the parquet row groups it spans (prepare.py cuts shards into row
groups of `row_group_tokens`), each checked against its checksum in the shard's footer, which is
itself checked against the manifest; decoded row groups and open shard footers are cached (LRU).
Any read error names the shard. `WindowReader.stats` counts tokens decoded against tokens used.

Ray Data: `worker_stream` (what every training worker runs) reads its rank's windows from its
checkpointed position in a Ray Data actor ahead of the training step, and `ordered_batches`
re-sequences the rows by (epoch, step), so the order never depends on Ray's scheduling.
`iter_batches` is the same stream without Ray (single process, tests, tools).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ttte2e.platform.cluster.ray_runtime import forwarded_env
from ttte2e.platform.data.manifest import (
    DataError,
    read_manifest,
    row_group_digest,
    row_group_digests,
)
from ttte2e.platform.data.storage import resolve


@dataclass(frozen=True)
class StreamPosition:
    """Where a training stream stands: the next (epoch, step) to read. Stored in checkpoints."""

    epoch: int = 0
    step: int = 0

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step}

    @classmethod
    def from_dict(cls, d: dict) -> StreamPosition:
        return cls(int(d["epoch"]), int(d["step"]))


_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class WindowPermutation:
    """A bijection of [0, n) drawn from (seed, epoch): a balanced Feistel network on the smallest
    even number of bits covering n, with cycle walking (values >= n are encrypted again until
    they land in range; the domain is < 4n, so a few rounds at most on average)."""

    ROUNDS = 6

    def __init__(self, n: int, seed: int, epoch: int):
        if n < 1:
            raise ValueError(f"a permutation of {n} windows")
        self.n = n
        bits = max(2, int(n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = np.random.SeedSequence([int(seed), int(epoch)]).generate_state(
            self.ROUNDS, dtype=np.uint64
        )

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        half = np.uint64(self.half)
        left, right = x >> half, x & self.mask
        with np.errstate(over="ignore"):
            for key in self.keys:
                left, right = right, left ^ (_mix(right ^ key) & self.mask)
        return (left << half) | right

    def __call__(self, positions) -> np.ndarray:
        """The window indices at these positions of the epoch's order (int64)."""
        x = np.asarray(positions, dtype=np.int64)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise IndexError(f"positions outside 0..{self.n - 1}")
        y = self._encrypt(x.astype(np.uint64))
        out = y >= np.uint64(self.n)
        while out.any():
            y[out] = self._encrypt(y[out])
            out = y >= np.uint64(self.n)
        return y.astype(np.int64)


@dataclass
class ReadStats:
    """What a reader decoded against what it handed out (read amplification = decoded / used)."""

    tokens_used: int = 0
    tokens_decoded: int = 0
    row_groups_decoded: int = 0
    cache_hits: int = 0
    footer_bytes: int = 0
    shards_opened: int = 0

    @property
    def amplification(self) -> float:
        return self.tokens_decoded / max(1, self.tokens_used)


class WindowReader:
    """Random access to the windows of one split of a prepared dataset.

    `read(indices)` returns windows by index; `order(epoch)` is the epoch's shuffled order. Decoded
    row groups are kept in an LRU of `cache_tokens` tokens, open shards (their footers) in an LRU
    of `cache_shards`."""

    def __init__(
        self,
        uri: str,
        split: str,
        seq_len: int,
        seed: int = 0,
        cache_tokens: int = 4 << 20,
        cache_shards: int = 64,
    ):
        self.uri, self.split, self.seq_len, self.seed = uri, split, seq_len, seed
        self.manifest = read_manifest(uri)
        self.root = resolve(uri)
        self.shards = [s for s in self.manifest["shards"] if s["split"] == split]
        if not self.shards:
            raise ValueError(f"{uri}: no shards in split '{split}'")
        self.starts = np.concatenate([[0], np.cumsum([s["tokens"] for s in self.shards])])
        self.n_tokens = int(self.starts[-1])
        self.windows_per_epoch = (self.n_tokens - 1) // seq_len
        if self.windows_per_epoch < 1:
            raise ValueError(
                f"{uri} split '{split}' has {self.n_tokens} tokens: not one window of "
                f"T+1 = {seq_len + 1}"
            )
        self.stats = ReadStats()
        self._groups: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._group_tokens_cached = 0
        self._cache_tokens = cache_tokens
        self._files: OrderedDict[int, tuple[pq.ParquetFile, list[str]]] = OrderedDict()
        self._cache_shards = cache_shards
        self._orders: dict[int, WindowPermutation] = {}

    @property
    def bos_id(self) -> int:
        return self.manifest["tokenizer"]["bos_id"]

    def order(self, epoch: int) -> WindowPermutation:
        if epoch not in self._orders:
            self._orders = {epoch: WindowPermutation(self.windows_per_epoch, self.seed, epoch)}
        return self._orders[epoch]

    # ---- decoding, verified ------------------------------------------------------------------
    def _shard_uri(self, index: int) -> str:
        return self.root.join(self.shards[index]["path"]).uri

    def _open(self, index: int) -> tuple[pq.ParquetFile, list[str]]:
        if index not in self._files:
            where = self._shard_uri(index)
            try:
                handle = self.root.join(self.shards[index]["path"]).open_random_access()
                parquet = pq.ParquetFile(handle)
            except (OSError, pa.ArrowException) as e:
                raise DataError(f"{where}: cannot be read as a shard ({e})") from e
            digests = row_group_digests(parquet, self.shards[index], where)
            self.stats.shards_opened += 1
            self.stats.footer_bytes += parquet.metadata.serialized_size
            self._files[index] = (parquet, digests)
            while len(self._files) > self._cache_shards:
                self._files.popitem(last=False)
        self._files.move_to_end(index)
        return self._files[index]

    def _decode(self, index: int, groups: list[int]) -> None:
        """Decode (one read) and verify these row groups of one shard into the cache."""
        parquet, digests = self._open(index)
        where = self._shard_uri(index)
        try:
            table = parquet.read_row_groups(groups, columns=["tokens"])
        except (OSError, pa.ArrowException) as e:
            raise DataError(
                f"{where}: row groups {groups[0]}..{groups[-1]} cannot be read ({e})"
            ) from e
        flat = table.column("tokens").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        flat = flat.astype(np.int32, copy=False)
        per_group = self.shards[index]["row_group_tokens"]
        total = self.shards[index]["tokens"]
        pos = 0
        for g in groups:
            size = min(per_group, total - g * per_group)
            tokens = flat[pos : pos + size]
            pos += size
            if tokens.size != size or row_group_digest(tokens) != digests[g]:
                raise DataError(
                    f"{where}: row group {g} does not match its checksum (damaged "
                    "or replaced shard)"
                )
            self._groups[(index, g)] = tokens
            self._group_tokens_cached += size
            self.stats.tokens_decoded += size
            self.stats.row_groups_decoded += 1
        if pos != flat.size:
            raise DataError(f"{where}: row groups {groups} hold {flat.size} tokens, expected {pos}")

    def _evict(self) -> None:
        """Drop the least recently used row groups past the cache budget (after a read: the
        groups of the window being assembled are never dropped under it)."""
        while self._group_tokens_cached > self._cache_tokens and self._groups:
            _, dropped = self._groups.popitem(last=False)
            self._group_tokens_cached -= dropped.size

    def _shard_range(self, index: int, lo: int, hi: int) -> np.ndarray:
        """Tokens [lo, hi) of shard `index` (shard-local offsets)."""
        per_group = self.shards[index]["row_group_tokens"]
        wanted = list(range(lo // per_group, (hi - 1) // per_group + 1))
        missing = [g for g in wanted if (index, g) not in self._groups]
        self.stats.cache_hits += len(wanted) - len(missing)
        # contiguous runs of missing groups are decoded in one read each
        run: list[int] = []
        for g in missing + [None]:
            if run and (g is None or g != run[-1] + 1):
                self._decode(index, run)
                run = []
            if g is not None:
                run.append(g)
        parts = []
        for g in wanted:
            self._groups.move_to_end((index, g))
            tokens = self._groups[(index, g)]
            a = max(lo - g * per_group, 0)
            b = min(hi - g * per_group, tokens.size)
            parts.append(tokens[a:b])
        return np.concatenate(parts)

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split's stream (shards in manifest order)."""
        if start < 0 or stop > self.n_tokens or start > stop:
            raise IndexError(f"tokens {start}..{stop} outside 0..{self.n_tokens}")
        out, pos = [], start
        k = int(np.searchsorted(self.starts, pos, side="right")) - 1
        while pos < stop:
            lo = pos - int(self.starts[k])
            take = min(stop - pos, int(self.starts[k + 1]) - pos)
            out.append(self._shard_range(k, lo, lo + take))
            pos += take
            k += 1
        self._evict()
        return np.concatenate(out) if out else np.zeros(0, np.int32)

    def read(self, indices) -> np.ndarray:
        """[len(indices), T+1] int64: the windows with these indices."""
        t = self.seq_len
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.windows_per_epoch):
            raise IndexError(f"windows {indices.tolist()} outside 0..{self.windows_per_epoch - 1}")
        out = (
            np.stack([self.tokens(int(w) * t, int(w) * t + t + 1) for w in indices])
            if indices.size
            else np.zeros((0, t + 1), np.int32)
        )
        self.stats.tokens_used += out.size
        return out.astype(np.int64)

    def windows(self, first: int, count: int) -> np.ndarray:
        """[count, T+1] int64: windows first .. first+count-1 in stream order (not shuffled:
        held-out scoring reads a fixed set)."""
        if first < 0 or first + count > self.windows_per_epoch:
            raise IndexError(
                f"windows {first}..{first + count} outside 0..{self.windows_per_epoch}"
            )
        return self.read(np.arange(first, first + count))

    def shuffled(self, epoch: int, first: int, count: int) -> np.ndarray:
        """[count, T+1] int64: positions first .. first+count-1 of the epoch's shuffled order."""
        if first < 0 or first + count > self.windows_per_epoch:
            raise IndexError(
                f"positions {first}..{first + count} outside 0..{self.windows_per_epoch}"
            )
        return self.read(self.order(epoch)(np.arange(first, first + count)))


@dataclass(frozen=True)
class StreamSpec:
    """What a training stream is: dataset, split, packing and sharding."""

    uri: str
    seq_len: int
    global_batch: int
    world_size: int = 1
    seed: int = 0
    split: str = "train"

    def __post_init__(self):
        if self.global_batch % self.world_size:
            raise ValueError(
                f"global batch {self.global_batch} is not divisible by {self.world_size} workers"
            )

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.world_size

    def steps_per_epoch(self, reader: WindowReader) -> int:
        steps = reader.windows_per_epoch // self.global_batch
        if steps < 1:
            raise ValueError(
                f"{self.uri}: {reader.windows_per_epoch} windows per epoch, fewer than "
                f"one global batch of {self.global_batch}"
            )
        return steps

    def positions(self, start: StreamPosition, epochs: int, reader: WindowReader):
        """(epoch, step) from start up to the end of epoch `epochs - 1`."""
        steps = self.steps_per_epoch(reader)
        epoch, step = start.epoch, start.step
        while epoch < epochs:
            while step < steps:
                yield epoch, step
                step += 1
            epoch, step = epoch + 1, 0

    def read(self, reader: WindowReader, epoch: int, step: int, rank: int) -> np.ndarray:
        first = step * self.global_batch + rank * self.local_batch
        return reader.shuffled(epoch, first, self.local_batch)


def iter_batches(
    spec: StreamSpec, rank: int = 0, start: StreamPosition = StreamPosition(), epochs: int = 1
) -> Iterator[tuple[StreamPosition, np.ndarray]]:
    """(position after this batch, [local_batch, T+1] windows) for one rank, without Ray."""
    reader = WindowReader(spec.uri, spec.split, spec.seq_len, spec.seed)
    steps = spec.steps_per_epoch(reader)
    for epoch, step in spec.positions(start, epochs, reader):
        after = (
            StreamPosition(epoch, step + 1) if step + 1 < steps else StreamPosition(epoch + 1, 0)
        )
        yield after, spec.read(reader, epoch, step, rank)


def ordered_batches(
    rows, spec: StreamSpec, start: StreamPosition = StreamPosition(), max_buffer: int = 256
) -> Iterator[tuple[StreamPosition, np.ndarray]]:
    """(position after, [local_batch, T+1] windows) in stream order from rows carrying
    epoch/step/tokens (e.g. a worker's get_dataset_shard(...).iter_rows()).

    Rows that arrive early are held (up to max_buffer) until their turn, so the stream order never
    depends on how Ray schedules blocks; a gap that never fills is an error, not a skip."""
    reader = WindowReader(spec.uri, spec.split, spec.seq_len, spec.seed)
    steps = spec.steps_per_epoch(reader)
    expected, pending = (start.epoch, start.step), {}
    for row in rows:
        key = (int(row["epoch"]), int(row["step"]))
        if row.get("error"):
            raise DataError(str(row["error"]))
        if key < expected or key in pending:
            raise RuntimeError(f"stream row {key} repeated (expected {expected})")
        pending[key] = np.asarray(row["tokens"])
        if len(pending) > max_buffer:
            raise RuntimeError(
                f"stream out of order: waiting for {expected}, holding {len(pending)} later rows"
            )
        while expected in pending:
            tokens = pending.pop(expected)
            epoch, step = expected
            expected = (epoch, step + 1) if step + 1 < steps else (epoch + 1, 0)
            yield StreamPosition(*expected), tokens
    if pending:
        raise RuntimeError(f"stream ended waiting for {expected} with {len(pending)} rows held")


class _StepReader:
    """Ray Data actor: step index (from `start`) -> this rank's windows of that step."""

    def __init__(self, spec: StreamSpec, rank: int, start: StreamPosition, storage_env: dict):
        os.environ.update(storage_env)
        self.spec, self.rank = spec, rank
        self.reader = WindowReader(spec.uri, spec.split, spec.seq_len, spec.seed)
        steps = spec.steps_per_epoch(self.reader)
        self.first, self.steps = start.epoch * steps + start.step, steps

    def __call__(self, batch: dict) -> dict:
        epochs, steps, tokens, errors = [], [], [], []
        for i in batch["i"]:
            epoch, step = divmod(self.first + int(i), self.steps)
            epochs.append(epoch), steps.append(step)
            tokens.append(_read_or_error(self.spec, self.reader, epoch, step, self.rank, errors))
        return {
            "epoch": np.array(epochs),
            "step": np.array(steps),
            "tokens": np.stack(tokens),
            "error": np.array(errors),
        }


def _read_or_error(
    spec: StreamSpec, reader: WindowReader, epoch: int, step: int, rank: int, errors: list
) -> np.ndarray:
    """Damaged data travels to the training worker as a row that carries the error, and is raised
    there as the DataError it is (raised inside a Ray Data actor it would arrive as a generic
    task error, which a worker group restart would retry forever)."""
    try:
        windows = spec.read(reader, epoch, step, rank)
        errors.append("")
    except DataError as e:
        windows = np.zeros((spec.local_batch, spec.seq_len + 1), np.int64)
        errors.append(str(e))
    return windows


def worker_stream(
    spec: StreamSpec,
    rank: int,
    start: StreamPosition,
    n_steps: int,
    use_ray_data: bool = True,
    cpus: float = 0.25,
) -> Iterator[tuple[StreamPosition, np.ndarray]]:
    """The next n_steps batches of one rank from `start`, as (position after, windows).

    Built inside each training worker, so a worker group restarted from a checkpoint streams from
    that checkpoint's position without reading anything before it. With use_ray_data the windows
    are read and packed in a Ray Data actor ahead of the training step (overlapping I/O)."""
    if not use_ray_data:
        reader = WindowReader(spec.uri, spec.split, spec.seq_len, spec.seed)
        steps = spec.steps_per_epoch(reader)
        first = start.epoch * steps + start.step
        for i in range(n_steps):
            epoch, step = divmod(first + i, steps)
            after = divmod(first + i + 1, steps)
            yield StreamPosition(*after), spec.read(reader, epoch, step, rank)
        return
    import ray

    storage_env = forwarded_env()
    dataset = ray.data.from_items([{"i": i} for i in range(n_steps)])
    dataset = dataset.map_batches(
        _StepReader,
        fn_constructor_args=(spec, rank, start, storage_env),
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=1),  # one reader actor, in order
        num_cpus=cpus,
    )
    dataset.context.execution_options.preserve_order = True
    dataset.context.enable_progress_bars = False  # the trainer's bar is the one users watch
    yield from ordered_batches(dataset.iter_rows(), spec, start)
