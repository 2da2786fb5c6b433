"""prepare_data --input-format official-zarr: the official code's token store (a zarr group with
1-D `train` / `val` arrays of ids, BOS before every document, Blosc-zstd) converted into our
shards without re-tokenizing: the same token stream, cut at BOS, in parallel ranges; and the bad
stores named."""

import json

import numpy as np
import pytest

from ttte2e.platform.data.manifest import DataError, read_manifest, verify_dataset
from ttte2e.platform.data.prepare import PrepareOptions, prepare
from ttte2e.platform.data.stream import WindowReader

BLOSC_ZSTD = {"id": "blosc", "cname": "zstd", "clevel": 3, "shuffle": 2}


def _stream(rng, docs: int, bos: int, vocab: int, long_every: int = 7) -> np.ndarray:
    """Documents of 1..300 tokens (every long_every-th 900: longer than a conversion range), BOS
    before each; ids never BOS inside a document."""
    parts = []
    for i in range(docs):
        n = 900 if i % long_every == 3 else int(rng.integers(1, 300))
        ids = rng.integers(0, vocab - 1, n)
        ids[ids >= bos] += 1  # skip the BOS id
        parts += [[bos], ids]
    return np.concatenate(parts).astype(np.int32)


def write_store(root, arrays: dict, driver: str = "zarr", dtype: str = "int32", chunk: int = 256):
    """A zarr group as the official pipeline writes it: one 1-D array per split."""
    import tensorstore as ts

    root.mkdir(parents=True, exist_ok=True)
    if driver == "zarr":
        (root / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
    for split, data in arrays.items():
        spec = {"driver": driver, "kvstore": {"driver": "file", "path": str(root / split) + "/"}}
        if driver == "zarr":
            spec["metadata"] = {
                "compressor": BLOSC_ZSTD,
                "dtype": "<i4" if dtype == "int32" else "<f4",
                "shape": [len(data)],
                "chunks": [chunk],
            }
            array = ts.open(spec, create=True).result()
        else:
            array = ts.open(
                spec,
                create=True,
                dtype=getattr(ts, dtype),
                shape=[len(data)],
                chunk_layout=ts.ChunkLayout(chunk_shape=[chunk]),
            ).result()
        array[:] = data.astype(dtype)
    return root


@pytest.fixture(scope="module")
def tokenizer(train_data):
    """The train_data tokenizer (vocabulary 512): (path, bos id, vocab)."""
    from ttte2e.platform.data.storage import resolve

    uri, bos = train_data
    manifest = read_manifest(uri)
    return (
        resolve(uri).join(manifest["tokenizer"]["file"]).path,
        bos,
        manifest["tokenizer"]["vocab_size"],
    )


def _options(store, out, tok, **changes):
    return PrepareOptions(
        **{
            **dict(
                input=str(store),
                output=str(out),
                tokenizer=tok,
                input_format="official-zarr",
                shard_tokens=1000,
                row_group_tokens=128,
            ),
            **changes,
        }
    )


def _split_tokens(out, split) -> np.ndarray:
    reader = WindowReader(str(out), split, seq_len=1)
    return reader.tokens(0, reader.n_tokens)


@pytest.mark.parametrize("driver", ["zarr", "zarr3"])
def test_the_token_stream_comes_through_unchanged(tokenizer, tmp_path, driver, monkeypatch):
    from ttte2e.platform.data import official_zarr

    path, bos, vocab = tokenizer
    rng = np.random.default_rng(0)
    train, val = _stream(rng, 60, bos, vocab), _stream(rng, 12, bos, vocab)
    store = write_store(tmp_path / "store", {"train": train, "val": val}, driver)
    monkeypatch.setattr(official_zarr, "READ_BLOCK", 100)  # documents cross every read
    out = tmp_path / "ds"
    manifest = prepare(_options(store, out, path), use_ray=False)
    assert verify_dataset(str(out)) == []
    for split, data in (("train", train), ("val", val)):
        assert np.array_equal(_split_tokens(out, split), data)  # nothing lost, repeated, moved
        assert manifest["splits"][split]["documents"] == int((data == bos).sum())
        assert manifest["splits"][split]["tokens"] == len(data)
    assert manifest["tokenizer"]["vocab_size"] == vocab and manifest["tokenizer"]["bos_id"] == bos
    assert manifest["inputs"]["format"] == "official-zarr"
    assert manifest["inputs"]["tasks"] == -(-len(train) // 1000) + -(-len(val) // 1000)
    # the training windows are the official loader's: slices of T+1 at multiples of T
    t = 64
    reader = WindowReader(str(out), "train", seq_len=t)
    n = (len(train) - 1) // t
    assert np.array_equal(
        reader.read(range(n)), np.stack([train[i * t : i * t + t + 1] for i in range(n)])
    )
    # documents whole inside shards: each shard's stream starts at a BOS
    import pyarrow.parquet as pq

    for shard in manifest["shards"]:
        first_row = pq.read_table(out / shard["path"], columns=["tokens", "piece"]).slice(0, 1)
        assert first_row["tokens"][0].as_py()[0] == bos and first_row["piece"][0].as_py() == 0
    # a rerun finds the same dataset
    assert (
        prepare(_options(store, out, path), use_ray=False)["dataset_key"] == manifest["dataset_key"]
    )


@pytest.mark.slow
def test_ray_conversion_equals_the_local_one(tokenizer, tmp_path, ray_cluster):
    path, bos, vocab = tokenizer
    rng = np.random.default_rng(1)
    store = write_store(
        tmp_path / "store",
        {"train": _stream(rng, 40, bos, vocab), "val": _stream(rng, 8, bos, vocab)},
    )
    local = prepare(_options(store, tmp_path / "a", path), use_ray=False)
    ray = prepare(_options(store, tmp_path / "b", path), use_ray=True)
    assert [(s["path"], s["sha256"]) for s in local["shards"]] == [
        (s["path"], s["sha256"]) for s in ray["shards"]
    ]


def test_min_tokens_counts_what_it_drops(tokenizer, tmp_path):
    path, bos, vocab = tokenizer
    rng = np.random.default_rng(2)
    train = _stream(rng, 30, bos, vocab)
    store = write_store(tmp_path / "store", {"train": train, "val": _stream(rng, 5, bos, vocab)})
    manifest = prepare(_options(store, tmp_path / "ds", path, min_tokens=100), use_ray=False)
    starts = np.flatnonzero(train == bos)
    sizes = np.diff(np.append(starts, len(train))) - 1
    counts = manifest["counts"]
    assert counts["documents_written"] - manifest["splits"]["val"]["documents"] == int(
        (sizes >= 100).sum()
    )
    assert counts["documents_read"] == counts["documents_written"] + counts["short_documents"]


def test_bad_stores_are_named_before_any_work(tokenizer, tmp_path, monkeypatch):
    from ttte2e.platform.data import official_zarr

    path, bos, vocab = tokenizer
    rng = np.random.default_rng(3)
    good = _stream(rng, 20, bos, vocab)
    cases = {
        "floats": ({"train": good, "val": good}, dict(dtype="float32"), "dtype float32"),
        "no-val": ({"train": good}, {}, "no 'val' array"),
        "no-bos": ({"train": good[1:], "val": good}, {}, "the first token is"),
    }
    for name, (arrays, kwargs, message) in cases.items():
        store = write_store(tmp_path / name, arrays, **kwargs)
        with pytest.raises(DataError, match=message):
            prepare(_options(store, tmp_path / f"out-{name}", path), use_ray=False)
        assert not (tmp_path / f"out-{name}").exists()  # refused before anything was written
    # ids of another tokenizer: in the first block, refused up front; further in, the task
    # that reads them stops the job and no manifest is written
    above = good.copy()
    above[5] = vocab + 10
    store = write_store(tmp_path / "above", {"train": above, "val": good})
    with pytest.raises(DataError, match=f"token {vocab + 10} at position 5 is outside"):
        prepare(_options(store, tmp_path / "out-above", path), use_ray=False)
    late = good.copy()
    late[-3] = vocab
    store = write_store(tmp_path / "late", {"train": late, "val": good})
    monkeypatch.setattr(official_zarr, "READ_BLOCK", 64)
    with pytest.raises(DataError, match=f"position {len(late) - 3} is outside"):
        prepare(_options(store, tmp_path / "out-late", path), use_ray=False)
    assert not (tmp_path / "out-late" / "manifest.json").exists()
    with pytest.raises(ValueError, match="keeps the store's own train/val split"):
        prepare(
            _options(tmp_path / "late", tmp_path / "x", path, val_fraction=0.1),
            use_ray=False,
        )
    with pytest.raises(ValueError, match="already tokenized"):
        prepare(
            _options(tmp_path / "late", tmp_path / "x", "train:300"),
            use_ray=False,
        )


def test_the_cli_flag(tokenizer, tmp_path, capsys):
    from ttte2e.platform.cli.prepare import main

    path, bos, vocab = tokenizer
    rng = np.random.default_rng(4)
    train = _stream(rng, 10, bos, vocab)
    store = write_store(tmp_path / "store", {"train": train, "val": _stream(rng, 3, bos, vocab)})
    main(
        [
            "--input",
            str(store),
            "--input-format",
            "official-zarr",
            "--tokenizer",
            path,
            "--output",
            str(tmp_path / "ds"),
            "--no-ray",
        ]
    )
    assert np.array_equal(_split_tokens(tmp_path / "ds", "train"), train)
    with pytest.raises(SystemExit):
        main(
            [
                "--input",
                str(store),
                "--input-format",
                "official-zarr",
                "--tokenizer",
                path,
                "--output",
                str(tmp_path / "ds2"),
                "--no-ray",
                "--val-fraction",
                "0.2",
            ]
        )
    assert "must be 0" in capsys.readouterr().err
