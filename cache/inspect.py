"""`hepreg cache info` and `hepreg cache verify`: what a cache holds, and whether every byte of it decodes."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
from rich import box
from rich.table import Table

from hepreg.cache import store
from hepreg.cache.schema import EVENT_ARRAYS, HIT_ARRAYS, OFFSETS, TARGET_ARRAYS
from hepreg.data.layout import TARGETS
from hepreg.errors import CacheError
from hepreg.runs.progress import progress, results


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def split_summary(path: str | Path) -> dict[str, Any]:
    """Numbers of one split, complete or not: events, hits, bytes on disk and decoded, provenance."""
    path = Path(path)
    meta = store.read_meta(path)
    kept = seen = decoded = done_events = 0
    for i in range(len(meta["parts"])):
        if not (path / store.part_name(i) / "zarr.json").is_file():
            continue  # an export that has not started this part yet
        part = store.open_part(path, i)
        prog = store.part_progress(part)
        kept += prog["hits_done"]
        seen += prog["hits_seen"]
        done_events += min(prog["blocks_done"] * prog["block_events"], prog["stop"] - prog["start"])
        decoded += sum(int(a.nbytes) for sub in ("hits", "events", "targets") for _, a in part[sub].arrays())
    disk = store.disk_bytes(path)
    events = int(meta["num_events"])
    return {"split": path.name.removesuffix(".zarr"), "path": str(path), "events": events,
            "events_written": done_events, "hits_kept": kept, "hits_seen": seen, "disk_bytes": disk,
            "decoded_bytes": decoded, "bytes_per_event": disk / max(events, 1),
            "compression_ratio": decoded / max(disk, 1), "dtype": meta.get("dtypes", {}).get("hits/embed"),
            "prune_threshold": meta.get("prune_threshold"), "checkpoint_sha256": meta.get("checkpoint_sha256"),
            "dataset_fingerprint": (meta.get("dataset") or {}).get("fingerprint"),
            "compressor": meta.get("compressor"), "complete": bool(meta.get("complete")), "parts": len(meta["parts"])}


def info(path: str | Path) -> list[dict[str, Any]]:
    """Print a table of every split under `path`; returns the numbers."""
    rows = [split_summary(p) for p in store.find_splits(path)]
    sizes = Table(title=f"cache {path}", box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False)
    for col in ("split", "events", "hits kept", "on disk", "per event", "ratio", "complete"):
        sizes.add_column(col, justify="left" if col in ("split", "complete") else "right", no_wrap=True)
    made = Table(title="made by", box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False)
    for col in ("split", "embed dtype", "prune", "codec", "checkpoint", "dataset"):
        made.add_column(col, justify="right" if col == "prune" else "left", no_wrap=True)
    for r in rows:
        kept = f"{r['hits_kept']:,}"
        if r["hits_seen"]:
            kept += f" ({100 * r['hits_kept'] / r['hits_seen']:.1f}%)"
        complete = "yes" if r["complete"] else f"no ({r['events_written']:,}/{r['events']:,})"
        sizes.add_row(r["split"], f"{r['events']:,}", kept, _fmt_bytes(r["disk_bytes"]),
                      _fmt_bytes(r["bytes_per_event"]), f"{r['compression_ratio']:.2f}x", complete)
        made.add_row(r["split"], str(r["dtype"]),
                     f"{r['prune_threshold']:g}" if r["prune_threshold"] is not None else "-",
                     str(r["compressor"]), str(r["checkpoint_sha256"] or "-")[:12],
                     str(r["dataset_fingerprint"] or "-")[:12])
    results.print(sizes)
    results.print(made)
    return rows


def _chunks(arr) -> list[tuple[int, ...]]:
    grid = [-(-s // c) for s, c in zip(arr.shape, arr.chunks)]
    return list(itertools.product(*(range(g) for g in grid)))


def _decode_array(split: Path, part: str, name: str, arr, keep: bool) -> np.ndarray | None:
    """Every chunk of one array: present on disk, decodable, finite. Returns the decoded array if `keep`
    (the hit arrays, most of the bytes, are checked chunk by chunk and never held whole)."""
    where = f"{split}: {part}/{name}"
    out = np.empty(arr.shape, dtype=arr.dtype) if keep else None
    root = split / part / name / "c"
    for coords in _chunks(arr):
        key = root.joinpath(*map(str, coords))
        if not key.is_file():
            raise CacheError(f"{where} chunk {'.'.join(map(str, coords))} is missing ({key})")
        try:
            block = np.asarray(arr.blocks[coords])
        except Exception as e:  # any codec or size error of a damaged chunk file
            raise CacheError(f"{where} chunk {'.'.join(map(str, coords))} does not decode: {e}") from None
        if block.dtype.kind == "f" and not np.isfinite(block).all():
            raise CacheError(f"{where} chunk {'.'.join(map(str, coords))} holds non-finite values")
        if keep:
            out[tuple(slice(c * k, c * k + s) for c, k, s in zip(coords, arr.chunks, block.shape))] = block
    return out


def verify_split(path: str | Path) -> dict[str, Any]:
    """Decode every chunk of a split and check its structure; raises CacheError at the first fault."""
    path = Path(path)
    meta = store.read_meta(path)
    if not meta.get("complete"):
        raise CacheError(f"{path} is incomplete: its export was interrupted or is still running")
    chunks = 0
    for i, bounds in enumerate(meta["parts"]):
        name = store.part_name(i)
        part = store.open_part(path, i)
        try:
            arrays = {f"{sub}/{k}": a for sub in ("hits", "events", "targets") for k, a in part[sub].arrays()}
        except Exception as e:  # a missing or damaged array zarr.json
            raise CacheError(f"{path}: the arrays of {name} cannot be opened: {e}") from None
        missing = sorted(set(HIT_ARRAYS + EVENT_ARRAYS + TARGET_ARRAYS + (OFFSETS,)) - set(arrays))
        if missing:
            raise CacheError(f"{path}: {name} lacks the array {missing[0]}")
        prog = store.part_progress(part)
        num_events = bounds["stop"] - bounds["start"]
        data = {}
        for key in sorted(arrays):
            data[key] = _decode_array(path, name, key, arrays[key], keep=not key.startswith("hits/"))
            chunks += len(_chunks(arrays[key]))
        where = f"{path}: {name}"
        off = data["events/hit_offsets"]
        if off.shape != (num_events + 1,) or off[0] != 0:
            raise CacheError(f"{where}/events/hit_offsets has shape {off.shape} and starts at {off[:1]}, "
                             f"expected {num_events + 1} offsets from 0")
        if (np.diff(off) < 0).any():
            bad = int(np.argmax(np.diff(off) < 0))
            raise CacheError(f"{where}/events/hit_offsets decreases at event {bad} "
                             f"(chunk {bad // arrays['events/hit_offsets'].chunks[0]})")
        for key, a in arrays.items():
            n = off[-1] if key.startswith("hits/") else num_events + (key == "events/hit_offsets")
            if a.shape[0] != n:
                raise CacheError(f"{where}/{key} has {a.shape[0]} rows, expected {n} "
                                 f"({'hits by events/hit_offsets' if key.startswith('hits/') else 'events'})")
        if off[-1] != prog["hits_done"]:
            raise CacheError(f"{where}: offsets end at hit {off[-1]}, its write record at {prog['hits_done']}")
        valid = data["targets/valid"]
        p = valid.shape[1]
        match = data["events/match"]
        if ((match < -1) | (match >= p)).any():
            raise CacheError(f"{where}/events/match holds indices outside -1..{p - 1}")
        pt, q = data["targets/pt"], data["targets/q"]
        for t in TARGETS:
            if not np.isfinite(data[f"targets/{t}"][valid]).all():
                raise CacheError(f"{where}/targets/{t} is not finite in a valid slot")
        if (pt[valid] <= 0).any() or (np.abs(q[valid]) != 1).any():
            e = int(np.argwhere(valid & ((pt <= 0) | (np.abs(q) != 1)))[0, 0])
            raise CacheError(f"{where}/targets: event {e} has a valid target with pt <= 0 or |q| != 1")
    return {"split": path.name, "events": int(meta["num_events"]), "chunks": chunks}


def verify(path: str | Path) -> list[dict[str, Any]]:
    """Verify every split under `path` and print one line each; raises CacheError at the first fault."""
    checked = []
    splits = store.find_splits(path)
    with progress() as p:
        task = p.add_task("verify", total=len(splits))
        for s in splits:
            r = verify_split(s)
            checked.append(r)
            p.update(task, advance=1, info=s.name)
    for r in checked:
        results.print(f"[green]ok[/] {r['split']}: {r['events']:,} events, {r['chunks']:,} chunks decoded")
    return checked
