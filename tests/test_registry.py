"""The MLflow model registry: register (logged whole or by reference), aliases, pull back as
model + tokenizer, text generation, the pyfunc flavor, and bad input."""

import os
import shutil
import socket
import time

import pytest
import torch

from ttte2e.model import TTTModel


def same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_logged_and_referenced_versions_pull_back_the_model_and_tokenizer(model_folder, tmp_path):
    from ttte2e.platform.registry.model_registry import RegistryError, load_model, register

    source = tmp_path / "copy"
    shutil.copytree(model_folder, source)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logged = register(str(source), "tiny", uri, weights="logged")
    referenced = register(str(source), "tiny", uri, weights="reference", alias="")
    assert (logged["weights"], referenced["weights"]) == ("logged", "reference")
    assert (logged["version"], referenced["version"]) == (1, 2)
    assert logged["uri"] == "models:/tiny@candidate" and referenced["uri"] == "models:/tiny/2"
    # auto: logged up to the size limit, by reference above it
    assert register(str(source), "tiny", uri, max_logged_bytes=1)["weights"] == "reference"
    original = TTTModel.from_pretrained(source)
    for ref in ("models:/tiny@candidate", "models:/tiny/1", "models:/tiny/2"):
        model, tokenizer = load_model(ref, uri)
        assert same_weights(model, original) and not model.training, ref
        assert tokenizer.get_vocab_size() == 512
    shutil.rmtree(source)
    # the logged copy lives in MLflow's artifact store; the reference names what is gone
    assert same_weights(load_model("models:/tiny/1", uri).model, original)
    with pytest.raises(RegistryError, match=r"models:/tiny/2 points at .*copy, which is gone"):
        load_model("models:/tiny/2", uri)


def test_generation_from_a_pulled_model_matches_the_model_s_own_generate(model_folder):
    from ttte2e.platform.registry.model_registry import load_model
    from ttte2e.platform.registry.serving import TextGenerator

    model, tokenizer = load_model(str(model_folder))
    generate = TextGenerator(model, tokenizer)
    prompt = "def parse(text):"
    text = generate([prompt], max_new_tokens=6, temperature=0, repetition_penalty=1.1)[0]
    # the same sampling settings (the generator stops at BOS): an untrained model's logits are
    # near ties, so a different repetition penalty alone can pick other tokens
    ids = model.generate(
        [generate.encode(prompt)],
        max_new_tokens=6,
        temperature=0,
        repetition_penalty=1.1,
        stop_tokens=(model.config.bos_token_id,),
    )[0]
    assert generate.encode(prompt)[0] == model.config.bos_token_id
    assert text == tokenizer.decode([t for t in ids if t != model.config.bos_token_id])
    with pytest.raises(ValueError, match="no tokenizer attached"):
        TextGenerator(model, None)


def test_pyfunc_flavor_text_in_text_out_with_a_signature(model_folder, tmp_path, monkeypatch):
    import mlflow.pyfunc
    import pandas as pd

    from ttte2e.platform.registry.model_registry import load_model, register
    from ttte2e.platform.registry.serving import TextGenerator

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    register(str(model_folder), "tiny-pyfunc", uri, alias="champion", weights="reference")
    register(str(model_folder), "tiny-pyfunc", uri, alias="whole", weights="logged")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # what pyfunc users do; undone after the test
    expected = TextGenerator(*load_model(str(model_folder)))(
        ["import os", "class A:"], max_new_tokens=4, temperature=0
    )
    for alias in ("champion", "whole"):
        pyfunc = mlflow.pyfunc.load_model(f"models:/tiny-pyfunc@{alias}")
        signature = pyfunc.metadata.signature
        assert signature.inputs.input_names() == ["prompt"]
        assert signature.outputs.input_names() == ["text"]
        assert {p.name for p in signature.params} >= {"max_new_tokens", "temperature", "mode"}
        out = pyfunc.predict(
            pd.DataFrame({"prompt": ["import os", "class A:"]}),
            params={"max_new_tokens": 4, "temperature": 0.0},
        )
        assert list(out["text"]) == expected, alias


def test_cli_register_promote_list_and_pull(model_folder, tmp_path, capsys):
    from ttte2e.platform.cli.registry import pull_main, registry_main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = registry_main(
        ["register", str(model_folder), "--name", "tiny-cli", "--tracking-uri", uri]
    )
    second = registry_main(
        [
            "register",
            str(model_folder),
            "--name",
            "tiny-cli",
            "--weights",
            "reference",
            "--tracking-uri",
            uri,
        ]
    )
    assert (first["version"], second["version"]) == (1, 2)  # candidate moved to version 2
    promoted = registry_main(["promote", "tiny-cli", "1", "--tracking-uri", uri])
    assert promoted == dict(name="tiny-cli", alias="champion", version="1", previous=None)
    promoted = registry_main(["promote", "tiny-cli", "@candidate", "--tracking-uri", uri])
    assert (promoted["version"], promoted["previous"]) == ("2", "1")
    rows = registry_main(["list", "tiny-cli", "--tracking-uri", uri])
    assert [r["aliases"] for r in rows] == [[], ["candidate", "champion"]]
    capsys.readouterr()
    out = pull_main(
        [
            "models:/tiny-cli@champion",
            "--prompt",
            "def main(",
            "--max-new-tokens",
            "5",
            "--temperature",
            "0",
            "--tracking-uri",
            uri,
        ]
    )
    printed = capsys.readouterr().out
    assert "def main(" + out["texts"][0] in printed and "tokenizer attached" in printed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_input_is_one_clear_error(model_folder, tmp_path, capsys, monkeypatch):
    from ttte2e.platform.cli.registry import pull_main, registry_main
    from ttte2e.platform.registry.model_registry import (
        RegistryError,
        load_model,
        register,
        set_alias,
    )

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    register(str(model_folder), "tiny", uri, weights="reference")
    cases = {
        "models:/nothing@champion": r"no registered model 'nothing' .*\(registered: tiny\)",
        "models:/tiny@champion": r"no alias 'champion' \(aliases: candidate -> v1\)",
        "models:/tiny/7": r"no version 7 \(versions: \[1\]\)",
        "models:/tiny": r"expected models:/NAME/VERSION or models:/NAME@ALIAS",
    }
    assert "MLFLOW_TRACKING_URI" not in os.environ  # registering leaves the environment alone
    for ref, message in cases.items():
        with pytest.raises(RegistryError, match=message):
            load_model(ref, uri)
    with pytest.raises(RegistryError, match="does not exist"):
        register(str(tmp_path / "missing"), "tiny", uri)
    with pytest.raises(RegistryError, match="neither a model folder"):
        register(str(tmp_path), "tiny", uri)
    with pytest.raises(RegistryError, match="model name 'a b'"):
        register(str(model_folder), "a b", uri)
    with pytest.raises(RegistryError, match="no version 3"):
        set_alias("tiny", "3", "champion", uri)
    # a tracking server that is down: fails fast, naming it (MLflow alone retries for minutes)
    down = f"http://127.0.0.1:{free_port()}"
    started = time.time()
    with pytest.raises(RegistryError, match=f"tracking server {down} is unreachable"):
        load_model("models:/tiny@candidate", down)
    assert time.time() - started < 10
    # no registry named at all
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(RegistryError, match="no MLflow tracking URI"):
        load_model("models:/tiny@candidate")
    for argv, message in (
        (["promote", "tiny", "@nobody", "--tracking-uri", uri], "no alias 'nobody'"),
        (["list", "nothing", "--tracking-uri", uri], "no registered model 'nothing'"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            registry_main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pull_main(["models:/tiny@candidate", "--tracking-uri", down, "--prompt", "x"])
    assert "is unreachable" in capsys.readouterr().err
