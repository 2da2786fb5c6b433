"""Read a TTT-E2E model folder with safetensors + torch only (no ttte2e), following
docs/model_format.md, and run its plain pass: the sliding-window (or full-attention) transformer
with the prime MLPs at their initial weights theta_0, i.e. the model at inner learning rate 0.
It is the reference a port starts from; test-time training (the inner loop over chunks) is
described in docs/model_format.md and is not reimplemented here.

    python docs/load_model_folder.py MODEL_FOLDER 1 17 42 99     # prints the next-token argmax
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

SUPPORTED_FORMAT_VERSIONS = (1,)


def read_folder(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, weights) of a model folder: config.json checked, single or sharded safetensors."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    if config.get("format", "ttte2e-model") != "ttte2e-model":
        raise ValueError(f"{folder}: not a TTT-E2E model folder")
    if config.get("format_version", 1) not in SUPPORTED_FORMAT_VERSIONS:
        raise ValueError(f"{folder}: format_version {config['format_version']} is not supported")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weights: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            weights.update(load_file(str(folder / shard)))
    else:
        weights = load_file(str(folder / "model.safetensors"))
    return config, weights


def rms_norm(x, gain, eps):
    x32 = x.float()
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * gain.float()


def rope(x, theta):
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B, H, P, dh] by p * theta^(-2i/dh)."""
    dh, positions = x.shape[-1], torch.arange(x.shape[2], dtype=torch.float32)
    inv_freq = 1.0 / theta ** (torch.arange(0, dh, 2, dtype=torch.float32) / dh)
    angle = positions[:, None] * inv_freq  # [P, dh/2]
    cos, sin = angle.cos(), angle.sin()
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), -1).flatten(-2)


def swiglu(x, w, prefix):
    return (
        torch.nn.functional.silu(x @ w[f"{prefix}.w1.weight"].T) * (x @ w[f"{prefix}.w3.weight"].T)
    ) @ w[f"{prefix}.w2.weight"].T


def plain_pass(config: dict, w: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """Logits [B, P, V] of token ids [B, P] (float32)."""
    eps, heads = config["norm_eps"], config["n_heads"]
    dh = config["d_model"] // heads
    length = tokens.shape[1]
    window = config["window"] if config["attention"] == "sliding" else length
    i = torch.arange(length)
    visible = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)  # [query, key]
    first_ttt = config["n_layers"] - config["n_ttt_blocks"]
    h = w["embed.weight"].float()[tokens]
    for layer in range(config["n_layers"]):
        p = f"blocks.{layer}"
        x = rms_norm(h, w[f"{p}.attn_norm.weight"], eps)

        def heads_of(name):
            return (x @ w[f"{p}.attn.{name}.weight"].T).unflatten(-1, (heads, dh)).transpose(1, 2)

        q = rope(rms_norm(heads_of("wq"), w[f"{p}.attn.q_norm.weight"], eps), config["rope_theta"])
        k = rope(rms_norm(heads_of("wk"), w[f"{p}.attn.k_norm.weight"], eps), config["rope_theta"])
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(dh)
        attn = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ heads_of("wv")
        attn = attn.transpose(1, 2).flatten(2) @ w[f"{p}.attn.wo.weight"].T
        h = h + rms_norm(attn, w[f"{p}.attn_post_norm.weight"], eps)
        if layer >= first_ttt:  # a TTT block: the prime MLP, here at theta_0
            prime = swiglu(rms_norm(h, w[f"{p}.prime_norm.weight"], eps), w, f"{p}.prime_mlp")
            h = h + rms_norm(prime, w[f"{p}.prime_post_norm.weight"], eps)
        mlp = swiglu(rms_norm(h, w[f"{p}.mlp_norm.weight"], eps), w, f"{p}.mlp")
        h = h + rms_norm(mlp, w[f"{p}.mlp_post_norm.weight"], eps)
    return rms_norm(h, w["final_norm.weight"], eps) @ w["embed.weight"].float().T


if __name__ == "__main__":
    cfg, weights = read_folder(sys.argv[1])
    ids = torch.tensor([[int(t) for t in sys.argv[2:]]])
    print(plain_pass(cfg, weights, ids)[0].argmax(-1).tolist())
