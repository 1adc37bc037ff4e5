"""The classical reference: a least-squares track fit on truth-assigned hits, the resolution a learned head
should approach. The fit itself is `hepreg.models.track_fit` (the same one a head may use as its proxy); this
module gathers each muon's truth hits into padded tracks, runs it, and tabulates the result.

Two references: the standalone spectrometer fit, and the same fit with the beam line (muons come from the
origin, with the multiple-scattering error of the calorimeter), which a head can learn from the data too.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from hepreg.config import EvalConfig
from hepreg.data.reader import Dataset, EventArrays, open_dataset
from hepreg.metrics import bias, robust_width, wrap_phi
from hepreg.models.track_fit import fit_tracks
from hepreg.progress import progress


def truth_tracks(block: EventArrays) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each valid muon's truth hits, padded: (hits [T, L, 23], mask [T, L], event [T], slot [T])."""
    e_idx, p_idx = np.nonzero(block.particle_valid)
    E, P = block.particle_valid.shape
    track_of = np.full((E, P), -1, dtype=np.int64)
    track_of[e_idx, p_idx] = np.arange(len(e_idx))
    he, hk = np.nonzero((block.truth_link >= 0) & block.hit_valid)
    trk = track_of[he, block.truth_link[he, hk]]
    he, hk, trk = he[trk >= 0], hk[trk >= 0], trk[trk >= 0]
    order = np.argsort(trk, kind="stable")
    he, hk, trk = he[order], hk[order], trk[order]
    counts = np.bincount(trk, minlength=len(e_idx))
    pos = np.arange(len(trk)) - np.repeat(np.cumsum(counts) - counts, counts)
    L = int(counts.max()) if len(counts) else 0
    hits = np.zeros((len(e_idx), L, block.hits.shape[-1]), dtype=np.float32)
    mask = np.zeros((len(e_idx), L), dtype=bool)
    hits[trk, pos] = block.hits[he, hk]
    mask[trk, pos] = True
    return hits, mask, e_idx, p_idx


def fit_block(block: EventArrays, vertex: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Fit every valid muon of a block. Returns pred [E, P, 4] (pt, eta, phi, q) and valid [E, P]."""
    E, P = block.particle_valid.shape
    pred = np.zeros((E, P, 4), dtype=np.float32)
    valid = np.zeros((E, P), dtype=bool)
    hits, mask, e_idx, p_idx = truth_tracks(block)
    if len(e_idx) == 0:
        return pred, valid
    fit = fit_tracks(torch.from_numpy(hits), torch.from_numpy(mask), vertex=vertex)
    ok = fit.ok.numpy()
    out = torch.stack([fit.pt, fit.eta, fit.phi, torch.where(fit.qpt >= 0, 1.0, -1.0)], -1).numpy()
    pred[e_idx, p_idx] = np.where(ok[:, None], out, 0.0)
    valid[e_idx, p_idx] = ok
    return pred, valid


def fit_events(dataset: Dataset, start: int, stop: int, block_events: int = 4096,
               vertex: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Reference fit of events [start, stop): pred [E, P, 4] float32 (pt, eta, phi, q), valid [E, P] bool."""
    preds, valids = [], []
    with progress() as bar:
        task = bar.add_task("reference fit", total=stop - start)
        for a in range(start, stop, block_events):
            b = min(stop, a + block_events)
            pred, valid = fit_block(dataset.read(a, b), vertex=vertex)
            preds.append(pred)
            valids.append(valid)
            bar.update(task, advance=b - a)
    if not preds:
        P = dataset.max_tracks
        return np.zeros((0, P, 4), dtype=np.float32), np.zeros((0, P), dtype=bool)
    return np.concatenate(preds), np.concatenate(valids)


def resolution_table(pred: np.ndarray, valid: np.ndarray, truth: np.ndarray, truth_valid: np.ndarray,
                     pt_bins: list[float]) -> list[dict]:
    """Per true-pT bin: fitted fraction, resolution (central-68 % half-width) and bias (median) of pT/pT,
    q/pT (relative to 1/pT), eta and phi, and charge mis-identification."""
    fitted = valid & truth_valid
    rows = []
    edges = list(zip(pt_bins[:-1], pt_bins[1:])) + [(pt_bins[0], pt_bins[-1])]
    for lo, hi in edges:
        in_bin = truth_valid & (truth[..., 0] >= lo) & (truth[..., 0] < hi)
        sel = in_bin & fitted
        p, t = pred[sel].astype(np.float64), truth[sel].astype(np.float64)
        r_pt = (p[:, 0] - t[:, 0]) / t[:, 0]
        r_qpt = (p[:, 3] / p[:, 0] - t[:, 3] / t[:, 0]) * t[:, 0]
        r_eta = p[:, 1] - t[:, 1]
        r_phi = wrap_phi(p[:, 2] - t[:, 2])
        rows.append({
            "pt_lo": lo, "pt_hi": hi, "tracks": int(in_bin.sum()), "fitted": int(sel.sum()),
            "pt_res": robust_width(r_pt), "pt_bias": bias(r_pt),
            "qpt_res": robust_width(r_qpt), "qpt_bias": bias(r_qpt),
            "eta_res": robust_width(r_eta), "eta_bias": bias(r_eta),
            "phi_res": robust_width(r_phi), "phi_bias": bias(r_phi),
            "charge_misid": float((p[:, 3] != t[:, 3]).mean()) if len(p) else float("nan"),
        })
    return rows


def run(data: str | Path, max_events: int | None = None) -> list[dict]:
    """`hepreg reference-fit DATA`: fit every event and print the resolution table per pT bin."""
    ds = open_dataset(data, max_events=max_events)
    pred, valid = fit_events(ds, 0, ds.num_events)
    truth, truth_valid = [], []
    for a in range(0, ds.num_events, 16384):
        flat = ds.read_flat(a, min(ds.num_events, a + 16384))
        truth.append(flat.targets)
        truth_valid.append(flat.particle_valid)
    rows = resolution_table(pred, valid, np.concatenate(truth), np.concatenate(truth_valid), EvalConfig().pt_bins)
    table = Table(title=f"reference fit on truth-assigned hits: {ds.path} ({ds.num_events} events)")
    for col in ("pT [GeV]", "muons", "fitted", "σ(pT)/pT  bias", "σ(q/pT)·pT  bias", "σ(η)  bias",
                "σ(φ) [mrad]  bias", "q mis-ID"):
        table.add_column(col, justify="right")
    for i, r in enumerate(rows):
        label = "all" if i == len(rows) - 1 else f"{r['pt_lo']:g}–{r['pt_hi']:g}"
        table.add_row(label, f"{r['tracks']}", f"{r['fitted'] / max(r['tracks'], 1):.1%}",
                      f"{r['pt_res']:.2%}  {r['pt_bias']:+.2%}", f"{r['qpt_res']:.2%}  {r['qpt_bias']:+.2%}",
                      f"{r['eta_res']:.4f}  {r['eta_bias']:+.4f}",
                      f"{r['phi_res'] * 1e3:.2f}  {r['phi_bias'] * 1e3:+.2f}", f"{r['charge_misid']:.2%}")
    out = Console()
    if not out.is_terminal:
        out = Console(width=120)  # logs and pipes: do not squeeze the table to 80 columns
    out.print(table)
    return rows
