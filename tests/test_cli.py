"""The command line itself: no silent defaults, --version, --debug anywhere, results on stdout."""
from __future__ import annotations

import sys

import pytest

from hepreg.settings import Config


def cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Run `hepreg ARGS` in this process; returns (exit code, stdout, stderr)."""
    from hepreg import cli as module

    monkeypatch.setattr(sys, "argv", ["hepreg", *map(str, args)])
    monkeypatch.setitem(module._state, "debug", False)
    code = 0
    try:
        module.main()
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def test_missing_config_is_an_error_unless_the_run_saved_one(tmp_path, monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "train-head", "--set", f"run_dir={tmp_path}", "--set", "name=r")
    assert code == 2 and "no config given" in err and str(tmp_path / "r" / "head") in err
    saved = Config(name="r", run_dir=str(tmp_path), seed=11)
    (tmp_path / "r" / "assign").mkdir(parents=True)
    (tmp_path / "r" / "assign" / "config.yaml").write_text(saved.to_yaml())
    code, out, err = cli(monkeypatch, capsys, "evaluate", "--set", f"run_dir={tmp_path}", "--set", "name=r",
                         "--split", "val")
    assert code == 2 and "config:" in err and "assign/config.yaml" in err  # found, then evaluate needs best.pt
    assert "train-assign" in err and out == ""


def test_print_config_needs_no_file(monkeypatch, capsys):
    code, out, _ = cli(monkeypatch, capsys, "train-head", "--print-config", "--set", "seed=5")
    assert code == 0 and "seed: 5" in out


def test_version_and_debug_anywhere(tmp_path, monkeypatch, capsys):
    code, out, _ = cli(monkeypatch, capsys, "--version")
    assert code == 0 and out.startswith("hepreg ")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run_dir: {tmp_path}\nname: x\n")
    code, _, err = cli(monkeypatch, capsys, "evaluate", "-c", cfg)
    assert code == 2 and "Traceback" not in err
    with pytest.raises(Exception, match="train-assign"):  # --debug after the command: the error is raised
        cli(monkeypatch, capsys, "evaluate", "-c", cfg, "--debug")


def test_stdout_carries_the_results_and_nothing_else(tmp_path, monkeypatch, capsys):
    from test_train_head import make_run

    cfg = make_run(tmp_path, epochs=2)
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    code, out, err = cli(monkeypatch, capsys, "train-head", "-c", path)
    assert code == 0, err
    assert out.lstrip().startswith("head leaderboard") and "σ: core width" in out  # the result, and its key
    assert "train-head · run t" not in out and "parameters" not in out and "2/2" not in out
    assert "train-head · run t" in err and "parameters" in err and "2/2" in err  # header, epoch table
    assert max(len(line) for line in out.splitlines()) <= 80
    assert max(len(line) for line in err.splitlines() if "2/2" in line or "epoch" in line) <= 80


def test_epoch_tables_fit_80_columns():
    from rich.console import Console

    from hepreg.runs.log import ASSIGN_COLUMNS, HEAD_COLUMNS, EpochTable

    row = {"train_loss": 13.2345, "val_loss": 1.5, "val_qpt_res": 0.123, "val_charge_misid": 0.171,
           "events_per_s": 12345.0, "lr": 2e-3, "track_eff": 0.99, "fake_rate": 0.002, "hit_eff": 0.98,
           "hit_purity": 0.97, "dm_eff": 0.985}
    for table in (EpochTable(ASSIGN_COLUMNS, 30).table(30, [("", row)]),
                  EpochTable(HEAD_COLUMNS, 200, names=True, name_width=12).table(200, [("w288_lr3e-3", row)])):
        console = Console(width=200, record=True)
        console.print(table)
        lines = console.export_text().splitlines()
        assert max(len(line.rstrip()) for line in lines) <= 80 and "…" not in "".join(lines), lines
