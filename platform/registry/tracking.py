"""MLflow for training runs: where runs go, one run per training run (resumed with it), logging
that never takes training down, and no credentials in anything logged or printed.

Choice when the tracking server is unreachable: the driver fails fast before any worker starts
(creating the run needs the server); once training runs, a logging failure is reported once and
training continues (a checkpoint is worth more than a metric).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from ttte2e.platform.redact import redact, redact_config  # noqa: F401 - re-exported

RUN_NAME_TAG = "ttte2e.run_name"
_SECRET_KEYS = re.compile(r"(secret|password|token|access_key|credential)", re.I)


CREDENTIAL_ENV_VARS = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)


def strip_credentials(uri: str) -> str:
    """A tracking URI without user:password@; the credentials move to MLflow's own variables
    (MLFLOW_TRACKING_USERNAME / _PASSWORD, basic auth) of this process, so that nothing MLflow
    prints or stores (its "View run ... at" lines) carries them. MLFLOW_TRACKING_URI is rewritten
    the same way when it held them."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(uri)
    if not parts.scheme.startswith("http") or "@" not in parts.netloc:
        return uri
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(user)
    if password:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(password)
    clean = urlunsplit(parts._replace(netloc=host))
    if os.environ.get("MLFLOW_TRACKING_URI") == uri:
        os.environ["MLFLOW_TRACKING_URI"] = clean
    return clean


def credential_env() -> dict:
    """The tracking credentials of this process, for workers started elsewhere (never logged)."""
    return {k: os.environ[k] for k in CREDENTIAL_ENV_VARS if k in os.environ}


def loggable_params(params: dict) -> dict:
    """str values for mlflow.log_params, with credentials removed (keys or URIs that carry them)."""
    out = {}
    for key, value in params.items():
        if _SECRET_KEYS.search(key):
            continue
        out[key] = redact(str(value))[:6000]
    return out


def tracking_uri(setting: str, storage: str) -> str | None:
    """None when tracking is off; the flag, else MLFLOW_TRACKING_URI, else sqlite beside local
    storage (or in the working folder when storage is s3://)."""
    if setting == "off":
        return None
    if setting:
        return strip_credentials(setting)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return strip_credentials(os.environ["MLFLOW_TRACKING_URI"])
    folder = Path.cwd() if storage.startswith("s3://") else Path(storage).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def artifact_location(uri: str) -> str | None:
    """Artifacts of experiments we create on a sqlite store go beside the database (MLflow's
    default is ./mlruns of whatever folder the process runs in); a server decides its own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
    return None


def _client(uri: str):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def start_run(
    uri: str,
    experiment: str,
    run_name: str,
    params: dict,
    artifact_location: str | None = None,
    parent_run_id: str | None = None,
) -> str:
    """The MLflow run of this training run: the existing one with the same run name (a resumed
    run keeps its history), or a new one (a child of parent_run_id when given, e.g. a sweep's
    trial). Raises when the server cannot be reached."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = (
        exp.experiment_id
        if exp
        else client.create_experiment(experiment, artifact_location=artifact_location)
    )
    found = _runs_named(client, exp_id, run_name)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    tags = {RUN_NAME_TAG: run_name}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    _log_params(client, run.info.run_id, params)
    return run.info.run_id


def _runs_named(client, experiment_id: str, run_name: str) -> list:
    return client.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1
    )


def end_named_run(uri: str, experiment: str, run_name: str, status: str, note: str) -> None:
    """Close the run of a training run that was stopped from outside (a sweep's scheduler stops
    trials by ending their processes), with a `stopped` tag saying why."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    for run in _runs_named(client, exp.experiment_id, run_name) if exp else []:
        client.set_tag(run.info.run_id, "stopped", note)
        client.set_terminated(run.info.run_id, status)


def _log_params(client, run_id: str, params: dict) -> None:
    """All params, credentials removed, in batches under MLflow's per-call limit of 100."""
    from mlflow.entities import Param

    items = list(loggable_params(params).items())
    for i in range(0, len(items), 90):
        client.log_batch(run_id, params=[Param(k, v) for k, v in items[i : i + 90]])


class RunLogger:
    """Logs metrics/artifacts/tags to one run; the first failure is reported, later ones quietly
    skipped, and training goes on."""

    def __init__(self, uri: str | None, run_id: str | None):
        self.uri, self.run_id, self.failed = uri, run_id, False
        self.client = _client(uri) if uri and run_id else None

    def _do(self, what: str, fn) -> None:
        if self.client is None or self.failed:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            self.failed = True
            print(
                f"[tracking] MLflow {what} failed ({type(e).__name__}: {redact(str(e))[:300]}); "
                "training continues without tracking",
                file=sys.stderr,
                flush=True,
            )

    def metrics(self, values: dict, step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in values.items() if v is not None]
        self._do("log_metrics", lambda: self.client.log_batch(self.run_id, metrics=batch))

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        self._do("log_artifact", lambda: self.client.log_artifact(self.run_id, str(path), folder))

    def tag(self, key: str, value: str) -> None:
        self._do("set_tag", lambda: self.client.set_tag(self.run_id, key, redact(value)))

    def end(self, status: str = "FINISHED") -> None:
        self._do("end_run", lambda: self.client.set_terminated(self.run_id, status))
