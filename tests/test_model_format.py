"""The model folder's documented format (docs/model_format.md, docs/model_config.schema.json):
config.json versioned and validated against the schema, and a reader that uses only safetensors
+ torch and the documented key names (docs/load_model_folder.py, in a fresh process that cannot
import ttte2e) computes the same logits as TTTModel."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ttte2e.model import TTTConfig, TTTModel, preset
from ttte2e.model.model_folder import RUN_SETTINGS

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "docs" / "model_config.schema.json").read_text())


def test_config_json_is_versioned_and_matches_the_schema(tmp_path):
    import jsonschema

    TTTModel(preset("tiny", compile=True)).save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["format"] == "ttte2e-model" and config["format_version"] == 1
    jsonschema.validate(config, SCHEMA)
    # the schema names every field the config writes, and nothing else; how a process runs the
    # model (compile) is not written, and a loaded folder runs eager
    fields = {f.name for f in dataclasses.fields(TTTConfig)} - set(RUN_SETTINGS)
    assert "compile" not in config
    assert TTTModel.from_pretrained(tmp_path / "m").config.compile is False
    assert set(SCHEMA["properties"]) == fields | {"format", "format_version"}
    bad = dict(config, window="64")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCHEMA)


def test_format_version_is_checked_and_old_folders_still_load(tmp_path):
    model = TTTModel(preset("tiny"))
    model.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "format_version": 2}))
    with pytest.raises(ValueError, match="format_version 2; this ttte2e reads versions 1 to 1"):
        TTTModel.from_pretrained(tmp_path / "m")
    path.write_text(json.dumps({**config, "format": "something-else"}))
    with pytest.raises(ValueError, match="not a TTT-E2E model folder"):
        TTTModel.from_pretrained(tmp_path / "m")
    # written before the stamp existed: same layout, read as version 1
    path.write_text(
        json.dumps({k: v for k, v in config.items() if k not in ("format", "format_version")})
    )
    loaded = TTTModel.from_pretrained(tmp_path / "m")
    assert torch.equal(loaded.embed.weight, model.embed.weight)


READER = """
import sys
sys.modules["ttte2e"] = None  # any import of our package fails here
sys.path.insert(0, {docs!r})
import torch
from load_model_folder import plain_pass, read_folder
config, weights = read_folder({folder!r})
tokens = torch.load({tokens!r})
torch.save(plain_pass(config, weights, tokens), {out!r})
print(sorted(m for m, mod in sys.modules.items() if mod is not None
             and m.split(".")[0] in ("ttte2e", "model", "kernels")))
"""


@pytest.mark.parametrize(
    "attention,shard", [("sliding", False), ("sliding", True), ("full", False)]
)
def test_a_reader_without_ttte2e_gets_the_same_logits(tmp_path, attention, shard):
    torch.manual_seed(0)
    config = preset(
        "tiny",
        vocab_size=300,
        d_model=64,
        n_layers=4,
        n_heads=2,
        mlp_hidden=96,
        seq_len=64,
        window=16,
        chunk_size=8,
        attention=attention,
    )
    model = TTTModel(config)
    with torch.no_grad():  # norm gains away from 1, so a mixed-up norm cannot pass
        for p in model.parameters():
            if p.dim() == 1:
                p.mul_(torch.rand_like(p) + 0.5)
    folder = tmp_path / "m"
    model.save_pretrained(folder, max_shard_bytes=50_000 if shard else 5 << 30)
    assert (folder / "model.safetensors.index.json").is_file() == shard
    tokens = torch.randint(0, 300, (2, 40))
    torch.save(tokens, tmp_path / "tokens.pt")
    script = READER.format(
        docs=str(ROOT / "docs"),
        folder=str(folder),
        tokens=str(tmp_path / "tokens.pt"),
        out=str(tmp_path / "logits.pt"),
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "[]"  # nothing of ours was imported
    theirs = torch.load(tmp_path / "logits.pt")
    with torch.no_grad():
        ours = model(tokens)
    assert torch.allclose(theirs, ours, atol=1e-4, rtol=1e-4), (theirs - ours).abs().max()
