"""`hepreg predict`: the frozen stage 1 and a trained head over a split or any dataset, one HDF5 file out.

Events go block by block (`data.block_events`): a block is read, run through the frozen model in hit-count
buckets (or read from the cache when `--from cache` and the split was exported), put back in dataset order
and appended to the file, so memory stays that of one block whatever the number of events. Each block is
committed (see `hepreg.evaluation.predictions`), so an interrupted run continues where it stopped. Under torchrun each
rank takes a contiguous run of whole blocks into its own part; rank 0 merges the parts into one file.
"""
from __future__ import annotations

import dataclasses
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

from hepreg.cache.loader import open_cache
from hepreg.cache.store import check_dataset
from hepreg.settings import Config, PredictSource
from hepreg.data.reader import open_dataset, split_ranges
from hepreg.runs.digest import sha256_file
from hepreg.runs.distributed import barrier, contiguous_range, dist_info, init_distributed, resolve_device, shutdown
from hepreg.errors import ConfigError, HepregError
from hepreg.evaluation.predictions import (ASSIGN_THRESHOLD, FORMAT, FORMAT_VERSION, PredictionWriter,
                                is_predictions, merge, track_columns)
from hepreg.runs.progress import console, progress
from hepreg.runs.files import check_output_file, stage_lock
from hepreg.runs.directory import RunDir
from hepreg.trained import load_trained, model_paths



def default_output(cfg: Config, split: str | None, data: Path | None) -> Path:
    return RunDir(cfg).predictions(Path(data).name if data is not None else split)


def run(cfg: Config, *, split: str | None = None, data: Path | None = None, head: Path | None = None,
        out: Path | None = None, source: PredictSource = "hdf5", checkpoint: Path | None = None,
        overwrite: bool = False, model: Path | None = None) -> Path:
    """Predict every event of `split` (default eval.split) of cfg.data.path, or of all of dataset `data`; with the
    run's stage 1 and head, or `model` (a fine-tuned checkpoint holding both)."""
    if data is not None and split is not None:
        raise ConfigError("give either --split (a split of the config's dataset) or --data (a whole dataset)")
    split = None if data is not None else (split or cfg.eval.split)
    if source == "cache" and data is not None:
        raise ConfigError("--from cache reads an exported split of the config's dataset; it cannot be used "
                          "with --data")
    out = Path(out) if out is not None else default_output(cfg, split, data)
    check_output_file(out, overwrite, is_predictions, "a predictions file hepreg wrote")
    checkpoint, head_path = model_paths(cfg, checkpoint, head, model)
    device = resolve_device(cfg.head_train.device)
    with stage_lock(out.parent, name=f".{out.name}.lock", held=dist_info().is_main):  # one writer per output
        info = init_distributed(device)
        device = resolve_device(cfg.head_train.device, info.local_rank)
        try:
            return _predict(cfg, split, Path(data or cfg.data.path), data is not None, head_path, checkpoint, out,
                            source, device, info)
        finally:
            shutdown()


def _predict(cfg, split, data, whole, head_path, checkpoint, out, source, device, info) -> Path:
    assigner, head = load_trained(checkpoint, head_path, device)
    dataset = open_dataset(data, None if whole else cfg.data.max_events)
    start, stop = (0, len(dataset)) if whole else split_ranges(len(dataset), cfg.data.val_fraction,
                                                                cfg.data.test_fraction)[split]
    cache = None
    if source == "cache":
        cache = open_cache(RunDir(cfg).cache_split(split), expect_checkpoint=assigner.checkpoint_sha256,
                           min_threshold=head.cfg.threshold)
        check_dataset(cache.path, dataset.fingerprint(), data)  # the outputs of these very events
        if cache.prune_threshold > ASSIGN_THRESHOLD or cache.num_events != stop - start:
            raise HepregError(f"cache split {cache.path} ({cache.num_events} events, pruned at "
                              f"{cache.prune_threshold:g}) cannot give the hits of the {stop - start} events of the "
                              f"{split} split at threshold {ASSIGN_THRESHOLD}; re-export it or use --from hdf5")
    block = cfg.data.block_events
    num_blocks = -(-(stop - start) // block)
    b0, b1 = contiguous_range(num_blocks, info.rank, info.world_size)
    first, last = start + min(b0 * block, stop - start), start + min(b1 * block, stop - start)  # this rank's
    head_sha = sha256_file(head_path)
    data_sha256 = dataset.fingerprint()
    plan = {"stage1_sha256": assigner.checkpoint_sha256, "head_sha256": head_sha, "data": str(data),
            "data_sha256": data_sha256,
            "events": [first, last], "block_events": block, "source": source, "split": split}
    attrs = {"format": FORMAT, "format_version": FORMAT_VERSION, "hepreg_version": _version(),
             "stage1_checkpoint": str(checkpoint), "stage1_sha256": assigner.checkpoint_sha256,
             "head_checkpoint": str(head_path), "head_sha256": head_sha, "head_config": dataclasses.asdict(head.cfg),
             "config": cfg.to_dict(), "data": str(data), "data_sha256": data_sha256, "split": split or "", "event_range": [start, stop],
             "source": source, "has_truth": dataset.has_truth, "assign_threshold": ASSIGN_THRESHOLD,
             "num_queries": assigner.config.model.num_queries, "targets": ["pt", "eta", "phi", "q"]}
    part = out if not info.enabled else out.with_name(f"{out.name}.rank{info.rank:04d}-of-{info.world_size:04d}")
    writer = PredictionWriter(part, plan, attrs)
    if writer.events_done and info.is_main:
        console.print(f"continuing the interrupted prediction in {writer.tmp} at event {first + writer.events_done}")
    t0, done0 = time.perf_counter(), writer.events_done
    try:
        with progress() as p:
            task = p.add_task(f"predict {split or data.name}", total=last - first, completed=writer.events_done)
            for s in range(first + writer.events_done, last, block):
                e = min(s + block, last)
                outputs = (cache.read(s - start, e - start) if cache is not None
                           else assigner.run_events(dataset, s, e, cfg)[0])  # every hit kept: the hit lists need them
                rows = _block_rows(outputs, head, dataset, s, device)
                writer.append(rows)
                p.update(task, advance=e - s)
        path = writer.finish()
    finally:
        writer.close()
    barrier()
    if info.enabled:
        if info.is_main:
            parts = [out.with_name(f"{out.name}.rank{r:04d}-of-{info.world_size:04d}") for r in range(info.world_size)]
            merge(parts, out)
        barrier()
        path = out
    secs = time.perf_counter() - t0
    if info.is_main:
        n = last - first - done0
        console.print(f"predicted {stop - start:,} events ({n / max(secs, 1e-9):,.0f} events/s"
                      f"{'' if not info.enabled else ' on rank 0'}) -> {path}")
    return path


def _block_rows(block, head, dataset, first: int, device) -> dict[str, np.ndarray]:
    """The predictions file's rows of a block of frozen outputs (the cache's, or the model's run on the block's
    events), events `first`, `first + 1`, ... of the dataset in order."""
    with torch.inference_mode():
        rows = track_columns(head, block.to_flat().to(device), dataset.has_truth)
    n = rows["events/event_id"].shape[0]
    rows["events/index"] = np.arange(first, first + n, dtype=np.int64)
    rows["events/num_hits"] = dataset.hit_counts[first:first + n].astype(np.int32)
    return rows


def _version() -> str:
    try:
        return version("hepreg")
    except PackageNotFoundError:
        return "unknown"
