"""Hungarian matching of track queries to truth particles.

The cost of giving query n the target p is exactly the loss that pairing would incur (weighted by the
matching cost weights): the track-valid BCE against "p is a real particle", plus, for a real particle, the
hit-mask BCE (mean over the event's real hits) and optionally the dice loss. Targets are padded with
invalid ones up to the number of queries, so every query gets a column and a query whose column is not a
real particle is trained towards "no track".

With at most two queries (the demo's), the optimal assignment is taken in closed form on the whole batch at
once (tensor ops instead of one scipy call per event and layer). More queries go through
`scipy.optimize.linear_sum_assignment`, one event at a time.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from hepreg.settings import AssignConfig


def pad_targets(particle_valid: Tensor, particle_hit_valid: Tensor, num_queries: int) -> tuple[Tensor, Tensor]:
    """Append invalid targets so that there are at least as many targets as queries: [B, K], [B, K, M]."""
    extra = num_queries - particle_valid.shape[1]
    if extra <= 0:
        return particle_valid, particle_hit_valid
    return (F.pad(particle_valid, (0, extra), value=False), F.pad(particle_hit_valid, (0, 0, 0, extra), value=False))


def valid_bce(track_logit: Tensor, target_valid: Tensor) -> Tensor:
    """[..., B, N], [B, K] -> [..., B, N, K]: BCE of each query's validity against each target's."""
    x = track_logit.float().unsqueeze(-1)  # [..., B, N, 1]
    return F.softplus(x) - x * target_valid.float().unsqueeze(-2)


def mask_bce(mask_logit: Tensor, target_hits: Tensor, hit_valid: Tensor) -> Tensor:
    """[..., B, N, M], [B, K, M], [B, M] -> [..., B, N, K]: hit-mask BCE averaged over the event's real hits.

    Leading dimensions (e.g. the decoder layers) share the targets."""
    x = mask_logit.float()
    v = hit_valid.float()
    n_hits = v.sum(-1).clamp(min=1)  # [B]
    # Σ_m x·t over real hits, one matmul per event: [..., B, N, M] @ [B, M, K]
    pos = torch.matmul(x, (target_hits.float() * v.unsqueeze(1)).transpose(-1, -2))
    total = (F.softplus(x) * v.unsqueeze(-2)).sum(-1, keepdim=True)  # [..., B, N, 1]
    return (total - pos) / n_hits[:, None, None]


def mask_dice(mask_logit: Tensor, target_hits: Tensor, hit_valid: Tensor) -> Tensor:
    """[..., B, N, M], [B, K, M], [B, M] -> [..., B, N, K]: 1 - soft dice of each query's mask with each target's."""
    p = torch.sigmoid(mask_logit.float()) * hit_valid.float().unsqueeze(-2)
    t = target_hits.float()
    inter = torch.matmul(p, t.transpose(-1, -2))  # [..., B, N, K]
    return 1 - (2 * inter + 1) / (p.sum(-1).unsqueeze(-1) + t.sum(-1).unsqueeze(-2) + 1)


def pair_costs(track_logit: Tensor, mask_logit: Tensor, hit_valid: Tensor, target_valid: Tensor,
               target_hits: Tensor, valid_w: float, mask_w: float, dice_w: float) -> Tensor:
    """Weighted cost of every (query, target) pair [..., B, N, K]; mask terms count only for real targets."""
    cost = valid_w * valid_bce(track_logit, target_valid)
    real = target_valid.float().unsqueeze(-2)  # [B, 1, K]
    if mask_w:
        cost = cost + mask_w * mask_bce(mask_logit, target_hits, hit_valid) * real
    if dice_w:
        cost = cost + dice_w * mask_dice(mask_logit, target_hits, hit_valid) * real
    return cost


def min_cost_columns(cost: Tensor) -> Tensor:
    """[B, N, K] with N <= K -> LongTensor [B, N]: the column of each row in a minimum-cost assignment of
    distinct columns (rows to targets), on the tensor's device."""
    B, N, K = cost.shape
    if N == 1:
        return cost.argmin(-1)
    if N == 2:
        # Row 0 takes its cheapest column j, row 1 the cheapest other one; or row 1 takes j and row 0 the
        # cheapest other one (if neither took j, row 0 could move to j for no more). The second only when
        # strictly cheaper, and first minima throughout: ties resolve as scipy resolves them for K = 2.
        j = cost[:, 0].argmin(-1, keepdim=True)  # [B, 1]
        taken = torch.zeros_like(cost[:, 0], dtype=torch.bool).scatter_(1, j, True)  # [B, K]
        rest0, rest1 = cost[:, 0].masked_fill(taken, float("inf")), cost[:, 1].masked_fill(taken, float("inf"))
        k0, k1 = rest0.argmin(-1, keepdim=True), rest1.argmin(-1, keepdim=True)
        keep = cost[:, 0].gather(1, j) + rest1.gather(1, k1)
        swap = cost[:, 1].gather(1, j) + rest0.gather(1, k0) < keep  # [B, 1]
        return torch.cat([torch.where(swap, k0, j), torch.where(swap, j, k1)], -1)
    cols = np.stack([linear_sum_assignment(c)[1] for c in cost.cpu().numpy()]) if B else np.zeros((0, N), np.int64)
    return torch.from_numpy(cols.astype(np.int64)).to(cost.device)


def match_from_costs(cost: Tensor, target_valid: Tensor, num_particles: int) -> Tensor:
    """cost [B, N, K], target_valid [B, K] -> LongTensor [B, N]: target index of each query, -1 for none
    (a query whose column is a padding target or an invalid particle)."""
    cols = min_cost_columns(cost)
    real = (cols < num_particles) & target_valid.gather(1, cols)
    return torch.where(real, cols, -1)


@torch.no_grad()
def match_queries(track_logit: Tensor, mask_logit: Tensor, hit_valid: Tensor, particle_valid: Tensor,
                  particle_hit_valid: Tensor, cfg: AssignConfig) -> Tensor:
    """Per-event optimal assignment -> LongTensor [B, N]: target index of each query, -1 for none."""
    N = track_logit.shape[1]
    target_valid, target_hits = pad_targets(particle_valid, particle_hit_valid, N)
    cost = pair_costs(track_logit.detach(), mask_logit.detach(), hit_valid, target_valid, target_hits,
                      cfg.valid_cost, cfg.mask_cost, cfg.dice_cost)
    return match_from_costs(cost, target_valid, particle_valid.shape[1])
