"""`hepreg evaluate`: physics performance of a run on one split, against the classical reference fit.

Three sources, all for the same events of the split:
- regression: the trained head (`head/best.pt`) on the cache split, each query compared with the truth
  particle the stage-1 matching assigned it;
- reference: the least-squares fit on truth-assigned hits (`hepreg.reference_fit`), standalone and
  with the beam line (muons come from the origin), the resolutions the head should approach;
- assignment: the frozen stage-1 model re-run on the split from HDF5, because the per-hit truth needed for
  hit efficiency and purity is not kept in a pruned cache.
With `--model` (a fine-tuned checkpoint of `hepreg finetune`) one more series: its own stage 1 run live on the
split's HDF5 events (its outputs differ from the cache's) and its head on them, beside the frozen head it started
from; its assignment figures beside the frozen stage 1's, and the training cost of each.
Writes `runs/<name>/eval/<split>/metrics.json`, the plots and the config that made them, and prints a summary
table; results of an earlier evaluation of the same split are replaced only with `overwrite`.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich import box
from rich.table import Table

from hepreg import metrics, plots
from hepreg.cache.loader import CacheLoader
from hepreg.cache.store import check_dataset
from hepreg.config import Config, load_sweep
from hepreg.data.batching import HitLoader
from hepreg.data.reader import open_dataset, split_ranges
from hepreg.reference_fit import References, reference_events
from hepreg.digest import sha256_file
from hepreg.distributed import resolve_device
from hepreg.errors import CacheError, ConfigError, DataError, HepregError
from hepreg.frozen import FrozenAssigner
from hepreg.models.assign_metrics import add_counts, assignment_counts, rates
from hepreg.models.matcher import match_queries
from hepreg.outputs import guard, replacing, write_config
from hepreg.predictions import concat, matched_tracks, open_predictions, read_tracks, track_columns
from hepreg.progress import console, progress, results
from hepreg.runs import BEST, RunDir, atomic_write, load_checkpoint, stage_lock
from hepreg.trained import FINETUNED, load_head, load_trained

ASSIGN_THRESHOLD = 0.5  # a query is a track, and a hit is in its mask, when sigmoid(logit) >= 0.5
PLOT_FILES = ("residuals.png", "resolution_vs_pt.png", "resolution_vs_eta.png", "charge_misid_vs_pt.png",
              "efficiency_vs_pt.png", "efficiency_vs_eta.png", "predicted_vs_true.png", "fake_rate.png")
OPTIONAL_PLOTS = ("pulls.png",)  # when the head predicts uncertainties


# ---------------------------------------------------------------------------------------------- regression

def predictions_file(cfg: Config, split: str, head_path: Path, start: int, stop: int,
                     data_sha256: str) -> Path | None:
    """`hepreg predict`'s file for this split when it holds this head's predictions on these events (of the
    dataset whose fingerprint is `data_sha256`)."""
    rd = RunDir(cfg)
    path = rd.predictions(split)
    if not path.is_file():
        return None
    try:
        with open_predictions(path) as f:
            a = dict(f.attrs)
    except HepregError:
        return None
    same = (a.get("head_sha256") == sha256_file(head_path) and a.get("stage1_sha256") == sha256_file(rd.assign_best)
            and a.get("split") == split and json.loads(a.get("event_range", "null")) == [start, stop]
            and a.get("data") == str(cfg.data.path) and a.get("data_sha256") == data_sha256
            and bool(a.get("has_truth")))
    return path if same else None


def head_predictions(cfg: Config, split: str, device: torch.device, head_path: Path, start: int,
                     stop: int, data_sha256: str) -> dict[str, np.ndarray]:
    """The head's matched, valid queries on the split with their truth (`hepreg.predictions.matched_tracks`):
    read from `hepreg predict`'s file of this head and split when there is one, else computed on the cache
    split with the same code that writes that file.

    Returns pred, true [T, 4] (TARGETS order), event [T] (split-local event index), target [T] (the truth
    particle's slot), and for every event of the split, in order: event_id [E], targets [E, P, 4], valid [E, P];
    and for every query predicted a track (sigmoid(track logit) >= ASSIGN_THRESHOLD): reco_pred [R, 4] and
    reco_fake [R] (matched to no truth particle).
    """
    path = predictions_file(cfg, split, head_path, start, stop, data_sha256)
    if path is not None:
        console.print(f"head predictions read from {path}")
        return read_tracks(path)
    rd = RunDir(cfg)
    stage1 = rd.assign_best
    head = load_head(head_path, sha256_file(stage1), stage1).to(device)
    loader = CacheLoader(rd.cache_split(split), batch_size=cfg.head_train.batch_size, shuffle=False,
                         in_memory=cfg.head_train.in_memory, min_threshold=head.cfg.threshold,
                         expect_checkpoint=stage1)
    rows = []
    with progress() as p:
        task = p.add_task(f"head on {split}", total=loader.split.num_events)
        for batch in loader:
            with torch.inference_mode():
                rows.append(track_columns(head, batch.to(device), with_truth=True))
            p.update(task, advance=batch.size)
    if not rows:
        raise CacheError(f"cache split {loader.split.path} holds no events")
    return matched_tracks(concat(rows))


def live_predictions(cfg: Config, split: str, assigner: FrozenAssigner, head, device: torch.device) -> dict:
    """`head_predictions` of a stage 1 and head that have no cache (a fine-tuned model): the stage-1 model run on
    the split's HDF5 events as export runs it (`hepreg.frozen.LiveSplit`), the head on its outputs."""
    from hepreg.frozen import LiveSplit

    live = LiveSplit(cfg, split, assigner, head.cfg.threshold)
    loader = CacheLoader(live, batch_size=cfg.head_train.batch_size, shuffle=False, in_memory="no")
    rows = []
    with progress() as p:
        task = p.add_task(f"fine-tuned model on {split}", total=live.num_events)
        for batch in loader:
            with torch.inference_mode():
                rows.append(track_columns(head, batch.to(device), with_truth=True))
            p.update(task, advance=batch.size)
    return matched_tracks(concat(rows))


def training_rate(folder: Path) -> float:
    """Mean training events/s over the epochs of a stage's metrics.csv (nan when there are none)."""
    import csv

    path = Path(folder) / "metrics.csv"
    if not path.is_file():
        return math.nan
    with open(path, newline="") as f:
        rates_ = [float(r["events_per_s"]) for r in csv.DictReader(f) if r.get("events_per_s") not in (None, "", "nan")]
    return float(np.mean(rates_)) if rates_ else math.nan


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


def reference_tracks(refs: References, name: str, true: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A reference fit's predictions and truth [T, 4] of the fitted particles, from `reference_events` of the
    split; true [E, P, 4] and valid [E, P] are the truth of the same events (from the cache, in event order)."""
    fit, ok = refs.fits[name]  # [E, P', 4], [E, P']
    p = min(fit.shape[1], true.shape[1])
    use = ok[:, :p] & valid[:, :p]
    return fit[:, :p][use], true[:, :p][use]


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


# ---------------------------------------------------------------------------------------------- assignment

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


def assignment_metrics(cfg: Config, dataset, start: int, stop: int, device: torch.device,
                       assigner: FrozenAssigner | None = None) -> tuple[dict[str, Any], np.ndarray]:
    """Run the frozen stage-1 model (the run's, or `assigner`) over events [start, stop) of the dataset and tally
    the assignment.

    Also returns the event_numbers of the events in dataset order [stop - start], to check the cache against.
    """
    if assigner is None:
        assigner = FrozenAssigner.from_checkpoint(RunDir(cfg).assign_best, device)
    loader = HitLoader(dataset, start, stop, shuffle=False, batch_size=cfg.data.batch_size,
                       bucket_window=cfg.data.bucket_window, seed=cfg.seed)
    tally = AssignmentTally(cfg.eval.pt_bins, cfg.eval.eta_bins)
    event_id = np.full(stop - start, -1, dtype=np.int64)
    purity = np.full((stop - start, dataset.max_tracks), np.nan)  # of the query matched to each particle
    with progress() as p:
        task = p.add_task("stage 1 on split", total=stop - start)
        for batch in loader:
            batch = batch.to(device)
            final = assigner.forward(batch).final
            track_logit, mask_logit = final["track_logit"].float(), final["mask_logit"].float()
            match = match_queries(track_logit, mask_logit, batch.hit_valid, batch.particle_valid,
                                  batch.particle_hit_valid, assigner.config.assign)
            tally.add(track_logit, mask_logit, batch.hit_valid, batch.particle_valid, batch.particle_hit_valid,
                      batch.targets, match)
            local = batch.index.cpu().numpy() - start
            event_id[local] = batch.event_id.cpu().numpy()
            b, n, slot, value = matched_purity(mask_logit, batch.hit_valid, batch.particle_hit_valid, match)
            purity[local[b], slot] = value
            p.update(task, advance=batch.size)
    return tally.result(), event_id, purity


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


# ---------------------------------------------------------------------------------------------- output

def _json_ready(x: Any) -> Any:
    """NaN/inf -> null and numpy scalars -> Python, so metrics.json is strict JSON."""
    if isinstance(x, dict):
        return {k: _json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_ready(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def summary_tables(result: dict[str, Any]) -> list[Table]:
    reg = result["regression"]
    t = Table(title=f"regression on {result['split']} ({result['events']:,} events)", header_style="bold",
              box=box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("quantity")
    for method in reg:
        t.add_column(plots.STYLE[method]["label"], justify="right")
    rows = [("tracks", lambda r: f"{r['tracks']:,}"),
            ("σ(pT)/pT", lambda r: f"{r['overall']['pt']['width']:.4f}"),
            ("bias ΔpT/pT", lambda r: f"{r['overall']['pt']['bias']:+.4f}"),
            ("σ(q/pT)/|q/pT|", lambda r: f"{r['overall']['qpt']['width']:.4f}"),
            ("σ(η)", lambda r: f"{r['overall']['eta']['width']:.2e}"),
            ("σ(φ) (mrad)", lambda r: f"{1e3 * r['overall']['phi']['width']:.3f}"),
            ("q/pT beyond 3σ", lambda r: f"{100 * r['overall']['qpt']['outside_3sigma']:.2f} %"),
            ("charge mis-ID", lambda r: f"{100 * r['charge_misid']['eff']:.3f} %")]
    for name, fmt in rows:
        t.add_row(name, *(_cell(fmt, r) for r in reg.values()))
    tables = [t, pt_table(result), bound_table(result)] + ([finetuned_table(result)] if "finetuned" in reg else [])
    if "purity" in result:
        tables.append(purity_table(result))
    if "pulls" in result:
        tables.append(pull_table(result["pulls"]))
    s = Table(title=f"assignment on {result['split']} (fractions of true or predicted tracks, hits)",
              header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    keys = ("track_eff", "fake_rate", "hit_eff", "hit_purity", "dm_eff", "perfect_eff")
    tuned = "assignment_finetuned" in result
    if tuned:
        s.add_column("stage 1", no_wrap=True, min_width=9)
    for name in ("true tracks", "track eff", "fake rate", "hit eff", "hit purity", "DM eff", "perfect eff"):
        s.add_column(name, justify="right", min_width=6 if name == "true tracks" else 7)  # headers wrap, not numbers
    a = result["assignment"]["overall"]
    s.add_row(*(["frozen"] if tuned else []), f"{a['targets']:,}", *(f"{a[k]:.4f}" for k in keys))
    if tuned:
        b = result["assignment_finetuned"]["overall"]
        s.add_row("finetuned", f"{b['targets']:,}", *(f"{b[k]:.4f}" for k in keys))
        s.add_row("change", "", *(f"{b[k] - a[k]:+.4f}" for k in keys))
    tables = tables + [s]
    if "cost" in result:
        c = result["cost"]
        t = Table(title="cost: training events/s (mean over the epochs of each metrics.csv)", header_style="bold",
                  box=box.SIMPLE_HEAD, pad_edge=False)
        for name in ("model", "trains", "events/s", "from"):
            t.add_column(name, justify="left" if name in ("model", "trains", "from") else "right",
                         no_wrap=name != "from")
        for row in c:
            t.add_row(row["model"], row["trains"], f"{row['events_per_s']:,.0f}", row["from"])
        tables.append(t)
    return tables


def _cell(fmt, r: dict) -> str:
    """A summary cell, or "–" where the series has no such figure (the bound has no bias, tails or charge)."""
    try:
        text = fmt(r) if r["tracks"] else "–"
    except (KeyError, TypeError):  # TypeError: a None (NaN in metrics.json)
        return "–"
    return "–" if text.startswith("nan") or "nan" in text.split()[0] else text


def pt_table(result: dict[str, Any]) -> Table:
    """σ(q/pT)/|q/pT| per true-pT bin: the head, both reference fits and the bound, with the ratios to the
    bound, and the head's charge mis-ID (80 columns: short headers, explained in the caption)."""
    reg = result["regression"]
    t = Table(title=f"σ(q/pT)/|q/pT| vs true pT on {result['split']}: head, fits and the Cramér–Rao bound",
              header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False,
              caption="opt: optimal fit, std: standalone fit (both on truth hits); h/b, o/b: head and optimal fit "
                      "over the bound; h/o: head over optimal fit")
    for name in ("pT [GeV]", "head", "opt", "std", "bound", "h/b", "o/b", "h/o", "q mis-ID"):
        t.add_column(name, justify="right")
    edges = reg["head"]["vs_pt"]["qpt"]["edges"]
    width = {m: r["vs_pt"]["qpt"]["width"] for m, r in reg.items()}
    misid = reg["head"]["charge_misid_vs_pt"]["eff"]
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        h, o, f, b = width["head"][i], width["optimal"][i], width["reference"][i], width["bound"][i]
        t.add_row(f"{lo:g}–{hi:g}", f"{h:.4f}", f"{o:.4f}", f"{f:.4f}", f"{b:.4f}", _ratio(h, b), _ratio(o, b),
                  _ratio(h, o), f"{100 * misid[i]:.2f} %")
    return t


def bound_table(result: dict[str, Any]) -> Table:
    """σ(η) and σ(φ) per true-pT bin against the bound: the head's and the optimal fit's ratios."""
    reg = result["regression"]
    t = Table(title=f"σ(η), σ(φ) vs true pT on {result['split']} against the Cramér–Rao bound", header_style="bold",
              box=box.SIMPLE_HEAD, pad_edge=False,
              caption="h/b, o/b: head and optimal fit (truth hits) over the bound")
    for name in ("pT [GeV]", "σ(η)×10³", "bound", "h/b", "o/b", "σ(φ) mrad", "bound", "h/b", "o/b"):
        t.add_column(name, justify="right")
    edges = reg["head"]["vs_pt"]["qpt"]["edges"]
    w = {(m, k): r["vs_pt"][k]["width"] for m, r in reg.items() for k in ("eta", "phi")}
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        cells = []
        for k in ("eta", "phi"):
            h, o, b = w["head", k][i], w["optimal", k][i], w["bound", k][i]
            cells += [f"{h * 1e3:.3f}" if k == "eta" else f"{h * 1e3:.2f}",
                      f"{b * 1e3:.3f}" if k == "eta" else f"{b * 1e3:.2f}", _ratio(h, b), _ratio(o, b)]
        t.add_row(f"{lo:g}–{hi:g}", *cells)
    return t


def purity_table(result: dict[str, Any]) -> Table:
    """The head's figures by the hit purity of its tracks (`purity_breakdown`)."""
    t = Table(title=f"the head by the hit purity of its tracks on {result['split']}", header_style="bold",
              box=box.SIMPLE_HEAD, pad_edge=False,
              caption=f"purity of the hits stage 1 gives the track (p >= {ASSIGN_THRESHOLD}); σ: of q/pT, relative")
    for name in ("hit purity", "tracks", "share", "σ(q/pT)", "q mis-ID", "of all wrong q"):
        t.add_column(name, justify="right")
    for r in result["purity"]:
        if r["tracks"] == 0 and r["purity"] == "no hits":
            continue
        t.add_row(r["purity"], f"{r['tracks']:,}", f"{100 * r['share']:.1f} %", f"{r['qpt_res']:.4f}",
                  f"{100 * r['charge_misid']:.2f} %", f"{100 * r['share_of_wrong_charges']:.0f} %")
    return t


def finetuned_table(result: dict[str, Any]) -> Table:
    """The fine-tuned model against the frozen head per true-pT bin: σ(q/pT)/|q/pT| and charge mis-ID."""
    reg = result["regression"]
    t = Table(title=f"fine-tuned against the frozen head per true pT on {result['split']}", header_style="bold",
              box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("pT [GeV]", "σ(q/pT) head", "fine-tuned", "ratio", "q mis-ID head", "fine-tuned"):
        t.add_column(name, justify="right")
    head, tuned = reg["head"], reg["finetuned"]
    edges = head["vs_pt"]["qpt"]["edges"]
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        h, f = head["vs_pt"]["qpt"]["width"][i], tuned["vs_pt"]["qpt"]["width"][i]
        t.add_row(f"{lo:g}–{hi:g}", f"{h:.4f}", f"{f:.4f}", _ratio(f, h),
                  f"{100 * head['charge_misid_vs_pt']['eff'][i]:.2f} %",
                  f"{100 * tuned['charge_misid_vs_pt']['eff'][i]:.2f} %")
    return t


def _ratio(a: float, b: float) -> str:
    """a/b to two decimals; "–" where b is no width (an empty or one-track bin)."""
    return f"{a / b:.2f}" if b and math.isfinite(a / b) else "–"


def pull_table(pulls: dict[str, Any]) -> Table:
    """Median and robust width of the pulls (pred - true)/σ, overall and per true-pT bin: 0 and 1 when the
    widths are right."""
    kinds = [k for k in ("qpt", "eta", "phi", "pt") if k in pulls["overall"]][:3]
    t = Table(title="pulls of the predicted widths: median / width (0 / 1 when calibrated)", header_style="bold",
              box=box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("pT [GeV]", justify="right")
    for k in kinds:
        t.add_column(k, justify="right")
    edges = pulls["vs_pt"][kinds[0]]["edges"]
    labels = [f"{lo:g}–{hi:g}" for lo, hi in zip(edges[:-1], edges[1:])]
    for i, label in enumerate(labels):
        t.add_row(label, *(f"{pulls['vs_pt'][k]['bias'][i]:+.3f} / {pulls['vs_pt'][k]['width'][i]:.3f}" for k in kinds))
    t.add_row("all", *(f"{pulls['overall'][k]['bias']:+.3f} / {pulls['overall'][k]['width']:.3f}" for k in kinds))
    return t


def fake_rates(reco_pred: np.ndarray, reco_fake: np.ndarray, pt_bins: list[float],
               eta_bins: list[float]) -> dict[str, dict]:
    """Fraction of predicted tracks matched to no truth particle, in bins of their predicted pT and |eta|."""
    return {"vs_pt": metrics.binned_efficiency(reco_pred[:, 0], reco_fake, pt_bins),
            "vs_eta": metrics.binned_efficiency(np.abs(reco_pred[:, 1]), reco_fake, eta_bins)}


def make_plots(result: dict[str, Any], residuals: dict[str, dict[str, np.ndarray]], out: Path,
               tracks: dict[str, np.ndarray] | None = None) -> list[Path]:
    """Every figure the result has data for; `tracks`: the head's per-track pred, true (and sigma, when the head
    predicts uncertainties) for the per-track figures."""
    reg = {m: r for m, r in result["regression"].items() if r["tracks"]}
    res = {m: residuals[m] for m in reg if m in residuals}  # the bound has widths, no residuals
    misid = {m: r["charge_misid_vs_pt"] for m, r in reg.items() if "charge_misid_vs_pt" in r}
    title = f"{Path(result['dataset']).name}, {result['split']} split: {result['events']:,} events"
    extra = []
    if tracks is not None and len(tracks["pred"]):
        extra.append(plots.predicted_vs_true(tracks["pred"], tracks["true"], out / "predicted_vs_true.png", title))
        sigma = {k: v for k, v in tracks.items() if k.startswith("sigma_")}  # predicted widths, where the head has them
        if sigma:
            extra.append(plots.pull_histograms(metrics.pulls(tracks["pred"], tracks["true"], sigma),
                                               out / "pulls.png", title))
    if "fake_rate" in result:
        tuned = result.get("fake_rate_finetuned")
        extra.append(plots.fake_rate_vs({k.removeprefix("vs_"): v for k, v in result["fake_rate"].items()},
                                        out / "fake_rate.png", title,
                                        compare=tuned and {k.removeprefix("vs_"): v for k, v in tuned.items()}))
    return extra + [
        plots.residual_histograms(res, out / "residuals.png", title),
        plots.resolution_vs({m: r["vs_pt"] for m, r in reg.items()}, "pt", out / "resolution_vs_pt.png", title),
        plots.resolution_vs({m: r["vs_eta"] for m, r in reg.items()}, "eta", out / "resolution_vs_eta.png", title),
        plots.charge_misid_vs_pt(misid, out / "charge_misid_vs_pt.png", title),
        *(plots.efficiency_vs(result["assignment"][f"vs_{axis}"], axis, out / f"efficiency_vs_{axis}.png", title,
                              compare=result.get("assignment_finetuned", {}).get(f"vs_{axis}"))
          for axis in ("pt", "eta")),
    ]


def ablation(cfg: Config, sweep: Path) -> list[dict[str, Any]]:
    """Every member of a trained sweep (`train-head --sweep FILE`) on one split, against both reference fits:
    σ(q/pT)/|q/pT| per pT bin, charge mis-ID, σ(η), σ(φ), parameters, and the events/s of evaluating it
    from the cache. Prints the table and writes `eval/ablation.json`."""
    rd = RunDir(cfg)
    split = cfg.eval.split
    names = [name for name, _ in load_sweep(sweep, cfg.head)]
    missing = [n for n in names if not (rd.sweep_member(n) / BEST).is_file()]
    if not names or missing:
        raise HepregError(f"evaluate --sweep {sweep}: no trained head for {', '.join(missing) or 'any entry'} under "
                          f"{rd.head / 'sweep'}; run `hepreg train-head --sweep {sweep}` first")
    device = resolve_device(cfg.head_train.device)
    dataset = open_dataset(cfg.data.path, cfg.data.max_events)
    start, stop = split_ranges(len(dataset), cfg.data.val_fraction, cfg.data.test_fraction)[split]
    check_dataset(rd.cache_split(split), dataset.fingerprint(), cfg.data.path)
    rows, truth = [], None
    for name in names:
        ckpt = rd.sweep_member(name) / BEST
        t0 = time.perf_counter()
        pred = head_predictions(cfg, split, device, ckpt, start, stop, dataset.fingerprint())
        seconds = time.perf_counter() - t0
        if truth is None:
            refs = reference_events(dataset, start, stop)
            truth = {m: reference_tracks(refs, name, pred["targets"], pred["valid"])
                     for m, name in (("reference", "standalone"), ("optimal", "optimal"))}
        reg, _ = regression_metrics(pred["pred"], pred["true"], cfg.eval.pt_bins, cfg.eval.eta_bins)
        state = load_checkpoint(ckpt)
        rows.append({"name": name, **{k: state["head_config"][k] for k in ("kind", "track_frame", "fit_proxy", "loss")},
                     "parameters": sum(v.numel() for k, v in state["model"].items() if not _is_statistic(k)),
                     "events_per_s": (stop - start) / seconds,
                     "qpt_res_vs_pt": reg["vs_pt"]["qpt"]["width"], "charge_misid": reg["charge_misid"]["eff"],
                     "eta_res": reg["overall"]["eta"]["width"], "phi_res": reg["overall"]["phi"]["width"]})
    for method, (pred, true) in truth.items():
        reg, _ = regression_metrics(pred, true, cfg.eval.pt_bins, cfg.eval.eta_bins)
        rows.append({"name": plots.STYLE[method]["label"], "qpt_res_vs_pt": reg["vs_pt"]["qpt"]["width"],
                     "charge_misid": reg["charge_misid"]["eff"], "eta_res": reg["overall"]["eta"]["width"],
                     "phi_res": reg["overall"]["phi"]["width"]})
    edges = cfg.eval.pt_bins
    t = Table(title=f"ablation on {split} ({stop - start:,} events): σ(q/pT)/|q/pT| per true pT [GeV]",
              header_style="bold")
    for c in ("head", "kind", "frame", "fit", "loss", *(f"{a:g}–{b:g}" for a, b in zip(edges[:-1], edges[1:])),
              "q mis-ID", "σ(η)", "σ(φ) mrad", "params", "eval ev/s"):
        t.add_column(c, justify="left" if c == "head" else "right")
    yes_no = lambda v: "yes" if v else "no"  # noqa: E731
    for r in rows:
        opt = lambda k, f=str: f(r[k]) if k in r else ""  # noqa: E731
        t.add_row(r["name"], opt("kind"), opt("track_frame", yes_no), opt("fit_proxy", yes_no), opt("loss"),
                  *(f"{w:.3f}" for w in r["qpt_res_vs_pt"]), f"{100 * r['charge_misid']:.2f} %",
                  f"{r['eta_res']:.4f}", f"{1e3 * r['phi_res']:.1f}", opt("parameters", lambda v: f"{v:,}"),
                  opt("events_per_s", lambda v: f"{v:,.0f}"))
    console.print(t)
    rd.eval.mkdir(parents=True, exist_ok=True)
    with atomic_write(rd.eval / "ablation.json") as f:
        f.write(json.dumps(_json_ready({"split": split, "pt_bins": edges, "rows": rows}), indent=1))
    return rows


def _is_statistic(key: str) -> bool:
    """Standardisation buffers of a head's state dict: fitted, not trained."""
    return key.endswith((".mean", ".std"))


def run(cfg: Config, head: Path | None = None, overwrite: bool = False, model: Path | None = None) -> dict[str, Any]:
    """Evaluate the run's head (`head/best.pt`), or any head checkpoint of the run (`head`: a sweep member);
    with `model`, a fine-tuned checkpoint beside the head it started from (or `head`), written next to it.
    Results of an earlier evaluation of the same head and split are replaced only with `overwrite`."""
    split = cfg.eval.split
    rd = RunDir(cfg)
    tuned = None
    if model is not None:
        model = Path(model)
        if not model.is_file():
            raise HepregError(f"evaluate --model: {model} does not exist; run `hepreg finetune` first")
        tuned = load_checkpoint(model)
        if tuned.get("kind") != FINETUNED:
            raise HepregError(f"evaluate --model {model}: not a fine-tuned checkpoint of `hepreg finetune` (stage 1 "
                              f"and head in one); evaluate a head with --head")
        if head is None and tuned.get("head_source") and Path(tuned["head_source"]).is_file():
            head = Path(tuned["head_source"])  # the frozen head it started from
    head_path = Path(head) if head is not None else rd.head_best
    # one folder per split; a sweep member's next to its checkpoint, a fine-tuned model's next to it
    out = (model.parent / "eval" if model is not None else rd.eval if head is None
           else head_path.parent / "eval") / split
    for path, command in ((rd.assign_best, "train-assign"), (rd.cache_split(split), "export-embeddings"),
                          (head_path, "train-head")):
        if not path.exists():
            raise HepregError(f"evaluate needs {path}, which does not exist; run `hepreg {command}` for run "
                              f"{cfg.name!r} first")
    device = resolve_device(cfg.head_train.device)
    dataset = open_dataset(cfg.data.path, cfg.data.max_events)
    start, stop = split_ranges(len(dataset), cfg.data.val_fraction, cfg.data.test_fraction)[split]
    if stop <= start:
        raise ConfigError(f"the {split} split of {cfg.data.path} is empty ({len(dataset)} events); raise "
                          f"data.{'val' if split == 'val' else 'test'}_fraction or data.max_events")
    if not dataset.has_truth:
        raise DataError(f"{cfg.data.path} holds no truth to evaluate against: {dataset.missing_truth()}; "
                        f"`hepreg predict` works on it without truth")
    check_dataset(rd.cache_split(split), dataset.fingerprint(), cfg.data.path)
    plot_files = [f for name in (*PLOT_FILES, *OPTIONAL_PLOTS) for f in (name, name.replace(".png", ".pdf"))]
    written = ("metrics.json", *plot_files)
    # refuse before any work; replace once the new results are ready
    guard(out, written, overwrite=overwrite, command=f"evaluate --split {split}", can_resume=False)

    head = head_predictions(cfg, split, device, head_path, start, stop, dataset.fingerprint())
    assignment, event_id, purity = assignment_metrics(cfg, dataset, start, stop, device)
    if len(head["event_id"]) != len(event_id) or not np.array_equal(head["event_id"], event_id):
        raise CacheError(f"cache split {rd.cache_split(split)} does not hold the events of the {split} split "
                         f"of {cfg.data.path} (events {start}-{stop}) in order; re-export the cache for this config")

    result: dict[str, Any] = {"run": cfg.name, "split": split, "events": stop - start,
                              "event_range": [start, stop], "dataset": str(cfg.data.path),
                              "assign_threshold": ASSIGN_THRESHOLD, "regression": {}}
    residuals = {}
    tracks = {"head": (head["pred"], head["true"])}
    refs = reference_events(dataset, start, stop)
    for method, name in (("reference", "standalone"), ("optimal", "optimal")):
        tracks[method] = reference_tracks(refs, name, head["targets"], head["valid"])
    for method, (pred, true) in tracks.items():
        result["regression"][method], residuals[method] = regression_metrics(pred, true, cfg.eval.pt_bins,
                                                                             cfg.eval.eta_bins)
    # the bound of the tracks the head measures, like with like
    result["regression"]["bound"] = bound_metrics(refs.bound[head["event"], head["target"]], head["true"],
                                                  cfg.eval.pt_bins, cfg.eval.eta_bins)
    result["purity"] = purity_breakdown(head["pred"], head["true"], purity[head["event"], head["target"]])
    sigma = {k: v for k, v in head.items() if k.startswith("sigma_")}
    if sigma:
        pull = metrics.pulls(head["pred"], head["true"], sigma)
        result["pulls"] = {"overall": {k: metrics.summary(v) for k, v in pull.items()},
                           "vs_pt": {k: metrics.binned_summary(head["true"][:, 0], v, cfg.eval.pt_bins)
                                     for k, v in pull.items()}}
    result["assignment"] = assignment
    if "reco_pred" in head:  # every predicted track with its prediction: fake rate vs predicted pT, eta
        result["fake_rate"] = fake_rates(head["reco_pred"], head["reco_fake"], cfg.eval.pt_bins, cfg.eval.eta_bins)

    if model is not None:  # its own stage 1, run live: the cache holds the frozen one's outputs
        assigner, tuned_head = load_trained(model, model, device)
        ft = live_predictions(cfg, split, assigner, tuned_head, device)
        result["regression"]["finetuned"], residuals["finetuned"] = regression_metrics(
            ft["pred"], ft["true"], cfg.eval.pt_bins, cfg.eval.eta_bins)
        result["assignment_finetuned"], _, _ = assignment_metrics(cfg, dataset, start, stop, device, assigner)
        if "reco_pred" in ft:
            result["fake_rate_finetuned"] = fake_rates(ft["reco_pred"], ft["reco_fake"], cfg.eval.pt_bins,
                                                       cfg.eval.eta_bins)
        result["model"] = str(model)
        result["cost"] = [
            {"model": "frozen head", "trains": "the head, from the cache", "from": str(head_path.parent / "metrics.csv"),
             "events_per_s": training_rate(head_path.parent)},
            {"model": "fine-tuned", "trains": "stage 1 + head, live", "from": str(model.parent / "metrics.csv"),
             "events_per_s": training_rate(model.parent)}]
    result["head"] = str(head_path)
    with stage_lock(out), replacing() as replaced:  # the earlier evaluation back if writing this one fails
        guard(out, written, overwrite=overwrite, command=f"evaluate --split {split}", can_resume=False,
              replacing=replaced)
        write_config(out, cfg)
        result["plots"] = [p.name for p in make_plots(result, residuals, out, head)]
        with atomic_write(out / "metrics.json") as f:
            f.write(json.dumps(_json_ready(result), indent=1))
    for table in summary_tables(result):
        results.print(table)
    console.print(f"metrics and plots → {out}", highlight=False)
    return result

