"""Parity with numbers produced by the official JAX code (tests/data/README.md).

Every case file found is checked (case A ships; others with other sizes use the same keys), for
the plain and the BOS batch, with and without TTT, under every remat mode.
"""

import numpy as np
import pytest
import torch

from ttte2e.model.convert import state_dict_to_official

from conftest import REFERENCE_DIR, case_params, load_case, reference_cases

CASES = reference_cases()
BATCHES = ["", "bos."]


def test_reference_data_ships():
    """The repo carries its own reference data: a clone alone runs the parity tests."""
    assert (REFERENCE_DIR / "ttt_e2e_tiny_a.npz").is_file(), REFERENCE_DIR
    assert (REFERENCE_DIR / "official_ckpt_tiny_a" / "10" / "model_weights").is_dir()


@pytest.fixture(scope="module", params=case_params(CASES), ids=lambda p: p.stem if p else "none")
def case(request):
    return load_case(request.param)


@pytest.mark.parametrize("batch", BATCHES, ids=["plain", "bos"])
@pytest.mark.parametrize("remat", ["none", "chunk", "nested"])
def test_meta_loss_and_gradient_match_official(case, batch, remat):
    data, model = case
    tokens = torch.from_numpy(data[batch + "tokens"]).long()
    model.zero_grad(set_to_none=True)
    out = model.meta_loss(tokens, remat=remat)
    out.loss.backward()

    np.testing.assert_allclose(
        out.token_nll.detach().numpy(), data[batch + "nll_ttt"], rtol=0, atol=1e-5
    )
    np.testing.assert_allclose(
        out.chunk_loss.detach().numpy(), data[batch + "chunk_loss_ttt"], rtol=0, atol=1e-5
    )
    np.testing.assert_allclose(
        out.chunk_loss.detach().mean(1).numpy(), data[batch + "seq_loss_ttt"], rtol=0, atol=1e-5
    )
    assert abs(out.loss.item() - float(data[batch + "outer_loss"])) <= 1e-5
    np.testing.assert_allclose(
        out.inner_grad_norm.numpy(), data[batch + "inner_grad_norm"], rtol=1e-4, atol=1e-6
    )

    grads = state_dict_to_official({n: p.grad for n, p in model.named_parameters()})
    expected_keys = {k[len(batch + "grad.") :] for k in data.files if k.startswith(batch + "grad.")}
    assert set(grads) == expected_keys
    for name, grad in grads.items():
        ref = data[batch + "grad." + name]
        scale = np.abs(ref).max()
        err = np.abs(grad - ref).max()
        assert err <= 1e-4 * scale, f"{name}: max |diff| {err:.3g} > 1e-4 * {scale:.3g}"


@pytest.mark.parametrize("batch", BATCHES, ids=["plain", "bos"])
def test_no_ttt_matches_official(case, batch):
    data, model = case
    tokens = torch.from_numpy(data[batch + "tokens"]).long()
    with torch.no_grad():
        out = model.meta_loss(tokens, eta=0.0)
        plain = model.lm_loss(tokens)
    np.testing.assert_allclose(out.token_nll.numpy(), data[batch + "nll_no_ttt"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(
        out.chunk_loss.numpy(), data[batch + "chunk_loss_no_ttt"], rtol=0, atol=1e-5
    )
    # the reference data: nll_no_ttt equals one ordinary forward pass over the whole sequence
    np.testing.assert_allclose(
        plain.token_nll.numpy(), data[batch + "nll_no_ttt"], rtol=0, atol=1e-5
    )


def test_reference_exercises_clipping_and_bos(case):
    """Guards the reference itself: both clip branches and the BOS mask are exercised."""
    data, _ = case
    norms = data["inner_grad_norm"]
    assert (norms >= 1.0).any() and (norms < 1.0).any()
    assert (~data["bos.loss_masks"]).any()


def test_eval_without_grad_equals_training_values(case):
    data, model = case
    tokens = torch.from_numpy(data["bos.tokens"]).long()
    with torch.no_grad():
        evaluated = model.meta_loss(tokens)
    trained = model.meta_loss(tokens)
    torch.testing.assert_close(evaluated.token_nll, trained.token_nll.detach(), rtol=0, atol=1e-6)
    for a, b in zip(evaluated.fast_weights, trained.fast_weights):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-6)
