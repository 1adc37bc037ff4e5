"""`hepreg train-head` on tiny hand-written caches: checkpoints, resume, sweeps, refusal, two-rank DDP."""
from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from hepreg.config import load_sweep
from hepreg.settings import Config, EvalConfig, HeadConfig, HeadTrainConfig
from hepreg.errors import CacheError, ConfigError
from hepreg.flat import FlatBatch
from hepreg.runs.outputs import OutputExistsError
from hepreg.models.head import head_from_checkpoint
from hepreg.runs.directory import load_checkpoint
from hepreg.stages import train_head
from helpers import N, P, hit_rows, random_offsets, random_outputs, write_split


def random_events(num_events: int, seed: int) -> FlatBatch:
    """Events whose q/pT is readable from the hit features, so a head can learn something."""
    g = torch.Generator().manual_seed(seed)
    offsets = random_offsets(g, num_events, 0, 10)
    pt = 5 + 95 * torch.rand(num_events, P, generator=g)
    q = torch.where(torch.rand(num_events, P, generator=g) < 0.5, -1.0, 1.0)
    targets = torch.stack([pt, torch.randn(num_events, P, generator=g),
                           (2 * torch.rand(num_events, P, generator=g) - 1) * math.pi, q], -1)
    raw = torch.randn(int(offsets[-1]), 23, generator=g)
    ev = torch.repeat_interleave(torch.arange(num_events), offsets.diff())
    raw[:, 0] = (q / pt)[ev, 0] * 10
    return FlatBatch(raw=raw, offsets=offsets, **random_outputs(g, offsets),
                     match=torch.randint(-1, P, (num_events, N), generator=g), targets=targets,
                     target_valid=torch.rand(num_events, P, generator=g) < 0.9,
                     event_id=torch.arange(num_events) + 1000 * seed,
                     hit_index=hit_rows(offsets))


def write_cache(path, flat: FlatBatch, *, prune: float = 0.0):
    write_split(path, flat, prune=prune, checkpoint="c" * 64, compressor="none")


def make_run(tmp_path, *, epochs=2, prune=0.0, plots=False, **head) -> Config:
    """A run on a tiny hand-made cache; without figures unless asked (a learning curve costs seconds)."""
    cfg = Config(name="t", run_dir=str(tmp_path), seed=3, eval=EvalConfig(plots=plots),
                 head=HeadConfig(**{"hidden_dim": 16, "num_layers": 3, "dropout": 0.1, "lr": 3e-3, **head}),
                 head_train=HeadTrainConfig(epochs=epochs, batch_size=24, patience=5, device="cpu",
                                            in_memory="yes", shuffle_buffer=2))
    cache = cfg.run_path / "cache"
    if not (cache / "train.zarr").exists():
        write_cache(cache / "train.zarr", random_events(100, 1), prune=prune)
        write_cache(cache / "val.zarr", random_events(40, 2), prune=prune)
    return cfg


def single_runs_beside(tmp_path, cfg: Config, sweep):
    """Each member of the sweep run under `cfg` trained alone: (name, its run's config, its last.pt, the
    member's last.pt)."""
    for name, hc in load_sweep(sweep, cfg.head):
        single = make_run(tmp_path / name, epochs=cfg.head_train.epochs)
        single.head = hc
        train_head.run(single)
        yield (name, single, load_checkpoint(single.run_path / "head" / "last.pt"),
               load_checkpoint(cfg.run_path / "head" / "sweep" / name / "last.pt"))


def params(head) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in head.state_dict().items()}


def test_train_writes_checkpoints_metrics_and_learns(tmp_path):
    cfg = make_run(tmp_path, epochs=4, plots=True)
    rows = train_head.run(cfg)
    head_dir = cfg.run_path / "head"
    best, last = load_checkpoint(head_dir / "best.pt"), load_checkpoint(head_dir / "last.pt")
    assert last["epoch"] == 4 and best["stage1_sha256"] == "c" * 64
    lines = (head_dir / "metrics.csv").read_text().splitlines()
    assert len(lines) == 5 and "val_pt_res" in lines[0]
    first_train = float(lines[1].split(",")[1])
    final_train = float(lines[-1].split(",")[1])
    assert final_train < first_train
    assert rows[0]["val_loss"] == pytest.approx(best["best_val"])
    head = head_from_checkpoint(best)
    torch.testing.assert_close(head.targets.std, best["model"]["targets.std"])
    assert (head_dir / "leaderboard.csv").exists()
    for name in ("learning_curves.png", "learning_curves.pdf"):
        assert (head_dir / name).stat().st_size > 5_000
    assert tensorboard_scalars(head_dir)["val_loss"] == [1, 2, 3, 4]  # same names and epochs as metrics.csv


def tensorboard_scalars(folder) -> dict[str, list[int]]:
    """The steps TensorBoard shows for each scalar tag of the event files in `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_resume_continues_exactly(tmp_path, monkeypatch):
    straight = make_run(tmp_path / "a", epochs=3)
    train_head.run(straight)
    expected = load_checkpoint(straight.run_path / "head" / "last.pt")["model"]

    cfg = make_run(tmp_path / "b", epochs=3)
    real = train_head.save_checkpoint
    calls = []

    def crash_after_first_epoch(state, path):
        real(state, path)
        calls.append(path)
        if path.name == "last.pt":
            raise KeyboardInterrupt

    monkeypatch.setattr(train_head, "save_checkpoint", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_head.run(cfg)
    monkeypatch.setattr(train_head, "save_checkpoint", real)
    assert load_checkpoint(cfg.run_path / "head" / "last.pt")["epoch"] == 1
    train_head.run(cfg, resume=True)
    got = load_checkpoint(cfg.run_path / "head" / "last.pt")
    assert got["epoch"] == 3
    for k, v in expected.items():
        torch.testing.assert_close(got["model"][k], v, rtol=0, atol=0)
    assert len((cfg.run_path / "head" / "metrics.csv").read_text().splitlines()) == 4


def test_refuses_to_overwrite_and_keeps_the_old_results(tmp_path):
    cfg = make_run(tmp_path, epochs=3)
    train_head.run(cfg)
    head_dir = cfg.run_path / "head"
    before = {p.name: p.read_bytes() for p in head_dir.iterdir() if p.is_file()}
    assert {"best.pt", "last.pt", "metrics.csv", "config.yaml"} <= set(before)
    cfg.head_train.epochs = 1
    with pytest.raises(OutputExistsError, match="--overwrite"):
        train_head.run(cfg)
    assert {p.name: p.read_bytes() for p in head_dir.iterdir() if p.is_file()} == before  # intact, byte for byte
    train_head.run(cfg, overwrite=True)
    assert load_checkpoint(head_dir / "last.pt")["epoch"] == 1
    assert len((head_dir / "metrics.csv").read_text().splitlines()) == 2
    assert "epochs: 1" in (head_dir / "config.yaml").read_text()


def test_sweep_refuses_to_overwrite_a_member(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("configs:\n  - {name: a, hidden_dim: 8}\n  - {name: b, hidden_dim: 12}\n")
    cfg = make_run(tmp_path / "s", epochs=1)
    train_head.run(cfg, sweep=sweep)
    member = cfg.run_path / "head" / "sweep" / "b"
    assert "hidden_dim: 12" in (member / "config.yaml").read_text()
    kept = (member / "last.pt").read_bytes()
    with pytest.raises(OutputExistsError, match="sweep/a"):
        train_head.run(cfg, sweep=sweep)
    assert (member / "last.pt").read_bytes() == kept
    train_head.run(cfg)  # the single head's folder is its own: no sweep member is in the way
    assert (member / "last.pt").read_bytes() == kept


def test_resume_with_more_epochs_ends_where_a_longer_run_ends(tmp_path, monkeypatch):
    """2 epochs, then --resume for 4: the one-cycle schedule is rebuilt for 4 epochs and continued at the step
    already taken, so every learning rate from there on, the data order, the epoch count and the final learning
    rate are those of an uninterrupted 4-epoch run (the first two epochs ran a shorter cycle, so the weights
    differ: that is what "ends where" can mean with a schedule that depends on the run's length)."""
    lrs: dict[str, list[float]] = {}
    real_step = train_head.train_step

    def recording_step(model, members, batch, grad_clip, source=None):
        lrs.setdefault(tag, []).append(members[0].optimizer.param_groups[0]["lr"])
        return real_step(model, members, batch, grad_clip, source)

    monkeypatch.setattr(train_head, "train_step", recording_step)
    tag = "straight"
    straight = make_run(tmp_path / "a", epochs=4)
    train_head.run(straight)
    tag = "short"
    cfg = make_run(tmp_path / "b", epochs=2)
    train_head.run(cfg)
    cfg.head_train.epochs = 4
    tag = "resumed"
    train_head.run(cfg, resume=True)
    steps = len(lrs["short"]) // 2
    assert lrs["resumed"] == lrs["straight"][2 * steps:]  # the same learning rate at every remaining step
    a = load_checkpoint(straight.run_path / "head" / "last.pt")
    b = load_checkpoint(cfg.run_path / "head" / "last.pt")
    assert a["epoch"] == b["epoch"] == 4
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 4 * steps
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    rows = (cfg.run_path / "head" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]
    assert tensorboard_scalars(cfg.run_path / "head")["val_qpt_res"] == [1, 2, 3, 4]

    cfg.head_train.epochs = 3  # fewer than done: one sentence, nothing touched
    with pytest.raises(ConfigError, match="trained 4 epochs already"):
        train_head.run(cfg, resume=True)
    cfg.head_train.epochs = 4
    cfg.head.hidden_dim = 32  # a mismatch names the key, not the whole section
    with pytest.raises(ConfigError, match=r"head.hidden_dim: 16 there, 32 now\)") as err:
        train_head.run(cfg, resume=True)
    assert "num_layers" not in str(err.value)


def test_resume_prints_where_it_resumed_from(tmp_path, capsys):
    cfg = make_run(tmp_path, epochs=1)
    train_head.run(cfg)
    cfg.head_train.epochs = 2
    train_head.run(cfg, resume=True)
    err = capsys.readouterr().err
    assert "resumed from" in err and "last.pt epoch 1" in err and "rebuilt for 2 epochs (was 1)" in err


@pytest.mark.slow
def test_sweep_equals_single_runs(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("configs:\n"
                     "  - {name: small, hidden_dim: 8, num_layers: 2}\n"
                     "  - {name: deep, hidden_dim: 16, num_layers: 4, dropout: 0.2, threshold: 0.3}\n"
                     "  - {name: fast, lr: 1.0e-2, pt_target: log_pt}\n"
                     "  - {name: seeds, track_frame: false, fit_proxy: false, loss: gaussian_nll}\n"
                     "  - {name: attn, kind: attention, attn_dim: 16, attn_heads: 2, attn_layers: 1}\n")
    cfg = make_run(tmp_path / "s", epochs=2)
    rows = train_head.run(cfg, sweep=sweep)
    assert [r["name"] for r in rows] == ["small", "deep", "fast", "seeds", "attn"]
    assert (cfg.run_path / "head" / "sweep" / "leaderboard.csv").exists()
    for name, single, a, b in single_runs_beside(tmp_path, cfg, sweep):
        assert a["head_config"] == b["head_config"]
        for k in a["model"]:
            torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0)
        assert a["best_val"] == b["best_val"]


def test_early_stopping_on_val_loss(tmp_path):
    cfg = make_run(tmp_path, epochs=6, lr=0.0)  # nothing changes, so val loss never improves after epoch 0
    cfg.head_train.patience = 2
    rows = train_head.run(cfg)
    last = load_checkpoint(cfg.run_path / "head" / "last.pt")
    assert last["stopped"] and last["epoch"] == 3 and rows[0]["best_epoch"] == 1
    assert len((cfg.run_path / "head" / "metrics.csv").read_text().splitlines()) == 1 + 3


def test_bad_sweep_and_threshold_below_prune_are_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("configs:\n  - {hidden_dimm: 8}\n")
    with pytest.raises(ConfigError, match="hidden_dimm"):
        load_sweep(bad, HeadConfig())
    cfg = make_run(tmp_path, prune=0.2, threshold=0.1)
    with pytest.raises(CacheError, match="pruned at threshold 0.2"):
        train_head.run(cfg)
    cfg.head.threshold = 0.25
    cfg.head_train.epochs = 1
    train_head.run(cfg)  # an unknown head_train.source is the config loader's to refuse (test_faults)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, run_dir: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), HEPREG_NO_PROGRESS="1")
    torch.set_num_threads(1)
    seen: list[torch.Tensor] = []
    trained: list = []
    real_step = train_head.train_step

    def recording_step(model, members, batch, grad_clip, source=None):
        seen.append(batch.event_id.clone())
        trained[:] = members
        return real_step(model, members, batch, grad_clip, source)

    train_head.train_step = recording_step
    train_head.run(make_run(Path(run_dir), epochs=2))
    torch.save({"seen": seen, "head": params(trained[0].head)}, f"{out}/rank{rank}.pt")


@pytest.mark.slow
def test_two_rank_ddp_disjoint_shares_and_synced_heads(tmp_path):
    make_run(tmp_path)  # write the caches once, before the ranks start
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    steps = len(r0["seen"])
    assert steps == len(r1["seen"]) and steps % 2 == 0
    for epoch in range(2):  # every training event exactly once per epoch, across both ranks
        half = steps // 2
        ids = torch.cat(r0["seen"][epoch * half:(epoch + 1) * half] + r1["seen"][epoch * half:(epoch + 1) * half])
        assert sorted(ids.tolist()) == list(range(1000, 1100))
    for k, v in r0["head"].items():  # DDP keeps both replicas identical
        torch.testing.assert_close(r1["head"][k], v, rtol=0, atol=0)
    ckpt = load_checkpoint(tmp_path / "t" / "head" / "last.pt")
    assert ckpt["epoch"] == 2
    for k, v in r0["head"].items():
        torch.testing.assert_close(ckpt["model"][k], v, rtol=0, atol=0)


@pytest.mark.slow
def test_cache_and_live_sources_train_the_same_head(tmp_path, monkeypatch):
    """A float32, unpruned cache and the live frozen model give the same losses step by step and the same head."""
    from hepreg.settings import DataConfig, ExportConfig, ModelConfig
    from hepreg.data.synthetic import generate
    from hepreg.models.maskformer import MaskFormer
    from hepreg.runs.directory import save_checkpoint
    from hepreg.stages import export

    data = generate(tmp_path / "data", events=200, seed=4, preset="light")
    cfg = Config(name="eq", run_dir=str(tmp_path / "runs"), seed=5, data=DataConfig(path=str(data), batch_size=32),
                 model=ModelConfig(dim=16, num_heads=4, encoder_layers=1, decoder_layers=1),
                 export=ExportConfig(dtype="float32", prune_threshold=0.0, block_events=48, batch_size=32,
                                     compressor="none", splits=["train", "val"], device="cpu"),
                 head=HeadConfig(hidden_dim=16, num_layers=3, dropout=0.1, lr=3e-3),
                 head_train=HeadTrainConfig(epochs=2, batch_size=40, device="cpu", in_memory="yes", shuffle_buffer=2))
    sweep = tmp_path / "kinds.yaml"  # every head kind and input option, trained side by side
    sweep.write_text("configs:\n"
                     "  - {name: seeds, track_frame: false, fit_proxy: false}\n"
                     "  - {name: fit, loss: gaussian_nll}\n"
                     "  - {name: attn, kind: attention, attn_dim: 16, attn_heads: 2, attn_layers: 1}\n")
    torch.manual_seed(0)
    save_checkpoint({"model": MaskFormer(cfg.model).state_dict(), "config": cfg.to_dict()},
                    cfg.run_path / "assign" / "best.pt")
    export.run(cfg)

    real_step = train_head.train_step
    losses: dict[str, list[float]] = {}

    def recording_step(model, members, batch, grad_clip, source=None):
        out = real_step(model, members, batch, grad_clip, source)
        losses.setdefault(cfg.head_train.source, []).append(out)
        return out

    monkeypatch.setattr(train_head, "train_step", recording_step)
    heads = {}
    for source in ("cache", "live"):
        cfg.head_train.source = source
        train_head.run(cfg, sweep=sweep, overwrite=True)
        heads[source] = {n: load_checkpoint(cfg.run_path / "head" / "sweep" / n / "last.pt")
                         for n in ("seeds", "fit", "attn")}
    for name in ("seeds", "fit", "attn"):
        live, cache = heads["live"][name], heads["cache"][name]
        assert live["source"] == "live" and cache["source"] == "cache"
        assert live["stage1_sha256"] == cache["stage1_sha256"]
        for k, v in cache["model"].items():
            torch.testing.assert_close(live["model"][k], v, rtol=1e-4, atol=1e-5)
    assert len(losses["cache"]) == len(losses["live"]) == 2 * math.ceil(160 / 40)
    torch.testing.assert_close(torch.tensor(losses["live"]), torch.tensor(losses["cache"]), rtol=1e-5, atol=1e-6)
