"""Stage 2: train regression heads on cached stage-1 outputs (or, as the baseline, live ones).

One loop trains K >= 1 head configurations at once: each batch is read and decoded once, the heads' inputs
(per-track hits, track frame, fit proxy) are built once per distinct setting, and every head takes its own
optimiser step on it. A single run is K = 1, so a sweep gives, head by head, what training that configuration
alone gives (stacked heads, `head_train.stack`: up to rounding): same seed, own random stream for dropout.

Sources yield the same `FlatBatch` batches in the same order: `cache` reads them from the Zarr cache,
`live` reads the HDF5 dataset and runs the frozen stage-1 model on the very events the cache loader would
have put in each batch (see `make_source`).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.nn.parallel import DistributedDataParallel

from hepreg.evaluation.validation import validate_heads
from hepreg.runs.compiled import compile_head
from hepreg.config import load_sweep
from hepreg.settings import Config, HeadConfig
from hepreg.runs.distributed import DistInfo, barrier, dist_info, started
from hepreg.errors import CacheError, ConfigError
from hepreg.flat import FlatBatch
from hepreg.models.head import (HeadSet, RegressionHead, batch_inputs, build_head, head_state, matched_targets,
                                stage1_of)
from hepreg.runs.outputs import Replacement, guard, replacing, write_config
from hepreg.prepared import HeadSource, epoch_batches, make_source, steps_per_epoch
from hepreg.runs.progress import console, progress
from hepreg.runs.resume import check_continues, one_cycle, restore_schedule, resumed
from hepreg.runs.log import HEAD_COLUMNS, EpochLog, EpochTable, header, leaderboard
from hepreg.runs.directory import LAST, TRAINING_RESULTS, RunDir, save_checkpoint
from hepreg.runs.loop import Progress, checkpoint_paths, finished, last_checkpoint, score
from hepreg.runs.files import stage_lock
from hepreg.runs.training import EarlyStopping, RngStream, head_optimizer

# Settings a resumed run may change: how long and where it trains, not what it trains.
MAY_DIFFER = {"head_train.epochs", "head_train.patience", "head_train.device", "head_train.in_memory",
              "head_train.num_workers", "head_train.source", "head_train.compile", "head_train.stack"}


# ----------------------------------------------------------------------------------------------- members
@dataclass
class Member:
    """One head configuration under training, with everything its checkpoint holds."""
    name: str
    cfg: HeadConfig
    head: RegressionHead
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    rng: RngStream
    out_dir: Path
    progress: Progress  # its `stopped` is kept once set, even if a resumed run asks for more patience
    train_loss: float | torch.Tensor = 0.0  # running sums of the current epoch, kept on the device: reading
    train_slots: int | torch.Tensor = 0     # them every step would wait for the GPU every step

    def mean_train_loss(self) -> float:
        return float(self.train_loss) / max(int(self.train_slots), 1)

    def state(self, cfg: Config, stage1_sha256: str, source: str) -> dict[str, Any]:
        """Everything a checkpoint holds; `stage1_sha256` is that of the stage-1 checkpoint that made the
        inputs (the cache's or the live source's)."""
        progress = self.progress.state()
        del progress["step"], progress["elapsed_s"]  # a head's checkpoint counts epochs, not steps or time
        return {**head_state(self.head), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": self.rng.state, **progress,
                "stopped": self.progress.stopped, "stage1_sha256": stage1_sha256, "source": source, "name": self.name,
                "config": cfg.to_dict()}

    def restore(self, state: dict[str, Any], total_steps: int, steps: int) -> int | None:
        """Continue from a checkpoint; returns the schedule's old total when it was rebuilt for more epochs."""
        self.head.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler, old_total = restore_schedule(self.optimizer, state["scheduler"], self.cfg.lr, total_steps,
                                                     state["epoch"] * steps)
        self.rng.state = state["rng"]
        self.progress.restore(state)
        self.progress.stopped = state["stopped"]
        return old_total


def build_member(name: str, hc: HeadConfig, cfg: Config, dim: int, device: torch.device, info: DistInfo,
                 sample: FlatBatch, total_steps: int, out_dir: Path) -> Member:
    torch.manual_seed(cfg.seed)  # every configuration starts from the seed: sweep == single runs
    try:
        head = build_head(hc, dim)
        head.estimate_scales(sample)
    except ValueError as e:
        raise ConfigError(f"head config {name!r}: {e}") from None
    head.to(device)
    optimizer = head_optimizer(head, hc.lr, hc.weight_decay)
    scheduler = one_cycle(optimizer, hc.lr, total_steps)
    rng = RngStream(cfg.seed * 1_000_003 + info.rank + 1, device)  # dropout masks: own stream per head
    return Member(name, hc, head, optimizer, scheduler, rng, out_dir, Progress(EarlyStopping(cfg.head_train.patience)))


def head_set(members: list[Member], info: DistInfo, device: torch.device, stack: str = "no") -> torch.nn.Module:
    """All heads as one module (inputs shared per batch; `stack`: head_train.stack), under DDP on several ranks."""
    model = HeadSet([m.head for m in members], stack, [m.name for m in members])
    if info.enabled:  # early-stopped heads of a sweep leave parameters unused
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                        broadcast_buffers=False, find_unused_parameters=len(members) > 1)
    return model


# ----------------------------------------------------------------------------------------------- steps
def train_step(model: torch.nn.Module, members: list[Member], batch: FlatBatch, grad_clip: float,
               source: HeadSource | None = None) -> list[torch.Tensor]:
    """One optimiser step of every active head on the same batch (its mean loss over its matched slots);
    returns each active head's loss (a detached tensor: nothing here waits for the device). The heads share
    no parameter, so one backward of the summed losses gives each head exactly the gradient of its own loss.
    The heads' inputs come from `source`'s prepared ones where it has them."""
    active = [k for k, m in enumerate(members) if not m.progress.stopped]
    heads = [members[k].head for k in active]
    wanted = matched_targets(batch)[1].view(-1)  # the slots the loss reads
    inputs = source.inputs(batch, heads, wanted) if source is not None else batch_inputs(batch, heads)
    model.train()
    outs = model(batch, inputs, active, [m.rng for m in members])
    total, losses = 0.0, []
    for k, out in zip(active, outs):
        m = members[k]
        loss_sum, slots = m.head.loss(out, batch)
        loss = loss_sum / slots.clamp_min(1)
        total = total + loss
        m.train_loss = m.train_loss + loss_sum.detach().double()
        m.train_slots = m.train_slots + slots.detach()
        losses.append(loss.detach())
    for k in active:
        members[k].optimizer.zero_grad(set_to_none=True)
    total.backward()
    for k in active:
        m = members[k]
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(m.head.parameters(), grad_clip)
        m.optimizer.step()
        m.scheduler.step()
    return losses


# ----------------------------------------------------------------------------------------------- run
def run(cfg: Config, resume: bool = False, sweep: str | Path | None = None,
        overwrite: bool = False) -> list[dict[str, Any]]:
    """Train the head (or a sweep of heads); returns one summary row per configuration.

    Refuses to replace an earlier run's results unless `overwrite` (start again) or `resume` (continue)."""
    ht = cfg.head_train
    configs = [("head", cfg.head)] if sweep is None else load_sweep(sweep, cfg.head)
    head_dir = RunDir(cfg).head
    for name, _ in configs:  # refuse before any work
        guard(member_dir(head_dir, name, sweep is not None), TRAINING_RESULTS, overwrite=overwrite, resume=resume,
              command="train-head")
    with stage_lock(head_dir, held=dist_info().is_main), started(ht.device) as (device, info), \
            replacing(info.is_main) as replaced:
        return _train(cfg, configs, info, device, resume=resume, overwrite=overwrite, is_sweep=sweep is not None,
                      replaced=replaced)


def member_dir(head_dir: Path, name: str, is_sweep: bool) -> Path:
    return head_dir / "sweep" / name if is_sweep else head_dir


def _train(cfg: Config, configs: list[tuple[str, HeadConfig]], info: DistInfo, device: torch.device, *,
           resume: bool, overwrite: bool = False, is_sweep: bool,
           replaced: Replacement | None = None) -> list[dict[str, Any]]:
    ht, head_dir = cfg.head_train, RunDir(cfg).head
    train, val = open_sources(cfg, min(hc.threshold for _, hc in configs), info, device)
    steps = steps_per_epoch(train, info)
    sample = train.sample()
    for name, _ in configs:  # --overwrite sets the earlier results aside until every head's first checkpoint
        guard(member_dir(head_dir, name, is_sweep), TRAINING_RESULTS, overwrite=overwrite, resume=resume,
              command="train-head", replacing=replaced)
    members = [build_member(name, hc, cfg, train.dim, device, info, sample, ht.epochs * steps,
                            member_dir(head_dir, name, is_sweep)) for name, hc in configs]
    if resume:
        resume_members(members, cfg, train.stage1_sha256, steps, device, info)
    train_epochs(cfg, members, train, val, steps, info, device, names=is_sweep, replaced=replaced)
    summary = [{"name": m.name, **dataclasses.asdict(m.cfg), **m.progress.best_metrics} for m in members]
    if info.is_main:
        for m in members if cfg.eval.plots else []:
            from hepreg.evaluation import plots  # matplotlib: only where a figure is drawn
            plots.learning_curves(m.out_dir / "metrics.csv", m.out_dir / "learning_curves.png",
                                  f"{cfg.name} · head {m.name}" if is_sweep else f"{cfg.name} · head")
        leaderboard(summary, head_dir / ("sweep" if is_sweep else "") / "leaderboard.csv")
    return summary


def train_epochs(cfg: Config, members: list[Member], train: HeadSource, val: HeadSource, steps: int, info: DistInfo,
        device: torch.device, *, names: bool, replaced: Replacement | None = None,
        on_epoch: Callable[[int, list[tuple[str, dict]]], None] | None = None) -> None:
    """Train `members` for the epochs they have left on `train`, validating on `val` after each. `on_epoch(epoch,
    rows)` sees each epoch's validation rows once its checkpoints are written, and may raise to stop the run there
    (how `hepreg tune` prunes a trial); the sources may be shared by several calls (their prepared inputs too)."""
    ht = cfg.head_train
    if info.is_main:
        for m in members:
            write_config(m.out_dir, dataclasses.replace(cfg, head=m.cfg))
    # a fresh run starts an empty metrics.csv, a resumed one drops rows past its epoch (TensorBoard likewise)
    logs = {m.name: EpochLog(m.out_dir, m.progress.epoch, enabled=info.is_main) for m in members}
    compiled = [compile_head(m.head) for m in members] if ht.compile else []
    model = head_set(members, info, device, "no" if ht.compile and ht.stack == "auto" else ht.stack)
    start = min(m.progress.epoch for m in members)
    table = EpochTable(HEAD_COLUMNS, ht.epochs, start_epoch=start, names=names,
                       name_width=min(max(len(m.name) for m in members), 12))
    prepared = [source.prepare([m.head for m in members]) for source in (train, val)]
    if info.is_main:
        run_header(cfg, members, train, val, steps, device, info, start, table.every,
                   "; ".join(x for x in [prepared[0], compiled[0] if compiled else None] if x) or None)
    try:
        with progress() as bar:
            task = bar.add_task("train-head", total=(ht.epochs - start) * train.split.num_events)
            while not all(finished(m.progress, ht.epochs, verbose=False) for m in members):
                epoch = min(m.progress.epoch for m in members)
                t0 = shown = time.perf_counter()
                events = 0
                for batch in epoch_batches(train, epoch, steps, device):
                    train_step(model, members, batch, ht.grad_clip, train)
                    events += batch.size
                    bar.update(task, advance=batch.size * info.world_size)
                    if time.perf_counter() - shown > 1.0:  # reading the losses waits for the device: once a sec.
                        shown = time.perf_counter()
                        bar.update(task, info=running_losses(members))
                seconds = epoch_seconds(t0, device)
                rows = end_epoch(cfg, members, val, epoch, events * info.world_size, seconds, train.stage1_sha256,
                                 info, device, logs, table)
                if replaced is not None:
                    replaced.commit()  # every head has a complete checkpoint: the earlier ones may go
                if on_epoch is not None:
                    on_epoch(epoch + 1, rows)
    finally:
        for log in logs.values():
            log.close()


def open_sources(cfg: Config, min_threshold: float, info: DistInfo,
                 device: torch.device) -> tuple[HeadSource, HeadSource]:
    """Train and val sources that keep every hit the lowest head threshold pools, from one stage-1 checkpoint."""
    train = make_source(cfg, "train", info, shuffle=True, min_threshold=min_threshold, device=device)
    val = make_source(cfg, "val", info, shuffle=False, min_threshold=min_threshold, device=device)
    if val.stage1_sha256 != train.stage1_sha256:
        raise CacheError(f"train and val caches of run {cfg.name} come from different stage-1 checkpoints; "
                         f"re-export them together")
    return train, val


def resume_members(members: list[Member], cfg: Config, stage1_sha256: str, steps: int, device: torch.device,
                   info: DistInfo) -> None:
    """Each head from its last.pt, refused when it was trained on other stage-1 outputs, under other settings
    (the differing keys named) or for more epochs than asked for; says what it resumed from."""
    ht = cfg.head_train
    for m in members:
        last = m.out_dir / LAST
        state = last_checkpoint(last, "head", ("model", "head_config", "optimizer", "scheduler", "rng", "epoch"),
                                device, info, name=m.name)
        if state is None:
            continue
        if stage1_of(state) != stage1_sha256:
            raise CacheError(f"{last} was trained on outputs of stage-1 checkpoint "
                             f"{str(stage1_of(state))[:12]}, the source now holds "
                             f"{stage1_sha256[:12]}; start a fresh run instead of --resume")
        saved = {"seed": state["config"]["seed"], "head": state["head_config"],
                 "head_train": state["config"]["head_train"]}
        now = {"seed": cfg.seed, "head": dataclasses.asdict(m.cfg), "head_train": dataclasses.asdict(ht)}
        check_continues(saved, now, last, MAY_DIFFER, state["epoch"], ht.epochs, "head_train.epochs")
        old_total = m.restore(state, ht.epochs * steps, steps)
        said = f"{m.name}: {resumed(last, m.progress.epoch, steps, ht.epochs, old_total)}"
        if m.progress.stopped:
            said += "; it had stopped early"
        if info.is_main:
            console.print(said, highlight=False, soft_wrap=True)


def epoch_seconds(t0: float, device: torch.device) -> float:
    """Seconds since t0, the epoch's queued kernels included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def end_epoch(cfg: Config, members: list[Member], val: HeadSource, epoch: int, events: int, seconds: float,
              stage1_sha256: str, info: DistInfo, device: torch.device, logs: dict[str, EpochLog],
              table: EpochTable) -> list[tuple[str, dict]]:
    """Validate the active heads, `score` each one (its best row says which epoch it is) and write its metrics
    row, then every head's checkpoints (stopped ones' last.pt too, so that every last.pt of a sweep resumes at
    the same epoch); the running train losses start again."""
    active = [m for m in members if not m.progress.stopped]
    printed, improved = [], set()
    for m, row in zip(active, validate_heads([m.head for m in active], val, info, device)):
        if score(m.progress, {"best_epoch": epoch + 1, **row}):
            improved.add(m.name)
        full = metrics_row(m, epoch, row, events / seconds, seconds)
        printed.append((m.name, full))
        logs[m.name].append(full)
        if info.is_main and m.progress.stopped:
            console.print(f"{m.name}: early stop after epoch {epoch + 1} (val loss not improved for "
                          f"{m.progress.early.bad_epochs} epochs)", highlight=False)
    for m in members:
        m.progress.epoch, m.train_loss, m.train_slots = epoch + 1, 0.0, 0
        if info.is_main:
            state = m.state(cfg, stage1_sha256, cfg.head_train.source)
            for path in checkpoint_paths(m.out_dir, m.name in improved):
                save_checkpoint(state, path)
    barrier()
    if info.is_main:
        table.print(epoch + 1, printed, improved, force=any(m.progress.stopped for m in active))
    return printed


# ----------------------------------------------------------------------------------------------- console
def running_losses(members: list[Member]) -> str:
    """The progress bar's note: this epoch's running train loss, of each head by name in a sweep."""
    if len(members) == 1:
        return f"loss {members[0].mean_train_loss():.4f}"
    active = [m for m in members if not m.progress.stopped]
    shown = " ".join(f"{m.name} {m.mean_train_loss():.3f}" for m in active[:3])
    return shown + (f" +{len(active) - 3} more" if len(active) > 3 else "")


def metrics_row(m: Member, epoch: int, val: dict[str, float], events_per_s: float, seconds: float) -> dict:
    """One head's row of metrics.csv (and TensorBoard) for one epoch; epochs count from 1, as in stage 1."""
    return {"epoch": epoch + 1, "train_loss": m.mean_train_loss(), **val, "lr": m.scheduler.get_last_lr()[0],
            "events_per_s": events_per_s, "seconds": seconds}


def run_header(cfg: Config, members: list[Member], train, val, steps: int, device: torch.device, info: DistInfo,
               start_epoch: int, every: int, prepared: str | None = None) -> None:
    """What the run is about to do: source, device, events, epochs, and each head's size."""
    ht = cfg.head_train
    split = train.split
    if ht.source == "cache":
        attrs = split.attrs
        memory = "in memory" if train.loader.in_memory else "read from disk"
        dtype = attrs.get("dtypes", {}).get("hits/embed")
        source = (f"cache {split.path.parent} ({dtype + ' embeddings, ' if dtype else ''}pruned at "
                  f"{split.prune_threshold:g}, {memory})" + (f" · {prepared}" if prepared else ""))
    else:
        source = f"live: frozen stage-1 model {RunDir(cfg).assign / 'best.pt'} run on every batch"
    epochs = f"epochs {start_epoch + 1}-{ht.epochs} of {ht.epochs}" if start_epoch else f"{ht.epochs} epochs"
    header(f"train-head · run {cfg.name}", [
        source,
        f"device {device}, {info.world_size} process{'es' if info.world_size > 1 else ''} · train "
        f"{split.num_events:,} events ({steps} steps of {ht.batch_size}) · val {val.split.num_events:,} events",
        f"{epochs} (early stop after {ht.patience} without improvement)"
        + (f" · a table line every {every} epochs" if every > 1 else "")],
        [(m.name, {"head": m.name, "width": m.cfg.hidden_dim, "depth": m.cfg.num_layers,
                   "thr": f"{m.cfg.threshold:g}", "lr": f"{m.cfg.lr:.0e}",
                   "parameters": f"{sum(p.numel() for p in m.head.parameters()):,}"}) for m in members])


