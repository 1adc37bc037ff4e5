"""Figures for a talk: PDF beside every PNG, pulls from predicted sigmas, axes zoomed to the data."""
from __future__ import annotations

import numpy as np

from hepreg.evaluation import metrics, plots


def tracks(n: int = 3000, seed: int = 0):
    rng = np.random.default_rng(seed)
    pt = np.exp(rng.uniform(np.log(3), np.log(300), n))
    true = np.stack([pt, rng.uniform(-2.7, 2.7, n), rng.uniform(-np.pi, np.pi, n), rng.choice([-1.0, 1.0], n)], 1)
    sigma = np.stack([0.05 * pt, np.full(n, 0.01), np.full(n, 0.004), np.full(n, np.nan)], 1)
    return rng, true, sigma


def test_every_figure_has_a_pdf_and_efficiency_axes_are_zoomed(tmp_path):
    rng, true, sigma = tracks()
    pred = true + rng.standard_normal(true.shape) * np.nan_to_num(sigma)
    pt_bins, eta_bins = [3, 5, 10, 20, 50, 100, 300], [0, 0.5, 1, 1.5, 2, 2.7]
    eff = metrics.binned_efficiency(true[:, 0], rng.random(len(true)) < 0.98, pt_bins)
    mean = {"edges": eff["edges"], "mean": [0.97] * 6, "err": [0.004] * 6}
    binned = {"track_efficiency": eff, "dm_efficiency": eff, "perfect_efficiency": eff, "hit_efficiency": mean,
              "hit_purity": mean}
    fake = rng.random(len(true)) < 0.03
    paths = [plots.predicted_vs_true(pred, true, tmp_path / "pvt.png", "sample, test: 3,000 events"),
             plots.pull_histograms(metrics.pulls(pred, true, {f"sigma_{k}": sigma[:, i] for i, k in
                                                              enumerate(("pt", "eta", "phi"))}), tmp_path / "pulls.png"),
             plots.fake_rate_vs({"pt": metrics.binned_efficiency(pred[:, 0], fake, pt_bins),
                                 "eta": metrics.binned_efficiency(np.abs(pred[:, 1]), fake, eta_bins)},
                                tmp_path / "fake.png"),
             plots.efficiency_vs(binned, "pt", tmp_path / "eff.png")]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
        assert p.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"
    lo, hi = [], []  # the efficiency panel's y range follows the data (~0.98), not 0-1
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    plots._zoom(ax, np.array([0.96, 0.97]), np.array([0.985, 0.99]))
    lo, hi = ax.get_ylim()
    plt.close(fig)
    assert 0.9 < lo < 0.96 and 0.99 < hi < 1.05
