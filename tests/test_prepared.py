"""Head inputs prepared once per held split against those computed batch by batch."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hepreg.cache.loader import CacheLoader
from hepreg.data.reader import open_dataset
from hepreg.data.synthetic import generate
from hepreg.errors import CacheError
from hepreg.flat import FlatBatch
from hepreg.models.track_inputs import feature_names
from hepreg.models.tracks import from_flat
from hepreg.models.track_inputs import InputSpec, prepare
from hepreg.prepared import PreparedInputs, estimated_bytes
from helpers import hit_rows, write_split

N, D = 2, 8


def truthlike_split(tmp_path, events: int = 240):
    """Synthetic events whose 'stage 1' gives each muon's hits to its own query (p ~ 0.98, noise hits ~ 0.02,
    a few hits shared), so that the track frame and the fit proxy see real tracks."""
    ds = open_dataset(generate(tmp_path / "data", events=events, seed=3, preset="light"))
    b = ds.read(0, events)
    rng = np.random.default_rng(0)
    keep = b.hit_valid  # [E, M]
    logit = np.where(b.truth_link[..., None] == np.arange(N), 4.0, -4.0) + rng.normal(0, 1, (*keep.shape, N))
    counts = keep.sum(1)
    offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(counts)]))
    H = int(offsets[-1])
    g = torch.Generator().manual_seed(1)
    match = torch.tensor(np.where(b.particle_valid[:, :N], np.arange(N), -1))
    flat = FlatBatch(raw=torch.from_numpy(b.hits[keep]), embed=torch.randn(H, D, generator=g),
                     logit=torch.from_numpy(logit[keep].astype(np.float32)), offsets=offsets,
                     query_embed=torch.randn(events, N, D, generator=g), track_logit=torch.zeros(events, N),
                     match=match, targets=torch.from_numpy(b.targets[:, :N]),
                     target_valid=torch.from_numpy(b.particle_valid[:, :N]),
                     event_id=torch.arange(100, 100 + events), hit_index=hit_rows(offsets))
    write_split(tmp_path / "s.zarr", flat, block=32)
    return tmp_path / "s.zarr"


@pytest.mark.parametrize("key", [InputSpec(threshold=0.1, track_frame=True, fit_proxy=True),
                                 InputSpec(threshold=0.1, track_frame=False, fit_proxy=False),
                                 InputSpec(threshold=0.5, track_frame=True, fit_proxy=False)])
def test_prepared_inputs_equal_the_batch_by_batch_ones(tmp_path, key):
    loader = CacheLoader(truthlike_split(tmp_path), batch_size=40, shuffle=True, seed=3, in_memory="yes")
    prepared = PreparedInputs.held(loader.resident, key, chunk_events=64)
    assert 0.8 < prepared.nbytes / estimated_bytes(loader.resident, key) < 1.25
    fitted = 0
    for batch in loader:
        mine = prepared.inputs(batch)
        ref = prepare(from_flat(batch.raw, batch.embed, batch.logit, batch.offsets, batch.query_embed, key.threshold),
                      key.track_frame, key.fit_proxy)
        # the same buckets: the same slots in the same order, at the same widths
        assert [r.tolist() for r in mine.tracks.rows] == [r.tolist() for r in ref.tracks.rows]
        assert [b.tracks.mask.shape for b in mine.buckets] == [b.tracks.mask.shape for b in ref.buckets]
        a, b = mine.dense(), ref.dense()
        for name in ("mask", "embed", "query_embed"):
            assert torch.equal(getattr(a.tracks, name), getattr(b.tracks, name)), name
        torch.testing.assert_close(a.tracks.prob, b.tracks.prob, rtol=1e-6, atol=0)  # a vectorised sigmoid's last bit
        # v (mm across the track) is a float32 difference of two ~10 m products: ~0.01 mm is its last bit
        torch.testing.assert_close(a.hit_features, b.hit_features, rtol=1e-4, atol=1e-2)
        torch.testing.assert_close(a.track_features, b.track_features, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.reference, b.reference, rtol=1e-5, atol=1e-6)
        if key.fit_proxy:
            fitted += int(b.track_features[:, feature_names(key.track_frame, True)[1].index("fit_ok")].sum())
    assert not key.fit_proxy or fitted > 100  # the fit proxy ran on real tracks, not only on empty slots


def test_a_batch_of_another_split_is_refused(tmp_path):
    loader = CacheLoader(truthlike_split(tmp_path, events=60), batch_size=20, shuffle=False, in_memory="yes")
    prepared = PreparedInputs.held(loader.resident, InputSpec(threshold=0.1, track_frame=True, fit_proxy=False))
    batch = next(iter(loader))
    batch.event_id = batch.event_id + 1000
    with pytest.raises(CacheError, match="not in the split"):
        prepared.inputs(batch)


def test_prepared_inputs_of_the_wanted_slots_only(tmp_path):
    """Training reads the matched slots only: prepared for those, the same numbers, and a head gives the same
    outputs on them (others 0)."""
    from hepreg.settings import HeadConfig
    from hepreg.models.head import build_head, matched_targets

    loader = CacheLoader(truthlike_split(tmp_path, events=120), batch_size=40, shuffle=True, in_memory="yes")
    prepared = PreparedInputs.held(loader.resident, InputSpec(threshold=0.1, track_frame=True, fit_proxy=True))
    head = build_head(HeadConfig(hidden_dim=16, num_layers=2, dropout=0.0), D).eval()
    for batch in loader:
        head.estimate_scales(batch)
        wanted = matched_targets(batch)[1].view(-1)
        some, every = prepared.inputs(batch, wanted), prepared.inputs(batch)
        assert sorted(torch.cat(some.tracks.rows).tolist()) == wanted.nonzero()[:, 0].tolist()
        a, b = some.dense(), every.dense()
        for x, y in ((a.hit_features, b.hit_features), (a.tracks.mask, b.tracks.mask), (a.tracks.embed, b.tracks.embed),
                     (a.track_features, b.track_features)):
            assert torch.equal(x[wanted], y[wanted][:, :x.shape[1]] if x.dim() > 2 else y[wanted])
        S = wanted.numel()
        part, full = head.run(some).value.reshape(S, -1), head.run(every).value.reshape(S, -1)
        torch.testing.assert_close(part[wanted], full[wanted], rtol=1e-5, atol=1e-6)
        assert (part[~wanted] == 0).all()


def test_inputs_that_do_not_fit_in_memory_are_stored_beside_the_split(tmp_path, monkeypatch):
    from hepreg.settings import HeadConfig
    from hepreg.models.head import build_head
    from hepreg.prepared import HeadSource, StreamedInputs

    loader = CacheLoader(truthlike_split(tmp_path, events=60), batch_size=20, shuffle=False, in_memory="yes")
    heads = [build_head(HeadConfig(hidden_dim=8, fit_proxy=f), D) for f in (True, False, True)]
    source = HeadSource(loader.split, loader)
    monkeypatch.setattr(loader, "has_room", lambda nbytes: False)
    said = source.prepare(heads)
    assert "more than fits" in said and "stored once beside the split" in said
    assert {type(p) for p in source.prepared.values()} == {StreamedInputs}
    assert set(source.inputs(next(iter(source)), heads)) == {h.input_key for h in heads}
    monkeypatch.setattr(loader, "has_room", lambda nbytes: True)
    source = HeadSource(loader.split, loader)
    assert "2 input settings read from those stored beside the split, held in memory" in source.prepare(heads)
    assert set(source.prepared) == {h.input_key for h in heads}


def test_streamed_inputs_equal_the_held_ones(tmp_path, monkeypatch):
    """A split streamed from Zarr reads its heads' inputs from those stored beside it: the same numbers as
    inputs prepared in memory, batch by batch, epoch after epoch, every array read into reused buffers; made
    once per export of the split."""
    from hepreg.cache import buffers, store
    from hepreg.settings import HeadConfig
    from hepreg.models.head import build_head
    from hepreg.prepared import HeadSource

    path = truthlike_split(tmp_path)  # 240 events in blocks of 32; buffers of 2 blocks, batches of 40
    monkeypatch.setattr(buffers, "MIN_BYTES", 0)  # every array of a group from the pools, however small
    args = dict(batch_size=40, shuffle=True, seed=3, shuffle_buffer=2)
    held = CacheLoader(path, in_memory="yes", **args)
    head = build_head(HeadConfig(hidden_dim=8, threshold=0.1), D)
    ref = PreparedInputs.held(held.resident, head.input_key)
    def streamed() -> HeadSource:
        loader = CacheLoader(path, in_memory="no", **args)
        return HeadSource(loader.split, loader)

    source = streamed()
    assert "stored once beside the split" in source.prepare([head])
    reads = {"blocks": [], "inputs": []}  # groups read, for the cache's blocks and for the stored inputs
    loader, streamed_inputs = source.loader, source.prepared[head.input_key]
    read_group, read_inputs = loader._read_group, streamed_inputs.stored.read
    loader._read_group = lambda group: reads["blocks"].append(tuple(group)) or read_group(group)
    streamed_inputs.stored.read = lambda group, *a, **k: reads["inputs"].append(tuple(group)) or read_inputs(group, *a,
                                                                                                           **k)
    for epoch in (0, 1):
        source.set_epoch(epoch)
        held.set_epoch(epoch)
        batches = 0
        for a, b in zip(source, held, strict=True):
            assert torch.equal(a.event_id, b.event_id)
            assert a.raw.shape[1] == 0 and a.hit_index is None  # read only what the stored inputs do not hold
            wanted = torch.rand(a.size * N) < 0.7
            x, y = source.inputs(a, [head], wanted)[head.input_key].dense(), ref.inputs(b, wanted).dense()
            for name in ("mask", "embed", "prob", "query_embed", "hit"):
                assert torch.equal(getattr(x.tracks, name), getattr(y.tracks, name)), name
            for name in ("hit_features", "track_features", "reference"):
                assert torch.equal(getattr(x, name), getattr(y, name)), name
            batches += 1
        assert batches == 6
    # each group read once; the next pass's first group read as the pass before ends, not when the next starts
    groups = [tuple(g) for e in (0, 1) for g in loader.groups(e)] + [tuple(loader.groups(2)[0])]
    assert reads["blocks"] == groups and reads["inputs"] == groups
    # the pools reuse their arrays: each group reads 7 or more arrays, and 3 groups at most are alive at a time
    assert all(0 < len(pool._arrays) <= 3 * 8 < len(groups) * 7 for pool in (loader._buffers, streamed_inputs.buffers))
    assert "read from those stored beside the split" in streamed().prepare([head])
    meta = store.read_meta(path)
    store.write_meta(path, {**meta, "created": "another export"})  # the split exported again: made again
    assert "stored once" in streamed().prepare([head])


def test_two_runs_starting_together_store_the_inputs_once(tmp_path):
    """Two processes on one cache (`hepreg tune` started twice): one makes the store, the other waits and reads
    it (threads here: each takes the lock through its own open file, as a process would)."""
    from concurrent.futures import ThreadPoolExecutor

    from hepreg.settings import HeadConfig
    from hepreg.models.head import build_head
    from hepreg.prepared import HeadSource

    path = truthlike_split(tmp_path, events=120)
    head = build_head(HeadConfig(hidden_dim=8, threshold=0.1), D)

    def prepare(_) -> str:
        loader = CacheLoader(path, batch_size=40, shuffle=True, in_memory="no")
        return HeadSource(loader.split, loader).prepare([head])

    with ThreadPoolExecutor(2) as pool:
        said = list(pool.map(prepare, range(2)))
    assert sorted("stored once" in s for s in said) == [False, True], said
    assert not list((path.parent / "head-inputs").glob("*.partial"))
