"""Converters between the official TTT-E2E parameters/config and ours.

Official layout (tests/data/README.md): per-block tensors stacked on a leading [L] axis, the prime MLPs
and their norms stacked on [S] (index s = block L-S+s), linear weights stored [in, out].
Ours: one nn.Module per block, nn.Linear weights [out, in].
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .config import TTTConfig

_PREFIX = "language_model.model."
_BLOCKS = _PREFIX + "h.blocks."
_PRIME = _PREFIX + "h.prime_storage."

# official per-block suffix -> (our per-block name, is a linear weight stored [in, out])
_BLOCK_MAP = {
    "seq_norm.weight": ("attn_norm.weight", False),
    "seq_modeling_block.wq.weight": ("attn.wq.weight", True),
    "seq_modeling_block.wk.weight": ("attn.wk.weight", True),
    "seq_modeling_block.wv.weight": ("attn.wv.weight", True),
    "seq_modeling_block.wo.weight": ("attn.wo.weight", True),
    "seq_modeling_block.q_norm.weight": ("attn.q_norm.weight", False),
    "seq_modeling_block.k_norm.weight": ("attn.k_norm.weight", False),
    "seq_post_norm.weight": ("attn_post_norm.weight", False),
    "ffn_norm.weight": ("mlp_norm.weight", False),
    "feed_forward.w1.weight": ("mlp.w1.weight", True),
    "feed_forward.w3.weight": ("mlp.w3.weight", True),
    "feed_forward.w2.weight": ("mlp.w2.weight", True),
    "ffn_post_norm.weight": ("mlp_post_norm.weight", False),
}
_PRIME_MAP = {
    "ffn_prime_norm.weight": ("prime_norm.weight", False),
    "feed_forward_prime.w1.weight": ("prime_mlp.w1.weight", True),
    "feed_forward_prime.w3.weight": ("prime_mlp.w3.weight", True),
    "feed_forward_prime.w2.weight": ("prime_mlp.w2.weight", True),
    "ffn_prime_post_norm.weight": ("prime_post_norm.weight", False),
}
_TOP_MAP = {"wte.weight": "embed.weight", "ln_f.weight": "final_norm.weight"}

OFFICIAL_NAMES = (
    [_PREFIX + k for k in _TOP_MAP]
    + [_BLOCKS + k for k in _BLOCK_MAP]
    + [_PRIME + k for k in _PRIME_MAP]
)


def _tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    return torch.from_numpy(np.ascontiguousarray(value))


def convert_official_array(
    name: str, array: Any, n_layers: int, n_suffix: int
) -> dict[str, torch.Tensor]:
    """One official array -> our tensors (a stacked [L] or [S] array becomes one per block), so a
    large checkpoint can be converted array by array."""
    value = _tensor(array)
    for key, ours in _TOP_MAP.items():
        if name == _PREFIX + key:
            return {ours: value}
    for table, prefix, count, first in (
        (_BLOCK_MAP, _BLOCKS, n_layers, 0),
        (_PRIME_MAP, _PRIME, n_suffix, n_layers - n_suffix),
    ):
        if name.startswith(prefix) and name[len(prefix) :] in table:
            ours, linear = table[name[len(prefix) :]]
            if value.shape[0] != count:
                raise ValueError(
                    f"{name}: leading axis {value.shape[0]} != {count} "
                    f"{'layers' if table is _BLOCK_MAP else 'suffix blocks'}"
                )
            return {
                f"blocks.{first + i}.{ours}": (w.T if linear else w).contiguous()
                for i, w in enumerate(value)
            }
    raise ValueError(f"unknown official parameter {name!r}")


def official_shapes(config: TTTConfig) -> dict[str, tuple[int, ...]]:
    """The official name and shape of every parameter of a model with this config."""
    c = config
    d, hidden, hd, n, s = c.d_model, c.mlp_hidden, c.head_dim, c.n_layers, c.n_ttt_blocks
    per_block = {
        "seq_norm.weight": (d,),
        "seq_modeling_block.wq.weight": (d, d),
        "seq_modeling_block.wk.weight": (d, d),
        "seq_modeling_block.wv.weight": (d, d),
        "seq_modeling_block.wo.weight": (d, d),
        "seq_modeling_block.q_norm.weight": (hd,),
        "seq_modeling_block.k_norm.weight": (hd,),
        "seq_post_norm.weight": (d,),
        "ffn_norm.weight": (d,),
        "feed_forward.w1.weight": (d, hidden),
        "feed_forward.w3.weight": (d, hidden),
        "feed_forward.w2.weight": (hidden, d),
        "ffn_post_norm.weight": (d,),
    }
    prime = {
        "ffn_prime_norm.weight": (d,),
        "feed_forward_prime.w1.weight": (d, hidden),
        "feed_forward_prime.w3.weight": (d, hidden),
        "feed_forward_prime.w2.weight": (hidden, d),
        "ffn_prime_post_norm.weight": (d,),
    }
    out = {_PREFIX + "wte.weight": (c.vocab_size, d), _PREFIX + "ln_f.weight": (d,)}
    out.update({_BLOCKS + k: (n, *v) for k, v in per_block.items()})
    out.update({_PRIME + k: (s, *v) for k, v in prime.items()})
    return out


def config_from_shapes(shapes: Mapping[str, Any], **fields: Any) -> TTTConfig:
    """The architecture read off official parameter shapes (vocab, width, layers, heads via the
    QK-norm gain's head_dim, MLP width, TTT blocks); other fields as given."""
    try:
        vocab, d = shapes[_PREFIX + "wte.weight"]
        n_layers, head_dim = shapes[_BLOCKS + "seq_modeling_block.q_norm.weight"]
        hidden = shapes[_BLOCKS + "feed_forward.w1.weight"][2]
        n_suffix = shapes[_PRIME + "ffn_prime_norm.weight"][0]
    except KeyError as e:
        raise ValueError(
            f"official parameters lack {e.args[0]!r}: cannot infer the architecture"
        ) from None
    if d % head_dim:
        raise ValueError(f"width {d} is not a multiple of head_dim {head_dim}")
    arch = dict(
        vocab_size=int(vocab),
        d_model=int(d),
        n_layers=int(n_layers),
        n_heads=int(d // head_dim),
        mlp_hidden=int(hidden),
        n_ttt_blocks=int(n_suffix),
    )
    return TTTConfig(**{**fields, **arch})


def read_official_checkpoint(path: str, step: int | None = None) -> dict[str, np.ndarray]:
    """Parameters of an official orbax checkpoint by official name (latest step when none),
    without JAX: see official_checkpoint.py."""
    from .official_checkpoint import read_official_checkpoint as read

    return read(path, step)


def official_to_state_dict(arrays: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Official parameter arrays (numpy or tensors, by official name) -> our state_dict."""
    if "language_model.lm_head.weight" in arrays:
        raise ValueError(
            "untied output head (language_model.lm_head.weight) is not supported: "
            "TTT-E2E ties the head to the embedding"
        )
    missing = [n for n in OFFICIAL_NAMES if n not in arrays]
    unknown = sorted(set(arrays) - set(OFFICIAL_NAMES))
    if missing or unknown:
        raise ValueError(
            f"official parameters do not match TTT-E2E: missing {missing}, unknown {unknown}"
        )
    n_layers = _tensor(arrays[_BLOCKS + "seq_norm.weight"]).shape[0]
    n_suffix = _tensor(arrays[_PRIME + "ffn_prime_norm.weight"]).shape[0]
    out = {}
    for name in OFFICIAL_NAMES:
        out.update(convert_official_array(name, arrays[name], n_layers, n_suffix))
    return out


def state_dict_to_official(state: Mapping[str, torch.Tensor | None]) -> dict[str, np.ndarray]:
    """Our state_dict (or a {name: grad} dict of the same names) -> official numpy arrays."""
    layers = sorted({int(k.split(".")[1]) for k in state if k.startswith("blocks.")})
    if layers != list(range(len(layers))):
        raise ValueError(f"state_dict blocks are not numbered 0..L-1: {layers}")
    suffix = [layer for layer in layers if f"blocks.{layer}.prime_norm.weight" in state]
    if not suffix or suffix != layers[len(layers) - len(suffix) :]:
        raise ValueError(f"TTT blocks must be the last blocks, found prime MLPs in {suffix}")

    def get(name: str) -> np.ndarray:
        if name not in state:
            raise ValueError(f"state_dict has no {name!r}")
        value = state[name]
        if value is None:
            raise ValueError(f"{name!r} is None (no gradient?)")
        return value.detach().float().cpu().numpy()

    out = {_PREFIX + k: get(ours) for k, ours in _TOP_MAP.items()}
    for key, (ours, linear) in _BLOCK_MAP.items():
        ws = [get(f"blocks.{layer}.{ours}") for layer in layers]
        out[_BLOCKS + key] = np.stack([w.T if linear else w for w in ws])
    for key, (ours, linear) in _PRIME_MAP.items():
        ws = [get(f"blocks.{layer}.{ours}") for layer in suffix]
        out[_PRIME + key] = np.stack([w.T if linear else w for w in ws])
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def config_from_official(config: Mapping[str, Any], **overrides: Any) -> TTTConfig:
    """TTTConfig from the official config ({'model': ..., 'training': ...}); eta = its inner lr."""
    model, training = config["model"], config.get("training", {})

    def require(flag: str, expected: Any) -> None:
        if flag in model and model[flag] != expected:
            raise ValueError(
                f"official config model.{flag}={model[flag]!r} is not supported "
                f"(TTT-E2E here needs {expected!r})"
            )

    for flag, expected in (
        ("tie_word_embeddings", True),
        ("qk_norm", True),
        ("pre_norm", True),
        ("post_norm", True),
        ("prime", True),
        ("feed_forward_prime", "swiglu"),
    ):
        require(flag, expected)
    kinds = {
        "SWA": "sliding",
        "sliding_window": "sliding",
        "self_attention": "full",
        "full": "full",
        "attention": "full",
    }
    block = model.get("seq_modeling_block", "SWA")
    if block not in kinds:
        raise ValueError(
            f"official model.seq_modeling_block={block!r} is not supported; known: {sorted(kinds)}"
        )
    inner = training.get("optimizer_inner", {})
    seq_len = training.get("seq_length", model.get("seq_len"))
    fields = dict(
        vocab_size=model["vocab_size"],
        d_model=model["hidden_size"],
        n_layers=model["num_hidden_layers"],
        n_heads=model["num_attention_heads"],
        mlp_hidden=model["intermediate_size"],
        n_ttt_blocks=model["suffix_len"],
        seq_len=seq_len,
        window=model.get("sliding_window_size", seq_len),
        chunk_size=model["mini_batch_size"],
        attention=kinds[block],
        rope_theta=float(model.get("rope_theta", 500000.0)),
        norm_eps=float(model.get("rms_norm_eps", 1e-6)),
        bos_token_id=model.get("bos_token_id", 1),
        init_std=float(model.get("initializer_range", 0.02)),
    )
    if isinstance(inner.get("lr"), (int, float)):
        fields["inner_lr"] = float(inner["lr"])
    if isinstance(inner.get("clip_gradient"), (int, float)):
        fields["inner_clip"] = float(inner["clip_gradient"])
    fields.update(overrides)
    return TTTConfig(**fields)
