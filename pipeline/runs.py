"""Run directories, checkpoints and fingerprints.

A run lives in `runs/<name>/` with one folder per stage (`assign/`, `cache/`, `head/`, `eval/`). Checkpoints
are written to a temporary name and renamed, so a kill -9 never leaves a half-written `best.pt`/`last.pt`.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import torch

from hepreg.config import Config
from hepreg.errors import HepregError


class RunDir:
    def __init__(self, cfg: Config):
        self.root = cfg.run_path

    @property
    def assign(self) -> Path:
        return self.root / "assign"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def head(self) -> Path:
        return self.root / "head"

    @property
    def eval(self) -> Path:
        return self.root / "eval"


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Atomic torch.save: write `path.tmp`, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise HepregError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise HepregError(f"checkpoint {path} cannot be read: {e}") from None


class MetricsCSV:
    """Append-only per-epoch metrics; a resumed run truncates rows past the epoch it resumes from."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def truncate_after(self, epoch: int) -> None:
        if not self.path.exists():
            return
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        keep = [r for r in rows if int(r["epoch"]) <= epoch]
        if keep:
            with open(self.path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(keep[0]))
                w.writeheader()
                w.writerows(keep)
        else:
            self.path.unlink()

    def append(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)
