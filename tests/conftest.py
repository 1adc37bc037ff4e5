import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HEPREG_NO_PROGRESS", "1")
# One thread per process, here and in every process a test starts (they inherit the environment): the tests'
# tensors are tiny, and two processes with two spinning threads each crawl on a 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and spinning threads crawl on a shared machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one); `make gpu-check` runs them")


def pytest_collection_modifyitems(config, items):
    """The tests marked slow first, then those whose module shares one trained run (`xdist_group`): `make test`
    hands the workers their tests in this order, so the long ones start at once and the short ones fill in
    behind them, and no worker is left running a long test alone at the end."""
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None,
                                 item.get_closest_marker("xdist_group") is None))


def truthless_copy(src: Path, dst: Path, how: str) -> Path:
    """A copy of dataset `src` without truth: `no_link` drops the spacePoint_truthLink column, `no_tracks`
    deletes the `tracks` and `num_tracks` datasets, `empty_tracks` leaves `tracks` with no track slots."""
    import shutil

    import h5py
    import yaml

    shutil.copytree(src, dst)
    meta = yaml.safe_load((dst / "metadata.yaml").read_text())
    link = meta["hit_features"].index("spacePoint_truthLink")
    for f in sorted(dst.glob("*.h5")):
        with h5py.File(f, "r+") as h:
            if how == "no_link":
                hits = np.delete(h["hits"][:], link, axis=-1)
                del h["hits"]
                h.create_dataset("hits", data=hits, compression="gzip")
            elif how == "no_tracks":
                del h["tracks"], h["num_tracks"]
            elif how == "empty_tracks":
                n = h["tracks"].shape[0]
                del h["tracks"]
                h["tracks"] = np.zeros((n, 0, len(meta["track_features"])), np.float32)
                h["num_tracks"][:] = 0
            else:
                raise ValueError(how)
    if how == "no_link":
        meta["hit_features"].remove("spacePoint_truthLink")
    if how == "no_tracks":
        meta.pop("track_features")
    (dst / "metadata.yaml").write_text(yaml.safe_dump(meta))
    return dst
