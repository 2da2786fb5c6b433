"""Training stream: packing, determinism, sharding across ranks, exact resume (every token once)."""

import collections
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from ttte2e.platform.data import (StreamPosition, StreamSpec, WindowReader, for_rank,
                                  iter_batches, train_dataset)
from ttte2e.platform.prepare import DataError, PrepareOptions, prepare

DOCS = [f"doc {i}: " + " ".join(f"w{(i * 7 + j) % 97}" for j in range(20 + 13 * (i % 7)))
        for i in range(60)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stream")
    for part in range(3):
        (folder / f"p{part}.jsonl").write_text("".join(
            json.dumps({"text": d}) + "\n" for d in DOCS[part * 20:(part + 1) * 20]))
    out = folder / "ds"
    prepare(PrepareOptions(input=str(folder), output=str(out), tokenizer="train:400",
                           shard_tokens=400), use_ray=False, log=lambda *_: None)
    return str(out)


def all_shard_tokens(uri):
    manifest = json.loads(open(f"{uri}/manifest.json").read())
    flat = [pq.read_table(io.BytesIO(open(f"{uri}/{s['path']}", "rb").read()))
            .column("tokens").to_pylist() for s in manifest["shards"] if s["split"] == "train"]
    return [t for shard in flat for doc in shard for t in doc]


def run(spec, start=StreamPosition(), stop_after=None, epochs=1):
    """{rank: [(epoch, step, windows)]} and the position to resume from."""
    got, position = collections.defaultdict(list), start
    iters = [iter_batches(spec, r, start, epochs) for r in range(spec.world_size)]
    for count, batches in enumerate(zip(*iters)):
        if stop_after is not None and count == stop_after:
            break
        for rank, (after, windows) in enumerate(batches):
            got[rank].append(windows)
        position = after
    return got, position


def test_every_token_is_a_target_once_per_epoch_across_a_restart(dataset):
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
    # global order: step s = windows [s*G, (s+1)*G), rank r its contiguous half
    windows = np.concatenate([np.concatenate([full[0][s], full[1][s]]) for s in range(steps)])
    t = spec.seq_len
    assert all((windows[i + 1, 0] == windows[i, -1]) for i in range(len(windows) - 1))
    targets = windows[:, 1:].reshape(-1)
    stream = reader.tokens(0, 0, steps * spec.global_batch * t + 1)
    np.testing.assert_array_equal(targets, stream[1:])  # contiguous: no gap, no repeat
    # independent of our reader: the consumed tokens are a multiset of the shards' tokens
    shard_counts = collections.Counter(all_shard_tokens(dataset))
    consumed = collections.Counter(np.concatenate([windows[:1, 0], targets]).tolist())
    assert not consumed - shard_counts
    assert sum(shard_counts.values()) - sum(consumed.values()) < (spec.global_batch + 1) * t + 1


def test_order_is_deterministic_for_a_seed_and_changes_with_it(dataset):
    a, _ = run(StreamSpec(dataset, 16, 2, seed=1))
    b, _ = run(StreamSpec(dataset, 16, 2, seed=1))
    c, _ = run(StreamSpec(dataset, 16, 2, seed=2))
    assert all(np.array_equal(x, y) for x, y in zip(a[0], b[0]))
    assert not all(np.array_equal(x, y) for x, y in zip(a[0], c[0]))


def test_epochs_reshuffle_shards(dataset):
    spec = StreamSpec(dataset, 16, 2, seed=1)
    got, end = run(spec, epochs=2)
    steps = spec.steps_per_epoch(WindowReader(dataset, "train", 16, 1))
    assert len(got[0]) == 2 * steps and end == StreamPosition(2, 0)


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
def test_ray_data_stream_matches_the_plain_reader(dataset):
    from ttte2e.platform.ray_runtime import ensure_ray

    ensure_ray()
    spec = StreamSpec(dataset, seq_len=16, global_batch=4, world_size=2, seed=3)
    start = StreamPosition(0, 2)
    expected, _ = run(spec, start=start)
    ds = train_dataset(spec, start)
    for rank in range(2):
        rows = list(for_rank(ds, spec, rank).iter_rows())
        assert [(r["epoch"], r["step"]) for r in rows] == [(0, s) for s in range(2, 2 + len(rows))]
        assert len(rows) == len(expected[rank])
        for row, windows in zip(rows, expected[rank]):
            np.testing.assert_array_equal(row["tokens"], windows)


@pytest.mark.slow
def test_ray_train_workers_get_their_windows_via_get_dataset_shard(dataset, tmp_path):
    """2 TorchTrainer workers each iterate their own rank's stream (from a resume position)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ttte2e.platform.data import (ordered_batches, rank_dataset_name, rank_datasets,
                                      stream_data_config)
    from ttte2e.platform.ray_runtime import ensure_ray

    ensure_ray()
    spec = StreamSpec(dataset, seq_len=16, global_batch=4, world_size=2, seed=3)
    start = StreamPosition(0, 1)
    expected, _ = run(spec, start=start)

    def loop(config):
        import numpy as np
        import ray.train

        rank = ray.train.get_context().get_world_rank()
        rows = ray.train.get_dataset_shard(config["name"](rank)).iter_rows()
        seen = [tokens for _, tokens in ordered_batches(rows, config["spec"], config["start"])]
        np.save(f"{config['out']}/rank{rank}.npy", np.array(seen))

    trainer = TorchTrainer(
        loop, train_loop_config={"name": rank_dataset_name, "out": str(tmp_path), "spec": spec,
                                 "start": start},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        datasets=rank_datasets(spec, start), dataset_config=stream_data_config(),
        run_config=RunConfig(name="stream", storage_path=str(tmp_path / "ray_results")))
    trainer.fit()
    for rank in range(2):
        got = np.load(tmp_path / f"rank{rank}.npy")
        np.testing.assert_array_equal(got, np.stack(expected[rank]))


def test_ordered_batches_resequences_and_refuses_gaps_and_repeats(dataset):
    from ttte2e.platform.data import ordered_batches

    spec = StreamSpec(dataset, seq_len=16, global_batch=2, seed=0)
    rows = [{"epoch": 0, "step": s, "tokens": np.full((2, 17), s)} for s in (1, 0, 3, 2, 4)]
    out = list(ordered_batches(rows, spec))
    assert [int(t[0, 0]) for _, t in out] == [0, 1, 2, 3, 4]
    assert out[-1][0] == StreamPosition(0, 5)
    with pytest.raises(RuntimeError, match="ended waiting for"):
        list(ordered_batches([rows[0], rows[2]], spec))  # step 0 never comes
    with pytest.raises(RuntimeError, match="repeated"):
        list(ordered_batches([rows[1], rows[1]], spec))
