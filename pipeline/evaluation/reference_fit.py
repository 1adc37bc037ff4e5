"""The references on truth-assigned hits: what a learned head is measured against.

Three references for each muon, from its own hits (`truth_tracks`):
- `standalone`: the linear least-squares fit of `hepreg.physics.linear_fit`, without the beam line (the
  classical spectrometer fit, kept for comparison);
- `optimal`: the optimal fit of `hepreg.physics.fit` (full detector model, beam line, fitted scattering),
  which reaches the Cramér–Rao bound;
- `bound`: the Cramér–Rao bound of each muon (`hepreg.physics.bound`), at its true parameters.
This module gathers the truth hits into padded tracks, runs them, and tabulates the result (`hepreg
reference-fit`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from hepreg.settings import EvalConfig
from hepreg.data.reader import Dataset, EventArrays, open_dataset
from hepreg.evaluation.metrics import bias, gaussian_core_width, robust_width, wrap_phi
from hepreg.physics.bound import track_bound
from hepreg.physics.fit import fit_hits
from hepreg.physics.linear_fit import fit_tracks
from hepreg.physics.measurements import one_thread, theta_of
from hepreg.runs.progress import progress


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


REFERENCES = ("standalone", "optimal")


@dataclass
class References:
    """Per (event, particle slot): each reference fit's prediction [E, P, 4] (pt, eta, phi, q) and whether it
    fitted [E, P]; the bound's widths [E, P, 3] (σ(q/pT)/|q/pT|, σ(η), σ(φ) [rad]; NaN where none)."""
    fits: dict[str, tuple[np.ndarray, np.ndarray]]
    bound: np.ndarray


def reference_block(block: EventArrays) -> References:
    """Both fits and the bound for every valid muon of a block of events."""
    E, P = block.particle_valid.shape
    hits, mask, e_idx, p_idx = truth_tracks(block)
    bound = np.full((E, P, 3), np.nan, dtype=np.float64)
    fits = {}
    raw, m = torch.from_numpy(hits), torch.from_numpy(mask)
    for name in REFERENCES:
        pred = np.zeros((E, P, 4), dtype=np.float32)
        valid = np.zeros((E, P), dtype=bool)
        if len(e_idx):
            with one_thread():
                fit = fit_tracks(raw, m, vertex=False) if name == "standalone" else fit_hits(raw, m)
            ok = fit.ok.numpy()
            pt = torch.where(fit.ok, 1.0 / fit.qpt.abs().clamp_min(1e-5), 0.0)
            out = torch.stack([pt, fit.eta, fit.phi, torch.where(fit.qpt >= 0, 1.0, -1.0)], -1).numpy()
            pred[e_idx, p_idx] = np.where(ok[:, None], out, 0.0)
            valid[e_idx, p_idx] = ok
        fits[name] = pred, valid
    if len(e_idx):
        t = torch.from_numpy(block.targets[e_idx, p_idx].astype(np.float64))  # [T, 4] pt, eta, phi, q
        qpt = t[:, 3] / t[:, 0]
        b = track_bound(raw, m, qpt, theta_of(t[:, 1]), t[:, 2])
        bound[e_idx, p_idx] = torch.stack([b.relative_qpt(qpt), b.eta, b.phi], -1).numpy()
    return References(fits, bound)


def reference_events(dataset: Dataset, start: int, stop: int, block_events: int = 4096) -> References:
    """`reference_block` over events [start, stop) of a dataset, in event order."""
    parts = []
    with progress() as bar:
        task = bar.add_task("reference fits and bound", total=stop - start)
        for a in range(start, stop, block_events):
            b = min(stop, a + block_events)
            parts.append(reference_block(dataset.read(a, b)))
            bar.update(task, advance=b - a)
    if not parts:
        P = dataset.max_tracks
        empty = (np.zeros((0, P, 4), dtype=np.float32), np.zeros((0, P), dtype=bool))
        return References({name: empty for name in REFERENCES}, np.zeros((0, P, 3)))
    fits = {name: (np.concatenate([p.fits[name][0] for p in parts]), np.concatenate([p.fits[name][1] for p in parts]))
            for name in REFERENCES}
    return References(fits, np.concatenate([p.bound for p in parts]))


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


def bound_table(bound: np.ndarray, truth: np.ndarray, use: np.ndarray, pt_bins: list[float]) -> list[dict]:
    """Per true-pT bin (and all): the core widths that residuals drawn from each muon's own bound would give
    (`metrics.gaussian_core_width`) of q/pT (relative), eta and phi, over the muons `use` [E, P]."""
    rows = []
    for lo, hi in list(zip(pt_bins[:-1], pt_bins[1:])) + [(pt_bins[0], pt_bins[-1])]:
        sel = use & (truth[..., 0] >= lo) & (truth[..., 0] < hi)
        b = bound[sel]
        rows.append({"pt_lo": lo, "pt_hi": hi, "tracks": int(sel.sum()),
                     "qpt_res": gaussian_core_width(b[:, 0]), "eta_res": gaussian_core_width(b[:, 1]),
                     "phi_res": gaussian_core_width(b[:, 2])})
    return rows


def run(data: str | Path, max_events: int | None = None) -> dict[str, list[dict]]:
    """`hepreg reference-fit DATA`: both fits and the bound on every event; prints them per pT bin and returns
    {"standalone": rows, "optimal": rows, "bound": rows} (`resolution_table` and `bound_table` rows)."""
    ds = open_dataset(data, max_events=max_events)
    refs = reference_events(ds, 0, ds.num_events)
    truth, truth_valid = [], []
    for a in range(0, ds.num_events, 16384):
        flat = ds.read_flat(a, min(ds.num_events, a + 16384))
        truth.append(flat.targets)
        truth_valid.append(flat.particle_valid)
    truth, truth_valid = np.concatenate(truth), np.concatenate(truth_valid)
    bins = EvalConfig().pt_bins
    out = {name: resolution_table(*refs.fits[name], truth, truth_valid, bins) for name in REFERENCES}
    out["bound"] = bound_table(refs.bound, truth, truth_valid & np.isfinite(refs.bound[..., 0]), bins)
    table = Table(title=f"reference fits on truth-assigned hits against the Cramér–Rao bound: {ds.path} "
                        f"({ds.num_events} events)")
    for col in ("pT [GeV]", "muons", "fitted", "σ(q/pT)·pT standalone", "optimal", "bound", "optimal/bound",
                "σ(η) optimal", "bound", "σ(φ) [mrad] optimal", "bound", "q mis-ID standalone", "optimal"):
        table.add_column(col, justify="right")
    for i, (s, o, b) in enumerate(zip(out["standalone"], out["optimal"], out["bound"])):
        label = "all" if i == len(out["bound"]) - 1 else f"{s['pt_lo']:g}–{s['pt_hi']:g}"
        table.add_row(label, f"{o['tracks']}", f"{o['fitted'] / max(o['tracks'], 1):.1%}", f"{s['qpt_res']:.2%}",
                      f"{o['qpt_res']:.2%}", f"{b['qpt_res']:.2%}", _ratio(o["qpt_res"], b["qpt_res"]),
                      f"{o['eta_res']:.5f}", f"{b['eta_res']:.5f}", f"{o['phi_res'] * 1e3:.2f}",
                      f"{b['phi_res'] * 1e3:.2f}", f"{s['charge_misid']:.2%}", f"{o['charge_misid']:.2%}")
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # logs and pipes: do not squeeze the table
    console.print(table)
    console.print("The bound assumes Gaussian errors, every drift circle's side resolved and perfect assignment "
                  "(`hepreg.physics.bound`): a lower bound, reached by an efficient estimator on truth hits.")
    return out


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b and np.isfinite(a / b) else "–"
