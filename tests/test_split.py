"""One suite for every `Split` (what `CacheLoader` iterates over): the stored cache split and the live one.

Both hold the same events, from one float32 unpruned export and the same frozen checkpoint; each test runs
against both, so the live head source cannot drift from the cache it stands in for.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import make_checkpoint, small_config

from hepreg.cache.loader import CacheLoader, open_cache
from hepreg.data.reader import open_dataset, split_ranges
from hepreg.errors import CacheError
from hepreg.flat import Block
from hepreg.frozen import FrozenAssigner, LiveSplit

SPLIT = "val"
KINDS = ("cache", "live")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_dataset):
    from hepreg.stages.export import run as export

    tmp = tmp_path_factory.mktemp("split")
    cfg = small_config()
    cfg.name, cfg.run_dir, cfg.data.path = "t", str(tmp / "runs"), str(tiny_dataset)
    cfg.export.dtype, cfg.export.prune_threshold, cfg.export.splits = "float32", 0.0, [SPLIT]
    cfg.export.block_events, cfg.export.batch_size, cfg.export.device = 8, 8, "cpu"
    ckpt = make_checkpoint(tmp / "c.pt", cfg, seed=1)
    export(cfg, checkpoint=ckpt)
    assigner = FrozenAssigner.from_checkpoint(ckpt, "cpu")
    splits = {"cache": open_cache(cfg.run_path / "cache" / f"{SPLIT}.zarr", expect_checkpoint=ckpt),
              "live": LiveSplit(cfg, SPLIT, assigner, prune_threshold=0.0)}
    return cfg, splits


@pytest.fixture(params=KINDS)
def split(request, setup):
    return setup[1][request.param]


def event_numbers(cfg) -> np.ndarray:
    ds = open_dataset(cfg.data.path, cfg.data.max_events)
    start, stop = split_ranges(len(ds), cfg.data.val_fraction, cfg.data.test_fraction)[SPLIT]
    return ds.read(start, stop).event_id


def assert_close(a: Block, b: Block) -> None:
    """Equal where no model arithmetic is involved; within float tolerance where batching may reorder sums."""
    for name in ("raw", "offsets", "targets", "target_valid", "event_id", "match"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    for name in ("embed", "logit", "query_embed", "track_logit"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-4, atol=1e-5, err_msg=name)


def test_reads_the_split_in_dataset_order(split, setup):
    cfg, _ = setup
    ids = event_numbers(cfg)
    assert split.num_events == len(ids) > 2 * split.block_events
    block = split.read(0, split.num_events)
    assert block.size == split.num_events
    np.testing.assert_array_equal(block.event_id, ids)
    assert block.offsets[0] == 0 and block.offsets[-1] == len(block.raw) == len(block.embed) == len(block.logit)


def test_ranges_compose_across_blocks(split):
    whole = split.read(0, split.num_events)
    b = split.block_events
    for s, e in ((0, 1), (b - 3, b + 5), (b, 2 * b), (split.num_events - 4, split.num_events)):
        assert_close(split.read(s, e), whole.slice(s, e))


def test_targets_are_those_of_the_events(split):
    targets, valid = split.targets()
    whole = split.read(0, split.num_events)
    assert torch.equal(targets, torch.from_numpy(whole.targets).float())
    assert torch.equal(valid, torch.from_numpy(whole.target_valid).bool())


def test_provenance(split, setup):
    cfg, splits = setup
    assert split.checkpoint_sha256 == splits["live"].assigner.checkpoint_sha256
    assert split.dim == cfg.model.dim


@pytest.mark.parametrize("world", [1, 2])
def test_loader_yields_every_event_exactly_once(split, setup, world):
    ids = event_numbers(setup[0])
    seen = []
    for rank in range(world):
        loader = CacheLoader(split, batch_size=7, shuffle=True, seed=3, rank=rank, world_size=world, in_memory="no")
        loader.set_epoch(1)
        seen += [b.event_id for b in loader]
    np.testing.assert_array_equal(np.sort(torch.cat(seen).numpy()), np.sort(ids))


def test_cache_and_live_hold_the_same_events(setup):
    _, splits = setup
    assert_close(splits["live"].read(0, splits["live"].num_events), splits["cache"].read(0, splits["cache"].num_events))


def test_only_a_stored_split_is_held_in_memory(setup):
    _, splits = setup
    assert CacheLoader(splits["cache"], batch_size=8, shuffle=False, in_memory="yes").in_memory
    assert not CacheLoader(splits["live"], batch_size=8, shuffle=False).in_memory  # auto: never held
    with pytest.raises(CacheError, match="only a stored cache split"):
        CacheLoader(splits["live"], batch_size=8, shuffle=False, in_memory="yes")
