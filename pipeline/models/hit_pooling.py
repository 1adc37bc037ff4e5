"""The pooled head's per-hit work on the real hits only, pooled per track without a pass over padding.

`pool` (in `hepreg.models.head`) reduces tracks padded to their bucket's longest, [R, L, F]: the per-hit MLPs
then run on every padded cell (~25 % of a batch's cells), and max and min each write a masked copy of
[R, L, F] forward and compare every cell with the result backward. The profile of a training step put ~40 %
of its time there. Here the bucketed tracks become one flat list of their real hits, [P, ...] over every bucket
of the batch, so that:
- the per-hit MLPs run once per batch on the P real hits (one matmul per layer, no padding, no per-bucket call);
- the weighted sum is one `index_add` into the tracks (its backward a gather);
- max and min are one `scatter_reduce` each; all four poolings have one hand-written backward (`TrackPool`).
The values are `pool`'s up to the order of the weighted sum's additions; so are the gradients.
Exported graphs (ONNX, torch.export) keep `pool`: the flat list has a data-dependent length; so does end-to-end
fine-tuning, where the pooling weights p carry a gradient to stage 1 (`TrackPool` gives none to p).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

import torch
from torch import Tensor

from hepreg.settings import Pooling

POOLINGS: tuple[Pooling, ...] = get_args(Pooling)  # every pooling, in the order the head concatenates them


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
    return TrackPool.apply(h, hits.track, hits.prob, hits.prob_sum, hits.num_tracks, tuple(ops))


class TrackPool(torch.autograd.Function):
    """Every pooling of h [P, F] per track at once -> [R, len(ops)·F], with one hand-written backward.

    Forward: the weighted sum is one `index_add`, the mean that sum over Σp, max and min one `scatter_reduce`
    each (a track without hits keeps the 0 it starts from). Backward: the gradient of h is built in one buffer,
    the weighted sum's share first, then max's and min's added in place, each shared evenly among the hits that
    reach the extreme, as `amax` shares it. Autograd's own composition of the same ops (a backward per op, an
    [P, F] sum of their gradients, `scatter_reduce`'s general backward) took ~2x as long."""

    @staticmethod
    def forward(ctx, h: Tensor, track: Tensor, prob: Tensor, prob_sum: Tensor, num_tracks: int,
                ops: tuple[str, ...]) -> Tensor:
        R, F = num_tracks, h.shape[1]
        out: dict[str, Tensor] = {}
        if "sum" in ops or "mean" in ops:
            out["sum"] = h.new_zeros(R, F).index_add_(0, track, prob[:, None] * h)  # [R, F]
            out["mean"] = out["sum"] / prob_sum[:, None].clamp_min(1e-12)
        index = track[:, None].expand(-1, F)  # [P, F]
        for op in ("max", "min"):
            if op in ops:
                out[op] = h.new_zeros(R, F).scatter_reduce_(0, index, h, "a" + op, include_self=False)
        ctx.ops = ops
        ctx.save_for_backward(h, track, prob, prob_sum, *(out[op] for op in ("max", "min") if op in ops))
        return torch.cat([out[op] for op in ops], -1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        h, track, prob, prob_sum, *extremes = ctx.saved_tensors
        ops = ctx.ops
        F = h.shape[1]
        g = dict(zip(ops, grad.split(F, -1)))  # each [R, F]
        if "sum" in g or "mean" in g:
            per_track = g["sum"] if "sum" in g else None
            if "mean" in g:
                mean = g["mean"] / prob_sum[:, None].clamp_min(1e-12)
                per_track = mean if per_track is None else per_track + mean
            grad_h = per_track.index_select(0, track).mul_(prob[:, None])  # [P, F]
        else:
            grad_h = torch.zeros_like(h)
        for op, value in zip([op for op in ("max", "min") if op in ops], extremes):
            win = (h == value.index_select(0, track)).to(h.dtype)  # [P, F] 1 where a hit reaches the extreme
            count = torch.zeros_like(value).index_add_(0, track, win)  # [R, F] >= 1 wherever a track has hits
            grad_h.addcmul_(win, (g[op] / count.clamp_min(1)).index_select(0, track))
        return grad_h, None, None, None, None, None
