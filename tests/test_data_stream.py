"""Training stream: packing, shuffled window order, determinism, sharding across ranks, exact
resume, row-group reads."""

import collections
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from ttte2e.platform.data.manifest import DataError
from ttte2e.platform.data.prepare import PrepareOptions, prepare
from ttte2e.platform.data.stream import StreamPosition, StreamSpec, WindowReader, iter_batches

DOCS = [
    f"doc {i}: " + " ".join(f"w{(i * 7 + j) % 97}" for j in range(20 + 13 * (i % 7)))
    for i in range(60)
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stream")
    for part in range(3):
        (folder / f"p{part}.jsonl").write_text(
            "".join(json.dumps({"text": d}) + "\n" for d in DOCS[part * 20 : (part + 1) * 20])
        )
    out = folder / "ds"
    prepare(
        PrepareOptions(
            input=str(folder),
            output=str(out),
            tokenizer="train:400",
            shard_tokens=400,
            row_group_tokens=8,
        ),
        use_ray=False,
    )
    return str(out)


def all_shard_tokens(uri):
    """The train split's token stream read with plain pyarrow (independent of our reader)."""
    manifest = json.loads(open(f"{uri}/manifest.json").read())
    flat = [
        pq.read_table(io.BytesIO(open(f"{uri}/{s['path']}", "rb").read()))
        .column("tokens")
        .to_pylist()
        for s in manifest["shards"]
        if s["split"] == "train"
    ]
    return np.array([t for shard in flat for piece in shard for t in piece])


def run(spec, start=StreamPosition(), stop_after=None, epochs=1):
    """{rank: [(epoch, step, windows)]} and the position to resume from."""
    got, position = collections.defaultdict(list), start
    iters = [iter_batches(spec, r, start, epochs) for r in range(spec.world_size)]
    for count, batches in enumerate(zip(*iters)):
        if stop_after is not None and count == stop_after:
            break
        for rank, (after, windows) in enumerate(batches):  # noqa: B007 - the last one is kept
            got[rank].append(windows)
        position = after
    return got, position


def epoch_windows(got, steps):
    """The global batches of an epoch in order: [steps * G, T+1]."""
    return np.concatenate([np.concatenate([got[r][s] for r in sorted(got)]) for s in range(steps)])


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 1000, 4097])
def test_window_permutation_is_a_bijection(n):
    from ttte2e.platform.data.stream import WindowPermutation

    perm = WindowPermutation(n, seed=7, epoch=1)
    out = perm(np.arange(n))
    assert sorted(out.tolist()) == list(range(n))
    assert perm(np.array([n - 1]))[0] == out[-1]  # any position looked up on its own
    if n >= 16:
        assert not np.array_equal(out, np.arange(n))
        assert not np.array_equal(out, WindowPermutation(n, seed=7, epoch=2)(np.arange(n)))
    with pytest.raises(IndexError):
        perm(np.array([n]))


def test_every_window_once_per_epoch_shuffled_and_resumed_exactly(dataset):
    spec = StreamSpec(dataset, seq_len=16, global_batch=4, world_size=2, seed=3)
    reader = WindowReader(dataset, "train", 16, 3)
    steps = spec.steps_per_epoch(reader)
    assert steps >= 6
    full, end = run(spec)
    assert end == StreamPosition(1, 0)
    first, position = run(spec, stop_after=3)
    assert position == StreamPosition(0, 3)
    rest, _ = run(spec, start=StreamPosition.from_dict(json.loads(json.dumps(position.to_dict()))))
    for rank in range(2):
        resumed = first[rank] + rest[rank]
        assert len(resumed) == len(full[rank]) == steps
        for a, b in zip(resumed, full[rank]):
            np.testing.assert_array_equal(a, b)
    windows = epoch_windows(full, steps)
    # the windows read are the epoch's windows (plain pyarrow, not our reader), each once, except
    # the W mod G positions at the end of the order, which are not read
    t, stream = spec.seq_len, all_shard_tokens(dataset)
    unshuffled = [tuple(stream[w * t : w * t + t + 1]) for w in range(reader.windows_per_epoch)]
    read = collections.Counter(tuple(w) for w in windows.tolist())
    assert not read - collections.Counter(unshuffled)  # nothing read that is not a window
    assert sum(read.values()) == steps * spec.global_batch
    skipped = reader.windows_per_epoch - steps * spec.global_batch
    assert 0 <= skipped < spec.global_batch
    # the order is shuffled: consecutive windows rarely continue each other (each one found in
    # the plain stream; before shuffling every window continued the one before it)
    where = {}
    for w, key in enumerate(unshuffled):
        where.setdefault(key, w)
    at = [where[tuple(w)] for w in windows.tolist()]
    continued = sum(int(b == a + 1) for a, b in zip(at, at[1:]))
    assert continued < 0.2 * (len(at) - 1), continued
    assert sorted(at) != at


def test_read_stays_near_the_window_and_resume_reads_nothing_before(dataset):
    spec = StreamSpec(dataset, seq_len=16, global_batch=4, world_size=2, seed=3)
    reader = WindowReader(dataset, "train", 16, 3, cache_tokens=0)
    group = reader.shards[0]["row_group_tokens"]
    for step in range(3):
        spec.read(reader, 0, step, 1)
    # each window decodes only the row groups it spans: at most T+1 + 2 groups of tokens
    assert reader.stats.tokens_decoded <= reader.stats.tokens_used / 17 * (17 + 2 * group)
    assert reader.stats.amplification < 1 + 2 * group / 17


def test_order_is_deterministic_for_a_seed_and_changes_with_it(dataset):
    a, _ = run(StreamSpec(dataset, 16, 2, seed=1))
    b, _ = run(StreamSpec(dataset, 16, 2, seed=1))
    c, _ = run(StreamSpec(dataset, 16, 2, seed=2))
    assert all(np.array_equal(x, y) for x, y in zip(a[0], b[0]))
    assert not all(np.array_equal(x, y) for x, y in zip(a[0], c[0]))


def test_epochs_reshuffle_windows(dataset):
    spec = StreamSpec(dataset, 16, 2, seed=1)
    got, end = run(spec, epochs=2)
    steps = spec.steps_per_epoch(WindowReader(dataset, "train", 16, 1))
    assert len(got[0]) == 2 * steps and end == StreamPosition(2, 0)
    assert not all(np.array_equal(x, y) for x, y in zip(got[0][:steps], got[0][steps:]))


def test_bad_streams_are_refused(dataset, tmp_path):
    with pytest.raises(DataError, match="not a finished dataset"):
        WindowReader(str(tmp_path), "train", 16, 0)
    with pytest.raises(ValueError, match="no shards in split 'val'"):
        WindowReader(dataset, "val", 16, 0)
    with pytest.raises(ValueError, match="not divisible"):
        StreamSpec(dataset, 16, 3, world_size=2)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        list(iter_batches(StreamSpec(dataset, 512, 64)))


@pytest.mark.slow
def test_ray_data_stream_matches_the_plain_reader(dataset, ray_cluster):
    """worker_stream with Ray Data (what training workers run) == the stream without Ray, for
    each rank, from a resume position."""
    from ttte2e.platform.data.stream import worker_stream

    spec = StreamSpec(dataset, seq_len=16, global_batch=4, world_size=2, seed=3)
    start = StreamPosition(0, 2)
    expected, _ = run(spec, start=start)
    for rank in range(2):
        n = len(expected[rank])
        got = list(worker_stream(spec, rank, start, n, use_ray_data=True))
        plain = list(worker_stream(spec, rank, start, n, use_ray_data=False))
        assert [p for p, _ in got] == [p for p, _ in plain]
        for (_, windows), (_, reference), windows_run in zip(got, plain, expected[rank]):
            np.testing.assert_array_equal(windows, reference)
            np.testing.assert_array_equal(windows, windows_run)


def test_ordered_batches_resequences_and_refuses_gaps_and_repeats(dataset):
    from ttte2e.platform.data.stream import ordered_batches

    spec = StreamSpec(dataset, seq_len=16, global_batch=2, seed=0)
    rows = [{"epoch": 0, "step": s, "tokens": np.full((2, 17), s)} for s in (1, 0, 3, 2, 4)]
    out = list(ordered_batches(rows, spec))
    assert [int(t[0, 0]) for _, t in out] == [0, 1, 2, 3, 4]
    assert out[-1][0] == StreamPosition(0, 5)
    with pytest.raises(RuntimeError, match="ended waiting for"):
        list(ordered_batches([rows[0], rows[2]], spec))  # step 0 never comes
    with pytest.raises(RuntimeError, match="repeated"):
        list(ordered_batches([rows[1], rows[1]], spec))


def test_a_window_longer_than_the_cache_is_still_read_whole(dataset):
    big = WindowReader(dataset, "train", 16, 0)
    tiny_cache = WindowReader(dataset, "train", 16, 0, cache_tokens=4)  # < one window
    last = big.windows_per_epoch - 1
    for w in np.random.default_rng(0).permutation(last)[:30]:
        pair = [w, w + 1]  # neighbours share a row group: one is partly cached
        np.testing.assert_array_equal(tiny_cache.read(pair), big.read(pair))
    assert tiny_cache._group_tokens_cached <= 4
