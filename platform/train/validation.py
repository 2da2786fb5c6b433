"""Held-out scoring during training: the loss with TTT, the same weights without it (eta = 0),
and both beyond the first window (positions whose context is longer than k, where TTT is what
carries the context)."""

from __future__ import annotations

import torch

from ttte2e.model import TTTModel


def score(model: TTTModel, windows: torch.Tensor, eta: float, autocast) -> dict:
    """Sums for the held-out metrics: NLL and target counts overall and beyond the first window."""
    cfg = model.config
    mask = (windows[:, 1:] != cfg.bos_token_id).float()
    beyond = torch.zeros_like(mask)
    beyond[:, cfg.window :] = 1
    with torch.no_grad(), autocast:
        nll = model.meta_loss(windows, eta=eta).token_nll.float()
    return dict(
        nll=(nll * mask).sum().item(),
        count=mask.sum().item(),
        nll_beyond=(nll * mask * beyond).sum().item(),
        count_beyond=(mask * beyond).sum().item(),
    )


def held_out_metrics(
    model: TTTModel, windows: torch.Tensor, eta: float, autocast, reduce=lambda v: v
) -> dict:
    """val_loss / val_loss_beyond_window with TTT, and the same weights without it (_no_ttt).
    reduce sums the sums over the ranks that scored a share of the windows."""
    out = {}
    for tag, e in (("", eta), ("_no_ttt", 0.0)):
        if windows.shape[0]:
            s = score(model, windows, e, autocast)
        else:
            s = dict(nll=0.0, count=0.0, nll_beyond=0.0, count_beyond=0.0)
        s = dict(zip(s, reduce(list(s.values()))))
        out[f"val_loss{tag}"] = s["nll"] / max(s["count"], 1)
        out[f"val_loss_beyond_window{tag}"] = (
            s["nll_beyond"] / s["count_beyond"] if s["count_beyond"] else None
        )
    return out
