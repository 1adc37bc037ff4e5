"""Stage-1 outputs with each event's hits concatenated (CSR): what the head trains on, and what the cache holds.

Two holders of the same fields, for two jobs:
- `FlatBatch`: torch, float32, on the training device; the head's input. `FlatBatch.from_padded` is the single
  conversion from padded stage-1 outputs to it; export writes exactly its arrays and the `live` source builds
  it on the fly, so cache and live feed the head identical tensors by construction.
- `Block`: numpy, in the cache's stored dtypes (float16 embeddings stay float16); what the cache reads and
  writes, and what the loader shuffles and cuts into batches on the host.
The reader's `EventArrays` (padded input events, numpy) and `FlatEvents` (the same with hits concatenated:
the batch loader's shuffle buffer) hold stage-1 inputs with their truth, `HitBatch` the padded tensors stage 1
runs on; these two hold what stage 1 made of them. Neutral ground between the models (which take a
FlatBatch), the cache (which stores a Block) and the stages (which make them): it imports none of them.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import numpy as np
import torch
from torch import Tensor

HIT_FIELDS = ("raw", "embed", "logit", "hit_index")  # indexed by hit [H, ...]; every other field but offsets by event


class _Events:
    """What both holders share: events [s, e) as a slice, whatever the array type (numpy, torch, memmap)."""

    def slice(self, s: int, e: int):
        """Events [s, e): views of their hit and event rows, offsets from 0 (a field that is None stays None)."""
        h0, h1 = self.offsets[s], self.offsets[e]

        def cut(name: str, a):
            if a is None:
                return None
            if name == "offsets":
                return a[s:e + 1] - h0
            return a[h0:h1] if name in HIT_FIELDS else a[s:e]

        return type(self)(**{f.name: cut(f.name, getattr(self, f.name)) for f in fields(self)})


@dataclass
class FlatBatch(_Events):
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


@dataclass
class Block(_Events):
    """Events held as numpy arrays in their stored dtypes; offsets start at 0."""
    raw: np.ndarray          # [H, 23]
    embed: np.ndarray        # [H, D]
    logit: np.ndarray        # [H, N]
    offsets: np.ndarray      # [B + 1] int64
    query_embed: np.ndarray  # [B, N, D]
    track_logit: np.ndarray  # [B, N]
    match: np.ndarray        # [B, N]
    targets: np.ndarray      # [B, P, 4]
    target_valid: np.ndarray  # [B, P]
    event_id: np.ndarray     # [B]
    hit_index: np.ndarray | None = None  # [H] row of each hit within its event in the input file

    @property
    def size(self) -> int:
        return len(self.offsets) - 1

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f.name).nbytes for f in fields(self) if getattr(self, f.name) is not None)

    def take(self, idx: np.ndarray) -> "Block":
        """The events `idx` (in that order), their hit runs gathered into a new CSR block."""
        starts, counts = self.offsets[idx], self.offsets[idx + 1] - self.offsets[idx]
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        hit = np.repeat(starts - offsets[:-1], counts) + np.arange(offsets[-1])  # [H'] source rows
        return Block(self.raw[hit], self.embed[hit], self.logit[hit], offsets, self.query_embed[idx],
                     self.track_logit[idx], self.match[idx], self.targets[idx], self.target_valid[idx],
                     self.event_id[idx], None if self.hit_index is None else self.hit_index[hit])

    @staticmethod
    def concat(blocks: list["Block"], empty: Callable[..., np.ndarray] = np.empty) -> "Block":
        """The blocks one after the other, in arrays from `empty(shape, dtype)` (a `BufferPool`'s, to reuse)."""
        if len(blocks) == 1:
            return blocks[0]
        base = np.cumsum([0] + [b.offsets[-1] for b in blocks[:-1]])
        offsets = np.concatenate([[0]] + [b.offsets[1:] + o for b, o in zip(blocks, base)]).astype(np.int64)

        def cat(arrays: list[np.ndarray]) -> np.ndarray:
            out = empty((sum(len(a) for a in arrays),) + arrays[0].shape[1:], arrays[0].dtype)
            return np.concatenate(arrays, out=out)

        return Block(offsets=offsets, **{f.name: cat([getattr(b, f.name) for b in blocks]) for f in fields(Block)
                                         if f.name != "offsets" and all(getattr(b, f.name) is not None
                                                                        for b in blocks)})

    @staticmethod
    def from_flat(batch: FlatBatch) -> "Block":
        return Block(**{f.name: getattr(batch, f.name).detach().cpu().numpy() for f in fields(Block)
                        if getattr(batch, f.name) is not None})

    def to_flat(self, copy: bool = True) -> FlatBatch:
        """float32 tensors (embeddings widened from their stored dtype). Copies by default, so that a consumer
        that edits a batch in place never touches a split held in memory; `copy=False` for a block that is
        already a private copy (one that `take` made), whose arrays the tensors may then share. The widening is
        torch's (vectorised: ~5x numpy's float16 conversion, a few ms per batch of a streamed split)."""
        def t(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(dtype, copy=copy)

        f4, i8 = torch.float32, torch.int64
        return FlatBatch(raw=t(self.raw, f4), embed=t(self.embed, f4), logit=t(self.logit, f4),
                         offsets=t(self.offsets, i8), query_embed=t(self.query_embed, f4),
                         track_logit=t(self.track_logit, f4), match=t(self.match, i8),
                         targets=t(self.targets, f4), target_valid=t(self.target_valid, torch.bool),
                         event_id=t(self.event_id, i8),
                         hit_index=None if self.hit_index is None else t(self.hit_index, i8))
