"""The predictions file of `hepreg predict`: one HDF5 file of per-track results, and what reads it back.

```
events/event_id [E] int64      event_numbers of the input        events/index [E] int64  event in the dataset
events/num_hits [E] int32      hits of the event in the input
tracks/valid_prob [E, N]       sigmoid of the track-valid logit of each query (a track when >= 0.5)
tracks/<column> [E, N]         the head's physical outputs: pt [GeV], eta, phi [rad], q (+ sigma_* if predicted)
tracks/hit_offsets [E·N + 1]   CSR: the hits of query n of event e are
tracks/hit_index [K] int32          hit_index[hit_offsets[e·N + n] : hit_offsets[e·N + n + 1]],
                                    rows of the event's `hits` array in the input (sigmoid(mask logit) >= 0.5)
truth/match [E, N] int64       truth particle (row of `tracks` in the input) matched to each query, -1 none
truth/<target> [E, N]          that particle's pt, eta, phi, q (NaN where none)
particles/<target>, particles/valid [E, P]   every truth particle of the event
```
`truth/` and `particles/` exist only for a dataset with truth. Root attrs record the format, the hepreg
version, both checkpoints' sha256, the resolved config, the data and the column meanings.

Written block by block under a temporary name (`<out>.partial`) that records its progress after every block:
an interrupted run continues from the last complete block, and the final name appears only by a rename once
everything is written. Under torchrun each rank writes its own part and rank 0 merges them into one file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from hepreg.flat import FlatBatch
from hepreg.data.layout import TARGETS
from hepreg.errors import HepregError
from hepreg.runs.progress import progress

FORMAT = "hepreg-predictions"
FORMAT_VERSION = 1
ASSIGN_THRESHOLD = 0.5  # a query is a track, and a hit is on it, when the sigmoid of its logit >= 0.5
PROGRESS = "progress"  # root attr of a partial file: events and hits written so far (JSON)
MEANINGS = {
    "events/event_id": "event_numbers of the input files",
    "events/index": "position of the event in the dataset (event_file_indices order)",
    "events/num_hits": "hits of the event in the input",
    "tracks/valid_prob": "sigmoid(track-valid logit) of each query; a track when >= 0.5",
    "tracks/pt": "predicted transverse momentum [GeV]", "tracks/eta": "predicted pseudorapidity",
    "tracks/phi": "predicted azimuth [rad], in (-pi, pi]", "tracks/q": "predicted charge (+1 or -1)",
    "tracks/hit_offsets": "CSR row pointer over (event, query) pairs, e*N + n",
    "tracks/hit_index": "rows of the event's input `hits` array on the track (sigmoid(mask logit) >= 0.5)",
    "truth/match": "row of the input `tracks` matched to the query by the stage-1 matching costs, -1 none",
    "particles/valid": "the particle slot holds a truth particle",
}


def head_over(loader, head, device: torch.device, label: str) -> dict[str, np.ndarray]:
    """The head over every batch of `loader` (a `CacheLoader` of a stored or a live split, in event order):
    the predictions file's rows with truth, concatenated. The one loop evaluate runs a head with, from the cache
    or live (a fine-tuned model)."""
    rows = []
    with progress() as p:
        task = p.add_task(label, total=loader.split.num_events)
        for batch in loader:
            with torch.inference_mode():
                rows.append(track_columns(head, batch.to(device), with_truth=True))
            p.update(task, advance=batch.size)
    if not rows:
        raise HepregError(f"{label}: the split holds no events")
    return concat(rows)


def track_columns(head, flat: FlatBatch, with_truth: bool) -> dict[str, np.ndarray]:
    """The per-event and per-track arrays of one batch (the rows of the predictions file), in batch order.

    `head.predict_columns` decides the regression columns; hit lists need `flat.hit_index`.
    """
    from hepreg.models.head import matched_targets

    if flat.hit_index is None:
        raise HepregError("the batch does not say which input row each hit is (no hit_index); re-export the cache")
    B, N = flat.track_logit.shape
    cols = {f"tracks/{k}": v.float().cpu().numpy() for k, v in head.predict_columns(flat).items()}
    out: dict[str, np.ndarray] = {"events/event_id": flat.event_id.cpu().numpy()}
    prob = torch.sigmoid(flat.track_logit.float())  # [B, N]; an event without hits has no track
    out["tracks/valid_prob"] = torch.where(flat.num_hits[:, None] > 0, prob, 0.0).cpu().numpy()
    out.update(cols)
    hit, query = (flat.logit.float() >= _logit(ASSIGN_THRESHOLD)).nonzero(as_tuple=True)  # ordered by hit
    segment = flat.hit_event()[hit] * N + query
    order = torch.argsort(segment, stable=True)  # by (event, query), hits in input order within
    out["tracks/hit_index"] = flat.hit_index[hit[order]].cpu().numpy().astype(np.int32)
    out["tracks/hit_counts"] = torch.bincount(segment, minlength=B * N).cpu().numpy()
    if with_truth:
        true, valid = matched_targets(flat)  # [B, N, 4], [B, N]
        out["truth/match"] = torch.where(valid, flat.match, -1).cpu().numpy()
        for i, t in enumerate(TARGETS):
            out[f"truth/{t}"] = torch.where(valid, true[..., i], torch.nan).cpu().numpy()
            out[f"particles/{t}"] = flat.targets[..., i].cpu().numpy()
        out["particles/valid"] = flat.target_valid.cpu().numpy()
    return out


def _logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def concat(blocks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}


class PredictionWriter:
    """Appends blocks of rows to `<path>.partial`; `finish` renames it to `path`. Resumes a partial file whose
    `plan` (what is being predicted, with which checkpoints) is the same; starts it afresh otherwise."""

    def __init__(self, path: str | Path, plan: dict[str, Any], attrs: dict[str, Any]):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".partial")
        self.plan = plan
        self.file: h5py.File | None = None
        self.events_done = self.hits_done = 0
        if self.tmp.exists() and self._resume():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = h5py.File(self.tmp, "w")
        self.file.attrs.update({k: _attr(v) for k, v in {**attrs, "plan": plan}.items()})
        self._commit()

    def _resume(self) -> bool:
        try:
            f = h5py.File(self.tmp, "r+")
        except OSError:  # killed mid-write: HDF5 metadata may be inconsistent; start again
            self.tmp.unlink()
            return False
        import json

        if json.loads(f.attrs.get("plan", "null")) != json.loads(_attr(self.plan)) or PROGRESS not in f.attrs:
            f.close()
            self.tmp.unlink()
            return False
        progress = json.loads(f.attrs[PROGRESS])
        if progress["events"] == 0:  # nothing committed yet: cheaper to start again
            f.close()
            self.tmp.unlink()
            return False
        self.file, self.events_done, self.hits_done = f, progress["events"], progress["hits"]
        for name, ds in _datasets(f).items():  # cut back what an interrupted block may have appended
            n = self.hits_done if name == "tracks/hit_index" else (
                self.events_done * self._queries(f) + 1 if name == "tracks/hit_offsets" else self.events_done)
            if ds.shape[0] != n:
                ds.resize(n, axis=0)
        return True

    @staticmethod
    def _queries(f: h5py.File) -> int:
        return int(f["tracks/valid_prob"].shape[1])

    def _commit(self) -> None:
        import json

        self.file.attrs[PROGRESS] = json.dumps({"events": self.events_done, "hits": self.hits_done})
        self.file.flush()

    def append(self, rows: dict[str, np.ndarray]) -> None:
        """One block of rows (as `track_columns` makes them), committed once written."""
        f = self.file
        counts = rows["tracks/hit_counts"]
        offsets = self.hits_done + np.cumsum(counts)  # [B·N]
        data = {k: v for k, v in rows.items() if k != "tracks/hit_counts"}
        data["tracks/hit_offsets"] = offsets
        if "tracks/hit_offsets" not in f:
            _create(f, "tracks/hit_offsets", np.zeros(1, np.int64))
        for name, value in data.items():
            if name not in f:
                _create(f, name, value[:0])
            ds = f[name]
            n = ds.shape[0]
            ds.resize(n + len(value), axis=0)
            ds[n:] = value
        self.events_done += len(rows["events/event_id"])
        self.hits_done += int(counts.sum())
        self._commit()

    def finish(self) -> Path:
        for name, text in MEANINGS.items():
            if name in self.file:
                self.file[name].attrs["meaning"] = text
        self.file.attrs[PROGRESS] = "complete"
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.path

    def close(self) -> None:
        if self.file is not None and self.file.id.valid:
            self.file.close()


def _attr(v: Any) -> Any:
    """Attrs as HDF5 understands them: mappings and lists as JSON text."""
    import json

    return json.dumps(v, sort_keys=True) if isinstance(v, (dict, list, tuple)) else ("" if v is None else v)


def _create(f: h5py.File, name: str, value: np.ndarray) -> None:
    rows = max(1, (1 << 18) // max(1, value[:1].nbytes or value.itemsize))  # ~256 KiB chunks
    f.create_dataset(name, data=value, maxshape=(None,) + value.shape[1:], chunks=(rows,) + value.shape[1:],
                     compression="gzip", compression_opts=1, shuffle=True)


def _datasets(f: h5py.File) -> dict[str, h5py.Dataset]:
    out = {}
    f.visititems(lambda name, obj: out.__setitem__(name, obj) if isinstance(obj, h5py.Dataset) else None)
    return out


def merge(parts: list[Path], path: Path) -> Path:
    """Concatenate per-rank part files (event order = rank order) into one file at `path`, atomically."""
    tmp = path.with_name(path.name + ".partial")
    with h5py.File(parts[0], "r") as first, h5py.File(tmp, "w") as out:
        out.attrs.update({k: v for k, v in first.attrs.items()})
        _create(out, "tracks/hit_offsets", np.zeros(1, np.int64))
        hits = 0
        for p in parts:
            with h5py.File(p, "r") as f:
                for name, ds in _datasets(f).items():
                    value = ds[1:] + hits if name == "tracks/hit_offsets" else ds[:]  # each part's offsets from 0
                    if name not in out:
                        _create(out, name, value[:0])
                        out[name].attrs.update(dict(ds.attrs))
                    o = out[name]
                    n = o.shape[0]
                    o.resize(n + len(value), axis=0)
                    o[n:] = value
                hits += f["tracks/hit_index"].shape[0] if "tracks/hit_index" in f else 0
        for name, text in MEANINGS.items():
            if name in out:
                out[name].attrs["meaning"] = text
        out.attrs[PROGRESS] = "complete"
    os.replace(tmp, path)
    for p in parts:
        p.unlink()
    return path


def is_predictions(path: str | Path) -> bool:
    """Whether `path` is a predictions file hepreg wrote (complete or not): what --overwrite may replace."""
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("format") == FORMAT
    except OSError:
        return False


def open_predictions(path: str | Path) -> h5py.File:
    """A complete predictions file, or a HepregError saying what it is instead."""
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise HepregError(f"{path} cannot be opened as a predictions file: {e}") from None
    if f.attrs.get("format") != FORMAT or f.attrs.get(PROGRESS) != "complete":
        f.close()
        raise HepregError(f"{path} is not a complete hepreg predictions file")
    return f


EVAL_COLUMNS = ("events/event_id", "truth/match", "particles/valid", "tracks/valid_prob") + tuple(
    f"{g}/{t}" for g in ("tracks", "truth", "particles") for t in TARGETS)


def matched_tracks(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The matched queries of predictions with truth (rows of the file, or of `track_columns`), as evaluate
    compares them: pred, true [T, 4] (TARGETS order), event [T] (event within the rows), target [T], sigma_* [T]
    where the head predicts widths; per event event_id [E], targets [E, P, 4], valid [E, P]; and every predicted
    track (probability >= ASSIGN_THRESHOLD), matched or not: reco_pred [R, 4], reco_fake [R] (matched to no
    truth particle)."""
    match = rows["truth/match"]  # [E, N]
    sel = match >= 0
    event, _ = np.nonzero(sel)
    sigma = {k[len("tracks/"):]: v[sel] for k, v in rows.items() if k.startswith("tracks/sigma_")}
    reco = rows["tracks/valid_prob"] >= ASSIGN_THRESHOLD  # [E, N]
    return {
        **sigma,  # sigma_* [T] where the head predicts widths
        "reco_pred": np.stack([rows[f"tracks/{t}"][reco] for t in TARGETS], -1), "reco_fake": match[reco] < 0,
        "pred": np.stack([rows[f"tracks/{t}"][sel] for t in TARGETS], -1),
        "true": np.stack([rows[f"truth/{t}"][sel] for t in TARGETS], -1),
        "event": event, "target": match[sel], "event_id": rows["events/event_id"],
        "targets": np.stack([rows[f"particles/{t}"] for t in TARGETS], -1), "valid": rows["particles/valid"],
    }


def read_tracks(path: str | Path) -> dict[str, np.ndarray]:
    """`matched_tracks` of a predictions file."""
    with open_predictions(path) as f:
        if "truth/match" not in f:
            raise HepregError(f"{path} holds predictions on data without truth: nothing to compare them with")
        sigma = tuple(f"tracks/{k}" for k in f["tracks"] if k.startswith("sigma_"))
        return matched_tracks({k: f[k][:] for k in EVAL_COLUMNS + sigma})
