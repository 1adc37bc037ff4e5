"""File rules every stage writes by: atomic writes, one writer per stage folder, and `--overwrite` that
replaces only what hepreg made. Free of torch, so the data layer uses them as well as the stages.
"""
from __future__ import annotations

import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from hepreg.errors import HepregError


class LockError(HepregError):
    """Another process is writing the same run stage."""


@contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open `path.tmp` for writing; on success fsync it and rename it over `path` (old or new, never half)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"newline": ""})) as f:  # text as written, no \r\n
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def taking_turns(path: str | Path) -> Iterator[None]:
    """Held by one process of this machine at a time, the others waiting (blocking flock on `path`): for work
    that processes started together must do one after the other, the first doing it (a study's tables, a
    store of head inputs), the later ones finding it done."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def stage_lock(directory: str | Path, name: str = ".lock", held: bool = True) -> Iterator[Path | None]:
    """Hold `directory/<name>` while a stage writes into `directory`; a second writer gets a LockError naming
    the holder's PID.

    The lock is an flock on a file holding the PID: the kernel releases it when its holder dies, so the lock
    of a killed run (its PID dead) is simply taken over. `held=False` takes no lock (torchrun ranks other
    than 0, whose rank 0 holds it).
    """
    if not held:
        yield None
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockError(f"{directory} is being written by another hepreg process (PID {holder}, lock "
                            f"{path}); wait for it to finish or stop it, then run this command again") from None
        try:  # the file may have been unlinked by its previous holder between our open and flock
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)



def check_replaceable(path: str | Path, made_by_hepreg: Callable[[Path], str | None], what: str) -> None:
    """Refuse to `--overwrite` what hepreg did not make: `made_by_hepreg(path)` returns None for a directory
    hepreg wrote and recognises (holding nothing else), else the reason it is not one. A missing path is fine."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    reason = "it is not a directory" if path.is_symlink() or not path.is_dir() else made_by_hepreg(path)
    if reason:
        raise HepregError(f"--overwrite replaces only {what} that hepreg made, and {path} is not one ({reason}); "
                          f"nothing was deleted. Choose another path, or remove it yourself")


def check_output_file(path: Path, overwrite: bool, made_by_hepreg: Callable[[Path], bool], what: str) -> None:
    """An output file that exists is replaced only with `--overwrite`, and only if hepreg wrote it."""
    if path.exists() and not overwrite:
        raise HepregError(f"{path} exists; pass --overwrite to replace it, or --out another file")
    if path.exists() and not made_by_hepreg(path):
        raise HepregError(f"{path} is not {what}; --overwrite replaces only those, so remove it yourself or "
                          f"choose another --out")


def replace_dir(path: str | Path, made_by_hepreg: Callable[[Path], str | None], what: str) -> None:
    """Delete the directory `path` for `--overwrite`, only after `check_replaceable` passes."""
    check_replaceable(path, made_by_hepreg, what)
    if Path(path).exists():
        shutil.rmtree(path)
