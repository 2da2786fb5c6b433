"""Benchmark: what a one-worker Tune trial costs before it trains. The same sweep (tiny preset at
small widths, one-worker trials, one at a time) run twice on a private Ray head: each trial
starting a TorchTrainer (a controller and a worker group), then each trial training in its own
process (what sweeps do).

    python pipelines/bench/bench_sweep.py [--trials 3] [--steps 2]

Per trial, Tune's clock from the trial's start to its first report, which comes after step 1
and its evaluation (eval every step, 2 held-out windows): `time_total_s` of the trial's first
result. Medians over the trials, both ways in one run (this machine is shared and noisy), and
the whole sweep's wall-clock time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from ttte2e.platform.cluster.local_head import LocalRayCluster
from ttte2e.platform.data.demo_corpus import write_demo_corpus
from ttte2e.platform.data.prepare import PrepareOptions, prepare
from ttte2e.platform.train.config import TrainConfig
from ttte2e.platform.tune.sweep import run_sweep

MODEL = dict(
    vocab_size=512,
    d_model=64,
    n_layers=4,
    n_heads=2,
    mlp_hidden=128,
    seq_len=128,
    window=32,
    chunk_size=16,
)


def first_reports(tune_dir: Path) -> dict[str, float]:
    """Each trial's seconds from its start to its first report (Tune's time_total_s)."""
    out = {}
    for result in sorted(tune_dir.glob("*/result.json")):
        with open(result) as f:
            first = json.loads(f.readline())
        out[result.parent.name] = first["time_total_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=3, help="trials per sweep (chunk sizes)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per trial")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    work = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    raw = write_demo_corpus(work / "raw", max_docs=40, files=2)
    prepare(
        PrepareOptions(
            input=str(raw),
            output=str(work / "data"),
            tokenizer="train:512",
            val_fraction=0.1,
            shard_tokens=50_000,
        ),
        use_ray=False,
    )
    chunks = [2**i for i in range(2, 2 + args.trials)]  # 4, 8, 16, ...: b <= k = 32
    base = TrainConfig(
        preset="tiny",
        model_overrides=MODEL,
        data=str(work / "data"),
        storage=str(work / "runs"),
        workers=1,
        batch_tokens=256,
        steps=args.steps,
        eval_every=1,
        eval_windows=2,
        checkpoint_every=args.steps,
        lr=3e-3,
        tracking_uri="off",
    )
    results = {}
    with LocalRayCluster(num_cpus=2) as head:
        os.environ["RAY_ADDRESS"] = head.gcs_address
        for label, in_trial in (("worker group (TorchTrainer)", False), ("in the trial", True)):
            name = "in-trial" if in_trial else "worker-group"
            started = time.perf_counter()
            out = run_sweep(
                dataclasses.replace(base, name=name),
                ["chunk"],
                {"chunk": chunks},
                baseline=False,
                concurrent=1,
                in_trial=in_trial,
            )
            wall = time.perf_counter() - started
            assert not out["errors"] and not out["interrupted"], out["rows"]
            firsts = first_reports(work / "runs" / name / "tune")
            assert len(firsts) == len(chunks), firsts
            results[label] = (statistics.median(firsts.values()), wall)
            print(
                f"trial start -> first report, {label}: median {results[label][0]:.1f} s over "
                f"{len(firsts)} trials ({', '.join(f'{v:.1f}' for v in firsts.values())}); "
                f"sweep of {len(chunks)} trials x {args.steps} steps: {wall:.1f} s",
                flush=True,
            )
    (before, wall_before), (after, wall_after) = results.values()
    print(
        f"in the trial / worker group: first report {after / before:.2f}x "
        f"({before:.1f} s -> {after:.1f} s), sweep wall-clock {wall_after / wall_before:.2f}x"
    )


if __name__ == "__main__":
    main()
