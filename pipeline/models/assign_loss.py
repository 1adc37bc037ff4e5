"""Stage-1 loss: every task evaluation is matched on its own and the matched losses are summed over layers.

The matching cost of a (query, target) pair is a weighted sum of the very loss terms that pair would incur,
so each term is computed once, with gradients, for every pair of every evaluation at the same time
([L, B, N, K]): the matching reads the detached weighted sum, and the loss gathers the terms at the matched
pairs. That is the same arithmetic as matching first and then recomputing the losses of the matched rows,
with a fraction of the tensor operations (one batched op per term instead of a few per layer).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from hepreg.settings import AssignConfig
from hepreg.data.batch import HitBatch
from hepreg.models.maskformer import MaskFormerOutput
from hepreg.models.matcher import mask_bce, mask_dice, match_from_costs, pad_targets, valid_bce


@dataclass
class PairTerms:
    track_logit: Tensor  # [L, B, N] float32, the evaluations' track logits
    terms: dict[str, Tensor]  # "valid", "mask" (and "dice"): [L, B, N, K] each pair's loss term
    target_valid: Tensor  # [B, K] bool, targets padded with invalid ones up to the number of queries
    num_particles: int  # P: columns >= P are padding


def pair_terms(out: MaskFormerOutput, batch: HitBatch, cfg: AssignConfig) -> PairTerms:
    """The loss terms of every (query, target) pair of every evaluation that is trained."""
    evaluations = out.layers if cfg.intermediate_losses else out.layers[-1:]
    track = torch.stack([e["track_logit"] for e in evaluations]).float()  # [L, B, N]
    mask = torch.stack([e["mask_logit"] for e in evaluations]).float()  # [L, B, N, M]
    target_valid, target_hits = pad_targets(batch.particle_valid, batch.particle_hit_valid, track.shape[-1])
    terms = {"valid": valid_bce(track, target_valid), "mask": mask_bce(mask, target_hits, batch.hit_valid)}
    if cfg.dice_cost or cfg.dice_weight:
        terms["dice"] = mask_dice(mask, target_hits, batch.hit_valid)
    return PairTerms(track, terms, target_valid, batch.particle_valid.shape[1])


@torch.no_grad()
def match_pairs(pt: PairTerms, cfg: AssignConfig) -> Tensor:
    """LongTensor [L, B, N]: each evaluation's optimal match (target of each query, -1 for none)."""
    weights = {"valid": cfg.valid_cost, "mask": cfg.mask_cost, "dice": cfg.dice_cost}
    real = pt.target_valid.float().unsqueeze(-2)  # [B, 1, K]: mask terms count only for real targets
    cost = weights["valid"] * pt.terms["valid"]
    for name in ("mask", "dice"):
        if weights[name] and name in pt.terms:
            cost = cost + weights[name] * pt.terms[name] * real
    L, B, N, K = cost.shape
    match = match_from_costs(cost.reshape(L * B, N, K), pt.target_valid.repeat(L, 1), pt.num_particles)
    return match.view(L, B, N)


def matched_losses(pt: PairTerms, match: Tensor, cfg: AssignConfig) -> dict[str, Tensor]:
    """Per-evaluation losses [L] under `match` [L, B, N] (-1 = trained towards "no track").

    valid: BCE over every query; mask / dice: mean over the (query, real target) pairs of the batch."""
    matched = match >= 0  # [L, B, N]
    n_pairs = matched.sum((1, 2)).clamp(min=1)  # [L]
    column = match.clamp(min=0).unsqueeze(-1)  # [L, B, N, 1]
    losses = {"valid": F.binary_cross_entropy_with_logits(pt.track_logit, matched.float(),
                                                          reduction="none").mean((1, 2))}
    names = ("mask", "dice") if cfg.dice_weight else ("mask",)
    for name in names:
        at_match = pt.terms[name].gather(-1, column).squeeze(-1)  # [L, B, N]
        losses[name] = torch.where(matched, at_match, 0.0).sum((1, 2)) / n_pairs
    return losses


def weighted_total(losses: dict[str, Tensor], cfg: AssignConfig) -> tuple[Tensor, dict[str, float]]:
    """The loss to train (Σ weight x part over layers) and each part summed over layers (floats, for logging)."""
    weights = {"valid": cfg.valid_weight, "mask": cfg.mask_weight, "dice": cfg.dice_weight}
    sums = torch.stack([value.sum() for value in losses.values()])  # [parts]
    total = (sums * torch.tensor([weights[name] for name in losses], device=sums.device)).sum()
    return total, dict(zip(losses, sums.detach().tolist()))


def assignment_loss(out: MaskFormerOutput, batch: HitBatch, cfg: AssignConfig) -> tuple[Tensor, dict[str, float], Tensor]:
    """Total loss, its parts summed over layers (floats, for logging), and the final layer's match [B, N]."""
    pt = pair_terms(out, batch, cfg)
    match = match_pairs(pt, cfg)
    total, parts = weighted_total(matched_losses(pt, match, cfg), cfg)
    return total, parts, match[-1]
