"""Physics metrics on plain numpy arrays: residuals, robust resolutions, binned statistics, efficiencies.

Everything here is a pure function of arrays so that it can be checked against hand-computed cases and
reused by any stage. Conventions:
- resolution = robust core width: half the central 68.27 % interval (equals sigma for a Gaussian, and is not
  blown up by the non-Gaussian tails that pattern-recognition failures produce);
- bias = median of the residual;
- pT and q/pT residuals are relative, (pred - true) / |true|; eta and phi residuals are absolute, phi wrapped
  to (-pi, pi];
- empty bins give NaN (never 0, which would read as a perfect resolution or efficiency).
"""
from __future__ import annotations

import numpy as np

CENTRAL = 0.6827  # probability content of +-1 sigma
RESIDUALS = ("pt", "qpt", "eta", "phi")  # the residual kinds, in plotting order


def wrap_phi(dphi: np.ndarray) -> np.ndarray:
    """Map angle differences to (-pi, pi], so that phi = pi - 0.01 vs -pi + 0.01 is a 0.02 rad residual."""
    return np.pi - np.mod(np.pi - np.asarray(dphi, dtype=np.float64), 2 * np.pi)


def charge_sign(q: np.ndarray) -> np.ndarray:
    """A regressed (continuous) charge to +-1; exactly 0 counts as positive."""
    return np.where(np.asarray(q) >= 0, 1.0, -1.0)


def residuals(pred: np.ndarray, true: np.ndarray) -> dict[str, np.ndarray]:
    """Residuals of tracks in TARGETS order (pt, eta, phi, q); pred, true [T, 4] -> dict of [T] arrays.

    pt:  (pT_pred - pT_true) / pT_true
    qpt: (q/pT_pred - q/pT_true) / |q/pT_true|, with the predicted charge taken as its sign
    eta: eta_pred - eta_true
    phi: phi_pred - phi_true wrapped to (-pi, pi]
    """
    pred = np.asarray(pred, dtype=np.float64).reshape(-1, 4)
    true = np.asarray(true, dtype=np.float64).reshape(-1, 4)
    pt_p, pt_t = pred[:, 0], true[:, 0]
    k_p = charge_sign(pred[:, 3]) / pt_p
    k_t = true[:, 3] / pt_t
    return {
        "pt": (pt_p - pt_t) / pt_t,
        "qpt": (k_p - k_t) / np.abs(k_t),
        "eta": pred[:, 1] - true[:, 1],
        "phi": wrap_phi(pred[:, 2] - true[:, 2]),
    }


def robust_width(x: np.ndarray) -> float:
    """Half the central 68.27 % interval of x (linear-interpolated quantiles); NaN for an empty array."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan")
    lo, hi = np.quantile(x, [(1 - CENTRAL) / 2, (1 + CENTRAL) / 2])
    return float(0.5 * (hi - lo))


def bias(x: np.ndarray) -> float:
    """Median of x; NaN for an empty array."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(np.median(x)) if x.size else float("nan")


def summary(x: np.ndarray) -> dict[str, float]:
    """Width, bias and count of one residual array, with Gaussian-approximation uncertainties.

    width_err = width / sqrt(2 (n - 1)) and bias_err = 1.2533 width / sqrt(n) (the standard errors of a
    Gaussian's sigma and median); they size error bars, they are not a fit.
    """
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    n = x.size
    w, b = robust_width(x), bias(x)
    return {
        "count": int(n),
        "width": w,
        "bias": b,
        "width_err": w / np.sqrt(2 * (n - 1)) if n > 1 else float("nan"),
        "bias_err": 1.2533 * w / np.sqrt(n) if n > 1 else float("nan"),
    }


def bin_index(x: np.ndarray, edges: list[float] | np.ndarray) -> np.ndarray:
    """Bin of each x for the given edges: 0..len(edges)-2, -1 outside [edges[0], edges[-1]] (right edge in)."""
    x = np.asarray(x, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64)
    idx = np.searchsorted(edges, x, side="right") - 1
    idx[x == edges[-1]] = len(edges) - 2
    idx[(x < edges[0]) | (x > edges[-1]) | ~np.isfinite(x)] = -1
    return idx


def binned_summary(x: np.ndarray, values: np.ndarray, edges: list[float] | np.ndarray, of=None) -> dict[str, list]:
    """`summary` (or `of`, a function with the same fields) of `values` in bins of `x`: a dict of per-bin lists
    (count, width, bias and errors)."""
    idx = bin_index(x, edges)
    values = np.asarray(values, dtype=np.float64)
    rows = [(of or summary)(values[idx == b]) for b in range(len(edges) - 1)]
    out: dict[str, list] = {"edges": [float(e) for e in edges]}
    for key in ("count", "width", "bias", "width_err", "bias_err"):
        out[key] = [r[key] for r in rows]
    return out


def clopper_pearson(k: np.ndarray, n: np.ndarray, cl: float = CENTRAL) -> tuple[np.ndarray, np.ndarray]:
    """Exact (Clopper-Pearson) binomial interval [lo, hi] of k successes in n trials; NaN where n = 0.

    Unlike sqrt(eff (1 - eff) / n), it does not collapse to zero width at an efficiency of 0 or 1.
    """
    from scipy.stats import beta  # here: scipy.stats takes ~0.6 s to import, and a training run needs none of it

    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    alpha = 1 - cl
    with np.errstate(invalid="ignore", divide="ignore"):
        lo = np.where(k > 0, beta.ppf(alpha / 2, k, n - k + 1), 0.0)
        hi = np.where(k < n, beta.ppf(1 - alpha / 2, k + 1, n - k), 1.0)
    empty = n <= 0
    return np.where(empty, np.nan, lo), np.where(empty, np.nan, hi)


def efficiency(passed: np.ndarray, total: np.ndarray) -> dict[str, list]:
    """Efficiency k/n per bin with its Clopper-Pearson errors; NaN for empty bins."""
    k = np.asarray(passed, dtype=np.float64)
    n = np.asarray(total, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        eff = np.where(n > 0, k / np.where(n > 0, n, 1), np.nan)
    lo, hi = clopper_pearson(k, n)
    return {"passed": k.astype(int).tolist(), "total": n.astype(int).tolist(), "eff": eff.tolist(),
            "err_lo": (eff - lo).tolist(), "err_hi": (hi - eff).tolist()}


def binned_efficiency(x: np.ndarray, passed: np.ndarray, edges: list[float] | np.ndarray) -> dict[str, list]:
    """Fraction of entries with `passed` True, in bins of x, with binomial errors."""
    idx = bin_index(x, edges)
    passed = np.asarray(passed, dtype=bool)
    nb = len(edges) - 1
    total = np.bincount(idx[idx >= 0], minlength=nb)[:nb]
    k = np.bincount(idx[(idx >= 0) & passed], minlength=nb)[:nb]
    return {"edges": [float(e) for e in edges], **efficiency(k, total)}


def charge_misid(q_true: np.ndarray, q_pred: np.ndarray) -> np.ndarray:
    """Per track: True where the sign of the predicted charge differs from the true charge."""
    return charge_sign(q_pred) != charge_sign(q_true)


def pulls(pred: np.ndarray, true: np.ndarray, sigma: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """(pred - true) / sigma per track for each predicted width: `sigma_qpt` (q/pT, 1/GeV), `sigma_pt`,
    `sigma_eta`, `sigma_phi` (phi wrapped). A well-calibrated width gives pulls of median 0 and width 1."""
    pred = np.asarray(pred, dtype=np.float64).reshape(-1, 4)
    true = np.asarray(true, dtype=np.float64).reshape(-1, 4)
    diff = {"qpt": charge_sign(pred[:, 3]) / pred[:, 0] - true[:, 3] / true[:, 0], "pt": pred[:, 0] - true[:, 0],
            "eta": pred[:, 1] - true[:, 1], "phi": wrap_phi(pred[:, 2] - true[:, 2])}
    out = {}
    for name, d in diff.items():
        s = sigma.get(f"sigma_{name}")
        if s is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                out[name] = d / np.asarray(s, dtype=np.float64)
    return out


def gaussian_core_width(sigmas: np.ndarray) -> float:
    """The core width (half the central 68.27 % interval) that residuals drawn from N(0, sigma_i^2), one per
    track, would show: x with mean_i P(|r_i| < x) = 0.6827, solved by bisection. It compares a per-track bound
    with `robust_width` of measured residuals like with like; NaN for no finite sigma."""
    from scipy.special import erf  # here, as scipy.stats above: imports a training run does not need
    s = np.asarray(sigmas, dtype=np.float64)
    s = s[np.isfinite(s) & (s > 0)]
    if s.size == 0:
        return float("nan")
    lo, hi = float(s.min()) * 1e-3, float(s.max()) * 10
    for _ in range(100):
        mid = np.sqrt(lo * hi)
        if np.mean(erf(mid / (s * np.sqrt(2)))) < CENTRAL:
            lo = mid
        else:
            hi = mid
    return float(np.sqrt(lo * hi))


def bound_summary(sigmas: np.ndarray) -> dict[str, float]:
    """`summary`'s fields for a per-track bound: the width is `gaussian_core_width`; a bound has no bias."""
    s = np.asarray(sigmas, dtype=np.float64)
    n = int(np.isfinite(s).sum())
    return {"count": n, "width": gaussian_core_width(s), "bias": float("nan"), "width_err": float("nan"),
            "bias_err": float("nan")}


def binned_bound(x: np.ndarray, sigmas: np.ndarray, edges: list[float] | np.ndarray) -> dict[str, list]:
    """`binned_summary`'s fields for a per-track bound, in bins of x."""
    return binned_summary(x, sigmas, edges, of=bound_summary)


def outside(x: np.ndarray, n: float = 3.0) -> float:
    """Fraction of x further than n core widths from its median: the tails a core width does not see."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    w = robust_width(x)
    if x.size == 0 or not w > 0:
        return float("nan")
    return float(np.mean(np.abs(x - np.median(x)) > n * w))
