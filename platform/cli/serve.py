"""Command line of pipelines/serve.py: check the model and settings, start (or join) Ray, deploy
the OpenAI-compatible app, serve until SIGINT / SIGTERM, then stop what was started."""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from typing import Annotated

import tyro

from ttte2e.platform.cli.parsing import cli, fail

log = logging.getLogger(__name__)


@dataclass
class ServeOptions:
    model: Annotated[str, tyro.conf.Positional]
    """Model folder, training checkpoint, s3:// copy of either, or models:/NAME@ALIAS |
    models:/NAME/VERSION (with --tracking-uri or MLFLOW_TRACKING_URI)."""
    host: str = "127.0.0.1"
    """Address the HTTP server binds (0.0.0.0 to accept other machines)."""
    port: int = 8000
    address: str = ""
    """Join this Ray cluster (e.g. a head's host:6379, or 'auto'); default: a private local Ray."""
    model_name: str = ""
    """The name clients send as "model"; default: the registry name@alias or the folder's name."""
    tracking_uri: str = ""
    """MLflow tracking URI for models:/ URIs (default: MLFLOW_TRACKING_URI)."""
    replicas: int = 1
    """Model replicas (each holds the model, its sessions and one batched decode loop)."""
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    """1 to put each replica on a GPU."""
    mode: str = "ttt"
    """ttt (TTT-E2E), swa (same weights, no TTT) or full (full attention baseline)."""
    max_batch: int = 32
    """Requests decoded together per replica (more wait for a free row)."""
    max_prompt_tokens: int = 8192
    """Tokens one request may ask a replica to read (larger prompts get 400)."""
    read_chunk: int = 256
    """Prompt tokens read between two decode steps (bounds the other requests' token gaps)."""
    max_tokens: int = 1024
    """The largest max_tokens a request may ask for (chat's default)."""
    max_context: int = 0
    """Position limit of a conversation (0: none; ttt/swa states do not grow with it)."""
    sessions_per_replica: int = 64
    """Session states kept on the device per replica; older ones move to host memory."""
    session_host_gib: float = 1.0
    """Host memory per replica for evicted sessions' snapshots; older ones only in storage."""
    session_storage: str = ""
    """Folder or s3:// prefix for session snapshots (written every turn): sessions survive
    eviction from host memory and replica restarts. Default: none (lost sessions re-read)."""
    chat_template: str = ""
    """JSON file overriding the chat template's fields (system, user, assistant, generation,
    stop); see docs/serving.md."""


def settings_of(args: ServeOptions):
    """ServeSettings from the options, every refusal before Ray starts."""
    from ttte2e.platform.serve.app import ServeSettings, default_model_name
    from ttte2e.platform.serve.engine import EngineSettings
    from ttte2e.platform.serve.openai_api import ChatTemplate

    if args.replicas < 1 or not 0 < args.port < 65536:
        raise ValueError("--replicas must be >= 1 and --port in 1..65535")
    engine = EngineSettings(
        mode=args.mode,
        max_batch=args.max_batch,
        max_prompt_tokens=args.max_prompt_tokens,
        read_chunk=args.read_chunk,
        max_tokens=args.max_tokens,
        max_context=args.max_context or None,
        max_sessions_on_device=args.sessions_per_replica,
        max_host_bytes=int(args.session_host_gib * 2**30),
        session_storage=args.session_storage or None,
    )
    template = ChatTemplate.from_file(args.chat_template) if args.chat_template else ChatTemplate()
    weights = _weights(args)
    return ServeSettings(
        model=weights,
        model_name=args.model_name or default_model_name(args.model),
        replicas=args.replicas,
        cpus_per_replica=args.cpus_per_replica,
        gpus_per_replica=args.gpus_per_replica,
        engine=engine,
        template=template,
    )


def _weights(args: ServeOptions) -> str:
    """Where the replicas load the weights from (a registry URI resolved here, once), checked to
    hold a model and its tokenizer."""
    from ttte2e.model.model_folder import TOKENIZER_FILE
    from ttte2e.platform.registry.model_registry import (
        check_store_exists,
        model_folder,
        registry_uri,
        resolve_version,
        version_weights,
    )

    uri = args.model
    if uri.startswith("models:/"):
        tracking = registry_uri(args.tracking_uri)
        check_store_exists(tracking)
        uri = version_weights(resolve_version(uri, tracking), tracking)
    folder = model_folder(uri)
    if not folder.join(TOKENIZER_FILE).exists():
        raise ValueError(
            f"{args.model} has no {TOKENIZER_FILE} beside its config: serving needs the "
            "tokenizer (register the model with --tokenizer, or copy it there)"
        )
    return uri


def main(argv: list[str] | None = None) -> None:
    from ttte2e.platform.serve import app

    args = cli(ServeOptions, argv, "Serve a TTT-E2E model with an OpenAI-compatible API.", "serve")
    try:
        settings = settings_of(args)
    except (ValueError, OSError) as e:
        fail("serve", e)
    _connect(args.address)
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        url = app.start(settings, args.host, args.port)
        log.info(
            "serving %s at %s/v1 (%d replica(s)); Ctrl-C stops",
            settings.model_name, url, settings.replicas,
        )  # fmt: skip
        print(f"ready: {url}/v1 model={settings.model_name}", flush=True)
        while not stopping.wait(0.5):  # (a wait without timeout is not woken by the handler)
            pass
        log.info("stopping")
    finally:
        app.stop(shutdown_serve=not args.address)
        import ray

        ray.shutdown()


def _connect(address: str) -> None:
    import os

    import ray

    from ttte2e.platform.cluster.ray_runtime import ensure_ray

    if address:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address=address, log_to_driver=True)
    else:
        ensure_ray()
