"""The batches a head trains on (`HeadSource`: a stored cache split or a live one), and the heads' inputs of a
stored split, computed once: the per-hit features, track frame and fit proxy of every slot.

What a head sees of a track (`hepreg.models.track_inputs`) is a deterministic function of its own event's
cached tensors, never of the head's weights: training recomputing it every batch of every epoch is waste, and
with the fit proxy it is the bulk of a cached step (the fit runs ~1,000 small tensor operations per bucket of
tracks). So it is computed once per export of a split and input setting, in chunks of `CHUNK_EVENTS`
consecutive events, and stored beside the split (`hepreg.cache.inputs`): flat, per slot its length, track
features and reference, per (hit, slot) pair its features, probability and hit row within the event. Every
later run, sweep member or tuning trial reads it back: held in memory (`PreparedInputs`) where the split is
held, or read ahead block by block (`StreamedInputs`) where the split is streamed from Zarr. A batch's
`BatchInputs` is then a few gathers, bucketed by track length exactly as `from_flat` buckets.

The values are those of `prepare` on the chunks: equal to a batch's own `prepare` up to float rounding (the
fit's sums run over different paddings), and identical from run to run, held or streamed, between a sweep
and its single runs, and between a pruned and an unpruned cache.
"""
from __future__ import annotations

import dataclasses
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from hepreg.cache.buffers import BufferPool
from hepreg.cache.inputs import InputsWriter, StoredInputs, inputs_path, open_inputs, writing
from hepreg.cache.loader import CacheLoader, CacheSplit
from hepreg.settings import Config
from hepreg.errors import CacheError, HepregError
from hepreg.flat import FlatBatch
from hepreg.models.head import RegressionHead, batch_inputs
from hepreg.models.track_inputs import BatchInputs, HeadInputs, InputSpec, feature_names, prepare
from hepreg.models.tracks import TrackBatch, TrackHits, bucket_bounds, from_flat
from hepreg.runs.directory import RunDir
from hepreg.runs.distributed import DistInfo, barrier

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


@dataclass
class InputArrays:
    """The heads' inputs of some events at one `InputSpec`, flat: per slot (event-major, N per event) and per
    (hit, slot) pair (by slot, then by the column the pair has in its track)."""
    event_id: Tensor        # [E] long
    length: Tensor          # [E·N] long: the pairs of each slot
    track_features: Tensor  # [E·N, F_track]
    reference: Tensor          # [E·N, 6] each slot's reference (q/pT, eta, phi) and scale
    features: Tensor        # [P, F_hit]
    prob: Tensor            # [P]
    hit: Tensor             # [P] long: the pair's hit, as its row within its event

    @staticmethod
    def concat(parts: list["InputArrays"]) -> "InputArrays":
        return InputArrays(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(InputArrays)))

    def as_numpy(self) -> dict[str, np.ndarray]:
        """The stored dtypes: hit rows within an event fit int32."""
        out = {f.name: getattr(self, f.name).numpy() for f in fields(self)}
        out["length"], out["hit"] = out["length"].astype(np.int32), out["hit"].astype(np.int32)
        return out

    @staticmethod
    def from_numpy(a: dict[str, np.ndarray]) -> "InputArrays":
        return InputArrays(**{f.name: torch.from_numpy(a[f.name]).long() if f.name in ("event_id", "length", "hit")
                              else torch.from_numpy(a[f.name]) for f in fields(InputArrays)})

    def to(self, device: torch.device) -> "InputArrays":
        return InputArrays(*(getattr(self, f.name).to(device) for f in fields(self)))

    def pairs_per_event(self, num_queries: int) -> np.ndarray:  # [E]
        return self.length.view(-1, num_queries).sum(1).numpy()


def compute_inputs(batch: FlatBatch, spec: InputSpec) -> InputArrays:
    """`prepare` on one batch, as flat arrays: the batch is bucketed without a row limit, so that the fit's
    ~1,000 tensor operations per bucket run on large tensors."""
    B, N = batch.size, batch.query_embed.shape[1]
    tracks = from_flat(batch.raw, batch.embed, batch.logit, batch.offsets, batch.query_embed, spec.threshold,
                       max_rows=B * N)
    x = prepare(tracks, spec.track_frame, spec.fit_proxy)
    event_start = batch.offsets[:-1]
    slots, cols, feats, probs, hits, slot_parts, track_parts, reference_parts = ([] for _ in range(8))
    for b, rows in zip(x.buckets, tracks.rows):
        r, c = b.tracks.mask.nonzero(as_tuple=True)  # [pairs] by row, then column
        slots.append(rows[r])
        cols.append(c)
        feats.append(b.hit_features[r, c])
        probs.append(b.tracks.prob[r, c])
        hits.append(b.tracks.hit[r, c] - event_start[rows[r] // N])
        slot_parts.append(rows)
        track_parts.append(b.track_features)
        reference_parts.append(b.reference)
    slot, col = torch.cat(slots), torch.cat(cols)
    width = int(col.max()) + 1 if col.numel() else 1
    pair_order = torch.argsort(slot * width + col)  # pairs by slot, then the column they had
    rows, track = torch.cat(slot_parts), torch.cat(track_parts)
    unheld = torch.cat([track.new_zeros(B * N, 3), track.new_ones(B * N, 3)], -1)  # reference 0, scale 1
    return InputArrays(
        event_id=batch.event_id.long(), length=torch.bincount(slot, minlength=B * N),
        track_features=track.new_zeros(B * N, track.shape[1]).index_copy(0, rows, track),
        reference=unheld.index_copy(0, rows, torch.cat(reference_parts)),
        features=torch.cat(feats)[pair_order], prob=torch.cat(probs)[pair_order], hit=torch.cat(hits)[pair_order])


class PreparedInputs:
    """`BatchInputs` of any batch whose events these arrays hold: a few gathers per bucket."""

    def __init__(self, a: InputArrays, num_queries: int, spare_row: bool = False):
        """`spare_row`: the pair arrays of `a` end with one row more, this one's to fill (no copy of them)."""
        self.num_queries = num_queries
        self.event_id = a.event_id  # [E]
        self.sorted_ids, self.position = a.event_id.sort()  # event id -> position in the arrays
        # one extra row at index P: what padding gathers (zeros, hit row -1)
        if spare_row:
            self.features, self.prob, self.hit = a.features, a.prob, a.hit  # [P + 1, F_hit], [P + 1], [P + 1]
            self.features[-1], self.prob[-1], self.hit[-1] = 0.0, 0.0, -1
        else:
            self.features = torch.cat([a.features, a.features.new_zeros(1, a.features.shape[1])])
            self.prob = torch.cat([a.prob, a.prob.new_zeros(1)])
            self.hit = torch.cat([a.hit, a.hit.new_full((1,), -1)])  # row within the event
        self.length = a.length  # [E·N]
        self.start = torch.cumsum(self.length, 0) - self.length
        self.track_features, self.reference = a.track_features, a.reference  # [E·N, F_track], [E·N, 6]
        self.num_pairs = int(self.prob.numel()) - 1

    @staticmethod
    def load(stored: StoredInputs, device: torch.device) -> "PreparedInputs":
        """Stored inputs of a whole split, into memory."""
        E = len(stored.first_pair) - 1
        arrays = InputArrays.from_numpy(stored.read([(0, E)], spare_pair_rows=1)).to(device)
        return PreparedInputs(arrays, stored.num_queries, spare_row=True)

    @staticmethod
    def held(resident, spec: InputSpec, chunk_events: int = CHUNK_EVENTS) -> "PreparedInputs":
        """For every event of a split held in memory (`hepreg.cache.resident`), in chunks of consecutive events."""
        order = np.arange(resident.num_events)
        parts = [compute_inputs(b, spec) for b in resident.batches(order, chunk_events)]
        return PreparedInputs(InputArrays.concat(parts), resident.tensors["query_embed"].shape[1])

    @property
    def num_events(self) -> int:
        return int(self.event_id.numel())

    def arrays_of(self, pos: Tensor) -> InputArrays:
        """The events at positions `pos` [B], as arrays of their own."""
        N = self.num_queries
        slot = (pos[:, None] * N + torch.arange(N, device=pos.device)).view(-1)  # [B·N]
        length = self.length[slot]
        total = int(length.sum())
        first = torch.cumsum(length, 0) - length
        pair = (torch.repeat_interleave(self.start[slot] - first, length, output_size=total)
                + torch.arange(total, device=pos.device))  # [pairs] their rows here, in slot order
        return InputArrays(self.event_id[pos], length, self.track_features[slot], self.reference[slot],
                           self.features[pair], self.prob[pair], self.hit[pair])

    @property
    def nbytes(self) -> int:
        tensors = (self.features, self.prob, self.hit, self.length, self.start, self.track_features, self.reference,
                   self.sorted_ids, self.position)
        return sum(x.numel() * x.element_size() for x in tensors)

    def find(self, event_id: Tensor) -> Tensor:
        """Positions of the events `event_id` [B]; -1 for one these arrays do not hold."""
        if not self.sorted_ids.numel():
            return torch.full_like(event_id, -1)
        idx = torch.searchsorted(self.sorted_ids, event_id).clamp_max(self.sorted_ids.numel() - 1)
        return torch.where(self.sorted_ids[idx] == event_id, self.position[idx], -1)

    def positions(self, event_id: Tensor) -> Tensor:
        """Positions of the events `event_id` [B]; a batch of another split is refused."""
        pos = self.find(event_id)
        if bool((pos < 0).any()):
            raise CacheError("a batch holds events that are not in the split its inputs were prepared for")
        return pos

    def inputs(self, batch: FlatBatch, wanted: Tensor | None = None) -> BatchInputs:
        """The batch's inputs, bucketed by track length as `from_flat` buckets them; only the slots `wanted`
        ([S] bool: the matched ones, the only ones training and validation read) when given."""
        N, dev = self.num_queries, self.length.device
        pos = self.positions(batch.event_id)  # [B]
        B = pos.numel()
        slot = (pos[:, None] * N + torch.arange(N, device=dev)).view(-1)  # [S] the arrays' slot of each slot
        lengths = self.length[slot]
        if wanted is None:
            order = torch.argsort(lengths, stable=True)
        else:
            held = wanted.nonzero()[:, 0]
            order = held[torch.argsort(lengths[held], stable=True)]
        sorted_lengths = lengths[order].cpu().numpy()
        bounds = bucket_bounds(sorted_lengths)
        query_embed = batch.query_embed.reshape(B * N, -1)
        event_start = batch.offsets[:-1]  # [B] each event's first hit row in the batch
        P, features, prob, hit = self.num_pairs, self.features, self.prob, self.hit
        buckets, tracks, rows_list = [], [], []
        for a, z in zip(bounds[:-1], bounds[1:]):
            rows = order[a:z]
            g = slot[rows]
            L = max(int(sorted_lengths[z - 1]) if z > a else 0, 1)
            col = torch.arange(L, device=dev)
            mask = col < self.length[g][:, None]  # [R, L]
            pair = torch.where(mask, self.start[g][:, None] + col, P)  # [R, L]
            h = torch.where(mask, event_start[rows // N][:, None] + hit[pair], -1)  # [R, L] the batch's hit row
            e = batch.embed.index_select(0, h.clamp_min(0).view(-1)).view(*h.shape, -1) * mask[..., None]
            t = TrackHits(raw=e.new_zeros(*h.shape, 0), embed=e, prob=prob[pair], mask=mask,
                          query_embed=query_embed.index_select(0, rows), hit=h)
            tracks.append(t)
            rows_list.append(rows)
            buckets.append(HeadInputs(t, features[pair], self.track_features[g], self.reference[g]))
        return BatchInputs(buckets, TrackBatch(tracks, rows_list, B, N), self.reference[slot])


def store_inputs(split: CacheSplit, spec: InputSpec, chunk_events: int = CHUNK_EVENTS) -> Path:
    """Compute the inputs of every event of a stored split, `chunk_events` at a time (as `PreparedInputs.held`
    does, so the numbers are the same), and write them beside it (`hepreg.cache.inputs`)."""
    hit_names, track_names = feature_names(spec.track_frame, spec.fit_proxy)
    setting = dataclasses.asdict(spec)
    N = int(split.read(0, 0).query_embed.shape[1])
    writer = InputsWriter(inputs_path(split, setting), split, setting,
                          {"hit": list(hit_names), "track": list(track_names)}, N)
    for a in range(0, split.num_events, chunk_events):
        x = compute_inputs(split.read(a, min(a + chunk_events, split.num_events)).to_flat(), spec)
        writer.append(x.event_id.numpy(), x.pairs_per_event(N), x.as_numpy())
    return writer.finish()


# the hit arrays a head reads only through its inputs (features, probabilities, hit rows): a split streamed with
# its inputs stored beside it skips them, ~60 % of the bytes per hit
SKIPPED_WHEN_STORED = frozenset({"raw", "logit", "index"})


class StreamedInputs:
    """Stored inputs read ahead in the order the loader reads the split's blocks (`CacheLoader.groups`).

    A thread reads each group of blocks' inputs and indexes them (`PreparedInputs`) before they are needed,
    and, as a pass ends, the next pass's first group (as the loader reads its blocks). A batch's events lie in
    one group, or, across a buffer's boundary, in the one before too: those few batches get their events'
    inputs gathered from both. A group is let go once every event of it was asked for. Each batch's inputs
    are the same gathers as from inputs prepared in memory, and the same numbers."""

    def __init__(self, stored: StoredInputs, loader: CacheLoader, depth: int = 2):
        self.stored, self.loader, self.depth = stored, loader, depth
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hepreg-inputs")
        self.buffers = BufferPool()  # each group's arrays, reused once a group is let go
        # groups read ahead: (the group's ranges, its read, whether it is the next pass's first)
        self.ahead: list[tuple[tuple, Future, bool]] = []
        self.todo, self.live, self.next_queued = [], [], False  # set by `start`, as each pass begins

    def start(self) -> None:
        """A new pass over the split (an epoch, or a validation): follow the loader's reading order from here,
        keeping the first group read ahead at the end of the last pass when it is this pass's first."""
        groups = [tuple(g) for g in self.loader.groups()]
        keep = [(g, f, False) for g, f, following in self.ahead[:1] if following and groups and g == groups[0]]
        for a in self.ahead[len(keep):]:
            a[1].cancel()
        self.ahead, self.todo = keep, groups[len(keep):]
        self.live: list[tuple[PreparedInputs, Tensor]] = []  # read groups with what of them was asked for
        self.next_queued = False
        self._fill()

    def next_pass_read(self) -> None:
        """Wait until what is read ahead (the next pass's first group, once this pass is read) is in memory."""
        for _, future, _ in self.ahead:
            future.result()

    def _read(self, group: tuple) -> PreparedInputs:
        read = self.stored.read(list(group), self.buffers.empty, spare_pair_rows=1)
        return PreparedInputs(InputArrays.from_numpy(read).to(self.loader.device), self.stored.num_queries,
                              spare_row=True)

    def _fill(self) -> None:
        while len(self.ahead) < self.depth:
            if self.todo:
                group, following = self.todo.pop(0), False
            elif not self.next_queued:  # this pass's groups are all read or reading: the next pass's first
                self.next_queued, following = True, True
                nxt = self.loader.next_pass_groups()
                if not nxt:
                    return
                group = tuple(nxt[0])
            else:
                return
            self.ahead.append((group, self.pool.submit(self._read, group), following))

    def _locate(self, event_id: Tensor) -> list[tuple[PreparedInputs, Tensor, Tensor]] | None:
        """(group, seen flags, positions) per live group holding some of the events; None if one is missing."""
        found, missing = [], torch.ones_like(event_id, dtype=torch.bool)
        for group, seen in self.live:
            pos = group.find(event_id)
            if bool((pos >= 0).any()):
                found.append((group, seen, pos))
                missing &= pos < 0
        return None if bool(missing.any()) else found

    def inputs(self, batch: FlatBatch, wanted: Tensor | None = None) -> BatchInputs:
        while (found := self._locate(batch.event_id)) is None:
            if not self.ahead or self.ahead[0][2]:
                raise CacheError(f"a batch holds events that are not in the head inputs stored at "
                                 f"{self.stored.path} (they do not follow the split's reading order)")
            group = self.ahead.pop(0)[1].result()
            self._fill()
            self.live = [(g, seen) for g, seen in self.live if not bool(seen.all())]
            self.live.append((group, torch.zeros(group.num_events, dtype=torch.bool, device=group.length.device)))
        for _, seen, pos in found:
            seen[pos[pos >= 0]] = True
        if len(found) == 1:
            return found[0][0].inputs(batch, wanted)
        parts = [g.arrays_of(pos[pos >= 0]) for g, _, pos in found]  # a batch across two groups
        return PreparedInputs(InputArrays.concat(parts), self.stored.num_queries).inputs(batch, wanted)


class HeadSource:
    """One split's batches for the head: `CacheLoader` over a stored cache split or a `LiveSplit` (each rank
    its own disjoint share), plus what the head is built from (targets, a sample of raw hits, the width)."""

    def __init__(self, split, loader: CacheLoader):
        self.split, self.loader = split, loader
        self.stage1_sha256 = split.checkpoint_sha256  # of the stage-1 checkpoint whose outputs these are
        self.dim = split.dim
        self.prepared: dict[InputSpec, PreparedInputs | StreamedInputs] = {}  # the heads' inputs, per input key, prepared once

    def prepare(self, heads: list[RegressionHead]) -> str | None:
        """The heads' inputs, computed once per export of the split and input setting and stored beside it
        (`hepreg.cache.inputs`): then held in memory where the split is and they fit beside it, else read
        ahead from disk as the split is streamed. Inputs of an earlier call are kept while the heads use them
        (the trials of `hepreg tune`). Says what was done; None for a live source, which computes them from
        each batch, as the baseline pays."""
        resident = self.loader.resident
        if resident is None and not isinstance(self.split, CacheSplit):
            return None
        keys = list(dict.fromkeys(h.input_key for h in heads))
        self.prepared = {key: p for key, p in self.prepared.items() if key in keys}
        missing = [key for key in keys if key not in self.prepared]
        settings = f"{len(keys)} input setting{'s' if len(keys) > 1 else ''}"
        if not missing:
            return f"head inputs of {settings} reused"
        t0 = time.perf_counter()
        stored, made = self._stored(missing) if isinstance(self.split, CacheSplit) else (None, "not a stored split")
        said = (f"stored once beside the split in {time.perf_counter() - t0:.1f} s" if made == "made" else
                "read from those stored beside the split" if stored else f"not stored ({made})")
        if resident is not None:
            need = sum(estimated_bytes(resident, key) for key in missing)
            if self.loader.has_room(need):
                for key in missing:
                    self.prepared[key] = (PreparedInputs.load(stored[key], self.loader.device) if stored
                                          else PreparedInputs.held(resident, key))
                held = sum(self.prepared[key].nbytes for key in keys)
                return f"head inputs of {settings} {said}, held in memory ({held / 2**20:,.0f} MiB)"
            said = f"{said}; holding them in memory would take {need / 2**20:,.0f} MiB more than fits"
        if stored is None:
            self.prepared = {}
            return f"head inputs computed per batch: {said}"
        self.prepared.update({key: StreamedInputs(stored[key], self.loader) for key in missing})
        if resident is None:  # every head reads its inputs from beside the split: its raw hits need not be read
            self.loader.skip = SKIPPED_WHEN_STORED
        return f"head inputs of {settings} {said}, read ahead from disk with the split"

    def _stored(self, keys: list[InputSpec]) -> tuple[dict[InputSpec, StoredInputs] | None, str]:
        """The stored inputs of `keys`, made by the first rank where this export of the split has none yet;
        (None, why) where they cannot be written (a read-only cache)."""
        made, error, found = "found", None, {}
        if not dist.is_initialized() or dist.get_rank() == 0:  # the others wait for it
            try:
                for key in keys:
                    setting = dataclasses.asdict(key)
                    with writing(self.split, setting):  # another process may be making it
                        found[key] = open_inputs(self.split, setting)
                        if found[key] is None:
                            store_inputs(self.split, key)
                            found[key], made = open_inputs(self.split, setting), "made"
            except OSError as e:
                error = f"{type(e).__name__}: {e}"
        barrier()
        for key in keys:  # the other ranks open what the first one found or made
            if found.get(key) is None:
                found[key] = open_inputs(self.split, dataclasses.asdict(key))
        if any(v is None for v in found.values()):
            return None, error or f"none beside {self.split.path}"
        return found, made

    def inputs(self, batch: FlatBatch, heads: list[RegressionHead],
               wanted: torch.Tensor | None = None) -> dict[InputSpec, Any]:
        """The heads' inputs of `batch`; prepared ones hold only the slots `wanted` when given."""
        return inputs_for(batch, heads, self.prepared, wanted)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def next_pass_read(self) -> None:
        """Wait for the reads a streamed split started for its next pass (nothing to wait for when held)."""
        self.loader.next_pass_read()
        for p in self.prepared.values():
            if isinstance(p, StreamedInputs):
                p.next_pass_read()

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[FlatBatch]:
        for p in self.prepared.values():
            if isinstance(p, StreamedInputs):
                p.start()
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
