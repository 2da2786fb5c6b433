"""Evaluation of a trained model: loss versus context length (per-position NLL averaged in bins,
the paper's Figure 9 style) for TTT-E2E and the baselines decoded from the same weights, and a
single-needle-in-a-haystack test (RULER S-NIAH style) with accuracy by context length and depth.

Models are loaded from a model folder (config.json + safetensors), a training checkpoint (its
model/ folder), s3:// copies of either, or the MLflow registry (models:/NAME/VERSION or
models:/NAME@ALIAS, whose version source is such a folder).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from ttte2e.model import TTTModel
from ttte2e.model.decode import MODES, generate, prefill

MODE_LABELS = {"ttt": "TTT-E2E", "swa": "SWA (no TTT)", "full": "full attention"}


def load_model(uri: str, tracking_uri: str | None = None) -> TTTModel:
    """The model of a folder, checkpoint, s3:// copy or models:/ URI (platform/registry/model_registry.py)."""
    from ttte2e.platform.registry.model_registry import load_model as load

    return load(uri, tracking_uri).model


def _masked_nll(model: TTTModel, windows: torch.Tensor, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-position NLL [n, L] and target mask, one window at a time (bounded memory)."""
    nlls, masks = [], []
    for w in windows:
        _, nll = prefill(model, w[None], mode)
        nlls.append(nll[0].float().numpy())
        masks.append((w[1:] != model.config.bos_token_id).numpy())
    return np.stack(nlls), np.stack(masks)


def loss_vs_context(
    model: TTTModel,
    data: str,
    contexts: list[int],
    windows: int = 8,
    modes: tuple[str, ...] = MODES,
    bins: int = 16,
    seed: int = 0,
) -> dict:
    """{context: {mode: {"loss", "bins": [(start, end, loss)], "beyond_window"}}}."""
    from ttte2e.platform.data.stream import WindowReader

    out: dict = {}
    for context in contexts:
        if context < 2:
            raise ValueError(f"context {context} is too short")
        reader = WindowReader(data, "val", context, seed)
        n = min(windows, reader.windows_per_epoch)
        sample = torch.from_numpy(reader.windows(0, n))
        out[context] = {}
        for mode in modes:
            nll, mask = _masked_nll(model, sample, mode)
            edges = np.linspace(0, context, bins + 1).astype(int)
            binned = []
            for lo, hi in zip(edges[:-1], edges[1:]):
                m = mask[:, lo:hi]
                binned.append(
                    (int(lo), int(hi), float((nll[:, lo:hi] * m).sum() / max(m.sum(), 1)))
                )
            beyond = mask[:, model.config.window :]
            out[context][mode] = dict(
                loss=float((nll * mask).sum() / max(mask.sum(), 1)),
                bins=binned,
                windows=n,
                beyond_window=float((nll[:, model.config.window :] * beyond).sum() / beyond.sum())
                if beyond.sum()
                else None,
            )
    return out


def plot_loss_vs_context(results: dict, window: int, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    longest = max(results)
    for mode, r in results[longest].items():
        centers = [(lo + hi) / 2 for lo, hi, _ in r["bins"]]
        left.plot(centers, [v for _, _, v in r["bins"]], "o-", label=MODE_LABELS[mode])
    left.axvline(window, color="grey", linestyle=":", label=f"window k = {window}")
    left.set_xlabel("position in context"), left.set_ylabel("NLL (nats/token)")
    left.set_title(f"per-position loss, context {longest:,}"), left.legend()
    contexts = sorted(results)
    for mode in results[longest]:
        right.plot(
            contexts, [results[c][mode]["loss"] for c in contexts], "o-", label=MODE_LABELS[mode]
        )
    right.set_xscale("log", base=2), right.set_xlabel("context length")
    right.set_ylabel("mean loss"), right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUERY = (
    " What is the special magic number for {key} mentioned in the provided text? The special "
    "magic number for {key} mentioned in the provided text is:"
)
KEYS = [
    "apple",
    "river",
    "lantern",
    "violet",
    "harbor",
    "falcon",
    "meadow",
    "copper",
    "glacier",
    "orchid",
    "thunder",
    "saffron",
]


def niah(
    model: TTTModel,
    tokenizer_path: str,
    data: str,
    contexts: list[int],
    depths: list[float],
    trials: int = 4,
    mode: str = "ttt",
    seed: int = 0,
) -> dict:
    """Single needle in a haystack: a 7-digit value placed at a depth of a held-out haystack,
    asked for at the end; a trial passes when the greedy answer contains the value.
    Returns {(context, depth): accuracy}."""
    from tokenizers import Tokenizer

    from ttte2e.platform.data.stream import WindowReader

    tok = Tokenizer.from_file(tokenizer_path)
    rng = random.Random(seed)
    results = {}
    for context in contexts:
        reader = WindowReader(data, "val", context, seed)
        for depth in depths:
            hits = 0
            for trial in range(trials):
                key, value = rng.choice(KEYS), str(rng.randrange(1_000_000, 9_999_999))
                needle = tok.encode(" " + NEEDLE.format(key=key, value=value)).ids
                query = tok.encode(QUERY.format(key=key)).ids
                room = context - len(needle) - len(query)
                if room < 1:
                    raise ValueError(f"context {context} is too short for the needle and query")
                hay = reader.windows(trial % reader.windows_per_epoch, 1)[0][:room].tolist()
                at = int(depth * room)
                prompt = hay[:at] + needle + hay[at:] + query
                answer = generate(
                    model, [prompt], max_new_tokens=len(tok.encode(" " + value).ids) + 2, mode=mode
                )[0]
                hits += value in tok.decode(answer)
            results[(context, depth)] = hits / trials
    return results


def write_report(results: dict, niah_results: dict | None, out: Path, window: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "| context | "
        + " | ".join(f"{MODE_LABELS[m]} loss" for m in next(iter(results.values())))
        + " | TTT-E2E beyond window | SWA beyond window |",
        "|---" * (3 + len(next(iter(results.values())))) + "|",
    ]
    for context, r in sorted(results.items()):

        def beyond(mode):
            v = r.get(mode, {}).get("beyond_window")
            return "n/a" if v is None else f"{v:.4f}"

        lines.append(
            f"| {context:,} | "
            + " | ".join(f"{v['loss']:.4f}" for v in r.values())
            + f" | {beyond('ttt')} | {beyond('swa')} |"
        )
    table = "\n".join(lines)
    if niah_results:
        contexts = sorted({c for c, _ in niah_results})
        depths = sorted({d for _, d in niah_results})
        table += (
            "\n\nS-NIAH accuracy (rows: context, columns: needle depth)\n\n| context | "
            + " | ".join(f"{d:.0%}" for d in depths)
            + " |\n"
            + "|---" * (len(depths) + 1)
            + "|\n"
        )
        for c in contexts:
            table += (
                f"| {c:,} | " + " | ".join(f"{niah_results[(c, d)]:.2f}" for d in depths) + " |\n"
            )
    (out / "report.md").write_text(table + "\n")
    (out / "loss_vs_context.json").write_text(
        json.dumps({str(k): v for k, v in results.items()}, indent=1)
    )
    plot = plot_loss_vs_context(results, window, out / "loss_vs_context.png")
    return dict(table=table, plot=str(plot), report=str(out / "report.md"))
