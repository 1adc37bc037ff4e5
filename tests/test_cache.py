"""The Zarr cache on random flat batches: round trip, resume, parts, refusal, verify, loader shuffling."""
from __future__ import annotations

import pytest
import torch

from hepreg.cache import store
from hepreg.cache.inspect import info, verify
from hepreg.cache.loader import CacheLoader, open_cache
from hepreg.cache.writer import PartWriter
from hepreg.errors import CacheError
from hepreg.flat import Block, FlatBatch
from helpers import D, assert_same, random_flat, whole_split, write_split


def test_round_trip_float32_exact(tmp_path):
    flat = random_flat(70, seed=1)
    record = write_split(tmp_path / "train.zarr", flat)
    assert record["events"] == 70 and record["hits_kept"] == int(flat.offsets[-1])
    assert_same(whole_split(open_cache(tmp_path / "train.zarr")), flat)


def test_round_trip_float16_embeddings(tmp_path):
    flat = random_flat(40, seed=2)
    write_split(tmp_path / "s.zarr", flat, dtype="float16")
    back = whole_split(open_cache(tmp_path / "s.zarr"))
    assert torch.equal(back.embed, flat.embed.half().float())
    assert torch.equal(back.query_embed, flat.query_embed.half().float())
    assert torch.equal(back.logit, flat.logit) and torch.equal(back.raw, flat.raw)


def concat_batches(batches: list[FlatBatch]) -> FlatBatch:
    return Block.concat([Block.from_flat(b) for b in batches]).to_flat()


def test_block_concat_rebases_offsets():
    flat = random_flat(30, seed=3)
    assert_same(concat_batches([flat.slice(0, 7), flat.slice(7, 30)]), flat)


def test_buffer_pool_reuses_an_array_only_once_nothing_refers_to_it():
    """A streamed group's arrays come from a pool: an array is handed out again only when no view of it (numpy or
    torch) is alive, so a batch still reading a group never sees the next group's numbers."""
    import numpy as np
    from hepreg.cache.buffers import MIN_BYTES, BufferPool

    pool = BufferPool()
    n = MIN_BYTES // 4
    a = pool.empty((n,), np.float32)
    a[:] = 1.0
    t = torch.from_numpy(a[10:20])  # a view of a view, held by a tensor
    del a
    b = pool.empty((n // 2, 2), np.float32)  # `a`'s array is still referred to: another one
    assert len(pool._arrays) == 2 and float(t.sum()) == 10.0
    del t, b
    c = pool.empty((n // 2,), np.int64)  # both free again: one of them is reused, as int64
    assert len(pool._arrays) == 2 and c.shape == (n // 2,) and c.dtype == np.int64
    big = pool.empty((2 * n,), np.float32)  # larger than any: the free array too small is replaced
    assert len(pool._arrays) == 2 and big.nbytes == 2 * n * 4 and not np.shares_memory(big, c)
    assert pool.empty((4,), np.float32).base is None  # a small array is numpy's own, not the pool's


def test_interrupted_then_resumed_is_identical(tmp_path):
    flat = random_flat(100, seed=4)
    write_split(tmp_path / "ref.zarr", flat)
    with pytest.raises(KeyboardInterrupt):
        write_split(tmp_path / "s.zarr", flat, fail_after=3)
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(tmp_path / "s.zarr")
    # a half-written next block: hits grown past the recorded progress, as a kill mid-block leaves them
    w = PartWriter.open(tmp_path / "s.zarr", 0)
    w.arrays["hits/embed"].resize((w.progress["hits_done"] + 5, D))
    write_split(tmp_path / "s.zarr", flat)
    assert_same(whole_split(open_cache(tmp_path / "s.zarr")), flat)
    for f in (tmp_path / "ref.zarr").rglob("c/*"):  # every chunk file byte-identical
        if f.is_file():
            assert f.read_bytes() == (tmp_path / "s.zarr" / f.relative_to(tmp_path / "ref.zarr")).read_bytes(), f


def test_complete_split_refuses_second_export(tmp_path):
    flat = random_flat(20, seed=5)
    write_split(tmp_path / "s.zarr", flat)
    with pytest.raises(CacheError, match="--overwrite"):
        write_split(tmp_path / "s.zarr", flat)


def test_resume_with_other_settings_refused(tmp_path):
    flat = random_flat(50, seed=5)
    with pytest.raises(KeyboardInterrupt):
        write_split(tmp_path / "s.zarr", flat, fail_after=1)
    with pytest.raises(CacheError, match="prune_threshold"):
        write_split(tmp_path / "s.zarr", flat, prune=0.1)


def test_two_parts_read_as_one(tmp_path):
    flat = random_flat(90, seed=6)
    write_split(tmp_path / "s.zarr", flat, world=2)
    split = open_cache(tmp_path / "s.zarr")
    assert len(split.parts) == 2
    assert_same(whole_split(split), flat)
    assert_same(split.read(40, 50).to_flat(), flat.slice(40, 50))  # across the part boundary


def test_stale_checkpoint_and_low_threshold_refused(tmp_path):
    write_split(tmp_path / "s.zarr", random_flat(10, seed=7), checkpoint="a" * 64, prune=0.1)
    with pytest.raises(CacheError, match=r"aaaaaaaaaaaa.*bbbb"):
        open_cache(tmp_path / "s.zarr", expect_checkpoint="b" * 64)
    ckpt = tmp_path / "other.pt"
    ckpt.write_bytes(b"not the checkpoint")
    with pytest.raises(CacheError, match="other.pt"):
        CacheLoader(tmp_path / "s.zarr", batch_size=4, shuffle=False, expect_checkpoint=ckpt)
    with pytest.raises(CacheError, match="0.05"):
        open_cache(tmp_path / "s.zarr", min_threshold=0.05)
    assert open_cache(tmp_path / "s.zarr", expect_checkpoint="a" * 64, min_threshold=0.2).num_events == 10


@pytest.mark.parametrize("in_memory", ["yes", "no"])
def test_loader_shuffle_deterministic_and_covers_every_event(tmp_path, in_memory):
    flat = random_flat(203, seed=8)
    write_split(tmp_path / "s.zarr", flat, world=2, block=16)
    ids = {}
    for epoch in (0, 1):
        runs = []
        for _ in range(2):
            loader = CacheLoader(tmp_path / "s.zarr", batch_size=32, shuffle=True, seed=3, in_memory=in_memory,
                                 shuffle_buffer=3)
            loader.set_epoch(epoch)
            batches = list(loader)
            assert len(batches) == len(loader)
            assert all(b.size == 32 for b in batches[:-1])
            runs.append(torch.cat([b.event_id for b in batches]))
        assert torch.equal(runs[0], runs[1])  # same (seed, epoch), same order
        assert sorted(runs[0].tolist()) == list(range(203))
        ids[epoch] = runs[0]
    assert not torch.equal(ids[0], ids[1])
    assert not torch.equal(ids[0], torch.arange(203))


def test_loader_batches_carry_their_own_events(tmp_path):
    flat = random_flat(64, seed=9)
    write_split(tmp_path / "s.zarr", flat, block=16)
    for b in CacheLoader(tmp_path / "s.zarr", batch_size=10, shuffle=True, in_memory="no"):
        for i, eid in enumerate(b.event_id.tolist()):
            ref = flat.slice(eid, eid + 1)
            assert torch.equal(b.embed[b.offsets[i]:b.offsets[i + 1]], ref.embed)
            assert torch.equal(b.query_embed[i], ref.query_embed[0])


def test_loader_two_ranks_disjoint_and_complete(tmp_path):
    write_split(tmp_path / "s.zarr", random_flat(150, seed=10), block=16)
    seen = []
    for rank in (0, 1):
        loader = CacheLoader(tmp_path / "s.zarr", batch_size=20, shuffle=True, seed=1, rank=rank, world_size=2,
                             in_memory="no")
        loader.set_epoch(4)
        seen.append(torch.cat([b.event_id for b in loader]).tolist())
    assert abs(len(seen[0]) - len(seen[1])) <= 1
    assert sorted(seen[0] + seen[1]) == list(range(150))


def test_unshuffled_loader_in_order(tmp_path):
    flat = random_flat(45, seed=11)
    write_split(tmp_path / "s.zarr", flat, world=2, block=8)
    loader = CacheLoader(tmp_path / "s.zarr", batch_size=16, shuffle=False, in_memory="no")
    assert_same(concat_batches(list(loader)), flat)


def test_info_and_verify_clean(tmp_path):
    write_split(tmp_path / "train.zarr", random_flat(60, seed=12), world=2)
    write_split(tmp_path / "val.zarr", random_flat(20, seed=13), dtype="float16")
    rows = info(tmp_path)
    assert [r["split"] for r in rows] == ["train", "val"] and all(r["complete"] for r in rows)
    assert rows[0]["disk_bytes"] > 0 and rows[1]["dtype"] == "float16"
    assert [r["events"] for r in verify(tmp_path)] == [60, 20]


def test_verify_catches_corrupted_chunk(tmp_path):
    write_split(tmp_path / "s.zarr", random_flat(60, seed=14))
    chunk = tmp_path / "s.zarr" / "part-0000" / "hits" / "raw" / "c" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[20:40] = bytes(20)
    chunk.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"part-0000/hits/raw chunk 1\.0"):
        verify(tmp_path / "s.zarr")


def test_verify_catches_truncated_chunk_file_and_array(tmp_path):
    write_split(tmp_path / "s.zarr", random_flat(60, seed=15))
    chunk = tmp_path / "s.zarr" / "part-0000" / "events" / "track_logit" / "c" / "2" / "0"
    chunk.write_bytes(chunk.read_bytes()[:10])
    with pytest.raises(CacheError, match=r"events/track_logit chunk 2\.0"):
        verify(tmp_path / "s.zarr")

    write_split(tmp_path / "t.zarr", random_flat(60, seed=15))
    embed = store.open_part(tmp_path / "t.zarr", 0, mode="a")["hits/embed"]
    embed.resize((embed.shape[0] - 3, D))
    with pytest.raises(CacheError, match=r"hits/embed has \d+ rows"):
        verify(tmp_path / "t.zarr")


def test_verify_catches_missing_chunk_and_bad_offsets(tmp_path):
    write_split(tmp_path / "s.zarr", random_flat(60, seed=16))
    (tmp_path / "s.zarr" / "part-0000" / "targets" / "pt" / "c" / "1" / "0").unlink()
    with pytest.raises(CacheError, match=r"targets/pt chunk 1\.0 is missing"):
        verify(tmp_path / "s.zarr")

    write_split(tmp_path / "t.zarr", random_flat(60, seed=16))
    off = store.open_part(tmp_path / "t.zarr", 0, mode="a")["events/hit_offsets"]
    off[30] = 10_000
    with pytest.raises(CacheError, match="hit_offsets decreases at event 30"):
        verify(tmp_path / "t.zarr")


def test_verify_catches_missing_array_and_incomplete_split(tmp_path):
    import shutil

    write_split(tmp_path / "s.zarr", random_flat(30, seed=17))
    shutil.rmtree(tmp_path / "s.zarr" / "part-0000" / "events" / "match")
    with pytest.raises(CacheError, match="lacks the array events/match"):
        verify(tmp_path / "s.zarr")
    with pytest.raises(KeyboardInterrupt):
        write_split(tmp_path / "t.zarr", random_flat(60, seed=17), fail_after=2)
    assert not info(tmp_path / "t.zarr")[0]["complete"]
    with pytest.raises(CacheError, match="incomplete"):
        verify(tmp_path / "t.zarr")


def test_empty_parts_and_tiny_splits(tmp_path):
    flat = random_flat(2, seed=18)
    write_split(tmp_path / "s.zarr", flat, world=3)  # the last part holds no events
    assert_same(whole_split(open_cache(tmp_path / "s.zarr")), flat)
    assert verify(tmp_path / "s.zarr")[0]["events"] == 2
    batches = list(CacheLoader(tmp_path / "s.zarr", batch_size=4, shuffle=True, rank=1, world_size=2))
    assert [b.event_id.tolist() for b in batches] in ([[0]], [[1]])


def test_batches_are_copies_of_a_split_in_memory(tmp_path):
    flat = random_flat(40, seed=19)
    write_split(tmp_path / "s.zarr", flat, block=8)
    loader = CacheLoader(tmp_path / "s.zarr", batch_size=8, shuffle=False, in_memory="yes", shuffle_buffer=1)
    assert loader.in_memory
    for batch in loader:
        batch.raw.zero_()
        batch.offsets.zero_()
    assert_same(concat_batches(list(loader)), flat)


def test_load_in_small_slices_equals_direct_read(tmp_path):
    flat = random_flat(77, seed=20)
    write_split(tmp_path / "s.zarr", flat, world=2, block=16)
    split = open_cache(tmp_path / "s.zarr")
    split.load(slice_events=10)
    assert_same(whole_split(split), flat)
    assert_same(split.read(30, 50).to_flat(), flat.slice(30, 50))
