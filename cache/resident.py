"""A cache split held on the training device, and pinned read-ahead for one that is not.

Held (`ResidentSplit`): the split's arrays live as tensors on the device (host RAM on CPU, GPU memory on
CUDA), loaded once through the split's own `read` (the same checked chunk reads as every other path), slice
by slice so that the host never holds the whole split on the way to a GPU. Per epoch the loader's event order
and the hit rows it implies are built once, on the device; a batch is then a few `index_select`s there: no
per-batch host→device copy, no Python per event, no host synchronisation.

Not held: the Zarr loader makes its batches in a background thread (`read_ahead`), and on CUDA
`prefetch_to_device` pins them there and starts their copies non-blocking one batch ahead, so the next batch
crosses the bus while the current one trains.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import fields
from typing import Iterable, Iterator

import numpy as np
import torch

from hepreg.flat import HIT_FIELDS, FlatBatch

# widened or cast on the device: match may be stored narrow, the head wants long / bool / float32
_AS = {"match": torch.int64, "event_id": torch.int64, "target_valid": torch.bool}


def resident_bytes(split) -> int:
    """Device bytes `ResidentSplit` needs: the decoded arrays plus one epoch's hit order (int64 per hit)."""
    return int(split.decoded_bytes() + 8 * split.num_hits() + 16 * split.num_events)


def fits_on_device(split, device: torch.device, world_size: int, available_host: int) -> bool:
    return fits_bytes(resident_bytes(split), device, world_size, available_host)


def fits_bytes(need: int, device: torch.device, world_size: int, available_host: int) -> bool:
    """Below half the free memory of the device (every rank on a node holds its own copy in host RAM; on
    CUDA each rank has its own GPU). Half, because the head's activations and the epoch order need room."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return need < free // 2
    return need * world_size < available_host // 2


class ResidentSplit:
    """All events of a split as device tensors in their stored dtypes (embeddings stay float16 if stored so,
    and are widened per batch)."""

    def __init__(self, split, device: torch.device | str, slice_events: int = 65536):
        self.device = torch.device(device)
        self.num_events = split.num_events
        first = split.read(0, 0)
        num_hits = split.num_hits()
        self.tensors: dict[str, torch.Tensor] = {}
        for f in fields(first):
            if f.name == "offsets":
                continue
            a = getattr(first, f.name)
            n = num_hits if f.name in HIT_FIELDS else self.num_events
            dtype = _AS.get(f.name, torch.from_numpy(np.empty(0, a.dtype)).dtype)
            self.tensors[f.name] = torch.empty((n,) + a.shape[1:], dtype=dtype, device=self.device)
        self.host_offsets = np.zeros(self.num_events + 1, np.int64)  # [E + 1], host copy for batch sizes
        for s in range(0, self.num_events, slice_events):
            e = min(s + slice_events, self.num_events)
            blk = split.read(s, e)
            h0 = int(self.host_offsets[s])
            self.host_offsets[s + 1:e + 1] = blk.offsets[1:] + h0
            h1 = int(self.host_offsets[e])
            for name, t in self.tensors.items():
                rows = slice(h0, h1) if name in HIT_FIELDS else slice(s, e)
                t[rows] = torch.from_numpy(np.ascontiguousarray(getattr(blk, name))).to(self.device)
        self.offsets = torch.from_numpy(self.host_offsets).to(self.device)  # [E + 1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values()) + self.offsets.numel() * 8

    def batches(self, order: np.ndarray, batch_size: int) -> Iterator[FlatBatch]:
        """FlatBatches (float32) of the events `order` [n] in that order, cut every `batch_size` events."""
        n = len(order)
        if n == 0:
            return
        counts = self.host_offsets[order + 1] - self.host_offsets[order]  # [n]
        epoch_off = np.zeros(n + 1, np.int64)  # [n + 1] hit offsets of the epoch's event sequence
        np.cumsum(counts, out=epoch_off[1:])
        dev = self.device
        order_d = torch.from_numpy(order.astype(np.int64)).to(dev)  # [n], once per epoch
        counts_d = torch.from_numpy(counts).to(dev)
        epoch_off_d = torch.from_numpy(epoch_off).to(dev)
        total = int(epoch_off[-1])
        # [total] source hit row of every hit of the epoch, in batch order
        hit_rows = (torch.repeat_interleave(self.offsets[order_d] - epoch_off_d[:-1], counts_d, output_size=total)
                    + torch.arange(total, device=dev))
        t = self.tensors
        for s in range(0, n, batch_size):
            e = min(s + batch_size, n)
            h0, h1 = int(epoch_off[s]), int(epoch_off[e])
            ev, hit = order_d[s:e], hit_rows[h0:h1]
            yield FlatBatch(
                raw=t["raw"].index_select(0, hit).float(), embed=t["embed"].index_select(0, hit).float(),
                logit=t["logit"].index_select(0, hit).float(), offsets=epoch_off_d[s:e + 1] - h0,
                query_embed=t["query_embed"].index_select(0, ev).float(),
                track_logit=t["track_logit"].index_select(0, ev).float(), match=t["match"].index_select(0, ev),
                targets=t["targets"].index_select(0, ev).float(), target_valid=t["target_valid"].index_select(0, ev),
                event_id=t["event_id"].index_select(0, ev), hit_index=t["hit_index"].index_select(0, hit).long())


def pinned(batch: FlatBatch) -> FlatBatch:
    return FlatBatch(**{f.name: None if getattr(batch, f.name) is None else getattr(batch, f.name).pin_memory()
                        for f in fields(batch)})


def read_ahead(items: Iterable, depth: int = 2) -> Iterator:
    """`items` made by a thread, `depth` ahead of the consumer; an error in the thread is raised in the
    consumer, and a consumer that stops early stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put(e)

    thread = threading.Thread(target=produce, daemon=True, name="hepreg-read-ahead")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)


def prefetch_to_device(batches: Iterable[FlatBatch], device: torch.device, depth: int = 2) -> Iterator[FlatBatch]:
    """Host batches made and pinned `depth` ahead by a thread; each copied non-blocking to `device` one batch
    before it is handed out, so the copy overlaps the previous step."""
    ahead = read_ahead((pinned(b) for b in batches), depth)
    nxt = next(ahead, None)
    while nxt is not None:
        cur = nxt.to(device, non_blocking=True)
        nxt = next(ahead, None)
        yield cur
