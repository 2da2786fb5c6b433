import pytest
import torch

from ttte2e.model import PRESETS, TTTConfig, TTTModel, preset


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(seq_len=100, chunk_size=32), "not a multiple of chunk_size"),
        (dict(window=16, chunk_size=32), "chunk_size=32 > window=16"),
        (dict(n_ttt_blocks=5), r"n_ttt_blocks must be in \[1, n_layers=4\]"),
        (dict(n_ttt_blocks=-1), r"n_ttt_blocks must be in"),
        (dict(n_heads=3), "does not divide"),
        (dict(d_model=60, n_heads=4), "must be even"),
        (dict(attention="linear"), "attention must be one of"),
        (dict(remat="some"), "remat must be one of"),
        (dict(inner_lr=-1.0), "inner_lr must be >= 0"),
        (dict(inner_clip=0.0), "inner_clip must be > 0"),
        (dict(bos_token_id=512), "outside the vocabulary"),
        (dict(vocab_size=0), "vocab_size must be a positive integer"),
        (dict(window=2.5), "window must be a positive integer"),
        (dict(n_layers=8, n_ttt_blocks=3, ttt_fraction=0.5), "disagrees with ttt_fraction"),
        (dict(ttt_fraction=1.5), "ttt_fraction must be in"),
    ],
)
def test_invalid_configs_are_rejected_with_a_clear_message(fields, message):
    with pytest.raises(ValueError, match=message):
        TTTConfig(**fields)


def test_full_attention_ignores_the_window_bound():
    cfg = TTTConfig(attention="full", window=16, chunk_size=32)
    assert cfg.attn_window == cfg.seq_len


@pytest.mark.parametrize(
    "layers, fraction, count",
    [
        (4, 0.25, 1),
        (12, 0.25, 3),
        (24, 0.25, 6),
        (32, 0.25, 8),
        (24, 0.01, 1),
        (10, 0.25, 3),
        (24, 1.0, 24),
        (6, 0.5, 3),
    ],
)
def test_fraction_rounds_to_a_stored_count_of_at_least_one(layers, fraction, count):
    cfg = TTTConfig(n_layers=layers, ttt_fraction=fraction)
    assert cfg.n_ttt_blocks == count
    assert "ttt_fraction" not in cfg.to_dict()
    assert cfg.replace(ttt_fraction=1.0).n_ttt_blocks == layers


def test_default_is_a_quarter_of_the_blocks():
    assert TTTConfig(n_layers=12).n_ttt_blocks == 3


def test_dict_round_trip_and_unknown_fields():
    cfg = preset("tiny")
    assert TTTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown field"):
        TTTConfig.from_dict({**cfg.to_dict(), "hidden": 3})
    with pytest.raises(ValueError, match="unknown preset"):
        preset("7B")


def hand_count(layers, d, heads, hidden, vocab, ttt_blocks):
    """Tied embedding + final norm + per block (4 d^2 attention, 3 d I MLP, 4 d-sized norms,
    2 head-sized QK norms) + per TTT block (3 d I prime MLP, 2 d-sized norms)."""
    head_dim = d // heads
    block = 4 * d * d + 3 * d * hidden + 4 * d + 2 * head_dim
    return vocab * d + d + layers * block + ttt_blocks * (3 * d * hidden + 2 * d)


@pytest.mark.parametrize(
    "name, sizes, approx",
    [
        ("125M", (12, 768, 12, 1664), 184e6),
        ("350M", (24, 1024, 16, 2304), 444e6),
        ("760M", (24, 1536, 16, 3328), 884e6),
        ("1B", (24, 2048, 32, 4352), 1.47e9),
        ("3B", (32, 2560, 32, 5632), 2.90e9),
    ],
)
def test_paper_presets(name, sizes, approx):
    cfg = preset(name)
    layers, d, heads, hidden = sizes
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.mlp_hidden) == sizes
    assert (cfg.vocab_size, cfg.window, cfg.chunk_size, cfg.rope_theta) == (
        128256,
        8192,
        1024,
        500000.0,
    )
    assert cfg.n_ttt_blocks == layers // 4
    with torch.device("meta"):
        model = TTTModel(cfg)
    count = model.num_parameters()
    assert count == hand_count(layers, d, heads, hidden, 128256, layers // 4)
    assert count == pytest.approx(approx, rel=0.01)


def test_tiny_preset_is_small_and_long_enough_for_ttt_to_matter():
    cfg = preset("tiny")
    count = TTTModel(cfg).num_parameters()
    assert 1e6 < count < 10e6
    assert cfg.seq_len >= 4 * cfg.window and cfg.n_chunks >= 8


def test_every_preset_validates_and_builds():
    from ttte2e.model import count_parameters

    for name in PRESETS:
        cfg = preset(name)
        with torch.device("meta"):
            model = TTTModel(cfg)
        # the model built has the parameters the FLOPs and memory plans count
        assert model.num_parameters() == count_parameters(cfg), name
        assert len(model.ttt_blocks) == cfg.n_ttt_blocks >= 1, name
