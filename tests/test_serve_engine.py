"""The serving replica's decode loop (platform/serve/engine.py) and the OpenAI request bodies
(platform/serve/openai_api.py), without Ray: concurrent requests decoded as one batch give what
`generate` gives each alone; a session's next turn reads only its new text and continues exactly;
every bad request is refused with its status before model work."""

import asyncio
import threading

import pytest
from tokenizers import Tokenizer

from ttte2e.model import TTTModel
from ttte2e.model.decode import generate
from ttte2e.platform.serve.engine import (
    Engine,
    EngineSettings,
    GenerationRequest,
    RequestError,
    Sampling,
)
from ttte2e.platform.serve.openai_api import ChatTemplate, parse_chat, parse_completion

from conftest import serving_model_folder

BOS = 1


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = serving_model_folder(tmp_path_factory.mktemp("serve") / "model")
    model = TTTModel.from_pretrained(folder).eval()
    return model, Tokenizer.from_file(str(folder / "tokenizer.json"))


@pytest.fixture
def engine(served):
    settings = EngineSettings(max_batch=8, max_prompt_tokens=200, max_tokens=64, read_chunk=16)
    eng = Engine(*served, settings)
    yield eng
    eng.close()


def run(engine, *requests):
    """Run requests concurrently; (start event, text, end event) of each."""

    async def one(request):
        events = [e async for e in engine.stream(request)]
        text = "".join(e["text"] for e in events if e["event"] == "text")
        return events[0], text, events[-1]

    async def all_of():
        return await asyncio.gather(*(one(r) for r in requests))

    return asyncio.run(all_of())


def reference(model, tokenizer, tokens, sampling):
    """What generate gives for these tokens alone: (text, tokens generated)."""
    out = generate(
        model,
        [tokens],
        sampling.max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        seed=sampling.seed,
        stop_tokens=(BOS,),
    )[0]
    text = tokenizer.decode([t for t in out if t != BOS])
    for stop in sampling.stop:
        text = text.split(stop)[0]
    return text, out


def test_concurrent_requests_are_one_batch_and_each_equals_generate_alone(served, engine):
    model, tok = served
    # the third is read in pieces of 16 (prefill, then extend)
    prompts = ["import json", "def dedent(text):", "import json\n" * 12, [5, 9, 77]]
    samplings = [
        Sampling(max_tokens=20, temperature=0),
        Sampling(max_tokens=33, temperature=0.8, top_p=0.9, seed=4),
        Sampling(max_tokens=7, temperature=0),
        Sampling(max_tokens=12, temperature=1.0, seed=1),
    ]
    results = run(engine, *(GenerationRequest(p, s) for p, s in zip(prompts, samplings)))
    for prompt, sampling, (start, text, end) in zip(prompts, samplings, results):
        tokens = [BOS] + tok.encode(prompt).ids if isinstance(prompt, str) else prompt
        want, out = reference(model, tok, tokens, sampling)
        assert text == want
        assert start["prompt_tokens"] == len(tokens) and start["cached_tokens"] == 0
        assert end["completion_tokens"] == len([t for t in out if t != BOS])
    assert engine.counters["max_rows"] >= 2  # decoded together, not one after another
    assert engine.counters["read_pieces"] >= 3 + 2


def test_a_sessions_next_turn_reads_only_its_new_text_and_continues_exactly(served, engine):
    model, tok = served
    sampling = Sampling(max_tokens=24, temperature=0.7, seed=11)
    first = "def fill(text, width=70, **kwargs):\n"
    ((start1, reply, end1),) = run(engine, GenerationRequest(first, sampling, "conv"))
    assert (start1["cached_tokens"], start1["restarted"]) == (0, False)
    ref1, out1 = reference(model, tok, [BOS] + tok.encode(first).ids, sampling)
    assert reply == ref1
    second = first + reply + "\n\nwhat does it return?\n"
    ((start2, reply2, _),) = run(engine, GenerationRequest(second, sampling, "conv"))
    # what the session read: BOS + the first prompt, then every generated token (a max_tokens
    # reply feeds its last one too); now only the new question
    fed = out1 if out1[-1] != BOS else out1[:-1]
    history = [BOS] + tok.encode(first).ids + fed
    new = tok.encode(second[len(first + reply) :]).ids
    assert (start2["cached_tokens"], start2["source"]) == (len(history), "device")
    assert start2["prompt_tokens"] == len(history) + len(new)
    assert reply2 == reference(model, tok, history + new, sampling)[0]
    assert end1["state_bytes"] > 0

    # an edited conversation starts over (said so); strict sessions refuse it
    ((start3, _, _),) = run(engine, GenerationRequest("something else", sampling, "conv"))
    assert (start3["restarted"], start3["cached_tokens"]) == (True, 0)
    ((err, _, _),) = run(engine, GenerationRequest("other text", sampling, "conv", strict=True))
    assert (err["status"], err["code"]) == (409, "session_conflict")
    ((err, _, _),) = run(engine, GenerationRequest("x", sampling, "nobody", strict=True))
    assert (err["status"], err["code"]) == (404, "session_not_found")


def test_a_chat_reply_cut_at_the_templates_stop_string_still_continues(served, engine):
    template = ChatTemplate(user="{content}", stop=("\n\nUser:",))
    model, tok = served
    body = dict(model="m", messages=[{"role": "user", "content": "def f(x):"}], max_tokens=20)
    parsed = parse_chat(dict(body, temperature=0), "m", 64, template)
    request = GenerationRequest(parsed.generation.prompt, parsed.generation.sampling, "chat")
    ((_, reply, _),) = run(engine, request)
    messages = body["messages"] + [
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "and g?"},
    ]
    again = parse_chat(dict(body, messages=messages, temperature=0), "m", 64, template)
    ((start, _, _),) = run(
        engine, GenerationRequest(again.generation.prompt, request.sampling, "chat")
    )
    assert not start["restarted"] and start["cached_tokens"] > 0


def test_a_long_new_message_is_read_beside_other_rows_decoding(engine):
    """Chunked prefill: another row's tokens keep coming while a 150-token message is read in
    pieces of 16 (extend), and the message's reply is what generate gives."""
    greedy = Sampling(max_tokens=4, temperature=0)
    ((_, reply, _),) = run(engine, GenerationRequest("import re", greedy, "long"))
    order, a_started, ended = [], threading.Event(), threading.Semaphore(0)

    def recorder(tag):
        def on_event(event):
            order.append((tag, event["event"]))
            if tag == "a" and event["event"] == "text":
                a_started.set()
            if event["event"] in ("end", "error"):
                ended.release()

        return on_event

    engine.submit(GenerationRequest("x = 1", Sampling(max_tokens=60, temperature=0)), recorder("a"))
    assert a_started.wait(60)
    message = "import re" + reply + " the" * 150
    engine.submit(GenerationRequest(message, Sampling(max_tokens=2), "long"), recorder("b"))
    assert ended.acquire(timeout=120) and ended.acquire(timeout=120)
    b_start = order.index(("b", "start"))
    b_next = next(i for i, e in enumerate(order) if e[0] == "b" and e[1] != "start")
    # a decoded while b's 150 tokens were read: 10 pieces, a decode step after each
    assert order[b_start:b_next].count(("a", "text")) >= 5, order
    assert engine.counters["read_pieces"] >= 1 + 1 + 10


def test_bad_requests_are_refused_before_model_work(served, engine):
    greedy = Sampling(max_tokens=3, temperature=0)
    ((_, reply, _),) = run(engine, GenerationRequest("import os", greedy, "kept"))
    history = "import os" + reply
    cases = [
        (GenerationRequest("a " * 300, greedy), 400, "prompt_too_long"),
        (GenerationRequest([1, 512], greedy), 400, "invalid_token_id"),
        (GenerationRequest("x", Sampling(max_tokens=65)), 400, "max_tokens_out_of_range"),
        (GenerationRequest("x", greedy, "bad id!"), 400, "invalid_session_id"),
        (GenerationRequest(history + "a " * 300, greedy, "kept"), 400, "prompt_too_long"),
    ]
    for request, status, code in cases:
        ((event, _, _),) = run(engine, request)
        assert (event["event"], event["status"], event["code"]) == ("error", status, code)
    # the refused turn left the session as it was: the next one continues it
    ((start, _, _),) = run(engine, GenerationRequest(history + " and more", greedy, "kept"))
    assert start["cached_tokens"] > 0 and start["source"] == "device"


def test_a_second_request_of_a_busy_session_gets_409(served, engine):
    started, events = threading.Event(), []

    def first(event):
        if event["event"] == "text":
            started.set()

    job = engine.submit(GenerationRequest("import", Sampling(64, temperature=0), "busy"), first)
    assert started.wait(60)
    engine.submit(GenerationRequest("import", Sampling(4), "busy"), events.append)
    for _ in range(600):
        if events:
            break
        threading.Event().wait(0.05)
    job.cancelled = True
    assert (events[0]["status"], events[0]["code"]) == (409, "session_busy")


@pytest.mark.parametrize(
    "body, status, code",
    [
        ([1, 2], 400, "invalid_request"),
        (dict(prompt="x"), 400, "invalid_value"),
        (dict(model="other", prompt="x"), 404, "model_not_found"),
        (dict(model="m", prompt=""), 400, "invalid_value"),
        (dict(model="m", prompt=["a", "b"]), 400, "invalid_value"),
        (dict(model="m", prompt="x", max_tokens=0), 400, "invalid_value"),
        (dict(model="m", prompt="x", max_tokens=65), 400, "invalid_value"),
        (dict(model="m", prompt="x", temperature=-1), 400, "invalid_value"),
        (dict(model="m", prompt="x", temperature="hot"), 400, "invalid_value"),
        (dict(model="m", prompt="x", top_p=0), 400, "invalid_value"),
        (dict(model="m", prompt="x", n=2), 400, "unsupported_parameter"),
        (dict(model="m", prompt="x", logprobs=3), 400, "unsupported_parameter"),
        (dict(model="m", prompt="x", presence_penalty=0.5), 400, "unsupported_parameter"),
        (dict(model="m", prompt="x", stop=[""]), 400, "invalid_value"),
        (dict(model="m", prompt="x", seed=1.5), 400, "invalid_value"),
        (dict(model="m", prompt="x", stream="yes"), 400, "invalid_value"),
        (dict(model="m", prompt="x", ignore_eos=1), 400, "invalid_value"),
    ],
)
def test_bad_completion_bodies(body, status, code):
    with pytest.raises(RequestError) as e:
        parse_completion(body, "m", 64)
    assert (e.value.status, e.value.code) == (status, code)


def test_chat_bodies_and_the_template():
    template = ChatTemplate()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi {there}"}]},
    ]
    parsed = parse_chat(dict(model="m", messages=messages), "m", 64, template)
    assert parsed.generation.prompt == "System: Be brief.\n\nUser: Hi {there}\n\nAssistant:"
    assert parsed.generation.sampling.stop == template.stop
    assert parsed.generation.sampling.max_tokens == 64
    for bad in ([], [{"role": "tool", "content": "x"}], [{"role": "user", "content": 3}]):
        with pytest.raises(RequestError, match="messages"):
            parse_chat(dict(model="m", messages=bad), "m", 64, template)
    with pytest.raises(ValueError, match="must start with the 'generation'"):
        ChatTemplate(assistant="Bot:{content}\n", generation="Assistant:")


def test_the_serve_command_refuses_bad_settings_before_starting_ray(served, tmp_path, capsys):
    import ray

    from ttte2e.platform.cli.serve import main

    model_without_tokenizer = tmp_path / "bare"
    served[0].save_pretrained(model_without_tokenizer)
    for argv, message in [
        ([str(tmp_path / "missing")], "does not exist"),
        ([str(model_without_tokenizer)], "no tokenizer.json"),
        ([str(model_without_tokenizer), "--mode", "fast"], "choose one of"),
        ([str(model_without_tokenizer), "--read-chunk", "0"], "read_chunk must be >= 1"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert not ray.is_initialized()


def test_the_cluster_serve_config_builds_the_application(tmp_path):
    import yaml
    from ray.serve import Application

    from ttte2e.platform.serve import app

    from conftest import REPO

    config = yaml.safe_load((REPO / "cluster" / "serve.yaml").read_text())
    (entry,) = config["applications"]
    module, name = entry["import_path"].split(":")
    builder = getattr(__import__(module, fromlist=[name]), name)
    assert builder is app.app_builder
    folder = serving_model_folder(tmp_path / "model")
    args = dict(entry["args"], model=str(folder), session_storage=str(tmp_path / "sessions"))
    assert isinstance(builder(args), Application)
    with pytest.raises(ValueError, match="unknown \\['replica'\\]"):
        builder(dict(args, replica=2))


def test_a_turn_ends_when_its_snapshot_is_stored_and_decoding_goes_on_meanwhile(served, tmp_path):
    eng = Engine(*served, EngineSettings(session_storage=str(tmp_path)))
    release, write = threading.Event(), eng.store._write_storage
    eng.store._write_storage = lambda *args: (release.wait(60), write(*args))  # slow storage
    ended = threading.Event()
    eng.submit(
        GenerationRequest("import os", Sampling(3, temperature=0), "durable"),
        lambda e: ended.set() if e["event"] == "end" else None,
    )
    for _ in range(600):  # the row is done and saved; its write waits
        if eng.counters["requests"] == 1 and not eng._rows and not eng.store._busy:
            break
        threading.Event().wait(0.01)
    ((_, text, end),) = run(eng, GenerationRequest("x = 1", Sampling(8, temperature=0)))
    assert end["event"] == "end" and not ended.is_set()  # decoded while the write was pending
    release.set()
    assert ended.wait(60) and (tmp_path / "durable.json").exists()
    eng.close()
