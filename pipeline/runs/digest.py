"""sha256 of files, with the standard library only: the reader, the cache and the frozen model all record
provenance this way, and none of them should pull in torch or the run directory to do it."""
from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
