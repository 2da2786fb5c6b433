"""Held-out scoring during training: the loss with TTT, the same weights without it (eta = 0),
and both beyond the first window (positions whose context is longer than k, where TTT is what
carries the context)."""

from __future__ import annotations

import torch

from ttte2e.model import TTTModel


def score(model: TTTModel, windows: torch.Tensor, eta: float, autocast, micro_batch: int) -> dict:
    """Sums for the held-out metrics: NLL and target counts overall and beyond the first window.
    The windows are scored `micro_batch` at a time (what a training forward holds: all of a
    rank's evaluation windows at once would hold all their carries together) and the sums read
    back once; each window's NLL does not depend on the others in its batch."""
    cfg = model.config
    sums = torch.zeros(4, dtype=torch.float64, device=windows.device)
    for part in windows.split(micro_batch):
        mask = (part[:, 1:] != cfg.bos_token_id).double()
        beyond = torch.zeros_like(mask)
        beyond[:, cfg.window :] = 1
        with torch.no_grad(), autocast:
            nll = model.meta_loss(part, eta=eta).token_nll.double()
        sums += torch.stack(
            ((nll * mask).sum(), mask.sum(), (nll * mask * beyond).sum(), (mask * beyond).sum())
        )
    return dict(zip(("nll", "count", "nll_beyond", "count_beyond"), sums.tolist()))


def held_out_metrics(
    model: TTTModel,
    windows: torch.Tensor,
    eta: float,
    autocast,
    micro_batch: int,
    reduce=lambda v: v,
) -> dict:
    """val_loss / val_loss_beyond_window with TTT, and the same weights without it (_no_ttt),
    scored micro_batch windows at a time. reduce sums the sums over the ranks that scored a
    share of the windows."""
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    out = {}
    for tag, e in (("", eta), ("_no_ttt", 0.0)):
        if windows.shape[0]:
            s = score(model, windows, e, autocast, micro_batch)
        else:
            s = dict(nll=0.0, count=0.0, nll_beyond=0.0, count_beyond=0.0)
        s = dict(zip(s, reduce(list(s.values()))))
        out[f"val_loss{tag}"] = s["nll"] / max(s["count"], 1)
        out[f"val_loss_beyond_window{tag}"] = (
            s["nll_beyond"] / s["count_beyond"] if s["count_beyond"] else None
        )
    return out
