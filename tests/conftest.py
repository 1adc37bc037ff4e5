import os
from pathlib import Path

import pytest

os.environ.setdefault("HEPREG_NO_PROGRESS", "1")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    """Tests that name configs/… resolve them from the repo root."""
    monkeypatch.chdir(ROOT)
