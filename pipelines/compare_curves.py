"""Compare the training curves of runs (their metrics.json): one plot; how much the loss jumps
from step to step (mean |loss[s+1] - loss[s]|) and how much consecutive steps' losses move
together (lag-1 autocorrelation of the loss around its 21-step moving mean), both over the second
half of each run.

    python pipelines/compare_curves.py A/metrics.json B/metrics.json --labels before after \
        --out docs/demo_curve.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def step_jumps(losses: list[float]) -> float:
    half = np.asarray(losses[len(losses) // 2 :])
    return float(np.abs(np.diff(half)).mean())


def lag1_autocorrelation(losses: list[float], width: int = 21) -> float:
    """Consecutive batches from the same text give correlated losses (near 1); independent
    batches give near 0."""
    x = np.asarray(losses, dtype=float)
    trend = np.convolve(x, np.ones(width) / width, mode="same")
    r = (x - trend)[width:-width]
    r = r[len(r) // 2 :]
    r = r - r.mean()
    return float((r[1:] * r[:-1]).sum() / (r * r).sum())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("metrics", nargs="+", help="metrics.json of each run")
    parser.add_argument("--labels", nargs="+", help="one label per run")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args(argv)
    labels = args.labels or [Path(m).parent.name for m in args.metrics]
    if len(labels) != len(args.metrics):
        parser.error("give one label per metrics file")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for path, label in zip(args.metrics, labels):
        run = json.loads(Path(path).read_text())
        steps = [h["step"] for h in run["history"]]
        losses = [h["loss"] for h in run["history"]]
        final = run["evals"][-1] if run.get("evals") else {}
        print(
            f"{label}: {len(steps)} steps; mean |step-to-step change| of the train loss over "
            f"the second half {step_jumps(losses):.3f}; lag-1 autocorrelation "
            f"{lag1_autocorrelation(losses):.2f}; last held-out loss "
            f"{final.get('val_loss', float('nan')):.3f} (no TTT "
            f"{final.get('val_loss_no_ttt', float('nan')):.3f})"
        )
        ax.plot(steps, losses, label=f"{label} (train meta-loss)", linewidth=1)
    ax.set_xlabel("step"), ax.set_ylabel("loss (nats/token)"), ax.legend()
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
