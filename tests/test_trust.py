"""Trust: bad settings refused before launch, resume refuses another run, checkpoints complete
only with their marker (every reader refuses an incomplete one), no secret in anything written or
printed, reading commands never invent an empty MLflow store."""

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ttte2e.platform.train import checkpoint as ckpt
from ttte2e.platform.train.config import ConfigError, TrainConfig, batch_geometry, check_options

from conftest import REPO, SMALL, mlflow_server, small_config


# ---- 7. every bad setting: one error line, exit 2, before any worker ---------------------------
@pytest.mark.parametrize(
    "flags, message",
    [
        ([], "no manifest.json"),  # the data folder holds no prepared dataset
        (["--window", "32", "--chunk-size", "64"], "chunk_size=64 > window=32"),
        (["--seq-len", "500"], "seq_len=500 is not a multiple"),
        (["--n-ttt-blocks", "9"], "n_ttt_blocks must be in"),
        (["--inner-lr", "-1"], "inner_lr must be >= 0"),
        (["--inner-lr", "nan"], "not a finite number"),
        (["--lr", "nan"], "lr = nan: not a finite number"),
        (["--lr", "inf"], "lr = inf: not a finite number"),
        (["--min-lr", "-1"], "min_lr must be >= 0"),
        (["--weight-decay", "-1"], "weight_decay must be >= 0"),
        (["--steps", "-5"], r"steps must be >= 0, got -5 \(0 = tokens / batch_tokens\)"),
        (["--eval-every", "-1"], "eval_every must be >= 0"),
        (["--stop-after", "-1"], "stop_after must be >= 0"),
        (["--name", "../escape"], "name '../escape': a plain name"),
        (["--name", "a/b"], "a plain name"),
        (["--max-failures", "-2"], "max_failures must be >= 0, or -1"),
        (["--plan", "--gpu", "b200"], "--gpu 'b200': unknown GPU"),
        (["--plan", "--nodes", "0"], "--nodes 0"),
        (["--ttt-fraction", "0.5", "--n-ttt-blocks", "1"], "disagrees with ttt_fraction"),
    ],
)
def test_bad_settings_are_one_error_line_before_anything_starts(flags, message, capsys, tmp_path):
    import ray

    from ttte2e.platform.cli.train import run_main

    with pytest.raises(SystemExit) as code:
        run_main(
            "t",
            argv=[
                "--preset",
                "tiny",
                "--data",
                str(tmp_path),
                "--steps",
                "1",
                "--batch-tokens",
                "512",
                *flags,
            ],
        )
    err = capsys.readouterr().err.strip().splitlines()
    assert code.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert len(__import__("re").findall(message, err[0])) == 1, err[0]
    assert not ray.is_initialized()


# the same kind of mistakes given as a TrainConfig in code (sweeps, notebooks): check_options
@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(preset="7B"), "unknown preset"),
        (dict(zero_stage=3), "ZeRO stage 3"),
        (dict(batch_tokens=1000), "not a positive multiple of seq_len"),
        (dict(batch_tokens=3 * 512, workers=2), "do not split"),
        (dict(tokens=100), "less than one batch"),
        (dict(precision="fp8"), "precision"),
        (dict(resume_from="a", init_from="b"), "exclusive"),
        (dict(model_overrides={"windw": 3}), "windw"),
        # tensor parallelism and offload (tiny: 4 heads, MLP 512, vocab 4096)
        (dict(tensor_parallel=3, workers=3, batch_tokens=3 * 512), "does not divide n_heads=4"),
        (
            dict(
                tensor_parallel=8,
                workers=8,
                batch_tokens=8 * 512,
                model_overrides={"n_heads": 8, "d_model": 256, "mlp_hidden": 516},
            ),
            "does not divide mlp_hidden=516",
        ),
        (
            dict(tensor_parallel=2, workers=2, model_overrides={"vocab_size": 4097}),
            "does not divide vocab_size=4097",
        ),
        (dict(tensor_parallel=2, workers=3, batch_tokens=3 * 512), "does not divide --workers 3"),
        (dict(tensor_parallel=2, workers=2, zero_stage=3), "tensor parallelism already splits"),
        (dict(tensor_parallel=2, workers=2, placement="SPREAD"), "within one node"),
        (dict(tensor_parallel="auto", workers=2), "a --plan choice"),
        (dict(offload="disk"), "--offload 'disk'"),
        (dict(offload="prefix"), "needs --checkpoint-prefix True"),
        (dict(offload="carries", model_overrides={"remat": "none"}), "keeps no carries"),
    ],
)
def test_bad_options_are_refused_before_any_worker(changes, message):
    with pytest.raises(ConfigError, match=message):
        check_options(TrainConfig(**{**dict(preset="tiny", batch_tokens=2048), **changes}))


def test_ttt_fraction_is_a_flag():
    from ttte2e.platform.cli.train import parse

    cfg, _ = parse(["--preset", "tiny", "--n-layers", "8", "--ttt-fraction", "0.5"], "t")
    assert cfg.model_config().n_ttt_blocks == 4


def test_tracking_server_is_checked_before_ray_starts(train_data, tmp_path):
    import ray

    from ttte2e.platform.train.driver import fit

    cfg = small_config(train_data, tmp_path, tracking_uri="http://127.0.0.1:9")
    with pytest.raises(ConfigError, match="127.0.0.1:9 is unreachable"):
        fit(cfg)
    assert not ray.is_initialized()


# ---- 3 + 5. checkpoints: complete only with the marker; resume only the same run ---------------
def fake_checkpoint(
    root: Path, cfg: TrainConfig, model_folder: Path, step: int = 4, data_key: str | None = None
) -> Path:
    """A checkpoint folder as the trainer writes it (model/, ds/, trainer_state.json with the
    run identity, COMPLETE.json last), without training."""
    from ttte2e.platform.data.manifest import read_manifest

    model_cfg, geometry = check_options(cfg)
    folder = root / cfg.name / ckpt.dir_name(step)
    shutil.copytree(model_folder, folder / "model")
    (folder / "ds").mkdir()
    (folder / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 100)
    identity = ckpt.run_identity(
        cfg.to_dict(),
        dataclasses.asdict(geometry),
        data_key or read_manifest(cfg.data)["dataset_key"],
    )
    (folder / ckpt.STATE_FILE).write_text(
        json.dumps(
            dict(
                step=step,
                position=dict(epoch=0, step=step),
                history=[],
                evals=[],
                world_size=cfg.workers,
                train=cfg.to_dict(),
                identity=identity,
            )
        )
    )
    ckpt.write_complete(ckpt.resolve(str(folder)), ckpt.file_list(folder), step)
    return folder


@pytest.fixture
def run_cfg(train_data, tmp_path):
    return small_config(train_data, tmp_path / "runs", name="run")


@pytest.mark.parametrize(
    "changes, fields",
    [
        (dict(batch_tokens=8 * 128), ["batch_tokens", "sequences"]),
        (dict(seed=1), ["seed"]),
        (dict(steps=20), ["steps"]),
        (dict(workers=1), ["workers"]),
        (dict(model_overrides=dict(SMALL, seq_len=64, window=32, chunk_size=16)), ["seq_len"]),
        (dict(lr=1e-3), ["lr"]),
    ],
)
def test_resume_of_another_run_is_refused_before_workers_start(
    run_cfg, model_folder, changes, fields
):
    import ray

    from ttte2e.platform.train.driver import fit

    bos = run_cfg.model_overrides["bos_token_id"]
    if "model_overrides" in changes:
        changes["model_overrides"]["bos_token_id"] = bos
    fake_checkpoint(Path(run_cfg.storage), run_cfg, model_folder)
    with pytest.raises(ConfigError, match="cannot resume .* with a different run") as err:
        fit(dataclasses.replace(run_cfg, **changes))
    for name in fields:
        assert f"{name} (checkpoint" in str(err.value)
    assert not ray.is_initialized()
    # --resume-from the same checkpoint into another run name: the same check
    source = str(Path(run_cfg.storage) / "run" / ckpt.dir_name(4))
    with pytest.raises(ConfigError, match="with a different run"):
        fit(
            dataclasses.replace(run_cfg, name="other", resume_from=source, **changes),
        )


def test_another_dataset_is_refused_and_extend_steps_is_explicit(run_cfg, model_folder):
    from ttte2e.platform.train.driver import check_resume

    model_cfg, geometry = check_options(run_cfg)
    folder = fake_checkpoint(Path(run_cfg.storage), run_cfg, model_folder, data_key="other")
    longer = dataclasses.replace(run_cfg, steps=20)
    identity = ckpt.run_identity(
        longer.to_dict(), dataclasses.asdict(batch_geometry(longer, model_cfg)), "other"
    )
    assert ckpt.resume_source(longer.storage, "run") == ckpt.resolve(str(folder)).uri
    with pytest.raises(ConfigError, match=r"steps \(checkpoint 10, now 20\).*--extend-steps"):
        check_resume(str(folder), identity, longer)
    assert check_resume(str(folder), identity, dataclasses.replace(longer, extend_steps=True))
    with pytest.raises(ConfigError, match="data_key"):
        check_resume(
            str(folder),
            dict(identity, data_key="new"),
            dataclasses.replace(longer, extend_steps=True),
        )


@pytest.mark.parametrize("damage", ["marker", "truncated", "flipped", "missing"])
def test_incomplete_checkpoints_are_refused_by_every_reader(
    run_cfg, model_folder, damage, tmp_path, capsys, caplog
):
    from ttte2e.platform.cli.registry import pull_main
    from ttte2e.platform.registry.model_registry import RegistryError, load_model, register
    from ttte2e.platform.train.driver import check_init_from, fit

    older = fake_checkpoint(Path(run_cfg.storage), run_cfg, model_folder, step=2)
    folder = fake_checkpoint(Path(run_cfg.storage), run_cfg, model_folder, step=4)
    weights = folder / "model" / "model.safetensors"
    if damage == "marker":
        (folder / ckpt.COMPLETE_FILE).unlink()
        reason = "no COMPLETE.json"
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
        reason = "model/model.safetensors has 1000 bytes"
    elif damage == "flipped":
        data = bytearray(weights.read_bytes())
        data[-10] ^= 0xFF
        weights.write_bytes(bytes(data))
        reason = "model/model.safetensors does not match its sha256"
    else:
        (folder / "ds" / "mp_rank_00_model_states.pt").unlink()
        reason = "ds/mp_rank_00_model_states.pt missing"
    # resume by name skips it (naming it) and takes the older complete one
    ours = logging.getLogger("ttte2e")  # records of ours do not reach the root logger
    ours.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="ttte2e"):
            assert ckpt.resume_source(run_cfg.storage, "run") == str(older)
    finally:
        ours.removeHandler(caplog.handler)
    assert str(folder) in caplog.records[0].getMessage()
    # --resume-from names what is wrong; fit refuses before workers start
    with pytest.raises(ConfigError, match=rf"incomplete checkpoint: .*{reason}"):
        fit(dataclasses.replace(run_cfg, name="other", resume_from=str(folder)))
    if damage == "missing":  # readers of the weights only need model/
        return
    with pytest.raises(ConfigError, match=reason):
        check_init_from(str(folder), check_options(run_cfg)[0])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for source in (folder, folder / "model"):
        with pytest.raises(RegistryError, match=reason):
            register(str(source), "m", uri)
        with pytest.raises(RegistryError, match=reason):
            load_model(str(source))
    with pytest.raises(SystemExit) as code:
        pull_main([str(folder), "--prompt", "x"])
    assert code.value.code == 2 and reason in capsys.readouterr().err
    evaluate = subprocess.run(
        [
            sys.executable,
            "pipelines/evaluate.py",
            "--model",
            str(folder),
            "--data",
            run_cfg.data,
            "--out",
            str(tmp_path / "eval"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert evaluate.returncode == 2 and reason in evaluate.stderr, evaluate.stderr[-2000:]
    assert "Traceback" not in evaluate.stderr


# ---- 8. reading commands never create an MLflow store -------------------------------------------
def test_reading_commands_refuse_a_sqlite_store_that_does_not_exist(tmp_path, capsys):
    from ttte2e.platform.cli.registry import pull_main
    from ttte2e.platform.cli.registry import registry_main as main

    missing = f"sqlite:///{tmp_path / 'typo.db'}"
    for run in (
        lambda: main(["list", "m", "--tracking-uri", missing]),
        lambda: main(["promote", "m", "1", "--tracking-uri", missing]),
        lambda: pull_main(["models:/m@champion", "--tracking-uri", missing]),
    ):
        with pytest.raises(SystemExit) as code:
            run()
        assert code.value.code == 2 and "no such MLflow database" in capsys.readouterr().err
    assert not (tmp_path / "typo.db").exists()


# ---- 6. no secret anywhere ----------------------------------------------------------------------
def test_credentials_leave_the_uri_and_every_message():
    from ttte2e.platform.registry import tracking

    saved = dict(os.environ)
    try:
        os.environ["AWS_SECRET_ACCESS_KEY"] = "SENTINEL-aws"
        clean = tracking.strip_credentials("http://alice:SENTINEL-pw@127.0.0.1:5000")
        assert clean == "http://127.0.0.1:5000"
        assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "SENTINEL-pw"
        text = tracking.redact("failed at http://bob:x@h:1 with SENTINEL-aws and SENTINEL-pw")
        assert "SENTINEL" not in text and "bob" not in text
        assert tracking.redact_config(dict(a="s3://k:SENTINEL-pw@b", n=3)) == dict(
            a="s3://***@b", n=3
        )
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.mark.slow
def test_no_secret_reaches_output_checkpoints_runs_or_the_tracking_server(
    train_data, tmp_path, model_folder, ray_head
):
    """Sentinel credentials in the tracking URI and in the environment; a real `mlflow server`;
    a training job (2 workers, registers its model) and an evaluation logging to it. Everything
    printed and everything written (run folder, checkpoints, the server's database and
    artifacts) is searched for the sentinels."""
    uri_secret, env_secret, aws_secret = "SENTINELpw1", "SENTINELtok2", "SENTINELaws3"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env.update(
        MLFLOW_DISABLE_TELEMETRY="true",
        RAY_USAGE_STATS_ENABLED="0",
        MLFLOW_TRACKING_TOKEN=env_secret,
        AWS_SECRET_ACCESS_KEY=aws_secret,
        AWS_ACCESS_KEY_ID="SENTINELkey4",
    )
    server_dir = tmp_path / "server"
    job_env = {**env, "RAY_ADDRESS": ray_head.gcs_address}  # the training job joins the head
    server_dir.mkdir()
    data, bos = train_data
    with mlflow_server(
        server_dir, {k: v for k, v in env.items() if not k.startswith("AWS_")}
    ) as uri:
        secret_uri = uri.replace("http://", f"http://alice:{uri_secret}@")
        overrides = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
        train = subprocess.run(
            [
                sys.executable,
                "pipelines/pretrain_3b.py",
                "--preset",
                "tiny",
                *overrides,
                f"--bos-token-id={bos}",
                "--data",
                data,
                "--storage",
                str(tmp_path / "runs"),
                "--name",
                "secret",
                "--workers",
                "2",
                "--batch-tokens",
                "512",
                "--steps",
                "2",
                "--eval-every",
                "0",
                "--eval-windows",
                "2",
                "--checkpoint-every",
                "1",
                "--max-failures",
                "0",
                "--tracking-uri",
                secret_uri,
                "--register-as",
                "secret-m",
            ],
            cwd=REPO,
            env=job_env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert train.returncode == 0, (train.stdout + train.stderr)[-4000:]
        evaluate = subprocess.run(
            [
                sys.executable,
                "pipelines/evaluate.py",
                "--model",
                "models:/secret-m@candidate",
                "--data",
                data,
                "--contexts",
                "128",
                "--windows",
                "1",
                "--modes",
                "ttt",
                "--out",
                str(tmp_path / "eval"),
                "--tracking-uri",
                secret_uri,
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert evaluate.returncode == 0, (evaluate.stdout + evaluate.stderr)[-4000:]
        printed = train.stdout + train.stderr + evaluate.stdout + evaluate.stderr
        assert "View run" in printed  # MLflow printed its links: without the credentials
    for secret in (uri_secret, env_secret, aws_secret, "SENTINELkey4"):
        assert secret not in printed, secret
        for path in [*tmp_path.rglob("*")]:
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), (secret, path)
    assert (tmp_path / "runs" / "secret" / ckpt.dir_name(2) / ckpt.COMPLETE_FILE).is_file()


@pytest.mark.slow
def test_damage_found_mid_run_ends_the_run_without_retries(train_data, tmp_path, ray_cluster):
    """Same-size damage passes the pre-flight listing; the first read of a damaged row group in
    a worker's Ray Data reader fails naming the shard, and with unlimited restarts (-1) the run
    still ends at once with that error (a damaged shard does not heal)."""
    import pyarrow.parquet as pq

    from ttte2e.platform.data.manifest import read_manifest
    from ttte2e.platform.train.driver import fit

    data = tmp_path / "data"
    shutil.copytree(train_data[0], data)
    for shard in read_manifest(str(data))["shards"]:
        if shard["split"] != "train":
            continue
        path = data / shard["path"]
        raw = bytearray(path.read_bytes())
        meta = pq.ParquetFile(path).metadata
        for g in range(meta.num_row_groups):  # one byte in the tokens of every row group
            column = meta.row_group(g).column(0)
            start = column.dictionary_page_offset or column.data_page_offset
            raw[start + column.total_compressed_size // 2] ^= 0xFF
        path.write_bytes(bytes(raw))
    cfg = small_config(
        (str(data), train_data[1]), tmp_path / "runs", name="damaged", max_failures=-1
    )
    with pytest.raises(ConfigError, match=r"training stopped \(DataError\): .*train/part-"):
        fit(cfg)
