"""GPU check of the attention kernels: correctness in bf16, timings, the meta-train step.

Torch + Triton only (no Ray, DeepSpeed, MLflow, flash-attn needed; flash-attn is timed if it
imports). Runs from a plain checkout: if `ttte2e` is not installed, the repo folders are mapped to
it here, so `PYTHONPATH` or `pip install` are not needed.

    python pipelines/gpu_check.py --out results.json          # on a GPU, ~3-5 min
    TRITON_INTERPRET=1 python pipelines/gpu_check.py --smoke  # CPU dry run (tests use it)

1. correctness (bf16 and fp32): our Triton kernel vs the fp32 PyTorch reference, forward and
   backward, prefix (T = 2K, k = 500) and chunk (b = 256 over [k = 1000 + b], invalid cache rows);
   the chunk op's second order (Triton forward, backward, double backward) vs the math path.
2. timings, bf16, B = 1, H = 16, dh = 128, k = 8K, T = 8K and 32K: forward and forward+backward
   of our Triton kernel, SDPA with the sliding window as a mask (what PyTorch offers for it),
   SDPA causal over the full sequence (flash; not windowed: the full-attention cost), flash-attn
   window_size if importable.
3. one suffix block on one chunk (b = 1K over [k = 8K + b], 16 heads, dh 128, bf16): output,
   inner gradient (create_graph=True), outer backward; fused (Triton forward, backward and double
   backward) vs math: time and peak memory.
4. meta-train step (loss forward + backward, bf16 autocast, remat 'chunk') with the suffix chunk
   attention fused (Triton forward, backward, double backward) vs math: time and peak memory.
5. the meta step eager against compiled (TTTConfig.compile; bf16 autocast, remat 'chunk') at the
   125M and 760M presets' shapes (T 8K): time, MFU, the first (compiling) step, the losses.
6. host offload (none / carries / prefix / all) of a 1B meta step at the longest T that fits:
   peak GPU memory, time, host bytes held, the same loss.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def import_ttte2e():
    """Import ttte2e from the installed package, or map the repo's folders to it."""
    try:
        importlib.import_module("ttte2e.kernels.attention")
        return
    except ImportError:
        pass
    root = types.ModuleType("ttte2e")
    root.__path__ = []
    sys.modules["ttte2e"] = root
    for name in ("kernels", "model"):
        folder = REPO / name
        init = folder / "__init__.py"
        if init.exists():
            spec = importlib.util.spec_from_file_location(
                f"ttte2e.{name}", init, submodule_search_locations=[str(folder)]
            )
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        else:  # a namespace folder (kernels/ has no __init__.py on purpose)
            module = types.ModuleType(f"ttte2e.{name}")
            module.__path__ = [str(folder)]
            sys.modules[module.__name__] = module
        setattr(root, name, module)


def timed(fn, device: str, repeats: int) -> float:
    """Median seconds of fn() after one warm-up (compilation) call."""
    fn()
    samples = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def correctness(device: str, smoke: bool) -> dict:
    from ttte2e.kernels import attention
    from ttte2e.kernels.attention import reference

    results = {}
    gen = torch.Generator(device="cpu").manual_seed(0)
    cases = [("prefix", 1, 4, 2048, 2048, 64, 500, 0), ("chunk", 2, 4, 256, 1256, 128, 1000, 300)]
    if smoke:
        cases = [("prefix", 1, 2, 40, 40, 16, 9, 0), ("chunk", 1, 2, 8, 24, 16, 12, 5)]
    for name, batch, heads, n_q, n_k, dim, window, first_valid in cases:
        base = [
            torch.randn(batch, heads, n, dim, generator=gen).to(device) for n in (n_q, n_k, n_k)
        ]
        upstream = torch.randn(batch, heads, n_q, dim, generator=gen).to(device)
        ref_in = [t.clone().requires_grad_() for t in base]
        ref_out = reference.chunk_attention(*ref_in, window, first_valid)
        ref_grads = torch.autograd.grad(ref_out, ref_in, upstream)
        for dtype in (torch.bfloat16, torch.float32):
            inputs = [t.to(dtype).requires_grad_() for t in base]
            if name == "prefix":
                out = attention.sliding_window_attention(*inputs, window, backend="triton")
            else:
                out = attention.chunk_attention(*inputs, window, first_valid, backend="triton")
            got = torch.autograd.grad(out, inputs, upstream.to(dtype))
            errors = {"out": rel_err(out, ref_out)}
            errors.update({f"d{n}": rel_err(g, r) for n, g, r in zip("qkv", got, ref_grads)})
            results[f"{name}_{str(dtype).split('.')[-1]}"] = errors
    # second order through the chunk op vs the math path, float32
    n_q, n_k, window = (8, 24, 12) if smoke else (128, 640, 512)
    second = []
    for backend in ("triton", "math"):
        q, k, v = (
            torch.randn(
                1, 2, n, 64 if not smoke else 16, generator=torch.Generator().manual_seed(n)
            )
            .to(device)
            .requires_grad_()
            for n in (n_q, n_k, n_k)
        )
        out = attention.chunk_attention(q, k, v, window, 3, backend=backend)
        inner = torch.autograd.grad((out * out).sum(), (q, k, v), create_graph=True)
        outer = torch.autograd.grad(sum((g * g).sum() for g in inner), (q, k, v))
        second.append([*inner, *outer])
    results["chunk_second_order_fp32"] = {
        name: rel_err(a, b) for name, a, b in zip(["dq", "dk", "dv", "ddq", "ddk", "ddv"], *second)
    }
    worst_bf16 = max(v for k, r in results.items() if "bfloat16" in k for v in r.values())
    worst_fp32 = max(v for k, r in results.items() if "bfloat16" not in k for v in r.values())
    # the self-check a training job runs before the kernels' first automatic use on a GPU
    from ttte2e.kernels.attention import self_check

    for dtype in (torch.float32, torch.bfloat16):
        failures = self_check.run_checks(torch.device(device), dtype)
        results[f"self_check_{str(dtype).split('.')[-1]}"] = (
            "passed" if not failures else "; ".join(f"{n}: {why}" for n, why in failures)
        )
    results["ok"] = (
        worst_bf16 < 2e-2
        and worst_fp32 < 1e-4
        and all(results[f"self_check_{d}"] == "passed" for d in ("float32", "bfloat16"))
    )
    return results


def timings(device: str, smoke: bool, repeats: int) -> list[dict]:
    import torch.nn.functional as F

    from ttte2e.kernels.attention import flash, reference, sliding_window_attention

    heads, dim, window = (2, 16, 16) if smoke else (16, 128, 8192)
    seqs = (64,) if smoke else (8192, 32768)
    dtype = torch.float32 if smoke else torch.bfloat16
    rows = []
    for seq in seqs:
        q, k, v = (
            torch.randn(1, heads, seq, dim, device=device, dtype=dtype).requires_grad_()
            for _ in range(3)
        )
        upstream = torch.randn_like(q)
        paths = {
            "triton": lambda: sliding_window_attention(q, k, v, window, backend="triton"),
            "sdpa_full_causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        }
        if seq <= 8192 or smoke:  # a T x T boolean mask at 32K is 1 GiB and slow: skipped there
            positions = torch.arange(seq, device=device)
            mask = reference.window_mask(positions, positions, window)
            paths["sdpa_window_mask"] = lambda: F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask
            )
        if flash.usable(q):
            paths["flash_attn"] = lambda: flash.sliding_window_attention(q, k, v, window)
        row = dict(seq=seq, window=window, heads=heads, head_dim=dim, dtype=str(dtype))
        for name, fn in paths.items():
            try:
                row[f"{name}_fwd_ms"] = 1e3 * timed(lambda: fn(), device, repeats)
                row[f"{name}_fwdbwd_ms"] = 1e3 * timed(
                    lambda: torch.autograd.grad(fn(), (q, k, v), upstream), device, repeats
                )
            except RuntimeError as err:  # e.g. out of memory for a masked path
                row[f"{name}_error"] = str(err).splitlines()[0][:200]
        rows.append(row)
    return rows


def suffix_second_order(device: str, smoke: bool, repeats: int) -> list[dict]:
    """One suffix block on one chunk as the meta step runs it: output, inner gradient with
    create_graph=True, outer backward through both; fused (Triton fwd/bwd/double bwd) vs math."""
    from ttte2e.kernels.attention import chunk_attention

    heads, dim, chunk, window = (2, 16, 8, 16) if smoke else (16, 128, 1024, 8192)
    dtype = torch.float32 if smoke else torch.bfloat16
    q = torch.randn(1, heads, chunk, dim, device=device, dtype=dtype).requires_grad_()
    k, v = (
        torch.randn(1, heads, window + chunk, dim, device=device, dtype=dtype).requires_grad_()
        for _ in range(2)
    )
    row = dict(heads=heads, head_dim=dim, chunk=chunk, window=window, dtype=str(dtype))
    for backend in ("fused", "math"):
        backend_used = "triton" if smoke and backend == "fused" else backend  # CPU: force Triton

        def pattern():
            out = chunk_attention(q, k, v, window, 0, backend=backend_used)
            inner = torch.autograd.grad((out.float() ** 2).sum(), (q, k, v), create_graph=True)
            torch.autograd.grad(
                out.float().sum() + sum((g.float() ** 2).sum() for g in inner), (q, k, v)
            )

        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        row[f"{backend}_ms"] = 1e3 * timed(pattern, device, repeats)
        if device == "cuda":
            row[f"{backend}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    row["fused_over_math_time"] = row["fused_ms"] / row["math_ms"]
    return [row]


def meta_step(device: str, smoke: bool, repeats: int) -> dict:
    from ttte2e.kernels.attention import chunk_backend
    from ttte2e.model import TTTConfig, TTTModel

    if smoke:
        fields = dict(
            vocab_size=64,
            d_model=32,
            n_layers=4,
            n_ttt_blocks=1,
            n_heads=2,
            mlp_hidden=64,
            seq_len=32,
            window=16,
            chunk_size=8,
        )
        dtype = torch.float32
    else:  # long window and chunk, as in the paper's 8K runs, at a width that fits the time budget
        fields = dict(
            vocab_size=32768,
            d_model=1024,
            n_layers=8,
            n_ttt_blocks=2,
            n_heads=8,
            mlp_hidden=2816,
            seq_len=8192,
            window=2048,
            chunk_size=1024,
        )
        dtype = torch.bfloat16  # autocast: fast weights and inner gradients stay float32
    torch.manual_seed(0)
    cfg = TTTConfig(**fields)
    model = TTTModel(cfg).to(device=device)
    tokens = torch.randint(0, cfg.vocab_size, (1, cfg.seq_len + 1), device=device)
    result = dict(config=fields, autocast=str(dtype))
    losses = {}
    for backend in ("fused", "math"):

        def step():
            model.zero_grad(set_to_none=True)
            with (
                chunk_backend(backend if device == "cuda" or backend == "math" else "triton"),
                torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32),
            ):
                loss = model.meta_loss(tokens, remat="chunk").loss
            loss.backward()
            losses[backend] = loss.item()

        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        result[f"{backend}_step_s"] = timed(step, device, repeats)
        if device == "cuda":
            result[f"{backend}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    result["fused_over_math_time"] = result["fused_step_s"] / result["math_step_s"]
    result["loss_fused"], result["loss_math"] = losses["fused"], losses["math"]
    return result


H100_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100 SXM, for MFU


def compiled_meta_step(device: str, smoke: bool, repeats: int) -> list[dict]:
    """The meta step (bf16 autocast, remat 'chunk') eager against compiled (TTTConfig.compile):
    time, MFU (estimate_flops without recomputation over the bf16 peak), the loss of each, and
    the first compiled step's time (compilation), at the 125M and 760M presets' shapes."""
    from ttte2e.model import TTTModel, preset

    if smoke:
        shapes = {"tiny": preset("tiny", seq_len=128, window=64, chunk_size=32)}
    else:
        shapes = {name: preset(name) for name in ("125M", "760M")}
    rows = []
    for name, cfg in shapes.items():
        torch.manual_seed(0)
        model = TTTModel(cfg).to(device)
        tokens = torch.randint(0, cfg.vocab_size, (1, cfg.seq_len + 1), device=device)
        flops = model.estimate_flops(remat="chunk").meta_step
        row = dict(preset=name, seq_len=cfg.seq_len, model_tflop_per_step=flops / 1e12)
        for compiled in (False, True):
            model.config.compile = compiled
            losses = []

            def step():
                model.zero_grad(set_to_none=True)
                with torch.autocast(device, dtype=torch.bfloat16):
                    out = model.meta_loss(tokens, remat="chunk", final_update=False)
                out.loss.backward()
                losses.append(out.loss.item())

            key = "compiled" if compiled else "eager"
            start = time.perf_counter()
            step()
            row[f"{key}_first_step_s"] = time.perf_counter() - start
            row[f"{key}_step_s"] = seconds = timed(step, device, repeats)
            row[f"{key}_loss"] = losses[-1]
            if device == "cuda":
                row[f"{key}_mfu"] = flops / seconds / (H100_BF16_TFLOPS * 1e12)
        row["eager_over_compiled_time"] = row["eager_step_s"] / row["compiled_step_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def offload(device: str, smoke: bool, repeats: int) -> list[dict]:
    """The meta step of a 1B-class model (bf16 autocast) at a long T, with and without host
    offload of what the backward keeps: peak GPU memory, time, host bytes, the same loss."""
    from ttte2e.model import TTTConfig, TTTModel, preset

    try:
        from ttte2e.platform.train.offload import OFFLOAD_MODES, apply_offload
    except ImportError:  # the repo copy without the package: the file is torch-only
        spec = importlib.util.spec_from_file_location(
            "ttte2e_offload", REPO / "platform" / "train" / "offload.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        apply_offload, OFFLOAD_MODES = module.apply_offload, module.OFFLOAD_MODES

    if smoke:
        cfg = TTTConfig(
            vocab_size=64,
            d_model=32,
            n_layers=4,
            n_ttt_blocks=1,
            n_heads=2,
            mlp_hidden=64,
            seq_len=64,
            window=16,
            chunk_size=8,
            checkpoint_prefix=True,
        )
        dtype, lengths = torch.float32, (64,)
    else:  # 1B, checkpointed prefix, nested remat: the longest T tried first that fits
        cfg = preset("1B", checkpoint_prefix=True, remat="nested")
        dtype, lengths = torch.bfloat16, (65536, 32768, 16384)
    rows = []
    for seq_len in lengths:
        c = cfg.replace(seq_len=seq_len)
        torch.manual_seed(0)
        model = TTTModel(c).to(device)
        tokens = torch.randint(0, c.vocab_size, (1, seq_len + 1), device=device)
        row = dict(seq_len=seq_len, preset="smoke" if smoke else "1B")
        try:
            for mode in OFFLOAD_MODES:
                # smoke sizes are below the size worth moving: move everything there
                counter = (
                    apply_offload(model, mode, min_bytes=0) if smoke else apply_offload(model, mode)
                )
                loss_box = {}

                def step():
                    model.zero_grad(set_to_none=True)
                    with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                        loss = model.meta_loss(tokens).loss
                    loss.backward()
                    loss_box["loss"] = loss.item()

                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                row[f"{mode}_step_s"] = timed(step, device, repeats)
                row[f"{mode}_loss"] = loss_box["loss"]
                row[f"{mode}_host_peak_gib"] = counter.peak_bytes / 2**30
                if device == "cuda":
                    row[f"{mode}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        except torch.OutOfMemoryError as e:
            row["error"] = f"out of memory ({str(e)[:120]})"
            model = tokens = None  # free it before the next, shorter T
            if device == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
            continue
        rows.append(row)
        break  # the longest T that fits
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes (CPU dry run under TRITON_INTERPRET=1)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--only",
        choices=["correctness", "timings", "suffix", "meta", "compiled", "offload"],
        default=None,
    )
    args = parser.parse_args()
    import_ttte2e()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    import triton

    results = dict(
        torch=torch.__version__,
        triton=triton.__version__,
        device=device,
        gpu=torch.cuda.get_device_name() if device == "cuda" else None,
    )
    print(json.dumps(results), flush=True)
    repeats = 1 if args.smoke else args.repeats
    for name, fn in (
        ("correctness", lambda: correctness(device, args.smoke)),
        ("timings", lambda: timings(device, args.smoke, repeats)),
        ("suffix_second_order", lambda: suffix_second_order(device, args.smoke, repeats)),
        ("meta_step", lambda: meta_step(device, args.smoke, repeats)),
        ("compiled_meta_step", lambda: compiled_meta_step(device, args.smoke, repeats)),
        ("offload", lambda: offload(device, args.smoke, repeats)),
    ):
        if args.only and not name.startswith(args.only):
            continue
        start = time.perf_counter()
        results[name] = fn()
        print(
            f"== {name} ({time.perf_counter() - start:.0f} s)\n{json.dumps(results[name], indent=1)}",
            flush=True,
        )
        if args.out:  # after every part: a timeout still leaves what was measured
            Path(args.out).write_text(json.dumps(results, indent=2))
    if "correctness" in results and not results["correctness"]["ok"]:
        sys.exit("correctness check FAILED (see the relative errors above)")


if __name__ == "__main__":
    main()
