"""Block loader for stage 2: contiguous event blocks from the cache, shuffled, as flat (CSR) batches.

Reads are always contiguous blocks of events (one zarr chunk along events): a single-event zarr read costs
~1 ms whatever its size (~100 events/s), a block read 20-40k events/s. Shuffling is two-level: block order
per epoch, then events within a buffer of `shuffle_buffer` blocks; both deterministic per (seed, epoch).
No DataLoader workers: reads are cheap next to the head step, and on two cores the workers' shared-memory
traffic costs more than it saves. A split that fits the training device's memory is held there as tensors
(`hepreg.cache.resident`; on CPU measured ~10x the Zarr path's events/s and ~3-4x numpy blocks held in RAM,
16k events of ~43 hits, batches of 512-2048). Otherwise one background thread reads, shuffles and cuts the
blocks into batches ahead of the training step, and reads the next pass's first buffer while the last one is
consumed (`hepreg bench` measures the streamed rate against the held one).
"""
from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import fields
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch

from hepreg.cache import store
from hepreg.cache.buffers import BufferPool
from hepreg.cache.resident import ResidentSplit, fits_bytes, fits_on_device, prefetch_to_device, read_ahead
from hepreg.data.layout import TARGETS
from hepreg.runs.digest import sha256_file
from hepreg.runs.distributed import contiguous_range
from hepreg.errors import CacheError
from hepreg.flat import HIT_FIELDS, Block, FlatBatch


class Split(Protocol):
    """What `CacheLoader` iterates over: `num_events` events in dataset order, read as contiguous ranges.

    Implemented by a stored cache split (`CacheSplit`), by the frozen stage-1 model run on demand
    (`hepreg.frozen.LiveSplit`, the live head source) and by the bench's baselines; `tests/test_split.py`
    runs one suite against the first two.
    """
    num_events: int
    block_events: int  # events per stored block: the loader reads, and shuffles, whole blocks

    def read(self, start: int, stop: int) -> Block:
        """Events [start, stop) (start < stop), in dataset order."""
        ...


class CacheSplit:
    """One complete split: its provenance and contiguous reads over all its parts as one event sequence."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.attrs = store.read_meta(self.path)
        if not self.attrs.get("complete"):
            raise CacheError(f"cache split {self.path} is incomplete (an export was interrupted or is running); "
                             f"rerun export-embeddings to finish it")
        self.parts = [store.open_part(self.path, i) for i in range(len(self.attrs["parts"]))]
        self._arrays = []  # opened once (each open reads its zarr.json); every read goes through CheckedArray
        for i, p in enumerate(self.parts):
            part_dir = self.path / store.part_name(i)
            try:
                arrays = {f"{sub}/{k}": a for sub in ("hits", "events", "targets") for k, a in p[sub].arrays()}
            except Exception as e:  # noqa: BLE001  (a damaged zarr.json of an array or group)
                raise CacheError(f"cache split {self.path}: the array metadata (zarr.json files) under {part_dir} "
                                 f"cannot be read ({type(e).__name__}: {e}); re-export it with --overwrite") from None
            store.check_chunks(part_dir, arrays)
            self._arrays.append({k: store.CheckedArray(a, part_dir, k) for k, a in arrays.items()})
        self.bounds = [(p["start"], p["stop"]) for p in self.attrs["parts"]]  # split-local event ranges
        self.num_events = int(self.attrs["num_events"])
        if self.num_events == 0:
            raise CacheError(f"cache split {self.path} holds no events; re-export it from a config whose split "
                             f"is not empty")
        self.block_events = int(self.attrs["block_events"])
        self._memory: Block | None = None  # set by `load`

    @property
    def prune_threshold(self) -> float:
        return float(self.attrs["prune_threshold"])

    @property
    def checkpoint_sha256(self) -> str:
        return self.attrs["checkpoint_sha256"]

    @property
    def dim(self) -> int:
        """Width of the stored embeddings."""
        return int(self.parts[0]["events/query_embed"].shape[-1])

    def targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All targets of the split ([E, P, 4], valid [E, P]), without reading any hit."""
        t = np.stack([self.column(f"targets/{n}") for n in TARGETS], -1)
        return torch.from_numpy(t).float(), torch.from_numpy(self.column("targets/valid")).bool()

    def decoded_bytes(self) -> int:
        return sum(int(a.nbytes) for arrays in self._arrays for a in arrays.values())

    def num_hits(self) -> int:
        return sum(int(a["events/hit_offsets"][-1]) for a in self._arrays)

    def _read_part(self, i: int, s: int, e: int, skip: frozenset[str] = frozenset()) -> Block:
        """Part-local events [s, e) of part i; the hit arrays in `skip` read as zero-width (index: None)."""
        g = self._arrays[i]
        off = g["events/hit_offsets"][s:e + 1]
        h0, h1 = int(off[0]), int(off[-1])

        def hits(name: str):
            if name not in skip:
                return g[f"hits/{name}"][h0:h1]
            return None if name == "index" else np.zeros((h1 - h0, 0), g[f"hits/{name}"].dtype)

        targets = np.stack([g[f"targets/{t}"][s:e] for t in TARGETS], -1)  # [B, P, 4]
        return Block(hits("raw"), g["hits/embed"][h0:h1], hits("logit"), off - h0,
                     g["events/query_embed"][s:e], g["events/track_logit"][s:e], g["events/match"][s:e],
                     targets, g["targets/valid"][s:e], g["events/event_id"][s:e], hits("index"))

    def read(self, start: int, stop: int, skip: frozenset[str] = frozenset()) -> Block:
        """Events [start, stop) of the split, across part boundaries, in order. `skip`: hit arrays (raw, logit,
        index) not read, for a reader whose heads take their inputs from those stored beside the split."""
        if self._memory is not None:
            return self._memory.slice(start, stop)
        out = []
        for i, (ps, pe) in enumerate(self.bounds):
            s, e = max(start, ps), min(stop, pe)
            if s < e:
                out.append(self._read_part(i, s - ps, e - ps, skip))
        if not out:
            return self._read_part(0, 0, 0, skip)
        return Block.concat(out)

    def load(self, slice_events: int = 65536) -> None:
        """Hold the whole split in memory, read in large slices (many chunks per call decode in parallel)."""
        if self._memory is not None:
            return
        # filled in place, so the peak is the split plus one slice, not twice the split
        first = self.read(0, 0)
        num_hits = self.num_hits()
        n = self.num_events
        out = Block(**{f.name: np.empty(((num_hits if f.name in HIT_FIELDS else n),)
                                        + getattr(first, f.name).shape[1:], getattr(first, f.name).dtype)
                       for f in fields(Block) if f.name != "offsets"}, offsets=np.zeros(n + 1, np.int64))
        for s in range(0, n, slice_events):
            e = min(s + slice_events, n)
            blk = self.read(s, e)
            h0, h1 = out.offsets[s], out.offsets[s] + blk.offsets[-1]
            out.offsets[s + 1:e + 1] = blk.offsets[1:] + h0
            for f in fields(Block):
                if f.name in HIT_FIELDS:
                    getattr(out, f.name)[h0:h1] = getattr(blk, f.name)
                elif f.name != "offsets":
                    getattr(out, f.name)[s:e] = getattr(blk, f.name)
        self._memory = out

    def column(self, name: str) -> np.ndarray:
        """One per-event array (e.g. `targets/pt`) over the whole split, read through the checked path."""
        return np.concatenate([a[name][:] for a in self._arrays])


def _available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def open_cache(split_path: str | Path, *, expect_checkpoint: str | Path | None = None,
               min_threshold: float | None = None) -> CacheSplit:
    """Open a complete split, refusing one made from another checkpoint or pruned above `min_threshold`.

    expect_checkpoint: a checkpoint file or its sha256. min_threshold: the lowest assignment threshold the
    consumer will pool with; hits below the cache's prune threshold are gone, so it may not be lower.
    """
    split = CacheSplit(split_path)
    if expect_checkpoint is not None:
        expected, name = str(expect_checkpoint), str(expect_checkpoint)
        if Path(expected).is_file():
            expected = sha256_file(expected)
            name = f"{expect_checkpoint} (sha256 {expected[:12]})"
        if expected != split.checkpoint_sha256:
            raise CacheError(f"cache split {split.path} was made from checkpoint {split.attrs['checkpoint']} "
                             f"(sha256 {split.checkpoint_sha256[:12]}), but checkpoint {name} is expected; "
                             f"re-export the cache from it")
    if min_threshold is not None and min_threshold < split.prune_threshold:
        raise CacheError(f"cache split {split.path} was pruned at threshold {split.prune_threshold:g}: hits "
                         f"below it are not stored, so a head threshold of {min_threshold:g} cannot be used; "
                         f"re-export with --prune-threshold {min_threshold:g} (or 0)")
    return split


class CacheLoader:
    """Iterates one split as FlatBatch (float32) batches; with several ranks, each gets a disjoint share.

    `device`: where batches are wanted (default the host). With `in_memory` yes, or auto and the split fits
    the device's memory, the split is held there (`ResidentSplit`) and a batch is a gather on the device;
    otherwise blocks are read from Zarr, and on CUDA pinned and copied non-blocking one batch ahead. Both
    modes yield the same events in the same batches (`epoch_order`).

    Per epoch the block order is permuted by rng(seed, epoch), identically on every rank; rank r takes the
    r-th contiguous share of that event sequence (shares differ by at most one event), reads it block by
    block, and permutes events within buffers of `shuffle_buffer` blocks with rng(seed, epoch, rank).
    Every event is seen exactly once per epoch across all ranks. Only the last batch may be short.
    """

    def __init__(self, split: Split | str | Path, *, batch_size: int, shuffle: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, in_memory: str | bool = "auto", shuffle_buffer: int = 8,
                 expect_checkpoint: str | Path | None = None, min_threshold: float | None = None,
                 device: torch.device | str | None = None):
        """`split`: a stored split's path (opened by `open_cache`, with its checks), or any `Split`. Only a
        stored split can be held on the device: one computed on demand (`in_memory` auto) never is."""
        if in_memory not in ("auto", "yes", "no", True, False):
            raise CacheError(f"in_memory must be auto, yes or no, not {in_memory!r}")
        if isinstance(split, (str, Path)):
            split = open_cache(split, expect_checkpoint=expect_checkpoint, min_threshold=min_threshold)
        self.split = split
        self.device = torch.device(device if device is not None else "cpu")
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.epoch = 0
        # hit arrays a streamed stored split need not read: its heads' inputs come from beside it (HeadSource)
        self.skip: frozenset[str] = frozenset()
        self.resident: ResidentSplit | None = None
        self._pool: ThreadPoolExecutor | None = None  # reads the next pass's first group (`_read_next_pass`)
        self._ahead: tuple[tuple, Future] | None = None
        self._buffers = BufferPool()  # a streamed group's arrays, reused from group to group
        hold = in_memory in ("yes", True) or (in_memory == "auto" and isinstance(split, CacheSplit)
                                               and self._fits_in_memory())
        if hold and not isinstance(split, CacheSplit):
            raise CacheError(f"only a stored cache split can be held in memory, not a {type(split).__name__}")
        if hold:
            self.resident = ResidentSplit(split, self.device)

    @property
    def in_memory(self) -> bool:
        """The split is held on the device."""
        return self.resident is not None

    @property
    def attrs(self) -> dict:
        return self.split.attrs

    def _fits_in_memory(self) -> bool:
        return fits_on_device(self.split, self.device, self.world_size, _available_memory())

    def has_room(self, nbytes: int) -> bool:
        """`nbytes` more would fit on the device, by the rule that decides whether a split is held there."""
        return fits_bytes(nbytes, self.device, self.world_size, _available_memory())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _share(self) -> tuple[int, int]:
        return contiguous_range(self.split.num_events, self.rank, self.world_size)

    def __len__(self) -> int:
        s, e = self._share()
        return math.ceil((e - s) / self.batch_size)

    def ranges(self, epoch: int | None = None) -> list[tuple[int, int]]:
        """This rank's event ranges for the current epoch (or `epoch`), in reading order (at most one block
        each)."""
        n, b = self.split.num_events, self.split.block_events
        blocks = [(s, min(s + b, n)) for s in range(0, n, b)]
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch if epoch is None else epoch])
            order = rng.permutation(len(blocks))
            blocks = [blocks[i] for i in order]
        lo, hi = self._share()
        out, pos = [], 0
        for s, e in blocks:  # cut the permuted event sequence to positions [lo, hi)
            a, z = max(lo - pos, 0), min(hi - pos, e - s)
            if a < z:
                out.append((s + a, s + z))
            pos += e - s
        return out

    def epoch_order(self) -> np.ndarray:
        """This rank's events of the current epoch [n], in the order `__iter__` yields them: the ranges of
        `ranges()` grouped `shuffle_buffer` at a time, each group permuted by rng(seed, epoch, rank)."""
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        out = []
        for ranges in self.groups():
            group = np.concatenate([np.arange(s, e) for s, e in ranges])
            out.append(group[rng.permutation(len(group))] if self.shuffle else group)
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def __iter__(self) -> Iterator[FlatBatch]:
        if self.resident is not None:
            return self.resident.batches(self.epoch_order(), self.batch_size)
        if self.device.type == "cuda":
            return prefetch_to_device(self._read_batches(), self.device)
        return self._read_batches()

    def groups(self, epoch: int | None = None) -> list[list[tuple[int, int]]]:
        """`ranges()` as they are read: `shuffle_buffer` at a time, each group's events shuffled together."""
        ranges = self.ranges(epoch)
        return [ranges[i:i + self.shuffle_buffer] for i in range(0, len(ranges), self.shuffle_buffer)]

    def next_pass_groups(self) -> list[list[tuple[int, int]]]:
        """`groups()` of the pass after this one: the next epoch's, or the same again without shuffling."""
        return self.groups(self.epoch + 1 if self.shuffle else self.epoch)

    def next_pass_read(self) -> None:
        """Wait until the next pass's first group, read ahead as this one ended, is in memory (what a training
        loop's validation overlaps; `hepreg bench` counts the wait in the epoch that started the read)."""
        if self._ahead is not None:
            self._ahead[1].result()

    def _read_batches(self) -> Iterator[FlatBatch]:
        """Host batches read from the split block by block, in `epoch_order`, made by a thread ahead of use."""
        return read_ahead(self._make_batches(), depth=4)

    def _read_group(self, group: list[tuple[int, int]]) -> Block:
        skip = {"skip": self.skip} if self.skip else {}  # only a stored split is told to skip arrays
        return Block.concat([self.split.read(s, e, **skip) for s, e in group], self._buffers.empty)

    def _group(self, group: list[tuple[int, int]]) -> Block:
        """One group's blocks: the one read ahead at the end of the previous pass when it is this one."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == (tuple(group), self.skip):
            return ahead[1].result()
        return self._read_group(group)

    def _read_next_pass(self) -> None:
        """Start reading the next pass's first group while this pass's last group is consumed and validated:
        the next pass then starts at once, instead of waiting for a whole buffer of blocks. Costs one buffer of
        memory, and one read after the last pass. Only for a stored split: a live split's "read" is stage 1
        itself, which the baseline it is must pay inside its own epochs."""
        if not isinstance(self.split, CacheSplit):
            return
        nxt = self.next_pass_groups()
        if nxt:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hepreg-next-pass")
            self._ahead = ((tuple(nxt[0]), self.skip), self._pool.submit(self._read_group, nxt[0]))

    def _make_batches(self) -> Iterator[FlatBatch]:
        """Each group of blocks read, permuted and cut into batches after the previous group's leftover events.
        Only a batch's own events are gathered (`take`), never the whole buffer: a buffer-sized copy per group
        costs page faults and memory traffic that the training step would wait for."""
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        bs, carry = self.batch_size, None  # carry: the events of the last group that made no full batch
        groups = self.groups()
        for i, group in enumerate(groups):
            buf = self._group(group)
            if i == len(groups) - 1:
                self._read_next_pass()
            order = rng.permutation(buf.size) if self.shuffle else np.arange(buf.size)
            c = 0 if carry is None else carry.size
            n = c + buf.size  # the sequence: carry's events, then buf's in `order`

            def cut(a: int, z: int) -> Block:  # events [a, z) of the sequence, gathered into a new block
                parts = [carry.slice(a, min(z, c))] if a < c else []
                if z > c:
                    parts.append(buf.take(order[max(a - c, 0):z - c]))
                return Block.concat(parts)

            full = n - n % bs
            for a in range(0, full, bs):
                yield cut(a, a + bs).to_flat(copy=False)
            carry = cut(full, n) if full < n else None
        if carry is not None:
            yield carry.to_flat(copy=False)
