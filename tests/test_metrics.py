import math

import numpy as np
import pytest

from hepreg.evaluation import metrics


def test_wrap_phi_maps_into_half_open_interval():
    d = np.array([0.0, np.pi, -np.pi, 1.5 * np.pi, -1.5 * np.pi, 2 * np.pi + 0.1, 0.3])
    w = metrics.wrap_phi(d)
    np.testing.assert_allclose(w, [0.0, np.pi, np.pi, -0.5 * np.pi, 0.5 * np.pi, 0.1, 0.3], atol=1e-12)
    assert np.all((w > -np.pi) & (w <= np.pi))


def test_phi_residual_across_the_boundary_is_small():
    # truth just below +pi, prediction just above -pi: 0.02 rad apart, not 2 pi - 0.02
    pred = np.array([[10.0, 0.0, -np.pi + 0.01, 1.0]])
    true = np.array([[10.0, 0.0, np.pi - 0.01, 1.0]])
    r = metrics.residuals(pred, true)
    assert r["phi"][0] == pytest.approx(0.02, abs=1e-12)


def test_residuals_hand_computed():
    # pt 10 -> 12.5 (+25 %); q/pT: 1/10 -> 1/12.5, relative -0.2; eta +0.1
    pred = np.array([[12.5, 1.1, 0.5, 0.7], [20.0, -1.0, 0.0, 0.3]])
    true = np.array([[10.0, 1.0, 0.4, 1.0], [20.0, -1.0, 0.0, -1.0]])
    r = metrics.residuals(pred, true)
    np.testing.assert_allclose(r["pt"], [0.25, 0.0])
    # second track: predicted charge +1 (sign of 0.3) vs true -1: q/pT flips, relative residual 2
    np.testing.assert_allclose(r["qpt"], [-0.2, 2.0])
    np.testing.assert_allclose(r["eta"], [0.1, 0.0], atol=1e-12)
    np.testing.assert_allclose(r["phi"], [0.1, 0.0], atol=1e-12)


def test_robust_width_and_bias_hand_computed():
    x = np.arange(101, dtype=float)  # quantile q of 0..100 (linear) is 100 q
    assert metrics.robust_width(x) == pytest.approx(0.5 * (84.135 - 15.865))
    assert metrics.bias(x) == 50.0
    # outliers in the tails move neither the core width nor the median
    y = np.concatenate([x, [1e6, -1e6]])
    assert metrics.robust_width(y) == pytest.approx(metrics.robust_width(x), rel=0.02)
    assert metrics.bias(y) == 50.0


def test_robust_width_is_sigma_for_a_gaussian():
    x = np.random.default_rng(0).normal(0.3, 2.0, 200_000)
    assert metrics.robust_width(x) == pytest.approx(2.0, rel=0.01)
    assert metrics.bias(x) == pytest.approx(0.3, abs=0.02)


def test_empty_inputs_give_nan():
    assert math.isnan(metrics.robust_width(np.array([])))
    assert math.isnan(metrics.bias(np.array([np.nan])))
    s = metrics.summary(np.array([]))
    assert s["count"] == 0 and math.isnan(s["width"]) and math.isnan(s["bias_err"])


def test_bin_index_edges_and_outside():
    idx = metrics.bin_index(np.array([0.0, 0.5, 1.0, 2.0, 3.0, -0.1, 3.1, np.nan]), [0.0, 1.0, 2.0, 3.0])
    assert idx.tolist() == [0, 0, 1, 2, 2, -1, -1, -1]


def test_binned_summary_with_an_empty_bin():
    x = np.array([0.5, 0.5, 0.5, 2.5, 2.5])
    v = np.array([1.0, 2.0, 3.0, -4.0, -4.0])
    s = metrics.binned_summary(x, v, [0, 1, 2, 3])
    assert s["count"] == [3, 0, 2]
    assert s["bias"][0] == 2.0 and math.isnan(s["bias"][1]) and s["bias"][2] == -4.0
    assert s["width"][2] == 0.0 and math.isnan(s["width"][1])
    # quantiles 0.15865 and 0.84135 of [1, 2, 3] by linear interpolation: 1 + 2 q
    assert s["width"][0] == pytest.approx(0.5 * (2 * 0.84135 - 2 * 0.15865))


def test_clopper_pearson_known_values():
    lo, hi = metrics.clopper_pearson(np.array([0, 10, 5, 0]), np.array([10, 10, 10, 0]))
    # k = 0: lower 0, upper 1 - (alpha/2)^(1/n); k = n: upper 1, lower (alpha/2)^(1/n)
    a2 = (1 - metrics.CENTRAL) / 2
    assert lo[0] == 0.0 and hi[0] == pytest.approx(1 - a2 ** 0.1)
    assert hi[1] == 1.0 and lo[1] == pytest.approx(a2 ** 0.1)
    assert lo[2] < 0.5 < hi[2] and hi[2] - 0.5 == pytest.approx(0.5 - lo[2])  # symmetric at k = n/2
    assert math.isnan(lo[3]) and math.isnan(hi[3])


def test_binned_efficiency_hand_computed_with_empty_bin():
    x = np.array([0.1, 0.2, 0.3, 0.4, 2.5])
    passed = np.array([True, True, True, False, False])
    e = metrics.binned_efficiency(x, passed, [0, 1, 2, 3])
    assert e["total"] == [4, 0, 1] and e["passed"] == [3, 0, 0]
    assert e["eff"][0] == 0.75 and math.isnan(e["eff"][1]) and e["eff"][2] == 0.0
    assert e["err_lo"][2] == 0.0 and e["err_hi"][2] > 0.5  # one failed trial says little
    assert 0 < e["err_lo"][0] and 0 < e["err_hi"][0]


def test_charge_misid():
    mis = metrics.charge_misid(np.array([1, -1, 1, -1]), np.array([0.4, 0.2, -0.9, -1.0]))
    assert mis.tolist() == [False, True, True, False]


def test_pulls_of_calibrated_widths_are_unit_gaussian_and_phi_wraps():
    """The pulls evaluate tabulates and plots: one per predicted width, median 0 and width 1 when the widths are
    right, twice as wide when they are half the spread; phi across ±π, q/pT with the predicted charge's sign."""
    rng = np.random.default_rng(0)
    n = 3000
    pt = np.exp(rng.uniform(np.log(3), np.log(300), n))
    true = np.stack([pt, rng.uniform(-2.7, 2.7, n), rng.uniform(-np.pi, np.pi, n), rng.choice([-1.0, 1.0], n)], 1)
    sigma = {"sigma_pt": 0.05 * pt, "sigma_eta": np.full(n, 0.01), "sigma_phi": np.full(n, 0.004)}
    pred = true.copy()
    pred[:, :3] += rng.standard_normal((n, 3)) * np.stack(list(sigma.values()), 1)
    pred[:, 2] = metrics.wrap_phi(pred[:, 2])  # as a head gives it
    pull = metrics.pulls(pred, true, sigma)
    assert set(pull) == {"pt", "eta", "phi"}  # no width for q/pT predicted: no pull
    for x in pull.values():
        assert abs(np.median(x)) < 0.1 and metrics.robust_width(x) == pytest.approx(1.0, abs=0.08)
    twice = metrics.pulls(true + 2 * (pred - true), true, sigma)  # widths half the true spread
    assert metrics.robust_width(twice["eta"]) == pytest.approx(2.0, abs=0.15)
    edge = metrics.pulls(np.array([[10, 0, np.pi - 0.001, 1]]), np.array([[10, 0, -np.pi + 0.001, 1]]),
                         {"sigma_phi": np.array([0.001])})
    assert edge["phi"][0] == pytest.approx(-2.0)  # across ±π, not 2π / σ
    # q/pT: 1/12.5 - 1/10 = -0.02 with a regressed charge of +0.3; -1/12.5 - 1/10 = -0.18 with -0.3
    qpt = metrics.pulls(np.array([[12.5, 0, 0, 0.3], [12.5, 0, 0, -0.3]]), np.array([[10, 0, 0, 1.0]] * 2),
                        {"sigma_qpt": np.array([0.01, 0.01])})
    np.testing.assert_allclose(qpt["qpt"], [-2.0, -18.0])
