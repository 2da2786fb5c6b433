"""The MLflow model registry: register a trained model as a version of a named model, point aliases
(`candidate`, `champion`) at versions, and pull a version back as model + tokenizer.

Every version is an MLflow pyfunc model (platform/registry/serving.py: text in, text out) logged in a
registration run. Its weights are either logged whole into the MLflow artifact store (small models)
or registered by reference: the version records the model folder's URI (local or s3://, a training
checkpoint's model/ or an imported folder) and loading reads the weights from there, so a
multi-GB checkpoint is never uploaded into MLflow. The config, the tokenizer (tokenizer.json
beside config.json) and the final held-out metrics travel with the version.

Choice when the tracking server is down: registry commands (and training, which creates its run
before any worker starts) fail fast with the server named; see platform/registry/tracking.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple

from ttte2e.model.model_folder import CONFIG_FILE, TOKENIZER_FILE, config_fields
from ttte2e.platform.data.storage import Location, resolve
from ttte2e.platform.registry.tracking import (
    RUN_NAME_TAG,
    _client,
    _log_params,
    artifact_location,
    redact,
)

PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
WEIGHTS_TAG, WEIGHTS_URI_TAG, SOURCE_TAG = "ttte2e.weights", "ttte2e.weights_uri", "ttte2e.source"
REGISTRY_EXPERIMENT = "ttte2e-registry"
DEFAULT_MAX_LOGGED_BYTES = 256 * 1024**2
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))?$")


class RegistryError(ValueError):
    """A registry request cannot be served; the message says which part of it and why."""


class LoadedModel(NamedTuple):
    model: object  # TTTModel, in eval mode
    tokenizer: object  # tokenizers.Tokenizer, or None when none was saved with the model


# ---- where things are ---------------------------------------------------------------------------
def registry_uri(setting: str = "") -> str:
    """The flag, else MLFLOW_TRACKING_URI; there is no silent default (a wrong registry would look
    like an empty one)."""
    from ttte2e.platform.registry.tracking import strip_credentials

    uri = setting or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        raise RegistryError(
            "no MLflow tracking URI: pass --tracking-uri (e.g. sqlite:///"
            "runs/mlflow.db or http://host:5000) or set MLFLOW_TRACKING_URI"
        )
    return strip_credentials(uri)


def check_store_exists(uri: str) -> None:
    """Reading commands (pull, list, evaluate) refuse a sqlite store that does not exist: MLflow
    would create an empty one, and a mistyped path would look like an empty registry."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        if not path.is_file():
            raise RegistryError(
                f"{uri}: no such MLflow database (a mistyped path? reading "
                "commands never create one)"
            )


def check_tracking(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, naming the server, when an http(s) tracking server does not answer (the MLflow
    client would otherwise retry for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=timeout).raise_for_status()
    except requests.RequestException as e:
        raise RegistryError(
            f"MLflow tracking server {redact(uri)} is unreachable "
            f"({type(e).__name__}); start it, or point --tracking-uri / "
            "MLFLOW_TRACKING_URI at a running one"
        ) from None


def model_folder(uri: str) -> Location:
    """platform/train/checkpoint.py's model_folder, its refusal as a RegistryError."""
    from ttte2e.platform.train import checkpoint

    try:
        return checkpoint.model_folder(uri)
    except checkpoint.CheckpointError as e:
        raise RegistryError(redact(str(e))) from None


def local_copy(loc: Location) -> Path:
    """A local folder with loc's files (loc itself when it is local)."""
    if not loc.is_s3:
        return Path(loc.path)
    target = Path(tempfile.mkdtemp(prefix="ttte2e-model-"))
    for f in loc.list_files():
        rel = f.uri[len(loc.uri) + 1 :]
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        (target / rel).write_bytes(f.read_bytes())
    return target


def load_weights(uri: str) -> LoadedModel:
    """Model + tokenizer from a model folder or training checkpoint (local or s3://)."""
    from ttte2e.model import TTTModel
    from ttte2e.platform.registry.serving import load_tokenizer

    folder = local_copy(model_folder(uri))
    return LoadedModel(TTTModel.from_pretrained(folder).eval(), load_tokenizer(folder))


# ---- registering --------------------------------------------------------------------------------
def _checkpoint_facts(uri: str) -> tuple[dict, dict, str | None]:
    """(params, final metrics, training MLflow run id) of a training checkpoint; empty for a bare
    model folder."""
    from ttte2e.platform.train.checkpoint import STATE_FILE

    state_file = resolve(uri).join(STATE_FILE)
    if not state_file.exists():
        return {}, {}, None
    state = json.loads(state_file.read_bytes())
    params = {
        **{f"train.{k}": v for k, v in state.get("train", {}).items()},
        "train.step": state.get("step"),
    }
    final = state["evals"][-1] if state.get("evals") else {}
    metrics = {k: v for k, v in final.items() if k != "step" and v is not None}
    return params, metrics, state.get("mlflow_run_id")


def register(
    source: str,
    name: str,
    tracking_uri: str,
    alias: str = "candidate",
    weights: str = "auto",
    max_logged_bytes: int = DEFAULT_MAX_LOGGED_BYTES,
    description: str = "",
) -> dict:
    """See _register. MLflow's set_tracking_uri also exports MLFLOW_TRACKING_URI to every later
    subprocess: the caller's setting is put back afterwards."""
    import mlflow

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        return _register(source, name, tracking_uri, alias, weights, max_logged_bytes, description)
    finally:
        mlflow.set_tracking_uri(previous)


def _register(
    source: str,
    name: str,
    tracking_uri: str,
    alias: str,
    weights: str,
    max_logged_bytes: int,
    description: str,
) -> dict:
    """Register the model of `source` (training checkpoint or model folder, local or s3://) as a
    new version of `name`, and point `alias` at it. weights: 'logged' (copied into MLflow),
    'reference' (the version records source's URI) or 'auto' (logged up to max_logged_bytes)."""
    import mlflow

    if weights not in ("auto", "logged", "reference"):
        raise RegistryError(f"weights must be auto, logged or reference, got {weights!r}")
    if not re.fullmatch(r"[\w.-]+", name):
        raise RegistryError(f"model name {name!r}: use letters, digits, '_', '-' and '.'")
    check_tracking(tracking_uri)
    folder = model_folder(source)
    config = config_fields(json.loads(folder.join(CONFIG_FILE).read_bytes()), source)
    has_tokenizer = folder.join(TOKENIZER_FILE).exists()
    size = sum(f.size() for f in folder.list_files())
    logged = weights == "logged" or (weights == "auto" and size <= max_logged_bytes)
    params, metrics, training_run = _checkpoint_facts(source)
    params.update({f"model.{k}": v for k, v in config.items()})

    client = _client(tracking_uri)
    parent = None
    if training_run:
        try:
            parent = client.get_run(training_run)
        except Exception:  # noqa: BLE001 - the training run lives in another tracking store
            parent = None
    if parent is not None:
        experiment_id = parent.info.experiment_id
    else:
        exp = client.get_experiment_by_name(REGISTRY_EXPERIMENT)
        experiment_id = (
            exp.experiment_id
            if exp
            else client.create_experiment(
                REGISTRY_EXPERIMENT, artifact_location=artifact_location(tracking_uri)
            )
        )
    tags = {RUN_NAME_TAG: f"register-{name}", SOURCE_TAG: redact(folder.uri)}
    if parent is not None:
        tags["mlflow.parentRunId"] = parent.info.run_id
    run = client.create_run(experiment_id, run_name=f"register-{name}", tags=tags)
    run_id = run.info.run_id
    _log_params(client, run_id, params)
    for key, value in metrics.items():
        client.log_metric(run_id, key, float(value))

    # logged copies are staged as a folder named `weights`: MLflow keeps the folder's own name
    # (artifacts/weights in every version), and the source path stays out of the MLmodel
    staging = Path(tempfile.mkdtemp(prefix="ttte2e-register-")) / "weights" if logged else None
    if staging is not None:
        shutil.copytree(local_copy(folder), staging)
    mlflow.set_tracking_uri(tracking_uri)  # log_model is fluent-API only (undone in register)
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        # the signature is given: MLflow's notice about an input example to infer one from does
        # not apply
        warnings.filterwarnings("ignore", message=".*input example was not provided")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_FILE),
            artifacts={"weights": str(staging)} if logged else None,
            model_config=None if logged else {"weights_uri": folder.uri},
            signature=_signature(),
            pip_requirements=_requirements(),
        )
    if staging is not None:
        shutil.rmtree(staging.parent, ignore_errors=True)

    try:
        client.get_registered_model(name)
    except Exception:  # noqa: BLE001 - MlflowException RESOURCE_DOES_NOT_EXIST
        client.create_registered_model(name, description=description or None)
    version_tags = {
        WEIGHTS_TAG: "logged" if logged else "reference",
        WEIGHTS_URI_TAG: redact(folder.uri),
        SOURCE_TAG: redact(source),
        "tokenizer": "yes" if has_tokenizer else "no",
        "bytes": str(size),
        **{f"metric.{k}": f"{v:.6g}" for k, v in metrics.items()},
    }
    version = client.create_model_version(
        name,
        source=info.model_uri,
        run_id=run_id,
        tags=version_tags,
        description=description or None,
        model_id=info.model_id,
    )
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return dict(
        name=name,
        version=version.version,
        alias=alias or None,
        uri=f"models:/{name}@{alias}" if alias else f"models:/{name}/{version.version}",
        weights=version_tags[WEIGHTS_TAG],
        weights_uri=redact(folder.uri),
        tokenizer=has_tokenizer,
        bytes=size,
        run_id=run_id,
        tracking_uri=redact(tracking_uri),
    )


def _signature():
    from ttte2e.platform.registry.serving import pyfunc_signature

    return pyfunc_signature()


def _requirements() -> list[str]:
    """What a pyfunc user's environment needs (listed, not inferred: inference would load the
    model in a subprocess). ttte2e itself is installed from this repository."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for package in ("torch", "tokenizers", "safetensors", "numpy", "pandas", "pyarrow", "ttte2e"):
        try:
            out.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            out.append(package)
    return out


# ---- resolving and pulling ----------------------------------------------------------------------
def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """models:/NAME/VERSION or models:/NAME@ALIAS -> (name, version, alias)."""
    m = _MODEL_URI.match(uri)
    if not m or not (m["version"] or m["alias"]):
        raise RegistryError(
            f"{uri!r}: expected models:/NAME/VERSION or models:/NAME@ALIAS "
            "(e.g. models:/tiny@champion)"
        )
    return m["name"], m["version"], m["alias"]


def resolve_version(uri: str, tracking_uri: str):
    """The ModelVersion a models:/ URI names, or an error listing what does exist."""
    from mlflow.exceptions import MlflowException

    name, number, alias = parse_model_uri(uri)
    check_tracking(tracking_uri)
    client = _client(tracking_uri)
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        known = sorted(m.name for m in client.search_registered_models(max_results=50))
        raise RegistryError(
            f"{uri}: no registered model {name!r} in {redact(tracking_uri)} "
            f"(registered: {', '.join(known) or 'none'})"
        ) from None
    if alias:
        aliases = dict(model.aliases or {})
        if alias not in aliases:
            raise RegistryError(
                f"{uri}: model {name!r} has no alias {alias!r} (aliases: "
                f"{', '.join(f'{a} -> v{v}' for a, v in sorted(aliases.items())) or 'none'})"
            )
        number = aliases[alias]
    try:
        return client.get_model_version(name, str(number))
    except MlflowException:
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        raise RegistryError(
            f"{uri}: model {name!r} has no version {number} (versions: {versions or 'none'})"
        ) from None


def version_weights(version, tracking_uri: str) -> str:
    """Where a version's weights are: the referenced folder (checked to still exist), or a local
    download of the logged copy."""
    tags = version.tags or {}
    label = f"models:/{version.name}/{version.version}"
    if tags.get(WEIGHTS_TAG) == "logged":
        import mlflow.artifacts

        root = _client(tracking_uri).get_model_version_download_uri(version.name, version.version)
        target = tempfile.mkdtemp(prefix="ttte2e-pull-")
        try:
            return mlflow.artifacts.download_artifacts(
                artifact_uri=f"{root.rstrip('/')}/artifacts/weights",
                dst_path=target,
                tracking_uri=tracking_uri,
            )
        except Exception as e:  # noqa: BLE001
            raise RegistryError(
                f"{label}: its logged weights cannot be downloaded from "
                f"{redact(root)} ({type(e).__name__}: {redact(str(e))[:200]})"
            ) from None
    # by reference; versions registered by earlier releases have the folder as their source
    uri = tags.get(WEIGHTS_URI_TAG) or version.source
    uri = uri[len("file://") :] if uri.startswith("file://") else uri
    try:
        model_folder(uri)
    except (RegistryError, OSError) as e:
        raise RegistryError(
            f"{label} points at {redact(uri)}, which is gone or unreadable "
            f"({e}); the checkpoint was deleted or moved: re-register it from "
            "where it lives now"
        ) from None
    return uri


def load_model(uri: str, tracking_uri: str | None = None) -> LoadedModel:
    """(model, tokenizer) for models:/NAME@ALIAS, models:/NAME/VERSION, a model folder or a
    training checkpoint (local or s3://). The model is in eval mode, ready for
    ttte2e.platform.eval.long_context or generation (ttte2e.platform.registry.serving.TextGenerator)."""
    if not uri.startswith("models:/"):
        return load_weights(uri)
    tracking_uri = registry_uri(tracking_uri or "")
    check_store_exists(tracking_uri)
    return load_weights(version_weights(resolve_version(uri, tracking_uri), tracking_uri))


# ---- aliases ------------------------------------------------------------------------------------
def set_alias(name: str, version: str, alias: str, tracking_uri: str) -> tuple[str, str | None]:
    """Point `alias` of `name` at `version` (a number, or @ALIAS for the version another alias
    names). Returns (new version, the version the alias named before or None)."""
    if not re.fullmatch(r"[A-Za-z_][\w-]*", alias) or re.fullmatch(r"v\d+", alias):
        raise RegistryError(f"alias {alias!r}: a name like champion or candidate")
    ref = (
        f"models:/{name}@{version[1:]}" if version.startswith("@") else f"models:/{name}/{version}"
    )
    target = resolve_version(ref, tracking_uri)
    client = _client(tracking_uri)
    before = (client.get_registered_model(name).aliases or {}).get(alias)
    client.set_registered_model_alias(name, alias, target.version)
    return str(target.version), (str(before) if before is not None else None)


def describe(name: str, tracking_uri: str) -> list[dict]:
    """Every version of `name`: number, aliases, where the weights are, key metrics."""
    check_tracking(tracking_uri)
    client = _client(tracking_uri)
    try:
        aliases = client.get_registered_model(name).aliases or {}
    except Exception:  # noqa: BLE001
        raise RegistryError(f"no registered model {name!r} in {redact(tracking_uri)}") from None
    by_version: dict[str, list[str]] = {}
    for alias, number in aliases.items():
        by_version.setdefault(str(number), []).append(alias)
    rows = []
    for v in sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version)):
        tags = v.tags or {}
        rows.append(
            dict(
                version=v.version,
                aliases=sorted(by_version.get(str(v.version), [])),
                weights=tags.get(WEIGHTS_TAG, "reference"),
                weights_uri=tags.get(WEIGHTS_URI_TAG, v.source),
                val_loss=tags.get("metric.val_loss"),
            )
        )
    return rows
