"""`hepreg train-assign`: train the MaskFormer assignment model (stage 1).

One epoch = one pass over this rank's shard of the training range, then a validation pass whose counts are
summed over ranks. Rank 0 writes `runs/<name>/assign/{last,best}.pt`, `metrics.csv` and `config.yaml`.
A checkpoint holds everything the loop's future depends on (weights, optimizer, scheduler, RNG states,
early-stopping state), and the loader's order depends only on (seed, epoch), so `--resume` after a kill
continues exactly where the last completed epoch left off.
"""
from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from rich import box
from rich.table import Table
from torch import nn

from hepreg.config import Config
from hepreg.data.batching import HitLoader
from hepreg.data.reader import open_dataset, split_ranges
from hepreg.distributed import DistInfo, barrier, dist_info, init_distributed, resolve_device, shutdown
from hepreg.errors import ConfigError, HepregError
from hepreg.models.assign_loss import assignment_loss
from hepreg.models.assign_metrics import COUNT_NAMES, add_counts, counts_from_logits, rates
from hepreg.models.maskformer import MaskFormer
from hepreg.progress import console, progress
from hepreg.runs import MetricsCSV, RunDir, atomic_write, load_checkpoint, save_checkpoint, stage_lock


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023): sign of an interpolated momentum, decoupled weight decay."""

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(m * b1 + p.grad * (1 - b1)), alpha=-group["lr"])
                m.mul_(b2).add_(p.grad, alpha=1 - b2)


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    a = cfg.assign
    if a.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    if a.optimizer == "lion":
        return Lion(model.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    raise ConfigError(f"assign.optimizer must be adamw or lion, got {a.optimizer!r}")


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast on CUDA by default; fp32 elsewhere unless bf16 is asked for explicitly."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"assign.precision must be auto, fp32 or bf16, got {precision!r}")
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def rng_state() -> dict:
    """Every RNG's state as tensors and plain data (what a checkpoint may hold)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def train_epoch(model, loader, optimizer, scheduler, cfg: Config, device, info: DistInfo, epoch: int) -> dict:
    """One pass over this rank's training shard; returns the event-weighted mean loss over all ranks."""
    model.train()
    loader.set_epoch(epoch)
    totals = torch.zeros(2, dtype=torch.float64)  # Σ loss·events, events
    join = model.join() if info.enabled else nullcontext()
    with progress() as p, join:
        task = p.add_task(f"epoch {epoch + 1} train", total=loader.num_events)
        for batch in loader:
            batch = batch.to(device, non_blocking=True)
            with autocast_context(device, cfg.assign.precision):
                out = model(batch.hits, batch.hit_valid)
            loss, parts, _ = assignment_loss(out, batch, cfg.assign)
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
            batch = batch.to(device, non_blocking=True)
            with autocast_context(device, cfg.assign.precision):
                out = model(batch.hits, batch.hit_valid)
            loss, _, match = assignment_loss(out, batch, cfg.assign)
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


def epoch_table(row: dict) -> Table:
    t = Table(title=f"stage 1 · epoch {row['epoch']}", box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False)
    cols = [("train", "train_loss", "{:.4f}"), ("val", "val_loss", "{:.4f}"),
            ("trk eff", "track_eff", "{:.3f}"), ("fake", "fake_rate", "{:.3f}"), ("hit eff", "hit_eff", "{:.3f}"),
            ("purity", "hit_purity", "{:.3f}"), ("DM eff", "dm_eff", "{:.3f}"),
            ("ev/s", "train_ev_s", "{:.0f}"), ("lr", "lr", "{:.1e}")]
    for name, _, _ in cols:
        t.add_column(name, justify="right", no_wrap=True)
    t.add_row(*(fmt.format(row[key]) for _, key, fmt in cols))
    return t


def run(cfg: Config, resume: bool = False) -> None:
    device = resolve_device(cfg.assign.device, dist_info().local_rank)
    with stage_lock(RunDir(cfg).assign, held=dist_info().is_main):
        info = init_distributed(device)
        try:
            _train(cfg, resume, device, info)
        finally:
            shutdown()


def _train(cfg: Config, resume: bool, device: torch.device, info: DistInfo) -> None:
    a = cfg.assign
    out_dir = RunDir(cfg).assign
    seed_everything(cfg.seed)

    dataset = open_dataset(cfg.data.path, cfg.data.max_events)
    ranges = split_ranges(len(dataset), cfg.data.val_fraction, cfg.data.test_fraction)
    train_range, val_range = ranges["train"], ranges["val"]
    loader_args = dict(bucket_window=cfg.data.bucket_window, seed=cfg.seed, rank=info.rank,
                       world_size=info.world_size, block_events=cfg.data.block_events)
    train_loader = HitLoader(dataset, *train_range, batch_size=a.batch_size or cfg.data.batch_size, shuffle=True,
                             **loader_args)
    val_loader = HitLoader(dataset, *val_range, batch_size=cfg.data.batch_size, shuffle=False, **loader_args)
    if len(train_loader) == 0 or len(val_loader) == 0:
        raise HepregError(f"dataset {cfg.data.path} has too few events ({len(dataset)}) for a train and a "
                          f"validation split with data.val_fraction={cfg.data.val_fraction}")

    model = MaskFormer(cfg.model).to(device)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=a.lr, total_steps=a.epochs * len(train_loader))
    fingerprint = dataset.fingerprint()  # sha256 over metadata, index and chunk files

    state = {"epoch": 0, "best_val_loss": math.inf, "bad_epochs": 0, "elapsed_s": 0.0}
    last = out_dir / "last.pt"
    if resume and last.is_file():
        ckpt = load_checkpoint(last, map_location=device, kind="stage-1", needs=(
            "model", "optimizer", "scheduler", "rng", "config", "data_fingerprint", "epoch"))
        check_resumable(ckpt, cfg, fingerprint, last)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        state = {k: ckpt[k] for k in state}
        if info.is_main:
            console.print(f"resuming {last} after epoch {state['epoch']}")
    elif resume and info.is_main:
        console.print(f"no {last} yet: starting from scratch")

    metrics = MetricsCSV(out_dir / "metrics.csv")
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(out_dir / "config.yaml") as f:
            f.write(cfg.to_yaml())
        metrics.truncate_after(state["epoch"])
        console.print(f"stage 1: {sum(p.numel() for p in model.parameters()):,} parameters on {device}, "
                      f"{info.world_size} process(es); train {train_range[1] - train_range[0]} events, "
                      f"val {val_range[1] - val_range[0]} events")
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if info.enabled else model

    while not finished(state, a, info.is_main):
        epoch = state["epoch"]
        t0 = time.perf_counter()
        train = train_epoch(ddp, train_loader, optimizer, scheduler, cfg, device, info, epoch)
        train_s = time.perf_counter() - t0
        val = validate(model, val_loader, cfg, device, info)
        state["elapsed_s"] += time.perf_counter() - t0
        state["epoch"] = epoch + 1
        improved = val["val_loss"] < state["best_val_loss"]
        if improved:
            state["best_val_loss"], state["bad_epochs"] = val["val_loss"], 0
        else:
            state["bad_epochs"] += 1
        row = {"epoch": epoch + 1, **train, **val, "lr": scheduler.get_last_lr()[0],
               "train_ev_s": train["train_events"] / train_s, "elapsed_s": state["elapsed_s"]}
        if info.is_main:
            ckpt = {"model": model.state_dict(), "config": cfg.to_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": rng_state(), "data_fingerprint": fingerprint,
                    "metrics": row, **state}
            if improved:
                save_checkpoint(ckpt, out_dir / "best.pt")
            save_checkpoint(ckpt, last)
            metrics.append(row)
            console.print(epoch_table(row))
        barrier()
    if info.is_main:
        console.print(f"stage 1 done: best val loss {state['best_val_loss']:.4f} → {out_dir / 'best.pt'}")


def finished(state: dict, a, verbose: bool) -> bool:
    """Whether training is over: all epochs done, early stop on val loss, or the wall-time budget spent."""
    reason = None
    if state["epoch"] >= a.epochs:
        return True
    if state["bad_epochs"] >= a.patience:
        reason = f"early stop: val loss has not improved for {a.patience} epochs"
    elif a.max_minutes is not None and state["elapsed_s"] >= 60 * a.max_minutes:
        reason = f"stopping: assign.max_minutes={a.max_minutes} reached"
    if reason and verbose:
        console.print(reason)
    return reason is not None


def check_resumable(ckpt: dict, cfg: Config, fingerprint: str, path: Path) -> None:
    """A resumed run must continue the same training: same model, schedule and data."""
    saved = ckpt["config"]
    for section in ("model", "assign", "data"):
        if saved[section] != cfg.to_dict()[section]:
            raise ConfigError(f"{path} was trained with a different '{section}' config section; "
                              f"resume with the config it was started with, or start a new run name")
    if saved["seed"] != cfg.seed:
        raise ConfigError(f"{path} was trained with seed {saved['seed']}, not {cfg.seed}")
    if ckpt["data_fingerprint"] != fingerprint:
        raise HepregError(f"{path} was trained on other data than {cfg.data.path} (fingerprint differs)")
