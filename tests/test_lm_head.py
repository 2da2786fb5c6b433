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
        terms = {
            "both": [(nll * a).sum(), (grad_h * u).sum()],
            "nll_only": [(nll * a).sum()],
            "grad_only": [(grad_h * u).sum()],
        }[upstream]
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
        lambda h_, e_: nll_and_hidden_grad(h_, e_, targets, weights), (h, embed)
    )


def test_the_backward_keeps_one_rows_by_vocabulary_buffer():
    """What the op saves for its backward: one [N, V] buffer (the probabilities), the rest
    [N, d], [V, d] or [N]."""
    rows, dim, vocab = 16, 8, 64
    h = torch.randn(rows, dim, requires_grad=True)
    embed = torch.randn(vocab, dim, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        nll, grad_h = nll_and_hidden_grad(
            h, embed, torch.randint(0, vocab, (rows,)), torch.rand(rows)
        )
    assert saved.count((rows, vocab)) == 1, saved
    assert all(shape in ((rows, vocab), (rows, dim), (vocab, dim), (rows,)) for shape in saved)


def test_under_autocast_the_backward_matmuls_run_in_the_compute_dtype():
    from torch.utils._python_dispatch import TorchDispatchMode

    class MatmulDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                self.dtypes.append(args[-2].dtype)
            return func(*args, **(kwargs or {}))

    h = torch.randn(16, 8, requires_grad=True)
    embed = torch.randn(32, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nll, grad_h = nll_and_hidden_grad(h, embed, torch.randint(0, 32, (16,)), torch.rand(16))
    record = MatmulDtypes()
    with record:
        torch.autograd.backward([nll.sum(), grad_h.float().sum()])
    assert len(record.dtypes) == 4 and set(record.dtypes) == {torch.bfloat16}, record.dtypes
    assert h.grad.dtype == torch.float32 and embed.grad.dtype == torch.float32
