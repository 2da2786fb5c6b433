"""A Triton kernel checks itself before its first use on a GPU.

A 64-GPU job must not die on its first step because a kernel does not compile on that GPU, or
train on wrong numbers because it miscompiles. So the first time the automatic paths would run
the Triton kernels on a (device, dtype), each kernel (prefix forward and backward, suffix chunk
forward, backward and double backward) runs once on a small shape and is compared with its
PyTorch reference (chunk.py's torch_* functions). If one fails to run or disagrees, a warning
names it and the error, and the automatic paths use the tested PyTorch ones on that device
(prefix: blocked SDPA with a window mask; suffix: the dense fused op) - unless the user forces
the kernels with TTTE2E_ATTENTION=triton, which makes the failure an error instead.

Checks are keyed by (device, dtype, head dim) and run at the model's head dim on shapes of several
tiles: a head dim compiles its own kernels (BLOCK_D, registers, shared memory). A kernel that
still fails later (triton's OutOfResources or CompilationError on a new specialization) is caught
by the registered op (chunk.py): `kernel_failed` warns the same way and marks the key, the op
computes that call with PyTorch, and the automatic paths use PyTorch from then on.
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

_verdicts: dict[tuple[str, torch.dtype, int], bool] = {}


def forced() -> bool:
    value = os.environ.get(FORCE_ENV, "auto")
    if value not in ("auto", "triton"):
        raise ValueError(f"{FORCE_ENV}={value!r}: choose auto or triton")
    return value == "triton"


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.float()
    return ((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _cases(device, dtype, head_dim):
    """(name prefix, q, k, v, window, first_valid_key): a prefix shape and a suffix chunk shape,
    each several tiles long (GPU blocks are 64 rows), windows and lengths off the tile grid."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    prefix = 199
    yield "prefix", *(rand(1, 2, prefix, head_dim) for _ in range(3)), 100, 0
    chunk_len, keys = 70, 220
    yield (
        "suffix",
        rand(1, 2, chunk_len, head_dim),
        *(rand(1, 2, keys, head_dim) for _ in "kv"),
        150,
        13,
    )


def run_checks(device, dtype, head_dim: int = 64) -> list[tuple[str, str]]:
    """[(kernel, what went wrong)] for the kernels that fail on (device, dtype, head_dim)."""
    failures = []
    tol = TOLERANCE.get(dtype, 2e-3)
    for where, q, k, v, window, first in _cases(device, dtype, head_dim):
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


def _key(t: torch.Tensor) -> tuple[str, torch.dtype, int]:
    return str(t.device), t.dtype, t.shape[-1]


def _describe(t: torch.Tensor) -> str:
    name = torch.cuda.get_device_name(t.device) if t.is_cuda else t.device.type
    return f"{t.device} ({name}, {t.dtype}, head dim {t.shape[-1]})"


def _fall_back(message: str) -> None:
    if forced():
        raise RuntimeError(message + f" ({FORCE_ENV}=triton: no fallback)")
    warnings.warn(
        message + "; using the PyTorch paths instead (prefix: blocked SDPA with a window mask, "
        "suffix: the dense fused op)",
        RuntimeWarning,
        stacklevel=4,
    )


def triton_allowed(t: torch.Tensor) -> bool:
    """Whether the automatic paths may run the Triton kernels on t's device, dtype and head dim:
    on the devices they serve, once their check passed (it runs once per key); elsewhere only
    when forced."""
    if t.device.type not in TRITON_DEVICES:
        return forced()
    key = _key(t)
    if key not in _verdicts:
        # the first use may sit inside autocast or a backward: the check runs outside both
        with torch.no_grad(), torch.autocast(t.device.type, enabled=False):
            failures = run_checks(t.device, t.dtype, t.shape[-1])
        if failures:
            listed = "; ".join(f"{name}: {why}" for name, why in failures)
            _fall_back(
                f"Triton attention kernels failed their self-check on {_describe(t)}: {listed}"
            )
        _verdicts[key] = not failures
    return _verdicts[key]


def failed_before(t: torch.Tensor) -> bool:
    """Whether a kernel failed on t's key in this process (its check, or a later call)."""
    return _verdicts.get(_key(t)) is False


def kernel_failed(t: torch.Tensor, kernel: str, error: Exception) -> None:
    """A kernel that passed its check failed to compile or launch on a later call (a new
    specialization ran out of shared memory, say): warn and mark its key, so the caller computes
    this call with PyTorch and the automatic paths stop using the kernels there; or raise, when
    the kernels are forced or never were checked (an explicit backend="triton")."""
    message = (
        f"Triton attention kernel '{kernel}' failed on {_describe(t)}: "
        f"{type(error).__name__}: {str(error)[:300]}"
    )
    if _verdicts.get(_key(t)) is None:
        raise RuntimeError(message) from error
    _verdicts[_key(t)] = False
    _fall_back(message)


def reset() -> None:
    """Forget the verdicts (tests)."""
    _verdicts.clear()


__all__ = [
    "TRITON_DEVICES",
    "FORCE_ENV",
    "forced",
    "kernel_failed",
    "reset",
    "run_checks",
    "triton_allowed",
]
