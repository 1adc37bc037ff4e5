"""What every epoch loop shares: where training stands, when it is over, the end of an epoch, the start of a
resumed run.

The training stages are recipes of one shape (set up, train epoch by epoch, save, clean up): train-assign and
finetune fill it in with one model (`epoch_loop`, `end_epoch`), train-head with K heads at once, each head
with its own `Progress`. What an epoch leaves behind is the same everywhere: early stopping's count and the
best row (`score`), `best.pt` when the validation figure improved and `last.pt` (`checkpoint_paths`), the
metrics row (CSV and TensorBoard), one table line; and a resumed run starts from `last.pt`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from hepreg.runs.directory import BEST, LAST, load_checkpoint, save_checkpoint
from hepreg.runs.distributed import DistInfo, barrier
from hepreg.runs.log import EpochLog, EpochTable
from hepreg.runs.outputs import Replacement
from hepreg.runs.progress import console
from hepreg.runs.training import EarlyStopping


@dataclass
class Progress:
    """Where training stands, beyond weights, optimisers and RNGs: saved in every checkpoint."""
    early: EarlyStopping
    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps taken
    elapsed_s: float = 0.0
    best_metrics: dict = field(default_factory=dict)  # the best epoch's row
    stopped: bool = False  # early stopping's verdict at the end of the last epoch

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "best_val": self.early.best,
                "bad_epochs": self.early.bad_epochs, "elapsed_s": self.elapsed_s, "best_metrics": self.best_metrics}

    def restore(self, ckpt: dict[str, Any]) -> None:
        """Continue from a checkpoint. `stopped` is judged again under this run's patience: a resumed run may
        ask for more (train-head keeps a stopped head stopped, from its own key)."""
        self.epoch, self.step, self.elapsed_s = ckpt["epoch"], ckpt.get("step", 0), ckpt.get("elapsed_s", 0.0)
        self.early.best, self.early.bad_epochs = ckpt["best_val"], ckpt["bad_epochs"]
        self.best_metrics = ckpt.get("best_metrics", {})
        self.stopped = self.early.stop


def finished(progress: Progress, epochs: int, *, what: str = "val loss", max_minutes: float | None = None,
             verbose: bool = True) -> bool:
    """Whether training is over: all epochs done, early stop on the validation figure, or the time spent."""
    if progress.epoch >= epochs:
        return True
    reason = None
    if progress.stopped:
        reason = f"early stop: the {what} has not improved for {progress.early.patience} epochs"
    elif max_minutes is not None and progress.elapsed_s >= 60 * max_minutes:
        reason = f"stopping: {max_minutes:g} minutes of training reached"
    if reason and verbose:
        console.print(reason)
    return reason is not None


def score(progress: Progress, row: dict) -> bool:
    """Early stopping's count on `row["val_loss"]`; the row becomes the best one when it improved. Returns
    whether it improved."""
    improved = progress.early.update(row["val_loss"])
    if improved:
        progress.best_metrics = dict(row)
    progress.stopped = progress.early.stop
    return improved


def checkpoint_paths(out: Path, improved: bool) -> tuple[Path, ...]:
    """Where an epoch's checkpoint goes: best.pt when the epoch improved, then last.pt, the one a resumed run
    starts from."""
    return (out / BEST, out / LAST) if improved else (out / LAST,)


def end_epoch(out: Path, row: dict, progress: Progress, checkpoint: Callable[[dict], dict], log: EpochLog,
              table: EpochTable, info: DistInfo, replaced: Replacement | None = None) -> bool:
    """`score` the row, then on rank 0: the checkpoint at its `checkpoint_paths` (after which the earlier run
    that --overwrite replaces may go), the metrics row, the table line. Returns whether it improved."""
    improved = score(progress, row)
    if info.is_main:
        ckpt = checkpoint(row)
        for path in checkpoint_paths(out, improved):
            save_checkpoint(ckpt, path)
        if replaced is not None:
            replaced.commit()
        log.append(row)
        table.print(row["epoch"], [("", row)], {""} if improved else set(), force=True)
    barrier()
    return improved


def last_checkpoint(last: Path, kind: str, needs: Iterable[str], device: torch.device, info: DistInfo,
                    name: str = "") -> dict | None:
    """`last.pt` of the run being resumed, or None (said) when it has none yet: a resumed run that never wrote
    one starts from scratch."""
    if not last.is_file():
        if info.is_main:
            console.print(f"{name + ': ' if name else ''}no {last} yet, starting from scratch", highlight=False)
        return None
    return load_checkpoint(last, map_location=device, kind=kind, needs=tuple(needs))


def epoch_loop(out: Path, progress: Progress, epochs: int, train: Callable[[], dict], validate: Callable[[], dict],
               learning_rates: Callable[[], dict], checkpoint: Callable[[dict], dict], log: EpochLog,
               table: EpochTable, info: DistInfo, replaced: Replacement | None = None, *, what: str = "val loss",
               max_minutes: float | None = None) -> None:
    """The epochs of a one-model recipe (train-assign, finetune) until `finished`: `train()` one epoch (its row
    holds `train_events`), `validate()`, the epoch's row with the `learning_rates()` reached and the rate, then
    `end_epoch`. The metrics log is closed at the end, however the loop ends."""
    try:
        while not finished(progress, epochs, what=what, max_minutes=max_minutes, verbose=info.is_main):
            t0 = time.perf_counter()
            trained = train()
            train_s = time.perf_counter() - t0
            val = validate()
            progress.elapsed_s += time.perf_counter() - t0
            progress.epoch += 1
            row = {"epoch": progress.epoch, **trained, **val, **learning_rates(),
                   "events_per_s": trained["train_events"] / train_s, "seconds": time.perf_counter() - t0,
                   "elapsed_s": progress.elapsed_s}
            end_epoch(out, row, progress, checkpoint, log, table, info, replaced)
    finally:
        log.close()
