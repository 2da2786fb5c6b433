"""Benchmark: the distributed trainer on this machine. Tokens/s of the tiny preset with 1 vs 2
Ray Train workers (same global batch), and the meta-step overhead under DeepSpeed (1 worker,
ZeRO-2) against a plain single-process torch step on the same batch with the same thread count.

    python pipelines/bench/bench_train.py [--steps 12] [--docs 300]

Step times are medians over the steps after the first 2 (warm-up), all measured in one run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ttte2e.model import TTTModel
from ttte2e.platform.data.demo_corpus import write_demo_corpus
from ttte2e.platform.data.prepare import PrepareOptions, prepare
from ttte2e.platform.data.stream import StreamSpec, iter_batches
from ttte2e.platform.train.checkpoint import read_state
from ttte2e.platform.train.config import TrainConfig, check_options
from ttte2e.platform.train.driver import fit


def plain_step_seconds(cfg: TrainConfig, steps: int, threads: int) -> float:
    torch.set_num_threads(threads)
    model_cfg, geometry = check_options(cfg)
    torch.manual_seed(0)
    model = TTTModel(model_cfg.replace(compile=cfg.compile == "on"))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
    stream = iter_batches(StreamSpec(cfg.data, model_cfg.seq_len, geometry.sequences), epochs=100)
    times = []
    for _ in range(steps):
        _, windows = next(stream)
        start = time.perf_counter()
        for mb in torch.from_numpy(windows).split(cfg.micro_batch):
            (model.meta_loss(mb, eta=1.0).loss / geometry.accumulation).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    parser.add_argument("--docs", type=int, default=300, help="stdlib documents in the corpus")
    parser.add_argument("--batch", type=int, default=4, help="global batch in sequences")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="the meta step compiled (TrainConfig.compile; off by default, as training on CPU)",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    raw = write_demo_corpus(work / "raw", args.docs)
    prepare(
        PrepareOptions(
            input=str(raw),
            output=str(work / "data"),
            tokenizer="train:4096",
            val_fraction=0.05,
            shard_tokens=1_000_000,
        ),
        use_ray=False,
    )
    base = dict(
        preset="tiny",
        data=str(work / "data"),
        storage=str(work / "runs"),
        batch_tokens=args.batch * 512,
        steps=args.steps,
        lr=3e-3,
        eval_every=0,
        eval_windows=2,
        checkpoint_every=args.steps,
        tracking_uri="off",
        max_failures=0,
        compile="on" if args.compile else "off",
    )
    rows = {}
    for workers in (1, 2):
        cfg = TrainConfig(**base, workers=workers, name=f"w{workers}")
        result = fit(cfg)
        seconds = statistics.median(h["step_seconds"] for h in result["history"][2:])
        rows[workers] = dict(
            seconds=seconds,
            tokens_per_s=args.batch * 512 / seconds,
            threads=read_state(result["checkpoint"]).get("torch_threads"),
        )
    threads = rows[1]["threads"] or torch.get_num_threads()
    plain = plain_step_seconds(TrainConfig(**base), args.steps, threads)
    print(
        f"\ntiny preset, global batch {args.batch} x 512 tokens, {args.steps} steps per run "
        f"(medians after 2 warm-up steps)"
    )
    print("| run | step time (s) | tokens/s | vs 1 worker |")
    print("|---|---|---|---|")
    for workers, row in rows.items():
        print(
            f"| Ray Train + DeepSpeed ZeRO-2, {workers} worker(s) | {row['seconds']:.3f} | "
            f"{row['tokens_per_s']:,.0f} | {rows[1]['seconds'] / row['seconds']:.2f}x |"
        )
    print(
        f"| plain torch, one process, {threads} thread(s) | {plain:.3f} | "
        f"{args.batch * 512 / plain:,.0f} | {rows[1]['seconds'] / plain:.2f}x |"
    )
    print(
        f"\nDeepSpeed meta-step overhead (1 worker / plain process): "
        f"{rows[1]['seconds'] / plain:.2f}"
    )


if __name__ == "__main__":
    main()
