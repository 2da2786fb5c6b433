"""GPU check: versions, which attention path runs, correctness, timings, the meta-train step.

Torch + Triton only (no Ray, DeepSpeed, MLflow, flash-attn needed; flash-attn is checked and timed
if it imports). Runs from a plain checkout: if `ttte2e` is not installed, the repo folders are
mapped to it here, so `PYTHONPATH` or `pip install` are not needed.

    python pipelines/gpu_check.py --out results.json          # on one H100: budget 8 min
    TRITON_INTERPRET=1 python pipelines/gpu_check.py --smoke  # CPU dry run (tests use it)

Every section runs on its own: an exception is recorded in its place (type, message, the last
frames) and the next section runs; the JSON is rewritten after every section and at exit.
0. environment: torch, CUDA, driver, triton, flash-attn versions; the GPU.
1. dispatch: per dtype and head dim (64, 80, 128), what the automatic prefix and chunk attention
   paths actually ran (calls counted), and the self-check's verdict.
2. correctness: the self-check at head dims 64/80/128 (bf16, fp32); our Triton kernel vs the fp32
   reference, forward and backward, prefix and chunk; the chunk op's second order (Triton) vs
   math; flash-attn's window against the reference; the fused LM head against its reference
   under autocast.
3. timings, bf16, B = 1, H = 16, dh = 128, k = 8K, T = 8K and 32K: forward and forward+backward
   of our Triton kernel (a run that did not reach the kernel is an error, not a timing), SDPA with
   the window as a mask, SDPA causal over the full sequence, flash-attn's window if importable.
4. the suffix's second order at production shapes (b = 1K over [k = 8K + b], 16 heads, bf16) for
   head dims 64, 80 and 128: fused (Triton forward, backward, double backward) vs math, every
   gradient compared; time and peak memory at 128.
5. meta-train step (loss forward + backward, bf16 autocast, remat 'chunk'): fused vs math, the
   loss and every parameter's gradient compared; time; peak memory against the capacity plan.
6. the meta step eager against compiled (TTTConfig.compile) at the 125M preset's shapes (T 8K;
   --full adds 760M): time, MFU, the first (compiling) step, losses.
7. host offload (none / carries / prefix / all) of a 1B meta step: at the longest T 'none' fits,
   each mode's peak, time and gradients against 'none'; then a longer T that fits only with
   offload 'all'.
8. with 2-8 GPUs: tensor parallelism 2 (and 8) over NCCL against one GPU (gradients), and one
   DeepSpeed ZeRO-1 step with the tensor-parallel groups when DeepSpeed imports.
With a cold Triton cache the kernels compile on first use (in the self-checks of sections 1-2).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import sys
import time
import traceback
import types
import warnings
from collections import Counter
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


def environment(device: str) -> dict:
    """Versions (torch, CUDA, driver, triton, flash-attn) and the GPU."""
    import importlib.metadata
    import subprocess

    import triton

    def version(*names):
        for name in names:
            try:
                return importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                continue
        return None

    env = dict(
        torch=torch.__version__,
        cuda=torch.version.cuda,
        triton=triton.__version__,
        flash_attn=version("flash-attn", "flash_attn"),
        python=sys.version.split()[0],
        device=device,
    )
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            total_memory_gib=props.total_memory / 2**30,
            gpus=torch.cuda.device_count(),
        )
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            done = subprocess.run(query, capture_output=True, text=True, timeout=30)
            env["driver"] = done.stdout.strip().splitlines()[0]
        except Exception as e:  # noqa: BLE001 - a missing nvidia-smi is reported, not fatal
            env["driver"] = f"unknown ({type(e).__name__})"
    return env


@contextlib.contextmanager
def counting_paths():
    """Counts the calls that reach each attention implementation while the block runs: what the
    automatic dispatch actually took (a silent fallback shows as another path)."""
    from ttte2e.kernels.attention import flash, reference, triton_swa

    counts = Counter()
    targets = [
        (triton_swa, "attention_forward", "triton"),
        (flash, "sliding_window_attention", "flash"),
        (reference, "blocked_sliding_window_attention", "blocked"),
    ]
    originals = [(module, name, getattr(module, name)) for module, name, _ in targets]
    for (module, name, label), (_, _, fn) in zip(targets, originals):

        def counted(*args, _fn=fn, _label=label, **kwargs):
            counts[_label] += 1
            return _fn(*args, **kwargs)

        setattr(module, name, counted)
    try:
        yield counts
    finally:
        for module, name, fn in originals:
            setattr(module, name, fn)


def _ran(counts: Counter, default: str) -> str:
    used = sorted(label for label, n in counts.items() if n)
    return "+".join(used) if used else default


def dispatch(device: str, smoke: bool) -> list[dict]:
    """Per dtype and head dim: the self-check's verdict and what the automatic prefix and chunk
    attention ran."""
    from ttte2e.kernels import attention
    from ttte2e.kernels.attention import self_check

    rows = []
    seq, window, chunk = (96, 40, 16) if smoke else (4096, 1024, 512)
    for dtype in (torch.bfloat16, torch.float32):
        for dim in (16,) if smoke else (64, 80, 128):
            q, k, v = (torch.randn(1, 4, seq, dim, device=device, dtype=dtype) for _ in range(3))
            row = dict(
                dtype=str(dtype).split(".")[-1],
                head_dim=dim,
                prefix_first_choice=attention.prefix_backend(q.device.type, dtype),
            )
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if q.device.type in self_check.TRITON_DEVICES:
                    passed = self_check.triton_allowed(q)
                    row["self_check"] = "passed" if passed else "failed"
                else:
                    row["self_check"] = f"not run ({q.device.type} is not a Triton device)"
                with counting_paths() as counts:
                    attention.sliding_window_attention(q, k, v, window)
                row["prefix_auto_ran"] = _ran(counts, "sdpa")
                with counting_paths() as counts:
                    attention.chunk_attention(q[:, :, -chunk:], k, v, window, 7)
                row["chunk_auto_ran"] = _ran(counts, "pytorch")
            row["warnings"] = [str(w.message)[:300] for w in caught]
            rows.append(row)
    return rows


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

    checks = []
    for dtype in (torch.float32, torch.bfloat16):
        for dim in (16,) if smoke else (64, 80, 128):
            failures = self_check.run_checks(torch.device(device), dtype, dim)
            name = f"self_check_{str(dtype).split('.')[-1]}_dh{dim}"
            results[name] = (
                "passed" if not failures else "; ".join(f"{n}: {why}" for n, why in failures)
            )
            checks.append(name)
    results["flash_attn_window"] = flash_window_check(device, smoke)
    results["lm_head_autocast"] = lm_head_check(device, smoke)
    results["ok"] = (
        worst_bf16 < 2e-2
        and worst_fp32 < 1e-4
        and all(results[name] == "passed" for name in checks)
        and results["lm_head_autocast"]["ok"]
        and results["flash_attn_window"].get("ok", True)
    )
    return results


def flash_window_check(device: str, smoke: bool) -> dict:
    """flash-attn's window_size against the reference (timed below only if it is right)."""
    from ttte2e.kernels.attention import flash, reference

    q = torch.randn(1, 4, 64 if smoke else 4096, 64, device=device, dtype=torch.bfloat16)
    if not flash.usable(q):
        return dict(skipped="flash-attn is not installed or not usable here")
    k, v = torch.randn_like(q), torch.randn_like(q)
    window = 24 if smoke else 1000  # not a multiple of flash-attn's blocks
    got = flash.sliding_window_attention(q, k, v, window)
    want = reference.blocked_sliding_window_attention(q.float(), k.float(), v.float(), window)
    err = rel_err(got, want)
    return dict(window=window, rel_err=err, ok=err < 2e-2)


def lm_head_check(device: str, smoke: bool) -> dict:
    """The fused LM head (nll and dl/dh, then the backward through dl/dh) against its autograd
    reference, both under autocast as the inner loop runs them."""
    from ttte2e.kernels.lm_head import nll_and_hidden_grad, reference

    n, d, vocab = (32, 16, 64) if smoke else (1024, 1024, 32768)
    gen = torch.Generator().manual_seed(3)
    h0 = torch.randn(n, d, generator=gen).to(device)
    embed0 = (0.05 * torch.randn(vocab, d, generator=gen)).to(device)
    targets = torch.randint(0, vocab, (n,), generator=gen).to(device)
    weights = torch.rand(n, generator=gen).to(device)
    dtype = torch.bfloat16
    results = []
    for fn in (nll_and_hidden_grad, reference.nll_and_hidden_grad):
        h, embed = h0.clone().requires_grad_(), embed0.clone().requires_grad_()
        with torch.autocast(device, dtype=dtype):
            nll, grad_h = fn(h, embed, targets, weights)
            outer = (nll * weights).sum() + (grad_h.float() ** 2).sum()
        results.append([nll, grad_h, *torch.autograd.grad(outer, (h, embed))])
    errors = {name: rel_err(a, b) for name, a, b in zip(["nll", "dl_dh", "dh", "dE"], *results)}
    return dict(errors, ok=max(errors.values()) < 3e-2)


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
            if name in ("triton", "flash_attn"):  # time a kernel only where it really runs
                with counting_paths() as counts:
                    fn()
                label = "triton" if name == "triton" else "flash"
                if not counts[label]:
                    row[f"{name}_error"] = f"did not run ({_ran(counts, 'sdpa')} ran instead)"
                    continue
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
    create_graph=True, outer backward through both; fused (Triton fwd/bwd/double bwd) vs math,
    every result compared, at head dims 64, 80, 128 (bf16); time and memory at the last."""
    from ttte2e.kernels.attention import chunk_attention

    heads, chunk, window = (2, 8, 16) if smoke else (16, 1024, 8192)
    dims = (16,) if smoke else (64, 80, 128)
    dtype = torch.float32 if smoke else torch.bfloat16
    rows = []
    for dim in dims:
        gen = torch.Generator().manual_seed(dim)
        q = torch.randn(1, heads, chunk, dim, generator=gen).to(device, dtype).requires_grad_()
        k, v = (
            torch.randn(1, heads, window + chunk, dim, generator=gen)
            .to(device, dtype)
            .requires_grad_()
            for _ in range(2)
        )
        row = dict(heads=heads, head_dim=dim, chunk=chunk, window=window, dtype=str(dtype))
        results = {}
        for backend in ("fused", "math"):
            backend_used = "triton" if smoke and backend == "fused" else backend  # CPU: force

            def pattern():
                out = chunk_attention(q, k, v, window, 0, backend=backend_used)
                inner = torch.autograd.grad((out.float() ** 2).sum(), (q, k, v), create_graph=True)
                outer = torch.autograd.grad(
                    out.float().sum() + sum((g.float() ** 2).sum() for g in inner), (q, k, v)
                )
                return [out, *inner, *outer]

            with counting_paths() as counts:
                results[backend] = [t.detach() for t in pattern()]
            row[f"{backend}_ran"] = _ran(counts, "pytorch")
            if dim == dims[-1]:
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                row[f"{backend}_ms"] = 1e3 * timed(pattern, device, repeats)
                if device == "cuda":
                    row[f"{backend}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        names = ["out", "dq", "dk", "dv", "ddq", "ddk", "ddv"]
        row["rel_err_fused_vs_math"] = {
            n: rel_err(a, b) for n, a, b in zip(names, results["fused"], results["math"])
        }
        if "fused_ms" in row:
            row["fused_over_math_time"] = row["fused_ms"] / row["math_ms"]
        rows.append(row)
    return rows


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
    losses, grads = {}, {}
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

        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        step()  # the first step: its peak (nothing cached from a step before)
        if device == "cuda":
            result[f"{backend}_step_peak_above_weights_gib"] = (
                torch.cuda.max_memory_allocated() - before
            ) / 2**30
        grads[backend] = {n: p.grad.float().clone() for n, p in model.named_parameters()}
        result[f"{backend}_step_s"] = timed(step, device, repeats)
    result["fused_over_math_time"] = result["fused_step_s"] / result["math_step_s"]
    result["loss_fused"], result["loss_math"] = losses["fused"], losses["math"]
    worst = max(grads["math"], key=lambda n: rel_err(grads["fused"][n], grads["math"][n]))
    result["grad_rel_err_fused_vs_math"] = dict(
        worst_parameter=worst, worst=rel_err(grads["fused"][worst], grads["math"][worst])
    )
    try:  # the capacity plan's figure for the same step (needs the package's platform/)
        from ttte2e.platform.train.plan import memory_per_gpu

        plan = memory_per_gpu(cfg.replace(remat="chunk"), cfg.seq_len, 0, 1, 1, bf16=True)
        result["plan_step_gib"] = plan.step / 2**30
        if "fused_step_peak_above_weights_gib" in result:
            result["plan_over_measured"] = (
                result["plan_step_gib"] / result["fused_step_peak_above_weights_gib"]
            )
    except ImportError as e:
        result["plan_step_gib"] = f"unavailable ({e})"
    return result


H100_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100 SXM, for MFU


def compiled_meta_step(device: str, smoke: bool, repeats: int, full: bool = False) -> list[dict]:
    """The meta step (bf16 autocast, remat 'chunk') eager against compiled (TTTConfig.compile):
    time, MFU (estimate_flops without recomputation over the bf16 peak), the loss of each, and
    the first compiled step's time (compilation), at the 125M and 760M presets' shapes."""
    from ttte2e.model import TTTModel, preset

    if smoke:
        shapes = {"tiny": preset("tiny", seq_len=128, window=64, chunk_size=32)}
    else:
        # each compiles for minutes with a cold cache: 760M only with --full
        shapes = {name: preset(name) for name in (("125M", "760M") if full else ("125M",))}
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


def offload(device: str, smoke: bool, repeats: int) -> dict:
    """The meta step of a 1B-class model (bf16 autocast) with and without host offload: at the
    longest T that fits without it, each mode's peak GPU memory, time, host bytes and gradients
    against 'none'; then whether the next longer T fits with offload 'all'."""
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
        dtype, lengths = torch.float32, (64, 128)
    else:  # 1B, checkpointed prefix, nested remat
        cfg = preset("1B", checkpoint_prefix=True, remat="nested")
        dtype, lengths = torch.bfloat16, (16384, 32768, 65536, 131072, 262144)
    torch.manual_seed(0)
    model = TTTModel(cfg).to(device)

    def run(seq_len: int, mode: str, time_it: bool) -> dict:
        c = cfg.replace(seq_len=seq_len)
        model.config = c  # the same weights at another T (T is not a weight shape)
        tokens = torch.randint(
            0, c.vocab_size, (1, seq_len + 1), generator=torch.Generator().manual_seed(1)
        ).to(device)
        # smoke sizes are below the size worth moving: move everything there
        counter = apply_offload(model, mode, min_bytes=0) if smoke else apply_offload(model, mode)
        box = {}

        def step():
            model.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                loss = model.meta_loss(tokens).loss
            loss.backward()
            box["loss"] = loss.item()

        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        out = dict(seq_len=seq_len, mode=mode)
        if time_it:
            out["step_s"] = timed(step, device, repeats)
        else:
            step()
        out["loss"] = box["loss"]
        out["host_peak_gib"] = counter.peak_bytes / 2**30
        if device == "cuda":
            out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["grads"] = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return out

    def fits(seq_len: int, mode: str) -> bool:
        try:
            run(seq_len, mode, time_it=False)
            return True
        except torch.OutOfMemoryError:
            if device == "cuda":
                torch.cuda.empty_cache()
            return False

    longest = None
    for seq_len in lengths[:-1]:
        if not fits(seq_len, "none"):
            break
        longest = seq_len
    result = dict(preset="smoke" if smoke else "1B", tried=list(lengths))
    if longest is None:
        result["error"] = f"no T of {lengths[:-1]} fits without offload"
        return result
    result["longest_without_offload"] = longest
    rows, base = [], None
    for mode in OFFLOAD_MODES:
        row = run(longest, mode, time_it=True)
        grads = row.pop("grads")
        if mode == "none":
            base = grads
        else:
            worst = max(base, key=lambda n: rel_err(grads[n], base[n]))
            row["grad_rel_err_vs_none"] = rel_err(grads[worst], base[worst])
        rows.append(row)
    result["modes"] = rows
    longer = lengths[lengths.index(longest) + 1]
    result["longer"] = dict(
        seq_len=longer, fits_without_offload=fits(longer, "none"), fits_with_all=fits(longer, "all")
    )
    return result


MULTI_GPU_CONFIG = dict(
    vocab_size=4096, d_model=512, n_layers=4, n_ttt_blocks=1, n_heads=8, mlp_hidden=1024,
    seq_len=2048, window=512, chunk_size=256,
)  # fmt: skip


def _multi_gpu_rank(
    rank: int, world: int, init_file: str, out_file: str, backend: str = "nccl", fields=None
) -> None:
    """One rank of the tensor-parallel check: a small model's meta-gradient at TP=world against
    the same model on one device, then one DeepSpeed ZeRO-1 step with the groups (NCCL on GPUs;
    the tests run it with gloo on the CPU)."""
    import os

    import torch.distributed as dist

    from ttte2e.model import TTTConfig, TTTModel
    from ttte2e.platform.train.tensor_parallel import build_groups, parallelize

    device = torch.device(f"cuda:{rank}" if backend == "nccl" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    # DeepSpeed reads these (torchrun would set them)
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = TTTConfig(**(fields or MULTI_GPU_CONFIG))
        torch.manual_seed(0)
        whole = TTTModel(cfg).to(device)
        tokens = torch.randint(
            2, cfg.vocab_size, (1, cfg.seq_len + 1), generator=torch.Generator().manual_seed(1)
        ).to(device)
        whole.meta_loss(tokens).loss.backward()
        reference = {n: p.grad.float() for n, p in whole.named_parameters()}
        groups = build_groups(world)
        torch.manual_seed(0)
        model = TTTModel(cfg).to(device)
        layout = parallelize(model, groups.tensor)
        model.meta_loss(tokens).loss.backward()
        worst = 0.0
        for name, p in model.named_parameters():
            grad = p.grad.float()
            dim = layout.split_dims.get(name)
            if dim is not None:
                parts = [torch.empty_like(grad) for _ in range(world)]
                dist.all_gather(parts, grad.contiguous(), group=groups.tensor)
                grad = torch.cat(parts, dim)
            worst = max(worst, rel_err(grad, reference[name]))
        out = dict(world=world, backend=backend, tp_grad_rel_err_vs_one_device=worst)
        try:
            import deepspeed

            from ttte2e.platform.train.tensor_parallel import DeepSpeedMPU

            model.zero_grad(set_to_none=True)
            engine, *_ = deepspeed.initialize(
                model=model,
                model_parameters=model.parameters(),
                mpu=DeepSpeedMPU(groups),
                config={
                    "train_micro_batch_size_per_gpu": 1,
                    "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
                    "zero_optimization": {"stage": 1},
                },
            )
            before = [p.detach().clone() for p in model.parameters()]
            loss = engine.module.meta_loss(tokens).loss
            engine.backward(loss)
            engine.step()
            moved = sum(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
            out["zero1_step"] = dict(
                loss=loss.item(),
                parameters_updated=moved,
                ok=bool(torch.isfinite(loss)) and moved > 0,
            )
        except ImportError as e:
            out["zero1_step"] = f"skipped ({e})"
        if rank == 0:
            Path(out_file).write_text(json.dumps(out))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if backend == "gloo":  # (the CPU test) a short gloo process can abort in the interpreter's
        sys.stdout.flush()  # shutdown after its work is done: end it here
        os._exit(0)


def run_multi_device(world: int, backend: str = "nccl", fields=None) -> dict:
    """The tensor-parallel check on `world` spawned processes; rank 0's result."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = f"{tmp}/init", f"{tmp}/out.json"
        mp.start_processes(
            _multi_gpu_rank,
            args=(world, init_file, out_file, backend, fields),
            nprocs=world,
            start_method="spawn",
        )
        return json.loads(Path(out_file).read_text())


def multi_gpu(device: str, smoke: bool) -> list[dict] | dict:
    """TP 2 (and 8) over NCCL against one GPU, one ZeRO-1 step; on machines with 2-8 GPUs."""
    count = torch.cuda.device_count() if device == "cuda" else 0
    if count < 2:
        return dict(skipped=f"{count} GPU(s): needs 2-8")
    return [run_multi_device(world) for world in sorted({2, min(count, 8)})]


SECTIONS = (
    "environment",
    "dispatch",
    "correctness",
    "timings",
    "suffix_second_order",
    "meta_step",
    "compiled_meta_step",
    "offload",
    "multi_gpu",
)


def _failure(error: BaseException) -> dict:
    frames = traceback.format_exception(type(error), error, error.__traceback__)
    return dict(error=f"{type(error).__name__}: {str(error)[:500]}", trace="".join(frames[-4:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes (CPU dry run under TRITON_INTERPRET=1)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="these sections only")
    parser.add_argument("--full", action="store_true", help="also the 760M compiled step")
    args = parser.parse_args()
    import_ttte2e()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    repeats = 1 if args.smoke else args.repeats
    runs = dict(
        environment=lambda: environment(device),
        dispatch=lambda: dispatch(device, args.smoke),
        correctness=lambda: correctness(device, args.smoke),
        timings=lambda: timings(device, args.smoke, repeats),
        suffix_second_order=lambda: suffix_second_order(device, args.smoke, repeats),
        meta_step=lambda: meta_step(device, args.smoke, repeats),
        compiled_meta_step=lambda: compiled_meta_step(device, args.smoke, repeats, args.full),
        offload=lambda: offload(device, args.smoke, repeats),
        multi_gpu=lambda: multi_gpu(device, args.smoke),
    )
    results: dict = {"seconds": {}}
    started = time.perf_counter()

    def write():
        if args.out:  # after every section and at exit: a timeout still leaves what was measured
            Path(args.out).write_text(json.dumps(results, indent=2, default=str))

    try:
        for name in SECTIONS:
            if args.only and name not in args.only and name != "environment":
                continue
            start = time.perf_counter()
            try:
                results[name] = runs[name]()
            except Exception as error:  # noqa: BLE001 - recorded; the next section still runs
                results[name] = _failure(error)
                if device == "cuda":
                    torch.cuda.empty_cache()
            results["seconds"][name] = round(time.perf_counter() - start, 1)
            print(
                f"== {name} ({results['seconds'][name]:.0f} s)\n"
                f"{json.dumps(results[name], indent=1, default=str)}",
                flush=True,
            )
            write()
    finally:
        results["seconds"]["total"] = round(time.perf_counter() - started, 1)
        write()
    failed = [n for n in SECTIONS if isinstance(results.get(n), dict) and "error" in results[n]]
    if failed or ("correctness" in results and not results["correctness"].get("ok", False)):
        sys.exit(f"gpu_check: sections failed: {failed or ['correctness']} (see above)")


if __name__ == "__main__":
    main()
