"""The Ray Serve application end to end (platform/serve/app.py), through the official `openai`
client on loopback: completions, chat, streaming, sessions across turns (cached tokens, text equal
to `generate` over the whole conversation), a killed replica (the next turn resumes from storage),
and every kind of bad input answered with its 4xx while the server keeps serving.

One Serve application (2 model replicas) on the session's Ray head for the module."""

import json
import socket
import threading
import urllib.error
import urllib.request

import pytest
from test_serve_engine import BOS, reference
from tokenizers import Tokenizer

from ttte2e.model import TTTModel
from ttte2e.platform.serve.engine import Sampling

from conftest import serving_model_folder

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory, ray_cluster):
    from ttte2e.platform.serve import app
    from ttte2e.platform.serve.engine import EngineSettings

    root = tmp_path_factory.mktemp("serving")
    folder = serving_model_folder(root / "model")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine = EngineSettings(
        max_batch=8,
        max_prompt_tokens=200,
        max_tokens=64,
        max_sessions_on_device=1,  # a second session on a replica moves the first out...
        max_host_bytes=0,  # ... past host memory, to storage
        session_storage=str(root / "sessions"),
    )
    settings = app.ServeSettings(
        str(folder), model_name="tiny", replicas=2, cpus_per_replica=0.5, engine=engine
    )
    try:
        url = app.start(settings, "127.0.0.1", port)
        model = TTTModel.from_pretrained(folder).eval()
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        yield client, url, model, tokenizer
    finally:
        app.stop()


def test_completions_chat_and_streaming(server):
    client, _, model, tok = server
    assert [m.id for m in client.models.list().data] == ["tiny"]
    prompt = "def wrap(text, width=70):"
    got = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    want, _ = reference(model, tok, [BOS] + tok.encode(prompt).ids, Sampling(12, temperature=0))
    assert got.choices[0].text == want
    assert got.usage.prompt_tokens == 1 + len(tok.encode(prompt).ids)
    assert got.usage.prompt_tokens_details.cached_tokens == 0

    pieces = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in pieces) == want

    messages = [{"role": "user", "content": "What does json.dumps do?"}]
    chat = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0
    )
    text = chat.choices[0].message.content
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 10
    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens


def _turn(client, session, prompt, sampling, **headers):
    raw = client.completions.with_raw_response.create(
        model="tiny", prompt=prompt, max_tokens=sampling.max_tokens,
        temperature=sampling.temperature, seed=sampling.seed,
        extra_headers={"X-Session-Id": session, **headers},
    )  # fmt: skip
    return raw.parse(), raw.headers


def test_a_session_continues_across_turns_evictions_and_a_killed_replica(server):
    import ray

    client, _, model, tok = server
    sampling = Sampling(max_tokens=16, temperature=0.8, seed=5)
    prompt, tokens = "import json\n", [BOS] + tok.encode("import json\n").ids
    history, replica = [], None
    for turn in range(3):
        if turn == 2:  # kill the replica that served the last turn: storage has the session
            for name in ray.util.list_named_actors(all_namespaces=True):
                if name["name"].startswith("SERVE_REPLICA") and name["name"].endswith(replica):
                    ray.kill(ray.get_actor(name["name"], namespace=name["namespace"]))
        other = _turn(client, f"other-{turn}", "x", Sampling(2, temperature=0))  # evicts
        got, headers = _turn(client, "conv", prompt, sampling)
        replica = headers["x-replica"]
        want, out = reference(model, tok, tokens, sampling)
        assert got.choices[0].text == want, turn
        cached = got.usage.prompt_tokens_details.cached_tokens
        assert cached == (0 if turn == 0 else len(history)), turn
        assert headers["x-session-restarted"] == "false"
        if turn == 2:
            assert headers["x-session-source"] == "storage"
        history = tokens + (out if out[-1] != BOS else out[:-1])
        question = f"\n# turn {turn + 1}: and then?\n"
        prompt += want + question
        tokens = history + tok.encode(question).ids
    assert other[0].choices[0].text is not None


def _post(url, path, body, headers=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        url + path, data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bad_input_gets_its_4xx_and_the_server_keeps_serving(server):
    client, url, _, _ = server
    ok = dict(model="tiny", prompt="import os", max_tokens=2)
    cases = [
        (b"{not json", {}, 400, "invalid_json"),
        (dict(ok, model="gpt-4"), {}, 404, "model_not_found"),
        (dict(ok, prompt="a " * 300), {}, 400, "prompt_too_long"),
        (dict(ok, max_tokens=65), {}, 400, "invalid_value"),
        (dict(ok, temperature=3), {}, 400, "invalid_value"),
        (dict(ok, n=3), {}, 400, "unsupported_parameter"),
        (ok, {"X-Session-Id": "never", "X-Session-Strict": "true"}, 404, "session_not_found"),
        (ok, {"X-Session-Id": "no/slash"}, 400, "invalid_session_id"),
    ]
    for body, headers, status, code in cases:
        got_status, got = _post(url, "/v1/completions", body, headers)
        assert (got_status, got["error"]["code"]) == (status, code), body
        assert got["error"]["type"] == "invalid_request_error"
    # (a busy session's 409 is tested in test_serve_engine.py: over HTTP the second request may
    # be routed to the other replica, where it runs from storage, by design)
    assert client.completions.create(**ok).choices[0].finish_reason in ("length", "stop")
    with urllib.request.urlopen(url + "/health", timeout=30) as r:
        assert json.loads(r.read())["status"] == "ok"


def test_the_server_answers_concurrent_sessions(server):
    client, _, model, tok = server
    results = {}

    def one(i):
        prompt = f"value_{i} = "
        got, _ = _turn(client, f"c{i}", prompt, Sampling(8, temperature=0))
        results[i] = (prompt, got.choices[0].text)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for prompt, text in results.values():
        assert text == reference(model, tok, [BOS] + tok.encode(prompt).ids, Sampling(8, 0))[0]
    assert len(results) == 6
