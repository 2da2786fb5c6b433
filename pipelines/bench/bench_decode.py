"""Benchmark: per-token decode latency vs context length (TTT-E2E, full attention, SWA without
TTT), the decode state's size, and prefill time per token vs context (TTT-E2E vs full attention).

    python pipelines/bench/bench_decode.py [--contexts 1024,4096,16384,32768] [--repeats 5] [--png out.png]
        [--batch-prompts 8]


Latency = the mean over whole groups of b decoded tokens (so the TTT step every b tokens is
counted), median over repeats from the same prefilled state, the repeats interleaved over
contexts and modes (this machine's noise is larger than the context's effect); tiny preset
(k = 128, b = 64), random weights (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from ttte2e.model import TTTModel, preset
from ttte2e.model.decode import decode_step, generate, prefill


def decode_latency(model, state, tokens: int, repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        s = copy.deepcopy(state)
        feed = torch.randint(2, model.config.vocab_size, (tokens,))
        start = time.perf_counter()
        for t in feed:
            decode_step(model, s, t[None])
        runs.append((time.perf_counter() - start) / tokens)
    return statistics.median(runs)


def batched_prompts(model, n: int, new_tokens: int, repeats: int) -> None:
    """Generation throughput of n prompts of n different lengths (1K + 37 i tokens), one call
    with all of them against one call per prompt (greedy, the same new tokens)."""
    cfg = model.config
    g = torch.Generator().manual_seed(2)
    prompts = [
        torch.randint(2, cfg.vocab_size, (1024 + 37 * i,), generator=g).tolist() for i in range(n)
    ]
    times = {"together": [], "one by one": []}
    for _ in range(repeats):
        start = time.perf_counter()
        together = generate(model, prompts, max_new_tokens=new_tokens)
        times["together"].append(time.perf_counter() - start)
        start = time.perf_counter()
        alone = [generate(model, [p], max_new_tokens=new_tokens)[0] for p in prompts]
        times["one by one"].append(time.perf_counter() - start)
    same = sum(a == b for a, b in zip(together, alone))
    rate = {k: n * new_tokens / statistics.median(v) for k, v in times.items()}
    print(
        f"\n{n} prompts of {n} lengths (1,024..{1024 + 37 * (n - 1):,} tokens), {new_tokens} new "
        f"tokens each, TTT-E2E greedy, prefill included; median of {repeats}:"
    )
    print(
        "\n| prompts | together tokens/s | one by one tokens/s | together / one by one | "
        "same tokens |"
    )
    print("|---|---|---|---|---|")
    print(
        f"| {n} | {rate['together']:.0f} | {rate['one by one']:.0f} | "
        f"{rate['together'] / rate['one by one']:.2f} | {same} / {n} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", default="1024,4096,16384,32768")
    parser.add_argument("--groups", type=int, default=2, help="groups of b tokens decoded per run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--prefill-windows", default="1,2,4,8,16", help="prefill lengths in windows of k"
    )
    parser.add_argument(
        "--batch-prompts",
        type=int,
        default=8,
        help="prompts of different lengths generated together (0: skip)",
    )
    parser.add_argument("--png", default="", help="write a plot here")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="prefill and decode's TTT steps through the compiled chunk step",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    contexts = [int(c) for c in args.contexts.split(",")]
    cfg = preset("tiny", seq_len=max(contexts))
    model = TTTModel(cfg.replace(compile=args.compile)).eval()
    n_tokens = args.groups * cfg.chunk_size
    print(
        f"tiny preset: k = {cfg.window}, b = {cfg.chunk_size}, {torch.get_num_threads()} threads; "
        f"decode {n_tokens} tokens ({args.groups} groups of b) x {args.repeats} repeats"
    )
    print(
        "\n| context | TTT-E2E ms/token | TTT-E2E tokens/s | full attention ms/token | "
        "SWA (no TTT) ms/token | TTT-E2E state | full-attention state |"
    )
    print("|---|---|---|---|---|---|---|")
    # warm-up (first calls allocate and initialise kernels): not measured
    warm, _ = prefill(model, torch.randint(2, cfg.vocab_size, (1, 2 * cfg.window)))
    decode_latency(model, warm, n_tokens, 1)
    states = {}
    for context in contexts:
        prompt = torch.randint(2, cfg.vocab_size, (1, context))
        for mode in ("ttt", "full", "swa"):
            states[context, mode] = prefill(model, prompt, mode)[0]
    # Repeats interleaved over contexts and modes, so machine noise hits all cells alike.
    runs: dict = {key: [] for key in states}
    for _ in range(args.repeats):
        for key, state in states.items():
            runs[key].append(decode_latency(model, state, n_tokens, 1))
    rows = {c: {} for c in contexts}
    for (context, mode), state in states.items():
        rows[context][mode] = statistics.median(runs[context, mode])
        rows[context][mode + "_bytes"] = state.nbytes()
    for context, row in rows.items():
        print(
            f"| {context:,} | {row['ttt'] * 1e3:.2f} | {1 / row['ttt']:.0f} | {row['full'] * 1e3:.2f} | "
            f"{row['swa'] * 1e3:.2f} | {row['ttt_bytes'] / 2**20:.2f} MiB | "
            f"{row['full_bytes'] / 2**20:.2f} MiB |"
        )
    first, last = contexts[0], contexts[-1]
    print(
        f"\nTTT-E2E latency {last} / {first}: {rows[last]['ttt'] / rows[first]['ttt']:.2f} "
        f"(target <= 1.10); full attention: {rows[last]['full'] / rows[first]['full']:.2f}; "
        f"SWA: {rows[last]['swa'] / rows[first]['swa']:.2f}"
    )

    if args.batch_prompts:
        batched_prompts(model, args.batch_prompts, args.groups * cfg.chunk_size, args.repeats)

    print("\n| prefill T | windows | TTT-E2E ms/token | full attention ms/token | full / TTT-E2E |")
    print("|---|---|---|---|---|")
    prefill_rows = {}
    for w in (int(x) for x in args.prefill_windows.split(",")):
        t = w * cfg.window
        prompt = torch.randint(2, cfg.vocab_size, (1, t))
        times = {}
        for mode in ("ttt", "full"):
            runs = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                prefill(model, prompt, mode)
                runs.append((time.perf_counter() - start) / t)
            times[mode] = statistics.median(runs)
        prefill_rows[w] = times
        print(
            f"| {t:,} | {w} | {times['ttt'] * 1e3:.3f} | {times['full'] * 1e3:.3f} | "
            f"{times['full'] / times['ttt']:.2f} |"
        )
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        for mode, label in (("ttt", "TTT-E2E"), ("full", "full attention"), ("swa", "SWA")):
            a.plot(contexts, [rows[c][mode] * 1e3 for c in contexts], "o-", label=label)
        a.set_xscale("log", base=2), a.set_xlabel("context"), a.set_ylabel("ms / token")
        a.set_title("decode latency"), a.legend()
        ws = sorted(prefill_rows)
        for mode, label in (("ttt", "TTT-E2E"), ("full", "full attention")):
            b.plot(
                [w * cfg.window for w in ws],
                [prefill_rows[w][mode] * 1e3 for w in ws],
                "o-",
                label=label,
            )
        b.set_xscale("log", base=2), b.set_xlabel("prompt length"), b.set_ylabel("ms / token")
        b.set_title("prefill time per token"), b.legend()
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)
        print(f"\nplot: {args.png}")


if __name__ == "__main__":
    main()
