"""`hepreg train-assign`: train the MaskFormer assignment model (stage 1).

One epoch = one pass over this rank's shard of the training range, then a validation pass whose counts are
summed over ranks. Rank 0 writes `runs/<name>/assign/{last,best}.pt`, `metrics.csv` and `config.yaml`.
A checkpoint holds everything the loop's future depends on (weights, optimizer, scheduler, RNG states,
early-stopping state), and the loader's order depends only on (seed, epoch), so `--resume` after a kill
continues exactly where the last completed epoch left off.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from hepreg.settings import Config
from hepreg.data.batch import HitBatch
from hepreg.data.batching import HitLoader, train_val_loaders
from hepreg.data.reader import Dataset
from hepreg.runs.distributed import DistInfo, dist_info, started
from hepreg.errors import HepregError
from hepreg.models.assign_loss import assignment_loss
from hepreg.models.assign_metrics import COUNT_NAMES, add_counts, counts_from_logits, rates
from hepreg.models.maskformer import MaskFormer
from hepreg.runs.outputs import Replacement, guard, replacing, write_config
from hepreg.runs.progress import console, progress, results
from hepreg.runs.resume import check_continues, restore_schedule, resumed
from hepreg.runs.log import ASSIGN_COLUMNS, EpochLog, EpochTable, header
from hepreg.runs.directory import LAST, TRAINING_RESULTS, RunDir
from hepreg.runs.loop import Progress, epoch_loop, last_checkpoint
from hepreg.runs.files import stage_lock

# Settings a resumed run may change: how long and where it trains, not what it trains.
MAY_DIFFER = {"assign.epochs", "assign.patience", "assign.max_minutes", "assign.device"}
from hepreg.runs.training import EarlyStopping, autocast, make_optimizer, rng_state, seed_everything, set_rng_state


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def forward(model: nn.Module, batch: HitBatch, cfg: Config, device: torch.device):
    """One batch on `device` through the model under the configured autocast: (batch, outputs, matched loss
    (total, its terms, the matching))."""
    batch = batch.to(device, non_blocking=True)
    with autocast(device, cfg.assign.precision):
        out = model(batch.hits, batch.hit_valid)
    return batch, out, assignment_loss(out, batch, cfg.assign)


def train_epoch(model, loader, optimizer, scheduler, cfg: Config, device, info: DistInfo, epoch: int) -> dict:
    """One pass over this rank's training shard; returns the event-weighted mean loss over all ranks."""
    model.train()
    loader.set_epoch(epoch)
    totals = torch.zeros(2, dtype=torch.float64)  # Σ loss·events, events
    join = model.join() if info.enabled else nullcontext()
    with progress() as p, join:
        task = p.add_task(f"epoch {epoch + 1} train", total=loader.num_events)
        for batch in loader:
            batch, out, (loss, parts, _) = forward(model, batch, cfg, device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.assign.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.assign.grad_clip)
            optimizer.step()
            scheduler.step()
            value = loss.item()
            if not math.isfinite(value):
                raise HepregError(f"training loss became {value} at epoch {epoch + 1}; lower assign.lr "
                                  f"(now {cfg.assign.lr}) or check the input data")
            totals += torch.tensor([value * batch.size, batch.size], dtype=torch.float64)
            terms = " ".join(f"{k} {v:.3f}" for k, v in parts.items())
            p.update(task, advance=batch.size, info=f"loss {value:.4f} ({terms})  lr {scheduler.get_last_lr()[0]:.2e}")
    totals = all_reduce_sum(totals, info)
    return {"train_loss": float(totals[0] / max(totals[1], 1.0)), "train_events": int(totals[1])}


@torch.inference_mode()
def validate(model: nn.Module, loader, cfg: Config, device, info: DistInfo) -> dict:
    """Mean val loss and assignment metrics over the whole validation range (each event counted once)."""
    model.eval()
    loss_sum = torch.zeros(2, dtype=torch.float64)
    counts = None
    with progress() as p:
        task = p.add_task("validate", total=loader.num_events)
        for batch in loader:
            batch, out, (loss, _, match) = forward(model, batch, cfg, device)
            loss_sum += torch.tensor([loss.item() * batch.size, batch.size], dtype=torch.float64)
            final = out.final
            counts = add_counts(counts, counts_from_logits(final["track_logit"], final["mask_logit"],
                                                           batch.hit_valid, batch.particle_valid,
                                                           batch.particle_hit_valid, match))
            p.update(task, advance=batch.size)
    packed = torch.cat([loss_sum, torch.tensor([float(counts[k]) if counts else 0.0 for k in COUNT_NAMES],
                                               dtype=torch.float64)])
    packed = all_reduce_sum(packed, info)
    result = {"val_loss": float(packed[0] / max(packed[1], 1.0)), "val_events": int(packed[1])}
    result.update(rates(dict(zip(COUNT_NAMES, packed[2:].tolist()))))
    return result


def run(cfg: Config, resume: bool = False, overwrite: bool = False) -> None:
    """Train stage 1; refuses to replace an earlier run's results unless `overwrite` or `resume`."""
    out = RunDir(cfg).assign
    guard(out, TRAINING_RESULTS, overwrite=overwrite, resume=resume, command="train-assign")
    with stage_lock(out, held=dist_info().is_main), started(cfg.assign.device) as (device, info), \
            replacing(info.is_main) as replaced:
        _train(cfg, resume, device, info, overwrite, replaced)


def _train(cfg: Config, resume: bool, device: torch.device, info: DistInfo, overwrite: bool = False,
           replaced: Replacement | None = None) -> None:
    a, out_dir = cfg.assign, RunDir(cfg).assign
    seed_everything(cfg.seed)
    dataset, ranges, train_loader, val_loader = open_loaders(cfg, info)
    # under the stage lock --overwrite sets the earlier results aside, until the first checkpoint is written
    guard(out_dir, TRAINING_RESULTS, overwrite=overwrite, resume=resume, command="train-assign", replacing=replaced)
    model = MaskFormer(cfg.model).to(device)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=a.lr, total_steps=a.epochs * len(train_loader))
    data_sha256 = dataset.fingerprint()  # over metadata, index and chunk files
    state = Progress(EarlyStopping(a.patience))  # the epoch loop's own state, in every checkpoint
    if resume:
        scheduler = resume_from(out_dir / LAST, model, optimizer, scheduler, state, cfg, data_sha256, device,
                                info, len(train_loader))
    start_log(cfg, model, state, ranges, device, info, len(train_loader))
    log = EpochLog(out_dir, state.epoch, enabled=info.is_main)
    table = EpochTable(ASSIGN_COLUMNS, a.epochs, start_epoch=state.epoch, repeat_header=True)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if info.enabled else model
    def checkpoint(row: dict) -> dict:
        return {"model": model.state_dict(), "config": cfg.to_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": rng_state(), "data_fingerprint": data_sha256,
                "metrics": row, **state.state()}

    def train() -> dict:
        row = train_epoch(ddp, train_loader, optimizer, scheduler, cfg, device, info, state.epoch)
        state.step += len(train_loader)
        return row

    epoch_loop(out_dir, state, a.epochs, train, lambda: validate(model, val_loader, cfg, device, info),
               lambda: {"lr": scheduler.get_last_lr()[0]}, checkpoint, log, table, info, replaced,
               max_minutes=a.max_minutes)
    if info.is_main and cfg.eval.plots:
        from hepreg.evaluation import plots  # matplotlib: only where a figure is drawn
        plots.learning_curves(out_dir / "metrics.csv", out_dir / "learning_curves.png", f"{cfg.name} · stage 1")
    if info.is_main:
        results.print(f"stage 1: best val loss {state.early.best:.4f} → {out_dir / 'best.pt'}")


def open_loaders(cfg: Config, info: DistInfo) -> tuple[Dataset, dict[str, tuple[int, int]], HitLoader, HitLoader]:
    """The dataset, its split ranges and this rank's loaders; stage 1 needs far fewer training events than the
    head it feeds (`assign.train_events`)."""
    return train_val_loaders(cfg, info.rank, info.world_size, cfg.assign.batch_size or cfg.data.batch_size,
                             train_events=cfg.assign.train_events)


def resume_from(last: Path, model: nn.Module, optimizer, scheduler, state: Progress, cfg: Config, data_sha256: str,
                device: torch.device, info: DistInfo, steps: int):
    """Continue from `last` when it exists (refused if it trained another model or data, or more epochs than
    asked for); returns the scheduler, rebuilt for the new total when more epochs are asked for."""
    ckpt = last_checkpoint(last, "stage-1", ("model", "optimizer", "scheduler", "rng", "config", "data_fingerprint",
                                             "epoch"), device, info)
    if ckpt is None:
        return scheduler
    check_resumable(ckpt, cfg, data_sha256, last)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    a = cfg.assign
    scheduler, old_total = restore_schedule(optimizer, ckpt["scheduler"], a.lr, a.epochs * steps, ckpt["epoch"] * steps)
    set_rng_state(ckpt["rng"])
    state.restore(ckpt)
    if info.is_main:
        console.print(resumed(last, state.epoch, steps, a.epochs, old_total), highlight=False, soft_wrap=True)
    return scheduler


def start_log(cfg: Config, model: nn.Module, state: Progress, ranges: dict[str, tuple[int, int]],
              device: torch.device, info: DistInfo, steps: int) -> None:
    """Rank 0 writes the run's config.yaml and says what trains (EpochLog cuts the metrics back on resume)."""
    if not info.is_main:
        return
    a = cfg.assign
    write_config(RunDir(cfg).assign, cfg)
    (t0, t1), (v0, v1) = ranges["train"], ranges["val"]
    header(f"train-assign · run {cfg.name}", [
        f"data {cfg.data.path} · train {t1 - t0:,} events ({steps} steps), val {v1 - v0:,} events",
        f"MaskFormer: {sum(p.numel() for p in model.parameters()):,} parameters · device {device}, "
        f"{info.world_size} process{'es' if info.world_size > 1 else ''}",
        f"{a.epochs} epochs, {a.optimizer} lr {a.lr:g} one-cycle, early stop after {a.patience} without improvement"])


def check_resumable(ckpt: dict, cfg: Config, fingerprint: str, path: Path) -> None:
    """A resumed run must continue the same training: same model, data and settings, no fewer epochs."""
    sections = ("seed", "model", "assign", "data")
    check_continues({k: ckpt["config"][k] for k in sections}, {k: cfg.to_dict()[k] for k in sections}, path,
                    MAY_DIFFER, ckpt["epoch"], cfg.assign.epochs, "assign.epochs")
    if ckpt["data_fingerprint"] != fingerprint:
        raise HepregError(f"{path} was trained on other data than {cfg.data.path} (fingerprint differs)")
