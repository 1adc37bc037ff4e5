"""`hepreg finetune`: frozen fine-tuning is continued head training, resume after SIGKILL, bad starting points."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from hepreg.config import load_config
from hepreg.evaluation.tally import regression_metrics
from hepreg.runs.distributed import DistInfo
from hepreg.frozen import FrozenAssigner
from hepreg.models.head import HeadSet, head_from_checkpoint
from hepreg.runs.directory import load_checkpoint, save_checkpoint
from hepreg.stages import finetune
from hepreg.trained import FINETUNED
from helpers import make_checkpoint, run_cli

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.xdist_group("test_finetune")  # its module fixture trains a run: one worker makes it once


def overrides(data, run_dir, *extra) -> list[str]:
    return [f"data.path={data}", f"run_dir={run_dir}", "name=ft", "seed=1", "data.max_events=120",
            "data.val_fraction=0.2", "data.test_fraction=0.2", "data.batch_size=12", "data.block_events=32",
            "model.dim=16", "model.num_heads=4", "model.encoder_layers=1", "model.decoder_layers=1",
            "model.ffn_mult=2", "export.dtype=float32", "export.batch_size=16", "export.block_events=16",
            "export.device=cpu", "head.hidden_dim=16", "head.dropout=0.1", "head_train.epochs=2",
            "head.fit_proxy=false",  # the fine-tune's plumbing; the proxy's own paths are tested elsewhere
            "head_train.batch_size=16", "head_train.device=cpu", "finetune.epochs=2", "finetune.batch_size=12",
            "finetune.warmup_steps=3", "finetune.lr_stage1=1.0e-3", "finetune.lr_head=1.0e-3", "finetune.device=cpu",
            *extra]


@pytest.fixture(scope="module")
def start(tiny_dataset, tmp_path_factory):
    """A stage 1 (untrained: its assignment is arbitrary but fixed), its cache, a head trained on it; and one
    uninterrupted fine-tune of them."""
    from hepreg.stages import export, train_head

    root = tmp_path_factory.mktemp("finetune")
    cfg = load_config(None, overrides(tiny_dataset, root))
    make_checkpoint(cfg.run_path / "assign" / "best.pt", cfg, seed=5)
    export.run(cfg)
    train_head.run(cfg)
    finetune.run(cfg)
    return cfg


def test_writes_one_checkpoint_holding_both_parts(start):
    out = start.run_path / "finetune"
    assert {"best.pt", "last.pt", "metrics.csv", "config.yaml", "learning_curves.png"} <= {p.name for p in out.iterdir()}
    last = load_checkpoint(out / "last.pt")
    assert last["kind"] == FINETUNED and last["epoch"] == 2 and last["step"] > 3
    rows = (out / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "1", "2"]  # epoch 0: the starting point, validated
    stage1 = load_checkpoint(start.run_path / "assign" / "best.pt")["model"]
    assert any(not torch.equal(stage1[k], v) for k, v in last["model"].items())  # stage 1 trained after warm-up
    assigner = FrozenAssigner.from_checkpoint(out / "last.pt")  # readable as a stage-1 checkpoint
    assert assigner.config.model.dim == 16
    head_from_checkpoint(last["head"])


def test_frozen_fine_tune_without_assignment_loss_is_continued_head_training(start, tmp_path):
    """Stage 1 frozen throughout and assignment weight 0: the head's weights are those of continuing its own
    training (its optimiser state and dropout stream from head/best.pt, train-head's step) on the same batches."""
    run_dir = tmp_path / "runs"
    shutil.copytree(start.run_path / "assign", run_dir / "ft" / "assign")
    shutil.copytree(start.run_path / "head", run_dir / "ft" / "head")
    cfg = load_config(None, overrides(start.data.path, run_dir, "finetune.warmup_steps=1000000",
                                      "finetune.assign_weight=0", "finetune.schedule=constant"))
    finetune.run(cfg)
    got = load_checkpoint(cfg.run_path / "finetune" / "last.pt")

    from hepreg.stages import train_head
    from hepreg.runs.loop import Progress
    from hepreg.runs.training import EarlyStopping, RngStream

    state = load_checkpoint(cfg.run_path / "head" / "best.pt")
    assigner = FrozenAssigner.from_checkpoint(cfg.run_path / "assign" / "best.pt")
    head = head_from_checkpoint(state)
    optimizer = torch.optim.AdamW(head.parameters())
    optimizer.load_state_dict(state["optimizer"])
    for g in optimizer.param_groups:
        g["lr"] = cfg.finetune.lr_head
    rng = RngStream(0, torch.device("cpu"))
    rng.state = state["rng"]
    member = train_head.Member("head", head.cfg, head, optimizer, types.SimpleNamespace(step=lambda: None), rng,
                               tmp_path, Progress(EarlyStopping(1)))
    _, _, loader, _ = finetune.open_loaders(cfg, DistInfo())
    steps = 0
    for epoch in range(cfg.finetune.epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            flat = assigner(batch, prune_threshold=head.cfg.threshold)
            train_head.train_step(HeadSet([head]), [member], flat, cfg.finetune.grad_clip)
            steps += 1
    assert got["step"] == steps
    for k, v in head.state_dict().items():
        torch.testing.assert_close(got["head"]["model"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    moved = [k for k, v in head.state_dict().items() if not torch.equal(v, state["model"][k])]
    assert moved  # the head did train
    stage1 = load_checkpoint(cfg.run_path / "assign" / "best.pt")["model"]
    for k, v in got["model"].items():
        assert torch.equal(v, stage1[k]), k  # frozen means untouched


KILL_AFTER_EPOCH_1 = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from hepreg.config import load_config
from hepreg.evaluation.tally import regression_metrics
from hepreg.runs import loop
from hepreg.stages import finetune

real = loop.end_epoch  # the end of every epoch the loop trains
def end_epoch(out, row, *args):
    real(out, row, *args)
    if row["epoch"] == 1:
        os.kill(os.getpid(), signal.SIGKILL)
loop.end_epoch = end_epoch
finetune.run(load_config(None, {sets!r}))
"""


def test_resume_after_sigkill_is_bit_identical(start, tmp_path):
    run_dir = tmp_path / "runs"
    shutil.copytree(start.run_path / "assign", run_dir / "ft" / "assign")
    shutil.copytree(start.run_path / "head", run_dir / "ft" / "head")
    sets = overrides(start.data.path, run_dir)
    script = textwrap.dedent(KILL_AFTER_EPOCH_1).format(tests=str(ROOT / "tests"), sets=sets)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HEPREG_NO_PROGRESS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    out = run_dir / "ft" / "finetune"
    assert load_checkpoint(out / "last.pt")["epoch"] == 1
    assert (out / ".lock").exists()  # a killed run leaves its lock, which the next run takes over

    torch.manual_seed(12345)  # a resumed process does not start from the same global RNG state
    finetune.run(load_config(None, sets), resume=True)
    full = load_checkpoint(start.run_path / "finetune" / "last.pt")
    resumed = load_checkpoint(out / "last.pt")
    assert resumed["epoch"] == full["epoch"] == 2 and resumed["step"] == full["step"]
    for part in ("model", "optimizer_head"):
        flat_full, flat_resumed = _tensors(full[part]), _tensors(resumed[part])
        assert flat_full.keys() == flat_resumed.keys()
        for k, v in flat_full.items():
            assert torch.equal(v, flat_resumed[k]), (part, k)
    for k, v in full["head"]["model"].items():
        assert torch.equal(v, resumed["head"]["model"][k]), k
    lines = (out / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in lines[1:]] == ["0", "1", "2"]
    assert lines[-1].split(",")[4] == (start.run_path / "finetune" / "metrics.csv").read_text().splitlines()[-1].split(",")[4]


def _tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        return {k2: v2 for k, v in obj.items() for k2, v2 in _tensors(v, f"{prefix}.{k}").items()}
    if isinstance(obj, (list, tuple)):
        return {k2: v2 for i, v in enumerate(obj) for k2, v2 in _tensors(v, f"{prefix}[{i}]").items()}
    return {}


def test_refuses_to_overwrite_and_resume_under_other_settings(start):
    from hepreg.errors import ConfigError
    from hepreg.runs.outputs import OutputExistsError

    with pytest.raises(OutputExistsError, match="--overwrite to replace them, --resume to continue"):
        finetune.run(start)
    changed = load_config(None, overrides(start.data.path, start.run_dir, "finetune.lr_head=0.5"))
    with pytest.raises(ConfigError, match="finetune.lr_head"):
        finetune.run(changed, resume=True)


def cli(monkeypatch, capsys, cfg, *args) -> tuple[int, str]:
    from hepreg.runs.progress import console

    monkeypatch.setattr(console, "width", 2000)
    sets = [a for s in overrides(cfg.data.path, cfg.run_dir) for a in ("--set", s)]
    code, out = run_cli(monkeypatch, capsys, *args, *sets)
    return code, " ".join(out.split())


def test_bad_starting_points_are_named(start, tmp_path, monkeypatch, capsys):
    missing = tmp_path / "nowhere" / "best.pt"
    code, out = cli(monkeypatch, capsys, start, "finetune", "--overwrite", "--head", missing)
    assert code == 2 and "Traceback" not in out and str(missing) in out and "train-head" in out, out

    state = load_checkpoint(start.run_path / "head" / "best.pt")
    other = tmp_path / "other_stage1.pt"
    save_checkpoint({**state, "stage1_sha256": "0" * 64}, other)
    code, out = cli(monkeypatch, capsys, start, "finetune", "--overwrite", "--head", other)
    assert code == 2 and str(other) in out and "another stage 1" not in out and "0" * 64 in out, out

    wide = tmp_path / "wide.pt"
    save_checkpoint({**state, "dim": 32}, wide)
    code, out = cli(monkeypatch, capsys, start, "finetune", "--overwrite", "--head", wide)
    assert code == 2 and str(wide) in out and "32-wide" in out and "another stage 1" in out, out

    model = start.run_path / "finetune" / "best.pt"
    code, out = cli(monkeypatch, capsys, start, "finetune", "--overwrite", "--head", model)
    assert code == 2 and "fine-tuned model already" in out, out
    assert (start.run_path / "finetune" / "last.pt").is_file()  # nothing was cleared by the refused runs


def test_checkpoint_round_trips_through_evaluate_predict_and_export_model(start, tmp_path, monkeypatch):
    """One fine-tuned checkpoint is a whole model: predict and export-model run it as they run stage 1 + head,
    and evaluate runs its own stage 1 live (not the cache) beside the frozen head it started from."""
    from hepreg.runs.digest import sha256_file
    from hepreg.evaluation.predictions import read_tracks
    from hepreg.stages import evaluate, export_model, predict

    model = start.run_path / "finetune" / "best.pt"
    tuned = predict.run(start, model=model, out=tmp_path / "tuned.h5")
    frozen = predict.run(start, out=tmp_path / "frozen.h5")
    import h5py

    with h5py.File(tuned) as f:
        assert f.attrs["stage1_sha256"] == f.attrs["head_sha256"] == sha256_file(model)
        tuned_pt = f["tracks/pt"][:]
    with h5py.File(frozen) as f:
        assert not (f["tracks/pt"][:] == tuned_pt).all()  # another stage 1 and head: other numbers

    import matplotlib.pyplot as plt

    from hepreg.evaluation import plots

    def drawn(fig, path):  # every figure is drawn, none rendered to a file: rendering is most of evaluate's time
        plt.close(fig)
        return Path(path)

    monkeypatch.setattr(plots, "_save", drawn)
    monkeypatch.setattr(plots, "_label", lambda *a, **k: None)
    result = evaluate.run(start, model=model)
    assert set(result["regression"]) == {"head", "reference", "optimal", "bound", "finetuned"}
    assert result["head"] == str(start.run_path / "head" / "best.pt")  # the head it started from
    assert {"assignment", "assignment_finetuned", "fake_rate_finetuned", "cost"} <= set(result)
    out = start.run_path / "finetune" / "eval" / "test"
    assert (out / "metrics.json").is_file() and {"efficiency_vs_pt.png", "fake_rate.png"} <= set(result["plots"])
    # the fine-tuned series is the live one: what predict computes with the model, track for track
    ref = read_tracks(tuned)
    reg, _ = regression_metrics(ref["pred"], ref["true"], start.eval.pt_bins, start.eval.eta_bins)
    assert result["regression"]["finetuned"]["tracks"] == reg["tracks"] > 0
    assert result["regression"]["finetuned"]["overall"]["qpt"]["width"] == pytest.approx(
        reg["overall"]["qpt"]["width"], rel=1e-4)
    ref = read_tracks(frozen)  # and the frozen head's series is that head on the (float32) cache
    reg, _ = regression_metrics(ref["pred"], ref["true"], start.eval.pt_bins, start.eval.eta_bins)
    assert result["regression"]["head"]["overall"]["qpt"]["width"] == pytest.approx(reg["overall"]["qpt"]["width"],
                                                                                     rel=1e-4)

    onnx = export_model.run(start, model=model, out=tmp_path / "tuned.onnx")
    assert onnx["path"].is_file() and onnx["max_diff"]["params"] <= export_model.TOLERANCE["params"]


def test_model_option_is_checked(start, tmp_path, monkeypatch, capsys):
    model = start.run_path / "finetune" / "best.pt"
    head = start.run_path / "head" / "best.pt"
    code, out = cli(monkeypatch, capsys, start, "predict", "--model", model, "--head", head, "--out", tmp_path / "x.h5")
    assert code == 2 and "without --checkpoint or --head" in out, out
    code, out = cli(monkeypatch, capsys, start, "evaluate", "--model", head)
    assert code == 2 and str(head) in out and "not a fine-tuned checkpoint" in out, out
    code, out = cli(monkeypatch, capsys, start, "export-model", "--head", model, "--out", tmp_path / "x.onnx")
    assert code == 2 and "--model" in out and str(model) in out, out


def _ddp_worker(rank: int, world: int, port: int, sets: list[str], out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), HEPREG_NO_PROGRESS="1")
    torch.set_num_threads(1)
    parts = []
    real = finetune.load_start

    def keep(*args):
        parts.append(real(*args))
        return parts[-1]

    finetune.load_start = keep
    finetune.run(load_config(None, sets))
    torch.save({"model": parts[0].model.state_dict(), "head": parts[0].head.state_dict()}, f"{out}/rank{rank}.pt")


@pytest.mark.slow
def test_two_ranks_stay_in_step_and_validate_every_event_once(start, tmp_path):
    import socket

    import torch.multiprocessing as mp

    run_dir = tmp_path / "runs"
    shutil.copytree(start.run_path / "assign", run_dir / "ft" / "assign")
    shutil.copytree(start.run_path / "head", run_dir / "ft" / "head")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sets = overrides(start.data.path, run_dir, "finetune.epochs=1", "finetune.warmup_steps=1")
    mp.spawn(_ddp_worker, args=(2, port, sets, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    last = load_checkpoint(run_dir / "ft" / "finetune" / "last.pt")
    for part, saved in (("model", last["model"]), ("head", last["head"]["model"])):
        for k, v in r0[part].items():  # gradients averaged over the ranks: both replicas take the same steps
            assert torch.equal(r1[part][k], v) and torch.equal(saved[k], v), (part, k)
    stage1 = load_checkpoint(start.run_path / "assign" / "best.pt")["model"]
    assert any(not torch.equal(stage1[k], v) for k, v in last["model"].items())
    assert last["metrics"]["val_events"] == 24  # the val split of 120 events, each counted once over both ranks
