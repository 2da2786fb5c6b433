"""Host offload (platform/train/offload.py): on CPU the move is a no-op, so the meta step with
offload is bit-identical to the one without; the hooks see exactly what each mode should move."""

import pytest
import torch

from ttte2e.model import TTTConfig, TTTModel
from ttte2e.model.parallel import KeepOnDevice
from ttte2e.platform.train.offload import apply_offload

from conftest import SMALL


def _config(**changes) -> TTTConfig:
    return TTTConfig(
        **dict(
            SMALL,
            seq_len=128,
            window=32,
            chunk_size=16,
            remat="nested",
            remat_group=2,
            checkpoint_prefix=True,
            **changes,
        )
    )


def _step(model: TTTModel, tokens: torch.Tensor):
    model.zero_grad(set_to_none=True)
    out = model.meta_loss(tokens)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["carries", "prefix", "all"])
def test_offload_is_exact_and_moves_what_it_names(mode):
    config = _config()
    torch.manual_seed(0)
    plain = TTTModel(config)
    tokens = torch.randint(0, config.vocab_size, (2, config.seq_len + 1))
    tokens[0, 40] = config.bos_token_id
    loss, grads = _step(plain, tokens)

    model = TTTModel(config)
    model.load_state_dict(plain.state_dict())
    offload = apply_offload(model, mode, min_bytes=0)
    got_loss, got_grads = _step(model, tokens)
    assert torch.equal(got_loss, loss)
    for name, grad in grads.items():
        assert torch.equal(got_grads[name], grad), name

    batch, d, hidden = 2, config.d_model, config.mlp_hidden
    heads, window, dh = config.n_heads, config.attn_window, config.head_dim
    n_groups = config.n_chunks // config.remat_group
    block_input = batch * config.seq_len * d * 4
    carry = config.n_ttt_blocks * (3 * batch * d * hidden * 4 + 2 * batch * heads * window * dh * 4)
    caches = config.n_ttt_blocks * 2 * batch * heads * window * dh * 4
    group_input = batch * config.remat_group * config.chunk_size * d * 4
    # group 0 starts from theta_0 itself (views of the parameters, never moved) and zero caches
    carries = caches + (n_groups - 1) * carry + n_groups * group_input
    prefix = config.n_prefix_blocks * block_input
    if mode == "carries":
        assert offload.bytes == carries
    elif mode == "prefix":
        assert offload.bytes >= prefix  # the block inputs (and the small RoPE table per block)
        assert offload.bytes - prefix <= config.n_prefix_blocks * config.seq_len * dh * 8
    else:
        assert offload.bytes > carries + prefix  # and everything else the forward saves


def test_a_tensor_several_ops_save_is_moved_once_and_released_with_the_graph():
    from ttte2e.platform.train.offload import HostOffload

    offload = HostOffload(min_bytes=0)
    w = torch.randn(1000, requires_grad=True)
    with offload.hooks():
        x = w * 2
        y = (x.sin() + x.cos()).sum()  # sin and cos both save x
    assert offload.tensors == 1 and offload.bytes == offload.peak_bytes == 4000
    y.backward()
    torch.testing.assert_close(w.grad, 2 * (torch.cos(2 * w.detach()) - torch.sin(2 * w.detach())))
    del x, y
    import gc

    gc.collect()
    assert offload.live_bytes == 0


def test_installing_a_mode_replaces_the_one_before():
    model = TTTModel(_config())
    first = apply_offload(model, "carries", min_bytes=0)
    second = apply_offload(model, "prefix", min_bytes=0)
    tokens = torch.randint(0, model.config.vocab_size, (1, model.config.seq_len + 1))
    model.meta_loss(tokens).loss.backward()
    assert first.tensors == 0 and second.tensors > 0  # the carries are no longer hooked
    moved = second.tensors
    apply_offload(model, "none")
    model.meta_loss(tokens).loss.backward()
    assert isinstance(model.offload, KeepOnDevice) and second.tensors == moved
    with pytest.raises(ValueError, match="offload 'disk'"):
        apply_offload(model, "disk")


@pytest.mark.parametrize("mode", ["carries", "all"])
def test_the_backward_reads_only_the_copies_and_moved_carries_leave_the_device(mode):
    """As on a GPU: each packed tensor is copied, and the originals still alive after the forward
    are poisoned (their memory reused): the gradients are still exactly those without offload.
    Under carry offload no earlier group's carry outlives the forward on the device (the loop
    keeps only the last one), so moving them lowers the forward's peak as the plan counts."""
    config = _config()
    torch.manual_seed(0)
    plain = TTTModel(config)
    tokens = torch.randint(0, config.vocab_size, (2, config.seq_len + 1))
    loss, grads = _step(plain, tokens)

    model = TTTModel(config)
    model.load_state_dict(plain.state_dict())
    offload = apply_offload(model, mode, min_bytes=0, emulate_copies=True)
    model.zero_grad(set_to_none=True)
    out = model.meta_loss(tokens)
    alive = offload.live_sources()
    if mode == "carries":
        # at no point of the forward are more originals alive than the carry being saved (the
        # next group's input) and the one before it
        batch, d, hidden = 2, config.d_model, config.mlp_hidden
        caches = 2 * batch * config.n_heads * config.attn_window * config.head_dim * 4
        one_carry = config.n_ttt_blocks * (3 * batch * d * hidden * 4 + caches)
        assert offload.bytes > 3 * one_carry, offload.bytes  # 4 groups: 3 carries moved
        assert offload.peak_source_bytes <= 2 * one_carry, (offload.peak_source_bytes, one_carry)
    assert offload.poison_sources() == len(alive)
    out.loss.backward()
    assert torch.equal(out.loss.detach(), loss)
    for name, grad in grads.items():
        assert torch.equal(model.get_parameter(name).grad, grad), name
