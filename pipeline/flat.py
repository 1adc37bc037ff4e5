"""The flat (CSR) batch the head trains on: stage-1 outputs with each event's hits concatenated.

Neutral ground between the models (which take it), the cache (which stores its arrays) and the stages (which
make it): it imports none of them. `FlatBatch.from_padded` is the single conversion from padded stage-1
outputs to what the head sees; export writes exactly its arrays and the `live` source builds it on the fly,
so cache and live feed the head identical tensors by construction.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


HIT_FIELDS = ("raw", "embed", "logit", "hit_index")  # the fields of a FlatBatch (and cache Block) indexed by hit


@dataclass
class FlatBatch:
    """B events with their (kept) hits concatenated; events are contiguous runs of hits."""
    raw: Tensor           # [H, 23] float32 scaled raw hit features
    embed: Tensor         # [H, D] float32 (stored float16 by default)
    logit: Tensor         # [H, N] final-layer assignment logits, one column per query
    offsets: Tensor       # [B + 1] long, hits of event b are offsets[b]:offsets[b+1]
    query_embed: Tensor   # [B, N, D]
    track_logit: Tensor   # [B, N]
    match: Tensor         # [B, N] long: target index matched to each query, -1 for none
    targets: Tensor       # [B, P, 4] float32, TARGETS order (pt, eta, phi, q)
    target_valid: Tensor  # [B, P] bool
    event_id: Tensor      # [B] long
    # [H] long: row of each hit within its event's `hits` array in the input file (pruning drops rows, so a
    # kept hit's position in the batch no longer says which input hit it is); None where unknown
    hit_index: Tensor | None = None

    @property
    def size(self) -> int:
        return self.offsets.numel() - 1

    @property
    def num_hits(self) -> Tensor:  # [B]
        return self.offsets[1:] - self.offsets[:-1]

    def hit_event(self) -> Tensor:  # [H] long, batch-local event index of each hit
        return torch.repeat_interleave(torch.arange(self.size, device=self.offsets.device), self.num_hits)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "FlatBatch":
        return FlatBatch(**{f.name: _to(getattr(self, f.name), device, non_blocking) for f in fields(self)})

    @staticmethod
    def from_padded(*, raw: Tensor, hit_valid: Tensor, embed: Tensor, mask_logit: Tensor, query_embed: Tensor,
                    track_logit: Tensor, match: Tensor, targets: Tensor, target_valid: Tensor, event_id: Tensor,
                    prune_threshold: float = 0.0) -> "FlatBatch":
        """Flatten padded stage-1 tensors, keeping only hits some query could pool.

        raw [B, M, 23], hit_valid [B, M], embed [B, M, D], mask_logit [B, N, M], query_embed [B, N, D],
        track_logit [B, N], match [B, N], targets [B, P, 4], target_valid [B, P], event_id [B].
        A hit is kept when valid and sigmoid(logit) >= prune_threshold for at least one query: the head's
        pooling weight of every other hit is exactly zero at any threshold >= prune_threshold.
        """
        logit = mask_logit.transpose(1, 2)  # [B, M, N]
        keep = hit_valid
        if prune_threshold > 0:
            keep = keep & (torch.sigmoid(logit.float()) >= prune_threshold).any(-1)
        counts = keep.sum(1)
        row = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)  # [B, M] row within the event
        offsets = torch.zeros(keep.shape[0] + 1, dtype=torch.long, device=keep.device)
        offsets[1:] = torch.cumsum(counts, 0)
        return FlatBatch(
            raw=raw[keep].float(), embed=embed[keep].float(), logit=logit[keep].float(), offsets=offsets,
            query_embed=query_embed.float(), track_logit=track_logit.float(), match=match.long(),
            targets=targets.float(), target_valid=target_valid.bool(), event_id=event_id.long(),
            hit_index=row[keep],
        )


def _to(t: Tensor | None, device: torch.device | str, non_blocking: bool) -> Tensor | None:
    return None if t is None else t.to(device, non_blocking=non_blocking)
