import numpy as np
import pytest
import torch

from ttte2e.model import TTTConfig, TTTModel
from ttte2e.model.convert import (
    OFFICIAL_NAMES,
    config_from_official,
    official_to_state_dict,
    state_dict_to_official,
)


def test_round_trip_both_directions():
    model = TTTModel(TTTConfig(n_layers=5, n_ttt_blocks=2, d_model=32, mlp_hidden=40))
    state = model.state_dict()
    official = state_dict_to_official(state)
    assert set(official) == set(OFFICIAL_NAMES)
    assert official["language_model.model.h.blocks.seq_modeling_block.wq.weight"].shape == (
        5,
        32,
        32,
    )
    assert official["language_model.model.h.prime_storage.feed_forward_prime.w1.weight"].shape == (
        2,
        32,
        40,
    )
    # [in, out]: the official y = x @ W equals our F.linear(x, W^T)
    w1 = official["language_model.model.h.blocks.feed_forward.w1.weight"][0]
    np.testing.assert_array_equal(w1, state["blocks.0.mlp.w1.weight"].numpy().T)
    prime = official["language_model.model.h.prime_storage.ffn_prime_norm.weight"]
    np.testing.assert_array_equal(prime[0], state["blocks.3.prime_norm.weight"].numpy())
    back = official_to_state_dict(official)
    assert set(back) == set(state)
    for name, value in state.items():
        assert torch.equal(back[name], value), name
    model.load_state_dict(
        official_to_state_dict({k: torch.from_numpy(v) for k, v in official.items()})
    )


def test_mismatched_parameters_are_named():
    official = state_dict_to_official(TTTModel(TTTConfig()).state_dict())
    broken = dict(official)
    del broken["language_model.model.ln_f.weight"]
    broken["language_model.model.extra"] = np.zeros(3)
    with pytest.raises(ValueError, match="missing.*ln_f.*unknown.*extra"):
        official_to_state_dict(broken)
    with pytest.raises(ValueError, match="untied output head"):
        official_to_state_dict({**official, "language_model.lm_head.weight": np.zeros(3)})


def test_config_from_official_rejects_what_we_do_not_implement():
    base = {
        "model": dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            mini_batch_size=32,
            sliding_window_size=64,
            suffix_len=1,
            seq_modeling_block="SWA",
        ),
        "training": {"seq_length": 256, "optimizer_inner": {"lr": 0.5, "clip_gradient": 2.0}},
    }
    cfg = config_from_official(base)
    assert (cfg.inner_lr, cfg.inner_clip, cfg.window, cfg.seq_len) == (0.5, 2.0, 64, 256)
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        config_from_official({**base, "model": {**base["model"], "tie_word_embeddings": False}})
    with pytest.raises(ValueError, match="seq_modeling_block='mamba'"):
        config_from_official({**base, "model": {**base["model"], "seq_modeling_block": "mamba"}})
