"""Stage output folders: never replaced silently, and each keeps the resolved config that made it.

A stage that would write over an earlier result (a checkpoint, metrics, evaluation) refuses unless it is told
`--overwrite` (start again: the earlier files are removed, only those hepreg writes, by name) or `--resume`
(continue them). Whatever the stage then writes, `config.yaml` beside it says which settings made it. A stage
calls `guard` once before any work (to refuse early) and again under its `stage_lock` (to clear).
"""
from __future__ import annotations

from pathlib import Path

from hepreg.config import Config
from hepreg.errors import HepregError
from hepreg.runs.files import atomic_write

CONFIG_FILE = "config.yaml"
TENSORBOARD_GLOB = "events.out.tfevents.*"


class OutputExistsError(HepregError):
    """A stage would replace results of an earlier run."""


def guard(folder: Path, results: tuple[str, ...], *, overwrite: bool, resume: bool = False,
          command: str, can_resume: bool = True, clear_files: bool = True) -> bool:
    """Refuse, clear or keep `folder` before a stage writes into it; returns whether it holds earlier results.

    `results` are the file names whose presence means an earlier run's results are there. With `overwrite`
    every file hepreg writes into such a folder is removed first (other files are left alone); with `resume`
    they are kept for the stage to continue. `clear_files` False leaves the removal to another process
    (rank 0 of a distributed run).
    """
    if overwrite and resume:
        raise HepregError("--overwrite and --resume contradict each other: pass one of them")
    found = sorted(name for name in results if (folder / name).exists())
    if not found or resume:
        return bool(found)
    if overwrite:
        if clear_files:
            clear(folder, results)
        return False
    hint = "--overwrite to replace them" + (", --resume to continue" if can_resume else "")
    shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    raise OutputExistsError(f"{folder} already holds results of an earlier `hepreg {command}` "
                            f"({shown}); pass {hint}, or use another run name (--set name=...)")


def clear(folder: Path, results: tuple[str, ...]) -> None:
    """Remove what hepreg wrote into `folder`: its result files, the config, TensorBoard logs, plots."""
    if not folder.is_dir():
        return
    names = set(results) | {CONFIG_FILE, "learning_curves.png", "learning_curves.pdf"}
    for path in folder.iterdir():
        if path.is_file() and (path.name in names or path.match(TENSORBOARD_GLOB)):
            path.unlink()


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
