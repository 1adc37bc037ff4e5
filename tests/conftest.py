import os
from pathlib import Path

import pytest

os.environ.setdefault("HEPREG_NO_PROGRESS", "1")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    """Tests that name configs/… resolve them from the repo root."""
    monkeypatch.chdir(ROOT)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A 300-event synthetic dataset (default geometry, 30 background hits on average) in 2 chunk files."""
    from hepreg.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("data") / "tiny", events=300, seed=7, noise_mean=30.0,
                    events_per_file=150)
