"""Cache read benchmarks that return numbers (the `hepreg bench` report formats them).

- `loader_throughput`: the loader alone (no training) reading a split from Zarr (on CUDA: pinned, copied
  non-blocking), held on the device (a batch is a gather there), held in host memory as numpy blocks (the
  previous in-memory path), and the same arrays read through numpy memmaps with the same shuffled block
  pattern (the floor any on-disk format can reach).
- `bytes_per_event`: the on-disk size of splits (e.g. float16 + pruning against float32 unpruned).
Benchmarks that run a stage (export) live with the stages, in `hepreg.stages.bench_export`.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from hepreg.cache.inspect import split_summary
from hepreg.cache.loader import CacheLoader, open_cache
from hepreg.flat import Block


class MemmapSplit:
    """A split's decoded arrays as .npy memmaps, read like `CacheSplit.read` (the baseline)."""

    def __init__(self, split, directory: str | Path):
        directory = Path(directory)
        block = split.read(0, split.num_events)
        self.arrays = {}
        for name in Block.__dataclass_fields__:
            np.save(directory / f"{name}.npy", getattr(block, name))
            self.arrays[name] = np.load(directory / f"{name}.npy", mmap_mode="r")
        self.num_events, self.block_events = split.num_events, split.block_events

    def read(self, start: int, stop: int) -> Block:
        views = Block(**self.arrays).slice(start, stop)
        return Block(**{name: np.asarray(a) for name, a in vars(views).items()})


def _epoch_rate(loader: CacheLoader, epochs: int) -> float:
    """Events/s of whole epochs; batches that end on a GPU count once their copies and gathers are done."""
    import torch

    cuda = loader.device.type == "cuda"
    events, t0 = 0, time.perf_counter()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            events += batch.size
    if cuda:
        torch.cuda.synchronize(loader.device)
    return events / (time.perf_counter() - t0)


def loader_throughput(split_path: str | Path, *, batch_size: int = 2048, epochs: int = 2,
                      shuffle_buffer: int = 8, device: str = "cpu") -> dict[str, float]:
    """Events/s of full shuffled epochs (batches as float32 FlatBatch on `device`) from Zarr, held on the
    device, held in host memory as numpy blocks, and memmap (the last two on the host)."""
    args = dict(batch_size=batch_size, shuffle=True, shuffle_buffer=shuffle_buffer)
    zarr_loader = CacheLoader(split_path, in_memory="no", device=device, **args)
    out = {"events": zarr_loader.split.num_events, "zarr_events_per_s": _epoch_rate(zarr_loader, epochs)}
    t0 = time.perf_counter()
    dev_loader = CacheLoader(split_path, in_memory="yes", device=device, **args)
    out["load_s"] = time.perf_counter() - t0
    out["device_events_per_s"] = _epoch_rate(dev_loader, epochs)
    del dev_loader
    held = open_cache(split_path)
    held.load()
    out["memory_events_per_s"] = _epoch_rate(CacheLoader(held, in_memory="no", **args), epochs)
    del held
    with tempfile.TemporaryDirectory() as tmp:
        mm_loader = CacheLoader(MemmapSplit(zarr_loader.split, tmp), in_memory="no", **args)
        out["memmap_events_per_s"] = _epoch_rate(mm_loader, epochs)
        del mm_loader
    out["zarr_vs_memmap"] = out["zarr_events_per_s"] / out["memmap_events_per_s"]
    return out


def bytes_per_event(split_path: str | Path) -> dict[str, float]:
    s = split_summary(split_path)
    return {"bytes_per_event": s["bytes_per_event"],
            "decoded_bytes_per_event": s["decoded_bytes"] / max(s["events"], 1),
            "compression_ratio": s["compression_ratio"], "hits_kept": s["hits_kept"], "hits_seen": s["hits_seen"],
            "dtype": s["dtype"], "prune_threshold": s["prune_threshold"]}
