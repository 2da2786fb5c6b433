"""The demo job's pieces: packing, schedule, and a short real run end to end."""

import json
import math

import pytest

from ttte2e.platform.demo_corpus import stdlib_documents, write_demo_corpus
from ttte2e.platform.local_train import LocalTrainConfig, lr_factor, parse_args, train


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    peak, floor = 1e-3, 1e-5
    values = [lr_factor(s, 100, 10, peak, floor) * peak for s in range(101)]
    assert values[0] == pytest.approx(peak / 10) and values[9] == pytest.approx(peak)
    assert all(a >= b for a, b in zip(values[9:], values[10:]))
    assert values[100] == pytest.approx(floor)


def test_stdlib_corpus_has_documents():
    docs = stdlib_documents(max_docs=20)
    assert len(docs) == 20 and all(len(text) > 200 for _, text in docs)


def test_cli_rejects_unknown_presets(tmp_path):
    with pytest.raises(ValueError, match="unknown preset"):
        train(LocalTrainConfig(preset="7B", out_dir=str(tmp_path)))
    assert parse_args(["--steps", "7"]).steps == 7
    assert parse_args(["--no-ray"]).ray is False and parse_args([]).ray is True


def test_demo_corpus_is_jsonl_documents(tmp_path):
    folder = write_demo_corpus(tmp_path / "raw", max_docs=12, files=3)
    lines = [json.loads(line) for f in sorted(folder.glob("*.jsonl")) for line in open(f)]
    assert len(lines) == 12 and all(len(x["text"]) > 200 for x in lines)


@pytest.mark.slow
def test_short_demo_run_writes_checkpoint_plot_and_mlflow_run(tmp_path):
    import mlflow
    import torch

    from ttte2e.model import TTTModel

    cfg = LocalTrainConfig(steps=3, eval_every=3, eval_windows=2, max_docs=300, ray=False,
                           out_dir=str(tmp_path / "run"))
    result = train(cfg)
    model = TTTModel.from_pretrained(result["checkpoint"])
    assert model.config.n_ttt_blocks == 1
    assert (tmp_path / "run" / "curves.png").stat().st_size > 10_000
    assert len(result["history"]) == 3 and all(math.isfinite(h["loss"]) for h in result["history"])
    assert result["history"][0]["eta"] == pytest.approx(0.1)  # inner lr ramp starts at 0.1x
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    run = mlflow.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert "val_loss_ttt" in run.data.metrics and run.data.params["model.n_layers"] == "4"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(result["run_id"])}
    assert {"curves.png", "metrics.json", "model"} <= artifacts
    state = torch.load(tmp_path / "run" / "checkpoint" / "optimizer.pt", weights_only=False)
    assert "optimizer" in state and "scheduler" in state
    trainer_state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert trainer_state["stream_position"] == {"epoch": 0, "step": 3}


def test_books_stand_in_is_long_documents(tmp_path):
    from ttte2e.platform.demo_corpus import write_demo_books

    folder = write_demo_books(tmp_path / "books", max_books=3)
    books = sorted(folder.glob("*.txt"))
    assert len(books) == 3 and all(b.stat().st_size >= 200_000 for b in books)
