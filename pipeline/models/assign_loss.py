"""Stage-1 loss: every task evaluation is matched on its own and the matched losses are summed over layers."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hepreg.config import AssignConfig
from hepreg.data.batch import HitBatch
from hepreg.models.maskformer import MaskFormerOutput
from hepreg.models.matcher import mask_bce, mask_dice, match_queries


def matched_loss(track_logit: Tensor, mask_logit: Tensor, match: Tensor, batch: HitBatch,
                 cfg: AssignConfig) -> dict[str, Tensor]:
    """Losses of one task evaluation under a given match [B, N] (-1 = trained towards "no track").

    valid: BCE over every query; mask / dice: mean over the (query, real target) pairs of the batch.
    """
    matched = match >= 0  # [B, N]
    losses = {"valid": F.binary_cross_entropy_with_logits(track_logit.float(), matched.float())}
    n_pairs = matched.sum().clamp(min=1)
    b_idx, q_idx = matched.nonzero(as_tuple=True)
    t_idx = match[b_idx, q_idx]
    logit = mask_logit[b_idx, q_idx].unsqueeze(1)  # [S, 1, M]: one row per matched pair
    target = batch.particle_hit_valid[b_idx, t_idx].unsqueeze(1)  # [S, 1, M]
    valid = batch.hit_valid[b_idx]  # [S, M]
    losses["mask"] = mask_bce(logit, target, valid).sum() / n_pairs
    if cfg.dice_weight:
        losses["dice"] = mask_dice(logit, target, valid).sum() / n_pairs
    return losses


def assignment_loss(out: MaskFormerOutput, batch: HitBatch, cfg: AssignConfig) -> tuple[Tensor, dict[str, float], Tensor]:
    """Total loss, its parts summed over layers (floats, for logging), and the final layer's match [B, N]."""
    evaluations = out.layers if cfg.intermediate_losses else out.layers[-1:]
    weights = {"valid": cfg.valid_weight, "mask": cfg.mask_weight, "dice": cfg.dice_weight}
    total = torch.zeros((), device=batch.hits.device)
    parts: dict[str, float] = {}
    match = None
    for layer in evaluations:
        match = match_queries(layer["track_logit"], layer["mask_logit"], batch.hit_valid, batch.particle_valid,
                              batch.particle_hit_valid, cfg)
        for name, value in matched_loss(layer["track_logit"], layer["mask_logit"], match, batch, cfg).items():
            total = total + weights[name] * value
            parts[name] = parts.get(name, 0.0) + value.item()
    return total, parts, match
