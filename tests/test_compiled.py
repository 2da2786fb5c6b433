"""The compiled chunk step (model/compiled.py) against the eager one it replaces.

One model, the official case A (tests/data), serves every test here, and the module runs in one
xdist worker: each graph is compiled once per test session, and later tests reuse what earlier
ones compiled. Inductor (what runs) compiles for what depends on its generated code: exactness
end to end (remat nested: its forward runs the no-grad graphs, its recompute the graphs with
gradient), no recompilation (Inductor adds shape guards of its own), and bf16 rounding. The
tests of a tracing property (the other remat modes, the other head form, decoding) trace the
same graphs with `aot_eager` (Dynamo, AOTAutograd's functionalization and joint graph, no code
generation): cheap with empty compiler caches, and it fails on the torch.func-in-compile bugs
that return wrong gradients. Inductor writes its C++ kernels here without its vector-ISA
templates (scalar loops): the same graphs, fusions and fp32 intermediates, and less compile
time with empty caches; the SIMD form is a detail of the CPU backend that a GPU run (Triton)
never executes. TTTE2E_COMPILE=force makes a compile failure raise, so a test cannot pass by
running eager.
"""

import warnings

import numpy as np
import pytest
import torch

from ttte2e.model import compiled
from ttte2e.model.decode import decode_step, prefill

from conftest import load_case, reference_cases

# the bound, fp32: per-token NLL and every gradient within 1e-5 (x max|grad|)
ATOL = 1e-5

# every test in one worker: the graphs one test compiles serve the next (see the docstring)
pytestmark = pytest.mark.xdist_group("compiled")


@pytest.fixture(autouse=True)
def compile_errors_raise(monkeypatch):
    monkeypatch.setenv(compiled.FORCE_ENV, "force")


@pytest.fixture(scope="module", autouse=True)
def scalar_cpu_kernels():
    """Inductor's C++ kernels without the vector-ISA templates (see the docstring)."""
    import torch._inductor.config

    with torch._inductor.config.patch({"cpp.vec_isa_ok": False}):
        yield


@pytest.fixture
def traced_only(monkeypatch):
    """The graphs traced and run without Inductor's code generation (aot_eager)."""
    monkeypatch.setattr(compiled, "backend", "aot_eager")


@pytest.fixture(scope="module")
def case():
    data, model = load_case(reference_cases()[0])
    return data, model, torch.from_numpy(data["bos.tokens"]).long()


def _step(model, tokens, compile: bool, remat: str):
    model.config.compile = compile
    model.zero_grad(set_to_none=True)
    try:
        out = model.meta_loss(tokens, remat=remat)
        out.loss.backward()
    finally:
        model.config.compile = False
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out, grads


@pytest.mark.parametrize(
    "remat, backend", [("nested", "inductor"), ("none", "aot_eager"), ("chunk", "aot_eager")]
)
def test_compiled_meta_step_equals_eager_and_official(case, remat, backend, monkeypatch):
    """Official case A, the batch with BOS inside: NLL, inner norms and every parameter's
    gradient of the compiled step equal the eager step's, and both the official numbers."""
    data, model, tokens = case
    monkeypatch.setattr(compiled, "backend", backend)
    eager, eager_grads = _step(model, tokens, False, remat)
    got, grads = _step(model, tokens, True, remat)
    assert (got.token_nll - eager.token_nll).abs().max() <= ATOL
    assert (got.inner_grad_norm - eager.inner_grad_norm).abs().max() <= ATOL
    scale = max(g.abs().max() for g in eager_grads.values())
    worst = max((grads[n] - g).abs().max() for n, g in eager_grads.items())
    print(f"remat {remat}: worst grad diff / max|grad| {worst / scale:.1e}")
    assert worst <= ATOL * scale, (worst / scale).item()
    np.testing.assert_allclose(
        got.token_nll.detach().numpy(), data["bos.nll_ttt"], rtol=0, atol=1e-5
    )
    assert abs(got.loss.item() - float(data["bos.outer_loss"])) <= 1e-5


def test_the_other_head_form_equals_eager_too(case, monkeypatch, traced_only):
    """The head's part of the inner gradient by torch.func's own differentiation of the
    cross-entropy (the form the benchmark compares with the closed form used by default)."""
    _, model, tokens = case
    monkeypatch.setattr(compiled, "head_form", "autograd")
    eager, eager_grads = _step(model, tokens, False, "none")
    got, grads = _step(model, tokens, True, "none")
    assert (got.token_nll - eager.token_nll).abs().max() <= ATOL
    scale = max(g.abs().max() for g in eager_grads.values())
    assert max((grads[n] - g).abs().max() for n, g in eager_grads.items()) <= ATOL * scale


def test_no_recompilation_across_chunks_steps_and_batch_sizes(case):
    """After one training step, more steps (another inner step size each, as in the warm-up
    ramp) compile nothing; evaluation compiles for a batch of 1 and then one graph for any other
    batch size (a symbolic batch)."""
    _, model, tokens = case
    model.config.compile = True
    try:
        for eta in (0.5, 0.25):
            model.zero_grad(set_to_none=True)
            model.meta_loss(tokens, eta=eta, final_update=False).loss.backward()
            if eta == 0.5:  # warm-up done: from here on a recompile is an error
                torch._dynamo.config.error_on_recompile = True
        torch._dynamo.config.error_on_recompile = False
        with torch.no_grad():
            for batch in (1, 3):
                model.meta_loss(tokens[:1].repeat(batch, 1))
            torch._dynamo.config.error_on_recompile = True
            for batch in (2, 4, 5):
                model.meta_loss(tokens[:1].repeat(batch, 1), eta=0.3)
    finally:
        torch._dynamo.config.error_on_recompile = False
        model.config.compile = False


def test_bf16_autocast_compiled_is_as_close_to_fp32_as_eager(case):
    """Under bf16 autocast (forward only, backward outside, as in training) the compiled and the
    eager step round differently (Inductor keeps fused intermediates in fp32): each is compared
    with the fp32 step, and the compiled one must be no further from it than eager (x 1.5).
    Remat none: the fewest autocast graphs to compile (that a remat recompute runs under the
    forward's autocast state is tested in test_model.py; the graph it then runs is chosen by
    that state)."""
    _, model, tokens = case
    _, fp32 = _step(model, tokens, False, "none")
    errors = {}
    for compile in (False, True):
        model.config.compile = compile
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model.meta_loss(tokens, remat="none")
            model.zero_grad(set_to_none=True)
            out.loss.backward()
        finally:
            model.config.compile = False
        assert all(w.dtype == torch.float32 for w in out.fast_weights)
        assert out.inner_grad_norm.dtype == torch.float32
        rel = sorted(
            ((p.grad - fp32[n]).abs().max() / fp32[n].abs().max()).item()
            for n, p in model.named_parameters()
        )
        errors[compile] = (rel[len(rel) // 2], rel[-1])
    print(f"bf16 vs fp32 (median, worst): eager {errors[False]}, compiled {errors[True]}")
    assert errors[True][0] <= 1.5 * errors[False][0] and errors[True][1] <= 1.5 * errors[False][1]


def test_teacher_forced_decoding_compiled_equals_prefill(case, traced_only):
    """Decode's TTT steps and prefill run the compiled chunk step: teacher-forced decoding gives
    the eager training forward's NLLs."""
    _, model, tokens = case
    with torch.no_grad():
        expected = model.meta_loss(tokens).token_nll
    model.config.compile = True
    try:
        state, nll = prefill(model, tokens[:, :40])
        parts, logits = [nll], state.last_logits
        for t in range(40, tokens.shape[1]):
            parts.append(-torch.log_softmax(logits.float(), -1).gather(1, tokens[:, t : t + 1]))
            if t + 1 < tokens.shape[1]:
                logits = decode_step(model, state, tokens[:, t])
    finally:
        model.config.compile = False
    assert (torch.cat(parts, 1) - expected).abs().max() <= ATOL


def test_a_compile_failure_warns_once_and_runs_eager(case, monkeypatch):
    _, model, tokens = case

    def broken(*args):
        raise torch._dynamo.exc.Unsupported("injected")

    monkeypatch.setattr(
        compiled, "_compiled", {(n, compiled.backend): broken for n in ("chunk_step", "block")}
    )
    monkeypatch.setattr(compiled, "_failed", None)
    model.config.compile = True
    try:
        with pytest.raises(torch._dynamo.exc.Unsupported, match="injected"):
            model.meta_loss(tokens[:1])
        monkeypatch.delenv(compiled.FORCE_ENV)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad():
                got = model.meta_loss(tokens).token_nll
                model.meta_loss(tokens)
    finally:
        model.config.compile = False
    messages = [str(w.message) for w in caught if "torch.compile failed" in str(w.message)]
    assert len(messages) == 1 and "Unsupported: injected" in messages[0], messages
    with torch.no_grad():
        assert torch.equal(got, model.meta_loss(tokens).token_nll)


def test_the_run_setting_and_its_flags():
    """auto compiles on CUDA only; --compile / --no-compile are on / off on the commands."""
    from ttte2e.platform.cli.train import parse
    from ttte2e.platform.train.config import compile_enabled

    assert compile_enabled("auto", "cuda") and not compile_enabled("auto", "cpu")
    assert compile_enabled("on", "cpu") and not compile_enabled("off", "cuda")
    for argv, expected in (([], "auto"), (["--compile"], "on"), (["--no-compile"], "off")):
        cfg, _ = parse(["--preset", "tiny", *argv, "--lr", "1e-3"], "train")
        assert cfg.compile == expected and cfg.lr == 1e-3, argv
    cfg, _ = parse(["--preset", "tiny", "--compile", "off"], "train")
    assert cfg.compile == "off"
