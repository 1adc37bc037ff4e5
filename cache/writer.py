"""Resumable block writer for one part of a cache split.

Events are written in fixed blocks of `block_events` (one zarr chunk along the event axis). After each
block the part's attrs record `blocks_done` and `hits_done`, atomically. A writer killed at any moment
resumes at the first unrecorded block: hit arrays are cut back to `hits_done` and the block is written
again. Blocks are deterministic functions of their events, so the finished part is identical to one
written without interruption.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import zarr

from hepreg.cache import store
from hepreg.cache.schema import EVENT_ARRAYS, HIT_ARRAYS, OFFSETS, TARGET_ARRAYS
from hepreg.data.layout import TARGETS
from hepreg.errors import CacheError
from hepreg.flat import FlatBatch


def _pad_targets(t: torch.Tensor, p: int) -> torch.Tensor:  # [B, P', ...] -> [B, p, ...]
    if t.shape[1] == p:
        return t
    pad = torch.zeros((t.shape[0], p - t.shape[1]) + tuple(t.shape[2:]), dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], 1)


class PartWriter:
    """Writes the events [start, stop) of a split into its own part group, block by block."""

    def __init__(self, group: zarr.Group):
        self.group = group
        self.progress = store.part_progress(group)
        # write_empty_chunks: every chunk exists on disk, so `cache verify` tells a lost chunk file from zeros
        self.arrays = {k: group[k].with_config({"write_empty_chunks": True})
                       for k in HIT_ARRAYS + (OFFSETS,) + EVENT_ARRAYS + TARGET_ARRAYS}
        self.num_targets = self.arrays["targets/valid"].shape[1]
        self._resume()

    @classmethod
    def create(cls, path: str | Path, index: int, **kwargs) -> "PartWriter":
        return cls(store.create_part(path, index, **kwargs))

    @classmethod
    def open(cls, path: str | Path, index: int) -> "PartWriter":
        return cls(store.open_part(path, index, mode="a"))

    @property
    def num_events(self) -> int:
        return self.progress["stop"] - self.progress["start"]

    @property
    def num_blocks(self) -> int:
        return -(-self.num_events // self.progress["block_events"])

    @property
    def blocks_done(self) -> int:
        return self.progress["blocks_done"]

    @property
    def complete(self) -> bool:
        return self.progress["complete"]

    def block_range(self, k: int) -> tuple[int, int]:
        """Part-local event range [s, e) of block k."""
        n = self.progress["block_events"]
        return k * n, min((k + 1) * n, self.num_events)

    def _resume(self) -> None:
        """Cut hit arrays back to the last recorded block (a killed block may have grown them)."""
        h = self.progress["hits_done"]
        for name in HIT_ARRAYS:
            a = self.arrays[name]
            if a.shape[0] != h:
                a.resize((h,) + a.shape[1:])

    def write_block(self, k: int, batch: FlatBatch, hits_seen: int = 0) -> None:
        """Write block k (the next one); `hits_seen` counts its valid hits before pruning, for the record."""
        if k != self.blocks_done:
            raise CacheError(f"part {self.group.path or self.group.store}: block {k} written out of order "
                             f"(next is {self.blocks_done})")
        s, e = self.block_range(k)
        if batch.size != e - s:
            raise CacheError(f"block {k} of a part holds {e - s} events, got a batch of {batch.size}")
        if batch.targets.shape[1] > self.num_targets:
            raise CacheError(f"a batch has {batch.targets.shape[1]} target slots, the cache was made for "
                             f"{self.num_targets}")
        h = self.progress["hits_done"]
        n = int(batch.offsets[-1])
        a = self.arrays
        if batch.hit_index is None:
            raise CacheError("a cache block needs hits/index (FlatBatch.hit_index: the input row of each hit), "
                             "which this batch lacks")
        for name, t in zip(HIT_ARRAYS, (batch.embed, batch.raw, batch.logit, batch.hit_index)):
            a[name].resize((h + n,) + a[name].shape[1:])
            if n:
                a[name][h:h + n] = _np(t, a[name].dtype)
        a["events/hit_offsets"][s + 1:e + 1] = _np(batch.offsets[1:] + h, np.int64)
        a["events/query_embed"][s:e] = _np(batch.query_embed, a["events/query_embed"].dtype)
        a["events/track_logit"][s:e] = _np(batch.track_logit, np.float32)
        a["events/match"][s:e] = _np(batch.match, np.int64)
        a["events/event_id"][s:e] = _np(batch.event_id, np.int64)
        targets = _pad_targets(batch.targets, self.num_targets)  # [B, P, 4]
        for i, t in enumerate(TARGETS):
            a[f"targets/{t}"][s:e] = _np(targets[..., i], np.float32)
        a["targets/valid"][s:e] = _np(_pad_targets(batch.target_valid, self.num_targets), np.bool_)
        self.progress.update(blocks_done=k + 1, hits_done=h + n, hits_seen=self.progress["hits_seen"] + hits_seen)
        self.group.attrs[store.PART_KEY] = self.progress  # the commit point of this block

    def finish(self) -> None:
        if self.blocks_done != self.num_blocks:
            raise CacheError(f"part has {self.blocks_done} of {self.num_blocks} blocks written; cannot finish")
        self.progress["complete"] = True
        self.group.attrs[store.PART_KEY] = self.progress


def _np(t: torch.Tensor, dtype) -> np.ndarray:
    return t.detach().cpu().numpy().astype(dtype, copy=False)


# Provenance fields that must match for an interrupted export to be continued rather than restarted.
RESUME_KEYS = ("checkpoint_sha256", "dataset", "split", "event_range", "dtypes", "prune_threshold",
               "block_events", "hit_chunk", "compressor", "clevel", "parts", "num_targets")


def is_complete_as(path: str | Path, meta: dict) -> bool:
    """Whether `path` is a complete split exported with these settings (nothing left to do for it)."""
    try:
        old = store.read_meta(path)
    except CacheError:
        return False
    return bool(old.get("complete")) and all(old.get(k) == meta.get(k) for k in RESUME_KEYS)


def begin_split(path: str | Path, meta: dict, *, overwrite: bool) -> bool:
    """Create the split group, or keep an interrupted one with the same provenance. Returns True on resume.

    Call from one process only (rank 0), before any part is written.
    """
    path = Path(path)
    if path.exists():
        try:
            old = store.read_meta(path)
        except CacheError:
            if not overwrite:
                raise CacheError(f"{path} exists but is not a readable hepreg cache split; pass --overwrite "
                                 f"to replace it") from None
            old = None
        if old is not None and not overwrite:
            if old.get("complete"):
                raise CacheError(f"cache split {path} is already complete; pass --overwrite to replace it")
            diff = [k for k in RESUME_KEYS if old.get(k) != meta.get(k)]
            if diff:
                raise CacheError(f"cache split {path} is an interrupted export with other settings "
                                 f"({', '.join(f'{k}: {old.get(k)!r} vs now {meta.get(k)!r}' for k in diff)}); "
                                 f"rerun with the same settings to continue it, or pass --overwrite")
            return True
        store.remove_split(path)
    store.write_meta(path, {**meta, "complete": None})
    return False


def finish_split(path: str | Path, completion: dict) -> dict:
    """Record completion once every part is complete; the split becomes readable. Returns the record."""
    meta = store.read_meta(path)
    kept = seen = 0
    for i, part in enumerate(meta["parts"]):
        progress = store.part_progress(store.open_part(path, i))
        if not progress["complete"]:
            raise CacheError(f"cache split {path}: {store.part_name(i)} is not complete")
        kept += progress["hits_done"]
        seen += progress["hits_seen"]
    record = {**completion, "events": meta["num_events"], "hits_kept": kept, "hits_seen": seen}
    store.write_meta(path, {**meta, "complete": record})
    return record
