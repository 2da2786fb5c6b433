"""Attention ops against the plain O(T^2) reference, on awkward shapes, values and gradients."""

import pytest
import torch

from ttte2e.kernels.attention import chunk_attention, reference, sliding_window_attention


def qkv(batch, heads, seq, dim, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, heads, seq, dim, generator=gen, dtype=dtype).requires_grad_()
        for _ in range(3)
    ]


@pytest.mark.parametrize(
    "seq, window, block",
    [(37, 1, None), (37, 5, 8), (64, 16, None), (50, 17, 7), (33, 40, None), (96, 32, 32)],
)
def test_blocked_sliding_window_matches_naive(seq, window, block):
    q, k, v = qkv(2, 3, seq, 8)
    expected = reference.naive_sliding_window_attention(q, k, v, window)
    got = reference.blocked_sliding_window_attention(q, k, v, window, block_size=block)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    upstream = torch.randn_like(expected)
    g_expected = torch.autograd.grad(expected, (q, k, v), upstream)
    g_got = torch.autograd.grad(got, (q, k, v), upstream)
    for a, b in zip(g_got, g_expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_public_op_matches_reference_including_full_window():
    q, k, v = qkv(1, 2, 40, 4)
    for window in (3, 40, 100):
        torch.testing.assert_close(
            sliding_window_attention(q, k, v, window),
            reference.naive_sliding_window_attention(q, k, v, window),
        )


def test_each_query_sees_exactly_window_keys():
    """v = one-hot of the key position: the output row is the attention distribution itself."""
    seq, window = 12, 4
    q = torch.zeros(1, 1, seq, 2)  # equal scores: uniform over the visible keys
    k = torch.zeros(1, 1, seq, 2)
    v = torch.eye(seq).view(1, 1, seq, seq)
    probs = reference.blocked_sliding_window_attention(q, k, v, window, block_size=5)[0, 0]
    for t in range(seq):
        visible = [j for j in range(seq) if t - window < j <= t]
        expected = torch.zeros(seq)
        expected[visible] = 1.0 / len(visible)
        torch.testing.assert_close(probs[t], expected)


@pytest.mark.parametrize("cache, chunk, first_valid", [(8, 4, 0), (8, 4, 8), (8, 4, 3), (5, 5, 2)])
def test_chunk_attention_matches_positions_of_the_whole_sequence(cache, chunk, first_valid):
    """[cache; chunk] attention equals the rows of full sliding-window attention it stands for."""
    window = cache
    q, k, v = qkv(2, 2, cache + chunk, 6)
    full = reference.naive_sliding_window_attention(
        q[..., first_valid:, :], k[..., first_valid:, :], v[..., first_valid:, :], window
    )
    got = chunk_attention(q[..., cache:, :], k, v, window, first_valid_key=first_valid)
    torch.testing.assert_close(got, full[..., -chunk:, :])


def test_chunk_attention_supports_double_backward():
    q, k, v = qkv(1, 2, 6, 4)
    q_chunk = q[..., 3:, :].detach().requires_grad_()

    def fn(q_, k_, v_):
        return chunk_attention(q_, k_, v_, window=3, first_valid_key=1)

    assert torch.autograd.gradgradcheck(fn, (q_chunk, k, v))
