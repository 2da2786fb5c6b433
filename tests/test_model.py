"""Behaviour of the model beyond the reference case: eta = 0, remat equivalence, batching."""

import pytest
import torch

from ttte2e.model import TTTConfig, TTTModel, inner_lr_at

CFG = TTTConfig(
    vocab_size=61,
    d_model=32,
    n_layers=4,
    n_heads=4,
    mlp_hidden=48,
    n_ttt_blocks=2,
    seq_len=64,
    window=16,
    chunk_size=8,
    inner_lr=1.0,
    bos_token_id=1,
)


def make(cfg=CFG, seed=0, batch=3):
    torch.manual_seed(seed)
    model = TTTModel(cfg)
    with torch.no_grad():  # perturbed norms and larger weights: TTT visibly changes predictions
        for name, p in model.named_parameters():
            p.mul_(1 + 0.1 * torch.randn_like(p)) if "norm" in name else p.mul_(2.0)
    tokens = torch.randint(2, cfg.vocab_size, (batch, cfg.seq_len + 1))
    tokens[0, 9] = tokens[1, 0] = tokens[2, 31] = cfg.bos_token_id
    return model, tokens


@pytest.mark.parametrize("attention", ["sliding", "full"])
def test_eta_zero_equals_plain_forward(attention):
    model, tokens = make(CFG.replace(attention=attention))
    with torch.no_grad():
        chunked = model.meta_loss(tokens, eta=0.0)
        plain = model.lm_loss(tokens)
    torch.testing.assert_close(chunked.token_nll, plain.token_nll, rtol=0, atol=1e-5)


def test_chunk_zero_is_bit_identical_with_and_without_ttt():
    model, tokens = make()
    with torch.no_grad():
        ttt = model.meta_loss(tokens)
        no_ttt = model.meta_loss(tokens, eta=0.0)
    b = CFG.chunk_size
    assert torch.equal(ttt.token_nll[:, :b], no_ttt.token_nll[:, :b])
    # and TTT does change the later chunks
    assert (ttt.token_nll[:, b:] - no_ttt.token_nll[:, b:]).abs().max() > 1e-3


def grads_of(model, tokens, **kw):
    model.zero_grad(set_to_none=True)
    out = model.meta_loss(tokens, **kw)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "dtype, bound", [(torch.float64, 1e-6), (torch.float32, 1e-5)], ids=["float64", "float32"]
)
@pytest.mark.parametrize(
    "variant",
    [
        dict(remat="chunk"),
        dict(remat="nested"),
        dict(remat="nested", group=3),
        dict(remat="nested", group=8),
        dict(remat="nested", prefix_ckpt=True),
    ],
    ids=["chunk", "nested", "nested-g3", "nested-g8", "nested-prefix-ckpt"],
)
def test_remat_modes_give_the_same_gradients(variant, dtype, bound):
    """Per tensor, max |difference| <= bound * max |gradient| of the unrolled ('none') gradient.

    The math is identical; float32 differs by summation order only (remat hands back per-chunk
    parameter gradients that autograd adds in another order), float64 shows any real difference.
    """
    model, tokens = make()
    model.to(dtype)
    ref_out, ref = grads_of(model, tokens, remat="none")
    cfg = CFG.replace(
        remat_group=variant.get("group", 0), checkpoint_prefix=variant.get("prefix_ckpt", False)
    )
    model.config = cfg
    out, got = grads_of(model, tokens, remat=variant["remat"])
    assert out.loss.item() == pytest.approx(ref_out.loss.item(), abs=1e-6)
    for name in ref:
        scale = ref[name].abs().max().item()
        err = (got[name] - ref[name]).abs().max().item()
        assert err <= bound * scale, f"{name}: {err:.3g} > {bound} * {scale:.3g}"


def test_every_sequence_has_its_own_fast_weights():
    model, tokens = make()
    with torch.no_grad():
        together = model.meta_loss(tokens)
        for i in range(tokens.shape[0]):
            alone = model.meta_loss(tokens[i : i + 1])
            torch.testing.assert_close(alone.token_nll[0], together.token_nll[i], rtol=0, atol=1e-5)
            torch.testing.assert_close(
                alone.inner_grad_norm[0], together.inner_grad_norm[i], rtol=1e-5, atol=1e-6
            )
    final_w1 = together.fast_weights[0]
    assert not torch.allclose(final_w1[0], final_w1[1])


def test_bos_targets_are_masked_from_the_losses():
    model, tokens = make()
    with torch.no_grad():
        out = model.meta_loss(tokens)
    b = CFG.chunk_size
    mask = (tokens[:, 1:] != CFG.bos_token_id).float()
    nll = out.token_nll
    for c in range(CFG.n_chunks):
        m, x = mask[:, c * b : (c + 1) * b], nll[:, c * b : (c + 1) * b]
        torch.testing.assert_close(
            out.chunk_loss[:, c], (m * x).sum(1) / m.sum(1), rtol=1e-6, atol=1e-6
        )
    assert out.loss.item() == pytest.approx(out.chunk_loss.mean().item(), abs=1e-6)


def test_meta_loss_gradient_reaches_every_parameter():
    model, tokens = make()
    _, grads = grads_of(model, tokens)
    for name, g in grads.items():
        assert g.abs().sum() > 0, name


def test_longer_context_than_training_is_allowed_in_multiples_of_b():
    model, tokens = make()
    long = torch.randint(2, CFG.vocab_size, (1, 2 * CFG.seq_len + 1))
    with torch.no_grad():
        assert model.meta_loss(long).token_nll.shape == (1, 2 * CFG.seq_len)


def test_bad_tokens_are_rejected_with_clear_errors():
    model, tokens = make()
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        model.meta_loss(tokens[:, :-1])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.meta_loss(tokens.clone().fill_(CFG.vocab_size))
    with pytest.raises(ValueError, match="empty batch"):
        model.meta_loss(tokens[:0])
    with pytest.raises(ValueError, match="integer tensor"):
        model.meta_loss(tokens.float())


def test_inner_lr_ramps_from_a_tenth_over_warmup():
    assert inner_lr_at(0, 100, 1.0) == pytest.approx(0.1)
    assert inner_lr_at(50, 100, 1.0) == pytest.approx(0.55)
    assert inner_lr_at(100, 100, 1.0) == 1.0
    assert inner_lr_at(7, 0, 0.5) == 0.5


def test_eta_as_a_tensor_gives_the_same_loss_and_meta_gradient():
    """eta may be a tensor (e.g. a schedule value): same NLLs and meta-gradient as the float."""
    model, tokens = make()
    grads = []
    for eta in (0.3, torch.tensor(0.3)):
        model.zero_grad()
        out = model.meta_loss(tokens, eta=eta)
        out.loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        if isinstance(eta, float):
            nll = out.token_nll.detach()
    torch.testing.assert_close(out.token_nll.detach(), nll)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_save_and_load_pretrained_round_trip(tmp_path):
    model, tokens = make()
    model.save_pretrained(tmp_path / "m")
    loaded = TTTModel.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.meta_loss(tokens).token_nll, model.meta_loss(tokens).token_nll, rtol=0, atol=0
        )
    with pytest.raises(FileNotFoundError, match="no config.json"):
        TTTModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("remat", ["chunk", "nested"])
def test_remat_recomputes_under_the_forward_autocast_state(remat):
    """bf16 autocast around the forward only (backward outside, as in training): the recompute
    must run under the forward's autocast state and reproduce its values."""
    model, tokens = make()
    grads = {}
    for mode in ("none", remat):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.meta_loss(tokens, remat=mode)
        model.zero_grad(set_to_none=True)
        out.loss.backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
        # fast weights, inner gradients and clip norm stay float32 under bf16 autocast
        assert all(w.dtype == torch.float32 for w in out.fast_weights)
        assert out.inner_grad_norm.dtype == torch.float32
    ref, got = grads["none"], grads[remat]
    rel = sorted(((got[n] - ref[n]).abs().max() / ref[n].abs().max()).item() for n in ref)
    # measured: median 0 (most tensors bit-identical), worst 4e-3 (bf16 summation order);
    # a recompute outside autocast gives median 3e-2, worst 7e-2
    assert rel[len(rel) // 2] <= 1e-4 and rel[-1] <= 1e-2, rel
