"""`hepreg evaluate`: physics performance of a run on one split, against the fits on truth hits and the bound.

For the same events of the split:
- regression: the trained head (`head/best.pt`) on the cache split, each query compared with the truth
  particle the stage-1 matching assigned it;
- the optimal and the standalone fit on truth-assigned hits (`hepreg.evaluation.reference_fit`), and the
  Cramér–Rao bound of the head's own tracks: what the hits allow;
- assignment: the frozen stage-1 model re-run on the split from HDF5, because the per-hit truth needed for
  hit efficiency and purity is not kept in a pruned cache; the head's figures by the purity of its tracks.
With `--model` (a fine-tuned checkpoint of `hepreg finetune`) one more series: its own stage 1 run live on the
split's HDF5 events (its outputs differ from the cache's) and its head on them, beside the frozen head it started
from; its assignment figures beside the frozen stage 1's, and the training cost of each.
What is computed from arrays lives in `hepreg.evaluation.tally`, how it is shown in `hepreg.evaluation.report`;
this module runs the models over the split. Writes `runs/<name>/eval/<split>/metrics.json`, the plots and the
config that made them; an earlier evaluation of the same split is replaced only with `overwrite`.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table

from hepreg.evaluation import metrics, plots
from hepreg.evaluation.report import PLOT_FILES, OPTIONAL_PLOTS, json_ready, make_plots, summary_tables
from hepreg.evaluation.tally import ASSIGN_THRESHOLD, AssignmentTally, bound_metrics, fake_rates, matched_purity, purity_breakdown, regression_metrics
from hepreg.cache.loader import CacheLoader
from hepreg.cache.store import check_dataset
from hepreg.config import load_sweep
from hepreg.settings import Config
from hepreg.data.reader import open_dataset, split_ranges
from hepreg.evaluation.reference_fit import References, reference_events
from hepreg.runs.digest import sha256_file
from hepreg.runs.distributed import resolve_device
from hepreg.errors import CacheError, ConfigError, DataError, HepregError
from hepreg.frozen import FrozenAssigner
from hepreg.runs.outputs import guard, replacing, write_config
from hepreg.evaluation.predictions import head_over, matched_tracks, open_predictions, read_tracks
from hepreg.runs.progress import console, progress, results
from hepreg.runs.directory import BEST, RunDir, load_checkpoint
from hepreg.runs.files import atomic_write, stage_lock
from hepreg.trained import FINETUNED, load_head, load_trained



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
    """The head's matched, valid queries on the split with their truth (`hepreg.evaluation.predictions.matched_tracks`):
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
    return matched_tracks(head_over(loader, head, device, f"head on {split} (cache {loader.split.path})"))


def live_predictions(cfg: Config, split: str, assigner: FrozenAssigner, head, device: torch.device) -> dict:
    """`head_predictions` of a stage 1 and head that have no cache (a fine-tuned model): the stage-1 model run on
    the split's HDF5 events as export runs it (`hepreg.frozen.LiveSplit`), the head on its outputs."""
    from hepreg.frozen import LiveSplit

    live = LiveSplit(cfg, split, assigner, head.cfg.threshold)
    loader = CacheLoader(live, batch_size=cfg.head_train.batch_size, shuffle=False, in_memory="no")
    return matched_tracks(head_over(loader, head, device, f"fine-tuned model on {split}"))


def training_rate(folder: Path) -> float:
    """Mean training events/s over the epochs of a stage's metrics.csv (nan when there are none)."""
    import csv

    path = Path(folder) / "metrics.csv"
    if not path.is_file():
        return math.nan
    with open(path, newline="") as f:
        rates_ = [float(r["events_per_s"]) for r in csv.DictReader(f) if r.get("events_per_s") not in (None, "", "nan")]
    return float(np.mean(rates_)) if rates_ else math.nan


def reference_tracks(refs: References, name: str, true: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A reference fit's predictions and truth [T, 4] of the fitted particles, from `reference_events` of the
    split; true [E, P, 4] and valid [E, P] are the truth of the same events (from the cache, in event order)."""
    fit, ok = refs.fits[name]  # [E, P', 4], [E, P']
    p = min(fit.shape[1], true.shape[1])
    use = ok[:, :p] & valid[:, :p]
    return fit[:, :p][use], true[:, :p][use]


# ---------------------------------------------------------------------------------------------- assignment


def assignment_metrics(cfg: Config, dataset, start: int, stop: int, device: torch.device,
                       assigner: FrozenAssigner | None = None) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Run the frozen stage-1 model (the run's, or `assigner`) over events [start, stop) of the dataset, as every
    command runs it (`FrozenAssigner.run_events`), and tally the assignment.

    Also returns the event_numbers of the events in dataset order [stop - start], to check the cache against,
    and the hit purity of the query matched to each particle [stop - start, P] (NaN where none).
    """
    if assigner is None:
        assigner = FrozenAssigner.from_checkpoint(RunDir(cfg).assign_best, device)
    tally = AssignmentTally(cfg.eval.pt_bins, cfg.eval.eta_bins)
    event_id = np.full(stop - start, -1, dtype=np.int64)
    purity = np.full((stop - start, dataset.max_tracks), np.nan)  # of the query matched to each particle
    with progress() as p:
        task = p.add_task("stage 1 on split", total=stop - start)

        def count(batch, out, flat) -> None:  # each batch as `run_events` matched it
            final = out.final
            track_logit, mask_logit = final["track_logit"].float(), final["mask_logit"].float()
            tally.add(track_logit, mask_logit, batch.hit_valid, batch.particle_valid, batch.particle_hit_valid,
                      batch.targets, flat.match)
            local = batch.index.cpu().numpy() - start
            event_id[local] = batch.event_id.cpu().numpy()
            b, n, slot, value = matched_purity(mask_logit, batch.hit_valid, batch.particle_hit_valid, flat.match)
            purity[local[b], slot] = value
            p.update(task, advance=batch.size)

        assigner.run_events(dataset, start, stop, cfg, on_batch=count, keep=False)
    return tally.result(), event_id, purity


# ---------------------------------------------------------------------------------------------- output


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
        f.write(json.dumps(json_ready({"split": split, "pt_bins": edges, "rows": rows}), indent=1))
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
        result["plots"] = [p.name for p in make_plots(result, residuals, out, head)] if cfg.eval.plots else []
        with atomic_write(out / "metrics.json") as f:
            f.write(json.dumps(json_ready(result), indent=1))
    for table in summary_tables(result):
        results.print(table)
    console.print(f"metrics and plots → {out}", highlight=False)
    return result

