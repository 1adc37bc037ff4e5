"""What `evaluate` counts and measures from arrays of tracks and stage-1 outputs: resolutions against truth and
against the Cramér–Rao bound, the head's figures by the hit purity of its tracks, assignment efficiencies."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from hepreg.errors import HepregError
from hepreg.evaluation import metrics
from hepreg.evaluation.predictions import ASSIGN_THRESHOLD
from hepreg.models.assign_metrics import add_counts, assignment_counts, rates




def regression_metrics(pred: np.ndarray, true: np.ndarray, pt_bins: list[float],
                       eta_bins: list[float]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Overall and binned resolution, bias and charge mis-ID of tracks pred/true [T, 4]; also the residuals."""
    res = metrics.residuals(pred, true)
    pt, abs_eta = true[:, 0], np.abs(true[:, 1])
    misid = metrics.charge_misid(true[:, 3], pred[:, 3])
    rate = metrics.efficiency(np.array([misid.sum()]), np.array([misid.size]))
    out = {
        "tracks": int(len(true)),
        "overall": {k: {**metrics.summary(v), "outside_3sigma": metrics.outside(v)} for k, v in res.items()},
        "charge_misid": {k: v[0] for k, v in rate.items()},
        "vs_pt": {k: metrics.binned_summary(pt, v, pt_bins) for k, v in res.items()},
        "vs_eta": {k: metrics.binned_summary(abs_eta, v, eta_bins) for k, v in res.items()},
        "charge_misid_vs_pt": metrics.binned_efficiency(pt, misid, pt_bins),
    }
    return out, res


def bound_metrics(bound: np.ndarray, true: np.ndarray, pt_bins: list[float], eta_bins: list[float]) -> dict[str, Any]:
    """`regression_metrics`' resolutions for the Cramér–Rao bound of tracks bound [T, 3] (σ(q/pT)/|q/pT|, σ(η),
    σ(φ)) with truth [T, 4]: per bin, the core width that residuals drawn from each track's own bound would give
    (σ(pT)/pT is σ(q/pT)/|q/pT| to first order)."""
    cols = {"pt": bound[:, 0], "qpt": bound[:, 0], "eta": bound[:, 1], "phi": bound[:, 2]}
    pt, abs_eta = true[:, 0], np.abs(true[:, 1])
    return {"tracks": int(np.isfinite(bound[:, 0]).sum()),
            "overall": {k: metrics.bound_summary(v) for k, v in cols.items()},
            "vs_pt": {k: metrics.binned_bound(pt, v, pt_bins) for k, v in cols.items()},
            "vs_eta": {k: metrics.binned_bound(abs_eta, v, eta_bins) for k, v in cols.items()}}


PURITY_BINS = ((1.0, 1.0, "1.0"), (0.95, 1.0, "0.95–1.0"), (0.9, 0.95, "0.9–0.95"), (0.0, 0.9, "< 0.9"))


def purity_breakdown(pred: np.ndarray, true: np.ndarray, purity: np.ndarray) -> list[dict[str, Any]]:
    """The head's figures by the hit purity of each track's predicted hits (purity [T], NaN for none): share of
    tracks, core σ(q/pT)/|q/pT|, charge mis-ID and share of all wrong charges, so that a physicist sees
    whether the assignment or the head limits. A purity of exactly 1 is its own row."""
    res = metrics.residuals(pred, true)["qpt"]
    wrong = metrics.charge_misid(true[:, 3], pred[:, 3])
    total_wrong = max(int(wrong.sum()), 1)
    rows = []
    for lo, hi, label in PURITY_BINS + ((math.nan, math.nan, "no hits"),):
        if label == "1.0":
            sel = purity >= 1.0
        elif label == "no hits":
            sel = ~np.isfinite(purity)
        else:
            sel = (purity >= lo) & (purity < hi)
        rows.append({"purity": label, "tracks": int(sel.sum()), "share": float(sel.mean()) if len(sel) else math.nan,
                     "qpt_res": metrics.robust_width(res[sel]),
                     "charge_misid": float(wrong[sel].mean()) if sel.any() else math.nan,
                     "share_of_wrong_charges": float(wrong[sel].sum() / total_wrong)})
    return rows


class AssignmentTally:
    """Assignment counts of `hepreg.models.assign_metrics`, overall and in bins of true pT and |eta|.

    A bin's counts are the overall counts restricted to the truth particles in that bin (and the queries
    matched to them). Perfect-match (predicted mask equal to the true hits) is counted alongside.
    """

    def __init__(self, pt_bins: list[float], eta_bins: list[float]):
        self.edges = {"pt": pt_bins, "eta": eta_bins}
        self.total: dict | None = None
        self.perfect_total = 0
        self.bins: dict[str, list] = {a: [None] * (len(e) - 1) for a, e in self.edges.items()}
        self.perfect: dict[str, np.ndarray] = {a: np.zeros(len(e) - 1, dtype=np.int64) for a, e in self.edges.items()}

    def add(self, track_logit, mask_logit, hit_valid, target_valid, target_hits, targets, match) -> None:
        """track_logit [B, N], mask_logit [B, N, M], hit_valid [B, M], target_valid [B, P], target_hits
        [B, P, M], targets [B, P, 4], match [B, N] (truth slot per query, -1 none)."""
        pred_valid = torch.sigmoid(track_logit.float()) >= ASSIGN_THRESHOLD
        pred_hits = (torch.sigmoid(mask_logit.float()) >= ASSIGN_THRESHOLD) & hit_valid.unsqueeze(1)
        match = torch.where(match >= 0, match, -1)
        self.total = add_counts(self.total, assignment_counts(pred_valid, pred_hits, target_valid, target_hits, match))
        slot = match.clamp_min(0)  # [B, N]
        true_hits = torch.gather(target_hits, 1, slot[..., None].expand(-1, -1, target_hits.shape[-1]))  # [B, N, M]
        perfect = (match >= 0) & pred_valid & (pred_hits == true_hits).all(-1)  # [B, N]
        self.perfect_total += int(perfect.sum())
        for axis, x in (("pt", targets[..., 0]), ("eta", targets[..., 1].abs())):
            idx = torch.from_numpy(metrics.bin_index(x.cpu().numpy(), self.edges[axis])).to(match.device)  # [B, P]
            query_bin = torch.where(match >= 0, torch.gather(idx, 1, slot), -1)  # [B, N]
            for k in range(len(self.edges[axis]) - 1):
                in_bin = target_valid & (idx == k)
                m = torch.where(query_bin == k, match, -1)
                self.bins[axis][k] = add_counts(self.bins[axis][k],
                                                assignment_counts(pred_valid, pred_hits, in_bin, target_hits, m))
                self.perfect[axis][k] += int((perfect & (query_bin == k)).sum())

    def result(self) -> dict[str, Any]:
        if self.total is None:
            raise HepregError("no events to evaluate the assignment on")
        c = {k: float(v) for k, v in self.total.items()}
        overall = rates(c)
        overall["perfect_eff"] = self.perfect_total / max(c["targets"], 1.0)
        out: dict[str, Any] = {"overall": {**overall, "targets": int(c["targets"]), "predicted": int(c["predicted"]),
                                           "found": int(c["found"]), "fakes": int(c["fakes"])}}
        for axis, edges in self.edges.items():
            counts = [{k: float(v) for k, v in b.items()} for b in self.bins[axis]]
            targets = np.array([b["targets"] for b in counts])
            found = np.array([b["found"] for b in counts])
            binned = {
                "track_efficiency": metrics.efficiency(found, targets),
                "dm_efficiency": metrics.efficiency(np.array([b["double_majority"] for b in counts]), targets),
                "perfect_efficiency": metrics.efficiency(self.perfect[axis], targets),
            }
            for key, total in (("hit_efficiency", "hit_eff_sum"), ("hit_purity", "purity_sum")):
                with np.errstate(invalid="ignore", divide="ignore"):
                    mean = np.where(found > 0, np.array([b[total] for b in counts]) / np.maximum(found, 1), np.nan)
                binned[key] = {"count": found.astype(int).tolist(), "mean": mean.tolist(),
                               "err": [float("nan")] * len(mean)}
            out[f"vs_{axis}"] = {k: {"edges": [float(e) for e in edges], **v} for k, v in binned.items()}
        return out


def matched_purity(mask_logit, hit_valid, target_hits, match) -> tuple[np.ndarray, ...]:
    """Hit purity of each matched query's predicted hits (sigmoid >= ASSIGN_THRESHOLD) against its particle's:
    (event in batch, query, particle slot, purity; NaN for a query that predicts no hit), each [K]."""
    pred_hits = (torch.sigmoid(mask_logit.float()) >= ASSIGN_THRESHOLD) & hit_valid.unsqueeze(1)  # [B, N, M]
    slot = match.clamp_min(0)
    true_hits = torch.gather(target_hits, 1, slot[..., None].expand(-1, -1, target_hits.shape[-1]))  # [B, N, M]
    inter = (pred_hits & true_hits).sum(-1).double()
    npred = pred_hits.sum(-1).double()
    value = torch.where(npred > 0, inter / npred.clamp_min(1), torch.full_like(npred, float("nan")))
    b, n = (match >= 0).nonzero(as_tuple=True)
    return b.cpu().numpy(), n.cpu().numpy(), match[b, n].cpu().numpy(), value[b, n].cpu().numpy()


def fake_rates(reco_pred: np.ndarray, reco_fake: np.ndarray, pt_bins: list[float],
               eta_bins: list[float]) -> dict[str, dict]:
    """Fraction of predicted tracks matched to no truth particle, in bins of their predicted pT and |eta|."""
    return {"vs_pt": metrics.binned_efficiency(reco_pred[:, 0], reco_fake, pt_bins),
            "vs_eta": metrics.binned_efficiency(np.abs(reco_pred[:, 1]), reco_fake, eta_bins)}
