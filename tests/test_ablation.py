"""Ablation sweeps (Ray Tune): grids, rejection before launch, interruption + resume, ASHA, and
MLflow (parent run per sweep, child run per trial) on a tracking server whose artifact store is S3.
"""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ttte2e.platform.train.config import ConfigError, TrainConfig
from ttte2e.platform.tune.sweep import paper_values, plan_sweep

from conftest import REPO, SMALL, mlflow_server

TINY = TrainConfig(preset="tiny", data="unused", steps=10)


def test_paper_grids_scale_to_the_preset():
    tiny = TINY.model_config()  # T 512, k 128, 4 blocks
    assert paper_values(tiny, "window") == [64, 128, 256, 512]
    assert paper_values(tiny, "chunk") == [16, 32, 64, 128]
    assert paper_values(tiny, "layers") == [1, 2, 3, 4]
    m760 = TrainConfig(preset="760M").model_config()  # the paper's own grids
    assert paper_values(m760, "window") == [1024, 2048, 4096, 8192]
    assert paper_values(m760, "chunk") == [1024, 2048, 4096, 8192]
    assert paper_values(m760, "layers") == [1, 3, 6, 12]


def test_the_full_plan_shares_trials_between_knobs_and_has_swa_baselines():
    plan = plan_sweep(TINY, ["window", "chunk", "layers"])
    names = [t.name for t in plan.trials]
    assert len(names) == len(set(names)) == 14  # 4 TTT + 4 SWA over k; 3 new b; 3 new layer counts
    assert [t.name for t in plan.by_knob["window"] if t.method == "swa"] == [
        "swa-k64",
        "swa-k128",
        "swa-k256",
        "swa-k512",
    ]
    # b and the layer count do not change SWA: one baseline at the base k, shared
    for knob in ("chunk", "layers"):
        assert [t.name for t in plan.by_knob[knob] if t.method == "swa"] == ["swa-k128"]
    base = "ttt-k128-b64-l1"
    assert all(base in [t.name for t in plan.by_knob[k]] for k in ("window", "chunk", "layers"))
    swa = next(t for t in plan.trials if t.method == "swa")
    assert swa.model_overrides()["inner_lr"] == 0.0
    assert not plan.rejected


def test_invalid_combinations_are_rejected_before_launch_with_the_reason():
    plan = plan_sweep(TINY, ["chunk"], {"chunk": [32, 96, 256]})
    assert [t.name for t in plan.trials] == ["ttt-k128-b32-l1", "swa-k128"]
    reasons = dict(plan.rejected)
    assert "b=256 > k=128" in reasons["chunk=256 (ttt-k128-b256-l1)"]
    assert "not a multiple" in reasons["chunk=96 (ttt-k128-b96-l1)"]
    with pytest.raises(
        ConfigError,
        match=r"no valid trial in this sweep: chunk=256 .*b=256 > "
        r"k=128.*chunk=512",
    ):
        plan_sweep(TINY, ["chunk"], {"chunk": [256, 512]})
    with pytest.raises(ConfigError, match="unknown grid 'heads'"):
        plan_sweep(TINY, ["heads"])
    with pytest.raises(ConfigError, match="n_ttt_blocks must be in"):
        plan_sweep(TINY, ["layers"], {"layers": [9]})


def test_cli_bad_input_exits_2_before_anything_starts(capsys):
    from ttte2e.platform.cli.sweep import main

    for argv, message in (
        (["--grid", "window,chunk", "--values", "64"], "--values goes with a single --grid"),
        (["--grid", "chunk", "--values", "256,512"], "no valid trial in this sweep"),
        (["--grid", "chunk", "--values", "a,b"], "comma-separated integers"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main("ablate", argv=["--preset", "tiny", "--data", "nowhere", *argv])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_one_worker_trials_train_in_the_trial_and_reserve_the_run():
    from ttte2e.platform.tune.sweep import runs_in_trial, trial_resources

    one, two = TINY, TrainConfig(preset="tiny", data="unused", steps=10, workers=2)
    assert runs_in_trial(one) and not runs_in_trial(two) and not runs_in_trial(one, False)
    # the CPUs a one-worker run reserves with its Ray Data readers: as many trials at once
    assert trial_resources(one, {"CPU": 2}) == {"CPU": 0.75}
    assert trial_resources(one, {"CPU": 8, "GPU": 2}) == {"CPU": 0.75, "GPU": 1}
    cpu_only = TrainConfig(preset="tiny", data="unused", steps=10, device="cpu")
    assert trial_resources(cpu_only, {"CPU": 8, "GPU": 2}) == {"CPU": 0.75}
    assert trial_resources(two, {"CPU": 8}) == trial_resources(one, {"CPU": 8}, False)
    assert trial_resources(two, {"CPU": 8}) == {"CPU": 0.01}  # its workers reserve their own


def test_a_trial_in_its_own_process_restarts_as_a_worker_group_would():
    """Failures restart the run (it continues from its last checkpoint) up to --max-failures;
    errors no restart can fix end the trial at once."""
    from ttte2e.platform.data.manifest import DataError
    from ttte2e.platform.tune.sweep import fit_with_restarts

    def failing(errors):
        calls = []

        def run():
            calls.append(1)
            if len(calls) <= len(errors):
                raise errors[len(calls) - 1]
            return "done"

        return run, calls

    run, calls = failing([OSError("storage hiccup"), RuntimeError("worker died")])
    assert fit_with_restarts(TINY, run) == "done" and len(calls) == 3
    run, calls = failing([OSError("down")] * 5)
    with pytest.raises(OSError):
        fit_with_restarts(TrainConfig(preset="tiny", data="unused", max_failures=2), run)
    assert len(calls) == 3  # the first try and 2 restarts
    for fatal in (ConfigError("bad setting"), DataError("damaged shard")):
        run, calls = failing([fatal])
        with pytest.raises(type(fatal)):
            fit_with_restarts(TINY, run)
        assert len(calls) == 1
    run, calls = failing([OSError("down")] * 7)
    assert fit_with_restarts(TrainConfig(preset="tiny", data="unused", max_failures=-1), run)
    assert len(calls) == 8


# ---- real sweeps (subprocesses joining the session's private Ray head) ---------------------------
def sweep_command(data: str, storage: Path, name: str, *extra: str) -> list[str]:
    model = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    return [
        sys.executable,
        str(REPO / "pipelines" / "ablate.py"),
        "--preset",
        "tiny",
        *model,
        "--data",
        data,
        "--storage",
        str(storage),
        "--name",
        name,
        "--workers",
        "1",
        "--batch-tokens",
        "256",
        "--eval-windows",
        "2",
        "--lr",
        "3e-3",
        *extra,
    ]


def env_with(head, **extra) -> dict:
    """The environment of a sweep subprocess: it joins the session's Ray head (RAY_ADDRESS)."""
    return {
        **os.environ,
        "RAY_ADDRESS": head.gcs_address,
        "RAY_USAGE_STATS_ENABLED": "0",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        **extra,
    }


def read_table(path: Path) -> dict:
    with open(path) as f:
        return {(r["knob"], r["method"], r["value"]): r for r in csv.DictReader(f)}


def sweep_lines(out: str) -> str:
    """The sweep's own log lines and the table (the trials' progress bars drown them)."""
    return "\n".join(
        line
        for line in out.splitlines()
        if line.startswith(("[sweep]", "|", "Traceback", "error")) or "Error" in line
    )


@pytest.mark.slow
def test_interrupted_sweep_resumes_and_writes_table_plot_and_mlflow_runs(
    train_data, tmp_path, ray_head
):
    """Ctrl-C while the first trial trains, then the same command: finished work is kept, the
    interrupted trial continues from its checkpoint, the others run; then the table (CSV + MD),
    the plot and the MLflow parent/child runs are all there. Then a sweep stopped after a trial's
    final checkpoint but before Tune saw its last report: its rerun finds the training run
    finished, trains nothing, and reports the final step again (the table says complete, not
    unfinished at an older step; the MLflow runs end FINISHED)."""
    import shutil

    from mlflow.tracking import MlflowClient

    data, _ = train_data
    cmd = sweep_command(
        data,
        tmp_path,
        "sweep",
        "--grid",
        "chunk",
        "--values",
        "8,16",
        "--steps",
        "6",
        "--eval-every",
        "2",
        "--checkpoint-every",
        "2",
        "--max-concurrent",
        "1",
    )
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(
        cmd, env=env_with(ray_head), stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path
    )
    checkpoint = None
    deadline = time.time() + 300
    while checkpoint is None and time.time() < deadline and first.poll() is None:
        checkpoint = next(iter((tmp_path / "sweep" / "runs").glob("*/checkpoint_00000002")), None)
        time.sleep(0.5)
    assert checkpoint is not None, (tmp_path / "first.log").read_text()[-3000:]
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=180) == 130, sweep_lines((tmp_path / "first.log").read_text())
    log.close()
    assert "INTERRUPTED" in (tmp_path / "first.log").read_text()

    second = subprocess.run(
        cmd, env=env_with(ray_head), capture_output=True, text=True, cwd=tmp_path, timeout=600
    )
    out = second.stdout + second.stderr
    (tmp_path / "second.log").write_text(out)
    assert second.returncode == 0, sweep_lines(out)
    assert "resuming" in out and "resumed at step" in out
    table = read_table(tmp_path / "sweep" / "ablation.csv")
    assert set(table) == {("chunk", "ttt", "8"), ("chunk", "ttt", "16"), ("chunk", "swa", "16")}
    for row in table.values():
        assert row["status"] == "complete" and row["step"] == "6", row
        assert float(row["val_loss"]) > 0 and float(row["val_loss_beyond_window"]) > 0
    assert "| 8 | TTT-E2E | 32 | 8 |" in (tmp_path / "sweep" / "ablation.md").read_text()
    assert (tmp_path / "sweep" / "ablation_chunk.png").stat().st_size > 10_000

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ttte2e").experiment_id])
    parent = next(r for r in runs if r.info.run_name == "sweep")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == [
        "sweep-swa-k32",
        "sweep-ttt-k32-b16-l1",
        "sweep-ttt-k32-b8-l1",
    ]
    statuses = {
        r.info.run_name: (r.info.status, r.data.tags.get("stopped")) for r in children + [parent]
    }
    assert all(status == "FINISHED" for status, _ in statuses.values()), (
        statuses,
        sweep_lines(out),
    )
    assert children[0].data.params["train.steps"] == "6"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "ablation.csv",
        "ablation.md",
        "ablation_chunk.png",
    }
    history = client.get_metric_history(children[0].info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 7))

    # one-worker trials train in the trial's process: no Ray Train worker group, whose own
    # record of the run's checkpoints would be in the run folder
    assert not list((tmp_path / "sweep" / "runs").glob("*/checkpoint_manager_snapshot.json"))
    # Tune forgets the trial; its training run stays: the run's complete checkpoints decide
    shutil.rmtree(tmp_path / "sweep" / "tune")
    again = subprocess.run(
        [
            *cmd[: cmd.index("--values") + 1],
            "8",
            *cmd[cmd.index("--values") + 2 :],
            "--no-baseline",
        ],
        env=env_with(ray_head),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    out = again.stdout + again.stderr
    assert again.returncode == 0, sweep_lines(out)
    assert "resumed at step 6" in out
    row = read_table(tmp_path / "sweep" / "ablation.csv")[("chunk", "ttt", "8")]
    assert row["status"] == "complete" and row["step"] == "6", row
    runs = client.search_runs([client.get_experiment_by_name("ttte2e").experiment_id])
    statuses = {r.info.run_name: r.info.status for r in runs}
    assert statuses["sweep"] == statuses["sweep-ttt-k32-b8-l1"] == "FINISHED", statuses


def s3_filesystem(s3_env: dict):
    import pyarrow.fs as pafs

    from ttte2e.platform.data.storage import s3_options

    saved = {k: os.environ.get(k) for k in s3_env}
    os.environ.update(s3_env)
    try:
        return pafs.S3FileSystem(**s3_options(), allow_bucket_creation=True)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value


@pytest.fixture
def mlflow_server_on_s3(s3_server, tmp_path):
    """An MLflow tracking server on 127.0.0.1 whose artifact store is a bucket of the SeaweedFS
    S3 server (artifacts proxied: clients need no S3 credentials). Stopped at the end."""
    s3_filesystem(s3_server).create_dir("mlflow")
    env = {
        **os.environ,
        **s3_server,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_S3_ENDPOINT_URL": s3_server["TTTE2E_S3_ENDPOINT"],
    }
    with mlflow_server(tmp_path, env, "s3://mlflow/artifacts") as uri:
        yield uri, s3_server


@pytest.mark.slow
def test_asha_sweep_tracked_on_a_server_with_s3_artifacts_then_register_and_pull(
    train_data, tmp_path, mlflow_server_on_s3, ray_head
):
    """ASHA stops trailing trials (their workers are freed: later trials still start); the sweep's
    table/plot and each trial's curves land in the S3 bucket through the tracking server; the best
    trial is registered (weights logged into S3) and pulled back through the server."""
    import pyarrow.fs as pafs
    import torch
    from mlflow.tracking import MlflowClient

    from ttte2e.model import TTTModel
    from ttte2e.platform.registry.model_registry import load_model, register

    uri, s3_env = mlflow_server_on_s3
    data, _ = train_data
    cmd = sweep_command(
        data,
        tmp_path,
        "asha",
        "--grid",
        "chunk",
        "--values",
        "4,8,16,32",
        "--no-baseline",
        "--steps",
        "8",
        "--eval-every",
        "2",
        "--checkpoint-every",
        "2",
        "--scheduler",
        "asha",
        "--grace-steps",
        "2",
        "--max-concurrent",
        "1",
        "--tracking-uri",
        uri,
    )
    done = subprocess.run(
        cmd, env=env_with(ray_head), capture_output=True, text=True, cwd=tmp_path, timeout=900
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    table = read_table(tmp_path / "asha" / "ablation.csv")
    statuses = [r["status"] for r in table.values()]
    assert len(statuses) == 4 and all(
        s == "complete" or s.startswith("stopped early") for s in statuses
    ), statuses
    assert any(s.startswith("stopped early") for s in statuses), statuses
    assert any(s == "complete" for s in statuses), statuses

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ttte2e").experiment_id])
    parent = next(r for r in runs if r.info.run_name == "asha")
    children = {
        r.info.run_name: r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert len(children) == 4
    for row in table.values():
        expected = "FINISHED" if row["status"] == "complete" else "KILLED"
        assert children[row["run"]].info.status == expected, row
    s3 = s3_filesystem(s3_env)
    stored = [
        f.path for f in s3.get_file_info(pafs.FileSelector("mlflow/artifacts", recursive=True))
    ]
    assert any(p.endswith(f"{parent.info.run_id}/artifacts/ablation_chunk.png") for p in stored)
    assert any(p.endswith(f"{parent.info.run_id}/artifacts/ablation.csv") for p in stored)
    finished = next(r for r in table.values() if r["status"] == "complete")
    run_id = children[finished["run"]].info.run_id
    assert any(p.endswith(f"{run_id}/artifacts/curves.png") for p in stored)

    # the registry on the same server: weights logged whole go to S3 and come back
    checkpoint = sorted((tmp_path / "asha" / "runs" / finished["run"]).glob("checkpoint_0*"))[-1]
    reg = register(str(checkpoint), "asha-best", uri, weights="logged")
    stored = [
        f.path for f in s3.get_file_info(pafs.FileSelector("mlflow/artifacts", recursive=True))
    ]
    assert any(p.endswith("artifacts/weights/model.safetensors") for p in stored)
    pulled, tokenizer = load_model(reg["uri"], uri)
    trained = TTTModel.from_pretrained(checkpoint / "model")
    assert all(
        torch.equal(a, b)
        for a, b in zip(pulled.state_dict().values(), trained.state_dict().values())
    )
    assert tokenizer is not None
