"""Official TTT-E2E checkpoints (orbax / OCDBT / zarr) read without JAX, imported into our model
folder, and our own Hugging Face-style folders (sharded) round-tripped."""

import json
import shutil

import numpy as np
import pytest
import torch

from ttte2e.model import TTTModel, preset
from ttte2e.model.config import ARCHITECTURE_FIELDS
from ttte2e.model.convert import config_from_official, read_official_checkpoint
from ttte2e.model.official_checkpoint import (
    OfficialCheckpointError,
    checkpoint_steps,
    import_official_checkpoint,
    official_config,
)

from conftest import REFERENCE_DIR, load_case

CKPT = REFERENCE_DIR / "official_ckpt_tiny_a"
CASE_A = REFERENCE_DIR / "ttt_e2e_tiny_a.npz"
pytestmark = pytest.mark.skipif(
    not (CKPT.is_dir() and CASE_A.is_file()),
    reason=f"no official checkpoint example under {REFERENCE_DIR}",
)


@pytest.fixture(scope="module")
def case_a():
    data = np.load(CASE_A)
    return data, config_from_official(json.loads(str(data["config_json"])))


def other_fields(config) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in ARCHITECTURE_FIELDS}


def test_reads_the_official_checkpoint_bit_exactly(case_a):
    data, _ = case_a
    arrays = read_official_checkpoint(str(CKPT))
    expected = [k for k in data.files if k.startswith("language_model.")]
    assert sorted(arrays) == sorted(expected) and len(arrays) == 20
    for name in expected:
        assert arrays[name].dtype == np.float32
        assert np.array_equal(arrays[name], data[name]), name
    assert checkpoint_steps(str(CKPT)) == [10]
    assert read_official_checkpoint(str(CKPT), step=10).keys() == arrays.keys()


def test_imported_model_reproduces_the_official_nll(case_a, tmp_path):
    data, reference_cfg = case_a
    config, files = import_official_checkpoint(
        str(CKPT), str(tmp_path / "m"), "auto", **other_fields(reference_cfg)
    )
    assert files == ["model.safetensors"]
    assert {k: getattr(config, k) for k in ARCHITECTURE_FIELDS} == {
        k: getattr(reference_cfg, k) for k in ARCHITECTURE_FIELDS
    }
    model = TTTModel.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        out = model.meta_loss(torch.from_numpy(data["tokens"]).long())
    np.testing.assert_allclose(out.token_nll.numpy(), data["nll_ttt"], rtol=0, atol=1e-5)


def test_import_cli_streams_into_shards_and_registers(case_a, tmp_path, capsys):
    import mlflow

    from ttte2e.platform.cli.import_official import main

    data, reference_cfg = case_a
    sets = [x for k, v in other_fields(reference_cfg).items() for x in ("--set", f"{k}={v}")]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = main(
        [
            "--checkpoint",
            str(CKPT),
            "--out",
            str(tmp_path / "m"),
            "--max-shard-gb",
            str(200_000 / 1024**3),
            "--register",
            "tiny-official",
            "--tracking-uri",
            uri,
            *sets,
        ]
    )
    assert len(result["files"]) > 1 and (tmp_path / "m" / "model.safetensors.index.json").exists()
    model = TTTModel.from_pretrained(tmp_path / "m")
    _, reference = load_case(CASE_A)
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    version = mlflow.MlflowClient(uri).get_model_version("tiny-official", result["version"])
    assert version.tags["ttte2e.weights"] == "reference"
    assert version.tags["ttte2e.weights_uri"] == str((tmp_path / "m").resolve())
    from ttte2e.platform.registry.model_registry import load_model

    pulled, tokenizer = load_model("models:/tiny-official@candidate", uri)
    assert tokenizer is None  # none given to the importer
    assert torch.equal(pulled.embed.weight, model.embed.weight)


def test_bad_checkpoints_raise_errors_naming_the_problem(case_a, tmp_path):
    _, reference_cfg = case_a
    fields = other_fields(reference_cfg)
    with pytest.raises(OfficialCheckpointError, match=r"no step 3; steps present: \[10\]"):
        read_official_checkpoint(str(CKPT), step=3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(OfficialCheckpointError, match="no checkpoint step folders"):
        read_official_checkpoint(str(tmp_path / "empty"))
    with pytest.raises(
        OfficialCheckpointError,
        match=r"wte.weight: stored \[512, 64\], preset "
        r"125m needs \[128256, 768\]",
    ):
        official_config(str(CKPT), "125m")
    with pytest.raises(OfficialCheckpointError, match="unknown preset"):
        official_config(str(CKPT), "7b")

    # an array the metadata promises but the store does not hold
    copy = tmp_path / "extra"
    shutil.copytree(CKPT, copy)
    meta_path = copy / "10" / "model_weights" / "_METADATA"
    meta = json.loads(meta_path.read_text())
    entry = next(
        v
        for v in meta["tree_metadata"].values()
        if v["value_metadata"]["value_type"] == "jax.Array"
    )
    ghost = json.loads(json.dumps(entry))
    ghost["key_metadata"][-1]["key"] = "ghost"
    meta["tree_metadata"]["('ghost',)"] = ghost
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(OfficialCheckpointError, match="cannot be read"):
        read_official_checkpoint(str(copy))
    with pytest.raises(OfficialCheckpointError, match="unexpected .*ghost"):
        official_config(str(copy), "auto", **fields)

    # a parameter missing from the checkpoint
    copy = tmp_path / "missing"
    shutil.copytree(CKPT, copy)
    meta_path = copy / "10" / "model_weights" / "_METADATA"
    meta = json.loads(meta_path.read_text())
    for value in meta["tree_metadata"].values():
        if value["key_metadata"][-2]["key"] == "ffn_post_norm":
            value["value_metadata"] = {"value_type": "None", "skip_deserialize": True}
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(OfficialCheckpointError, match="missing .*ffn_post_norm"):
        official_config(str(copy), "auto", **fields)

    # a truncated data file
    copy = tmp_path / "truncated"
    shutil.copytree(CKPT, copy)
    data_files = sorted(
        (copy / "10" / "model_weights" / "ocdbt.process_0" / "d").iterdir(),
        key=lambda p: p.stat().st_size,
    )
    biggest = data_files[-1]
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    with pytest.raises(OfficialCheckpointError):
        read_official_checkpoint(str(copy))


def test_reads_from_s3(s3_server, monkeypatch, case_a):
    import pyarrow.fs as pafs

    from ttte2e.platform.data.storage import s3_options

    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    fs = pafs.S3FileSystem(**s3_options(), allow_bucket_creation=True)
    fs.create_dir("released")
    for path in CKPT.rglob("*"):
        if path.is_file():
            with fs.open_output_stream(
                f"released/tiny_a/{path.relative_to(CKPT)}", compression=None
            ) as f:
                f.write(path.read_bytes())
    data, _ = case_a
    arrays = read_official_checkpoint("s3://released/tiny_a")
    assert len(arrays) == 20
    assert all(np.array_equal(v, data[k]) for k, v in arrays.items())


def test_sharded_save_round_trip_and_bad_folders(tmp_path):
    model = TTTModel(preset("tiny"))
    model.save_pretrained(tmp_path / "one")
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    model.save_pretrained(tmp_path / "many", max_shard_bytes=1_000_000)
    shards = sorted((tmp_path / "many").glob("model-*.safetensors"))
    assert len(shards) > 3
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    for path in ("one", "many"):
        loaded = TTTModel.from_pretrained(tmp_path / path)
        for (name, a), (_, b) in zip(loaded.state_dict().items(), model.state_dict().items()):
            assert torch.equal(a, b), name
    # re-saving unsharded removes the old shards
    model.save_pretrained(tmp_path / "many")
    assert (
        not list((tmp_path / "many").glob("model-*"))
        and not (tmp_path / "many" / "model.safetensors.index.json").exists()
    )
    model.save_pretrained(tmp_path / "broken", max_shard_bytes=1_000_000)
    sorted((tmp_path / "broken").glob("model-*.safetensors"))[1].unlink()
    with pytest.raises(FileNotFoundError, match="shard .* is missing"):
        TTTModel.from_pretrained(tmp_path / "broken")
    config = json.loads((tmp_path / "one" / "config.json").read_text())
    (tmp_path / "one" / "config.json").write_text(json.dumps({**config, "mlp_hidden": 256}))
    with pytest.raises(ValueError, match="weights do not fit its config.json"):
        TTTModel.from_pretrained(tmp_path / "one")
