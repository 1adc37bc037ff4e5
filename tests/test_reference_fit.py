import numpy as np
import pytest

from hepreg.data.reader import open_dataset
from hepreg.evaluation.reference_fit import REFERENCES, reference_events, resolution_table, run


@pytest.mark.parametrize("name", REFERENCES)
def test_fits_recover_the_generated_muons(tiny_dataset, name):
    ds = open_dataset(tiny_dataset)
    refs = reference_events(ds, 0, ds.num_events, block_events=128)  # several blocks, concatenated in order
    pred, valid = refs.fits[name]
    truth = ds.read(0, ds.num_events)
    assert pred.shape == (300, 2, 4) and pred.dtype == np.float32 and valid.shape == (300, 2)
    assert not (valid & ~truth.particle_valid).any()  # never a fit for an empty slot
    assert valid[truth.particle_valid].mean() > 0.95
    p, t = pred[valid], truth.targets[valid]
    rel_pt = (p[:, 0] - t[:, 0]) / t[:, 0]
    assert np.median(np.abs(rel_pt)) < (0.05 if name == "standalone" else 0.015)
    assert (p[:, 3] == t[:, 3]).mean() > (0.98 if name == "standalone" else 0.997)
    assert np.median(np.abs(p[:, 1] - t[:, 1])) < (0.02 if name == "standalone" else 0.002)
    dphi = np.mod(p[:, 2] - t[:, 2] + np.pi, 2 * np.pi) - np.pi
    assert np.median(np.abs(dphi)) < 0.02
    # the bound: every muon with hits has one, in the range the detector allows
    b = refs.bound[truth.particle_valid]
    assert np.isfinite(b).all(-1).mean() > 0.98 and np.nanmedian(b[:, 0]) < 0.03 and np.nanmax(b[:, 1]) < 0.05


def test_resolution_table_against_hand_computed_numbers():
    # 100 muons at pT 10 with relative pT errors -0.49..0.50, eta offset 0.01, one charge flip
    n = 100
    truth = np.zeros((n, 1, 4), dtype=np.float32)
    truth[:, 0] = [10.0, 0.5, 3.1, 1.0]
    pred = truth.copy()
    pred[:, 0, 0] = 10.0 * (1 + (np.arange(n) - 49) / 100)
    pred[:, 0, 1] += 0.01
    pred[:, 0, 2] = -3.1  # wraps: the residual is 2*pi - 6.2
    pred[0, 0, 3] = -1.0
    valid = np.ones((n, 1), dtype=bool)
    rows = resolution_table(pred, valid, truth, valid.copy(), [3.0, 20.0, 50.0])
    first, empty, total = rows
    rel = (np.arange(n) - 49) / 100
    q16, q84 = np.quantile(rel, [(1 - 0.6827) / 2, (1 + 0.6827) / 2])  # the central 68.27 %
    assert first["tracks"] == first["fitted"] == 100 and empty["tracks"] == 0
    np.testing.assert_allclose(first["pt_res"], (q84 - q16) / 2, rtol=1e-5)
    np.testing.assert_allclose(first["pt_bias"], np.median(rel), atol=1e-6)
    np.testing.assert_allclose(first["eta_bias"], 0.01, atol=1e-6)
    assert first["eta_res"] < 1e-6
    np.testing.assert_allclose(first["phi_bias"], 2 * np.pi - 6.2, atol=1e-5)
    np.testing.assert_allclose(first["charge_misid"], 0.01)
    assert np.isnan(empty["pt_res"]) and total["tracks"] == 100


def test_cli_run_prints_the_table(tiny_dataset, capsys):
    out = run(tiny_dataset, max_events=120)
    text = capsys.readouterr().out
    assert "Cramér–Rao bound" in text and "optimal/bound" in text and "3–5" in text and "Gaussian errors" in text
    rows = out["optimal"]
    assert rows[-1]["tracks"] == sum(r["tracks"] for r in rows[:-1])
    assert 0 < rows[-1]["pt_res"] < 0.05
    assert 0.8 < rows[-1]["qpt_res"] / out["bound"][-1]["qpt_res"] < 1.4  # ~180 muons: a loose check
    assert out["standalone"][-1]["qpt_res"] > rows[-1]["qpt_res"]
