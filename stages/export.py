"""`hepreg export-embeddings`: run the frozen stage-1 model once over each split and write the Zarr cache.

Each split is cut into blocks of `export.block_events` events. Under torchrun, rank r owns a contiguous run
of whole blocks and writes them into its own part of the split, so block boundaries (and hence every
forward batch) are the same whatever the number of ranks, and no chunk is written by two processes. Within
a block, events are batched by the data loader (bucketed by hit count) and put back in dataset order before
writing. A block is the unit of resumption: the writer records each one as it lands.
"""
from __future__ import annotations

import dataclasses
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import torch.distributed as dist
import zarr

from hepreg.cache import store
from hepreg.cache.schema import SCHEMA_VERSION
from hepreg.cache.writer import PartWriter, begin_split, finish_split, is_complete_as
from hepreg.config import build_dataclass
from hepreg.settings import Config, ExportConfig
from hepreg.data.layout import RAW_FEATURES, TARGETS
from hepreg.data.reader import open_dataset, split_ranges
from hepreg.runs.distributed import DistInfo, barrier, contiguous_range, dist_info, started
from hepreg.errors import CacheError, ConfigError, HepregError
from hepreg.frozen import FrozenAssigner
from hepreg.runs.outputs import Replacement, replacing
from hepreg.runs.progress import console, progress
from hepreg.runs.directory import RunDir
from hepreg.runs.files import stage_lock



def run(cfg: Config, *, checkpoint: Path | None = None, splits: list[str] | None = None, dtype: str | None = None,
        prune_threshold: float | None = None, overwrite: bool = False) -> dict[str, dict]:
    """Export the requested splits; returns each split's completion record. `splits`, `dtype`, `prune_threshold`
    override cfg.export's, checked as the config loader checks them."""
    given = {"splits": splits, "dtype": dtype, "prune_threshold": prune_threshold}
    cfg.export = e = build_dataclass(ExportConfig, {**dataclasses.asdict(cfg.export),
                                                    **{k: v for k, v in given.items() if v is not None}}, "export")
    if e.prune_threshold is None:
        e.prune_threshold = cfg.head.threshold

    with stage_lock(RunDir(cfg).cache, held=dist_info().is_main), started(e.device) as (device, info), \
            replacing(info.is_main) as replaced:
        return _export(cfg, Path(checkpoint or RunDir(cfg).assign_best), overwrite, device, info, replaced)


def _export(cfg: Config, checkpoint: Path, overwrite: bool, device: torch.device, info: DistInfo,
            replaced: Replacement) -> dict:
    assigner = FrozenAssigner.from_checkpoint(checkpoint, device)
    dataset = open_dataset(cfg.data.path, cfg.data.max_events)
    ranges = split_ranges(len(dataset), cfg.data.val_fraction, cfg.data.test_fraction)
    empty = [s for s in cfg.export.splits if ranges[s][1] <= ranges[s][0]]
    if empty:
        raise ConfigError(f"the {empty[0]} split of {cfg.data.path} is empty ({len(dataset)} events, "
                          f"data.val_fraction={cfg.data.val_fraction}, data.test_fraction={cfg.data.test_fraction}); "
                          f"an empty cache would be trained on as if complete: change the fractions or leave "
                          f"{empty[0]} out of --splits")
    dataset_sha256 = _on_rank0(info, dataset.fingerprint)  # hashes every input file: once, not once per rank
    metas = {split: _provenance(cfg, assigner, checkpoint, dataset, dataset_sha256, split, *ranges[split],
                                info.world_size) for split in cfg.export.splits}
    paths = {split: RunDir(cfg).cache_split(split) for split in cfg.export.splits}
    # an export stopped after some splits continues with the rest (all complete: begin_split refuses)
    done = set() if overwrite else {s for s in metas if is_complete_as(paths[s], metas[s])}
    records = {}
    for split in cfg.export.splits:
        start, stop = ranges[split]
        path, meta = paths[split], metas[split]
        if split in done and len(done) < len(metas):
            records[split] = store.read_meta(path)["complete"]
            if info.is_main:
                console.print(f"{split}: already complete with these settings, kept ({path})")
            continue
        resumed = _on_rank0(info, lambda: _begin(path, meta, overwrite, replaced))
        if resumed and info.is_main:
            console.print(f"{split}: continuing the interrupted export in {path}")
        part = meta["parts"][info.rank]
        writer = _part_writer(path, info.rank, part, meta, resumed)
        t0 = time.perf_counter()
        _write_part(writer, assigner, dataset, start + part["start"], cfg, split)
        writer.finish()
        barrier()
        secs = time.perf_counter() - t0  # this invocation's block loop (all of it unless resumed)
        record = _on_rank0(info, lambda: finish_split(path, {
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "world_size": info.world_size,
            "seconds": round(secs, 3)}))
        records[split] = record
        replaced.commit(path)  # the new split is complete: the one it replaces may go
        if info.is_main:
            kept = f"{record['hits_kept']:,} of {record['hits_seen']:,} hits kept" + (
                f" ({100 * record['hits_kept'] / record['hits_seen']:.1f}%)" if record["hits_seen"] else "")
            console.print(f"{split}: {record['events']:,} events, {kept} at prune threshold "
                          f"{meta['prune_threshold']:g}, {store.disk_bytes(path) / 2**20:.1f} MiB "
                          f"({secs:.1f} s) -> {path}")
    return records


def _begin(path: Path, meta: dict, overwrite: bool, replaced: Replacement) -> bool:
    """Start (or continue) writing a split; --overwrite sets an earlier split aside until the new one is complete."""
    if overwrite:
        replaced.directory(path, store.split_problem, "cache splits")
    return begin_split(path, meta, overwrite=overwrite)


def _provenance(cfg: Config, assigner: FrozenAssigner, checkpoint: Path, dataset, dataset_sha256: str, split: str,
                start: int, stop: int, world_size: int) -> dict:
    e = cfg.export
    num_events = stop - start
    num_blocks = -(-num_events // e.block_events)
    parts = []
    for r in range(world_size):  # whole blocks per rank: the same blocks whatever the world size
        b0, b1 = contiguous_range(num_blocks, r, world_size)
        parts.append({"start": min(b0 * e.block_events, num_events), "stop": min(b1 * e.block_events, num_events)})
    model = assigner.config.model
    return {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": str(checkpoint), "checkpoint_sha256": assigner.checkpoint_sha256,
        "config": cfg.to_dict(), "config_sha256": cfg.fingerprint(),
        "stage1_config": assigner.config.to_dict(),
        "dataset": {"path": str(cfg.data.path), "fingerprint": dataset_sha256, "num_events": len(dataset)},
        "split": split, "event_range": [start, stop], "num_events": num_events,
        "features": list(RAW_FEATURES), "targets": list(TARGETS),
        "dtypes": {"hits/embed": e.dtype, "events/query_embed": e.dtype, "hits/raw": "float32",
                   "hits/logit": "float32", "events/track_logit": "float32", "targets": "float32"},
        "prune_threshold": e.prune_threshold, "num_queries": model.num_queries, "dim": model.dim,
        "num_targets": int(dataset.max_tracks), "block_events": e.block_events, "hit_chunk": e.hit_chunk,
        "compressor": e.compressor, "clevel": e.clevel, "parts": parts,
        "versions": {"hepreg": _version("hepreg"), "torch": torch.__version__, "zarr": zarr.__version__},
    }


def _version(pkg: str) -> str:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "unknown"


def _on_rank0(info: DistInfo, fn):
    """Run fn on rank 0 only; every rank gets its result, or raises its error (no rank left at a barrier)."""
    result, error = None, None
    if info.is_main:
        try:
            result = fn()
        except HepregError as e:
            error = str(e)
    if info.enabled:
        box = [result, error]
        dist.broadcast_object_list(box, src=0)
        result, error = box
    if error is not None:
        raise CacheError(error)
    return result


def _part_writer(path: Path, rank: int, part: dict, meta: dict, resumed: bool) -> PartWriter:
    """This rank's part: continued when an interrupted export left one, else (re)created from scratch."""
    if resumed and (path / store.part_name(rank) / "zarr.json").is_file():
        try:
            return PartWriter.open(path, rank)
        except CacheError:  # killed while the part itself was being created: nothing of it to keep
            pass
    return PartWriter.create(path, rank, start=part["start"], stop=part["stop"], num_queries=meta["num_queries"],
                             dim=meta["dim"], num_raw=len(RAW_FEATURES), num_targets=meta["num_targets"],
                             embed_dtype=meta["dtypes"]["hits/embed"], block_events=meta["block_events"],
                             hit_chunk=meta["hit_chunk"], compressor=meta["compressor"], clevel=meta["clevel"])


def _write_part(writer: PartWriter, assigner: FrozenAssigner, dataset, first: int, cfg: Config, split: str) -> None:
    """Every unwritten block of this rank's part; `first` is the dataset index of the part's first event."""
    threshold = cfg.export.prune_threshold
    with progress() as p:
        task = p.add_task(f"export {split}", total=writer.num_events)
        p.update(task, completed=min(writer.blocks_done * cfg.export.block_events, writer.num_events))
        for k in range(writer.blocks_done, writer.num_blocks):
            s, e = writer.block_range(k)
            block, seen = assigner.run_events(dataset, first + s, first + e, cfg, prune_threshold=threshold,
                                              on_batch=lambda batch, *_: p.update(task, advance=batch.size))
            writer.write_block(k, block.to_flat(), hits_seen=seen)
            p.update(task, info=f"block {k + 1}/{writer.num_blocks}")
