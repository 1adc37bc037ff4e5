"""Per-track padded hits: the one layout every head computes on.

A head regresses one track per (event, query) slot from the hits that slot pools, those with
sigmoid(final logit) >= threshold. A muon pools ~25–40 hits, but a batch's longest track may pool 250 (a slot
that collects noise), and padding every track to it would put ~90 % of the work on padding. So a batch's
slots are sorted by length and cut into buckets (`bucket_bounds`), each padded to its own longest track:
`TrackBatch` holds the buckets, `TrackHits` one of them. Two ways in, one head code:
- `from_flat`: the flat (CSR) batches of the cache and the live path, by gathering the active pairs;
- `from_padded`: event-padded tensors [B, M, ...] as stage 1 outputs them (ONNX export, `predict`): one bucket
  whose rows are the whole events with a mask, so the same head code runs without any data-dependent shape.
Pruned and unpruned caches give identical buckets: a pruned hit is inactive for every slot.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

BUCKET_ROWS = 1024  # at most this many tracks per bucket (the attention head's [R, L, L] scores stay small)
BUCKET_SLACK = 1.25  # a bucket may hold up to 25 % padding ...
BUCKET_FREE_CELLS = 8192  # ... plus this many padded cells: below that, a separate bucket costs more than it saves


@dataclass
class TrackHits:
    """Tracks padded to a common width L."""
    raw: Tensor          # [R, L, 23] scaled raw hit features, 0 at padding
    embed: Tensor        # [R, L, D] hit embeddings
    prob: Tensor         # [R, L] sigmoid(logit) of the slot's query, 0 where not active
    mask: Tensor         # [R, L] bool, the slot's active hits
    query_embed: Tensor  # [R, D]
    hit: Tensor          # [R, L] long, row of each hit in its source (flat batch row, or event column), -1 pad
    compact: bool = True  # each row's hits come first (from_flat), so rows may be cut to their longest track

    def take(self, rows: Tensor, width: int | None = None) -> "TrackHits":
        """The tracks `rows`, cut to `width` hit columns (compact layouts only)."""
        w = self.mask.shape[1] if width is None or not self.compact else width
        return TrackHits(raw=self.raw[rows, :w], embed=self.embed[rows, :w], prob=self.prob[rows, :w],
                         mask=self.mask[rows, :w], query_embed=self.query_embed[rows], hit=self.hit[rows, :w],
                         compact=self.compact)

    @property
    def weight(self) -> Tensor:  # [R, L] p·a / Σ p·a, the weighted-mean weights (0 for an empty track)
        return self.prob / self.prob.sum(1, keepdim=True).clamp_min(1e-12)

    def to(self, device) -> "TrackHits":
        return TrackHits(**{f.name: (v.to(device) if isinstance(v := getattr(self, f.name), Tensor) else v)
                            for f in fields(self)})


@dataclass
class TrackBatch:
    """Every (event, query) slot of a batch, S = B·N of them, as buckets of tracks of similar length."""
    buckets: list[TrackHits]
    rows: list[Tensor] | None  # [R_b] long each: the slot (event·N + query) of each row; None: one bucket in
    num_events: int            # slot order (from_padded, where no data-dependent index may appear)
    num_queries: int

    @property
    def num_slots(self) -> int:
        return self.num_events * self.num_queries

    def per_event(self, x: Tensor) -> Tensor:
        """[S, ...] per-slot values -> [B, N, ...]."""
        return x.view(self.num_events, self.num_queries, *x.shape[1:])

    def dense(self) -> TrackHits:
        """All slots in slot order, padded to the longest track (for inspection and tests, not for speed)."""
        b = self.buckets
        cat = lambda name, fill, hit_axis=True: scatter_rows([getattr(t, name) for t in b], self.rows, fill,  # noqa: E731
                                                            hit_axis, self.num_slots)
        return TrackHits(raw=cat("raw", 0.0), embed=cat("embed", 0.0), prob=cat("prob", 0.0), mask=cat("mask", False),
                         query_embed=cat("query_embed", 0.0, False), hit=cat("hit", -1), compact=b[0].compact)


def scatter_rows(parts: list[Tensor], rows: list[Tensor] | None, fill=0.0, hit_axis: bool | None = None,
                 S: int | None = None) -> Tensor:
    """Bucketed per-row tensors [R_b, ...] -> [S, ...] in slot order (`fill` where no bucket holds a slot; S
    defaults to the rows held). With a hit axis ([R_b, L_b, ...], the default for 2+ dimensions, except
    [R_b, D] given `hit_axis=False`) they are padded with `fill` to the widest."""
    if rows is None:
        return parts[0]
    first = parts[0]
    hit_axis = first.dim() > 2 if hit_axis is None else hit_axis
    S = sum(r.numel() for r in rows) if S is None else S
    shape = (max(p.shape[1] for p in parts), *first.shape[2:]) if hit_axis else first.shape[1:]
    out = first.new_full((S, *shape), fill)
    for p, r in zip(parts, rows):
        if hit_axis:
            out[r, :p.shape[1]] = p
        else:
            out[r] = p
    return out


def bucket_bounds(lengths: np.ndarray, max_rows: int = BUCKET_ROWS, slack: float = BUCKET_SLACK,
                  free_cells: int = BUCKET_FREE_CELLS) -> list[int]:
    """Cut points [0, ..., n] of sorted track lengths [n]: each bucket as long as its padded cells
    (rows × its longest track) stay within `slack` × its hits + `free_cells`, and it holds <= `max_rows`.
    Always one bucket at least (empty for an empty batch), so that every head runs and reaches its parameters."""
    n = len(lengths)
    if n == 0:
        return [0, 0]
    csum = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    bounds, start = [0], 0
    while start < n:
        ends = np.arange(start + 1, min(start + max_rows, n) + 1)  # candidate ends (exclusive)
        cells = (ends - start) * np.maximum(lengths[ends - 1], 1)
        ok = cells <= slack * (csum[ends] - csum[start]) + free_cells
        start = int(ends[np.flatnonzero(ok)[-1]]) if ok.any() else start + 1
        bounds.append(start)
    return bounds


@torch.no_grad()
def _active_pairs(logit: Tensor, offsets: Tensor, threshold: float):
    """Active (hit, query) pairs of a flat batch: hit, query, slot = event·N + query, per pair, and the
    number of pairs per slot [S]. Pairs come ordered by hit, then query."""
    num_events, num_queries = offsets.numel() - 1, logit.shape[1]
    hit_event = torch.repeat_interleave(torch.arange(num_events, device=logit.device), offsets[1:] - offsets[:-1])
    p = torch.sigmoid(logit.float())  # [H, N]
    hit, query = (p >= threshold).nonzero(as_tuple=True)
    slot = hit_event[hit] * num_queries + query
    return hit, query, slot, torch.bincount(slot, minlength=num_events * num_queries)


def from_flat(raw: Tensor, embed: Tensor, logit: Tensor, offsets: Tensor, query_embed: Tensor,
              threshold: float, max_rows: int = BUCKET_ROWS) -> TrackBatch:
    """Flat batch tensors (raw [H, 23], embed [H, D], logit [H, N], offsets [B + 1], query_embed [B, N, D]);
    buckets of at most `max_rows` tracks."""
    hit, query, slot, lengths = _active_pairs(logit, offsets, threshold)
    B, N = offsets.numel() - 1, logit.shape[1]
    S, dev = B * N, raw.device
    order = torch.argsort(lengths, stable=True)  # [S] slots by length
    rank = torch.empty_like(order)
    rank[order] = torch.arange(S, device=dev)
    # pairs by (rank of their slot, hit): each bucket's pairs are then one contiguous run
    pair_order = torch.argsort(rank[slot], stable=True)
    hit, query, slot = hit[pair_order], query[pair_order], slot[pair_order]
    sorted_lengths = lengths[order]
    first_pair = torch.cumsum(sorted_lengths, 0) - sorted_lengths  # [S] first pair of each rank
    pos = torch.arange(hit.numel(), device=dev) - first_pair[rank[slot]]  # the pair's column in its row
    lengths_host = sorted_lengths.cpu().numpy()
    bounds = bucket_bounds(lengths_host, max_rows)
    pair_bounds = np.concatenate([[0], np.cumsum(lengths_host)])[bounds]
    raw_z = torch.cat([raw, raw.new_zeros(1, raw.shape[1])])  # padding reads an appended zero row
    embed_z = torch.cat([embed, embed.new_zeros(1, embed.shape[1])])
    q_flat = query_embed.reshape(S, query_embed.shape[-1])
    buckets, rows = [], []
    for a, z, pa, pz in zip(bounds[:-1], bounds[1:], pair_bounds[:-1], pair_bounds[1:]):
        R, L = z - a, max(int(lengths_host[z - 1]) if z > a else 0, 1)  # one masked column when no hit is active
        r, c, h = rank[slot[pa:pz]] - a, pos[pa:pz], hit[pa:pz]
        index = torch.full((R, L), -1, dtype=torch.long, device=dev)
        index[r, c] = h
        mask = index >= 0
        prob = torch.zeros(R, L, dtype=raw.dtype, device=dev)
        # sigmoid of the gathered logits, not a gather of sigmoid(logit): a vectorised sigmoid can differ in
        # the last bit with the position of a value in its array, and pruned and unpruned batches must agree
        prob[r, c] = torch.sigmoid(logit[h, query[pa:pz]]).to(raw.dtype)
        pad = torch.where(mask, index, raw.shape[0]).view(-1)
        slots = order[a:z]
        buckets.append(TrackHits(raw=raw_z.index_select(0, pad).view(R, L, raw.shape[1]),
                                 embed=embed_z.index_select(0, pad).view(R, L, embed.shape[1]), prob=prob, mask=mask,
                                 query_embed=q_flat.index_select(0, slots), hit=index))
        rows.append(slots)
    return TrackBatch(buckets, rows, B, N)


def from_padded(raw: Tensor, hit_valid: Tensor, embed: Tensor, mask_logit: Tensor, query_embed: Tensor,
                threshold: float) -> TrackBatch:
    """Event-padded tensors (raw [B, M, 23], hit_valid [B, M], embed [B, M, D], mask_logit [B, N, M],
    query_embed [B, N, D]): each slot sees its whole event, masked to its active hits; one bucket."""
    B, N, M = mask_logit.shape
    p = torch.sigmoid(mask_logit.float())  # [B, N, M]
    mask = (p >= threshold) & hit_valid[:, None, :]
    prob = torch.where(mask, p, torch.zeros_like(p))
    zero = ~mask[..., None]
    hit = torch.arange(M, device=raw.device).expand(B, N, M)
    tracks = TrackHits(
        raw=raw[:, None].expand(B, N, M, raw.shape[-1]).masked_fill(zero, 0.0).reshape(B * N, M, -1),
        embed=embed[:, None].expand(B, N, M, embed.shape[-1]).masked_fill(zero, 0.0).reshape(B * N, M, -1),
        prob=prob.reshape(B * N, M), mask=mask.reshape(B * N, M), query_embed=query_embed.reshape(B * N, -1),
        hit=torch.where(mask, hit, -1).reshape(B * N, M), compact=False)
    return TrackBatch([tracks], None, B, N)
