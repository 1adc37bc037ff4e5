import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from hepreg.evaluation import metrics
from hepreg.evaluation.report import PLOT_FILES
from hepreg.evaluation.tally import AssignmentTally, regression_metrics

pytestmark = pytest.mark.xdist_group("test_evaluate")  # its module fixture trains a run: one worker makes it once

PT_BINS, ETA_BINS = [3.0, 5.0, 10.0, 20.0], [0.0, 1.0, 2.0]


def _logits(on: list[list[int]], m: int) -> torch.Tensor:
    x = torch.full((len(on), m), -5.0)
    for q, hits in enumerate(on):
        x[q, hits] = 5.0
    return x


def test_assignment_tally_hand_computed():
    # event 0: target 0 = hits {0, 1} (pT 4, eta -0.2), target 1 = hit {2} (pT 7, eta 1.5), hit 3 is noise.
    #   query 0 predicts {0, 1}: perfect. query 1 predicts {2, 3}: efficiency 1, purity 0.5 (not > 0.5: no DM).
    # event 1: target 0 = hit {0} (pT 4, eta 0.5); query 0 matched to it but predicted invalid (missed),
    #   query 1 predicted valid and unmatched (a fake).
    track_logit = torch.tensor([[5.0, 5.0], [-5.0, 5.0]])
    mask_logit = torch.stack([_logits([[0, 1], [2, 3]], 4), _logits([[0], [1]], 4)])
    hit_valid = torch.ones(2, 4, dtype=torch.bool)
    target_valid = torch.tensor([[True, True], [True, False]])
    target_hits = torch.tensor([[[1, 1, 0, 0], [0, 0, 1, 0]], [[1, 0, 0, 0], [0, 0, 0, 0]]], dtype=torch.bool)
    targets = torch.tensor([[[4.0, -0.2, 0.0, 1.0], [7.0, 1.5, 0.0, -1.0]], [[4.0, 0.5, 0.0, 1.0], [0.0] * 4]])
    match = torch.tensor([[0, 1], [0, -1]])

    tally = AssignmentTally(PT_BINS, ETA_BINS)
    tally.add(track_logit, mask_logit, hit_valid, target_valid, target_hits, targets, match)
    r = tally.result()
    o = r["overall"]
    assert (o["targets"], o["found"], o["fakes"], o["predicted"]) == (3, 2, 1, 3)
    assert o["track_eff"] == pytest.approx(2 / 3) and o["fake_rate"] == pytest.approx(1 / 3)
    assert o["hit_eff"] == pytest.approx(1.0) and o["hit_purity"] == pytest.approx(0.75)
    assert o["dm_eff"] == pytest.approx(1 / 3) and o["perfect_eff"] == pytest.approx(1 / 3)

    pt = r["vs_pt"]
    assert pt["track_efficiency"]["total"] == [2, 1, 0]
    assert pt["track_efficiency"]["eff"][:2] == [0.5, 1.0] and math.isnan(pt["track_efficiency"]["eff"][2])
    assert pt["dm_efficiency"]["eff"][:2] == [0.5, 0.0]
    assert pt["perfect_efficiency"]["eff"][:2] == [0.5, 0.0]
    assert pt["hit_purity"]["mean"][:2] == [1.0, 0.5] and math.isnan(pt["hit_purity"]["mean"][2])
    eta = r["vs_eta"]  # |eta| 0.2 and 0.5 in bin 0, 1.5 in bin 1
    assert eta["track_efficiency"]["total"] == [2, 1] and eta["track_efficiency"]["passed"] == [1, 1]


def test_regression_metrics_keys_and_values():
    true = np.array([[4.0, 0.5, 3.1, 1.0], [8.0, -1.5, -3.1, -1.0], [50.0, 0.1, 0.0, 1.0]])
    pred = true.copy()
    pred[:, 0] *= 1.1
    pred[2, 3] = -1.0  # one charge flipped, at 50 GeV
    out, res = regression_metrics(pred, true, PT_BINS + [100.0], ETA_BINS)
    assert out["tracks"] == 3
    assert out["overall"]["pt"]["bias"] == pytest.approx(0.1)
    assert out["charge_misid"]["eff"] == pytest.approx(1 / 3)
    assert out["charge_misid_vs_pt"]["eff"][3] == 1.0 and out["charge_misid_vs_pt"]["eff"][0] == 0.0
    assert out["vs_pt"]["pt"]["count"] == [1, 1, 0, 1]
    assert set(res) == set(metrics.RESIDUALS)


@pytest.fixture(scope="module")
def tiny_run(tiny_dataset, tmp_path_factory):
    """A whole tiny run: 1 stage-1 epoch, export, 1 head epoch, on the 300-event test dataset."""
    from hepreg.config import load_config
    from hepreg.stages import export, train_assign, train_head

    root = tmp_path_factory.mktemp("evalrun")
    cfg = load_config("configs/demo.yaml", [
        f"data.path={tiny_dataset}", f"run_dir={root / 'runs'}", "name=tiny", "data.max_events=200",
        "data.val_fraction=0.2", "data.test_fraction=0.2", "data.batch_size=40", "assign.epochs=1",
        "head_train.epochs=1", "head_train.batch_size=64", "assign.device=cpu", "export.device=cpu",
        "head_train.device=cpu"])
    train_assign.run(cfg)
    export.run(cfg)
    train_head.run(cfg)
    return cfg


REGRESSION_KEYS = {"tracks", "overall", "charge_misid", "vs_pt", "vs_eta", "charge_misid_vs_pt"}
ASSIGNMENT_KEYS = {"track_eff", "fake_rate", "hit_eff", "hit_purity", "dm_eff", "perfect_eff", "targets", "found"}
BINNED_ASSIGNMENT = {"track_efficiency", "dm_efficiency", "perfect_efficiency", "hit_efficiency", "hit_purity"}


@pytest.mark.slow
def test_evaluate_smoke_writes_every_plot_and_key(tiny_run):
    from hepreg.runs.directory import RunDir
    from hepreg.stages import evaluate

    evaluate.run(tiny_run, overwrite=True)  # other tests of the module's run may have evaluated it already
    out = RunDir(tiny_run).eval / "test"
    for name in PLOT_FILES:
        assert (out / name).stat().st_size > 10_000, name
    m = json.loads((out / "metrics.json").read_text())
    assert m["split"] == "test" and m["events"] == 40 and sorted(m["plots"]) == sorted(PLOT_FILES)
    for method in ("head", "reference", "optimal"):
        r = m["regression"][method]
        assert REGRESSION_KEYS <= set(r) and r["tracks"] > 0
        for kind in metrics.RESIDUALS:
            assert 0 < r["overall"][kind]["width"] < math.inf, (method, kind)  # a spread: finite, not degenerate
            assert len(r["vs_pt"][kind]["width"]) == len(tiny_run.eval.pt_bins) - 1
            assert len(r["vs_eta"][kind]["bias"]) == len(tiny_run.eval.eta_bins) - 1
    a = m["assignment"]
    assert ASSIGNMENT_KEYS <= set(a["overall"]) and a["overall"]["targets"] > 0
    for axis in ("vs_pt", "vs_eta"):
        assert set(a[axis]) == BINNED_ASSIGNMENT
    # the reference fit is given truth hits: its pT resolution is finite and not absurd even on tiny data
    assert 0 < m["regression"]["reference"]["overall"]["pt"]["width"] < 0.5
    # the bound: the head's tracks, widths per bin (no bias: a bound has none), below the optimal fit's
    b = m["regression"]["bound"]
    assert b["tracks"] == m["regression"]["head"]["tracks"] and b["overall"]["qpt"]["bias"] is None
    assert 0 < b["overall"]["qpt"]["width"] < 0.05
    assert len(b["vs_pt"]["eta"]["width"]) == len(tiny_run.eval.pt_bins) - 1
    # the head by purity: every head track counted once
    assert sum(r["tracks"] for r in m["purity"]) == m["regression"]["head"]["tracks"]
    assert abs(sum(r["share_of_wrong_charges"] for r in m["purity"]) - 1) < 1e-9 or \
        m["regression"]["head"]["charge_misid"]["eff"] == 0


def test_purity_breakdown_hand_computed():
    from hepreg.evaluation.tally import purity_breakdown

    # 10 tracks at pT 10 (q/pT 0.1): purities 1 x4, 0.97 x2, 0.92 x2, 0.5, none; wrong charges at 0.92 and 0.5
    true = np.tile([10.0, 0.5, 1.0, 1.0], (10, 1))
    pred = true.copy()
    pred[:, 0] = 10.0 * np.array([1.0, 1.01, 0.99, 1.0, 1.02, 0.98, 1.1, 0.9, 1.0, 1.0])
    pred[[7, 8], 3] = -1.0
    purity = np.array([1.0, 1.0, 1.0, 1.0, 0.97, 0.97, 0.92, 0.92, 0.5, np.nan])
    rows = {r["purity"]: r for r in purity_breakdown(pred, true, purity)}
    assert [rows[k]["tracks"] for k in ("1.0", "0.95–1.0", "0.9–0.95", "< 0.9", "no hits")] == [4, 2, 2, 1, 1]
    assert rows["1.0"]["charge_misid"] == 0 and rows["0.9–0.95"]["charge_misid"] == 0.5
    assert rows["0.9–0.95"]["share_of_wrong_charges"] == 0.5 and rows["< 0.9"]["share_of_wrong_charges"] == 0.5
    assert rows["1.0"]["share"] == 0.4
    r = metrics.residuals(pred, true)["qpt"]
    assert rows["0.95–1.0"]["qpt_res"] == pytest.approx(metrics.robust_width(r[4:6]))


def test_matched_purity_counts_the_predicted_hits_of_each_matched_query():
    from hepreg.evaluation.tally import matched_purity

    # one event, 2 queries, 5 hits; query 0 predicts hits 0-2 (particle 1 owns 0, 1), query 1 predicts none
    logit = torch.full((1, 2, 5), -5.0)
    logit[0, 0, :3] = 5.0
    hit_valid = torch.ones(1, 5, dtype=torch.bool)
    target_hits = torch.zeros(1, 2, 5, dtype=torch.bool)
    target_hits[0, 1, :2] = True
    target_hits[0, 0, 3:] = True
    b, n, slot, value = matched_purity(logit, hit_valid, target_hits, torch.tensor([[1, 0]]))
    assert b.tolist() == [0, 0] and n.tolist() == [0, 1] and slot.tolist() == [1, 0]
    assert value[0] == pytest.approx(2 / 3) and np.isnan(value[1])


def test_evaluate_names_the_missing_stage(tmp_path):
    from hepreg.config import load_config
    from hepreg.errors import HepregError
    from hepreg.stages import evaluate

    cfg = load_config(None, [f"run_dir={tmp_path}", "name=nothing"])
    with pytest.raises(HepregError, match="train-assign"):
        evaluate.run(cfg)


def _close(a, b) -> None:
    """Two metric trees equal up to float rounding (NaN where one is NaN)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _close(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _close(x, y)
    elif isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-4, abs=1e-6)
    else:
        assert a == b


@pytest.mark.slow
def test_evaluate_reads_the_predictions_file_of_its_head(tiny_run, monkeypatch):
    import dataclasses

    from hepreg.runs.directory import RunDir
    from hepreg.stages import evaluate, predict

    cfg = dataclasses.replace(tiny_run, name="tiny", eval=dataclasses.replace(tiny_run.eval, plots=False))
    computed = evaluate.run(cfg, overwrite=True)["regression"]["head"]
    path = predict.run(cfg, split="test", source="cache")
    monkeypatch.setattr(evaluate, "CacheLoader", None)  # the file must be enough
    read = evaluate.run(cfg, overwrite=True)["regression"]["head"]
    _close(read, computed)
    # another head of the run (as a sweep member would be): not this file's head, computed, written beside it
    monkeypatch.undo()
    other = evaluate.run(cfg, head=RunDir(cfg).head / "last.pt", overwrite=True)
    assert other["head"].endswith("last.pt") and (RunDir(cfg).head / "eval" / "test" / "metrics.json").is_file()
    path.unlink()


def test_evaluate_on_data_without_truth_says_what_is_missing(tiny_run, tmp_path):
    import dataclasses

    from conftest import truthless_copy

    from hepreg.errors import DataError
    from hepreg.stages import evaluate

    bare = truthless_copy(Path(tiny_run.data.path), tmp_path / "bare", "no_link")
    cfg = dataclasses.replace(tiny_run, data=dataclasses.replace(tiny_run.data, path=str(bare)))
    with pytest.raises(DataError, match="no truth.*spacePoint_truthLink"):
        evaluate.run(cfg)


@pytest.mark.slow
def test_evaluate_keeps_each_split_and_refuses_to_overwrite(tiny_run, capsys):
    import dataclasses

    from hepreg.runs.outputs import OutputExistsError
    from hepreg.runs.directory import RunDir
    from hepreg.stages import evaluate

    tiny_run = dataclasses.replace(tiny_run, eval=dataclasses.replace(tiny_run.eval, plots=False))  # tables only
    test_dir = RunDir(tiny_run).eval / "test"
    if not (test_dir / "metrics.json").exists():
        evaluate.run(tiny_run)
    before = {p.name: p.read_bytes() for p in test_dir.iterdir()}
    with pytest.raises(OutputExistsError, match="evaluate --split test"):
        evaluate.run(tiny_run)
    val = dataclasses.replace(tiny_run, eval=dataclasses.replace(tiny_run.eval, split="val"))
    capsys.readouterr()
    evaluate.run(val)
    out, err = capsys.readouterr()
    assert "regression on val" in out and "assignment on val" in out and "metrics and plots" in err
    assert "metrics and plots" not in out and max(len(line) for line in out.splitlines()) <= 80
    assert {p.name: p.read_bytes() for p in test_dir.iterdir()} == before  # val went to its own folder
    val_dir = RunDir(tiny_run).eval / "val"
    assert json.loads((val_dir / "metrics.json").read_text())["split"] == "val"
    assert "split: val" in (val_dir / "config.yaml").read_text()
    assert not list(val_dir.glob("*.png")) and not list(val_dir.glob("*.pdf"))  # eval.plots=false: tables only
    evaluate.run(val, overwrite=True)
