import numpy as np
import pytest
import torch

from hepreg.data.batching import HitLoader
from hepreg.data.reader import open_dataset
from hepreg.errors import DataError


@pytest.fixture(scope="module")
def ds(tiny_dataset):
    return open_dataset(tiny_dataset)


def test_every_event_once_per_epoch_across_two_ranks(ds):
    loaders = [HitLoader(ds, 10, 290, batch_size=16, shuffle=True, seed=3, bucket_window=4, rank=r,
                         world_size=2, block_events=64) for r in range(2)]
    assert len(loaders[0]) == len(loaders[1]) == 9  # ceil(140 / 16), same on both ranks
    for epoch in range(2):
        seen = []
        for loader in loaders:
            loader.set_epoch(epoch)
            batches = list(loader)
            assert len(batches) == len(loader)
            assert all(0 < b.size <= 16 for b in batches)
            seen.append(torch.cat([b.index for b in batches]).numpy())
        assert not set(seen[0]) & set(seen[1])  # disjoint shares
        assert sorted(np.concatenate(seen).tolist()) == list(range(10, 290))


def test_uneven_shares_still_give_equal_batch_counts(ds):
    counts = [len(list(HitLoader(ds, 0, 301 - 2, batch_size=50, shuffle=False, rank=r, world_size=3)))
              for r in range(3)]
    assert counts == [2, 2, 2]


def test_deterministic_per_seed_and_epoch(ds):
    def order(seed, epoch):
        loader = HitLoader(ds, 0, 300, batch_size=20, shuffle=True, seed=seed, bucket_window=4, block_events=100)
        loader.set_epoch(epoch)
        return [b.index.tolist() for b in loader]
    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)
    assert order(1, 0) != order(2, 0)
    unshuffled = HitLoader(ds, 0, 300, batch_size=20, shuffle=False, bucket_window=4)
    first = [b.index.tolist() for b in unshuffled]
    unshuffled.set_epoch(5)
    assert first == [b.index.tolist() for b in unshuffled]


def test_bucketing_groups_similar_hit_counts(ds):
    counts = ds.hit_counts
    loader = HitLoader(ds, 0, 300, batch_size=10, shuffle=True, seed=0, bucket_window=30, block_events=300)
    padded = real = 0
    for b in loader:
        nh = counts[b.index.numpy()]
        assert b.hits.shape[1] == nh.max()  # padded only to this batch's largest event
        padded += b.hits.shape[0] * b.hits.shape[1]
        real += nh.sum()
    # one window over all 300 events: sorted, so batches hold neighbouring hit counts
    rng = np.random.default_rng(0)
    random_batches = np.split(rng.permutation(300), 30)
    random_padded = sum(10 * counts[i].max() for i in random_batches)
    assert real / padded > 0.9 and padded < 0.8 * random_padded


def test_batch_contents_match_the_reader(ds):
    loader = HitLoader(ds, 0, 300, batch_size=32, shuffle=True, seed=5, bucket_window=2, block_events=70)
    batch = next(iter(loader))
    for row, e in enumerate(batch.index.tolist()):
        ref = ds.read(e, e + 1)
        n = int(ref.num_hits[0])
        assert batch.hit_valid[row].sum() == n
        assert torch.equal(batch.hits[row, :n], torch.from_numpy(ref.hits[0, :n]))
        assert (batch.hits[row, n:] == 0).all()
        assert torch.equal(batch.truth_link[row, :n], torch.from_numpy(ref.truth_link[0, :n]))
        assert torch.equal(batch.targets[row], torch.from_numpy(ref.targets[0]))
        assert batch.event_id[row] == ref.event_id[0]
        for p in range(ds.max_tracks):
            expect = (batch.truth_link[row] == p) & batch.hit_valid[row]
            assert torch.equal(batch.particle_hit_valid[row, p], expect)
            assert batch.particle_valid[row, p] == (p < int(ref.particle_valid[0].sum()))
    assert batch.hits.dtype == torch.float32 and batch.truth_link.dtype == torch.long


def test_empty_range_yields_nothing(ds):
    loader = HitLoader(ds, 5, 5, batch_size=8, shuffle=True)
    assert len(loader) == 0 and list(loader) == []


def test_bad_arguments(ds):
    with pytest.raises(DataError, match="batch_by"):
        HitLoader(ds, 0, 10, batch_size=8, shuffle=False, batch_by="tokens")
    with pytest.raises(DataError, match="outside"):
        HitLoader(ds, 0, 301, batch_size=8, shuffle=False)
    with pytest.raises(DataError, match="non-empty batches"):
        HitLoader(ds, 0, 3, batch_size=1, shuffle=False, rank=0, world_size=2)


def test_batches_by_hits_keep_every_event_and_the_batch_count(ds):
    """batch_by="hits": the same batches per window (and per rank), each event once, less padding."""
    counts = ds.hit_counts
    by = {}
    for mode in ("events", "hits"):
        loaders = [HitLoader(ds, 10, 290, batch_size=16, shuffle=True, seed=3, bucket_window=4, rank=r,
                             world_size=2, block_events=64, batch_by=mode) for r in range(2)]
        batches = [list(loader) for loader in loaders]
        assert [len(b) for b in batches] == [len(loaders[0])] * 2 == [9, 9]
        seen = np.concatenate([b.index.numpy() for rank in batches for b in rank])
        assert sorted(seen.tolist()) == list(range(10, 290))
        flat = [b for rank in batches for b in rank]
        assert all(b.hits.shape[1] == counts[b.index.numpy()].max() for b in flat)
        by[mode] = flat
    cells = {mode: sum(b.size * b.hits.shape[1] ** 2 for b in flat) for mode, flat in by.items()}
    assert cells["hits"] < cells["events"]  # attention's padded cells
    hits = np.array([int(b.hit_valid.sum()) for b in by["hits"]])
    events = np.array([b.size for b in by["hits"]])
    assert events.max() > 16 and hits.std() < np.array([int(b.hit_valid.sum()) for b in by["events"]]).std()


def test_equal_hit_cuts_give_non_empty_runs():
    from hepreg.data.batching import equal_hit_cuts

    counts = np.sort(np.array([1, 1, 1, 2, 600, 600, 600, 601]))
    for parts in range(1, len(counts) + 1):
        runs = np.split(counts, equal_hit_cuts(counts, parts))
        assert len(runs) == parts and all(len(r) for r in runs)
    runs = np.split(np.full(100, 5), equal_hit_cuts(np.full(100, 5), 4))
    assert [len(r) for r in runs] == [25, 25, 25, 25]
