"""Hungarian matching of track queries to truth particles.

The cost of giving query n the target p is exactly the loss that pairing would incur (weighted by the
matching cost weights): the track-valid BCE against "p is a real particle", plus, for a real particle, the
hit-mask BCE (mean over the event's real hits) and optionally the dice loss. Targets are padded with
invalid ones up to the number of queries, so every query gets a column and a query whose column is not a
real particle is trained towards "no track".
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from hepreg.config import AssignConfig


def pad_targets(particle_valid: Tensor, particle_hit_valid: Tensor, num_queries: int) -> tuple[Tensor, Tensor]:
    """Append invalid targets so that there are at least as many targets as queries: [B, K], [B, K, M]."""
    extra = num_queries - particle_valid.shape[1]
    if extra <= 0:
        return particle_valid, particle_hit_valid
    return (F.pad(particle_valid, (0, extra), value=False), F.pad(particle_hit_valid, (0, 0, 0, extra), value=False))


def valid_bce(track_logit: Tensor, target_valid: Tensor) -> Tensor:
    """[B, N], [B, K] -> [B, N, K]: BCE of each query's validity against each target's."""
    x = track_logit.float().unsqueeze(2)  # [B, N, 1]
    return F.softplus(x) - x * target_valid.float().unsqueeze(1)


def mask_bce(mask_logit: Tensor, target_hits: Tensor, hit_valid: Tensor) -> Tensor:
    """[B, N, M], [B, K, M], [B, M] -> [B, N, K]: hit-mask BCE averaged over the event's real hits."""
    x = mask_logit.float()
    v = hit_valid.float()
    n_hits = v.sum(-1).clamp(min=1)  # [B]
    pos = torch.einsum("bnm,bkm->bnk", x, target_hits.float() * v.unsqueeze(1))  # Σ_m x·t over real hits
    total = (F.softplus(x) * v.unsqueeze(1)).sum(-1, keepdim=True)  # [B, N, 1]
    return (total - pos) / n_hits[:, None, None]


def mask_dice(mask_logit: Tensor, target_hits: Tensor, hit_valid: Tensor) -> Tensor:
    """[B, N, M], [B, K, M], [B, M] -> [B, N, K]: 1 - soft dice of each query's mask with each target's."""
    p = torch.sigmoid(mask_logit.float()) * hit_valid.float().unsqueeze(1)
    t = target_hits.float()
    inter = torch.einsum("bnm,bkm->bnk", p, t)
    return 1 - (2 * inter + 1) / (p.sum(-1).unsqueeze(2) + t.sum(-1).unsqueeze(1) + 1)


def pair_costs(track_logit: Tensor, mask_logit: Tensor, hit_valid: Tensor, target_valid: Tensor,
               target_hits: Tensor, valid_w: float, mask_w: float, dice_w: float) -> Tensor:
    """Weighted cost of every (query, target) pair [B, N, K]; mask terms count only for real targets."""
    cost = valid_w * valid_bce(track_logit, target_valid)
    real = target_valid.float().unsqueeze(1)  # [B, 1, K]
    if mask_w:
        cost = cost + mask_w * mask_bce(mask_logit, target_hits, hit_valid) * real
    if dice_w:
        cost = cost + dice_w * mask_dice(mask_logit, target_hits, hit_valid) * real
    return cost


@torch.no_grad()
def match_queries(track_logit: Tensor, mask_logit: Tensor, hit_valid: Tensor, particle_valid: Tensor,
                  particle_hit_valid: Tensor, cfg: AssignConfig) -> Tensor:
    """Per-event Hungarian assignment -> LongTensor [B, N]: target index of each query, -1 for none."""
    B, N = track_logit.shape
    P = particle_valid.shape[1]
    target_valid, target_hits = pad_targets(particle_valid, particle_hit_valid, N)
    cost = pair_costs(track_logit.detach(), mask_logit.detach(), hit_valid, target_valid, target_hits,
                      cfg.valid_cost, cfg.mask_cost, cfg.dice_cost)
    cost = cost.cpu().numpy()  # [B, N, K]
    valid = target_valid.cpu().numpy()
    match = np.full((B, N), -1, dtype=np.int64)
    for b in range(B):
        rows, cols = linear_sum_assignment(cost[b])
        real = (cols < P) & valid[b, cols]
        match[b, rows[real]] = cols[real]
    return torch.from_numpy(match).to(track_logit.device)
