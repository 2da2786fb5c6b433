"""Serving benchmark, one run, everything through the HTTP API (the official openai client against
a local Ray Serve app on loopback): a session's per-turn latency and state bytes after 1, 10 and 50
turns, beside the same conversation replayed statelessly (the whole history every turn, as a
KV-cache server without a prefix cache reads it); N concurrent sessions (time to first token,
inter-token latency, tokens/s); a session's eviction and restore.

    python pipelines/bench_serve.py                       # the tiny preset, random weights
    python pipelines/bench_serve.py --model runs/demo/model --sessions 8,32 --json bench.json

Ratios are measured in this run (this machine is shared and noisy); the figures in the README
come from this command. Bounded: 9 x 50 turns + 3 x 50 replayed turns + 8 + 32 requests.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path


def _tiny_model_folder(folder: Path) -> Path:
    """The tiny preset with random weights and a byte-level BPE trained on a few stdlib sources
    (decode cost does not depend on the weights' values)."""
    import json as json_module
    import textwrap

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from ttte2e.model import TTTModel, preset
    from ttte2e.model.model_folder import write_tokenizer

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    corpus = [Path(m.__file__).read_text() for m in (json_module, textwrap, argparse, statistics)]
    tokenizer.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=4096,
            special_tokens=["<pad>", "<bos>", "<eos>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    torch.manual_seed(0)
    TTTModel(preset("tiny", vocab_size=tokenizer.get_vocab_size())).save_pretrained(folder)
    write_tokenizer(folder, tokenizer.to_str().encode())
    return folder


MESSAGES = [
    "Explain what this function returns when the input is empty.",
    "Now rewrite it so that it streams the result line by line.",
    "What happens to the indentation of the first line?",
    "Add a test for a string with tabs and trailing spaces.",
    "Which of these cases would break the old version?",
]


def _message(turn: int) -> str:
    return f"\n\nUser: {MESSAGES[turn % len(MESSAGES)]} (turn {turn + 1})\n\nAssistant:"


def _conversation(client, model, turns, max_tokens, session):
    """One conversation; per turn (latency s, cached tokens, prompt tokens, state bytes)."""
    prompt, rows = "System: answer briefly.", []
    for turn in range(turns):
        prompt += _message(turn)
        headers = {"X-Session-Id": session} if session else {}
        t0 = time.perf_counter()
        raw = client.completions.with_raw_response.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
            extra_body=dict(ignore_eos=True), extra_headers=headers,
        )  # fmt: skip
        got = raw.parse()
        latency = time.perf_counter() - t0
        usage = got.usage
        state = int(raw.headers.get("x-session-state-bytes", 0))
        rows.append(
            (latency, usage.prompt_tokens_details.cached_tokens, usage.prompt_tokens, state)
        )
        prompt += got.choices[0].text
    return rows


def _concurrent(client, model, n, max_tokens):
    """n sessions, one streamed turn each, all at once: TTFTs, inter-token gaps, tokens/s."""
    ttfts, gaps, tokens, errors = [], [], [0], []
    lock, barrier = threading.Lock(), threading.Barrier(n)

    def one(i):
        prompt = f"System: answer briefly.{_message(i)}"
        barrier.wait()
        try:
            t0 = last = time.perf_counter()
            first, mine = None, []
            stream = client.completions.create(
                model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body=dict(ignore_eos=True),
                extra_headers={"X-Session-Id": f"load-{n}-{i}"},
            )  # fmt: skip
            count = 0
            for chunk in stream:
                now = time.perf_counter()
                if chunk.choices and chunk.choices[0].text:
                    if first is None:
                        first = now - t0
                    else:
                        mine.append(now - last)
                    last = now
                if chunk.usage is not None:
                    count = chunk.usage.completion_tokens
            with lock:
                ttfts.append(first)
                gaps.extend(mine)
                tokens[0] += count
        except Exception as e:  # noqa: BLE001 - counted and reported
            with lock:
                errors.append(repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    wall = time.perf_counter() - t0
    return dict(
        sessions=n,
        ttft_p50_ms=1e3 * _pct(ttfts, 50),
        ttft_p99_ms=1e3 * _pct(ttfts, 99),
        itl_p50_ms=1e3 * _pct(gaps, 50),
        itl_p99_ms=1e3 * _pct(gaps, 99),
        tokens_per_s=tokens[0] / wall,
        errors=len(errors),
    )


def _pct(values, q):
    values = sorted(v for v in values if v is not None)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def _eviction(folder: Path, turns: int, storage: str) -> dict:
    """A session's state after `turns` turns: device -> host bytes -> storage and back (ms)."""
    import torch

    from ttte2e.platform.registry.model_registry import load_weights
    from ttte2e.platform.serve.engine import Engine, EngineSettings, GenerationRequest, Sampling

    model, tokenizer = load_weights(str(folder))
    engine = Engine(model, tokenizer, EngineSettings(session_storage=storage))
    done = threading.Event()
    prompt = "System: answer briefly."
    for turn in range(turns):
        prompt += _message(turn)
        done.clear()
        text = []

        def on_event(e, text=text):
            if e["event"] == "text":
                text.append(e["text"])
            if e["event"] in ("end", "error"):
                done.set()

        engine.submit(GenerationRequest(prompt, Sampling(8, 0, ignore_eos=True), "s"), on_event)
        done.wait(120)
        prompt += "".join(text)
    engine.close()
    store, times = engine.store, {}
    record = store._records["s"]
    from ttte2e.model.decode_snapshot import restore, snapshot

    t0 = time.perf_counter()
    blob = snapshot(model, record.state)
    times["evict_to_host_ms"] = 1e3 * (time.perf_counter() - t0)
    t0 = time.perf_counter()
    state = restore(model, blob)
    times["restore_from_host_ms"] = 1e3 * (time.perf_counter() - t0)
    t0 = time.perf_counter()
    fresh = type(store)(model, storage=storage)
    resumed = fresh.resume("s", prompt)
    times["restore_from_storage_ms"] = 1e3 * (time.perf_counter() - t0)
    assert resumed.source == "storage" and torch.equal(
        resumed.state.last_logits, state.last_logits
    ), "a restored state differs"
    times["snapshot_bytes"] = len(blob)
    return times


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="", help="model folder (default: tiny, random)")
    parser.add_argument("--turns", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3, help="stateless replays")
    parser.add_argument(
        "--session-repeats", type=int, default=9, help="session conversations (cheap: more)"
    )
    parser.add_argument("--max-tokens", type=int, default=16, help="reply tokens per turn")
    parser.add_argument("--sessions", default="8,32", help="concurrent sessions to measure")
    parser.add_argument("--cpus", type=float, default=1.0, help="CPUs of the model replica")
    parser.add_argument("--json", default="", help="also write the figures here")
    args = parser.parse_args(argv)
    if args.turns < 10 or min(args.repeats, args.session_repeats, args.max_tokens) < 1:
        parser.error("--turns >= 10; --repeats, --session-repeats and --max-tokens >= 1")
    sessions = [int(n) for n in args.sessions.split(",") if n]

    import openai
    import ray
    import torch

    from ttte2e.platform.cluster.ray_runtime import ensure_ray
    from ttte2e.platform.serve import app
    from ttte2e.platform.serve.engine import EngineSettings

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    folder = Path(args.model) if args.model else _tiny_model_folder(work / "model")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.pop("RAY_ADDRESS", None)
    ensure_ray()
    engine = EngineSettings(
        max_batch=max(sessions + [8]), max_tokens=max(64, args.max_tokens),
        max_sessions_on_device=2 * max(sessions + [8]), session_storage=str(work / "sessions"),
    )  # fmt: skip
    settings = app.ServeSettings(
        str(folder), model_name="bench", cpus_per_replica=args.cpus, engine=engine
    )
    out: dict = dict(torch=torch.__version__, threads_per_replica=max(1, int(args.cpus)))
    try:
        url = app.start(settings, "127.0.0.1", port)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        _conversation(client, "bench", 2, args.max_tokens, "warm-up")
        stateful, stateless = [], []
        per_replay = max(1, args.session_repeats // args.repeats)
        for r in range(args.session_repeats):  # interleaved: drifts hit both kinds alike
            stateful.append(_conversation(client, "bench", args.turns, args.max_tokens, f"s{r}"))
            if (r + 1) % per_replay == 0 and len(stateless) < args.repeats:
                stateless.append(_conversation(client, "bench", args.turns, args.max_tokens, None))
        while len(stateless) < args.repeats:
            stateless.append(_conversation(client, "bench", args.turns, args.max_tokens, None))
        marks = sorted({1, 10, args.turns})
        table = []
        for turn in marks:
            row = dict(turn=turn)
            for name, runs in (("session", stateful), ("stateless", stateless)):
                row[f"{name}_latency_ms"] = 1e3 * statistics.median(r[turn - 1][0] for r in runs)
                row[f"{name}_prompt_tokens"] = runs[0][turn - 1][2]
            row["session_cached_tokens"] = stateful[0][turn - 1][1]
            row["session_state_bytes"] = stateful[0][turn - 1][3]
            table.append(row)
        out["turns"] = table
        out["session_ratio_last_to_first"] = (
            table[-1]["session_latency_ms"] / table[0]["session_latency_ms"]
        )
        out["session_ratio_last_to_tenth"] = (
            table[-1]["session_latency_ms"] / table[1]["session_latency_ms"]
        )
        out["stateless_ratio_last_to_first"] = (
            table[-1]["stateless_latency_ms"] / table[0]["stateless_latency_ms"]
        )
        states = {r[3] for runs in stateful for r in runs}
        out["state_bytes_distinct"] = sorted(states)
        out["concurrent"] = [_concurrent(client, "bench", n, args.max_tokens) for n in sessions]
    finally:
        app.stop()
        ray.shutdown()
    torch.set_num_threads(max(1, int(args.cpus)))
    out["eviction"] = _eviction(folder, 10, str(work / "evict"))
    _print(out, args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


def _print(out: dict, args) -> None:
    print(
        f"per turn (median of {args.session_repeats} session conversations and "
        f"{args.repeats} stateless replays; {args.max_tokens} reply tokens):"
    )
    print("turn  session ms  cached  prompt tok  state bytes | stateless ms  prompt tok")
    for r in out["turns"]:
        print(
            f"{r['turn']:>4}  {r['session_latency_ms']:>10.1f}  {r['session_cached_tokens']:>6}"
            f"  {r['session_prompt_tokens']:>10}  {r['session_state_bytes']:>11,} |"
            f" {r['stateless_latency_ms']:>12.1f}  {r['stateless_prompt_tokens']:>10}"
        )
    print(
        f"turn {args.turns} / turn 1 latency: session {out['session_ratio_last_to_first']:.2f} "
        f"(turn {args.turns} / turn 10: {out['session_ratio_last_to_tenth']:.2f}), stateless "
        f"{out['stateless_ratio_last_to_first']:.2f}; session state bytes over all turns: "
        f"{out['state_bytes_distinct']}"
    )
    print("concurrent sessions (one streamed turn each):")
    for c in out["concurrent"]:
        print(
            f"  {c['sessions']:>3} sessions: TTFT p50 {c['ttft_p50_ms']:.0f} ms p99 "
            f"{c['ttft_p99_ms']:.0f} ms; inter-token p50 {c['itl_p50_ms']:.1f} ms p99 "
            f"{c['itl_p99_ms']:.1f} ms; {c['tokens_per_s']:.0f} tokens/s; errors {c['errors']}"
        )
    e = out["eviction"]
    print(
        f"eviction: snapshot {e['snapshot_bytes']:,} bytes; to host {e['evict_to_host_ms']:.2f} ms,"
        f" restore from host {e['restore_from_host_ms']:.2f} ms, from storage (local folder) "
        f"{e['restore_from_storage_ms']:.2f} ms"
    )


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
