"""How `hepreg bench` runs a step: in a process of its own, forked from one that has imported torch once.

Each step is measured in its own process, so that its peak memory is its own and no step warms another's
caches. A process started afresh first spends ~4 s of CPU importing torch, hepreg and `torch._dynamo` (which
torch's optimisers import on first use); on the quick bench's smoke sizes that was half of every step. So the
steps are forks of a forkserver that imported them once and ran nothing: the imported modules are shared,
the child's peak RSS still counts them (as an exec'd process's would), and nothing the bench itself computed
is inherited. A step whose allocator settings are the Makefile's MALLOC_* variables is exec'd instead: glibc
reads them only when a program starts.
"""
from __future__ import annotations

import multiprocessing
import os
import resource
import runpy
import subprocess
import sys
import time
from pathlib import Path

from hepreg.errors import HepregError
from hepreg.runs.allocator import ENV as MALLOC_ENV

PRELOAD = ["hepreg.cli", "torch._dynamo"]  # what every step imports
_forkserver: multiprocessing.context.ForkServerContext | None = None


def env(allocator: str = "mallopt") -> dict[str, str]:
    """The environment of a step: what a user's shell gives `hepreg`, without the Makefile's MALLOC_*
    variables unless `allocator` is "makefile"."""
    out = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV and k != "HEPREG_MALLOPT"}
    out["HEPREG_NO_PROGRESS"] = "1"
    out.setdefault("PYTHONUNBUFFERED", "1")
    if allocator == "makefile":
        out.update(MALLOC_ENV)
    elif allocator == "none":
        out["HEPREG_MALLOPT"] = "0"
    return out


def hepreg(*args: str | Path) -> list[str]:
    """A step that runs the `hepreg` command line."""
    return [sys.executable, "-m", "hepreg", *map(str, args)]


def python(code: str) -> list[str]:
    """A step that runs Python code."""
    return [sys.executable, "-c", code]


def run_process(cmd: list[str], log: Path, allocator: str = "mallopt") -> tuple[float, int]:
    """Run one step (`hepreg(...)` or `python(...)`) to completion, its output in `log`; returns (wall seconds,
    peak RSS in bytes of that process alone)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    if allocator == "makefile":
        wall, status, rss = _exec(cmd, log, allocator)
    else:
        wall, status, rss = _fork(cmd, log, allocator)
    if status != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise HepregError(f"bench step `{' '.join(cmd[2:])}` failed with exit code {status}; log {log}:\n{tail}")
    return wall, rss


def _exec(cmd: list[str], log: Path, allocator: str) -> tuple[float, int, int]:
    with open(log, "w") as f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env(allocator))
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    return wall, os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024  # Linux reports kilobytes


def _server() -> multiprocessing.context.ForkServerContext:
    """The forkserver, started once with a step's environment (not the bench's MALLOC_* variables)."""
    global _forkserver
    if _forkserver is None:
        from multiprocessing import forkserver

        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(env())
        try:
            forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        _forkserver = ctx
    return _forkserver


def _fork(cmd: list[str], log: Path, allocator: str) -> tuple[float, int, int]:
    rss_file = log.with_suffix(".rss")
    rss_file.unlink(missing_ok=True)
    proc = _server().Process(target=_step, args=(cmd[1:], str(log), env(allocator), str(rss_file)), daemon=False)
    t0 = time.perf_counter()
    proc.start()
    proc.join()
    wall = time.perf_counter() - t0
    rss = int(rss_file.read_text()) * 1024 if rss_file.is_file() else 0
    rss_file.unlink(missing_ok=True)
    return wall, proc.exitcode, rss


def _step(argv: list[str], log: str, step_env: dict[str, str], rss_file: str) -> None:
    """In the forked child: the step's environment, output into `log`, then `hepreg …` or `python -c …`."""
    os.environ.clear()
    os.environ.update(step_env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)
    from hepreg.runs.allocator import tune

    tune()  # as `hepreg` does at start-up (and `python -c` steps do not): the heap settings every step measures with
    try:
        if argv[:2] == ["-m", "hepreg"]:  # as `python -m hepreg` runs it
            sys.argv = ["hepreg", *argv[2:]]
            runpy.run_module("hepreg", run_name="__main__", alter_sys=True)
        elif argv[0] == "-c":
            sys.argv = ["-c"]
            exec(compile(argv[1], "<bench step>", "exec"), {"__name__": "__main__"})
        else:
            raise HepregError(f"a bench step runs `hepreg` or `python -c`, not {argv!r}")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        Path(rss_file).write_text(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
