"""Fast attention paths against the plain PyTorch reference: the Triton kernels (under
TRITON_INTERPRET=1 on the CPU, see conftest), the registered twice-differentiable chunk op, and the
flash-attn dispatch. Awkward shapes on purpose: T not a multiple of the block, window larger than
T, one head, odd head dims, a cache with invalid rows."""

import math
import os
import warnings

import pytest
import torch

from ttte2e.kernels import attention
from ttte2e.kernels.attention import chunk, flash, reference, triton_swa
from ttte2e.model import TTTConfig, TTTModel

pytestmark = pytest.mark.skipif(
    not triton_swa.AVAILABLE or not triton_swa.INTERPRET,
    reason="needs triton and TRITON_INTERPRET=1 (set by conftest)",
)


@pytest.fixture
def nan_empty(monkeypatch):
    """torch.empty / empty_like filled with NaN, so a kernel that leaves memory unwritten fails."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: fill(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: fill(empty_like(*a, **kw)))


def tensors(batch, heads, n_q, n_k, dim, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, heads, n, dim, generator=gen).to(dtype).requires_grad_()
        for n in (n_q, n_k, n_k)
    ]


def grads(out, inputs, upstream):
    return torch.autograd.grad(out, inputs, upstream)


# (batch, heads, queries, keys, head_dim, window, first_valid_key)
SHAPES = [
    (1, 1, 37, 37, 8, 5, 0),  # one head, T not a multiple of the block
    (2, 3, 70, 70, 7, 33, 0),  # odd head dim, window across block edges
    (1, 2, 40, 40, 16, 100, 0),  # window larger than T: plain causal
    (2, 2, 24, 88, 12, 64, 19),  # a chunk over [cache + chunk], invalid cache rows first
    (1, 1, 1, 9, 16, 9, 0),  # one query
    (1, 2, 33, 33, 20, 1, 0),  # window 1: each query sees only itself
]


@pytest.mark.parametrize("shape", SHAPES)
def test_triton_forward_and_backward_match_reference(shape, nan_empty):
    batch, heads, n_q, n_k, dim, window, first_valid = shape
    q, k, v = tensors(batch, heads, n_q, n_k, dim)
    expected = reference.chunk_attention(q, k, v, window, first_valid)
    out, lse = triton_swa.attention_forward(q.detach(), k.detach(), v.detach(), window, first_valid)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(dim)
    visible = reference.chunk_visibility(n_q, n_k, window, first_valid, q.device)
    torch.testing.assert_close(
        lse, scores.masked_fill(~visible, -math.inf).logsumexp(-1), rtol=1e-5, atol=1e-5
    )
    upstream = torch.randn_like(expected)
    got = triton_swa.attention_backward(
        q.detach(), k.detach(), v.detach(), out, lse, upstream, window, first_valid
    )
    for name, a, b in zip("qkv", got, grads(expected, (q, k, v), upstream)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"d{name}: {m}")
    # keys before first_valid_key see no gradient at all
    assert not got[1][..., :first_valid, :].any() and not got[2][..., :first_valid, :].any()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("present", ["qkv", "k", "qv"])
def test_triton_double_backward_matches_pytorch_formula(shape, present, nan_empty):
    """The three-pass Triton double backward vs chunk.double_backward (itself checked by
    gradgradcheck below); absent cotangents (None) as autograd passes them."""
    batch, heads, n_q, n_k, dim, window, first_valid = shape
    q, k, v = (t.detach() for t in tensors(batch, heads, n_q, n_k, dim, seed=7))
    gen = torch.Generator().manual_seed(8)
    grad_out = torch.randn(q.shape, generator=gen)
    cot = {
        name: torch.randn(t.shape, generator=gen) if name in present else None
        for name, t in zip("qkv", (q, k, v))
    }
    out, lse = chunk.torch_forward(q, k, v, window, first_valid)
    expected = chunk.double_backward(
        q, k, v, lse, grad_out, cot["q"], cot["k"], cot["v"], window, first_valid
    )
    got = triton_swa.attention_double_backward(
        q, k, v, out, lse, grad_out, cot["q"], cot["k"], cot["v"], window, first_valid
    )
    for name, a, b in zip(["q", "k", "v", "grad_out"], got, expected):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad {name}: {m}")


# (name, queries, keys, window, first_valid_key): every pass spans 3+ tiles of 64 (32 in the double
# backward), windows and lengths off the tile grid
GPU_BLOCK_SHAPES = [("prefix", 200, 200, 100, 0), ("suffix chunk", 70, 230, 150, 13)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("shape", GPU_BLOCK_SHAPES, ids=[s[0] for s in GPU_BLOCK_SHAPES])
def test_kernels_at_the_gpu_launch_settings(shape, dtype, monkeypatch):
    """The tile sizes and tile dtypes a GPU runs (64-row blocks, fp16 tiles to the dots, 16/32-row
    fp32 blocks), here under the interpreter: multi-tile online softmax, head dim 80 padded to
    128, all three passes against the float64 formulas."""
    monkeypatch.setenv(triton_swa.BLOCKS_ENV, "gpu")
    _, n_q, n_k, window, first = shape
    settings = triton_swa.launch_settings("fwd", 80, dtype)
    assert not settings.upcast and settings.block_d == 128
    assert n_q / settings.block_m > 1 and n_k / settings.block_n >= 3
    q, k, v = (t.detach() for t in tensors(1, 2, n_q, n_k, 80, dtype=dtype, seed=11))
    gen = torch.Generator().manual_seed(12)
    grad_out, gq, gk, gv = (torch.randn(t.shape, generator=gen).to(dtype) for t in (q, q, k, v))
    wide = [t.double() for t in (q, k, v)]
    out_ref, lse_ref = chunk.torch_forward(*wide, window, first)
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.float16 else dict(rtol=1e-4, atol=1e-5)

    def close(got, want, what):
        torch.testing.assert_close(got.double(), want, **tol, msg=lambda m: f"{what}: {m}")

    out, lse = triton_swa.attention_forward(q, k, v, window, first)
    close(out, out_ref, "out")
    close(lse, lse_ref, "lse")
    # grad_out arrives in float32 under autocast: the launch casts it to the tiles' dtype
    got = triton_swa.attention_backward(q, k, v, out, lse, grad_out.float(), window, first)
    want = chunk.torch_backward(*wide, out_ref, lse_ref, grad_out.double(), window, first)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        close(a, b, name)
    got = triton_swa.attention_double_backward(
        q, k, v, out, lse, grad_out.float(), gq, gk, gv, window, first
    )
    want = chunk.double_backward(
        *wide, lse_ref, grad_out.double(), gq.double(), gk.double(), gv.double(), window, first
    )
    for name, a, b in zip(("grad q", "grad k", "grad v", "grad grad_out"), got, want):
        close(a, b, name)


def test_triton_bfloat16_matches_float32_reference():
    q, k, v = tensors(1, 2, 45, 45, 16, dtype=torch.bfloat16)
    expected = reference.naive_sliding_window_attention(q.float(), k.float(), v.float(), 20)
    got = attention.sliding_window_attention(q, k, v, 20, backend="triton")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)
    upstream = torch.randn_like(expected)
    g_got = grads(got, (q, k, v), upstream.bfloat16())
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    g_ref = grads(reference.naive_sliding_window_attention(qf, kf, vf, 20), (qf, kf, vf), upstream)
    for a, b in zip(g_got, g_ref):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, rtol=5e-2, atol=5e-2)


def test_triton_reads_strided_inputs():
    """The model hands over transposed views ([B, P, H, dh] -> [B, H, P, dh])."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 29, 3, 8, generator=gen).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    torch.testing.assert_close(
        attention.sliding_window_attention(q, k, v, 6, backend="triton"),
        reference.naive_sliding_window_attention(q, k, v, 6),
    )


@pytest.mark.parametrize("use_triton", [False, True])
def test_chunk_op_second_order_matches_math_path(use_triton):
    """Value, inner gradient (create_graph) and the gradient through it, as the meta-step uses them."""
    dtype = torch.float32 if use_triton else torch.float64
    tol = dict(rtol=1e-4, atol=1e-5) if use_triton else dict(rtol=1e-10, atol=1e-10)
    results = []
    for backend in ("triton" if use_triton else "fused", "math"):
        q, k, v = tensors(2, 2, 8, 21, 6, dtype=dtype, seed=3)
        out = attention.chunk_attention(q, k, v, window=10, first_valid_key=4, backend=backend)
        inner = torch.autograd.grad((out.sin() * 3).sum(), (q, k, v), create_graph=True)
        outer = torch.autograd.grad(
            out.sum() + sum((g.cos() * (i + 1)).sum() for i, g in enumerate(inner)), (q, k, v)
        )
        results.append([out, *inner, *outer])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize(
    "n_q, n_k, window, first_valid", [(4, 9, 5, 2), (5, 5, 5, 0), (3, 11, 2, 8)]
)
def test_chunk_op_gradcheck_and_gradgradcheck_float64(n_q, n_k, window, first_valid):
    q, k, v = tensors(1, 2, n_q, n_k, 3, dtype=torch.float64, seed=n_k)

    def fn(q_, k_, v_):
        return attention.chunk_attention(q_, k_, v_, window, first_valid, backend="fused")

    assert torch.autograd.gradcheck(fn, (q, k, v))
    assert torch.autograd.gradgradcheck(fn, (q, k, v))


def test_chunk_op_refuses_a_third_order():
    q, k, v = tensors(1, 1, 3, 6, 4, dtype=torch.float64)
    out = attention.chunk_attention(q, k, v, 4, backend="fused")
    g = torch.autograd.grad(out.sum(), q, create_graph=True)[0]
    torch.autograd.grad(g.square().sum(), k, retain_graph=True)  # second order: fine
    with pytest.raises(RuntimeError, match="third order"):  # a graph of it would be wrong: refused
        torch.autograd.grad(g.square().sum(), k, create_graph=True)


@pytest.mark.parametrize("use_triton", [False, True])
def test_registered_ops_pass_opcheck(use_triton):
    q, k, v = (t.detach().requires_grad_() for t in tensors(1, 2, 5, 12, 8, seed=2))
    torch.library.opcheck(chunk.window_attention_fwd, (q, k, v, 6, 3, use_triton))
    out, lse = chunk.window_attention_fwd(q, k, v, 6, 3, use_triton)
    grad_out = torch.randn_like(out).requires_grad_()
    torch.library.opcheck(
        chunk.window_attention_bwd, (q, k, v, out.detach(), lse, grad_out, 6, 3, use_triton)
    )
    cotangents = (torch.randn_like(q), None, torch.randn_like(v))
    torch.library.opcheck(
        chunk.window_attention_bwd_bwd,
        (
            q.detach(),
            k.detach(),
            v.detach(),
            out.detach(),
            lse,
            grad_out.detach(),
            *cotangents,
            6,
            3,
            use_triton,
        ),
    )


def test_torch_compile_traces_the_chunk_op_in_one_graph():
    q, k, v = tensors(1, 2, 6, 14, 8, seed=4)

    def step(q_, k_, v_):
        out = attention.chunk_attention(q_, k_, v_, 8, 2, backend="fused")
        return (out * out).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    eager_loss, compiled_loss = step(q, k, v), compiled(q, k, v)
    torch.testing.assert_close(compiled_loss, eager_loss)
    for a, b in zip(
        torch.autograd.grad(compiled_loss, (q, k, v)), torch.autograd.grad(eager_loss, (q, k, v))
    ):
        torch.testing.assert_close(a, b)


def test_bad_input_is_named():
    q, k, v = tensors(1, 1, 4, 8, 4)
    with pytest.raises(ValueError, match="backend"):
        attention.chunk_attention(q, k, v, 4, backend="fast")
    with pytest.raises(ValueError, match="backend"):
        attention.sliding_window_attention(q, q, q, 4, backend="fast")
    with pytest.raises(ValueError, match="first_valid_key"):
        attention.chunk_attention(q, k, v, 4, first_valid_key=6)
    with pytest.raises(ValueError, match="window"):
        attention.chunk_attention(q, k, v, 0)
    with pytest.raises(TypeError, match="float16/bfloat16/float32"):
        triton_swa.attention_forward(q.double(), k.double(), v.double(), 4)
    if flash.flash_attn_func is None:  # installed (GPU machines): nothing to refuse
        with pytest.raises(RuntimeError, match="flash-attn"):
            flash.sliding_window_attention(q, q, q, 4)


def test_prefix_dispatch_order(monkeypatch):
    monkeypatch.setattr(flash, "flash_attn_func", object())
    assert attention.prefix_backend("cuda", torch.bfloat16) == "flash"
    assert attention.prefix_backend("cuda", torch.float32) == "triton"  # flash-attn: fp16/bf16 only
    assert attention.prefix_backend("cpu", torch.bfloat16) == "blocked"
    monkeypatch.setattr(flash, "flash_attn_func", None)
    assert attention.prefix_backend("cuda", torch.bfloat16) == "triton"
    monkeypatch.setattr(triton_swa, "AVAILABLE", False)
    assert attention.prefix_backend("cuda", torch.bfloat16) == "blocked"


def test_flash_call_translates_layout_and_window(monkeypatch):
    """A stand-in with flash-attn's documented contract: [B, T, H, dh], causal, window_size=(left,
    right) = query i sees keys i-left..i+right."""
    calls = []

    def fake_flash(q, k, v, causal, window_size):
        calls.append((q.shape, causal, window_size))
        left, right = window_size
        i = torch.arange(q.shape[1])
        diff = i[:, None] - i[None, :]
        visible = (diff <= left) & (diff >= -right) & ((diff >= 0) if causal else True)
        out = reference.masked_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), visible
        )
        return out.transpose(1, 2)

    monkeypatch.setattr(flash, "flash_attn_func", fake_flash)
    q, k, v = tensors(2, 3, 30, 30, 8)
    torch.testing.assert_close(
        flash.sliding_window_attention(q, k, v, 7),
        reference.naive_sliding_window_attention(q, k, v, 7),
    )
    assert calls == [(torch.Size([2, 30, 3, 8]), True, (6, 0))]


MODEL = TTTConfig(
    vocab_size=37,
    d_model=32,
    n_layers=4,
    n_heads=2,
    mlp_hidden=48,
    n_ttt_blocks=2,
    seq_len=48,
    window=16,
    chunk_size=8,
    inner_lr=1.0,
)


@pytest.mark.parametrize("backend, dtype", [("fused", torch.float64), ("triton", torch.float32)])
def test_meta_gradient_is_the_same_with_each_suffix_path(backend, dtype):
    torch.manual_seed(0)
    model = TTTModel(MODEL).to(dtype)
    tokens = torch.randint(0, MODEL.vocab_size, (2, MODEL.seq_len + 1))
    results = []
    for name in (backend, "math"):
        model.zero_grad(set_to_none=True)
        with attention.chunk_backend(name):
            loss = model.meta_loss(tokens, remat="chunk").loss
        loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    # float64: equal to rounding; float32 (Triton): summation order differs, so compare each
    # gradient as a whole (elementwise, near-zero entries would dominate)
    limit = 1e-11 if dtype == torch.float64 else 1e-5
    for a, b in zip(*results):
        assert ((a - b).norm() / b.norm()).item() < limit


def test_gpu_check_script_dry_run_on_cpu(tmp_path):
    """The script prepared for a lent GPU machine (torch + triton only, ttte2e not installed there)
    runs end to end at tiny sizes under the interpreter, without importing orchestration libraries.
    All sections but the compiled step's, whose first step compiles for a minute in a fresh clone
    (the compiled step itself is tested in test_compiled.py)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "gpu_check.json"
    code = (
        "import sys, runpy; sys.modules['ttte2e'] = None; "  # as if not installed
        f"sys.argv = ['gpu_check.py', '--smoke', '--out', {str(out)!r}, '--only', "
        "'dispatch', 'correctness', 'timings', 'suffix_second_order', 'meta_step', 'offload', "
        "'multi_gpu']; "
        f"runpy.run_path({str(repo / 'pipelines' / 'gpu_check.py')!r}, run_name='__main__'); "
        "print('LOADED', [m for m in ('ray', 'deepspeed', 'mlflow') if m in sys.modules])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TRITON_INTERPRET": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOADED []" in result.stdout
    report = json.loads(out.read_text())
    assert report["environment"]["torch"] == torch.__version__ and report["seconds"]["total"] > 0
    assert {row["prefix_auto_ran"] for row in report["dispatch"]} == {"blocked"}  # CPU
    assert report["correctness"]["ok"] and report["correctness"]["lm_head_autocast"]["ok"]
    assert report["meta_step"]["loss_fused"] == pytest.approx(
        report["meta_step"]["loss_math"], rel=1e-5
    )
    assert report["meta_step"]["grad_rel_err_fused_vs_math"]["worst"] < 1e-5
    assert "compiled_meta_step" not in report
    assert {"triton_fwd_ms", "triton_fwdbwd_ms", "sdpa_full_causal_fwd_ms"} <= set(
        report["timings"][0]
    )
    (suffix,) = report["suffix_second_order"]
    assert suffix["fused_ran"] == "triton" and suffix["fused_ms"] > 0
    assert max(suffix["rel_err_fused_vs_math"].values()) < 1e-5
    moved = {row["mode"]: row for row in report["offload"]["modes"]}  # on CPU a no-op move
    assert {row["loss"] for row in moved.values()} == {moved["none"]["loss"]}
    assert all(moved[m]["grad_rel_err_vs_none"] == 0 for m in ("carries", "prefix", "all"))
    assert moved["all"]["host_peak_gib"] > moved["prefix"]["host_peak_gib"] > 0
    assert report["multi_gpu"] == {"skipped": "0 GPU(s): needs 2-8"}


def test_gpu_check_records_a_failing_section_and_runs_the_rest(tmp_path, monkeypatch):
    import importlib.util
    import json
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "pipelines" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)

    def broken(*args):
        raise RuntimeError("no such kernel on this GPU")

    monkeypatch.setattr(gpu_check, "dispatch", broken)
    out = tmp_path / "report.json"
    argv = ["gpu_check.py", "--smoke", "--only", "dispatch", "meta_step", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match="sections failed: \\['dispatch'\\]"):
        gpu_check.main()
    report = json.loads(out.read_text())
    assert report["dispatch"]["error"] == "RuntimeError: no such kernel on this GPU"
    assert "broken" in report["dispatch"]["trace"]
    assert report["meta_step"]["loss_fused"] > 0 and set(report["seconds"]) == {
        "environment",
        "dispatch",
        "meta_step",
        "total",
    }


def test_chunk_op_under_autocast_casts_like_the_math_path():
    """Under bf16 autocast the suffix hands a float32 cache concatenated with bf16 keys: the
    registered op (below autocast) gets them cast as autocast casts the math path's matmuls."""
    q, k, v = tensors(1, 2, 6, 14, 8, seed=5)
    results = {}
    for backend in ("fused", "triton", "math"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attention.chunk_attention(q.bfloat16(), k, v.bfloat16(), 8, 2, backend=backend)
        assert out.dtype == torch.bfloat16
        results[backend] = out.float()
    torch.testing.assert_close(results["fused"], results["math"], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(results["triton"], results["math"], rtol=2e-2, atol=2e-2)


# ---- the self-check before a GPU's first use (kernels/attention/self_check.py) ----------------
@pytest.fixture
def checked_on_cpu(monkeypatch):
    """The CPU (under the interpreter) treated as a device whose automatic paths use Triton
    after the check, as a GPU is."""
    from ttte2e.kernels.attention import self_check

    monkeypatch.setattr(self_check, "TRITON_DEVICES", ("cuda", "cpu"))
    monkeypatch.delenv(self_check.FORCE_ENV, raising=False)
    self_check.reset()
    yield self_check
    self_check.reset()


def _suffix_second_order(backend=None):
    from ttte2e.kernels.attention import chunk_attention

    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 8, 16, generator=gen, requires_grad=True)
    k = torch.randn(1, 2, 24, 16, generator=gen, requires_grad=True)
    v = torch.randn(1, 2, 24, 16, generator=gen, requires_grad=True)
    out = chunk_attention(q, k, v, 16, 4, backend=backend)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v), create_graph=True)
    return [
        t.detach()
        for t in (
            out,
            *grads,
            *torch.autograd.grad(sum(g.square().sum() for g in grads), (q, k, v)),
        )
    ]


def test_kernels_that_pass_their_check_are_used(checked_on_cpu, monkeypatch):
    from ttte2e.kernels.attention import triton_swa

    calls = []
    forward = triton_swa.attention_forward
    monkeypatch.setattr(triton_swa, "attention_forward", lambda *a: calls.append(1) or forward(*a))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _suffix_second_order()
    assert calls and all(checked_on_cpu._verdicts.values())
    for a, b in zip(got, _suffix_second_order("math")):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "broken, named",
    [
        ("attention_double_backward", "suffix double backward: max relative error"),
        ("attention_forward", "prefix forward: RuntimeError: does not compile here"),
    ],
)
def test_a_failing_kernel_warns_once_names_itself_and_the_paths_fall_back(
    checked_on_cpu, monkeypatch, broken, named
):
    from ttte2e.kernels.attention import sliding_window_attention, triton_swa

    real = getattr(triton_swa, broken)

    def wrong(*args):
        if broken == "attention_forward":
            raise RuntimeError("does not compile here")
        return tuple(torch.zeros_like(t) for t in real(*args))

    monkeypatch.setattr(triton_swa, broken, wrong)
    with pytest.warns(RuntimeWarning, match="failed their self-check") as record:
        got = _suffix_second_order()
    assert len(record) == 1 and named in str(record[0].message)
    for a, b in zip(got, _suffix_second_order("math")):  # the fallback's numbers are right
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    q, k, v = tensors(1, 2, 64, 64, 16, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the verdict is kept
        out = sliding_window_attention(q, k, v, 16)
    torch.testing.assert_close(out, reference.naive_sliding_window_attention(q, k, v, 16))


def test_forcing_the_kernels_makes_a_failed_check_an_error(checked_on_cpu, monkeypatch):
    from ttte2e.kernels.attention import triton_swa

    monkeypatch.setattr(
        triton_swa,
        "attention_backward",
        lambda *a: (_ for _ in ()).throw(RuntimeError("no such GPU feature")),
    )
    monkeypatch.setenv(checked_on_cpu.FORCE_ENV, "triton")
    with pytest.raises(
        RuntimeError,
        match=r"prefix backward: RuntimeError: no such GPU feature.*"
        r"TTTE2E_ATTENTION=triton: no fallback",
    ):
        _suffix_second_order()
    monkeypatch.setenv(checked_on_cpu.FORCE_ENV, "fastest")
    with pytest.raises(ValueError, match="TTTE2E_ATTENTION='fastest': choose auto or triton"):
        _suffix_second_order()


def test_checks_are_per_head_dim_and_a_later_kernel_error_falls_back(checked_on_cpu, monkeypatch):
    """Each head dim is checked at its own size; a triton error after the check passed (e.g.
    OutOfResources on a new specialization) warns, this call runs PyTorch, later calls too."""
    import triton.runtime.errors

    from ttte2e.kernels.attention import triton_swa

    checked = []
    run_checks = checked_on_cpu.run_checks

    def counting(device, dtype, head_dim):
        checked.append(head_dim)
        return run_checks(device, dtype, head_dim)

    monkeypatch.setattr(checked_on_cpu, "run_checks", counting)
    _suffix_second_order()  # head dim 16
    q, k, v = tensors(1, 2, 8, 24, 24, seed=6)
    attention.chunk_attention(q, k, v, 16, 4)
    assert checked == [16, 24] and len(checked_on_cpu._verdicts) == 2

    launched = []
    backward = triton_swa.attention_backward

    def out_of_resources(*args):
        launched.append(1)
        raise triton.runtime.errors.OutOfResources(262144, 232448, "shared memory")

    monkeypatch.setattr(triton_swa, "attention_backward", out_of_resources)
    with pytest.warns(
        RuntimeWarning, match="'backward' failed on cpu .*head dim 16.*OutOfResources"
    ):
        got = _suffix_second_order()
    for a, b in zip(got, _suffix_second_order("math")):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert launched == [1] and checked_on_cpu._verdicts[("cpu", torch.float32, 16)] is False
    assert checked_on_cpu._verdicts[("cpu", torch.float32, 24)]  # other head dims keep theirs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _suffix_second_order()  # PyTorch from now on: the kernel is not tried again
    assert launched == [1]
    monkeypatch.setattr(triton_swa, "attention_backward", backward)

    monkeypatch.setenv(checked_on_cpu.FORCE_ENV, "triton")  # forced: the error is raised
    monkeypatch.setattr(triton_swa, "attention_forward", out_of_resources)
    with pytest.raises(RuntimeError, match="'forward' failed.*no fallback"):
        attention.chunk_attention(q, k, v, 16, 4)
