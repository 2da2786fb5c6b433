"""Benchmark: tokenization throughput of prepare_data and the training stream's throughput,
against the tiny preset's consumption (meta-train tokens/s) on this machine.

    python pipelines/bench/bench_data.py [--docs 800] [--steps 6] [--seq-len 512]

Target: the stream delivers >= 10x what training consumes. Also the read amplification of the
shuffled training stream (tokens decoded / tokens used) with 1..8 ranks, each reading its own
windows of every global batch, at two row-group sizes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from ttte2e.model import TTTModel, preset
from ttte2e.platform.data.demo_corpus import stdlib_documents
from ttte2e.platform.data.prepare import PrepareOptions, prepare
from ttte2e.platform.data.stream import (
    StreamPosition,
    StreamSpec,
    WindowReader,
    iter_batches,
    worker_stream,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=800, help="stdlib documents in the corpus")
    parser.add_argument("--files", type=int, default=8, help="input jsonl files")
    parser.add_argument("--steps", type=int, default=6, help="meta-train steps timed")
    parser.add_argument("--seq-len", type=int, default=512, help="T of the amplification runs")
    args = parser.parse_args()
    cfg = preset("tiny")
    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    docs = stdlib_documents(args.docs)
    raw = work / "raw"
    raw.mkdir()
    for f in range(args.files):
        with open(raw / f"part{f:03d}.jsonl", "w") as out:
            for _, text in docs[f :: args.files]:
                out.write(json.dumps({"text": text}) + "\n")
    # the tokenizer is trained once, outside the timed runs
    tok_ds = work / "tok"
    tokenizer = prepare(
        PrepareOptions(
            input=str(raw / "part000.jsonl"),
            output=str(tok_ds),
            tokenizer=f"train:{cfg.vocab_size}",
        ),
        use_ray=False,
    )["tokenizer"]["file"]
    results = {}
    for mode in ("in-process", "ray"):
        start = time.perf_counter()
        manifest = prepare(
            PrepareOptions(
                input=str(raw),
                output=str(work / f"ds-{mode}"),
                tokenizer=str(tok_ds / tokenizer),
                shard_tokens=1_000_000,
            ),
            use_ray=mode == "ray",
        )
        seconds = time.perf_counter() - start
        results[f"prepare_{mode}"] = manifest["counts"]["tokens_written"] / seconds
    dataset = str(work / "ds-ray")

    spec = StreamSpec(dataset, seq_len=cfg.seq_len, global_batch=8)
    start, tokens = time.perf_counter(), 0
    for _, windows in iter_batches(spec):
        tokens += windows.size
    results["stream_plain"] = tokens / (time.perf_counter() - start)
    steps = spec.steps_per_epoch(WindowReader(dataset, "train", cfg.seq_len))
    start, tokens = time.perf_counter(), 0
    for _, windows in worker_stream(spec, 0, StreamPosition(), steps, use_ray_data=True):
        tokens += windows.size
    results["stream_ray"] = tokens / (time.perf_counter() - start)

    model = TTTModel(cfg)
    batch = next(iter_batches(StreamSpec(dataset, cfg.seq_len, 2)))[1]
    tokens_t = torch.from_numpy(batch)
    model.meta_loss(tokens_t).loss.backward()
    start = time.perf_counter()
    for _ in range(args.steps):
        model.zero_grad(set_to_none=True)
        model.meta_loss(tokens_t).loss.backward()
    results["consumption_tiny"] = args.steps * tokens_t.numel() / (time.perf_counter() - start)

    amplification = []
    for group in (args.seq_len // 4, args.seq_len * 4):
        ds = str(work / f"ds-rg{group}")
        prepare(
            PrepareOptions(
                input=str(raw),
                output=ds,
                tokenizer=str(tok_ds / tokenizer),
                shard_tokens=1_000_000,
                row_group_tokens=group,
            ),
            use_ray=False,
        )
        for ranks in (1, 2, 4, 8):
            spec = StreamSpec(ds, seq_len=args.seq_len, global_batch=8, world_size=ranks)
            readers = [WindowReader(ds, "train", args.seq_len) for _ in range(ranks)]
            for step in range(spec.steps_per_epoch(readers[0])):  # one epoch
                for rank, reader in enumerate(readers):
                    spec.read(reader, 0, step, rank)
            used = sum(r.stats.tokens_used for r in readers)
            decoded = sum(r.stats.tokens_decoded for r in readers)
            footer = sum(r.stats.footer_bytes for r in readers)
            amplification.append((group, ranks, decoded / used, footer / (4 * used)))

    print("| what | tokens/s | x tiny consumption |")
    print("|---|---|---|")
    for name, rate in results.items():
        print(f"| {name} | {rate:,.0f} | {rate / results['consumption_tiny']:.1f} |")
    print()
    print(f"read amplification, T = {args.seq_len}, global batch 8 windows, one shuffled epoch:")
    print("| row group tokens | ranks | tokens decoded / used | footer bytes / token bytes used |")
    print("|---|---|---|---|")
    for group, ranks, amp, footer in amplification:
        print(f"| {group} | {ranks} | {amp:.2f} | {footer:.3f} |")


if __name__ == "__main__":
    main()
