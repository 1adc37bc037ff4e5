"""The batches a head trains on (`HeadSource`: a stored cache split or a live one), and a held split's head
inputs, prepared once: the per-hit features, track frame and fit proxy of every slot.

What a head sees of a track (`hepreg.models.track_inputs`) is a deterministic function of its own event's
cached tensors, never of the head's weights: training recomputing it every batch of every epoch is waste, and
with the fit proxy it is the bulk of a cached step (the fit runs ~1,000 small tensor operations per bucket of
tracks). `PreparedInputs` computes it once, before training, for every event of a split held in memory
(`hepreg.cache.resident`), and stores it flat: per slot its first pair and length, per (hit, slot) pair its
features, probability and hit row. A batch's `BatchInputs` is then a few gathers, bucketed by track length
exactly as `from_flat` buckets.

The values are those of `prepare` on batches of `chunk_events` consecutive events: equal to a batch's own
`prepare` up to float rounding (the fit's sums run over different paddings), and identical from run to run,
between a sweep and its single runs, and between a pruned and an unpruned cache.
"""
from __future__ import annotations

import time
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from hepreg.cache.loader import CacheLoader
from hepreg.config import Config
from hepreg.errors import CacheError, HepregError
from hepreg.flat import FlatBatch
from hepreg.models.head import RegressionHead, batch_inputs
from hepreg.models.track_inputs import BatchInputs, HeadInputs, InputSpec, feature_names, prepare
from hepreg.models.tracks import TrackBatch, TrackHits, bucket_bounds, from_flat
from hepreg.runs.directory import RunDir
from hepreg.runs.distributed import DistInfo

CHUNK_EVENTS = 8192  # events prepared at a time, in buckets without a row limit: the fit's ~1,000 tensor
# operations per bucket then run on large tensors (measured: 1.25x faster than batches of 2048 in buckets of 1024)


def estimated_bytes(resident, spec: InputSpec) -> int:
    """What `PreparedInputs(resident, spec)` will hold: per active (hit, slot) pair its features and probability
    (float32) and hit row (int64); per slot its track features, reference, first pair and length."""
    threshold = spec.threshold
    hit_names, track_names = feature_names(spec.track_frame, spec.fit_proxy)
    logit = resident.tensors["logit"]
    pairs = int((logit.float() >= float(np.log(threshold / (1 - threshold)))).sum()) if 0 < threshold < 1 else logit.numel()
    slots = resident.num_events * resident.tensors["query_embed"].shape[1]
    return pairs * (4 * len(hit_names) + 4 + 8) + slots * (4 * len(track_names) + 12 + 16)


def inputs_for(batch: FlatBatch, heads: list[RegressionHead], prepared: dict[InputSpec, "PreparedInputs"],
               wanted: Tensor | None = None) -> dict[InputSpec, BatchInputs]:
    """One `BatchInputs` per input key among `heads`: gathered from `prepared` where it holds the key (only the
    slots `wanted` [S] bool, when given), else computed from the batch (`batch_inputs`, every slot)."""
    out = {k: p.inputs(batch, wanted) for k, p in prepared.items() if any(h.input_key == k for h in heads)}
    rest = [h for h in heads if h.input_key not in out]
    return {**out, **batch_inputs(batch, rest)} if rest else out


class PreparedInputs:
    """`BatchInputs` of any batch of a held split at one `InputSpec`."""

    def __init__(self, resident, spec: InputSpec, chunk_events: int = CHUNK_EVENTS):
        t = resident.tensors
        E, N = resident.num_events, t["query_embed"].shape[1]
        self.num_queries, self.embed = N, t["embed"]  # embed: the split's own (float16 or 32)
        self.sorted_ids, self.position = t["event_id"].sort()  # event id -> position in the split
        slots, cols, feats, probs, hits = [], [], [], [], []
        track_parts, offset_parts, slot_parts = [], [], []
        order = np.arange(E)
        for a, batch in zip(range(0, E, chunk_events), resident.batches(order, chunk_events)):
            tracks = from_flat(batch.raw, batch.embed, batch.logit, batch.offsets, batch.query_embed,
                               spec.threshold, max_rows=batch.size * N)
            x = prepare(tracks, spec.track_frame, spec.fit_proxy)
            first_hit = resident.offsets[a]  # the chunk's hits are the split's rows from here on, in order
            for b, rows in zip(x.buckets, tracks.rows):
                r, c = b.tracks.mask.nonzero(as_tuple=True)  # [pairs] by row, then column
                slots.append(a * N + rows[r])
                cols.append(c)
                feats.append(b.hit_features[r, c])
                probs.append(b.tracks.prob[r, c])
                hits.append(b.tracks.hit[r, c] + first_hit)
                slot_parts.append(a * N + rows)
                track_parts.append(b.track_features)
                offset_parts.append(b.offset)
        slot, col = torch.cat(slots), torch.cat(cols)
        width = int(col.max()) + 1 if col.numel() else 1
        pair_order = torch.argsort(slot * width + col)  # pairs by slot, then the column they had
        features = torch.cat(feats)[pair_order]
        # one extra row at index P: what padding gathers (zeros, hit row -1)
        self.features = torch.cat([features, features.new_zeros(1, features.shape[1])])  # [P + 1, F_hit]
        self.prob = torch.cat([torch.cat(probs)[pair_order], features.new_zeros(1)])  # [P + 1]
        self.hit = torch.cat([torch.cat(hits)[pair_order], slot.new_full((1,), -1)])  # [P + 1] the split's hit row
        self.length = torch.bincount(slot, minlength=E * N)  # [E·N]
        self.start = torch.cumsum(self.length, 0) - self.length
        rows = torch.cat(slot_parts)
        track = torch.cat(track_parts)
        self.track_features = track.new_zeros(E * N, track.shape[1]).index_copy(0, rows, track)  # [E·N, F_track]
        unheld = torch.cat([track.new_zeros(E * N, 3), track.new_ones(E * N, 3)], -1)  # reference 0, scale 1
        self.offset = unheld.index_copy(0, rows, torch.cat(offset_parts))  # [E·N, 6]
        self.num_pairs = int(self.prob.numel()) - 1

    @property
    def nbytes(self) -> int:
        tensors = (self.features, self.prob, self.hit, self.length, self.start, self.track_features, self.offset,
                   self.sorted_ids, self.position)
        return sum(x.numel() * x.element_size() for x in tensors)

    def positions(self, event_id: Tensor) -> Tensor:
        """Positions in the split of the events `event_id` [B]; a batch of another split is refused."""
        idx = torch.searchsorted(self.sorted_ids, event_id).clamp_max(self.sorted_ids.numel() - 1)
        if not torch.equal(self.sorted_ids[idx], event_id):
            raise CacheError("a batch holds events that are not in the split its inputs were prepared for")
        return self.position[idx]

    def inputs(self, batch: FlatBatch, wanted: Tensor | None = None) -> BatchInputs:
        """The batch's inputs, bucketed by track length as `from_flat` buckets them; only the slots `wanted`
        ([S] bool: the matched ones, the only ones training and validation read) when given."""
        N, dev = self.num_queries, self.length.device
        pos = self.positions(batch.event_id)  # [B]
        B = pos.numel()
        slot = (pos[:, None] * N + torch.arange(N, device=dev)).view(-1)  # [S] the split's slot of each slot
        lengths = self.length[slot]
        if wanted is None:
            order = torch.argsort(lengths, stable=True)
        else:
            held = wanted.nonzero()[:, 0]
            order = held[torch.argsort(lengths[held], stable=True)]
        sorted_lengths = lengths[order].cpu().numpy()
        bounds = bucket_bounds(sorted_lengths)
        query_embed = batch.query_embed.reshape(B * N, -1)
        P, features, prob, hit, embed = self.num_pairs, self.features, self.prob, self.hit, self.embed
        buckets, tracks, rows_list = [], [], []
        for a, z in zip(bounds[:-1], bounds[1:]):
            rows = order[a:z]
            g = slot[rows]
            L = max(int(sorted_lengths[z - 1]) if z > a else 0, 1)
            col = torch.arange(L, device=dev)
            mask = col < self.length[g][:, None]  # [R, L]
            pair = torch.where(mask, self.start[g][:, None] + col, P)  # [R, L]
            h = hit[pair]
            e = embed.index_select(0, h.clamp_min(0).view(-1)).view(*h.shape, -1).float() * mask[..., None]
            t = TrackHits(raw=e.new_zeros(*h.shape, 0), embed=e, prob=prob[pair], mask=mask,
                          query_embed=query_embed.index_select(0, rows), hit=h)
            tracks.append(t)
            rows_list.append(rows)
            buckets.append(HeadInputs(t, features[pair], self.track_features[g], self.offset[g]))
        return BatchInputs(buckets, TrackBatch(tracks, rows_list, B, N), self.offset[slot])


class HeadSource:
    """One split's batches for the head: `CacheLoader` over a stored cache split or a `LiveSplit` (each rank
    its own disjoint share), plus what the head is built from (targets, a sample of raw hits, the width)."""

    def __init__(self, split, loader: CacheLoader):
        self.split, self.loader = split, loader
        self.stage1_sha256 = split.checkpoint_sha256  # of the stage-1 checkpoint whose outputs these are
        self.dim = split.dim
        self.prepared: dict[InputSpec, PreparedInputs] = {}  # the heads' inputs, per input key, prepared once

    def prepare(self, heads: list[RegressionHead]) -> str | None:
        """Prepare the heads' inputs once for the whole split, where it is held in memory and they fit there
        too; says what was done (None where the split is not held). Inputs prepared by an earlier call are kept
        and reused while the new ones fit beside them (the trials of `hepreg tune` share them)."""
        resident = self.loader.resident
        if resident is None:
            return None
        keys = list(dict.fromkeys(h.input_key for h in heads))
        missing = [key for key in keys if key not in self.prepared]
        need = sum(estimated_bytes(resident, key) for key in missing)
        if missing and not self.loader.fits(need):  # room first: drop what these heads do not use
            self.prepared = {key: p for key, p in self.prepared.items() if key in keys}
        if missing and not self.loader.fits(need):  # all or none: one rule, one line in the header
            self.prepared = {}
            return (f"head inputs computed per batch: preparing them would take {need / 2**20:,.0f} MiB more than "
                    f"fits on {self.loader.device}")
        t0 = time.perf_counter()
        self.prepared.update({key: PreparedInputs(resident, key) for key in missing})
        held = sum(self.prepared[key].nbytes for key in keys)
        reused = f", {len(keys) - len(missing)} of them reused" if len(missing) < len(keys) else ""
        return (f"head inputs prepared once in {time.perf_counter() - t0:.1f} s ({held / 2**20:,.0f} MiB for "
                f"{len(keys)} input setting{'s' if len(keys) > 1 else ''}{reused})")

    def inputs(self, batch: FlatBatch, heads: list[RegressionHead],
               wanted: torch.Tensor | None = None) -> dict[InputSpec, Any]:
        """The heads' inputs of `batch`; prepared ones hold only the slots `wanted` when given."""
        return inputs_for(batch, heads, self.prepared, wanted)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[FlatBatch]:
        return iter(self.loader)

    def sample(self, max_events: int = 20_000) -> FlatBatch:
        """The split's first events as one batch, for the heads' standardisation statistics: a head fits on the
        hits it pools (probability >= its threshold), the same whatever the source or its pruning."""
        return self.split.read(0, min(max_events, self.split.num_events)).to_flat()


def make_source(cfg: Config, split: str, info: DistInfo, *, shuffle: bool, min_threshold: float,
                device: torch.device) -> HeadSource:
    """`cache`: the stored split, held on `device` when it fits (`head_train.in_memory`), else read ahead from
    Zarr. `live`: the frozen stage-1 model run on the very events the cache loader would have put in each batch
    (same block order, rank shares, shuffle buffers and batch cuts), so both yield the same batches."""
    ht = cfg.head_train
    checkpoint = RunDir(cfg).assign_best
    loader_args = dict(batch_size=ht.batch_size, shuffle=shuffle, seed=cfg.seed, rank=info.rank,
                       world_size=info.world_size, shuffle_buffer=ht.shuffle_buffer)
    if ht.source == "cache":
        path = RunDir(cfg).cache_split(split)
        if not path.exists():
            raise CacheError(f"cache split {path} does not exist; run `hepreg export-embeddings` first")
        loader = CacheLoader(path, in_memory=ht.in_memory, min_threshold=min_threshold, device=device,
                             expect_checkpoint=checkpoint if checkpoint.is_file() else None, **loader_args)
        return HeadSource(loader.split, loader)
    from hepreg.frozen import FrozenAssigner, LiveSplit  # live

    if not checkpoint.is_file():
        raise HepregError(f"the live source needs the stage-1 checkpoint {checkpoint}; "
                          f"run `hepreg train-assign` first")
    live = LiveSplit(cfg, split, FrozenAssigner.from_checkpoint(checkpoint, device), min_threshold)
    return HeadSource(live, CacheLoader(live, in_memory="no", **loader_args))


def steps_per_epoch(source, info: DistInfo) -> int:
    """The same count on every rank (shares may differ by one event, so by one batch)."""
    n = torch.tensor([len(source)])
    if info.enabled:
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
    return int(n)


def epoch_batches(source: HeadSource, epoch: int, steps: int, device: torch.device) -> Iterator[FlatBatch]:
    """This rank's `steps` batches of the epoch, on `device`. A rank whose share ran out one batch early gets an
    empty batch instead, so that every rank takes part in every (DDP) step."""
    source.set_epoch(epoch)
    batches, batch = iter(source), None
    for _ in range(steps):
        nxt = next(batches, None)
        batch = batch.slice(batch.size, batch.size) if nxt is None else nxt.to(device, non_blocking=True)
        yield batch
