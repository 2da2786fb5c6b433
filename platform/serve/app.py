"""The Ray Serve application: an OpenAI-compatible HTTP front (FastAPI ingress) and the model
replicas (each one Engine: a model, its batched decode loop, its session store).

    HTTP -> OpenAIServer (parse, check: 4xx before any model work)
         -> ModelReplica, routed by session id (Serve model multiplexing; best effort)
         -> Engine events -> JSON body, or server-sent events

A request's `X-Session-Id` header names its session; Serve's multiplexing sends it to the
replica that served the session last when it can. When it cannot (that replica is busy, gone or
new), the replica it lands on resumes the session from storage, else re-reads the whole prompt:
never from a missing or stale state (platform/serve/sessions.py). `X-Session-Strict: true` asks
to continue or fail (404 no state, 409 the prompt does not extend it).
"""

import asyncio
import json
import os
from dataclasses import dataclass, field, replace

# no `from __future__ import annotations` here: FastAPI reads the handlers' annotations
# (Request) and Serve pickles these classes by value, without the module's globals
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from ttte2e.platform.serve.engine import EngineSettings, RequestError
from ttte2e.platform.serve.openai_api import (
    ChatTemplate,
    ResponseBuilder,
    error_body,
    parse_chat,
    parse_completion,
    session_headers,
    sse,
)
from ttte2e.platform.serve.sessions import _check_id

_TRUE = ("1", "true", "yes")


@dataclass(frozen=True)
class ServeSettings:
    model: str  # model folder, checkpoint, s3:// copy, or models:/NAME@ALIAS
    model_name: str = ""  # the name clients send ("model"); default: from the model's URI
    tracking_uri: str = ""  # MLflow registry, for models:/ URIs
    replicas: int = 1
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    engine: EngineSettings = field(default_factory=EngineSettings)
    template: ChatTemplate = field(default_factory=ChatTemplate)


def build_app(settings: ServeSettings):
    """The Serve application (deploy with serve.run)."""
    name = settings.model_name or default_model_name(settings.model)
    engine_settings = settings.engine

    @serve.deployment(
        num_replicas=settings.replicas,
        ray_actor_options=dict(
            num_cpus=settings.cpus_per_replica, num_gpus=settings.gpus_per_replica
        ),
        max_ongoing_requests=4 * engine_settings.max_batch,
        health_check_period_s=5,
    )
    class ModelReplica:
        def __init__(self):
            import torch

            from ttte2e.platform.registry.model_registry import load_model
            from ttte2e.platform.serve.engine import Engine

            torch.set_num_threads(max(1, int(settings.cpus_per_replica)))
            model, tokenizer = load_model(settings.model, settings.tracking_uri or None)
            if torch.cuda.is_available() and settings.gpus_per_replica > 0:
                model = model.cuda()
            self.engine = Engine(model, tokenizer, engine_settings)
            self.replica = serve.get_replica_context().replica_id.unique_id

        # the routing key: Serve prefers the replica whose "loaded models" hold this session
        @serve.multiplexed(max_num_models_per_replica=engine_settings.max_sessions_on_device)
        async def _session(self, session_id: str) -> str:
            return session_id

        async def generate(self, request):
            session_id = serve.get_multiplexed_model_id()
            if session_id:
                await self._session(session_id)
            async for event in self.engine.stream(request):
                if event["event"] == "start":
                    event["replica"] = self.replica
                yield event

        async def stats(self) -> dict:
            return dict(self.engine.stats(), replica=self.replica, pid=os.getpid())

        def __del__(self):
            engine = getattr(self, "engine", None)
            if engine is not None:
                engine.close()

    app = FastAPI(title="ttt-e2e", docs_url=None, redoc_url=None)

    def error(e: RequestError, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(error_body(e), status_code=e.status, headers=headers)

    # the ingress only parses and forwards (async): it must not cap concurrency below the
    # replicas' batches (Serve's default is 5 requests in flight per replica)
    ingress_limit = max(256, 4 * engine_settings.max_batch * settings.replicas)

    @serve.deployment(
        num_replicas=1, ray_actor_options=dict(num_cpus=0), max_ongoing_requests=ingress_limit
    )
    @serve.ingress(app)
    class OpenAIServer:
        def __init__(self, replicas):
            self.replicas = replicas

        @app.get("/health")
        async def health(self):
            try:
                stats = await asyncio.wait_for(self.replicas.stats.remote(), timeout=10)
            except Exception as e:  # noqa: BLE001
                return error(RequestError(503, "unavailable", f"no model replica answers: {e}"))
            return dict(status="ok", model=name, replica=stats)

        @app.get("/v1/models")
        async def models(self):
            entry = dict(id=name, object="model", created=0, owned_by="ttte2e")
            return dict(object="list", data=[entry])

        @app.post("/v1/completions")
        async def completions(self, request: Request):
            return await self._serve(request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat(self, request: Request):
            return await self._serve(request, chat=True)

        async def _serve(self, request: Request, chat: bool):
            try:
                body = await _json(request)
                max_tokens = engine_settings.max_tokens
                parsed = (
                    parse_chat(body, name, max_tokens, settings.template)
                    if chat
                    else parse_completion(body, name, max_tokens)
                )
                session_id = request.headers.get("x-session-id")
                strict = request.headers.get("x-session-strict", "").lower() in _TRUE
                if session_id is not None:
                    try:
                        _check_id(session_id)
                    except ValueError as e:
                        raise RequestError(400, "invalid_session_id", str(e)) from None
                elif strict:
                    raise RequestError(
                        400, "invalid_session_id", "X-Session-Strict needs an X-Session-Id"
                    )
            except RequestError as e:
                return error(e)
            generation = replace(parsed.generation, session_id=session_id, strict=strict)
            handle = self.replicas.options(stream=True)
            if session_id:
                handle = handle.options(multiplexed_model_id=session_id)
            events = handle.generate.remote(generation)
            try:
                start = await events.__anext__()
            except Exception as e:  # noqa: BLE001 - a replica that died before answering
                return error(RequestError(503, "unavailable", f"the model replica failed: {e}"))
            if start["event"] == "error":
                return error(RequestError(start["status"], start["code"], start["message"],
                                          start["param"]))  # fmt: skip
            headers = session_headers(session_id, start)
            headers["X-Replica"] = start.get("replica", "")
            builder = ResponseBuilder(chat, name)
            if parsed.stream:
                chunks = _stream(events, start, builder, parsed.include_usage)
                return StreamingResponse(chunks, media_type="text/event-stream", headers=headers)
            text, end = [], None
            try:
                async for event in events:
                    if event["event"] == "text":
                        text.append(event["text"])
                    elif event["event"] == "error":
                        return error(RequestError(event["status"], event["code"],
                                                  event["message"], event["param"]))  # fmt: skip
                    else:
                        end = event
            except Exception as e:  # noqa: BLE001
                return error(RequestError(503, "unavailable", f"the model replica failed: {e}"))
            if end is None:  # the stream stopped without its end: never a partial reply as whole
                return error(RequestError(503, "unavailable", "the reply was cut off"))
            headers["X-Session-State-Bytes"] = str(end["state_bytes"])
            return JSONResponse(builder.whole("".join(text), start, end), headers=headers)

    return OpenAIServer.bind(ModelReplica.bind())


def default_model_name(uri: str) -> str:
    """The name clients send as "model" when none is set: NAME@ALIAS of a registry URI, else the
    folder's name."""
    uri = uri.rstrip("/")
    return uri[len("models:/") :] if uri.startswith("models:/") else uri.split("/")[-1]


async def _json(request) -> dict:
    raw = await request.body()
    try:
        return json.loads(raw)
    except ValueError as e:
        raise RequestError(400, "invalid_json", f"the body is not valid JSON: {e}") from None


async def _stream(events, start: dict, builder: ResponseBuilder, include_usage: bool):
    yield sse(builder.chunk(None, first=True))
    try:
        async for event in events:
            if event["event"] == "text":
                yield sse(builder.chunk(event["text"]))
            elif event["event"] == "error":
                yield sse(error_body(RequestError(event["status"], event["code"],
                                                  event["message"], event["param"])))  # fmt: skip
                break
            else:
                yield sse(builder.chunk(None, event["finish_reason"]))
                if include_usage:
                    yield sse(builder.usage_chunk(start, event))
    except Exception as e:  # noqa: BLE001 - the replica died mid-stream: say so, then end
        yield sse(error_body(RequestError(503, "unavailable", f"the model replica failed: {e}")))
    yield sse("[DONE]")


APP_NAME = "ttte2e"


def app_builder(args: dict):
    """The application for `serve run` / `serve deploy` configs and KubeRay RayServices
    (cluster/serve.yaml): `args` are pipelines/serve.py's options, checked the same way."""
    from ttte2e.platform.cli.serve import ServeOptions, settings_of

    fields = set(ServeOptions.__dataclass_fields__) - {"host", "port", "address"}
    unknown = sorted(set(args) - fields)
    if unknown or "model" not in args:
        raise ValueError(
            f"serve config args: unknown {unknown}, model required; known: {sorted(fields)}"
        )
    return build_app(settings_of(ServeOptions(**args)))


def start(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000) -> str:
    """Deploy on the connected Ray cluster (ensure_ray / ray.init first); returns the base URL
    once every replica has loaded the model."""
    serve.start(http_options=dict(host=host, port=port))
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def stop(shutdown_serve: bool = True) -> None:
    """Remove the application; on a cluster we joined (shutdown_serve False) Serve and its other
    applications stay."""
    if shutdown_serve:
        serve.shutdown()
    else:
        serve.delete(APP_NAME)
