import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hepreg.config import config_from_dict, load_config
from hepreg.data.reader import split_ranges
from hepreg.errors import ConfigError
from hepreg.models.maskformer import MaskFormer
from hepreg.runs.outputs import OutputExistsError
from hepreg.runs.directory import load_checkpoint
from hepreg.stages import train_assign


def tiny_overrides(dataset, run_dir, *extra):
    return [f"data.path={dataset}", f"run_dir={run_dir}", "name=t", "data.batch_size=16", "data.max_events=96",
            "data.val_fraction=0.25", "data.test_fraction=0.1", "model.dim=16", "model.num_heads=4",
            "model.encoder_layers=1", "model.ffn_mult=2", "assign.epochs=3", "assign.lr=0.003", *extra]


def tiny_config(dataset, run_dir, *extra):
    return load_config(None, tiny_overrides(dataset, run_dir, *extra))


def read_metrics(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def full_run(tiny_dataset, tmp_path_factory):
    """One uninterrupted 3-epoch run; the tests below read it and never write to it."""
    cfg = tiny_config(tiny_dataset, tmp_path_factory.mktemp("full"))
    train_assign.run(cfg)
    return cfg


def test_run_dir_contents_and_checkpoint_round_trip(tiny_dataset, full_run):
    cfg = full_run
    out = Path(cfg.run_dir) / "t" / "assign"
    assert {"best.pt", "last.pt", "metrics.csv", "config.yaml"} <= {p.name for p in out.iterdir()}
    rows = read_metrics(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    # the columns both training stages share, with the same 1-based epochs, also in TensorBoard
    assert {"epoch", "train_loss", "val_loss", "lr", "events_per_s", "seconds"} <= set(rows[0])
    from test_train_head import tensorboard_scalars

    assert tensorboard_scalars(out)["track_eff"] == [1, 2, 3]
    assert (out / "learning_curves.png").exists() and (out / "learning_curves.pdf").exists()
    assert all(0.0 <= float(r[k]) <= 1.0 for r in rows for k in ("track_eff", "fake_rate", "dm_eff", "hit_purity"))
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])

    ckpt = load_checkpoint(out / "best.pt")
    assert {"model", "config", "epoch", "data_fingerprint", "optimizer", "scheduler", "rng"} <= set(ckpt)
    best_epoch = min(rows, key=lambda r: float(r["val_loss"]))["epoch"]
    assert ckpt["epoch"] == int(best_epoch)
    restored = config_from_dict(ckpt["config"])
    assert restored == cfg
    model = MaskFormer(restored.model)
    model.load_state_dict(ckpt["model"])
    hits, valid = torch.randn(2, 7, 23), torch.ones(2, 7, dtype=torch.bool)
    model.eval()
    again = MaskFormer(cfg.model).eval()
    again.load_state_dict(load_checkpoint(out / "best.pt")["model"])
    torch.testing.assert_close(model(hits, valid).final["mask_logit"], again(hits, valid).final["mask_logit"])

    with pytest.raises(ConfigError, match="model"):  # resuming under another model config is refused
        train_assign.run(tiny_config(tiny_dataset, cfg.run_dir, "model.dim=32"), resume=True)


class Interrupted(Exception):
    pass


class CrashAfter:
    """A loader that dies after `n` batches, like a process killed in the middle of an epoch."""

    def __init__(self, loader, n):
        self.loader, self.n = loader, n

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == self.n:
                raise Interrupted
            yield batch


def test_resume_after_interruption_gives_identical_weights(tiny_dataset, full_run, tmp_path, monkeypatch):
    full_dir = Path(full_run.run_dir) / "t" / "assign"
    full = load_checkpoint(full_dir / "last.pt")

    # Die in the middle of epoch 2, after optimizer steps whose effects were never saved.
    original = train_assign.train_epoch

    def crashing(model, loader, *args):
        return original(model, CrashAfter(loader, 2) if args[-1] == 1 else loader, *args)

    cut = tiny_config(tiny_dataset, tmp_path / "cut")
    monkeypatch.setattr(train_assign, "train_epoch", crashing)
    with pytest.raises(Interrupted):
        train_assign.run(cut)
    monkeypatch.setattr(train_assign, "train_epoch", original)
    assert load_checkpoint(tmp_path / "cut" / "t" / "assign" / "last.pt")["epoch"] == 1

    torch.manual_seed(12345)  # a resumed process does not start from the same global RNG state
    train_assign.run(cut, resume=True)
    resumed = load_checkpoint(tmp_path / "cut" / "t" / "assign" / "last.pt")
    assert resumed["epoch"] == full["epoch"] == 3
    for name, tensor in full["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    rows = read_metrics(tmp_path / "cut" / "t" / "assign" / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert rows[-1]["val_loss"] == read_metrics(full_dir / "metrics.csv")[-1]["val_loss"]


def test_refuses_to_overwrite_and_keeps_the_old_results(tiny_dataset, full_run):
    out = Path(full_run.run_dir) / "t" / "assign"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(OutputExistsError, match="--overwrite to replace them, --resume to continue"):
        train_assign.run(tiny_config(tiny_dataset, full_run.run_dir, "assign.epochs=1"))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_overwrite_starts_again(tiny_dataset, tmp_path):
    cfg = tiny_config(tiny_dataset, tmp_path, "assign.epochs=1", "data.max_events=64")
    train_assign.run(cfg)
    (tmp_path / "t" / "assign" / "notes.txt").write_text("mine")
    train_assign.run(cfg, overwrite=True)
    out = tmp_path / "t" / "assign"
    assert [int(r["epoch"]) for r in read_metrics(out / "metrics.csv")] == [1]
    assert (out / "notes.txt").read_text() == "mine"  # only what hepreg wrote is removed


def test_resume_with_more_epochs_ends_where_a_longer_run_ends(tiny_dataset, full_run, tmp_path, capsys):
    """2 epochs, then --resume with 3: same final epoch, step count and learning rate as the 3-epoch run."""
    cfg = tiny_config(tiny_dataset, tmp_path, "assign.epochs=2")
    train_assign.run(cfg)
    train_assign.run(tiny_config(tiny_dataset, tmp_path, "assign.epochs=3"), resume=True)
    assert "rebuilt for 3 epochs (was 2)" in capsys.readouterr().err
    full = load_checkpoint(Path(full_run.run_dir) / "t" / "assign" / "last.pt")
    got = load_checkpoint(tmp_path / "t" / "assign" / "last.pt")
    assert got["epoch"] == full["epoch"] == 3
    assert got["scheduler"]["last_epoch"] == full["scheduler"]["last_epoch"]
    assert got["optimizer"]["param_groups"][0]["lr"] == full["optimizer"]["param_groups"][0]["lr"]
    assert [int(r["epoch"]) for r in read_metrics(tmp_path / "t" / "assign" / "metrics.csv")] == [1, 2, 3]
    with pytest.raises(ConfigError, match="trained 3 epochs already"):
        train_assign.run(tiny_config(tiny_dataset, tmp_path, "assign.epochs=2"), resume=True)


@pytest.mark.slow
def test_ddp_two_cpu_processes(tiny_dataset, tmp_path):
    """torchrun with gloo: both ranks train their shards; validation counts every val event exactly once."""
    overrides = tiny_overrides(tiny_dataset, tmp_path, "assign.epochs=2", "assign.device=cpu")
    cfg = load_config(None, overrides)
    (tmp_path / "run.yaml").write_text(cfg.to_yaml())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "hepreg", "train-assign", "-c", str(tmp_path / "run.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HEPREG_NO_PROGRESS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "t" / "assign"
    rows = read_metrics(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]  # written once, by rank 0
    ranges = split_ranges(96, cfg.data.val_fraction, cfg.data.test_fraction)
    assert all(int(r["val_events"]) == ranges["val"][1] - ranges["val"][0] for r in rows)
    assert all(int(r["train_events"]) == ranges["train"][1] - ranges["train"][0] for r in rows)
    ckpt = load_checkpoint(out / "last.pt")
    assert not any(k.startswith("module.") for k in ckpt["model"])  # the plain model, not the DDP wrapper


def test_early_stopping_and_wall_time_budget(tiny_dataset, tmp_path):
    # lr 0: the val loss never improves after epoch 1, so patience 1 stops after epoch 2
    train_assign.run(tiny_config(tiny_dataset, tmp_path / "a", "assign.epochs=5", "assign.patience=1", "assign.lr=0"))
    assert [int(r["epoch"]) for r in read_metrics(tmp_path / "a" / "t" / "assign" / "metrics.csv")] == [1, 2]
    train_assign.run(tiny_config(tiny_dataset, tmp_path / "b", "assign.epochs=5", "assign.max_minutes=0.0001"))
    assert [int(r["epoch"]) for r in read_metrics(tmp_path / "b" / "t" / "assign" / "metrics.csv")] == [1]


def test_lion_optimizer_descends():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    cfg = load_config(None, ["assign.optimizer=lion", "assign.lr=0.01"])
    opt = train_assign.make_optimizer(model, cfg)
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    first = torch.nn.functional.mse_loss(model(x), y).item()
    for _ in range(50):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * first
