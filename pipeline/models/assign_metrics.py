"""Assignment metrics as additive counts, so batches and ranks can be summed before rates are taken.

A target is *found* when the query matched to it is predicted valid; its hit efficiency is the fraction of
its hits in that query's predicted mask, its purity the fraction of the predicted mask that is its hits.
A predicted-valid query that is not matched to a real target is a fake.
"""
from __future__ import annotations

import torch
from torch import Tensor

COUNT_NAMES = ("targets", "predicted", "found", "fakes", "hit_eff_sum", "purity_sum", "double_majority")


def assignment_counts(pred_valid: Tensor, pred_hits: Tensor, target_valid: Tensor, target_hits: Tensor,
                      match: Tensor) -> dict[str, Tensor]:
    """Counts for one batch.

    pred_valid [B, N] bool, pred_hits [B, N, M] bool (predicted masks, real hits only),
    target_valid [B, P] bool, target_hits [B, P, M] bool, match [B, N] long (target of each query, -1 none).
    """
    matched = match >= 0
    found = matched & pred_valid  # [B, N]
    b, q = found.nonzero(as_tuple=True)
    t = match[b, q]
    pred = pred_hits[b, q]  # [S, M]
    true = target_hits[b, t]  # [S, M]
    common = (pred & true).sum(-1).float()
    hit_eff = common / true.sum(-1).clamp(min=1)
    purity = common / pred.sum(-1).clamp(min=1)
    return {
        "targets": target_valid.sum().float(),
        "predicted": pred_valid.sum().float(),
        "found": found.sum().float(),
        "fakes": (pred_valid & ~matched).sum().float(),
        "hit_eff_sum": hit_eff.sum(),
        "purity_sum": purity.sum(),
        "double_majority": ((hit_eff > 0.5) & (purity > 0.5)).sum().float(),
    }


def counts_from_logits(track_logit: Tensor, mask_logit: Tensor, hit_valid: Tensor, target_valid: Tensor,
                       target_hits: Tensor, match: Tensor, threshold: float = 0.5) -> dict[str, Tensor]:
    """assignment_counts with predictions taken as sigmoid(logit) >= threshold."""
    pred_valid = torch.sigmoid(track_logit.float()) >= threshold
    pred_hits = (torch.sigmoid(mask_logit.float()) >= threshold) & hit_valid.unsqueeze(1)
    return assignment_counts(pred_valid, pred_hits, target_valid, target_hits, match)


def add_counts(total: dict[str, Tensor] | None, counts: dict[str, Tensor]) -> dict[str, Tensor]:
    if total is None:
        return {k: v.detach().clone() for k, v in counts.items()}
    return {k: total[k] + counts[k].detach() for k in total}


def rates(counts: dict[str, Tensor | float]) -> dict[str, float]:
    """Track efficiency, fake rate, mean hit efficiency and purity of found tracks, double-majority efficiency."""
    c = {k: float(v) for k, v in counts.items()}
    return {
        "track_eff": c["found"] / max(c["targets"], 1.0),
        "fake_rate": c["fakes"] / max(c["predicted"], 1.0),
        "hit_eff": c["hit_eff_sum"] / max(c["found"], 1.0),
        "hit_purity": c["purity_sum"] / max(c["found"], 1.0),
        "dm_eff": c["double_majority"] / max(c["targets"], 1.0),
    }
