"""Head inputs stored beside a cache split, for a split that is streamed from Zarr rather than held in memory.

What a head sees of a track (per-hit features, track frame, fit proxy) is a function of the cached tensors
alone, and the fit proxy costs ~20x the head's own step. A held split has it computed once in memory
(`hepreg.prepared`); a split larger than memory has it computed once too, written here, and read back block
by block as the split is streamed. One store per split and input setting:

```
cache/head-inputs/<split>-<key digest>.zarr/   group; attrs["hepreg_inputs"]: the setting, the split it was
                                               made from (its export's identity), the names, completion
    events/event_id [E]   events/first_pair [E + 1]   (the pairs of events [s, e): first_pair[s]:first_pair[e])
    slots/length [E·N]    slots/track_features [E·N, F_track]   slots/reference [E·N, 6]
    pairs/features [P, F_hit]   pairs/prob [P]   pairs/hit [P] (the hit's row within its event)
```
Slots are event-major (N per event); pairs run by slot, then by column. The store is written under a
temporary name and renamed when complete, so a reader never sees half of one; a store made from another
export of the split (or another setting) is never read: its identity differs, and it is made again.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zarr

from hepreg.cache import store
from hepreg.errors import CacheError
from hepreg.runs.files import replace_dir, taking_turns

KEY = "hepreg_inputs"
FORMAT = 2  # 2: slots/reference (was slots/offset)
SLOT_FIELDS = ("length", "track_features", "reference")
PAIR_FIELDS = ("features", "prob", "hit")
PAIR_CHUNK = 1 << 17  # rows per chunk of a pair array: ~9 MB of features, a few chunks per read-ahead buffer


def split_identity(split) -> dict[str, Any]:
    """What distinguishes one export of a split from another: a store made from another is stale."""
    a = split.attrs
    return {"path": str(Path(split.path).resolve()), "created": a.get("created"),
            "checkpoint_sha256": a.get("checkpoint_sha256"), "num_events": int(a["num_events"]),
            "prune_threshold": a.get("prune_threshold"), "completed": (a.get("complete") or {}).get("time")}


def inputs_path(split, setting: dict[str, Any]) -> Path:
    """Where the inputs of `setting` (the head's input spec, as plain data) for this split live."""
    digest = hashlib.sha256(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:12]
    return Path(split.path).parent / "head-inputs" / f"{Path(split.path).stem}-{digest}.zarr"


def writing(split, setting: dict[str, Any]):
    """Held by one process at a time (blocking) for one store: processes that start together on one cache
    (`hepreg tune` started twice, a sweep beside a single run) make it once, the others then read it."""
    path = inputs_path(split, setting)
    return taking_turns(path.with_name(path.name + ".lock"))


class InputsWriter:
    """Appends events' inputs in split order; `finish` makes the store visible under its name."""

    def __init__(self, path: Path, split, setting: dict[str, Any], names: dict[str, list[str]], num_queries: int):
        self.path, self.tmp = path, path.with_name(path.name + ".partial")
        if self.tmp.exists():  # a writer killed earlier
            replace_dir(self.tmp, lambda p: None, "partial head-input stores")
        self.attrs = {"format": FORMAT, "setting": setting, "split": split_identity(split), "names": names,
                      "num_queries": num_queries, "complete": False}
        self.group = zarr.open_group(str(self.tmp), mode="w")
        self.codecs = store.compressors(split.attrs.get("compressor", "lz4"), int(split.attrs.get("clevel", 5)),
                                        shuffle=False)
        self.block_events = int(split.block_events)
        self.arrays: dict[str, zarr.Array] = {}
        self.pairs = 0
        self.first_pair = [np.zeros(1, np.int64)]

    def _append(self, name: str, data: np.ndarray, chunk_rows: int) -> None:
        if name not in self.arrays:
            self.arrays[name] = self.group.create_array(
                name, shape=(0,) + data.shape[1:], dtype=data.dtype, chunks=(chunk_rows,) + tuple(max(d, 1) for d in data.shape[1:]),
                compressors=self.codecs, fill_value=0,
                config={"write_empty_chunks": True})
        self.arrays[name].append(data, axis=0)

    def append(self, event_id: np.ndarray, pairs_per_event: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
        N = self.attrs["num_queries"]
        self._append("events/event_id", event_id, self.block_events)
        for f in SLOT_FIELDS:
            self._append(f"slots/{f}", arrays[f], self.block_events * N)
        for f in PAIR_FIELDS:
            self._append(f"pairs/{f}", arrays[f], PAIR_CHUNK)
        self.first_pair.append(self.pairs + np.cumsum(pairs_per_event))
        self.pairs += int(pairs_per_event.sum())

    def finish(self) -> Path:
        first_pair = np.concatenate(self.first_pair)
        self.group.create_array("events/first_pair", data=first_pair, chunks=(max(len(first_pair), 1),),
                                compressors=self.codecs, config={"write_empty_chunks": True})
        self.group.attrs[KEY] = {**self.attrs, "complete": True, "num_pairs": self.pairs}
        if self.path.exists():  # a stale store of the same name
            replace_dir(self.path, lambda p: None, "head-input stores")
        self.tmp.rename(self.path)
        return self.path


class StoredInputs:
    """A complete store, opened for reads of event ranges."""

    def __init__(self, path: Path):
        self.path = Path(path)
        group = zarr.open_group(str(self.path), mode="r")
        self.attrs = group.attrs[KEY]
        arrays = {f"{sub}/{k}": a for sub in ("events", "slots", "pairs") for k, a in group[sub].arrays()}
        store.check_chunks(self.path, arrays)
        self.arrays = {k: store.CheckedArray(a, self.path, k) for k, a in arrays.items()}
        self.first_pair = self.arrays["events/first_pair"][:]  # [E + 1], small: read once
        self.num_queries = int(self.attrs["num_queries"])

    @property
    def nbytes(self) -> int:
        return store.disk_bytes(self.path)

    def read(self, ranges: list[tuple[int, int]], empty: Callable[..., np.ndarray] = np.empty,
             spare_pair_rows: int = 0) -> dict[str, np.ndarray]:
        """The inputs of events [s, e) for each range, concatenated in that order, read into arrays from
        `empty(shape, dtype)` (a `BufferPool`'s, to reuse); the pair arrays with `spare_pair_rows` rows more at
        the end, left for the reader to fill (`PreparedInputs` puts its padding row there)."""
        N, fp = self.num_queries, self.first_pair
        rows = {"events/event_id": ranges, **{f"slots/{f}": [(s * N, e * N) for s, e in ranges] for f in SLOT_FIELDS},
                **{f"pairs/{f}": [(int(fp[s]), int(fp[e])) for s, e in ranges] for f in PAIR_FIELDS}}
        out = {}
        for name, spans in rows.items():
            a = self.arrays[name]
            spare = spare_pair_rows if name.startswith("pairs/") else 0
            x = empty((sum(e - s for s, e in spans) + spare,) + a.shape[1:], a.dtype)
            pos = 0
            for s, e in spans:
                if e > s:
                    a.read_into(s, e, x[pos:pos + e - s])
                    pos += e - s
            out[name.split("/")[1]] = x
        return out


def open_inputs(split, setting: dict[str, Any]) -> StoredInputs | None:
    """The split's stored inputs of `setting`, or None where there are none from this very export."""
    path = inputs_path(split, setting)
    try:
        attrs = json.loads((path / "zarr.json").read_text())["attributes"][KEY]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if (attrs.get("format") != FORMAT or not attrs.get("complete") or attrs.get("setting") != setting
            or attrs.get("split") != split_identity(split)):
        return None
    try:
        return StoredInputs(path)
    except CacheError:
        raise
    except Exception as e:  # noqa: BLE001  (damaged metadata of an array)
        raise CacheError(f"stored head inputs {path} cannot be read ({type(e).__name__}: {e}); delete the "
                         f"directory and they are made again") from None
