"""glibc allocator settings applied at start-up, so that `hepreg` run directly is as fast as under `make`.

The training loops allocate and free many same-sized tensors of a few hundred KB to a few MB per step. With
glibc's defaults, those above the (dynamic) mmap threshold are mmap'd and unmapped every step, and the heap
top is trimmed back to the OS after each free: page faults and system time (measured on 2 cores: 5x less
system time and ~50 % faster for the flat head with the settings below). The Makefile exports them as
`MALLOC_*` variables; `tune()` sets the same through `mallopt` for a process started any other way.

A setting the user gave as an environment variable is left as given; `HEPREG_MALLOPT=0` disables all of
them (the bench does that to measure the difference). Elsewhere than glibc (macOS, musl) nothing is done.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt parameter numbers from glibc's <malloc.h>
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
INT_MAX = 2**31 - 1  # mallopt takes an int: the Makefile's 64 GiB trim threshold becomes 2 GiB (never trim)
SETTINGS = {  # environment variable -> (mallopt parameter, value)
    "MALLOC_MMAP_THRESHOLD_": (M_MMAP_THRESHOLD, 32 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": (M_TRIM_THRESHOLD, INT_MAX),
    "MALLOC_TOP_PAD_": (M_TOP_PAD, 512 * 2**20),
}
# the same settings as environment variables, as the Makefile exports them (for child processes)
ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "68719476736",
       "MALLOC_TOP_PAD_": "536870912"}

_applied: dict[str, int] | None = None


def tune() -> dict[str, int]:
    """Apply the settings once per process; returns those applied by mallopt (empty where none were)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = {}
    if os.environ.get("HEPREG_MALLOPT", "1") == "0" or platform.system() != "Linux":
        return _applied
    if platform.libc_ver()[0] != "glibc":
        return _applied
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return _applied
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    for env, (param, value) in SETTINGS.items():
        if env in os.environ:  # the user's own choice (or the Makefile's) already took effect at exec
            continue
        if mallopt(param, value) == 1:
            _applied[env] = value
    return _applied
