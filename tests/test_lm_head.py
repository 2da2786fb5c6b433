"""Fused LM-head op (nll + dl/dh) against its plain autograd reference: values and gradients."""

import pytest
import torch

from ttte2e.kernels.lm_head import nll_and_hidden_grad, reference


@pytest.mark.parametrize("rows, dim, vocab", [(7, 5, 11), (33, 16, 50)])
@pytest.mark.parametrize("upstream", ["both", "nll_only", "grad_only"])
def test_fused_head_matches_reference(rows, dim, vocab, upstream):
    gen = torch.Generator().manual_seed(rows)
    h = torch.randn(rows, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    embed = torch.randn(vocab, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    weights = torch.rand(rows, generator=gen, dtype=torch.float64)
    weights[::3] = 0.0  # masked rows
    a = torch.randn(rows, generator=gen, dtype=torch.float64)
    u = torch.randn(rows, dim, generator=gen, dtype=torch.float64)

    results = []
    for fn in (nll_and_hidden_grad, reference.nll_and_hidden_grad):
        nll, grad_h = fn(h, embed, targets, weights)
        terms = {"both": [(nll * a).sum(), (grad_h * u).sum()], "nll_only": [(nll * a).sum()],
                 "grad_only": [(grad_h * u).sum()]}[upstream]
        grads = torch.autograd.grad(sum(terms), (h, embed))
        results.append((nll, grad_h, *grads))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_fused_head_passes_gradcheck():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    embed = torch.randn(9, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 9, (6,), generator=gen)
    weights = torch.rand(6, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda h_, e_: nll_and_hidden_grad(h_, e_, targets, weights), (h, embed))
