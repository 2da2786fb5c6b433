"""The README's main job: what users run on a cluster, on this machine with embedded defaults.

A private Ray head (`ray start --head`), then two `ray job submit`s against it, exactly as on a
real cluster: prepare_data (the Python standard library as a jsonl corpus, a BPE trained on it,
tokenized in Ray Data) and pretrain_3b.py with the tiny preset (Ray Train, 2 DeepSpeed ZeRO-2
workers, checkpoints to local storage, MLflow on sqlite, the final checkpoint registered in the
MLflow model registry). The head is stopped by PID at the end; then the registered version is
promoted to `champion` and pulled back to generate text, as users do after training, and served
(pipelines/serve.py, OpenAI API on loopback) for two turns of one session.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ttte2e.platform.cluster.local_head import LocalRayCluster
from ttte2e.platform.data.demo_corpus import write_demo_corpus

REPO = Path(__file__).resolve().parents[2]
MODEL_NAME = "ttte2e-demo-tiny"
PROMPT = "import os\n\n\ndef "


def run_demo(
    out_dir: str = "runs/demo",
    steps: int = 240,
    workers: int = 2,
    max_docs: int = 0,
    name: str = "",
    serve: bool = True,
) -> dict:
    out = Path(out_dir).resolve()
    name = name or time.strftime("tiny-%Y%m%d-%H%M%S")
    python = sys.executable

    def say(msg: str) -> None:
        print(f"[demo] {msg}", flush=True)

    say(f"1/6 corpus: the Python standard library as jsonl -> {out / 'raw'}")
    raw = write_demo_corpus(out / "raw", max_docs or None)
    with LocalRayCluster(num_cpus=2) as cluster:
        say(
            f"2/6 ray job submit -- python pipelines/prepare_data.py  (BPE 4096, Ray Data) -> "
            f"{out / 'data'}"
        )
        rc = cluster.submit(
            [
                python,
                "pipelines/prepare_data.py",
                "--input",
                str(raw),
                "--output",
                str(out / "data"),
                "--tokenizer",
                "train:4096",
                "--val-fraction",
                "0.05",
                "--shard-tokens",
                "1000000",
                "--row-group-tokens",
                "128",
            ],
            str(REPO),
        )
        if rc:
            raise SystemExit(f"[demo] the prepare_data job failed (exit status {rc})")
        say(
            f"3/6 ray job submit -- python pipelines/pretrain_3b.py --preset tiny  ({workers} "
            f"DeepSpeed ZeRO-2 workers, {steps} steps) -> {out / 'runs' / name}"
        )
        rc = cluster.submit(
            [
                python,
                "pipelines/pretrain_3b.py",
                "--preset",
                "tiny",
                "--data",
                str(out / "data"),
                "--storage",
                str(out / "runs"),
                "--name",
                name,
                "--workers",
                str(workers),
                "--batch-tokens",
                str(2 * 512),
                "--steps",
                str(steps),
                "--lr",
                "3e-3",
                "--eval-every",
                str(max(1, steps // 4)),
                "--eval-windows",
                "16",
                "--checkpoint-every",
                str(max(1, steps // 2)),
                "--experiment",
                "ttte2e-demo",
                "--register-as",
                MODEL_NAME,
            ],
            str(REPO),
        )
        if rc:
            raise SystemExit(f"[demo] the training job failed (exit status {rc})")
    result = json.loads((out / "runs" / name / "result.json").read_text())
    # which head it was (stopped above): its processes named its temp dir or GCS port
    result.update(ray_temp_dir=cluster.temp_dir, ray_gcs_port=cluster.gcs_port)
    final = (result.get("final_eval") or [{}])[0]
    uri = result["tracking_uri"]
    say(f"4/6 python pipelines/registry.py promote {MODEL_NAME} @candidate --to champion")
    _run(
        [
            python,
            "pipelines/registry.py",
            "promote",
            MODEL_NAME,
            "@candidate",
            "--to",
            "champion",
            "--tracking-uri",
            uri,
        ]
    )
    say(f"5/6 python pipelines/pull_model.py models:/{MODEL_NAME}@champion --prompt ...")
    _run(
        [
            python,
            "pipelines/pull_model.py",
            f"models:/{MODEL_NAME}@champion",
            "--prompt",
            PROMPT,
            "--max-new-tokens",
            "48",
            "--temperature",
            "0.7",
            "--tracking-uri",
            uri,
        ]
    )
    if serve:
        say(f"6/6 python pipelines/serve.py models:/{MODEL_NAME}@champion: two turns of a session")
        result["served"] = _serve_two_turns(python, uri, out, say)
    say("done")
    if final:
        say(
            f"held-out loss {final['val_loss']:.3f} with TTT vs {final['val_loss_no_ttt']:.3f} "
            f"without (same weights); beyond the first window {final['val_loss_beyond_window']:.3f}"
            f" vs {final['val_loss_beyond_window_no_ttt']:.3f}"
        )
    say(f"checkpoint : {result['checkpoint']}")
    say(f"             (TTTModel.from_pretrained('{result['checkpoint']}/model'))")
    say(f"plots      : {result['plot']}")
    if result.get("run_id"):
        say(f"MLflow run : {result['run_id']} in {result['tracking_uri']}")
        say(f"             (browse: mlflow ui --backend-store-uri {result['tracking_uri']})")
    registered = result.get("registered") or {}
    say(
        f"registry   : models:/{MODEL_NAME}@champion = version {registered.get('version')} "
        f"(ttte2e.platform.registry.model_registry.load_model('models:/{MODEL_NAME}@champion', '{uri}'))"
    )
    return result


def _serve_two_turns(python: str, tracking_uri: str, out: Path, say) -> dict:
    """Serve the champion on a free loopback port, ask two turns of one session (the second
    reads only its new text), stop the server with SIGTERM."""
    import signal
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = out / "serve.log"
    cmd = [
        python, "pipelines/serve.py", f"models:/{MODEL_NAME}@champion", "--tracking-uri",
        tracking_uri, "--port", str(port), "--model-name", "demo",
    ]  # fmt: skip
    with open(log, "w") as sink:
        server = subprocess.Popen(cmd, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while "ready: " not in log.read_text():
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit(f"[demo] the server did not start; see {log}")
            time.sleep(0.5)
        turns, prompt = [], PROMPT
        for turn in (1, 2):
            body = dict(model="demo", prompt=prompt, max_tokens=24, temperature=0.7, seed=turn)
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/completions",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json", "X-Session-Id": "demo"},
            )
            with urllib.request.urlopen(request, timeout=120) as r:
                reply = json.loads(r.read())
            text, usage = reply["choices"][0]["text"], reply["usage"]
            cached = usage["prompt_tokens_details"]["cached_tokens"]
            say(
                f"   turn {turn}: {usage['prompt_tokens']} prompt tokens, {cached} cached "
                f"-> {text!r}"
            )
            turns.append(dict(prompt_tokens=usage["prompt_tokens"], cached_tokens=cached))
            prompt += text + "\n\n\ndef "
    finally:
        server.send_signal(signal.SIGTERM)  # it removes the app and stops its own Ray
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    return dict(turns=turns, exit_code=server.returncode, log=str(log))


def _run(cmd: list[str]) -> None:
    rc = subprocess.run(cmd, cwd=REPO).returncode
    if rc:
        raise SystemExit(f"[demo] {' '.join(cmd[1:3])} failed (exit status {rc})")


@dataclass
class DemoOptions:
    out_dir: str = "runs/demo"
    """Where everything is written."""
    steps: int = 240
    """Optimizer steps of the tiny run."""
    workers: int = 2
    """Ray Train workers."""
    max_docs: int = 0
    """Corpus documents (0 = all)."""
    name: str = ""
    """Run name (default: tiny-<time>)."""
    serve: bool = True
    """Serve the pulled model for two turns of one session at the end."""


def main(argv: list[str] | None = None) -> None:
    from ttte2e.platform.cli.parsing import cli

    args = cli(DemoOptions, argv, __doc__.splitlines()[0], "demo")
    run_demo(args.out_dir, args.steps, args.workers, args.max_docs, args.name, args.serve)
