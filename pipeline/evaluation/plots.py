"""Figures of the evaluation and of training, drawn from the dicts `hepreg.evaluation.metrics` returns (and metrics.json
stores) or from plain arrays, so that they follow whatever the evaluation computes.

Matplotlib with the Agg backend (no display needed), styled with mplhep's ATLAS-like style and labelled
"hepreg Simulation" with the sample and event count, as plots for a talk are. Each function writes a PNG and a
PDF beside it and returns the PNG's path. Points are drawn at bin centres with the bin width as horizontal bar;
empty bins (NaN) are left out.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.colors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
from matplotlib.offsetbox import AnchoredOffsetbox, HPacker, TextArea  # noqa: E402
import mplhep  # noqa: E402
import numpy as np  # noqa: E402

from hepreg.evaluation.metrics import RESIDUALS, bias, robust_width  # noqa: E402

plt.style.use(mplhep.style.ATLAS)
EXPERIMENT = "hepreg"  # the bold part of the label; "Simulation" follows it, as on ATLAS simulation plots

# How each residual kind is labelled and scaled for display (phi in mrad reads better than 1e-3 rad).
RESIDUAL_LABEL = {
    "pt": (r"$(p_T^{\rm pred} - p_T^{\rm true}) / p_T^{\rm true}$", 1.0),
    "qpt": (r"$\Delta(q/p_T) / |q/p_T^{\rm true}|$", 1.0),
    "eta": (r"$\eta^{\rm pred} - \eta^{\rm true}$", 1.0),
    "phi": (r"$\phi^{\rm pred} - \phi^{\rm true}$ [mrad]", 1e3),
}
WIDTH_LABEL = {
    "pt": r"$\sigma(p_T) / p_T$",
    "qpt": r"$\sigma(q/p_T) / |q/p_T|$",
    "eta": r"$\sigma(\eta)$",
    "phi": r"$\sigma(\phi)$ [mrad]",
}
BIAS_LABEL = {
    "pt": r"median $\Delta p_T / p_T$",
    "qpt": r"median $\Delta(q/p_T) / |q/p_T|$",
    "eta": r"median $\Delta\eta$",
    "phi": r"median $\Delta\phi$ [mrad]",
}
AXIS = {"pt": (r"true $p_T$ [GeV]", True), "eta": (r"true $|\eta|$", False)}  # label, log scale
STYLE = {"head": dict(color="tab:blue", marker="o", label="regression head"),
         "reference": dict(color="tab:red", marker="s", label="standalone fit (truth hits)"),
         "optimal": dict(color="tab:green", marker="^", label="optimal fit (truth hits)"),
         "bound": dict(color="black", marker="_", ms=14, label="Cramér–Rao bound"),
         "finetuned": dict(color="tab:purple", marker="D", label="fine-tuned stage 1 + head")}
COMPARE_LABEL = " (fine-tuned)"  # the second series of an assignment figure: open markers of the same colour


def _centres(edges: list[float], log: bool, dodge: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Bin centres (geometric on a log axis) and [2, nbins] x error bars reaching the bin edges.

    `dodge` shifts the i-th overlaid series by 4 % of the bin width so equal values stay visible.
    """
    e = np.asarray(edges, dtype=float)
    if log:
        c = np.sqrt(e[:-1] * e[1:]) * (e[1:] / e[:-1]) ** (0.04 * dodge)
    else:
        c = 0.5 * (e[:-1] + e[1:]) + 0.04 * dodge * (e[1:] - e[:-1])
    return c, np.stack([c - e[:-1], e[1:] - c])


def _log_axis(ax, edges: list[float]) -> None:
    """Log x axis ticked at the bin edges with plain numbers (3, 5, 10, ... rather than 10^1)."""
    ax.set_xscale("log")
    ax.set_xlim(edges[0] / 1.15, edges[-1] * 1.15)
    ax.set_xticks(edges)
    ax.set_xticklabels([f"{e:g}" for e in edges])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _save(fig, path: Path) -> Path:
    """The PNG at `path` and a PDF beside it (vector, for slides and papers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    fig.savefig(path.with_suffix(".pdf"))
    plt.close(fig)
    return path


def _label(axes, text: str | None) -> None:
    """"hepreg Simulation" above the first panel and `text` (sample, split, events) above the last one of the
    top row: `axes` is that row."""
    axes = list(np.atleast_1d(axes))
    try:  # no "×10⁻²" offset above the first panel, where the label goes: plain ticks down to 0.001
        axes[0].ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
    except AttributeError:  # a log axis has no offset to move
        pass
    # Bold name and plain "Simulation" packed side by side at draw time: mplhep's exp_label lays the same out by
    # drawing the figure over and over (a third of a figure's time, measured)
    label = HPacker(children=[TextArea(EXPERIMENT, textprops=dict(fontsize=13, fontweight="bold")),
                              TextArea("Simulation", textprops=dict(fontsize=13))], pad=0, sep=5)
    axes[0].add_artist(AnchoredOffsetbox(loc="lower left", child=label, bbox_to_anchor=(0, 1.005), pad=0,
                                         borderpad=0, frameon=False, bbox_transform=axes[0].transAxes))
    if text:
        axes[-1].set_title(text, loc="right", fontsize=11)


def _outside(x: np.ndarray, width: float, n: float = 3.0, centre: float | None = None) -> str:
    """The legend's tail figure, saying what it counts: "5.4 % outside ±3σ" (of the median, or `centre`)."""
    c = np.median(x) if centre is None and x.size else (centre or 0.0)
    frac = np.mean(np.abs(x - c) > n * width) if x.size and width > 0 else float("nan")
    return f"{100 * frac:.1f} % outside ±{n:g}σ"


def _zoom(ax, lo: np.ndarray, hi: np.ndarray, top: float = 1.0) -> None:
    """A fraction axis zoomed to the data (error bars included), so 0.97 against 0.99 is visible; the top is
    kept at `top` plus room for the legend when the data come close to it."""
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    ok = np.isfinite(lo) & np.isfinite(hi)
    if not ok.any():
        ax.set_ylim(0, 1.05 * top)
        return
    a, b = max(0.0, float(lo[ok].min())), min(top, float(hi[ok].max()))
    span = max(b - a, 0.01 * top)
    ax.set_ylim(max(0.0, a - 0.15 * span), min(b + 0.45 * span, 1.25 * top))  # room above for the legend


def residual_histograms(residuals: dict[str, dict[str, np.ndarray]], path: Path, title: str | None = None) -> Path:
    """2x2 histograms of the four residuals; `residuals` maps a method (head, reference) to its arrays.

    The range is +-5 core widths of the wider method, so both cores are visible; the legend gives each
    method's core width (half the central 68 %) and the fraction of its tracks beyond 3 of those widths.
    """
    fig, axes = plt.subplots(2, 2, figsize=(12, 9.5))
    for ax, kind in zip(axes.flat, RESIDUALS):
        label, scale = RESIDUAL_LABEL[kind]
        data = {m: np.asarray(r[kind], dtype=float) * scale for m, r in residuals.items()}
        data = {m: x[np.isfinite(x)] for m, x in data.items()}
        widths = [robust_width(x) for x in data.values() if x.size]
        half = 5 * max([w for w in widths if np.isfinite(w) and w > 0] or [1.0])
        if kind == "phi":
            half = min(half, np.pi * scale)  # a residual cannot exceed pi
        fewest = min([x.size for x in data.values() if x.size] or [1])
        bins = np.linspace(-half, half, int(np.clip(2 * np.sqrt(fewest), 20, 80)) + 1)
        for method, x in data.items():
            if x.size == 0:
                continue
            style = STYLE[method]
            w = robust_width(x)
            ax.hist(np.clip(x, bins[0], bins[-1]), bins=bins, histtype="step", lw=1.6, color=style["color"],
                    density=True, label=f"{style['label']}\ncore $\\sigma$ = {w:.3g}, {_outside(x, w)}")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(7))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))  # no ×10^k clashing with labels
        ax.set_xlabel(label)
        ax.set_ylabel("tracks (normalised)")
        ax.set_ylim(top=ax.get_ylim()[1] * 1.5)
        ax.legend(fontsize=9, loc="upper right", title="last bins hold the overflow", title_fontsize=8)
    _label(axes[0], title)
    return _save(fig, path)


def resolution_vs(binned: dict[str, dict[str, dict]], axis: str, path: Path, title: str | None = None) -> Path:
    """Core width (top row) and bias (bottom row) of each residual vs true pT or |eta|.

    `binned` maps a method to {residual kind: metrics.binned_summary(...)}; `axis` is "pt" or "eta".
    A width panel whose values span more than a factor 30 (an early head against the reference fit) gets a
    log y axis, so that both methods stay readable.
    """
    xlabel, log = AXIS[axis]
    fig, axes = plt.subplots(2, 4, figsize=(20, 9), sharex=True)
    for col, kind in enumerate(RESIDUALS):
        scale = RESIDUAL_LABEL[kind][1]
        widths = []
        for i, (method, per_kind) in enumerate(binned.items()):
            s = per_kind[kind]
            x, xerr = _centres(s["edges"], log, i)
            style = STYLE[method]
            for row, (key, err) in enumerate((("width", "width_err"), ("bias", "bias_err"))):
                y = np.asarray(s[key], dtype=float) * scale
                yerr = np.asarray(s[err], dtype=float) * scale
                ok = np.isfinite(y)
                if key == "width":
                    widths += [w for w in y[ok] if w > 0]
                axes[row, col].errorbar(x[ok], y[ok], xerr=xerr[:, ok], yerr=np.where(np.isfinite(yerr), yerr, 0)[ok],
                                        ls="none", capsize=2, **{"ms": 5, **style})
        axes[0, col].set_ylabel(WIDTH_LABEL[kind])
        if widths and max(widths) > 30 * min(widths):
            axes[0, col].set_yscale("log")
        else:
            axes[0, col].set_ylim(bottom=0)
        axes[1, col].set_ylabel(BIAS_LABEL[kind])
        axes[1, col].axhline(0, color="grey", lw=0.8, ls=":")
        axes[1, col].set_xlabel(xlabel)
        if log:
            _log_axis(axes[1, col], s["edges"])
    axes[0, 0].legend(fontsize=9)
    _label(axes[0], title)
    return _save(fig, path)


def charge_misid_vs_pt(binned: dict[str, dict], path: Path, title: str | None = None) -> Path:
    """Charge mis-identification rate vs true pT with binomial errors; `binned` maps a method to a
    metrics.binned_efficiency(...) of the mis-ID flag."""
    fig, ax = plt.subplots(figsize=(8, 6))
    lo, hi = [], []
    for i, (method, e) in enumerate(binned.items()):
        x, xerr = _centres(e["edges"], True, i)
        y = np.asarray(e["eff"], dtype=float)
        ok = np.isfinite(y)
        yerr = np.stack([e["err_lo"], e["err_hi"]]).astype(float)
        ax.errorbar(x[ok], y[ok], xerr=xerr[:, ok], yerr=yerr[:, ok], ls="none", ms=5, capsize=2, **STYLE[method])
        lo.extend(y[ok] - yerr[0, ok])
        hi.extend(y[ok] + yerr[1, ok])
    _log_axis(ax, e["edges"])
    ax.set_xlabel(AXIS["pt"][0])
    ax.set_ylabel("charge mis-identification rate")
    _zoom(ax, np.zeros(len(lo)), np.asarray(hi))  # from 0: a rate near 0 is the goal
    ax.legend(fontsize=10)
    _label(ax, title)
    return _save(fig, path)


EFFICIENCY_STYLE = {
    "track_efficiency": dict(color="tab:blue", marker="o", label="track efficiency"),
    "dm_efficiency": dict(color="tab:green", marker="s", label="double-majority efficiency"),
    "perfect_efficiency": dict(color="tab:orange", marker="^", label="perfect-match efficiency"),
    "hit_efficiency": dict(color="tab:purple", marker="o", label="hit efficiency (matched tracks)"),
    "hit_purity": dict(color="tab:brown", marker="s", label="hit purity (matched tracks)"),
}


def efficiency_vs(binned: dict[str, dict], axis: str, path: Path, title: str | None = None,
                  compare: dict[str, dict] | None = None) -> Path:
    """Left: track, double-majority and perfect-match efficiency (Clopper-Pearson errors); right: mean
    hit efficiency and purity of matched tracks (standard errors), vs true pT or |eta|. `compare`: the same
    figures of a fine-tuned stage 1, drawn beside them with open markers."""
    xlabel, log = AXIS[axis]
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 6), sharex=True)
    spans: dict = {left: ([], []), right: ([], [])}
    series = [(binned, " (frozen)" if compare else "", 0)] + ([(compare, COMPARE_LABEL, 1)] if compare else [])
    for data, suffix, second in series:
        style = dict(markerfacecolor="none") if second else {}
        for i, key in enumerate(("track_efficiency", "dm_efficiency", "perfect_efficiency")):
            e = data[key]
            x, xerr = _centres(e["edges"], log, 2 * i - 2 + second if compare else i - 1)
            y = np.asarray(e["eff"], dtype=float)
            ok = np.isfinite(y)
            yerr = np.stack([e["err_lo"], e["err_hi"]]).astype(float)
            left.errorbar(x[ok], y[ok], xerr=xerr[:, ok], yerr=yerr[:, ok], ls="none", ms=5, capsize=2,
                          **{**EFFICIENCY_STYLE[key], **style, "label": EFFICIENCY_STYLE[key]["label"] + suffix})
            spans[left][0].extend(y[ok] - yerr[0, ok])
            spans[left][1].extend(y[ok] + yerr[1, ok])
        for i, key in enumerate(("hit_efficiency", "hit_purity")):
            m = data[key]
            x, xerr = _centres(m["edges"], log, 2 * i + second if compare else i)
            y = np.asarray(m["mean"], dtype=float)
            ok = np.isfinite(y)
            yerr = np.nan_to_num(np.asarray(m["err"], dtype=float))
            right.errorbar(x[ok], y[ok], xerr=xerr[:, ok], yerr=yerr[ok], ls="none", ms=5, capsize=2,
                           **{**EFFICIENCY_STYLE[key], **style, "label": EFFICIENCY_STYLE[key]["label"] + suffix})
            spans[right][0].extend(y[ok] - yerr[ok])
            spans[right][1].extend(y[ok] + yerr[ok])
    left.set_ylabel("fraction of true tracks")
    right.set_ylabel("mean per matched track")
    for ax in (left, right):
        ax.set_xlabel(xlabel)
        _zoom(ax, *spans[ax])
        ax.axhline(1, color="grey", lw=0.8, ls=":")
        ax.legend(fontsize=10 if compare is None else 8, loc="upper right" if compare is None else "best", ncol=1)
        if log:
            _log_axis(ax, m["edges"])
    _label([left, right], title)
    return _save(fig, path)


# Panels of a learning-curve figure: (y label, [(metrics.csv column, legend)], log y). A panel is drawn when
# the CSV has any of its columns, so one function serves both training stages.
CURVE_PANELS = [
    ("loss", [("train_loss", "train"), ("val_loss", "validation")], True),
    ("val resolution (core σ)", [("val_qpt_res", r"$\sigma(q/p_T)/|q/p_T|$"), ("val_pt_res", r"$\sigma(p_T)/p_T$")],
     True),
    ("val charge mis-ID rate", [("val_charge_misid", "wrong charge sign")], False),
    ("val assignment", [("track_eff", "track efficiency"), ("dm_eff", "double-majority eff."),
                        ("hit_purity", "hit purity"), ("fake_rate", "fake rate")], False),
    ("learning rate", [("lr", "one-cycle schedule"), ("lr_head", "head"), ("lr_stage1", "stage 1")], True),
]


def learning_curves(csv_path: Path, path: Path, title: str | None = None) -> Path | None:
    """Per-epoch curves of a training run from its metrics.csv (None when it has no rows yet)."""
    import csv

    if not Path(csv_path).is_file():
        return None
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    epoch = np.array([float(r["epoch"]) for r in rows])
    panels = [p for p in CURVE_PANELS if any(k in rows[0] for k, _ in p[1])]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 5), squeeze=False)
    colours = iter(["tab:blue", "tab:red", "tab:green", "tab:orange", "tab:purple", "tab:brown"] * 3)
    for ax, (ylabel, series, log) in zip(axes[0], panels):
        for key, label in series:
            if key not in rows[0]:
                continue
            y = np.array([float(r[key]) if r[key] not in ("", "nan") else np.nan for r in rows])
            ax.plot(epoch, y, marker="o" if len(epoch) < 30 else None, ms=4, lw=1.5, label=label,
                    color=next(colours))
        if log and np.nanmin([float(r[k]) for r in rows for k, _ in series if k in r and r[k] not in ("", "nan")]
                             or [0]) > 0:
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_xlim(epoch.min() - 0.5, epoch.max() + 0.5)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        if len(series) > 1:
            ax.legend(fontsize=9)
    _label(axes[0], title)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------ per-track figures
TRACK_AXES = {  # TARGETS order: pt, eta, phi, q; label, log scale
    "pt": (r"$p_T$ [GeV]", True), "eta": (r"$\eta$", False), "phi": (r"$\phi$ [rad]", False),
}


def predicted_vs_true(pred: np.ndarray, true: np.ndarray, path: Path, title: str | None = None) -> Path:
    """2D histograms of predicted against true pT, eta, phi and q/pT of tracks pred, true [T, 4] (TARGETS
    order), with the diagonal; the colour counts tracks per bin on a log scale."""
    pred, true = np.asarray(pred, float).reshape(-1, 4), np.asarray(true, float).reshape(-1, 4)
    qpt_p = np.where(pred[:, 3] >= 0, 1.0, -1.0) / pred[:, 0]
    qpt_t = true[:, 3] / true[:, 0]
    panels = [("pt", pred[:, 0], true[:, 0]), ("eta", pred[:, 1], true[:, 1]), ("phi", pred[:, 2], true[:, 2]),
              ("qpt", qpt_p, qpt_t)]
    fig, axes = plt.subplots(1, 4, figsize=(24, 6.2))
    for ax, (kind, p, t) in zip(axes, panels):
        ok = np.isfinite(p) & np.isfinite(t) & ((p > 0) & (t > 0) if kind == "pt" else True)
        p, t = p[ok], t[ok]
        if kind == "pt":
            lo, hi = max(t.min() / 1.5, 0.5) if t.size else 1, t.max() * 1.5 if t.size else 10
            bins = np.geomspace(lo, hi, 41)
            ax.set_xscale("log")
            ax.set_yscale("log")
            label = TRACK_AXES["pt"][0]
        else:
            if kind == "qpt":
                lim = float(np.quantile(np.abs(t), 0.995)) * 1.2 if t.size else 1.0
                label = r"$q/p_T$ [1/GeV]"
            else:
                lim = float(np.abs(t).max()) * 1.05 if t.size else 1.0
                label = TRACK_AXES[kind][0]
            bins = np.linspace(-lim, lim, 41)
        counts, xe, ye = np.histogram2d(t, np.clip(p, bins[0], bins[-1]), bins=[bins, bins])
        mesh = ax.pcolormesh(xe, ye, counts.T, norm=matplotlib.colors.LogNorm(vmin=1, vmax=max(counts.max(), 2)),
                             cmap="viridis")
        ax.plot(bins[[0, -1]], bins[[0, -1]], color="red", lw=1, ls="--", label="pred = true")
        ax.set_xlabel("true " + label)
        ax.set_ylabel("predicted " + label)
        ax.legend(fontsize=9, loc="upper left", frameon=False, labelcolor="red")
        fig.colorbar(mesh, ax=ax, pad=0.01).set_label("tracks per bin")
    _label(axes, title)
    return _save(fig, path)


PULL_LABEL = {"pt": r"$p_T$", "eta": r"$\eta$", "phi": r"$\phi$", "qpt": r"$q/p_T$"}


def pull_histograms(pull: dict[str, np.ndarray], path: Path, title: str | None = None) -> Path:
    """One histogram per target of the pulls (pred - true) / predicted sigma that `metrics.pulls` gives (the same
    numbers evaluate tabulates), against the unit Gaussian that calibrated uncertainties give; the legend gives
    the fitted-free core mean and width and the tails beyond 3."""
    kinds = list(pull)
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.5 * len(kinds), 6), squeeze=False)
    bins = np.linspace(-5, 5, 51)
    gauss_x = np.linspace(-5, 5, 201)
    for ax, kind in zip(axes[0], kinds):
        x = np.asarray(pull[kind], float)
        x = x[np.isfinite(x)]
        w = robust_width(x)
        tails = np.mean(np.abs(x) > 3) if x.size else float("nan")
        ax.hist(np.clip(x, -5, 5), bins=bins, density=True, histtype="step", lw=1.6, color="tab:blue",
                label=f"regression head\nmedian {bias(x):+.2f}, core width {w:.2f}\n"
                      f"{100 * tails:.1f} % with |pull| > 3")
        ax.plot(gauss_x, np.exp(-gauss_x ** 2 / 2) / np.sqrt(2 * np.pi), color="grey", ls="--",
                label="unit Gaussian (calibrated σ)")
        name = PULL_LABEL.get(kind, kind)
        ax.set_xlabel(f"pull of {name}: (pred − true) / σ$_{{\\rm pred}}$")
        ax.set_ylabel("tracks (normalised)")
        ax.set_xlim(-5, 5)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.45)
        ax.legend(fontsize=9, loc="upper right", title="last bins hold the overflow", title_fontsize=8)
    _label(axes[0], title)
    return _save(fig, path)


def fake_rate_vs(binned: dict[str, dict], path: Path, title: str | None = None,
                 compare: dict[str, dict] | None = None) -> Path:
    """Fake rate (predicted tracks matched to no muon, Clopper-Pearson errors) vs the predicted pT and |eta|:
    `binned` maps "pt" and/or "eta" to metrics.binned_efficiency(...) of the fake flag; `compare` the same of a
    fine-tuned model, drawn beside it."""
    axes_keys = [k for k in ("pt", "eta") if k in binned]
    fig, axes = plt.subplots(1, len(axes_keys), figsize=(7.5 * len(axes_keys), 6), squeeze=False)
    for ax, key in zip(axes[0], axes_keys):
        log = key == "pt"
        lo, hi = [], []
        series = [(binned[key], 0, dict(color="tab:red", marker="o"), " (frozen)" if compare else "")]
        if compare:
            series.append((compare[key], 1, dict(color="tab:purple", marker="D", markerfacecolor="none"),
                           COMPARE_LABEL))
        for e, dodge, style, suffix in series:
            x, xerr = _centres(e["edges"], log, dodge)
            y = np.asarray(e["eff"], dtype=float)
            ok = np.isfinite(y)
            yerr = np.stack([e["err_lo"], e["err_hi"]]).astype(float)
            ax.errorbar(x[ok], y[ok], xerr=xerr[:, ok], yerr=yerr[:, ok], ls="none", ms=5, capsize=2, **style,
                        label="fake rate: predicted tracks\nmatched to no true muon" + suffix)
            lo.extend(y[ok] - yerr[0, ok])
            hi.extend(y[ok] + yerr[1, ok])
        _zoom(ax, np.asarray(lo), np.asarray(hi), top=1.0)
        ax.set_ylim(bottom=0)
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
        ax.set_xlabel(r"predicted $p_T$ [GeV]" if log else r"predicted $|\eta|$")
        if not log:
            ax.set_xlim(e["edges"][0], e["edges"][-1])
        ax.set_ylabel("fraction of predicted tracks")
        if log:
            _log_axis(ax, e["edges"])
        ax.legend(fontsize=10, loc="upper right")
    _label(axes[0], title)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------ tuning figures
TRIAL_STYLE = {"complete": dict(color="tab:blue", marker="o", label="complete"),
               "pruned": dict(color="tab:gray", marker="x", label="pruned (last epoch reported)")}


def optimisation_history(trials: list[tuple[int, float, str]], path: Path, title: str | None = None) -> Path:
    """Each trial's val σ(q/pT) by trial number (`trials`: number, value, "complete" or "pruned"), and the best
    so far among the complete ones: how fast the search found its best head."""
    fig, ax = plt.subplots(figsize=(7, 5))
    for state, style in TRIAL_STYLE.items():
        pts = [(n, v) for n, v, s in trials if s == state and np.isfinite(v)]
        if pts:
            ax.plot(*zip(*pts), ls="none", ms=6, **style)
    done = sorted((n, v) for n, v, s in trials if s == "complete" and np.isfinite(v))
    if done:
        numbers = [n for n, _ in done]
        ax.step(numbers, np.minimum.accumulate([v for _, v in done]), where="post", color="tab:red",
                label="best so far")
    values = [v for _, v, _ in trials if np.isfinite(v)]
    if values and min(values) > 0 and max(values) / min(values) > 5:
        ax.set_yscale("log")
    ax.set_xlim(-0.5, max([n for n, _, _ in trials], default=0) + 0.5)
    ax.set_xlabel("trial")
    ax.set_ylabel(r"val $\sigma(q/p_T) / |q/p_T|$")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend(fontsize=10)
    _label([ax], title)
    return _save(fig, path)


def param_importances(importances: dict[str, float], path: Path, title: str | None = None) -> Path:
    """How much of the spread of val σ(q/pT) each tuned setting explains (Optuna's PED-ANOVA: the share of each
    setting in what tells the best trials from the rest), largest on top."""
    names = sorted(importances, key=importances.get)
    fig, ax = plt.subplots(figsize=(7, 2.6 + 0.45 * len(names)))
    ax.barh(range(len(names)), [importances[n] for n in names], color="tab:blue")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("importance for val $\\sigma(q/p_T)$")
    ax.set_xlim(0, max(max(importances.values(), default=0) * 1.15, 1e-3))
    ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    _label([ax], title)
    return _save(fig, path)
