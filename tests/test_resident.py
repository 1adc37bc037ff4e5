"""The device-resident loader against the Zarr loader: the same events, in the same batches, bit for bit."""
from __future__ import annotations

import pytest
import torch

from hepreg.cache.loader import CacheLoader
from hepreg.cache.resident import prefetch_to_device
from helpers import assert_same, random_flat, write_split


def _both(path, **kw) -> tuple[CacheLoader, CacheLoader]:
    zarr = CacheLoader(path, in_memory="no", **kw)
    held = CacheLoader(path, in_memory="yes", **kw)
    assert held.resident is not None and zarr.resident is None
    return zarr, held


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_resident_loader_yields_the_zarr_loaders_batches(tmp_path, shuffle, dtype):
    write_split(tmp_path / "s.zarr", random_flat(203, seed=21), world=2, block=16, dtype=dtype)
    for rank, world in ((0, 1), (1, 2)):
        zarr, held = _both(tmp_path / "s.zarr", batch_size=24, shuffle=shuffle, seed=5, shuffle_buffer=3,
                           rank=rank, world_size=world)
        for epoch in (0, 1):
            zarr.set_epoch(epoch), held.set_epoch(epoch)
            a, b = list(zarr), list(held)
            assert len(a) == len(b) == len(held)
            for x, y in zip(a, b):
                assert_same(x, y)
                assert y.embed.dtype == torch.float32 and y.match.dtype == torch.int64


def test_epoch_order_is_the_order_the_zarr_loader_reads(tmp_path):
    write_split(tmp_path / "s.zarr", random_flat(90, seed=22), block=8)
    loader = CacheLoader(tmp_path / "s.zarr", batch_size=7, shuffle=True, seed=2, shuffle_buffer=2, in_memory="no")
    loader.set_epoch(3)
    assert torch.cat([b.event_id for b in loader]).tolist() == loader.epoch_order().tolist()


def test_resident_batches_are_copies(tmp_path):
    flat = random_flat(40, seed=23)
    write_split(tmp_path / "s.zarr", flat, block=8)
    loader = CacheLoader(tmp_path / "s.zarr", batch_size=8, shuffle=False, in_memory="yes")
    for batch in loader:
        for name in batch.__dataclass_fields__:
            getattr(batch, name).zero_()
    zarr = CacheLoader(tmp_path / "s.zarr", batch_size=8, shuffle=False, in_memory="no")
    for x, y in zip(zarr, loader):
        assert_same(x, y)


def test_prefetch_passes_batches_and_errors_through(monkeypatch):
    import hepreg.cache.resident as resident

    monkeypatch.setattr(resident, "pinned", lambda b: b)  # pinning needs CUDA; the thread logic is the same
    flats = [random_flat(5, seed=s) for s in range(4)]
    out = list(prefetch_to_device(iter(flats), torch.device("cpu"), depth=1))
    assert len(out) == 4
    for x, y in zip(out, flats):
        assert_same(x, y)

    def failing():
        yield flats[0]
        raise ValueError("chunk 3 is corrupt")

    with pytest.raises(ValueError, match="chunk 3"):
        list(prefetch_to_device(failing(), torch.device("cpu")))
    early = prefetch_to_device(iter(flats * 5), torch.device("cpu"), depth=1)
    next(early)
    early.close()  # a consumer that stops early leaves no producer thread blocked on the queue
    import threading
    assert not any(t.name == "hepreg-prefetch" for t in threading.enumerate())


def test_resident_load_goes_through_the_checked_chunk_reads(tmp_path):
    from hepreg.errors import CacheError

    write_split(tmp_path / "s.zarr", random_flat(90, seed=24), block=16, hit_chunk=64)
    chunk = tmp_path / "s.zarr" / "part-0000" / "hits" / "raw" / "c" / "1" / "0"
    good = chunk.read_bytes()
    chunk.write_bytes(good[:20] + bytes(b ^ 0xFF for b in good[20:40]) + good[40:])
    with pytest.raises(CacheError, match="hits/raw"):
        CacheLoader(tmp_path / "s.zarr", batch_size=8, shuffle=False, in_memory="yes")
