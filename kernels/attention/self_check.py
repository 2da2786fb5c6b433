"""A Triton kernel checks itself before its first use on a GPU.

A 64-GPU job must not die on its first step because a kernel does not compile on that GPU, or
train on wrong numbers because it miscompiles. So the first time the automatic paths would run
the Triton kernels on a (device, dtype), each kernel (prefix forward and backward, suffix chunk
forward, backward and double backward) runs once on a small shape and is compared with its
PyTorch reference (chunk.py's torch_* functions). If one fails to run or disagrees, a warning
names it and the error, and the automatic paths use the tested PyTorch ones on that device
(prefix: blocked SDPA with a window mask; suffix: the dense fused op) - unless the user forces
the kernels with TTTE2E_ATTENTION=triton, which makes the failure an error instead.
"""

from __future__ import annotations

import os
import warnings

import torch

from . import chunk, triton_swa

FORCE_ENV = "TTTE2E_ATTENTION"
# Device types on which the automatic paths use the Triton kernels (after the check); the CPU runs
# them only when asked (backend="triton", under TRITON_INTERPRET=1: the test suite's own checks)
TRITON_DEVICES = ("cuda",)
# max |kernel - reference| / max |reference| allowed, by dtype
TOLERANCE = {torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}

_verdicts: dict[tuple[str, torch.dtype], bool] = {}


def forced() -> bool:
    value = os.environ.get(FORCE_ENV, "auto")
    if value not in ("auto", "triton"):
        raise ValueError(f"{FORCE_ENV}={value!r}: choose auto or triton")
    return value == "triton"


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.float()
    return ((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _cases(device, dtype):
    """(name prefix, q, k, v, window, first_valid_key): a prefix shape and a suffix chunk shape."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    yield "prefix", rand(1, 2, 64, 32), rand(1, 2, 64, 32), rand(1, 2, 64, 32), 24, 0
    yield "suffix", rand(1, 2, 16, 32), rand(1, 2, 48, 32), rand(1, 2, 48, 32), 32, 8


def run_checks(device, dtype) -> list[tuple[str, str]]:
    """[(kernel, what went wrong)] for the kernels that fail on (device, dtype); empty if none."""
    failures = []
    tol = TOLERANCE.get(dtype, 2e-3)
    for where, q, k, v, window, first in _cases(device, dtype):
        steps = [
            (
                f"{where} forward",
                lambda: triton_swa.attention_forward(q, k, v, window, first),
                lambda: chunk.torch_forward(q, k, v, window, first),
            )
        ]
        out, lse = chunk.torch_forward(q, k, v, window, first)
        out = out.to(dtype)
        d_out = torch.randn_like(out)
        steps.append(
            (
                f"{where} backward",
                lambda: triton_swa.attention_backward(q, k, v, out, lse, d_out, window, first),
                lambda: chunk.torch_backward(q, k, v, out, lse, d_out, window, first),
            )
        )
        if where == "suffix":  # the double backward runs in the suffix only
            g = [torch.randn_like(t) for t in (q, k, v)]
            steps.append(
                (
                    f"{where} double backward",
                    lambda: triton_swa.attention_double_backward(
                        q, k, v, out, lse, d_out, *g, window, first
                    ),
                    lambda: chunk.double_backward(q, k, v, lse, d_out, *g, window, first),
                )
            )
        for name, kernel, reference in steps:
            try:
                got, want = kernel(), reference()
                errors = [_rel_err(a, b) for a, b in zip(got, want)]
            except Exception as e:  # noqa: BLE001 - a compile or launch error is the finding
                failures.append((name, f"{type(e).__name__}: {str(e)[:300]}"))
                continue
            worst = max(errors)
            if not worst <= tol:  # also catches NaN
                failures.append(
                    (
                        name,
                        f"max relative error {worst:.3g} > {tol:g} against the PyTorch reference",
                    )
                )
    return failures


def triton_allowed(t: torch.Tensor) -> bool:
    """Whether the automatic paths may run the Triton kernels on t's device and dtype: on the
    devices they serve, once their check passed (it runs once per device and dtype); elsewhere
    only when forced."""
    if t.device.type not in TRITON_DEVICES:
        return forced()
    key = (str(t.device), t.dtype)
    if key not in _verdicts:
        # the first use may sit inside autocast or a backward: the check runs outside both
        with torch.no_grad(), torch.autocast(t.device.type, enabled=False):
            failures = run_checks(t.device, t.dtype)
        if failures:
            listed = "; ".join(f"{name}: {why}" for name, why in failures)
            message = (
                f"Triton attention kernels failed their self-check on {t.device} "
                f"({torch.cuda.get_device_name(t.device) if t.is_cuda else t.device.type}"
                f", {t.dtype}): {listed}"
            )
            if forced():
                raise RuntimeError(message + f" ({FORCE_ENV}=triton: no fallback)")
            warnings.warn(
                message + "; using the PyTorch paths instead (prefix: blocked SDPA "
                "with a window mask, suffix: the dense fused op)",
                RuntimeWarning,
                stacklevel=3,
            )
        _verdicts[key] = not failures
    return _verdicts[key]


def reset() -> None:
    """Forget the verdicts (tests)."""
    _verdicts.clear()


__all__ = ["TRITON_DEVICES", "FORCE_ENV", "forced", "reset", "run_checks", "triton_allowed"]
