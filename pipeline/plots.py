"""PNG figures of the evaluation, drawn from the dicts `hepreg.metrics` returns (and metrics.json stores).

Matplotlib with the Agg backend (no display needed). Each function writes one file and returns its path.
Points are drawn at bin centres with the bin width as horizontal bar; empty bins (NaN) are left out.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from hepreg.metrics import RESIDUALS, robust_width  # noqa: E402

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
STYLE = {"head": dict(color="C0", marker="o", label="regression head"),
         "reference": dict(color="C3", marker="s", label="reference fit (truth hits)"),
         "reference_vertex": dict(color="C2", marker="^", label="reference fit + beam line (truth hits)")}


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
    ax.set_xticks(edges)
    ax.set_xticklabels([f"{e:g}" for e in edges])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _title(fig, title: str | None) -> None:
    if title:
        fig.suptitle(title, fontsize=11)


def residual_histograms(residuals: dict[str, dict[str, np.ndarray]], path: Path, title: str | None = None) -> Path:
    """2x2 histograms of the four residuals; `residuals` maps a method (head, reference) to its arrays.

    The range is +-5 core widths of the wider method, so both cores are visible; the legend gives each
    method's core width and the fraction of its tracks outside the range.
    """
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
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
            out = np.mean(np.abs(x) > half)
            style = STYLE[method]
            ax.hist(x, bins=bins, histtype="step", lw=1.6, color=style["color"], density=True,
                    label=f"{style['label']}\n$\\sigma$ = {robust_width(x):.3g}, {100 * out:.1f} % outside")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(7))
        ax.set_xlabel(label)
        ax.set_ylabel("tracks (normalised)")
        ax.legend(fontsize=8, loc="upper right")
    _title(fig, title)
    return _save(fig, path)


def resolution_vs(binned: dict[str, dict[str, dict]], axis: str, path: Path, title: str | None = None) -> Path:
    """Core width (top row) and bias (bottom row) of each residual vs true pT or |eta|.

    `binned` maps a method to {residual kind: metrics.binned_summary(...)}; `axis` is "pt" or "eta".
    A width panel whose values span more than a factor 30 (an early head against the reference fit) gets a
    log y axis, so that both methods stay readable.
    """
    xlabel, log = AXIS[axis]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7), sharex=True)
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
                                        ls="none", ms=5, capsize=2, **style)
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
    axes[0, 0].legend(fontsize=8)
    _title(fig, title)
    return _save(fig, path)


def charge_misid_vs_pt(binned: dict[str, dict], path: Path, title: str | None = None) -> Path:
    """Charge mis-identification rate vs true pT with binomial errors; `binned` maps a method to a
    metrics.binned_efficiency(...) of the mis-ID flag."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, (method, e) in enumerate(binned.items()):
        x, xerr = _centres(e["edges"], True, i)
        y = np.asarray(e["eff"], dtype=float)
        ok = np.isfinite(y)
        yerr = np.stack([e["err_lo"], e["err_hi"]]).astype(float)
        ax.errorbar(x[ok], y[ok], xerr=xerr[:, ok], yerr=yerr[:, ok], ls="none", ms=5, capsize=2, **STYLE[method])
    _log_axis(ax, e["edges"])
    ax.set_xlabel(AXIS["pt"][0])
    ax.set_ylabel("charge mis-identification rate")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    _title(fig, title)
    return _save(fig, path)


EFFICIENCY_STYLE = {
    "track_efficiency": dict(color="C0", marker="o", label="track efficiency"),
    "dm_efficiency": dict(color="C2", marker="s", label="double-majority efficiency"),
    "perfect_efficiency": dict(color="C1", marker="^", label="perfect-match efficiency"),
    "hit_efficiency": dict(color="C4", marker="o", label="hit efficiency (matched tracks)"),
    "hit_purity": dict(color="C5", marker="s", label="hit purity (matched tracks)"),
}


def efficiency_vs(binned: dict[str, dict], axis: str, path: Path, title: str | None = None) -> Path:
    """Left: track, double-majority and perfect-match efficiency (Clopper-Pearson errors); right: mean
    hit efficiency and purity of matched tracks (standard errors), vs true pT or |eta|."""
    xlabel, log = AXIS[axis]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    for i, key in enumerate(("track_efficiency", "dm_efficiency", "perfect_efficiency")):
        e = binned[key]
        x, xerr = _centres(e["edges"], log, i - 1)
        y = np.asarray(e["eff"], dtype=float)
        ok = np.isfinite(y)
        yerr = np.stack([e["err_lo"], e["err_hi"]]).astype(float)
        left.errorbar(x[ok], y[ok], xerr=xerr[:, ok], yerr=yerr[:, ok], ls="none", ms=5, capsize=2,
                      **EFFICIENCY_STYLE[key])
    for i, key in enumerate(("hit_efficiency", "hit_purity")):
        m = binned[key]
        x, xerr = _centres(m["edges"], log, i)
        y = np.asarray(m["mean"], dtype=float)
        ok = np.isfinite(y)
        yerr = np.nan_to_num(np.asarray(m["err"], dtype=float))
        right.errorbar(x[ok], y[ok], xerr=xerr[:, ok], yerr=yerr[ok], ls="none", ms=5, capsize=2,
                       **EFFICIENCY_STYLE[key])
    left.set_ylabel("fraction of true tracks")
    right.set_ylabel("mean per matched track")
    for ax in (left, right):
        ax.set_xlabel(xlabel)
        ax.set_ylim(0, 1.05)
        ax.axhline(1, color="grey", lw=0.8, ls=":")
        ax.legend(fontsize=8, loc="best")
        if log:
            _log_axis(ax, m["edges"])
    _title(fig, title)
    return _save(fig, path)
