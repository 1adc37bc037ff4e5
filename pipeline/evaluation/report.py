"""How `evaluate` shows a result: the summary tables it prints (80 columns) and the figures it writes, both drawn
from the result dict that metrics.json stores."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from rich import box
from rich.table import Table

from hepreg.evaluation import metrics, plots
from hepreg.evaluation.tally import ASSIGN_THRESHOLD


PLOT_FILES = ("residuals.png", "resolution_vs_pt.png", "resolution_vs_eta.png", "charge_misid_vs_pt.png",
              "efficiency_vs_pt.png", "efficiency_vs_eta.png", "predicted_vs_true.png", "fake_rate.png")


OPTIONAL_PLOTS = ("pulls.png",)  # when the head predicts uncertainties


def json_ready(x: Any) -> Any:
    """NaN/inf -> null and numpy scalars -> Python, so metrics.json is strict JSON."""
    if isinstance(x, dict):
        return {k: json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
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
