"""Token shards (a prepared dataset) -> training windows, deterministic, shardable, resumable.

Packing as in the official pipeline: the documents of the split are concatenated (BOS already
before each one), and window k of an epoch is tokens [k*T, k*T + T + 1) of that stream, stepping
by T: every token is a target exactly once per epoch; a window may span documents.

Order: each epoch concatenates the shards in a permutation drawn from (seed, epoch); documents keep
their order inside a shard. Step s of an epoch uses windows [s*G, (s+1)*G) (G = global batch in
windows); rank r of R gets the contiguous slice [r*G/R, (r+1)*G/R) of them. So the stream position
is just (epoch, step): a checkpoint stores it, and a resumed run reads from there on (windows are
located by token offset through the per-shard counts; nothing before them is read).

Ray Data: `train_dataset` is a dataset of (epoch, step, rank) rows; `for_rank` filters one rank
and reads + packs its windows (local or s3://), order preserved. `rank_datasets` gives Ray Train
one such dataset per rank (names from `rank_dataset_name`), passed unsplit
(`stream_data_config()`); worker r reads `ordered_batches(
ray.train.get_dataset_shard(rank_dataset_name(r)).iter_rows(), spec, start)`. `iter_batches` is the same stream without
Ray (single process, tests, tools).

Why not `read_parquet` straight into packing: its blocks carry no stable position, so neither an
exact resume point nor "every token once across a restart" could be guaranteed.
"""

from __future__ import annotations

import bisect
import io
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq

from ttte2e.platform.prepare import read_manifest
from ttte2e.platform.storage import STORAGE_ENV_VARS, resolve


@dataclass(frozen=True)
class StreamPosition:
    """Where a training stream stands: the next (epoch, step) to read. Stored in checkpoints."""

    epoch: int = 0
    step: int = 0

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step}

    @classmethod
    def from_dict(cls, d: dict) -> "StreamPosition":
        return cls(int(d["epoch"]), int(d["step"]))


class WindowReader:
    """Random access to the windows of one split of a prepared dataset."""

    def __init__(self, uri: str, split: str, seq_len: int, seed: int, cache_shards: int = 2):
        self.uri, self.split, self.seq_len, self.seed = uri, split, seq_len, seed
        self.manifest = read_manifest(uri)
        self.shards = [s for s in self.manifest["shards"] if s["split"] == split]
        if not self.shards:
            raise ValueError(f"{uri}: no shards in split '{split}'")
        self.n_tokens = sum(s["tokens"] for s in self.shards)
        self.windows_per_epoch = (self.n_tokens - 1) // seq_len
        if self.windows_per_epoch < 1:
            raise ValueError(f"{uri} split '{split}' has {self.n_tokens} tokens: not one window of "
                             f"T+1 = {seq_len + 1}")
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_shards
        self._orders: dict[int, tuple[list[int], list[int]]] = {}

    @property
    def bos_id(self) -> int:
        return self.manifest["tokenizer"]["bos_id"]

    def epoch_order(self, epoch: int) -> tuple[list[int], list[int]]:
        """(shard indices in this epoch's order, their starting token offsets)."""
        if epoch not in self._orders:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards)).tolist()
            starts = np.concatenate([[0], np.cumsum([self.shards[i]["tokens"] for i in perm])[:-1]])
            self._orders[epoch] = (perm, starts.astype(np.int64).tolist())
        return self._orders[epoch]

    def _shard_tokens(self, index: int) -> np.ndarray:
        path = self.shards[index]["path"]
        if path not in self._cache:
            data = resolve(self.uri).join(path).read_bytes()
            table = pq.read_table(io.BytesIO(data), columns=["tokens"])
            flat = table.column("tokens").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            if flat.size != self.shards[index]["tokens"]:
                raise ValueError(f"{self.uri}/{path}: {flat.size} tokens, manifest says "
                                 f"{self.shards[index]['tokens']} (corrupt or replaced shard)")
            self._cache[path] = flat.astype(np.int32, copy=False)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(path)
        return self._cache[path]

    def tokens(self, epoch: int, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of this epoch's stream."""
        perm, starts = self.epoch_order(epoch)
        out, pos = [], start
        k = bisect.bisect_right(starts, pos) - 1
        while pos < stop:
            shard = self._shard_tokens(perm[k])
            lo = pos - starts[k]
            take = min(stop - pos, shard.size - lo)
            out.append(shard[lo:lo + take])
            pos += take
            k += 1
        return np.concatenate(out)

    def windows(self, epoch: int, first: int, count: int) -> np.ndarray:
        """[count, T+1] int64: windows first .. first+count-1 of the epoch."""
        if first < 0 or first + count > self.windows_per_epoch:
            raise IndexError(f"windows {first}..{first + count} outside 0..{self.windows_per_epoch}")
        t = self.seq_len
        flat = self.tokens(epoch, first * t, (first + count) * t + 1)
        idx = np.arange(t + 1)[None, :] + t * np.arange(count)[:, None]
        return flat[idx].astype(np.int64)


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
            raise ValueError(f"global batch {self.global_batch} is not divisible by "
                             f"{self.world_size} workers")

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.world_size

    def steps_per_epoch(self, reader: WindowReader) -> int:
        steps = reader.windows_per_epoch // self.global_batch
        if steps < 1:
            raise ValueError(f"{self.uri}: {reader.windows_per_epoch} windows per epoch, fewer than "
                             f"one global batch of {self.global_batch}")
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
        return reader.windows(epoch, first, self.local_batch)


def iter_batches(spec: StreamSpec, rank: int = 0, start: StreamPosition = StreamPosition(),
                 epochs: int = 1) -> Iterator[tuple[StreamPosition, np.ndarray]]:
    """(position after this batch, [local_batch, T+1] windows) for one rank, without Ray."""
    reader = WindowReader(spec.uri, spec.split, spec.seq_len, spec.seed)
    steps = spec.steps_per_epoch(reader)
    for epoch, step in spec.positions(start, epochs, reader):
        after = StreamPosition(epoch, step + 1) if step + 1 < steps else StreamPosition(epoch + 1, 0)
        yield after, spec.read(reader, epoch, step, rank)


def train_dataset(spec: StreamSpec, start: StreamPosition = StreamPosition(), epochs: int = 1):
    """Ray Data dataset of (epoch, step, rank, tokens) rows, in stream order.

    Give it to Ray Train unsplit (DataConfig(datasets_to_split=[])) and let each worker call
    `for_rank(dataset, rank)`: every worker then reads only its own windows."""
    import ray

    reader = WindowReader(spec.uri, spec.split, spec.seq_len, spec.seed)
    rows = [{"epoch": e, "step": s, "rank": r} for e, s in spec.positions(start, epochs, reader)
            for r in range(spec.world_size)]
    dataset = ray.data.from_items(rows)
    dataset.context.execution_options.preserve_order = True
    return dataset


class _RankReader:
    """Ray Data actor: keeps one WindowReader (and its shard cache) for the life of the stream."""

    def __init__(self, spec: StreamSpec, rank: int, storage_env: dict):
        os.environ.update(storage_env)  # S3 endpoint/credentials of the driver, never logged
        self.spec, self.rank = spec, rank
        self.reader = WindowReader(spec.uri, spec.split, spec.seq_len, spec.seed)

    def __call__(self, batch: dict) -> dict:
        tokens = [self.spec.read(self.reader, int(e), int(s), self.rank)
                  for e, s in zip(batch["epoch"], batch["step"])]
        return {"epoch": batch["epoch"], "step": batch["step"], "tokens": np.stack(tokens)}


def for_rank(dataset, spec: StreamSpec, rank: int, cpus: float = 0.25):
    """This rank's rows of `train_dataset` with its windows read and packed, in order.

    Each output row: epoch, step, tokens [local_batch, T+1]."""
    storage_env = {k: v for k, v in os.environ.items() if k in STORAGE_ENV_VARS}
    # small CPU shares: the training workers hold most CPUs, and Ray Data stalls without any
    mine = dataset.filter(lambda row: row["rank"] == rank, num_cpus=cpus)
    mine.context.execution_options.preserve_order = True
    return mine.map_batches(_RankReader, fn_constructor_args=(spec, rank, storage_env),
                            batch_size=1, concurrency=1, num_cpus=cpus)


def rank_dataset_name(rank: int) -> str:
    return f"train_rank{rank}"


def rank_datasets(spec: StreamSpec, start: StreamPosition = StreamPosition(),
                  epochs: int = 1) -> dict:
    """{rank_dataset_name(r): this rank's Ray Data pipeline} for TorchTrainer(datasets=...)."""
    base = train_dataset(spec, start, epochs)
    return {rank_dataset_name(r): for_rank(base, spec, r) for r in range(spec.world_size)}


def stream_data_config():
    """Ray Train DataConfig for `rank_datasets`: unsplit, order preserved (Ray Train applies its
    own execution options to datasets, overriding the ones set on them)."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    return DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True))


def ordered_batches(rows, spec: StreamSpec, start: StreamPosition = StreamPosition(),
                    max_buffer: int = 256) -> Iterator[tuple[StreamPosition, np.ndarray]]:
    """(position after, [local_batch, T+1] windows) in stream order from rows carrying
    epoch/step/tokens (e.g. a worker's get_dataset_shard(...).iter_rows()).

    Rows that arrive early are held (up to max_buffer) until their turn, so the stream order never
    depends on how Ray schedules blocks; a gap that never fills is an error, not a skip."""
    reader = WindowReader(spec.uri, spec.split, spec.seq_len, spec.seed)
    steps = spec.steps_per_epoch(reader)
    expected, pending = (start.epoch, start.step), {}
    for row in rows:
        key = (int(row["epoch"]), int(row["step"]))
        if key < expected or key in pending:
            raise RuntimeError(f"stream row {key} repeated (expected {expected})")
        pending[key] = np.asarray(row["tokens"])
        if len(pending) > max_buffer:
            raise RuntimeError(f"stream out of order: waiting for {expected}, holding "
                               f"{len(pending)} later rows")
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
        epochs, steps, tokens = [], [], []
        for i in batch["i"]:
            epoch, step = divmod(self.first + int(i), self.steps)
            epochs.append(epoch), steps.append(step)
            tokens.append(self.spec.read(self.reader, epoch, step, self.rank))
        return {"epoch": np.array(epochs), "step": np.array(steps), "tokens": np.stack(tokens)}


def worker_stream(spec: StreamSpec, rank: int, start: StreamPosition, n_steps: int,
                  use_ray_data: bool = True, cpus: float = 0.25
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

    storage_env = {k: v for k, v in os.environ.items() if k in STORAGE_ENV_VARS}
    dataset = ray.data.from_items([{"i": i} for i in range(n_steps)])
    dataset = dataset.map_batches(_StepReader, fn_constructor_args=(spec, rank, start, storage_env),
                                  batch_size=1, concurrency=1, num_cpus=cpus)
    dataset.context.execution_options.preserve_order = True
    dataset.context.enable_progress_bars = False  # the trainer's bar is the one users watch
    yield from ordered_batches(dataset.iter_rows(), spec, start)
