"""The meta-gradient against float64 central finite differences of the outer loss.

A random tiny config with S = 2 TTT blocks (so the KV cache of the second one depends on theta),
a small clip threshold so that some inner steps clip and others do not, and BOS targets masked.
"""

import torch

from ttte2e.model import TTTConfig, TTTModel

CFG = TTTConfig(
    vocab_size=37,
    d_model=16,
    n_layers=3,
    n_heads=2,
    mlp_hidden=24,
    n_ttt_blocks=2,
    seq_len=24,
    window=8,
    chunk_size=4,
    inner_lr=0.7,
    inner_clip=2.5,
    bos_token_id=1,
)


def make_case(seed=0):
    torch.manual_seed(seed)
    model = TTTModel(CFG).double()
    with torch.no_grad():  # larger weights and perturbed norm gains: a non-trivial landscape
        for name, p in model.named_parameters():
            if "norm" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
            else:
                p.mul_(3.0)
    tokens = torch.randint(2, CFG.vocab_size, (2, CFG.seq_len + 1))
    tokens[0, 5] = tokens[1, 0] = tokens[1, 13] = CFG.bos_token_id
    return model, tokens


def test_meta_gradient_matches_central_differences():
    """remat 'none'; 'chunk' and 'nested' give the same gradients to 1e-6 in float64
    (tests/test_model.py test_remat_modes_give_the_same_gradients), so this covers them too."""
    model, tokens = make_case()
    out = model.meta_loss(tokens, remat="none")
    norms = out.inner_grad_norm
    assert (norms >= CFG.inner_clip).any() and (norms < CFG.inner_clip).any(), norms
    # no inner step sits at the clip threshold, where the loss is not differentiable
    assert ((norms - CFG.inner_clip).abs() > 1e-3).all()
    params = dict(model.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(out.loss, list(params.values()))))

    def loss_at(name, index, delta):
        with torch.no_grad():
            p = params[name]
            old = p[index].item()
            p[index] = old + delta
            value = model.meta_loss(tokens).loss.item()
            p[index] = old
        return value

    gen = torch.Generator().manual_seed(1)
    eps = 1e-6
    checked = 0
    for name, p in params.items():
        # two random entries of every tensor: prefix, suffix attention, norms, theta_0, embedding
        for _ in range(2):
            index = tuple(int(torch.randint(0, s, (1,), generator=gen)) for s in p.shape)
            numeric = (loss_at(name, index, eps) - loss_at(name, index, -eps)) / (2 * eps)
            analytic = grads[name][index].item()
            assert abs(numeric - analytic) <= 1e-6 + 1e-5 * abs(analytic), (
                f"{name}{list(index)}: autograd {analytic:.10g} vs finite difference {numeric:.10g}"
            )
            checked += 1
    assert checked == 2 * len(params)


def test_random_directional_derivatives():
    """<grad, u> against (L(p + eps u) - L(p - eps u)) / 2 eps along random directions of all params."""
    model, tokens = make_case(seed=3)
    params = list(model.parameters())
    loss = model.meta_loss(tokens).loss
    grads = torch.autograd.grad(loss, params)
    gen = torch.Generator().manual_seed(2)

    def central_difference(direction, eps):
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                for p, u in zip(params, direction):
                    p.add_(sign * eps * u)
                values.append(model.meta_loss(tokens).loss.item())
                for p, u in zip(params, direction):
                    p.sub_(sign * eps * u)
        return (values[0] - values[1]) / (2 * eps)

    for _ in range(3):
        direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        analytic = sum((g * u).sum() for g, u in zip(grads, direction)).item()
        # Richardson extrapolation cancels the eps^2 term: the loss is strongly curved here
        eps = 2e-6
        numeric = (
            4 * central_difference(direction, eps / 2) - central_difference(direction, eps)
        ) / 3
        assert abs(numeric - analytic) <= 1e-5 * max(1.0, abs(analytic)), (numeric, analytic)
