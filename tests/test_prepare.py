"""prepare_data: formats, manifest, atomic commit, every bad-input policy, Ray and S3 paths."""

import hashlib
import io
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from ttte2e.platform.data.manifest import DataError, read_manifest
from ttte2e.platform.data.prepare import PrepareOptions, prepare
from ttte2e.platform.data.storage import StorageError, resolve

DOCS = [
    f"Document number {i}. "
    + "Some words about long context and test-time training. " * (i % 5 + 1)
    for i in range(40)
]


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))


def compressed(data: bytes, codec: str) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, codec) as out:
        out.write(data)
    return sink.getvalue().to_pybytes()


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    write_jsonl(folder / "docs.jsonl", DOCS)
    out = folder / "ds"
    prepare(
        PrepareOptions(input=str(folder / "docs.jsonl"), output=str(out), tokenizer="train:300"),
        use_ray=False,
    )
    return str(out / "tokenizer.json")


def run(tmp_path, tokenizer, input_path=None, **kw):
    opts = PrepareOptions(
        input=str(input_path or tmp_path / "in"),
        output=str(tmp_path / "out"),
        tokenizer=tokenizer,
        **kw,
    )
    return prepare(opts, use_ray=False)


def read_shards(out, manifest):
    rows = []
    for shard in manifest["shards"]:
        data = (out / shard["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["bytes"]
        table = pq.read_table(io.BytesIO(data))
        assert table.num_rows == shard["rows"]
        assert sum(table.column("num_tokens").to_pylist()) == shard["tokens"]
        rows += table.to_pylist()
    return rows


def test_all_formats_round_trip_with_bos_and_counts(tmp_path, tokenizer_file):
    src = tmp_path / "in"
    (src / "books").mkdir(parents=True)
    write_jsonl(src / "a.jsonl", DOCS[:10])
    (src / "b.jsonl.gz").write_bytes(
        compressed("".join(json.dumps({"text": d}) + "\n" for d in DOCS[10:20]).encode(), "gzip")
    )
    (src / "c.jsonl.zst").write_bytes(
        compressed("".join(json.dumps({"text": d}) + "\n" for d in DOCS[20:30]).encode(), "zstd")
    )
    pq.write_table(pa.table({"text": DOCS[30:38]}), src / "d.parquet")
    (src / "books" / "e.txt").write_text(DOCS[38])
    (src / "books" / "f.txt").write_text(DOCS[39])
    (src / "README.md").write_text("not data")
    manifest = run(tmp_path, tokenizer_file, val_fraction=0.25, shard_tokens=300)
    assert manifest["counts"]["documents_read"] == 40 == manifest["counts"]["documents_written"]
    assert manifest["inputs"]["skipped_unsupported"] == [str(src / "README.md")]
    assert manifest["splits"]["val"]["documents"] > 0 and manifest["splits"]["train"]["shards"] > 5
    rows = read_shards(tmp_path / "out", manifest)
    tok = Tokenizer.from_file(tokenizer_file)
    bos = manifest["tokenizer"]["bos_id"]
    by_text = {}
    for row in rows:
        assert row["tokens"][0] == bos and bos not in row["tokens"][1:]
        by_text[tok.decode(row["tokens"][1:])] = row
    assert set(by_text) == set(DOCS)  # every document exactly once, text intact
    assert sum(len(r["tokens"]) for r in rows) == manifest["counts"]["tokens_written"]
    # the held-out split is by document, deterministic, and independent of where the data lives
    again = run(tmp_path, tokenizer_file, val_fraction=0.25, shard_tokens=300, overwrite=True)
    assert again["shards"] == manifest["shards"]
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(src, moved)
    elsewhere = prepare(
        PrepareOptions(
            input=str(moved),
            output=str(tmp_path / "out2"),
            tokenizer=tokenizer_file,
            val_fraction=0.25,
            shard_tokens=300,
        ),
        use_ray=False,
    )
    assert elsewhere["splits"] == manifest["splits"]
    assert [(s["path"], s["rows"], s["tokens"]) for s in elsewhere["shards"]] == [
        (s["path"], s["rows"], s["tokens"]) for s in manifest["shards"]
    ]


def test_min_tokens_empty_docs_and_invalid_utf8_are_counted(tmp_path, tokenizer_file):
    src = tmp_path / "in"
    src.mkdir()
    lines = [
        json.dumps({"text": DOCS[3]}).encode(),
        json.dumps({"text": ""}).encode(),
        json.dumps({"text": None}).encode(),
        json.dumps({"text": "hi"}).encode(),
        b'{"text": "bad \xff\xfe bytes ' + b"and more words " * 20 + b'"}',
    ]
    (src / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    manifest = run(tmp_path, tokenizer_file, min_tokens=5)
    counts = manifest["counts"]
    assert counts["documents_read"] == 5 and counts["documents_written"] == 2
    assert counts["empty_documents"] == 2 and counts["short_documents"] == 1
    assert counts["non_utf8_documents"] == 1
    texts = [
        Tokenizer.from_file(tokenizer_file).decode(r["tokens"][1:])
        for r in read_shards(tmp_path / "out", manifest)
    ]
    assert any("\ufffd" in t for t in texts)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", b'{"text": "ok"}\n{"text": broken\n', r"bad.jsonl: line 2: invalid JSON"),
        (
            "nofield.jsonl",
            b'{"text": "ok"}\n{"body": "x"}\n',
            r"nofield.jsonl: line 2: no text field 'text'",
        ),
        ("num.jsonl", b'{"text": 3}\n', r"num.jsonl: line 1: field 'text' is int"),
        (
            "corrupt.parquet",
            b"PAR1 this is not parquet",
            r"corrupt.parquet: not a readable parquet",
        ),
    ],
)
def test_bad_files_raise_errors_naming_file_and_line(
    tmp_path, tokenizer_file, name, content, message
):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / name).write_bytes(content)
    with pytest.raises(DataError, match=message):
        run(tmp_path, tokenizer_file)
    assert not (tmp_path / "out" / "manifest.json").exists()  # never mistaken for a dataset


def test_truncated_jsonl_and_parquet_are_errors(tmp_path, tokenizer_file):
    (tmp_path / "in").mkdir()
    data = "".join(json.dumps({"text": d}) + "\n" for d in DOCS).encode()
    (tmp_path / "in" / "cut.jsonl").write_bytes(data[: len(data) // 2])  # ends mid-object
    with pytest.raises(DataError, match=r"cut.jsonl: line \d+: invalid JSON"):
        run(tmp_path, tokenizer_file)
    (tmp_path / "in" / "cut.jsonl").unlink()
    sink = io.BytesIO()
    pq.write_table(pa.table({"text": DOCS}), sink)
    (tmp_path / "in" / "cut.parquet").write_bytes(sink.getvalue()[: len(sink.getvalue()) // 2])
    with pytest.raises(DataError, match=r"cut.parquet: not a readable parquet"):
        run(tmp_path, tokenizer_file)


@pytest.mark.parametrize("codec, suffix", [("gzip", ".jsonl.gz"), ("zstd", ".jsonl.zst")])
def test_truncated_compressed_input_is_an_error(tmp_path, tokenizer_file, codec, suffix):
    data = compressed("".join(json.dumps({"text": d}) + "\n" for d in DOCS * 5).encode(), codec)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / f"cut{suffix}").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"cut{suffix}: corrupt or truncated {codec} stream"):
        run(tmp_path, tokenizer_file)


def test_parquet_without_the_text_column(tmp_path, tokenizer_file):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "in" / "p.parquet")
    with pytest.raises(DataError, match=r"p.parquet: no column 'text' \(columns: \['body'\]\)"):
        run(tmp_path, tokenizer_file)


def test_missing_empty_and_unsupported_inputs(tmp_path, tokenizer_file):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(tmp_path, tokenizer_file, input_path=tmp_path / "nowhere")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.md").write_text("x")
    with pytest.raises(DataError, match="holds no supported files"):
        run(tmp_path, tokenizer_file)
    (tmp_path / "in" / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="produced no documents"):
        run(tmp_path, tokenizer_file)


def test_tokenizer_that_does_not_parse(tmp_path):
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "a.jsonl", DOCS[:3])
    (tmp_path / "tok.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(DataError, match="does not parse as a tokenizer.json"):
        run(tmp_path, str(tmp_path / "tok.json"))
    with pytest.raises(FileNotFoundError, match="tokenizer .* does not exist"):
        run(tmp_path, str(tmp_path / "missing.json"))


def test_output_holding_another_dataset_needs_overwrite(tmp_path, tokenizer_file):
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "a.jsonl", DOCS[:5])
    first = run(tmp_path, tokenizer_file)
    assert run(tmp_path, tokenizer_file) == first  # same dataset: nothing to do
    with pytest.raises(DataError, match="already holds a different dataset"):
        run(tmp_path, tokenizer_file, min_tokens=3)
    assert (
        run(tmp_path, tokenizer_file, min_tokens=3, overwrite=True)["dataset_key"]
        != first["dataset_key"]
    )
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.csv").write_text("1,2")
    with pytest.raises(DataError, match="not empty and holds no dataset manifest"):
        prepare(
            PrepareOptions(input=str(tmp_path / "in"), output=str(other), tokenizer=tokenizer_file),
            use_ray=False,
        )
    assert (other / "precious.csv").exists()


def test_unfinished_run_is_not_a_dataset_and_is_cleaned(tmp_path, tokenizer_file):
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "a.jsonl", DOCS[:5])
    leftover = tmp_path / "out" / "train" / "part-00099-0000.parquet"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half written")
    with pytest.raises(DataError, match="not a finished dataset"):
        read_manifest(str(tmp_path / "out"))
    manifest = run(tmp_path, tokenizer_file)
    assert not leftover.exists()
    assert read_manifest(str(tmp_path / "out")) == manifest


@pytest.mark.slow
def test_ray_data_path_writes_the_same_shards(tmp_path, tokenizer_file, ray_cluster):
    (tmp_path / "in").mkdir()
    for i in range(3):
        write_jsonl(tmp_path / "in" / f"part{i}.jsonl", DOCS[i * 10 : (i + 1) * 10])
    local = run(tmp_path, tokenizer_file, val_fraction=0.2)
    opts = PrepareOptions(
        input=str(tmp_path / "in"),
        output=str(tmp_path / "ray_out"),
        tokenizer=tokenizer_file,
        val_fraction=0.2,
    )
    with_ray = prepare(opts, use_ray=True)
    assert [s["sha256"] for s in with_ray["shards"]] == [s["sha256"] for s in local["shards"]]
    assert with_ray["counts"] == local["counts"]


# ---- S3 (a real S3-compatible server on loopback) ----------------------------------------------
@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    return s3_server


def s3_fs(env, secret=None):
    return pafs.S3FileSystem(
        endpoint_override=env["TTTE2E_S3_ENDPOINT"].split("://")[1],
        scheme="http",
        access_key=env["AWS_ACCESS_KEY_ID"],
        secret_key=secret or env["AWS_SECRET_ACCESS_KEY"],
        region="us-east-1",
        allow_bucket_creation=True,
    )


@pytest.mark.slow
def test_prepare_from_s3_to_s3(s3_env, tokenizer_file, ray_cluster):
    fs = s3_fs(s3_env)
    fs.create_dir("raw")
    fs.create_dir("tokens")
    for i in range(2):
        with fs.open_output_stream(f"raw/dclm/part{i}.jsonl.zst", compression=None) as f:
            f.write(
                compressed(
                    "".join(
                        json.dumps({"text": d}) + "\n" for d in DOCS[i * 20 : (i + 1) * 20]
                    ).encode(),
                    "zstd",
                )
            )
    with fs.open_output_stream("raw/tokenizer.json") as f:
        f.write(open(tokenizer_file, "rb").read())
    opts = PrepareOptions(
        input="s3://raw/dclm",
        output="s3://tokens/dclm",
        tokenizer="s3://raw/tokenizer.json",
        val_fraction=0.1,
    )
    manifest = prepare(opts, use_ray=True)
    assert manifest["counts"]["documents_written"] == 40
    assert read_manifest("s3://tokens/dclm") == manifest
    for shard in manifest["shards"]:
        data = resolve("s3://tokens/dclm/" + shard["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
    assert "AWS_SECRET_ACCESS_KEY" not in json.dumps(manifest)
    assert s3_env["AWS_SECRET_ACCESS_KEY"] not in json.dumps(manifest)
    # the training stream reads the shards straight from S3
    from ttte2e.platform.data.stream import StreamSpec, iter_batches

    position, windows = next(
        iter_batches(StreamSpec("s3://tokens/dclm", seq_len=16, global_batch=2))
    )
    assert windows.shape == (2, 17)
    from ttte2e.platform.data.stream import WindowReader

    first = WindowReader("s3://tokens/dclm", "train", 16).windows(0, 1)  # stream order
    assert first[0, 0] == manifest["tokenizer"]["bos_id"]


@pytest.mark.slow
def test_s3_wrong_credentials_and_missing_bucket(s3_env, monkeypatch, tokenizer_file):
    fs = s3_fs(s3_env)
    fs.create_dir("creds")
    with fs.open_output_stream("creds/a.jsonl") as f:
        f.write(b'{"text": "hello"}\n')
    with pytest.raises(StorageError, match="does not exist"):
        prepare(
            PrepareOptions(
                input="s3://no-such-bucket/x", output="s3://creds/out", tokenizer=tokenizer_file
            ),
            use_ray=False,
        )
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(StorageError, match=r"s3://creds/a.jsonl.*check the endpoint") as err:
        prepare(
            PrepareOptions(
                input="s3://creds/a.jsonl", output="s3://creds/out", tokenizer=tokenizer_file
            ),
            use_ray=False,
        )
    assert "wrong-secret" not in str(err.value)


def test_cli_reports_bad_input_as_a_one_line_error(tmp_path, capsys):
    from ttte2e.platform.cli.prepare import main

    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "--input",
                str(tmp_path / "missing"),
                "--output",
                str(tmp_path / "o"),
                "--tokenizer",
                "train:100",
                "--no-ray",
            ]
        )
    assert exit_info.value.code == 2
    assert "prepare_data: error: input" in capsys.readouterr().err


# ---- shard layout and integrity -----------------------------------------------------------------
def test_row_groups_hold_fixed_token_counts_and_pieces_rebuild_documents(tmp_path, tokenizer_file):
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "a.jsonl", DOCS[:12])
    (tmp_path / "in" / "book.txt.gz").write_bytes(compressed(DOCS[12].encode(), "gzip"))
    (tmp_path / "in" / "book2.txt.zst").write_bytes(compressed(DOCS[13].encode(), "zstd"))
    manifest = run(tmp_path, tokenizer_file, shard_tokens=200, row_group_tokens=7)
    assert manifest["counts"]["documents_written"] == 14
    tok, bos = Tokenizer.from_file(tokenizer_file), manifest["tokenizer"]["bos_id"]
    texts = []
    for shard in manifest["shards"]:
        parquet = pq.ParquetFile(tmp_path / "out" / shard["path"])
        sizes = [
            sum(parquet.read_row_group(g).column("num_tokens").to_pylist())
            for g in range(parquet.num_row_groups)
        ]
        assert parquet.num_row_groups == shard["row_groups"] == -(-shard["tokens"] // 7)
        assert set(sizes[:-1]) <= {7} and 0 < sizes[-1] <= 7 and sum(sizes) == shard["tokens"]
        for row in parquet.read().to_pylist():
            if row["piece"] == 0:
                assert row["tokens"][0] == bos
                texts.append(row["tokens"][1:])
            else:
                assert bos not in row["tokens"]
                texts[-1] += row["tokens"]
    assert sorted(tok.decode(t) for t in texts) == sorted(DOCS[:14])  # .txt.gz/.txt.zst too


def damage(path, how):
    data = path.read_bytes()
    if how == "empty":  # (a flipped byte outside the tokens columns is not read by training;
        # --verify's whole-file sha256 finds it)
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flipped":  # same size, one byte of the tokens of row group 0 changed
        column = pq.ParquetFile(path).metadata.row_group(0).column(0)
        first = column.dictionary_page_offset or column.data_page_offset
        middle = first + column.total_compressed_size // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])
    elif how == "missing":
        path.unlink()


@pytest.fixture
def small_dataset(tmp_path, tokenizer_file):
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "a.jsonl", DOCS)
    manifest = run(tmp_path, tokenizer_file, shard_tokens=300, row_group_tokens=16)
    return tmp_path / "out", manifest


@pytest.mark.parametrize("how", ["empty", "truncated", "flipped", "missing"])
def test_damaged_shards_are_named_by_every_reader(
    small_dataset, tmp_path, tokenizer_file, how, capsys
):
    from ttte2e.platform.cli.prepare import main
    from ttte2e.platform.data.manifest import check_shard_sizes, verify_dataset
    from ttte2e.platform.data.stream import WindowReader

    out, manifest = small_dataset
    shard = manifest["shards"][-1 if manifest["shards"][-1]["split"] == "train" else 0]
    assert shard["split"] == "train"
    damage(out / shard["path"], how)
    name = shard["path"]
    # pre-flight (one listing): sizes
    if how != "flipped":
        with pytest.raises(DataError, match=rf"{name}: (missing|\d+ bytes, the manifest says)"):
            check_shard_sizes(str(out), manifest)
    else:
        check_shard_sizes(str(out), manifest)  # same size: caught by the checksums below
    # the training reader, on first read of the damaged shard
    reader = WindowReader(str(out), "train", 16)
    with pytest.raises((DataError, FileNotFoundError), match=name):
        reader.read(np.arange(reader.windows_per_epoch))
    # --verify: a report and exit 1; prepare over it refuses to say "nothing to do"
    assert verify_dataset(str(out))
    with pytest.raises(SystemExit) as code:
        main(["--verify", str(out)])
    assert code.value.code == 1 and f"DAMAGED {out / name}" in capsys.readouterr().out
    with pytest.raises(DataError, match=rf"damaged .*{name}.*--overwrite"):
        run(tmp_path, tokenizer_file, shard_tokens=300, row_group_tokens=16)
    rebuilt = run(tmp_path, tokenizer_file, shard_tokens=300, row_group_tokens=16, overwrite=True)
    assert rebuilt["shards"] == manifest["shards"]


def test_verify_passes_an_intact_dataset(small_dataset, capsys):
    from ttte2e.platform.cli.prepare import main

    out, _ = small_dataset
    with pytest.raises(SystemExit) as code:
        main(["--verify", str(out)])
    assert code.value.code == 0 and "intact" in capsys.readouterr().out


def test_a_row_group_whose_tokens_changed_is_refused(small_dataset):
    """A shard rewritten with other tokens but a footer list copied from the original (what a
    partial overwrite could leave) fails its row-group checksum."""
    from ttte2e.platform.data.manifest import ROW_GROUPS_KEY
    from ttte2e.platform.data.stream import WindowReader

    out, manifest = small_dataset
    shard = next(s for s in manifest["shards"] if s["split"] == "train")
    path = out / shard["path"]
    parquet = pq.ParquetFile(path)
    table = parquet.read()
    tokens = [[t + 1 if t > 3 else t for t in row] for row in table.column("tokens").to_pylist()]
    changed = table.set_column(0, "tokens", pa.array(tokens, pa.list_(pa.int32())))
    with pq.ParquetWriter(path, changed.schema) as writer:
        for g in range(parquet.num_row_groups):
            n = parquet.metadata.row_group(g).num_rows
            start = sum(parquet.metadata.row_group(i).num_rows for i in range(g))
            writer.write_table(changed.slice(start, n), row_group_size=n)
    assert pq.ParquetFile(path).schema_arrow.metadata[ROW_GROUPS_KEY]  # the list came along
    reader = WindowReader(str(out), "train", 16)
    with pytest.raises(DataError, match=rf"{shard['path']}: row group 0 does not match"):
        reader.tokens(0, 8)
