"""The paper's central claim at toy scale, through this platform: the tiny TTT-E2E preset against
the same model with TTT off (eta = 0: sliding-window attention only, same parameters, same data,
same token budget), trained on long documents; validation loss overall and on the positions
beyond the first window (where only TTT can carry the earlier context).

    python pipelines/bench/bench_quality.py [--steps 300] [--workers 2] [--out runs/quality]

Paper's ordering: TTT-E2E below SWA beyond the window. Honest either way: the script prints what
it measures.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ttte2e.platform.data.demo_corpus import write_demo_books
from ttte2e.platform.data.prepare import PrepareOptions, prepare
from ttte2e.platform.train.config import TrainConfig
from ttte2e.platform.train.driver import fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per model")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    parser.add_argument("--batch", type=int, default=2, help="global batch in sequences of 512")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--eval-windows", type=int, default=64, help="held-out windows scored")
    parser.add_argument("--out", default="runs/quality", help="output folder")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    raw = write_demo_books(out / "raw")
    manifest = prepare(
        PrepareOptions(
            input=str(raw),
            output=str(out / "data"),
            tokenizer="train:4096",
            val_fraction=0.1,
            shard_tokens=1_000_000,
        ),
        use_ray=False,
    )
    print(
        f"long documents: {manifest['splits']['train']['documents']} train / "
        f"{manifest['splits']['val']['documents']} held-out books, "
        f"{manifest['counts']['tokens_written']:,} tokens"
    )
    results = {}
    for label, overrides in (("TTT-E2E", {}), ("SWA (TTT off, eta = 0)", {"inner_lr": 0.0})):
        cfg = TrainConfig(
            preset="tiny",
            model_overrides=overrides,
            data=str(out / "data"),
            storage=str(out / "runs"),
            name=label.split()[0].lower(),
            workers=args.workers,
            batch_tokens=args.batch * 512,
            steps=args.steps,
            lr=args.lr,
            eval_every=0,
            eval_windows=args.eval_windows,
            checkpoint_every=args.steps,
            tracking_uri="off",
            max_failures=0,
        )
        print(f"training {label} ({args.steps} steps x {args.batch * 512} tokens)", flush=True)
        results[label] = fit(cfg)["evals"][-1]
    (out / "quality.json").write_text(json.dumps(results, indent=1))
    print(
        f"\ntiny preset (T = 512, k = 128, b = 64), {args.steps} steps x {args.batch * 512} tokens, "
        f"held-out: {args.eval_windows} windows of long documents"
    )
    print("| model | val loss | val loss beyond the first window |")
    print("|---|---|---|")
    for label, e in results.items():
        print(f"| {label} | {e['val_loss']:.4f} | {e['val_loss_beyond_window']:.4f} |")
    ttt, swa = results["TTT-E2E"], results["SWA (TTT off, eta = 0)"]
    gap = swa["val_loss_beyond_window"] - ttt["val_loss_beyond_window"]
    print(
        f"\nbeyond the window, SWA - TTT-E2E = {gap:+.4f} nats/token "
        f"({'TTT-E2E lower, the paper' if gap > 0 else 'NOT the paper'}{chr(39)}s ordering)"
    )
    print(f"results: {out / 'quality.json'}")


if __name__ == "__main__":
    main()
