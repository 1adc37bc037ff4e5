"""`hepreg tune` on a tiny hand-written cache: a study that survives SIGKILL, pruning, two processes sharing one
study on SQLite, and space files refused before any work."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hepreg.runs.directory import load_checkpoint
from helpers import run_cli
from test_faults import hepreg, refused
from test_train_head import make_run


def tiny_run(tmp_path: Path, epochs: int = 2, space: str = "pruner: none\nparams:\n  lr: [3.0e-3, 1.0e-2]\n"
             ) -> tuple[Path, Path, Path]:
    """A run with a tiny cache, its config file, a space file, and the run's tune/ folder."""
    cfg = make_run(tmp_path, epochs=epochs, plots=True)
    config = tmp_path / "run.yaml"
    config.write_text(cfg.to_yaml())
    space_file = tmp_path / "space.yaml"
    space_file.write_text(space)
    return config, space_file, cfg.run_path / "tune"


def start(config: Path, space: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HEPREG_NO_PROGRESS": "1"}
    return subprocess.Popen([sys.executable, "-m", "hepreg", "tune", "-c", str(config), "--space", str(space),
                             *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def study(tune_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name="t", storage=f"sqlite:///{tune_dir / 'study.db'}")


@pytest.mark.slow
def test_a_killed_trial_is_marked_failed_and_tried_again(tmp_path, monkeypatch, capsys):
    config, space, tune_dir = tiny_run(tmp_path, epochs=500)  # a trial far longer than the test waits
    proc = start(config, space, "--trials", "1", "--set", "eval.plots=false")
    metrics = tune_dir / "trial-0000" / "metrics.csv"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) > 1):  # an epoch done
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [t.state for t in study(tune_dir).trials] == [TrialState.RUNNING]

    code, out = run_cli(monkeypatch, capsys, "tune", "-c", config, "--space", space, "--trials", "1",
                        "--set", "head_train.epochs=2", "--set", "eval.plots=false")
    assert code == 0, out
    assert "trial 0 failed (its process died)" in out
    killed, retried = study(tune_dir).trials
    assert killed.state == TrialState.FAIL and retried.state == TrialState.COMPLETE
    assert retried.params == killed.params and retried.user_attrs["retry_of"] == 0
    assert os.readlink(tune_dir / "best") == "trial-0001"


def test_pruning_stops_a_trial_behind_the_others(tmp_path, monkeypatch, capsys):
    config, space, tune_dir = tiny_run(tmp_path, epochs=3, space="pruner: median\nstartup_trials: 2\n"
                                                                  "warmup_epochs: 1\nparams:\n  lr: [3.0e-3, 0.0]\n")
    tune_dir.mkdir(parents=True)
    queued = optuna.create_study(study_name="t", storage=f"sqlite:///{tune_dir / 'study.db'}")
    for lr in (3e-3, 0.0, 3e-3, 0.0):  # two trials, then each again: the repeat of the worse is above the median
        queued.enqueue_trial({"lr": lr})
    code, out = run_cli(monkeypatch, capsys, "tune", "-c", config, "--space", space, "--trials", "4")
    assert code == 0, out
    trials = study(tune_dir).trials
    assert [t.state for t in trials[:2]] == [TrialState.COMPLETE] * 2
    worse = max(trials[:2], key=lambda t: t.value).number
    pruned = trials[worse + 2]
    assert pruned.state == TrialState.PRUNED and list(pruned.intermediate_values) == [1]
    rows = (tune_dir / pruned.user_attrs["row"]["name"] / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 1  # it stopped after its first epoch of 3
    assert f"trial {pruned.number} pruned after epoch 1" in out
    for figure in ("optimisation_history", "param_importances", "best/learning_curves"):
        assert (tune_dir / f"{figure}.png").is_file() and (tune_dir / f"{figure}.pdf").is_file()


@pytest.mark.slow
def test_two_processes_share_one_study(tmp_path):
    config, space, tune_dir = tiny_run(tmp_path, space="pruner: none\nparams:\n  lr: {low: 1.0e-3, high: 1.0e-2, "
                                                       "log: true}\n  dropout: {low: 0.0, high: 0.3}\n")
    procs = [start(config, space, "--trials", "2", "--set", "eval.plots=false") for _ in range(2)]
    for p in procs:
        out = p.communicate(timeout=240)[0]
        assert p.returncode == 0, out
    trials = study(tune_dir).trials
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted(t.user_attrs["pid"] for t in trials) == sorted(p.pid for p in procs for _ in range(2))
    assert len({tuple(t.params.values()) for t in trials}) == 4  # no trial repeats another's draw
    # the study began with the run config's own head (lr 3e-3, dropout 0.1), so its best is never worse
    assert trials[0].params == pytest.approx({"lr": 3e-3, "dropout": 0.1})
    assert trials[0].user_attrs["start"] == "the run config's head"
    assert len((tune_dir / "leaderboard.csv").read_text().splitlines()) == 1 + 4
    best = load_checkpoint(tune_dir / "best" / "best.pt")  # a head like any other, with its config beside it
    assert best["head_config"]["lr"] == pytest.approx(min(trials, key=lambda t: t.value).params["lr"])
    assert (tune_dir / "best" / "config.yaml").is_file()


@pytest.mark.parametrize("text, names", [
    ("params:\n  hidden_dimm: [8, 16]\n", ["hidden_dimm", "not a head setting"]),
    ("prunr: median\nparams:\n  lr: [0.001]\n", ["prunr", "unknown top-level key"]),
    ("params:\n  dropout: {low: 0.3, high: 0.1}\n", ["params.dropout", "low (0.3) is above high (0.1)"]),
    ("params:\n  lr: {low: 0.0, high: 0.01, log: true}\n", ["params.lr", "log range must start above 0"]),
    ("params:\n  dropout: {low: 0.0, high: 1.0}\n", ["params.dropout", "valid range [0, 1)"]),
    ("params:\n  loss: [smooth_l1, l2]\n", ["params.loss", "'l2'", "smooth_l1, gaussian_nll"]),
    ("params:\n  kind: {low: 1, high: 2}\n", ["params.kind", "list of choices"]),
    ("params:\n  hidden_dim: {low: 8, high: 64, stepp: 8}\n", ["params.hidden_dim", "'stepp'"]),
    ("pruner: mean\nparams:\n  lr: [0.001]\n", ["pruner", "median, hyperband, none"]),
    ("params: {}\n", ["at least one head setting"]),
])
def test_bad_space_files_are_refused(tmp_path, monkeypatch, capsys, text, names):
    space = tmp_path / "bad_space.yaml"
    space.write_text(text)
    refused(hepreg(monkeypatch, capsys, "tune", "-c", "configs/demo.yaml", "--set", f"run_dir={tmp_path}",
                   "--space", space), str(space), *names)
    assert not (tmp_path / "demo").exists()  # refused before any work
