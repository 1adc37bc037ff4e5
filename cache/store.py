"""On-disk layout of a cache split: one Zarr v3 group per split, one subgroup per writing process.

```
cache/<split>.zarr/            group; attrs["hepreg"]: schema version, provenance, parts, completion record
cache/<split>.zarr/part-0000/  group; attrs["hepreg_part"]: its event range and write progress
    hits/embed [H, D]  hits/raw [H, 23]  hits/logit [H, N]                 (flat CSR, H = kept hits)
    hits/index [H]: row of each kept hit within its event's `hits` array in the input file
    events/hit_offsets [E + 1]  events/query_embed [E, N, D]  events/track_logit [E, N]
    events/match [E, N]  events/event_id [E]  targets/{pt,eta,phi,q,valid} [E, P]
```
Each part holds a contiguous range of the split's events, written by exactly one process (a torchrun rank),
so no chunk is ever written by two processes; readers concatenate the parts in order. Offsets are local to
their part. Every store write of zarr's LocalStore is atomic (temp file + rename), so a killed writer leaves
old or new metadata, never half of it.
"""
from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

import zarr
import zarr.codecs
from zarr.core.buffer.cpu import NDBuffer

from hepreg.cache.schema import SCHEMA_VERSION
from hepreg.errors import CacheError
from hepreg.runs.files import replace_dir

META_KEY = "hepreg"
PART_KEY = "hepreg_part"


def part_name(index: int) -> str:
    return f"part-{index:04d}"


def compressors(name: str, clevel: int, shuffle: bool = True) -> tuple:
    """Blosc with byte shuffle (`none`: raw bytes), then a crc32c checksum of every chunk, so that a
    corrupted or truncated chunk file fails to decode instead of silently yielding wrong numbers.
    `shuffle=False` for arrays that compress better without it (the heads' float32 per-hit inputs: lz4 77 MB
    against 93 MB with it for 2M pairs, and no slower to read).

    lz4 is the default by measurement (docs/cache-compression.md): float embeddings barely compress (zstd 1.1x,
    float16 ~1.0x) while zstd decoding costs ~95 us of core time per event against ~145 us for the head step
    itself, so on two cores heavy compression steals training time. On an exported split (140 hits/event,
    float16, 3200 events, 2 loaded cores; bytes/event on disk, whole-split read events/s):
    none 23.7k B, 16.7k/s; lz4 20.9k B, 10.9k/s; zstd-1 18.5k B, 4.6k/s; zstd-5 16.4k B, 7.3k/s.
    zstd saves a fifth of the disk for half the read speed: worth it only where disk, not cores, is short.
    """
    if name == "none":
        return (zarr.codecs.Crc32cCodec(),)
    return (zarr.codecs.BloscCodec(cname=name, clevel=clevel, shuffle="shuffle" if shuffle else "noshuffle"),
            zarr.codecs.Crc32cCodec())


def is_split(path: Path) -> bool:
    return (path / "zarr.json").is_file() and path.suffix == ".zarr"


def find_splits(path: str | Path) -> list[Path]:
    """A split's `.zarr` group itself, or every `*.zarr` split inside a cache directory."""
    path = Path(path)
    if is_split(path):
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.glob("*.zarr") if is_split(p))
        if found:
            return found
    raise CacheError(f"{path} is neither a cache split (<split>.zarr) nor a directory holding any")


def read_meta(path: str | Path) -> dict[str, Any]:
    """The split's provenance and progress attrs; a clear error when `path` is not a hepreg cache split."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise CacheError(f"no cache split at {path} (missing zarr.json)")
    try:
        meta = json.loads((path / "zarr.json").read_text())["attributes"][META_KEY]
    except (KeyError, ValueError) as e:
        raise CacheError(f"{path} is not a hepreg cache split (zarr.json lacks attributes.{META_KEY}: {e})") from None
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise CacheError(f"{path} has cache schema version {meta.get('schema_version')}, this hepreg reads "
                         f"version {SCHEMA_VERSION}; re-export it")
    return meta


def check_dataset(path: str | Path, fingerprint: str, data: str | Path) -> None:
    """Pair a cache split only with the dataset it was exported from: the sha256 of its files (and of the number
    of events used), recorded at export, must be `fingerprint`, the dataset's now. Size and event numbers are not
    enough: another dataset (a regenerated one, another sample) can have both."""
    made = read_meta(path).get("dataset") or {}
    if made.get("fingerprint") != fingerprint:
        raise CacheError(f"cache split {path} was exported from another dataset than {data}: its outputs would be "
                         f"paired with other events' truth (the cache was made from {made.get('path')}, "
                         f"{made.get('num_events')} events, fingerprint {str(made.get('fingerprint'))[:12]}; {data} "
                         f"now has fingerprint {fingerprint[:12]}). Set data.path to the dataset the cache came from, "
                         f"or export the cache again (hepreg export-embeddings --overwrite)")


def write_meta(path: str | Path, meta: dict[str, Any]) -> None:
    """Create (or replace the attrs of) the split's top-level group."""
    group = zarr.open_group(str(path), mode="a")
    group.attrs[META_KEY] = meta


def split_problem(path: Path) -> str | None:
    """None when `path` is a cache split hepreg wrote (any schema version) holding nothing else; else why not."""
    try:
        json.loads((path / "zarr.json").read_text())["attributes"][META_KEY]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"no zarr.json with hepreg attributes: {type(e).__name__} {e}"
    other = sorted(p.name for p in path.iterdir() if p.name != "zarr.json" and not p.name.startswith("part-"))
    if other:
        return f"it also holds {', '.join(other[:5])}"
    return None


def remove_split(path: str | Path) -> None:
    """Delete a cache split for --overwrite: only one that hepreg made (see `split_problem`)."""
    replace_dir(path, split_problem, "cache splits")


def create_part(path: str | Path, index: int, *, start: int, stop: int, num_queries: int, dim: int,
                num_raw: int, num_targets: int, embed_dtype: str, block_events: int, hit_chunk: int,
                compressor: str, clevel: int) -> zarr.Group:
    """A fresh part group for events [start, stop) of the split, with empty hit arrays (grown per block)."""
    from hepreg.data.layout import TARGETS

    group = zarr.open_group(str(Path(path) / part_name(index)), mode="w")
    codecs = compressors(compressor, clevel)
    num_events = stop - start
    ec = max(1, min(block_events, num_events))

    def array(name: str, shape: tuple, chunks: tuple, dtype: str) -> None:
        group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, compressors=codecs, fill_value=0)

    for sub in ("hits", "events", "targets"):
        group.create_group(sub)
    array("hits/embed", (0, dim), (hit_chunk, dim), embed_dtype)
    array("hits/raw", (0, num_raw), (hit_chunk, num_raw), "float32")
    array("hits/logit", (0, num_queries), (hit_chunk, num_queries), "float32")
    array("hits/index", (0,), (hit_chunk,), "int32")
    array("events/hit_offsets", (num_events + 1,), (ec,), "int64")
    array("events/query_embed", (num_events, num_queries, dim), (ec, num_queries, dim), embed_dtype)
    array("events/track_logit", (num_events, num_queries), (ec, num_queries), "float32")
    array("events/match", (num_events, num_queries), (ec, num_queries), "int64")
    array("events/event_id", (num_events,), (ec,), "int64")
    for t in TARGETS:
        array(f"targets/{t}", (num_events, num_targets), (ec, num_targets), "float32")
    array("targets/valid", (num_events, num_targets), (ec, num_targets), "bool")
    # the CSR origin (blocks write offsets[s + 1 : e + 1]); stored even though it equals the fill value
    group["events/hit_offsets"].with_config({"write_empty_chunks": True})[0:1] = 0
    group.attrs[PART_KEY] = {"start": start, "stop": stop, "block_events": block_events,
                             "blocks_done": 0, "hits_done": 0, "hits_seen": 0, "complete": False}
    return group


def open_part(path: str | Path, index: int, mode: str = "r") -> zarr.Group:
    p = Path(path) / part_name(index)
    if not (p / "zarr.json").is_file():
        raise CacheError(f"cache split {path} lacks its part {part_name(index)}")
    try:
        return zarr.open_group(str(p), mode=mode)
    except Exception as e:  # damaged metadata
        raise CacheError(f"cache split {path}: {part_name(index)} cannot be opened: {e}") from None


def part_progress(group: zarr.Group) -> dict[str, Any]:
    if PART_KEY not in group.attrs:
        raise CacheError(f"cache part {group.store_path} has no write record (its creation was interrupted)")
    return dict(group.attrs[PART_KEY])


def disk_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ------------------------------------------------------------------------------------------- checked reads
class CheckedArray:
    """A stored array whose reads are checked: every chunk exists (see `check_chunks`, once per open) and a
    chunk that fails to decode or fails its crc32c is a CacheError naming the array, chunk and file, never a
    codec traceback or, worse, zeros."""

    def __init__(self, array: zarr.Array, part_dir: Path, name: str):
        self.array, self.part_dir, self.name = array, part_dir, name

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    @property
    def dtype(self):
        return self.array.dtype

    @property
    def nbytes(self) -> int:
        return self.array.nbytes

    def chunk_file(self, index: tuple[int, ...]) -> Path:
        return self.part_dir / self.name / "c" / Path(*map(str, index))

    def __getitem__(self, sel) -> np.ndarray:
        try:
            return self.array[sel]
        except Exception as e:  # noqa: BLE001  (codec errors come in many types)
            raise CacheError(self._damage(sel, e)) from None

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        """Rows [start, stop) into `out` (an array the caller reuses), with the same checks as a read."""
        try:
            self.array.get_basic_selection(slice(start, stop), out=NDBuffer.from_numpy_array(out))
        except Exception as e:  # noqa: BLE001
            raise CacheError(self._damage(slice(start, stop), e)) from None

    def _damage(self, sel, error: Exception) -> str:
        """Find the chunk that fails among those `sel` touches along the first axis, and describe it."""
        n, step = self.shape[0], self.array.chunks[0]
        first = sel[0] if isinstance(sel, tuple) else sel
        lo, hi, _ = first.indices(n) if isinstance(first, slice) else (int(first) % max(n, 1),) * 2 + (1,)
        rest = tuple(range(math.ceil(d / c)) for d, c in zip(self.shape[1:], self.array.chunks[1:]))
        for k in range(lo // step, min(max(hi, lo + 1), n) // step + 1):
            for tail in np.ndindex(*(len(r) for r in rest)) if rest else [()]:
                index = (k, *tail)
                try:
                    self.array.blocks[index]
                except Exception as e:  # noqa: BLE001
                    return (f"cache array {self.name} of {self.part_dir}: chunk {'/'.join(map(str, index))} "
                            f"({self.chunk_file(index)}) is damaged ({type(e).__name__}: {e}); the cache cannot "
                            f"be trusted: re-export it with --overwrite")
        return (f"cache array {self.name} of {self.part_dir} cannot be read ({type(error).__name__}: {error}); "
                f"re-export it with --overwrite")


def check_chunks(part_dir: str | Path, arrays: dict[str, zarr.Array]) -> None:
    """Every chunk of every array is stored: exports write empty chunks too, so a missing chunk file is a
    lost one (zarr would read it as zeros). One directory walk per array, at open."""
    part_dir = Path(part_dir)
    for name, a in arrays.items():
        grid = [math.ceil(d / c) for d, c in zip(a.shape, a.chunks)]
        root = part_dir / name / "c"
        found = set()
        for dirpath, _, files in os.walk(root):
            rel = Path(dirpath).relative_to(root).parts
            found.update(rel + (f,) for f in files)
        lost = sorted(set(itertools.product(*(list(map(str, range(g))) for g in grid))) - found,
                      key=lambda k: tuple(map(int, k)))
        if lost:
            raise CacheError(f"cache array {name} of {part_dir}: chunk {'/'.join(lost[0])} ({root.joinpath(*lost[0])}) "
                             f"is missing ({len(lost)} of {math.prod(grid)} chunks lost); the cache cannot be "
                             f"trusted: re-export it with --overwrite")
