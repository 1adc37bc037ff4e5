"""Resuming a run: which settings may change, and the one-cycle LR schedule rebuilt for a longer run.

A resumed run continues the training its checkpoint describes, so every setting that shapes that training
must match; the few that only say how long or where to train (epochs, patience, device) may change. Asking
for more epochs than the checkpoint was started with rebuilds the one-cycle schedule for the new total and
continues it at the step already taken: from there on, the learning rate of every step is the one an
uninterrupted run of the new length would use, and both end at the same final learning rate.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from hepreg.errors import ConfigError


def differing_keys(saved: Any, now: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Dotted keys whose values differ between two nested config mappings: (key, saved value, value now)."""
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for k in list(saved) + [k for k in now if k not in saved]:
            out += differing_keys(saved.get(k), now.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if saved == now else [(prefix, saved, now)]


def check_same_config(saved: dict[str, Any], now: dict[str, Any], path: Path, may_differ: set[str]) -> None:
    """Refuse to resume `path` under settings that would change its training; name only the keys that differ."""
    diffs = [d for d in differing_keys(saved, now) if d[0] not in may_differ]
    if diffs:
        listed = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, a, b in diffs)
        raise ConfigError(f"{path} was trained with other settings ({listed}); resume with the settings it "
                          f"was started with (only {', '.join(sorted(may_differ))} may change), or start a "
                          f"fresh run with --overwrite")


def check_continues(saved: dict[str, Any], now: dict[str, Any], path: Path, may_differ: set[str], trained: int,
                    epochs: int, setting: str) -> None:
    """A resumed run continues the training of `path`: the same settings (`check_same_config`) and no fewer
    epochs than the `trained` ones (`setting`: the config key that counts them)."""
    check_same_config(saved, now, path, may_differ)
    if trained > epochs:
        raise ConfigError(f"{path} has trained {trained} epochs already and {setting}={epochs} asks for fewer; "
                          f"raise {setting} to continue it, or pass --overwrite")


def resumed(path: Path, epoch: int, steps: int, epochs: int, old_total: int | None) -> str:
    """What a resumed run says: where it continues from, and the schedule rebuilt when more epochs are asked for
    (`old_total`: its former length in steps, None when unchanged)."""
    said = f"resumed from {path} epoch {epoch}"
    if old_total is not None:
        said += (f"; one-cycle LR schedule rebuilt for {epochs} epochs (was {old_total // max(steps, 1)}), "
                 f"continued at step {epoch * steps}")
    return said


def one_cycle(optimizer: torch.optim.Optimizer, max_lr: float, total_steps: int,
              done: int = 0) -> torch.optim.lr_scheduler.OneCycleLR:
    """The one-cycle schedule over `total_steps` steps, positioned after `done` of them (as a run of that
    length would be after `done` steps: same learning rate and momentum in every parameter group)."""
    if done > total_steps:
        raise ConfigError(f"cannot continue a one-cycle schedule of {total_steps} steps after {done} steps")
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=max(total_steps, 1))
    with warnings.catch_warnings():  # "scheduler stepped before optimizer": here it is on purpose
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(done):
            scheduler.step()
    return scheduler


def restore_schedule(optimizer: torch.optim.Optimizer, state: dict[str, Any], max_lr: float, total_steps: int,
                     done: int) -> tuple[torch.optim.lr_scheduler.OneCycleLR, int | None]:
    """The checkpoint's scheduler, or one rebuilt for `total_steps` when the run is now longer.

    Returns the scheduler and the total it was rebuilt from (None when the checkpoint's own was kept).
    """
    old_total = int(state.get("total_steps", total_steps))
    if old_total == total_steps:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=max(total_steps, 1))
        scheduler.load_state_dict(state)
        for g, saved in zip(optimizer.param_groups, groups):  # the checkpoint's lr and momentum, not step 0's
            g.update(saved)
        return scheduler, None
    return one_cycle(optimizer, max_lr, total_steps, done), old_total
