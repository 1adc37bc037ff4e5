"""Reader for datasets in the ATLAS-muon HDF5 layout (described in the README), real or from `hepreg generate`.

`open_dataset` validates everything that is cheap to check up front (metadata, index files, every chunk
file's shapes, num_hits/num_tracks against the padded sizes); `Dataset.read` checks the values it reads
(NaN inside an event, truthLink pointing to no track). Truth is optional: a dataset without the
`spacePoint_truthLink` column, without `tracks` (or with an empty one) reads with every hit marked noise and
no particles (`Dataset.has_truth` is False), which is all that prediction needs. Every problem is a DataError naming the file, the
event and the field. Reads are block reads: one h5py read per chunk file per call, file handles kept open
(and reopened after a fork). `read` gives padded arrays; `read_flat` the same events with their hits
concatenated (CSR), which is what the batch loader keeps in its buffer (about a quarter of the memory at
high occupancy, where a few 600-hit events set the padded size).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import yaml

from hepreg.data.layout import INPUT_COLUMNS, NUM_RAW_FEATURES, TRACK_COLUMNS, TRUTH_LINK, scale_hits
from hepreg.runs.digest import sha256_file
from hepreg.errors import DataError

CHUNK_DATASETS = ("hits", "num_hits", "event_numbers")  # `tracks` and `num_tracks` only where there is truth
MAX_OPEN_FILES = 16  # real datasets can have hundreds of chunk files


@dataclass
class EventArrays:
    """A block of events as numpy arrays (the input of batching; see HitBatch for the tensor version)."""
    hits: np.ndarray            # [E, M, 23] float32 scaled model inputs, 0 at padding
    hit_valid: np.ndarray       # [E, M] bool
    truth_link: np.ndarray      # [E, M] int64, -1 for noise and padding
    targets: np.ndarray         # [E, P, 4] float32 (pt, eta, phi, q), 0 where invalid
    particle_valid: np.ndarray  # [E, P] bool
    event_id: np.ndarray        # [E] int64 event_numbers
    num_hits: np.ndarray        # [E] int64

    def __len__(self) -> int:
        return len(self.num_hits)


@dataclass
class FlatEvents:
    """The same block with hits concatenated over events (CSR): what a bounded shuffle buffer holds."""
    hits: np.ndarray            # [H, 23] float32 scaled model inputs
    truth_link: np.ndarray      # [H] int64, -1 for noise
    offsets: np.ndarray         # [E+1] int64: event e owns hits[offsets[e]:offsets[e+1]]
    targets: np.ndarray         # [E, P, 4] float32
    particle_valid: np.ndarray  # [E, P] bool
    event_id: np.ndarray        # [E] int64
    num_hits: np.ndarray        # [E] int64

    def __len__(self) -> int:
        return len(self.num_hits)


def _load_yaml(path: Path) -> dict:
    try:
        meta = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise DataError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a mapping with hit_features, track_features, event_mapping")
    return meta


def _column_list(meta: dict, key: str, path: Path) -> list[str]:
    cols = meta.get(key)
    if not isinstance(cols, list) or not all(isinstance(c, str) for c in cols):
        raise DataError(f"{path}: field {key!r} must be a list of column names")
    return cols


# What the reader hands on, per track column (TRACK_COLUMNS order): the one place these rules live.
TRACK_RULES = {"truthMuon_pt": "pT must be finite and > 0 (GeV)", "truthMuon_eta": "eta must be finite",
               "truthMuon_phi": "phi must be finite", "truthMuon_q": "q must be +1 or -1"}


def track_values_ok(t: np.ndarray) -> np.ndarray:
    """[..., 4] track values in TRACK_COLUMNS order -> [..., 4] bool, True where the value is valid."""
    pt, eta, phi, q = (t[..., k] for k in range(4))
    return np.stack([np.isfinite(pt) & (pt > 0), np.isfinite(eta), np.isfinite(phi), np.abs(q) == 1], -1)


class Dataset:
    """One dataset directory: metadata.yaml, event_file_indices.npy, event_row_indices.npy, chunk files."""

    def __init__(self, path: str | Path, max_events: int | None = None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise DataError(f"dataset directory {self.path} does not exist")
        meta_path = self.path / "metadata.yaml"
        if not meta_path.is_file():
            raise DataError(f"{self.path}: metadata.yaml is missing (not an ATLAS-muon HDF5 dataset)")
        meta = _load_yaml(meta_path)
        self.hit_columns = _column_list(meta, "hit_features", meta_path)
        self.track_columns = _column_list(meta, "track_features", meta_path) if meta.get("track_features") else []
        missing = [c for c in INPUT_COLUMNS if c not in self.hit_columns]
        if missing:
            raise DataError(f"{meta_path}: hit_features lacks the model-input column(s) {', '.join(missing)} "
                            f"(the model reads {len(INPUT_COLUMNS)} spacePoint columns by name)")
        missing = [c for c in TRACK_COLUMNS if c not in self.track_columns]
        if self.track_columns and missing:
            raise DataError(f"{meta_path}: track_features lacks the column(s) {', '.join(missing)}")
        self._truth_col = self.hit_columns.index(TRUTH_LINK) if TRUTH_LINK in self.hit_columns else None
        self._input_cols = [self.hit_columns.index(c) for c in INPUT_COLUMNS]
        self._target_cols = [self.track_columns.index(c) for c in TRACK_COLUMNS] if self.track_columns else []

        summary = (meta.get("event_mapping") or {}).get("chunk_summary") if isinstance(meta.get("event_mapping"), dict) else None
        if not isinstance(summary, list) or not summary:
            raise DataError(f"{meta_path}: field event_mapping.chunk_summary must be a non-empty list")
        self.files: list[Path] = []
        counts = []
        for i, entry in enumerate(summary):
            where = f"{meta_path}: field event_mapping.chunk_summary[{i}]"
            if not isinstance(entry, dict) or "h5_file" not in entry or "event_count" not in entry:
                raise DataError(f"{where} needs h5_file and event_count")
            name, count = entry["h5_file"], entry["event_count"]
            if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
                raise DataError(f"{where}.h5_file = {name!r} must be a file name relative to the dataset "
                                f"directory, inside it (no absolute path, no '..')")
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise DataError(f"{where}.event_count = {count!r} must be a whole number >= 0")
            f = self.path / name
            if not f.is_file():
                raise DataError(f"{meta_path}: chunk file {f} (event_mapping.chunk_summary[{i}].h5_file) is missing")
            self.files.append(f)
            counts.append(count)
        self._counts = np.array(counts, dtype=np.int64)

        file_idx = self._load_index("event_file_indices.npy")
        row_idx = self._load_index("event_row_indices.npy")
        if len(file_idx) != len(row_idx):
            raise DataError(f"{self.path}: event_file_indices.npy has {len(file_idx)} entries but "
                            f"event_row_indices.npy has {len(row_idx)}")
        total = int(self._counts.sum())
        declared = meta["event_mapping"].get("num_events", total)  # optional (hepreg generate writes it)
        if declared != total or isinstance(declared, bool):
            raise DataError(f"{meta_path}: field event_mapping.num_events = {declared!r}, but the event_count "
                            f"values of event_mapping.chunk_summary add up to {total}")
        if len(file_idx) != total:
            raise DataError(f"{self.path}: the index files list {len(file_idx)} events but "
                            f"event_mapping.chunk_summary counts {total}")
        self._handles: dict[int, h5py.File] = {}
        self._pid = os.getpid()
        self._pad_hits = np.zeros(len(self.files), dtype=np.int64)
        self._num_hits_file: list[np.ndarray] = []
        self._num_tracks_file: list[np.ndarray] = []
        self._has_tracks = np.zeros(len(self.files), dtype=bool)
        max_tracks = 0
        for i, f in enumerate(self.files):
            h = self._handle(i)
            for name in CHUNK_DATASETS:
                if name not in h:
                    raise DataError(f"{f}: dataset {name!r} is missing")
            # a file has truth when hits link to tracks and it holds a non-empty `tracks` that metadata describes
            self._has_tracks[i] = (self._truth_col is not None and bool(self.track_columns) and "tracks" in h
                                   and h["tracks"].size > 0)
            truth = ("tracks", "num_tracks") if self._has_tracks[i] else ()
            for name in truth:
                if name not in h:
                    raise DataError(f"{f}: dataset {name!r} is missing")
            shapes = {name: h[name].shape for name in CHUNK_DATASETS + truth}
            E = counts[i]
            expect = {"hits": (E, None, len(self.hit_columns)), "tracks": (E, None, len(self.track_columns)),
                      "num_hits": (E,), "num_tracks": (E,), "event_numbers": (E,)}
            expect = {k: v for k, v in expect.items() if k in shapes}
            rows = {name: shape[0] for name, shape in shapes.items() if len(shape)}
            if len(set(rows.values())) == 1 and E not in rows.values():  # the file is whole; metadata says otherwise
                raise DataError(f"{meta_path}: field event_mapping.chunk_summary[{i}].event_count = {E}, but chunk "
                                f"file {f} holds {rows['hits']} events; the counts in metadata.yaml must be those "
                                f"of the files")
            for name, want in expect.items():
                got = shapes[name]
                if len(got) != len(want) or any(w is not None and g != w for g, w in zip(got, want)):
                    shown = tuple("*" if w is None else w for w in want)
                    raise DataError(f"{f}: field {name!r} has shape {got}, but metadata.yaml implies {shown} "
                                    f"({E} events, {len(self.hit_columns)} hit / {len(self.track_columns)} "
                                    "track features)")
            nh = self._slab(i, h, "num_hits", np.s_[:], "the file").astype(np.int64)
            nt = (self._slab(i, h, "num_tracks", np.s_[:], "the file").astype(np.int64) if truth
                  else np.zeros(E, dtype=np.int64))
            self._check_counts(f, nh, shapes["hits"][1], "num_hits", "hits")
            if truth:
                self._check_counts(f, nt, shapes["tracks"][1], "num_tracks", "tracks")
                max_tracks = max(max_tracks, shapes["tracks"][1])
            self._pad_hits[i] = shapes["hits"][1]
            self._num_hits_file.append(nh)
            self._num_tracks_file.append(nt)
        # the index files point into the files as they are (checked above)
        bad = np.nonzero((file_idx < 0) | (file_idx >= len(self.files)))[0]
        if len(bad):
            raise DataError(f"{self.path / 'event_file_indices.npy'}: event {bad[0]} points to chunk file "
                            f"{file_idx[bad[0]]}, but there are {len(self.files)}")
        bad = np.nonzero((row_idx < 0) | (row_idx >= self._counts[file_idx]))[0]
        if len(bad):
            e = bad[0]
            raise DataError(f"{self.path / 'event_row_indices.npy'}: event {e} points to row {row_idx[e]} of "
                            f"{self.files[file_idx[e]].name}, which holds {self._counts[file_idx[e]]} events")
        if max_events is not None and max_events < 1:
            raise DataError(f"{self.path}: max_events must be at least 1, not {max_events}")
        n = total if max_events is None else min(total, int(max_events))
        if n == 0:
            raise DataError(f"{self.path}: the dataset holds no events (event_mapping.chunk_summary in "
                            f"metadata.yaml counts 0); there is nothing to train, export or fit")
        self._file_idx = file_idx[:n].astype(np.int64)
        self._row_idx = row_idx[:n].astype(np.int64)
        self.num_events = n

        self.max_tracks = int(max_tracks)
        self.hit_counts = self._gather(self._num_hits_file, self._file_idx, self._row_idx)
        self.max_hits = int(self.hit_counts.max(initial=0))
        self._fingerprint: str | None = None

    # ---- construction helpers ---------------------------------------------------------------------------
    def _load_index(self, name: str) -> np.ndarray:
        p = self.path / name
        if not p.is_file():
            raise DataError(f"{self.path}: index file {name} is missing")
        try:
            a = np.load(p, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise DataError(f"{p}: cannot be read as a .npy array: {e}") from None
        if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
            raise DataError(f"{p}: expected a 1-D integer array, got {a.dtype} {a.shape}")
        return a

    @staticmethod
    def _check_counts(f: Path, counts: np.ndarray, pad: int, field: str, padded: str) -> None:
        bad = np.nonzero((counts < 0) | (counts > pad))[0]
        if len(bad):
            r = bad[0]
            raise DataError(f"{f}: row {r}: field {field!r} = {counts[r]} is outside 0..{pad} "
                            f"(the padded size of {padded!r})")

    @staticmethod
    def _gather(per_file: list[np.ndarray], file_idx: np.ndarray, row_idx: np.ndarray) -> np.ndarray:
        out = np.empty(len(file_idx), dtype=np.int64)
        for i, a in enumerate(per_file):
            sel = file_idx == i
            out[sel] = a[row_idx[sel]]
        return out

    def _handle(self, i: int) -> h5py.File:
        """An open handle to chunk file i; at most MAX_OPEN_FILES stay open (least recently used closes)."""
        if self._pid != os.getpid():  # h5py handles do not survive a fork: reopen in the child
            self._handles, self._pid = {}, os.getpid()
        h = self._handles.pop(i, None)
        if h is None:
            try:
                h = h5py.File(self.files[i], "r", rdcc_nbytes=8 << 20)
            except OSError as e:
                raise DataError(f"{self.files[i]}: cannot be opened as HDF5: {e}") from None
            if len(self._handles) >= MAX_OPEN_FILES:
                self._handles.pop(next(iter(self._handles))).close()
        self._handles[i] = h  # most recently used last
        return h

    # ---- public API -------------------------------------------------------------------------------------
    @property
    def has_truth(self) -> bool:
        """Whether any event can have truth: a truthLink column and a non-empty `tracks` in some file."""
        return bool(self._has_tracks.any())

    def missing_truth(self) -> str:
        """What a truth-less dataset lacks, in words, for errors that need truth ("" when it has truth)."""
        gaps = []
        if self._truth_col is None:
            gaps.append(f"metadata.yaml's hit_features has no {TRUTH_LINK!r} column")
        if not self.track_columns:
            gaps.append("metadata.yaml lists no track_features")
        elif not self._has_tracks.any():
            gaps.append("no chunk file holds a non-empty 'tracks' dataset")
        return "; ".join(gaps)

    def __len__(self) -> int:
        return self.num_events

    def __repr__(self) -> str:
        return (f"Dataset({str(self.path)!r}, events={self.num_events}, files={len(self.files)}, "
                f"max_hits={self.max_hits}, max_tracks={self.max_tracks})")

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles = {}

    def read(self, start: int, stop: int) -> EventArrays:
        """Events [start, stop) as scaled, zero-padded numpy arrays (M = the largest event of the block)."""
        flat = self.read_flat(start, stop)
        n, M = len(flat), int(flat.num_hits.max(initial=0))
        e_idx = np.repeat(np.arange(n), flat.num_hits)
        k_idx = np.arange(len(e_idx)) - flat.offsets[e_idx]
        hits = np.zeros((n, M, NUM_RAW_FEATURES), dtype=np.float32)
        hits[e_idx, k_idx] = flat.hits
        truth_link = np.full((n, M), -1, dtype=np.int64)
        truth_link[e_idx, k_idx] = flat.truth_link
        return EventArrays(hits=hits, hit_valid=np.arange(M)[None, :] < flat.num_hits[:, None],
                           truth_link=truth_link, targets=flat.targets, particle_valid=flat.particle_valid,
                           event_id=flat.event_id, num_hits=flat.num_hits)

    def read_flat(self, start: int, stop: int) -> FlatEvents:
        """Events [start, stop) with their hits concatenated (CSR): no padding, a quarter of the memory."""
        if not 0 <= start <= stop <= self.num_events:
            raise DataError(f"{self.path}: event range [{start}, {stop}) is outside 0..{self.num_events}")
        n, P = stop - start, self.max_tracks
        fidx, ridx = self._file_idx[start:stop], self._row_idx[start:stop]
        num_hits = self.hit_counts[start:stop].copy()
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(num_hits, out=offsets[1:])
        out = FlatEvents(hits=np.empty((offsets[-1], NUM_RAW_FEATURES), dtype=np.float32),
                         truth_link=np.empty(offsets[-1], dtype=np.int64), offsets=offsets,
                         targets=np.zeros((n, P, len(TRACK_COLUMNS)), dtype=np.float32),
                         particle_valid=np.zeros((n, P), dtype=bool), event_id=np.zeros(n, dtype=np.int64),
                         num_hits=num_hits)
        for i in np.unique(fidx):
            pos = np.nonzero(fidx == i)[0]  # positions in the block of the events in file i
            rows = ridx[pos]
            r0, r1 = int(rows.min()), int(rows.max()) + 1
            contiguous = r1 - r0 == len(rows) and bool(np.all(np.diff(rows) == 1))
            take = (lambda a: a) if contiguous else (lambda a: a[rows - r0])  # noqa: E731
            h = self._handle(int(i))
            m = int(self._num_hits_file[i][rows].max(initial=0))
            what = f"events {start + pos[0]}..{start + pos[-1]} (rows {r0}..{r1 - 1})"
            raw_hits = take(self._slab(int(i), h, "hits", np.s_[r0:r1, :m], what))  # [e, m, F]: one read of the slab
            raw_tracks = (take(self._slab(int(i), h, "tracks", np.s_[r0:r1], what)) if self._has_tracks[i]
                          else np.zeros((len(rows), 0, 0), np.float32))  # [e, P_i, T]
            out.event_id[pos] = take(self._slab(int(i), h, "event_numbers", np.s_[r0:r1], what))
            self._fill(out, pos, rows, int(i), raw_hits, raw_tracks, start)
        return out

    def _slab(self, i: int, h: h5py.File, name: str, sel, what: str) -> np.ndarray:
        """One read of field `name` of chunk file i; a damaged file (e.g. a corrupted compressed chunk) is a
        DataError naming the file, the field and the events, not an h5py traceback."""
        try:
            return h[name][sel]
        except (OSError, ValueError, RuntimeError) as e:
            raise DataError(f"{self.files[i]}: field {name!r} of {what} cannot be read (the file is damaged: "
                            f"{e}); regenerate or re-copy it") from None

    def _fill(self, out: FlatEvents, pos, rows, i, raw_hits, raw_tracks, start) -> None:
        """Validate one file's slab and write its events into the flat block at positions `pos`."""
        f = self.files[i]
        nh = self._num_hits_file[i][rows]
        nt = self._num_tracks_file[i][rows]
        m = raw_hits.shape[1]
        valid = np.arange(m)[None, :] < nh[:, None]  # [e, m]
        flat = np.compress(valid.ravel(), raw_hits.reshape(-1, raw_hits.shape[-1]), axis=0)  # [H, F] event-major
        e_idx = np.repeat(np.arange(len(nh)), nh)
        k_idx = np.arange(len(e_idx)) - np.repeat(np.cumsum(nh) - nh, nh)
        inputs = flat[:, self._input_cols]
        if not np.isfinite(inputs).all():
            h, c = np.argwhere(~np.isfinite(inputs))[0]
            e = e_idx[h]
            raise DataError(f"{f}: event {start + pos[e]} (row {rows[e]}), hit {k_idx[h]}: field "
                            f"{INPUT_COLUMNS[c]!r} is {'NaN' if np.isnan(inputs[h, c]) else inputs[h, c]} inside the event's {nh[e]} hits "
                            f"(hit features must be finite)")
        if not self._has_tracks[i]:  # no truth: every hit is noise
            link = np.full(len(flat), -1.0, dtype=np.float32)
        else:
            link = flat[:, self._truth_col]
        link_i = link.astype(np.int64)
        bad = (link != link_i) | (link_i < -1) | (link_i >= nt[e_idx])
        if bad.any():
            h = np.nonzero(bad)[0][0]
            e = e_idx[h]
            raise DataError(f"{f}: event {start + pos[e]} (row {rows[e]}), hit {k_idx[h]}: field {TRUTH_LINK!r} = "
                            f"{link[h]:g} points to no track (the event has {nt[e]})")
        if pos[-1] - pos[0] + 1 == len(pos):  # consecutive events: one contiguous run of hits
            dest = slice(out.offsets[pos[0]], out.offsets[pos[-1] + 1])
        else:
            dest = out.offsets[pos[e_idx]] + k_idx
        out.hits[dest] = scale_hits(flat, self.hit_columns)
        out.truth_link[dest] = link_i
        P_i = raw_tracks.shape[1]
        tvalid = np.arange(P_i)[None, :] < nt[:, None]  # [e, P_i]
        targets = raw_tracks[..., self._target_cols] if self._has_tracks[i] else np.zeros((len(nh), 0, 4), np.float32)
        bad = ~track_values_ok(targets) & tvalid[..., None]
        if bad.any():
            e, p, c = np.argwhere(bad)[0]
            raise DataError(f"{f}: event {start + pos[e]} (row {rows[e]}), track {p}: field "
                            f"{TRACK_COLUMNS[c]!r} is {'NaN' if np.isnan(targets[e, p, c]) else targets[e, p, c]} "
                            f"inside the event's {nt[e]} tracks; "
                            f"{TRACK_RULES[TRACK_COLUMNS[c]]}")
        out.targets[pos, :P_i] = np.where(tvalid[..., None], targets, 0.0)
        out.particle_valid[pos, :P_i] = tvalid

    def fingerprint(self) -> str:
        """sha256 over metadata.yaml, the index files, every chunk file's sha256 and the number of events
        used (`max_events`); computed once per Dataset. Independent of the directory's name or place."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for name in ("metadata.yaml", "event_file_indices.npy", "event_row_indices.npy"):
                h.update((self.path / name).read_bytes())
            for f in self.files:
                h.update(sha256_file(f).encode())
            h.update(str(self.num_events).encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint


def open_dataset(path: str | Path, max_events: int | None = None) -> Dataset:
    """Open and validate a dataset directory; `max_events` keeps only the first N events."""
    return Dataset(path, max_events=max_events)


def split_ranges(num_events: int, val_fraction: float, test_fraction: float) -> dict[str, tuple[int, int]]:
    """Contiguous [train | val | test] event ranges."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must be in [0, 1) "
                        "and sum to less than 1")
    n_val, n_test = int(round(num_events * val_fraction)), int(round(num_events * test_fraction))
    a = num_events - n_val - n_test
    return {"train": (0, a), "val": (a, a + n_val), "test": (a + n_val, num_events)}
