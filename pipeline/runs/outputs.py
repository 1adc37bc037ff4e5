"""Stage output folders: never replaced silently, and each keeps the resolved config that made it.

A stage that would write over an earlier result (a checkpoint, metrics, evaluation) refuses unless it is told
`--overwrite` (start again) or `--resume` (continue them). Whatever the stage then writes, `config.yaml` beside it
says which settings made it. A stage calls `guard` once before any work (to refuse early) and again under its
`stage_lock`, with the run's `Replacement`, to set the earlier results aside.

`--overwrite` never deletes first: the earlier results (only the files hepreg writes, by name, or a directory
hepreg made) are moved aside, and removed only once the new run has written its first complete result (a
checkpoint, a cache split, an evaluation). A run that fails before that, for whatever reason (bad input found
late, a full disk, Ctrl-C), removes what it wrote and puts the earlier results back (`replacing`).
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from hepreg.settings import Config
from hepreg.errors import HepregError
from hepreg.runs.files import atomic_write, check_replaceable

CONFIG_FILE = "config.yaml"
TENSORBOARD_GLOB = "events.out.tfevents.*"
ASIDE = ".replaced"  # a folder's earlier results while --overwrite replaces them; `.<name>.replaced` for a directory


class OutputExistsError(HepregError):
    """A stage would replace results of an earlier run."""


def guard(folder: Path, results: tuple[str, ...], *, overwrite: bool, resume: bool = False,
          command: str, can_resume: bool = True, replacing: Replacement | None = None) -> bool:
    """Refuse, set aside or keep `folder`'s earlier results before a stage writes into it; returns whether it
    holds earlier results.

    `results` are the file names whose presence means an earlier run's results are there. With `overwrite` and a
    `replacing`, every file hepreg writes into such a folder is set aside into it (other files are left alone);
    without one nothing is touched yet (the early check, or a rank other than 0). With `resume` they are kept
    for the stage to continue.
    """
    if overwrite and resume:
        raise HepregError("--overwrite and --resume contradict each other: pass one of them")
    found = sorted(name for name in results if (folder / name).exists())
    if not found or resume:
        return bool(found)
    if overwrite:
        if replacing is not None:
            replacing.files(folder, results)
        return False
    hint = "--overwrite to replace them" + (", --resume to continue" if can_resume else "")
    shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    raise OutputExistsError(f"{folder} already holds results of an earlier `hepreg {command}` "
                            f"({shown}); pass {hint}, or use another run name (--set name=...)")


def written(folder: Path, results: tuple[str, ...]) -> list[Path]:
    """What hepreg wrote into `folder`: its result files, the config, TensorBoard logs, plots."""
    if not folder.is_dir():
        return []
    names = set(results) | {CONFIG_FILE, "learning_curves.png", "learning_curves.pdf"}
    return [path for path in folder.iterdir()
            if path.is_file() and (path.name in names or path.match(TENSORBOARD_GLOB))]


class Replacement:
    """What one `--overwrite` run replaces, set aside until its first complete result (`commit`), or put back
    when the run fails before it (`restore`). Several folders (a sweep's) or directories (cache splits) may
    be set aside in one run; `enabled` False (ranks other than 0) does nothing."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._folders: list[tuple[Path, tuple[str, ...]]] = []  # files set aside into folder/ASIDE
        self._dirs: list[Path] = []  # directories set aside whole, beside themselves

    @staticmethod
    def dir_aside(path: Path) -> Path:
        return path.with_name(f".{path.name}{ASIDE}")

    def files(self, folder: Path, results: tuple[str, ...]) -> None:
        """Move the files hepreg wrote into `folder` to `folder/.replaced`."""
        if not self.enabled:
            return
        aside = folder / ASIDE
        if aside.is_dir():  # left by a run killed before its first result: its files are the earlier results
            if any((folder / name).exists() for name in results):
                shutil.rmtree(aside)
            else:
                self._move_back(folder, aside, results)
        files = written(folder, results)
        if not files:
            return
        aside.mkdir()
        self._folders.append((folder, results))
        for path in files:
            os.replace(path, aside / path.name)

    def directory(self, path: Path, made_by_hepreg: Callable[[Path], str | None], what: str) -> None:
        """Move the directory `path` (only one hepreg made, see `check_replaceable`) to `.<name>.replaced`."""
        if not self.enabled:
            return
        check_replaceable(path, made_by_hepreg, what)
        aside = self.dir_aside(path)
        if aside.exists():  # left by a run killed before its first result
            if path.exists():
                shutil.rmtree(aside)
            else:
                os.replace(aside, path)
        if path.exists():
            os.replace(path, aside)
            self._dirs.append(path)

    def commit(self, path: Path | None = None) -> None:
        """The new results stand: remove what was set aside (only for `path`, a folder or directory, if given)."""
        for folder, results in [f for f in self._folders if path is None or f[0] == path]:
            shutil.rmtree(folder / ASIDE, ignore_errors=True)
            self._folders.remove((folder, results))
        for d in [d for d in self._dirs if path is None or d == path]:
            shutil.rmtree(self.dir_aside(d), ignore_errors=True)
            self._dirs.remove(d)

    def restore(self) -> None:
        """The new run failed before its first complete result: remove what it wrote, put the earlier back."""
        for folder, results in self._folders:
            self._move_back(folder, folder / ASIDE, results)
        for d in self._dirs:
            if d.exists():
                shutil.rmtree(d)
            os.replace(self.dir_aside(d), d)
        self._folders, self._dirs = [], []

    @staticmethod
    def _move_back(folder: Path, aside: Path, results: tuple[str, ...]) -> None:
        for path in written(folder, results):
            path.unlink()
        for path in aside.iterdir():
            os.replace(path, folder / path.name)
        aside.rmdir()


@contextmanager
def replacing(enabled: bool = True) -> Iterator[Replacement]:
    """A `Replacement` for one run: whatever it set aside is put back if the run raises (Ctrl-C included)
    before committing, and removed when the run ends without error."""
    r = Replacement(enabled)
    try:
        yield r
    except BaseException:
        r.restore()
        raise
    r.commit()


def write_config(folder: Path, cfg: Config) -> Path:
    """The resolved config that made the results in `folder`, readable by `hepreg ... -c`."""
    path = folder / CONFIG_FILE
    with atomic_write(path) as f:
        f.write(cfg.to_yaml())
    return path


def find_run_config(cfg: Config, stages: tuple[str, ...] = ("head", "assign")) -> Path | None:
    """The config an earlier stage of the run `cfg` names saved, if any (for a command given no `-c`)."""
    for stage in stages:
        path = cfg.run_path / stage / CONFIG_FILE
        if path.is_file():
            return path
    return None
