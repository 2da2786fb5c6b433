"""The demo job's pieces: packing, schedule, and a short real run end to end."""

import math

import numpy as np
import pytest

from ttte2e.platform.demo_corpus import pack_windows, stdlib_documents
from ttte2e.platform.local_train import LocalTrainConfig, lr_factor, parse_args, train


def test_windows_make_every_token_a_target_exactly_once():
    tokens = np.arange(1001, dtype=np.int32)
    windows = pack_windows(tokens, 64)
    assert windows.shape == (15, 65)
    targets = windows[:, 1:].reshape(-1)
    assert np.array_equal(targets, np.arange(1, 1 + 15 * 64))  # contiguous, no gap, no repeat
    assert np.array_equal(windows[1:, 0], windows[:-1, -1])    # window i+1 starts where i ends
    with pytest.raises(ValueError, match="cannot fill one window"):
        pack_windows(tokens[:10], 64)
    with pytest.raises(ValueError, match="cannot fill one window"):
        pack_windows(tokens[:0], 64)


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


@pytest.mark.slow
def test_short_demo_run_writes_checkpoint_plot_and_mlflow_run(tmp_path):
    import mlflow
    import torch

    from ttte2e.model import TTTModel

    cfg = LocalTrainConfig(steps=3, eval_every=3, eval_windows=2, max_docs=150,
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
