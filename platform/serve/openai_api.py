"""The OpenAI HTTP API's bodies: requests checked into a GenerationRequest (every refusal an
OpenAI-style error with a 4xx status, before any model work), the chat template, and the
responses and server-sent-event chunks built from the engine's events.

Supported: /v1/completions (prompt: a string, or token ids) and /v1/chat/completions
(system / user / assistant messages with text content), with max_tokens (chat:
max_completion_tokens too), temperature, top_p, seed, stop, stream and stream_options.
include_usage, and vLLM's extension ignore_eos (replies of a fixed length, for benchmarks).
Refused with 400, by name: n > 1, best_of > 1, echo, logprobs, suffix, logit_bias, non-zero
presence / frequency penalties, tools; several prompts in one request.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

from ttte2e.platform.serve.engine import GenerationRequest, RequestError, Sampling

# Defaults of the OpenAI API: completions 16 tokens; chat up to the context (here: our limit).
COMPLETION_DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True)
class ChatTemplate:
    """A plain template for base models: each message's text in its role's pattern ({content}
    is replaced), then the generation prompt. The default stop strings are what the template puts
    after an assistant's reply, so a reply cut at a stop string still continues its session (its
    history is a prefix of the next turn's prompt). Override with a JSON file of these fields."""

    system: str = "System: {content}\n\n"
    user: str = "User: {content}\n\n"
    assistant: str = "Assistant:{content}\n\n"
    generation: str = "Assistant:"
    stop: tuple[str, ...] = ("\n\nUser:",)

    def __post_init__(self):
        for role in ("system", "user", "assistant"):
            if getattr(self, role).count("{content}") != 1:
                raise ValueError(f"chat template: {role!r} must contain {{content}} exactly once")
        if not self.assistant.startswith(self.generation):
            # else a reply's history ("...<generation><reply>") is no prefix of the next prompt
            raise ValueError(
                "chat template: 'assistant' must start with the 'generation' prompt "
                f"({self.generation!r}), so that the next turn's prompt extends a reply"
            )

    @classmethod
    def from_file(cls, path: str | Path) -> ChatTemplate:
        fields = json.loads(Path(path).read_text())
        unknown = set(fields) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"chat template {path}: unknown fields {sorted(unknown)}")
        if "stop" in fields:
            fields["stop"] = tuple(fields["stop"])
        return cls(**fields)

    def render(self, messages: list[dict]) -> str:
        parts = [getattr(self, m["role"]).replace("{content}", m["content"]) for m in messages]
        return "".join(parts) + self.generation


# ---- requests ------------------------------------------------------------------------------------
def _bad(message: str, param: str | None = None, code: str = "invalid_value") -> RequestError:
    return RequestError(400, code, message, param)


def _number(body: dict, name: str, default, low, high, low_open=False, integer=False):
    value = body.get(name)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise _bad(f"{name} must be {'an integer' if integer else 'a number'}", name)
    if value < low or (low_open and value == low) or (high is not None and value > high):
        interval = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}]"
        raise _bad(f"{name} must be in {interval}, got {value}", name)
    return value


def _unsupported(body: dict) -> None:
    checks = (
        ("n", lambda v: v not in (None, 1), "n > 1 (one choice per request)"),
        ("best_of", lambda v: v not in (None, 1), "best_of > 1"),
        ("echo", lambda v: bool(v), "echo"),
        ("logprobs", lambda v: v not in (None, False), "logprobs"),
        ("top_logprobs", lambda v: v not in (None, 0), "top_logprobs"),
        ("suffix", lambda v: v not in (None, ""), "suffix"),
        ("logit_bias", lambda v: bool(v), "logit_bias"),
        ("presence_penalty", lambda v: v not in (None, 0), "presence_penalty"),
        ("frequency_penalty", lambda v: v not in (None, 0), "frequency_penalty"),
        ("tools", lambda v: bool(v), "tools"),
        ("functions", lambda v: bool(v), "functions"),
    )
    for name, refused, what in checks:
        if refused(body.get(name)):
            raise _bad(f"{what} is not supported by this server", name, "unsupported_parameter")


def _sampling(body: dict, max_tokens_limit: int, default_max_tokens: int) -> Sampling:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _number(
        {name: max_tokens}, name, default_max_tokens, 1, max_tokens_limit, integer=True
    )
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (
        not isinstance(stop, list)
        or len(stop) > 4
        or not all(isinstance(s, str) and s for s in stop)
    ):
        raise _bad("stop must be a non-empty string or a list of at most 4 of them", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _bad("seed must be an integer", "seed")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _bad("ignore_eos must be true or false", "ignore_eos")
    return Sampling(
        max_tokens=max_tokens,
        temperature=float(_number(body, "temperature", 1.0, 0, 2)),
        top_p=float(_number(body, "top_p", 1.0, 0, 1, low_open=True)),
        seed=seed,
        stop=tuple(stop or ()),
        ignore_eos=ignore_eos,
    )


@dataclass(frozen=True)
class ParsedRequest:
    generation: GenerationRequest
    stream: bool
    include_usage: bool


def _common(body, model_name: str) -> tuple[bool, bool]:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None, "invalid_request")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model is required: the served model's name (GET /v1/models)", "model")
    if model != model_name:
        raise RequestError(
            404, "model_not_found", f"model {model!r} does not exist; this server serves "
            f"{model_name!r}", "model",
        )  # fmt: skip
    _unsupported(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("stream_options must be an object", "stream_options")
    return stream, bool(options.get("include_usage", False))


def parse_completion(body, model_name: str, max_tokens_limit: int) -> ParsedRequest:
    stream, include_usage = _common(body, model_name)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list) and prompt and all(isinstance(x, (str, list)) for x in prompt):
        raise _bad("one prompt per request (send several requests)", "prompt")
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise _bad("prompt must be a string or a non-empty list of token ids", "prompt")
    elif not isinstance(prompt, str) or not prompt:
        raise _bad("prompt must be a non-empty string or a list of token ids", "prompt")
    sampling = _sampling(body, max_tokens_limit, COMPLETION_DEFAULT_MAX_TOKENS)
    return ParsedRequest(GenerationRequest(prompt, sampling), stream, include_usage)


def parse_chat(body, model_name: str, max_tokens_limit: int, template: ChatTemplate):
    stream, include_usage = _common(body, model_name)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list", "messages")
    plain = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise _bad(f"messages[{i}]: role must be system, user or assistant", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise _bad(f"messages[{i}]: only text content is supported", "messages")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise _bad(f"messages[{i}]: content must be a string", "messages")
        plain.append(dict(role=m["role"], content=content))
    sampling = _sampling(body, max_tokens_limit, max_tokens_limit)
    if "stop" not in body:
        sampling = replace(sampling, stop=template.stop)
    prompt = template.render(plain)
    return ParsedRequest(GenerationRequest(prompt, sampling), stream, include_usage)


# ---- responses -----------------------------------------------------------------------------------
def error_body(error: RequestError) -> dict:
    kind = "invalid_request_error" if error.status < 500 else "server_error"
    return dict(error=dict(message=error.message, type=kind, param=error.param, code=error.code))


def usage(start: dict, end: dict) -> dict:
    return dict(
        prompt_tokens=start["prompt_tokens"],
        completion_tokens=end["completion_tokens"],
        total_tokens=start["prompt_tokens"] + end["completion_tokens"],
        prompt_tokens_details=dict(cached_tokens=start["cached_tokens"]),
    )


class ResponseBuilder:
    """The bodies of one response (chat or completion), whole or as stream chunks."""

    def __init__(self, chat: bool, model_name: str):
        self.chat, self.model = chat, model_name
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list) -> dict:
        return dict(id=self.id, object=obj, created=self.created, model=self.model, choices=choices)

    def whole(self, text: str, start: dict, end: dict) -> dict:
        if self.chat:
            choice = dict(
                index=0,
                message=dict(role="assistant", content=text),
                finish_reason=end["finish_reason"],
                logprobs=None,
            )
            body = self._envelope("chat.completion", [choice])
        else:
            choice = dict(index=0, text=text, finish_reason=end["finish_reason"], logprobs=None)
            body = self._envelope("text_completion", [choice])
        body["usage"] = usage(start, end)
        return body

    def chunk(self, text: str | None, finish_reason: str | None = None, first=False) -> dict:
        if self.chat:
            delta = dict(role="assistant", content="") if first else {}
            if text:
                delta["content"] = text
            choice = dict(index=0, delta=delta, finish_reason=finish_reason, logprobs=None)
            return self._envelope("chat.completion.chunk", [choice])
        choice = dict(index=0, text=text or "", finish_reason=finish_reason, logprobs=None)
        return self._envelope("text_completion", [choice])

    def usage_chunk(self, start: dict, end: dict) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        body = self._envelope(obj, [])
        body["usage"] = usage(start, end)
        return body


def sse(body: dict | str) -> bytes:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n".encode()


def session_headers(session_id: str | None, start: dict) -> dict:
    if session_id is None:
        return {}
    return {
        "X-Session-Id": session_id,
        "X-Session-Cached-Tokens": str(start["cached_tokens"]),
        "X-Session-Restarted": "true" if start["restarted"] else "false",
        "X-Session-Source": start["source"],
    }
