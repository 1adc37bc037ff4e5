"""`hepreg finetune`: stage 1 and a trained head, trained end to end from their checkpoints.

Starts from `assign/best.pt` and a head (default `head/best.pt`, any sweep member by path) and trains both on
HDF5 batches bucketed by hit count as stage 1 trains, through `hepreg.models.joint.joint_loss`: the assignment
loss (`finetune.assign_weight`) plus the head's regression loss (`finetune.head_weight`). Each part has its own
AdamW and learning rate: the head continues its own optimiser (state, betas, weight decay) and its own dropout
stream from its checkpoint, stage 1 starts a fresh one at a much lower rate. For the first
`finetune.warmup_steps` steps stage 1 stays frozen (eval mode, no gradients) and only the head adapts.

Validation: the same weighted sum on the val split (assignment loss per event + head loss per matched track),
with the stage-1 figures (track and double-majority efficiency, fake rate) and the head's (σ(q/pT), charge
mis-ID) beside it. Epoch 0 is the starting point, validated before any step: `best.pt` is never worse on that
figure than what the fine-tune started from. Early stopping watches the same figure.

Rank 0 writes `runs/<name>/finetune/{best,last}.pt`: one checkpoint holding stage 1 (`model`, `config`, as a
stage-1 checkpoint does) and the head (`head`), which `evaluate`, `predict` and `export-model` take as
`--model` (see `hepreg.trained`). last.pt holds everything the loop's future depends on, and the loader's
order depends only on (seed, epoch), so `--resume` after a kill continues bit for bit.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from hepreg.evaluation import metrics
from hepreg.settings import Config
from hepreg.data.batching import HitLoader, train_val_loaders
from hepreg.runs.digest import sha256_file
from hepreg.runs.distributed import DistInfo, dist_info, started
from hepreg.errors import HepregError
from hepreg.frozen import FrozenAssigner
from hepreg.models.assign_metrics import COUNT_NAMES, add_counts, counts_from_logits, rates
from hepreg.models.head import RegressionHead, head_state, matched_targets
from hepreg.models.joint import joint_loss
from hepreg.runs.outputs import Replacement, guard, replacing, write_config
from hepreg.runs.progress import console, progress, results
from hepreg.runs.resume import check_continues
from hepreg.runs.log import FINETUNE_COLUMNS, EpochLog, EpochTable, header
from hepreg.runs.directory import LAST, TRAINING_RESULTS, RunDir, load_checkpoint
from hepreg.runs.loop import Progress, end_epoch, epoch_loop, last_checkpoint
from hepreg.runs.files import stage_lock
from hepreg.trained import FINETUNED, load_head
from hepreg.runs.training import (EarlyStopping, RngStream, autocast, finetune_learning_rates, rng_state,
                                   seed_everything, set_rng_state)

# Settings a resumed run may change: how long and where it trains, not what it trains.
MAY_DIFFER = {"finetune.epochs", "finetune.patience", "finetune.device"}


@dataclass
class Parts:
    """What trains: stage 1 and the head, each with its optimiser; the head's own dropout stream."""
    model: nn.Module
    head: RegressionHead
    opt_stage1: torch.optim.Optimizer
    opt_head: torch.optim.Optimizer
    head_rng: RngStream
    assign_cfg: Any  # stage 1's own loss and matching settings (its checkpoint's `assign` section)
    stage1_config: dict  # the stage-1 checkpoint's config: the model a fine-tuned checkpoint rebuilds


def load_start(stage1_path: Path, head_path: Path, cfg: Config, device: torch.device,
               info: DistInfo) -> Parts:
    """Stage 1 and the head from their checkpoints, checked to belong together; both optimisers."""
    for path, what, command in ((stage1_path, "stage-1 checkpoint", "train-assign"),
                                (head_path, "head checkpoint", "train-head")):
        if not path.is_file():
            raise HepregError(f"finetune starts from a trained stage 1 and head, and the {what} {path} does not "
                              f"exist; run `hepreg {command}` for run {cfg.name!r} first"
                              + (", or pass --head CKPT (e.g. a sweep member's best.pt)" if what.startswith("head")
                                 else ""))
    assigner = FrozenAssigner.from_checkpoint(stage1_path, "cpu")
    state = load_checkpoint(head_path)
    if state.get("kind") == FINETUNED:
        raise HepregError(f"{head_path} is a fine-tuned model already; fine-tune from the head checkpoint it "
                          f"started from ({state.get('head_source')}), or --resume that fine-tune")
    load_checkpoint(head_path, kind="head", needs=("model", "head_config", "dim", "optimizer", "rng"))
    dim = assigner.config.model.dim
    if state["dim"] != dim:
        raise HepregError(f"head checkpoint {head_path} reads {state['dim']}-wide embeddings, but the stage-1 "
                          f"checkpoint {stage1_path} makes {dim}-wide ones: the head was trained on another "
                          f"stage 1; pass --head with a head trained on this one")
    head = load_head(head_path, assigner.checkpoint_sha256, stage1_path).to(device)  # refuses another stage 1
    model = assigner.model.requires_grad_(True).to(device)
    ft = cfg.finetune
    opt_stage1 = torch.optim.AdamW(model.parameters(), lr=ft.lr_stage1, weight_decay=ft.weight_decay)
    opt_head = torch.optim.AdamW(head.parameters(), lr=ft.lr_head)
    try:  # the head continues its own optimiser: moments, betas, weight decay
        opt_head.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as e:
        raise HepregError(f"head checkpoint {head_path} holds an optimiser state that does not fit its head: "
                          f"{e}") from None
    head_rng = RngStream(0, device)
    head_rng.state = tuple(state["rng"])  # its dropout masks continue where head training left them
    s1 = assigner.config
    return Parts(model, head, opt_stage1, opt_head, head_rng, s1.assign,
                 {"model": s1.to_dict()["model"], "assign": s1.to_dict()["assign"]})


# ----------------------------------------------------------------------------------------------- steps
def train_step(p: Parts, batch, step: int, total: int, cfg: Config, device: torch.device,
               info: DistInfo) -> tuple[Any, bool]:
    """One optimiser step of the head, and of stage 1 once the warm-up is over; returns (losses, frozen)."""
    ft = cfg.finetune
    frozen = step < ft.warmup_steps
    p.model.train(not frozen)
    p.head.train()
    lr1, lr2 = finetune_learning_rates(ft, step, total)
    for g in p.opt_stage1.param_groups:
        g["lr"] = lr1
    for g in p.opt_head.param_groups:
        g["lr"] = lr2
    loss = joint_loss(p.model, p.head, batch, p.assign_cfg, assign_weight=ft.assign_weight,
                      head_weight=ft.head_weight, train_stage1=not frozen, prune_threshold=p.head.cfg.threshold,
                      autocast=autocast(device, p.assign_cfg.precision), head_context=p.head_rng)
    p.opt_stage1.zero_grad(set_to_none=True)
    p.opt_head.zero_grad(set_to_none=True)
    loss.total.backward()
    trained = [(p.head, p.opt_head)] + ([] if frozen else [(p.model, p.opt_stage1)])
    for module, opt in trained:
        params = list(module.parameters())
        if info.enabled:  # the mean gradient over ranks (every rank takes the same number of steps)
            for q in params:
                if q.grad is None:
                    q.grad = torch.zeros_like(q)
                dist.all_reduce(q.grad)
                q.grad /= info.world_size
        if ft.grad_clip > 0:
            nn.utils.clip_grad_norm_(params, ft.grad_clip)
        opt.step()
    return loss, frozen


@torch.no_grad()
def validate(p: Parts, loader: HitLoader, cfg: Config, device: torch.device, info: DistInfo) -> dict[str, float]:
    """The val figure (weighted sum of the assignment loss per event and the head loss per matched track), the
    assignment rates and the head's resolution, over the whole val range (each event counted once)."""
    ft = cfg.finetune
    p.model.eval()
    p.head.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # Σ assign loss·events, events, Σ head loss, slots
    counts = None
    preds, truth = [], []
    with progress() as bar:
        task = bar.add_task("validate", total=loader.num_events)
        for batch in loader:
            batch = batch.to(device)
            j = joint_loss(p.model, p.head, batch, p.assign_cfg, train_stage1=False,
                           prune_threshold=p.head.cfg.threshold, autocast=autocast(device, p.assign_cfg.precision))
            final = j.stage1.final
            counts = add_counts(counts, counts_from_logits(final["track_logit"], final["mask_logit"], batch.hit_valid,
                                                           batch.particle_valid, batch.particle_hit_valid,
                                                           j.flat.match))
            sums += torch.tensor([j.assign.item() * batch.size, batch.size, j.head_sum.item(), j.slots.item()],
                                 dtype=torch.float64)
            target, valid = matched_targets(j.flat)
            preds.append(p.head.decode(j.head_out)[valid].cpu().numpy())
            truth.append(target[valid].cpu().numpy())
            bar.update(task, advance=batch.size)
    packed = torch.cat([sums, torch.tensor([float(counts[k]) if counts else 0.0 for k in COUNT_NAMES],
                                           dtype=torch.float64)])
    if info.enabled:
        dist.all_reduce(packed)
        gathered: list[Any] = [None] * info.world_size
        dist.all_gather_object(gathered, (preds, truth))
        preds = [x for g in gathered for x in g[0]]
        truth = [x for g in gathered for x in g[1]]
    pred = np.concatenate(preds) if preds else np.zeros((0, 4))
    true = np.concatenate(truth) if truth else np.zeros((0, 4))
    res = metrics.residuals(pred, true)
    val_assign = float(packed[0] / max(float(packed[1]), 1.0))
    val_head = float(packed[2] / max(float(packed[3]), 1.0))
    return {"val_loss": ft.assign_weight * val_assign + ft.head_weight * val_head, "val_assign": val_assign,
            "val_head": val_head, "val_events": int(packed[1]),
            **rates(dict(zip(COUNT_NAMES, packed[4:].tolist()))),
            "val_pt_res": metrics.robust_width(res["pt"]), "val_qpt_res": metrics.robust_width(res["qpt"]),
            "val_charge_misid": float(metrics.charge_misid(true[:, 3], pred[:, 3]).mean()) if len(true) else math.nan}


def train_epoch(p: Parts, loader: HitLoader, state: Progress, total: int, cfg: Config, device: torch.device,
                info: DistInfo) -> dict[str, float]:
    """One pass over this rank's training shard; event-weighted mean losses over all ranks."""
    loader.set_epoch(state.epoch)
    sums = torch.zeros(4, dtype=torch.float64)  # Σ total·events, Σ assign·events, Σ head·events, events
    with progress() as bar:
        task = bar.add_task(f"epoch {state.epoch + 1} finetune", total=loader.num_events)
        for batch in loader:
            batch = batch.to(device, non_blocking=True)
            loss, frozen = train_step(p, batch, state.step, total, cfg, device, info)
            state.step += 1
            value = loss.total.item()
            if not math.isfinite(value):
                raise HepregError(f"fine-tuning loss became {value} at epoch {state.epoch + 1}, step {state.step}; "
                                  f"lower finetune.lr_stage1 ({cfg.finetune.lr_stage1:g}) or finetune.lr_head "
                                  f"({cfg.finetune.lr_head:g})")
            sums += torch.tensor([value, loss.assign.item(), loss.head.item(), 1.0], dtype=torch.float64) * batch.size
            bar.update(task, advance=batch.size, info=f"loss {value:.4f} (assign {loss.assign.item():.3f}, head "
                                                      f"{loss.head.item():.3f}){' stage 1 frozen' if frozen else ''}")
    if info.enabled:
        dist.all_reduce(sums)
    n = max(float(sums[3]), 1.0)
    return {"train_loss": float(sums[0]) / n, "train_assign": float(sums[1]) / n, "train_head": float(sums[2]) / n,
            "train_events": int(sums[3])}


# ----------------------------------------------------------------------------------------------- run
def run(cfg: Config, head: Path | None = None, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Fine-tune stage 1 and the head (`head`, default head/best.pt); refuses to replace an earlier fine-tune
    unless `overwrite` (start again) or `resume` (continue it). Returns the best epoch's val metrics."""
    out = RunDir(cfg).finetune
    guard(out, TRAINING_RESULTS, overwrite=overwrite, resume=resume, command="finetune")
    head_path = Path(head) if head is not None else RunDir(cfg).head_best
    with stage_lock(out, held=dist_info().is_main), started(cfg.finetune.device) as (device, info), \
            replacing(info.is_main) as replaced:
        return _train(cfg, head_path, resume, overwrite, device, info, replaced)


def open_loaders(cfg: Config, info: DistInfo):
    """The dataset, its (capped) train and val ranges and this rank's bucketed loaders, as stage 1 trains."""
    ft = cfg.finetune
    return train_val_loaders(cfg, info.rank, info.world_size, train_batch(cfg), ft.train_events, ft.val_events)


def _train(cfg: Config, head_path: Path, resume: bool, overwrite: bool, device: torch.device,
           info: DistInfo, replaced: Replacement | None = None) -> dict[str, Any]:
    ft, rd = cfg.finetune, RunDir(cfg)
    out, stage1_path = rd.finetune, rd.assign_best
    seed_everything(cfg.seed)
    dataset, ranges, train_loader, val_loader = open_loaders(cfg, info)
    p = load_start(stage1_path, head_path, cfg, device, info)
    # the inputs are readable and fit together: under the stage lock --overwrite sets the earlier results aside
    guard(out, TRAINING_RESULTS, overwrite=overwrite, resume=resume, command="finetune", replacing=replaced)
    sources = {"stage1_source": str(stage1_path), "stage1_source_sha256": sha256_file(stage1_path),
               "head_source": str(head_path), "head_source_sha256": sha256_file(head_path),
               "data_fingerprint": dataset.fingerprint()}
    total = ft.epochs * len(train_loader)
    state = Progress(EarlyStopping(ft.patience))
    if resume:
        resume_from(out / LAST, p, state, cfg, sources, device, info)
    if info.is_main:
        write_config(out, cfg)
        run_header(cfg, p, head_path, stage1_path, ranges, len(train_loader), device, info, state)
    log = EpochLog(out, state.epoch, enabled=info.is_main)
    table = EpochTable(FINETUNE_COLUMNS, ft.epochs, start_epoch=state.epoch, repeat_header=True)

    def checkpoint(row: dict) -> dict:
        return {"kind": FINETUNED, "model": p.model.state_dict(), "config": {**cfg.to_dict(), **p.stage1_config},
                "head": head_state(p.head), "optimizer_stage1": p.opt_stage1.state_dict(),
                "optimizer_head": p.opt_head.state_dict(), "rng": rng_state(), "head_rng": list(p.head_rng.state),
                "metrics": row, **sources, **state.state()}

    if state.epoch == 0 and not state.best_metrics:  # the starting point, so best.pt is never worse than it
        t0 = time.perf_counter()
        row = {"epoch": 0, **dict.fromkeys(("train_loss", "train_assign", "train_head"), math.nan),
               "train_events": 0, **validate(p, val_loader, cfg, device, info), "lr_stage1": 0.0,
               "lr_head": 0.0, "events_per_s": math.nan, "seconds": time.perf_counter() - t0, "elapsed_s": 0.0}
        end_epoch(out, row, state, checkpoint, log, table, info, replaced)
    def learning_rates() -> dict:
        lr1, lr2 = finetune_learning_rates(ft, max(state.step - 1, 0), total)
        return {"lr_stage1": lr1, "lr_head": lr2}

    epoch_loop(out, state, ft.epochs, lambda: train_epoch(p, train_loader, state, total, cfg, device, info),
               lambda: validate(p, val_loader, cfg, device, info), learning_rates, checkpoint, log, table, info,
               replaced, what="val figure")
    if info.is_main and cfg.eval.plots:
        from hepreg.evaluation import plots  # matplotlib: only where a figure is drawn
        plots.learning_curves(out / "metrics.csv", out / "learning_curves.png", f"{cfg.name} · fine-tune")
    if info.is_main:
        b = state.best_metrics
        results.print(f"fine-tune: best val figure {state.early.best:.4f} at epoch {b.get('epoch')} (σ(q/pT) "
                      f"{b.get('val_qpt_res', math.nan):.4f}, DM eff {b.get('dm_eff', math.nan):.4f}, fake rate "
                      f"{b.get('fake_rate', math.nan):.4f}) → {out / 'best.pt'}")
    return state.best_metrics


def resume_from(last: Path, p: Parts, state: Progress, cfg: Config, sources: dict, device: torch.device,
                info: DistInfo) -> None:
    """Continue from `last` when it exists: refused when it fine-tuned from other checkpoints or data, under
    other settings, or for more epochs than asked for."""
    ckpt = last_checkpoint(last, "fine-tune", ("kind", "model", "head", "optimizer_stage1", "optimizer_head", "rng",
                                               "head_rng", "config", "epoch", "step"), device, info)
    if ckpt is None:
        return
    sections = ("seed", "data", "finetune")
    check_continues({k: ckpt["config"][k] for k in sections}, {k: cfg.to_dict()[k] for k in sections}, last,
                    MAY_DIFFER, ckpt["epoch"], cfg.finetune.epochs, "finetune.epochs")
    for key, what in (("stage1_source_sha256", "stage-1 checkpoint"), ("head_source_sha256", "head checkpoint"),
                      ("data_fingerprint", "data")):
        if ckpt.get(key) != sources[key]:
            source = sources.get(key.replace("_sha256", ""), cfg.data.path)
            raise HepregError(f"{last} was fine-tuned from another {what} than {source} (its sha256 differs); "
                              f"start a fresh fine-tune with --overwrite instead of --resume")
    p.model.load_state_dict(ckpt["model"])
    p.head.load_state_dict(ckpt["head"]["model"])
    p.opt_stage1.load_state_dict(ckpt["optimizer_stage1"])
    p.opt_head.load_state_dict(ckpt["optimizer_head"])
    set_rng_state(ckpt["rng"])
    p.head_rng.state = tuple(ckpt["head_rng"])
    state.restore(ckpt)
    if info.is_main:
        console.print(f"resumed from {last} epoch {state.epoch} (step {state.step})", highlight=False,
                      soft_wrap=True)


def run_header(cfg: Config, p: Parts, head_path: Path, stage1_path: Path, ranges: dict, steps: int,
               device: torch.device, info: DistInfo, state: Progress) -> None:
    ft = cfg.finetune
    (t0, t1), (v0, v1) = ranges["train"], ranges["val"]
    n1 = sum(q.numel() for q in p.model.parameters())
    n2 = sum(q.numel() for q in p.head.parameters())
    epochs = f"epochs {state.epoch + 1}-{ft.epochs} of {ft.epochs}" if state.epoch else f"{ft.epochs} epochs"
    header(f"finetune · run {cfg.name}", [
        f"from stage 1 {stage1_path} ({n1:,} parameters) and head {head_path} ({p.head.cfg.kind}, {n2:,} parameters)",
        f"data {cfg.data.path} · train {t1 - t0:,} events ({steps} steps of {train_batch(cfg)}, bucketed) · val "
        f"{v1 - v0:,} events · device {device}, {info.world_size} process{'es' if info.world_size > 1 else ''}",
        f"loss {ft.assign_weight:g} × assignment + {ft.head_weight:g} × head · lr stage 1 {ft.lr_stage1:g}, head "
        f"{ft.lr_head:g} ({ft.schedule}) · stage 1 frozen for the first {ft.warmup_steps} steps",
        f"{epochs} (early stop on the val figure after {ft.patience} without improvement; epoch 0 = the start)"])


def train_batch(cfg: Config) -> int:
    return cfg.finetune.batch_size or cfg.assign.batch_size or cfg.data.batch_size
