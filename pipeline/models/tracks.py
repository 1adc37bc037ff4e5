"""Per-track padded hits: the one layout every head computes on.

A head regresses one track per (event, query) slot from the hits that slot pools, those with
sigmoid(final logit) >= threshold. `TrackHits` holds them padded per track, [S, L] with S = B·N slots and
L the longest track of the batch, never the longest event (600 hits): a muon pools ~20–40 hits. Two ways in,
one head code:
- `from_flat`: the flat (CSR) batches of the cache and the live path, by gathering the active pairs;
- `from_padded`: event-padded tensors [B, M, ...] as stage 1 outputs them (ONNX export, `predict`), where a
  slot's row is the whole event with a mask, so the same head code runs without any data-dependent shape.
Pruned and unpruned caches give identical TrackHits: a pruned hit is inactive for every slot.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class TrackHits:
    raw: Tensor          # [S, L, 23] scaled raw hit features, 0 at padding
    embed: Tensor        # [S, L, D] hit embeddings
    prob: Tensor         # [S, L] sigmoid(logit) of the slot's query, 0 where not active
    mask: Tensor         # [S, L] bool, the slot's active hits
    query_embed: Tensor  # [S, D]
    hit: Tensor          # [S, L] long, row of each hit in its source (flat batch row, or event column), -1 pad
    num_events: int
    num_queries: int
    compact: bool = True  # each row's hits come first (from_flat), so rows may be cut to their longest track

    def take(self, rows: Tensor, width: int) -> "TrackHits":
        """The tracks `rows`, cut to `width` hit columns (compact layouts only)."""
        return TrackHits(raw=self.raw[rows, :width], embed=self.embed[rows, :width], prob=self.prob[rows, :width],
                         mask=self.mask[rows, :width], query_embed=self.query_embed[rows], hit=self.hit[rows, :width],
                         num_events=0, num_queries=0, compact=self.compact)

    @property
    def weight(self) -> Tensor:  # [S, L] p·a / Σ p·a, the weighted-mean weights (0 for an empty track)
        return self.prob / self.prob.sum(1, keepdim=True).clamp_min(1e-12)

    def per_event(self, x: Tensor) -> Tensor:
        """[S, ...] per-slot values -> [B, N, ...]."""
        return x.view(self.num_events, self.num_queries, *x.shape[1:])

    def to(self, device) -> "TrackHits":
        return TrackHits(**{f.name: (v.to(device) if isinstance(v := getattr(self, f.name), Tensor) else v)
                            for f in fields(self)})


@torch.no_grad()
def _active_pairs(logit: Tensor, offsets: Tensor, threshold: float):
    """Active (hit, query) pairs of a flat batch, sorted by slot = event·N + query, with their position."""
    num_events, num_queries = offsets.numel() - 1, logit.shape[1]
    hit_event = torch.repeat_interleave(torch.arange(num_events, device=logit.device), offsets[1:] - offsets[:-1])
    p = torch.sigmoid(logit.float())  # [H, N]
    hit, query = (p >= threshold).nonzero(as_tuple=True)  # ordered by hit then query: hit order within a slot
    slot = hit_event[hit] * num_queries + query
    order = torch.argsort(slot, stable=True)
    hit, query, slot = hit[order], query[order], slot[order]
    lengths = torch.bincount(slot, minlength=num_events * num_queries)
    start = torch.cumsum(lengths, 0) - lengths
    pos = torch.arange(hit.numel(), device=hit.device) - start[slot]
    return hit, query, slot, pos, lengths


def from_flat(raw: Tensor, embed: Tensor, logit: Tensor, offsets: Tensor, query_embed: Tensor,
              threshold: float) -> TrackHits:
    """Flat batch tensors (raw [H, 23], embed [H, D], logit [H, N], offsets [B + 1], query_embed [B, N, D])."""
    hit, query, slot, pos, lengths = _active_pairs(logit, offsets, threshold)
    B, N = offsets.numel() - 1, logit.shape[1]
    S, L = B * N, max(int(lengths.max()) if hit.numel() else 0, 1)  # one masked column when no hit is active
    index = torch.full((S, L), -1, dtype=torch.long, device=raw.device)
    index[slot, pos] = hit
    mask = index >= 0
    prob = torch.zeros(S, L, dtype=raw.dtype, device=raw.device)
    # sigmoid of the gathered logits, not a gather of sigmoid(logit): a vectorised sigmoid can differ in the
    # last bit with the position of a value in its array, and pruned and unpruned batches must agree exactly
    prob[slot, pos] = torch.sigmoid(logit[hit, query]).to(raw.dtype)
    pad = torch.where(mask, index, raw.shape[0]).view(-1)  # padding reads an appended zero row

    def gather(x: Tensor) -> Tensor:
        return torch.cat([x, x.new_zeros(1, x.shape[1])]).index_select(0, pad).view(S, L, x.shape[1])

    return TrackHits(raw=gather(raw), embed=gather(embed), prob=prob, mask=mask,
                     query_embed=query_embed.reshape(S, query_embed.shape[-1]), hit=index, num_events=B,
                     num_queries=N)


def from_padded(raw: Tensor, hit_valid: Tensor, embed: Tensor, mask_logit: Tensor, query_embed: Tensor,
                threshold: float) -> TrackHits:
    """Event-padded tensors (raw [B, M, 23], hit_valid [B, M], embed [B, M, D], mask_logit [B, N, M],
    query_embed [B, N, D]): each slot sees its whole event, masked to its active hits."""
    B, N, M = mask_logit.shape
    p = torch.sigmoid(mask_logit.float())  # [B, N, M]
    mask = (p >= threshold) & hit_valid[:, None, :]
    prob = torch.where(mask, p, torch.zeros_like(p))
    zero = ~mask[..., None]
    hit = torch.arange(M, device=raw.device).expand(B, N, M)
    return TrackHits(
        raw=raw[:, None].expand(B, N, M, raw.shape[-1]).masked_fill(zero, 0.0).reshape(B * N, M, -1),
        embed=embed[:, None].expand(B, N, M, embed.shape[-1]).masked_fill(zero, 0.0).reshape(B * N, M, -1),
        prob=prob.reshape(B * N, M), mask=mask.reshape(B * N, M), query_embed=query_embed.reshape(B * N, -1),
        hit=torch.where(mask, hit, -1).reshape(B * N, M), num_events=B, num_queries=N, compact=False)
