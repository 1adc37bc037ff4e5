"""Large arrays reused from read to read instead of allocated afresh.

A streamed split reads a buffer of blocks, and their heads' inputs, of ~100 MB per array every few seconds.
Allocated afresh, such an array is mmap'd (glibc maps anything above 32 MB) and its first touch costs a page
fault per page, each page zeroed by the kernel, and more under a hypervisor that takes freed memory back:
on the 2-core VM of BENCHMARKS.md, reading 230 MB of stored inputs into fresh arrays took 0.2-5.6 s, into
reused ones 0.15-0.2 s. A pool hands out views of arrays it keeps, and hands an array out again once nothing
but the pool refers to it (no view of it is alive anywhere): its users never give anything back.
"""
from __future__ import annotations

import sys
import threading

import numpy as np

MIN_BYTES = 1 << 20  # smaller arrays come from malloc's heap, which keeps and reuses its memory anyway
GROWTH = 1.25  # a new array leaves room for a somewhat larger read next time


class BufferPool:
    """`empty(shape, dtype)` as numpy's, from arrays kept for reuse; safe to call from several threads."""

    def __init__(self) -> None:
        self._arrays: list[np.ndarray] = []  # uint8 arrays; each free when the list holds its only reference
        self._lock = threading.Lock()

    def empty(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes < MIN_BYTES:
            return np.empty(shape, dtype)
        with self._lock:
            free = [i for i in range(len(self._arrays)) if sys.getrefcount(self._arrays[i]) == 2]  # list + arg
            fits = [i for i in free if self._arrays[i].nbytes >= nbytes]
            if fits:
                base = self._arrays[min(fits, key=lambda i: self._arrays[i].nbytes)]
            else:
                if free:  # a free array too small for this read: replaced, so the pool does not only grow
                    del self._arrays[max(free, key=lambda i: self._arrays[i].nbytes)]
                base = np.empty(int(nbytes * GROWTH), np.uint8)
                self._arrays.append(base)
            return base[:nbytes].view(dtype).reshape(shape)

    @property
    def nbytes(self) -> int:
        """What the pool keeps, in use or not."""
        return sum(a.nbytes for a in self._arrays)
