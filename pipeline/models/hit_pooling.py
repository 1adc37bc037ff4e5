"""The pooled head's per-hit work on the real hits only, pooled per track without a pass over padding.

`pool` (in `hepreg.models.head`) reduces tracks padded to their bucket's longest, [R, L, F]: the per-hit MLPs
then run on every padded cell (~25 % of a batch's cells), and max and min each write a masked copy of
[R, L, F] forward and compare every cell with the result backward. The profile of a training step put ~40 %
of its time there. Here the bucketed tracks become one flat list of their real hits, [P, ...] over every bucket
of the batch, so that:
- the per-hit MLPs run once per batch on the P real hits (one matmul per layer, no padding, no per-bucket call);
- the weighted sum is one `index_add` into the tracks (its backward a gather);
- max and min are one `scatter_reduce` each, with `amax`'s gradient written out (`TrackExtreme`).
The values are `pool`'s up to the order of the weighted sum's additions; so are the gradients.
Exported graphs (ONNX, torch.export) keep `pool`: the flat list has a data-dependent length.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

POOLINGS = ("mean", "sum", "max", "min")


@dataclass
class FlatHits:
    """The real hits of a list of buckets, bucket after bucket, each track's hits in order."""
    track: Tensor     # [P] long: row of each hit among all the buckets' tracks (bucket after bucket)
    prob: Tensor      # [P] sigmoid(logit) of the hit for its track's query
    prob_sum: Tensor  # [R] Σ p of each track (0 for a track without hits)
    num_tracks: int


def flat_hits(masks: list[Tensor], probs: list[Tensor]) -> FlatHits:
    """masks [R_b, L_b] bool and probs [R_b, L_b] of each bucket -> `FlatHits` (hits in row-major order of the
    masks, the order of `x[mask]`)."""
    tracks, first_row = [], 0
    for mask in masks:
        rows = torch.arange(first_row, first_row + mask.shape[0], device=mask.device)
        tracks.append(torch.repeat_interleave(rows, mask.sum(1)))
        first_row += mask.shape[0]
    return FlatHits(torch.cat(tracks), torch.cat([p[m] for m, p in zip(masks, probs)]),
                    torch.cat([p.sum(1) for p in probs]), first_row)


def pool_hits(h: Tensor, hits: FlatHits, ops: tuple[str, ...] = POOLINGS) -> Tensor:
    """h [P, F] per-hit features -> [R, len(ops)·F], pooled per track as `pool` pools (0 for a track without
    hits): the p-weighted mean and sum, the max and the min."""
    unknown = [op for op in ops if op not in POOLINGS]
    if unknown:
        raise ValueError(f"unknown pooling {unknown[0]!r}; choose from {', '.join(POOLINGS)}")
    R, F = hits.num_tracks, h.shape[1]
    out: dict[str, Tensor] = {}
    if "sum" in ops or "mean" in ops:
        out["sum"] = h.new_zeros(R, F).index_add(0, hits.track, hits.prob[:, None] * h)  # [R, F]
        out["mean"] = out["sum"] / hits.prob_sum[:, None].clamp_min(1e-12)
    for op in ("max", "min"):
        if op in ops:
            out[op] = TrackExtreme.apply(h, hits.track, R, op)
    return torch.cat([out[op] for op in ops], -1)


class TrackExtreme(torch.autograd.Function):
    """Per track and feature, the max (or min) over the track's hits: h [P, F], track [P] -> [R, F], 0 for a track
    without hits. The gradient is `amax`'s: shared evenly among the hits that reach the extreme. Written out
    because `scatter_reduce`'s own backward, built for every reduction, took ~3x the whole forward."""

    @staticmethod
    def forward(ctx, h: Tensor, track: Tensor, num_tracks: int, op: str) -> Tensor:
        index = track[:, None].expand(-1, h.shape[1])  # [P, F]
        out = h.new_zeros(num_tracks, h.shape[1]).scatter_reduce(0, index, h, "a" + op, include_self=False)
        ctx.save_for_backward(h, track, out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        h, track, out = ctx.saved_tensors
        win = (h == out.index_select(0, track)).to(h.dtype)  # [P, F] 1 where a hit reaches its track's extreme
        count = torch.zeros_like(out).index_add_(0, track, win)  # [R, F] >= 1 wherever a track has hits
        share = grad / count.clamp_min(1)
        return win.mul_(share.index_select(0, track)), None, None, None
