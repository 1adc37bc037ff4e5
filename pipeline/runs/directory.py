"""Run directories, checkpoints, fingerprints, and the safety rules every stage writes by.

A run lives in `<run_dir>/<name>/` with one folder per stage (`assign/`, `cache/`, `head/`, `tune/`, `finetune/`,
`eval/`).
- Files are written to a temporary name, fsynced and renamed (`atomic_write`, `save_checkpoint`), so a
  kill -9 never leaves a half-written `best.pt`/`last.pt`.
- A checkpoint holds only tensors and plain data (dicts, lists, tuples, str, numbers, None) and is loaded
  with `torch.load(weights_only=True)`: loading a checkpoint never runs code from it, whoever made it.
- A stage that writes holds its folder's lock (`stage_lock`): a second writer is refused, naming the PID
  of the first. `--overwrite` replaces only what hepreg made (`replace_dir`).
Those file rules live in `hepreg.runs.files` (no torch, so the data layer can use them too).
"""
from __future__ import annotations

import csv
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hepreg.settings import Config
from hepreg.errors import HepregError
from hepreg.runs.files import atomic_write


BEST, LAST = "best.pt", "last.pt"  # every training stage's checkpoints: the best val epoch, the latest
TRAINING_RESULTS = (BEST, LAST, "metrics.csv")  # what an earlier training run leaves in its folder


class RunDir:
    """A run's folders and the files the stages hand each other, spelled here once: `<run_dir>/<name>/`
    (`cfg.run_path`), or any run root given as a path."""

    def __init__(self, cfg: Config | str | Path):
        self.root = Path(cfg) if isinstance(cfg, (str, Path)) else cfg.run_path

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
    def finetune(self) -> Path:
        return self.root / "finetune"

    @property
    def tune(self) -> Path:
        """`hepreg tune`'s study (study.db), one folder per trial, the leaderboard and figures."""
        return self.root / "tune"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def assign_best(self) -> Path:
        """The stage-1 checkpoint export, the live head, predict, finetune and evaluate use by default."""
        return self.assign / BEST

    @property
    def head_best(self) -> Path:
        return self.head / BEST

    def sweep_member(self, name: str) -> Path:
        """The folder of one head of a `train-head --sweep`."""
        return self.head / "sweep" / name

    def predictions(self, name: str) -> Path:
        """`hepreg predict`'s file of a split, or of a dataset directory by its name."""
        return self.root / "predict" / f"{name}.h5"

    def cache_split(self, split: str) -> Path:
        """One split of the run's cache: a Zarr group `<split>.zarr` (`hepreg.cache` reads and writes it)."""
        return self.cache / f"{split}.zarr"


def plain_state(obj: Any, where: str = "checkpoint") -> Any:
    """`obj` as tensors and plain data only, what `torch.load(weights_only=True)` accepts: numpy arrays become
    tensors, numpy scalars Python numbers, paths strings; anything else is a bug of the caller (TypeError)."""
    if obj is None or isinstance(obj, (str, bool, int, float, torch.Tensor, torch.Size)):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.array(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {k: plain_state(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [plain_state(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise TypeError(f"{where}: a checkpoint holds only tensors and plain data, not {type(obj).__name__}")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Atomic torch.save of `plain_state(state)`: what is saved is exactly what `load_checkpoint` accepts."""
    state = plain_state(state)
    with atomic_write(path, "wb") as f:
        torch.save(state, f)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *, kind: str | None = None,
                    needs: tuple[str, ...] = ()) -> dict[str, Any]:
    """A checkpoint's tensors and plain data; never unpickles anything else (no code from the file runs).
    `needs`: the keys the caller reads, so that a checkpoint of another `kind` is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise HepregError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln]
        first = lines[0].strip().rstrip(".") if lines else "not a weights-only file"
        raise HepregError(f"checkpoint {path} holds objects other than tensors and plain data ({first}); hepreg "
                          f"refuses to load it, since unpickling such objects can run code. Use a checkpoint "
                          f"written by hepreg, or rewrite this one as tensors and plain data where you trust "
                          f"its source") from None
    except Exception as e:  # a truncated or foreign file
        raise HepregError(f"checkpoint {path} cannot be read: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict):
        raise HepregError(f"checkpoint {path} holds a {type(state).__name__}, not a hepreg checkpoint (a dict)")
    missing = [k for k in needs if k not in state]
    if missing:
        raise HepregError(f"checkpoint {path} is not a {kind or 'suitable'} checkpoint: it lacks "
                          f"{', '.join(missing)}")
    return state


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
            with atomic_write(self.path) as f:
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
