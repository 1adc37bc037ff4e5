"""Export benchmarks: they run the export stage, so they live with the stages, not in the cache.

- `export_throughput`: export events/s against the bare frozen forward over the same events.
- `cache_benchmarks`: that, plus bytes/event of float16 + pruned against float32 unpruned and the loader's
  read rates (`hepreg.cache.bench`).
"""
from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import torch

from hepreg.cache.bench import bytes_per_event, loader_throughput
from hepreg.data.batching import HitLoader
from hepreg.data.reader import open_dataset, split_ranges
from hepreg.runs.distributed import resolve_device
from hepreg.frozen import FrozenAssigner
from hepreg.runs.directory import RunDir
from hepreg.stages.export import run as export


def export_throughput(cfg, checkpoint: str | Path, *, split: str = "val", workdir: str | Path | None = None,
                      dtype: str | None = None, prune_threshold: float | None = None,
                      repeats: int = 2) -> dict[str, float]:
    """Events/s of `export-embeddings` on one split against the bare frozen forward over the same batches.

    The forward baseline reads the same blocks through the same loader and runs the model only (no matching,
    flattening or writing); `overhead` = export time / forward time - 1 (target <= 0.2). The two are
    measured alternately, `repeats` times each, and the fastest of each kept, so that a burst of load from
    other processes on a shared machine does not land on one side only.
    """
    assigner = FrozenAssigner.from_checkpoint(checkpoint, resolve_device(cfg.export.device))
    dataset = open_dataset(cfg.data.path, cfg.data.max_events)
    start, stop = split_ranges(len(dataset), cfg.data.val_fraction, cfg.data.test_fraction)[split]
    block = cfg.export.block_events

    def sweep(model: bool) -> float:
        t0 = time.perf_counter()
        for s in range(start, stop, block):
            for batch in HitLoader(dataset, s, min(s + block, stop), batch_size=cfg.export.batch_size,
                                   shuffle=False, seed=cfg.seed, bucket_window=cfg.data.bucket_window,
                                   batch_by=cfg.export.batch_by):
                if model:
                    assigner.forward(batch)
        if assigner.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    read_s, forward_s, export_s = sweep(model=False), [], []
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        c = copy.deepcopy(cfg)
        c.run_dir, c.name = tmp, "bench"
        for _ in range(repeats):
            forward_s.append(sweep(model=True))
            record = export(c, checkpoint=Path(checkpoint), splits=[split], dtype=dtype,
                            prune_threshold=prune_threshold, overwrite=True)[split]
            export_s.append(record["seconds"])  # the block loop: read, forward, match, flatten, write
    n = stop - start
    return {"events": n, "read_events_per_s": n / read_s, "forward_events_per_s": n / min(forward_s),
            "export_events_per_s": n / min(export_s), "overhead": min(export_s) / min(forward_s) - 1,
            "hits_kept": record["hits_kept"], "hits_seen": record["hits_seen"]}


def cache_benchmarks(cfg, checkpoint: str | Path, *, split: str = "train", workdir: str | Path,
                     batch_size: int = 2048, epochs: int = 2) -> dict[str, dict]:
    """All three measurements on one split: export against the bare forward, the loader against memmap (on
    the float16 + pruned cache), and bytes/event of float16 + pruned against float32 unpruned."""
    out = {"export": export_throughput(cfg, checkpoint, split=split, workdir=workdir)}
    for name, kw in (("float16_pruned", {}), ("float32_unpruned", {"dtype": "float32", "prune_threshold": 0.0})):
        c = copy.deepcopy(cfg)
        c.run_dir, c.name = str(workdir), f"cache-{name}"
        export(c, checkpoint=Path(checkpoint), splits=[split], overwrite=True, **kw)
        out[name] = bytes_per_event(RunDir(c).cache_split(split))
    out["loader"] = loader_throughput(RunDir(Path(workdir) / "cache-float16_pruned").cache_split(split),
                                      batch_size=batch_size, epochs=epochs)
    out["float32_vs_float16_bytes"] = (out["float32_unpruned"]["bytes_per_event"]
                                       / out["float16_pruned"]["bytes_per_event"])
    return out
