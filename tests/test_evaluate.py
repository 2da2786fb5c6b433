"""pipelines/evaluate.py: loss vs context for TTT-E2E and the baselines, S-NIAH, model loading
from folders, checkpoints and the MLflow registry, and its errors."""

import pytest
import torch


def test_loss_vs_context_and_niah_report(train_data, model_folder, tmp_path):
    from ttte2e.platform.cli.evaluate import main

    uri, _ = train_data
    out = main(
        [
            "--model",
            str(model_folder),
            "--data",
            uri,
            "--contexts",
            "128,256",
            "--windows",
            "2",
            "--niah",
            "--niah-depths",
            "0,0.5",
            "--niah-trials",
            "1",
            "--out",
            str(tmp_path / "eval"),
        ]
    )
    results = out["results"]
    assert set(results) == {128, 256} and set(results[128]) == {"ttt", "swa", "full"}
    for r in results[128].values():
        assert len(r["bins"]) == 16 and r["beyond_window"] is not None and 0 < r["loss"] < 20
    # same weights: SWA and full attention agree inside the first window, TTT-E2E differs after
    assert results[128]["swa"]["bins"][0][2] == pytest.approx(
        results[128]["full"]["bins"][0][2], abs=1e-4
    )
    assert abs(results[256]["ttt"]["beyond_window"] - results[256]["swa"]["beyond_window"]) > 1e-4
    assert set(out["niah"]) == {(128, 0.0), (128, 0.5), (256, 0.0), (256, 0.5)}
    assert (tmp_path / "eval" / "loss_vs_context.png").stat().st_size > 10_000
    assert "S-NIAH" in (tmp_path / "eval" / "report.md").read_text()


def test_models_uri_from_the_registry_and_bad_input(train_data, model_folder, tmp_path, capsys):
    from ttte2e.platform.cli.evaluate import main
    from ttte2e.platform.eval.long_context import load_model
    from ttte2e.platform.registry.model_registry import register

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    version = register(str(model_folder), "tiny-eval", uri, alias="champion", weights="reference")[
        "version"
    ]
    a = load_model("models:/tiny-eval@champion", uri)
    b = load_model(f"models:/tiny-eval/{version}", uri)
    c = load_model(str(model_folder))
    assert torch.equal(a.embed.weight, b.embed.weight) and torch.equal(
        a.embed.weight, c.embed.weight
    )
    with pytest.raises(ValueError, match="no alias 'nobody'"):
        load_model("models:/tiny-eval@nobody", uri)
    with pytest.raises(ValueError, match="expected models:/NAME/VERSION"):
        load_model("models:/tiny-eval", uri)
    with pytest.raises(ValueError, match="neither a model folder"):
        load_model(str(tmp_path))
    data, _ = train_data
    with pytest.raises(SystemExit):
        main(
            [
                "--model",
                str(model_folder),
                "--data",
                data,
                "--modes",
                "ttt,beam",
                "--out",
                str(tmp_path / "e"),
            ]
        )
    assert "unknown modes" in capsys.readouterr().err


def test_niah_scoring_passes_an_oracle_and_fails_a_guesser(
    train_data, model_folder, tmp_path, monkeypatch
):
    """The harness itself: a model that reads the needle scores 1, one that does not scores 0."""
    import re

    from tokenizers import Tokenizer

    from ttte2e.platform.data.manifest import read_manifest
    from ttte2e.platform.eval import long_context as evaluate

    uri, _ = train_data
    tok_path = f"{uri}/{read_manifest(uri)['tokenizer']['file']}"
    tok = Tokenizer.from_file(tok_path)
    model = evaluate.load_model(str(model_folder))

    def oracle(model, prompts, max_new_tokens, mode):
        number = re.findall(r"is: (\d{7})\.", tok.decode(prompts[0]))[0]
        return [tok.encode(" " + number).ids]

    monkeypatch.setattr(evaluate, "generate", oracle)
    scores = evaluate.niah(model, tok_path, uri, [256], [0.0, 0.5, 1.0], trials=2)
    assert set(scores.values()) == {1.0}
    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: [tok.encode(" 1234").ids])
    scores = evaluate.niah(model, tok_path, uri, [256], [0.0, 0.5, 1.0], trials=2)
    assert set(scores.values()) == {0.0}
