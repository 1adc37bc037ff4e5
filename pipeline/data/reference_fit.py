"""Classical least-squares track fit on truth-assigned hits: the resolution a learned head should approach.

For each muon (hits with truthLink = its row):
- phi: circular mean of its trigger-strip hits (RPC/TGC measure the second coordinate); without any, the
  mean phi of its tube centres (sector precision).
- bending plane: each drift tube gives the wire's position in the muon's r-z plane (the wire crosses that
  plane at r = y_wire / cos(phi - phi_sector)) and a drift circle. In a frame rotated to the muon's rough
  direction (u along it, v across) the trajectory is v(u) = a + b u + c h(u), with h the field shape of the
  toy spectrometer (parabola inside the toroid, straight line after), so the fit is linear in (a, b, c).
  The left/right ambiguity of each drift circle is resolved iteratively from the previous fit, from three
  starts (wire positions only; a straight line; the opposite curvature), keeping the best chi2. c is the curvature q / R = 0.3 B q sin(theta) / pT, which gives q/pT; theta - atan(b)
  gives eta. No vertex constraint, no multiple-scattering model: a standalone spectrometer fit.
A muon is fitted when it has at least 6 tube hits spanning a well-conditioned (a, b, c) system.

The field model is the toy spectrometer's (`hepreg.data.synthetic`), so the numbers are meaningful for
generated datasets; on real data they are only a rough straight-field baseline.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from hepreg.config import EvalConfig
from hepreg.data.layout import RAW_FEATURES
from hepreg.data.reader import Dataset, EventArrays, open_dataset
from hepreg.data.synthetic import B_FIELD, FIELD_INNER, FIELD_OUTER, TECH_MDT, field_deflection, shell_path
from hepreg.metrics import bias, robust_width, wrap_phi
from hepreg.progress import progress

F = {c: i for i, c in enumerate(RAW_FEATURES)}
MIN_TUBE_HITS = 6
LR_ITERATIONS = 4
MAX_COND = 1e10  # of the normal equations with u in metres


def _circular_mean(angles: np.ndarray, groups: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    s = np.bincount(groups, np.sin(angles), minlength=n)
    c = np.bincount(groups, np.cos(angles), minlength=n)
    return np.arctan2(s, c), np.bincount(groups, minlength=n) > 0


def fit_block(block: EventArrays) -> tuple[np.ndarray, np.ndarray]:
    """Fit every valid muon of a block. Returns pred [E, P, 4] (pt, eta, phi, q) and valid [E, P]."""
    E, P = block.particle_valid.shape
    pred = np.zeros((E, P, 4), dtype=np.float32)
    valid = np.zeros((E, P), dtype=bool)
    track_of = np.full((E, P), -1, dtype=np.int64)
    e_idx, p_idx = np.nonzero(block.particle_valid)
    T = len(e_idx)
    if T == 0:
        return pred, valid
    track_of[e_idx, p_idx] = np.arange(T)
    he, hk = np.nonzero((block.truth_link >= 0) & block.hit_valid)
    h = block.hits[he, hk].astype(np.float64)  # [H, 23]
    trk = track_of[he, block.truth_link[he, hk]]
    tech = np.round(h[:, F["spacePoint_technology"]])
    is_mdt = tech == TECH_MDT

    # phi from the strips, else from the tube centres
    lo = h[:, [F["spacePoint_globEdgeLowX"], F["spacePoint_globEdgeLowY"], F["spacePoint_globEdgeLowZ"]]] * 1e3
    hi = h[:, [F["spacePoint_globEdgeHighX"], F["spacePoint_globEdgeHighY"], F["spacePoint_globEdgeHighZ"]]] * 1e3
    mid = 0.5 * (lo + hi)  # mm: wire centre or strip crossing
    phi_hit = np.arctan2(mid[:, 1], mid[:, 0])
    phi_strip, has_strip = _circular_mean(phi_hit[~is_mdt], trk[~is_mdt], T)
    phi_tube, _ = _circular_mean(phi_hit[is_mdt], trk[is_mdt], T)
    phi = np.where(has_strip, phi_strip, phi_tube)

    # tube hits in each muon's bending plane
    m_trk = trk[is_mdt]
    m_mid = mid[is_mdt]
    barrel = h[is_mdt, F["spacePoint_stationIndex"]] < 1.0  # scaled stationIndex: barrel 0-0.4, endcap >= 1.3
    y_w = np.hypot(m_mid[:, 0], m_mid[:, 1])
    cos_d = np.cos(np.arctan2(m_mid[:, 1], m_mid[:, 0]) - phi[m_trk])
    rho = y_w / cos_d
    z = m_mid[:, 2]
    drift = h[is_mdt, F["spacePoint_driftR"]] / np.where(barrel, 1.0, cos_d)  # endcap radii are in y
    n_tube = np.bincount(m_trk, minlength=T)

    theta0 = np.arctan2(np.bincount(m_trk, rho, T), np.bincount(m_trk, z, T))  # rough direction
    st, ct = np.sin(theta0)[m_trk], np.cos(theta0)[m_trk]
    u = rho * st + z * ct  # along the rough direction
    v_wire = -rho * ct + z * st  # across it, along n = (-cos, sin) in (r, z)
    s_in, s_out = shell_path(theta0, FIELD_INNER)[m_trk], shell_path(theta0, FIELD_OUTER)[m_trk]
    hu = field_deflection(u, s_in, s_out, 1.0)
    dhu = np.clip(np.minimum(u, s_out) - s_in, 0.0, None)
    A = np.stack([np.ones_like(u), u * 1e-3, hu * 1e-6], axis=1)  # metres keep the system conditioned
    N = np.zeros((T, 3, 3))
    np.add.at(N, m_trk, A[:, :, None] * A[:, None, :])
    with np.errstate(invalid="ignore", divide="ignore"):
        cond = np.linalg.cond(N)
    ok = (n_tube >= MIN_TUBE_HITS) & np.isfinite(cond) & (cond < MAX_COND)
    Nreg = np.where(ok[:, None, None], N, np.eye(3))

    def solve(v):
        rhs = np.zeros((T, 3))
        np.add.at(rhs, m_trk, A * v[:, None])
        return np.linalg.solve(Nreg, rhs[..., None])[..., 0]  # [T, 3]: a, b [per m], c [per m^2]

    def resolve_sides(x):
        """Iterate: choose each drift circle's side from the trajectory, refit. Returns (x, chi2 [T])."""
        for _ in range(LR_ITERATIONS):
            a, b, c = x[m_trk, 0], x[m_trk, 1] * 1e-3, x[m_trk, 2] * 1e-6
            v_pred = a + b * u + c * hu
            side = np.where(v_pred >= v_wire, 1.0, -1.0)
            v_meas = v_wire + side * drift * np.sqrt(1 + (b + c * dhu) ** 2)
            x = solve(v_meas)
        resid = v_meas - (x[m_trk, 0] + x[m_trk, 1] * 1e-3 * u + x[m_trk, 2] * 1e-6 * hu)
        return x, np.bincount(m_trk, resid ** 2, T)

    # The wire-only start can settle in the mirror solution of the left/right choices: also start from a
    # straight line and from the opposite curvature, and keep the best chi2.
    x0 = solve(v_wire)
    x, chi2 = resolve_sides(x0)
    for scale in (0.0, -1.0):
        x_alt, chi2_alt = resolve_sides(x0 * np.array([1.0, 1.0, scale]))
        better = chi2_alt < chi2
        x, chi2 = np.where(better[:, None], x_alt, x), np.where(better, chi2_alt, chi2)

    b, kappa = x[:, 1] * 1e-3, x[:, 2] * 1e-6  # 1/mm
    theta = theta0 - np.arctan(b)
    with np.errstate(divide="ignore", invalid="ignore"):
        qpt = kappa / (0.3e-3 * B_FIELD * np.abs(np.sin(theta)))
        pt = np.minimum(1.0 / np.abs(qpt), 1e5)
        eta = -np.log(np.tan(theta / 2))
    ok &= np.isfinite(pt) & np.isfinite(eta)
    out = np.stack([pt, eta, phi, np.where(qpt >= 0, 1.0, -1.0)], axis=1)
    pred[e_idx, p_idx] = np.where(ok[:, None], out, 0.0)
    valid[e_idx, p_idx] = ok
    return pred, valid


def fit_events(dataset: Dataset, start: int, stop: int, block_events: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Reference fit of events [start, stop): pred [E, P, 4] float32 (pt, eta, phi, q), valid [E, P] bool."""
    preds, valids = [], []
    with progress() as bar:
        task = bar.add_task("reference fit", total=stop - start)
        for a in range(start, stop, block_events):
            b = min(stop, a + block_events)
            pred, valid = fit_block(dataset.read(a, b))
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
