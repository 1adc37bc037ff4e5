"""The frozen assigner and the export stage: cache contents equal what the frozen model computes."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hepreg.cache import store
from hepreg.cache.loader import open_cache
from hepreg.cache.writer import PartWriter
from hepreg.settings import Config
from hepreg.data.batch import HitBatch
from hepreg.errors import CacheError
from hepreg.flat import Block, FlatBatch
from hepreg.frozen import FrozenAssigner
from helpers import assert_same, make_checkpoint, pool_flat, small_config, whole_split
from helpers import run_cli as cli


def random_hit_batch(b: int = 6, m: int = 30, p: int = 2, seed: int = 0) -> HitBatch:
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(3, m + 1, (b,), generator=g)
    hit_valid = torch.arange(m)[None, :] < counts[:, None]
    hits = torch.randn(b, m, 23, generator=g) * hit_valid[..., None]
    truth = torch.randint(-1, p, (b, m), generator=g).masked_fill(~hit_valid, -1)
    particle_valid = torch.stack([(truth == i).any(1) for i in range(p)], 1)
    targets = torch.rand(b, p, 4, generator=g) * particle_valid[..., None]
    return HitBatch(hits=hits, hit_valid=hit_valid, truth_link=truth, particle_valid=particle_valid,
                    particle_hit_valid=(truth[:, None, :] == torch.arange(p)[None, :, None]) & hit_valid[:, None],
                    targets=targets, event_id=torch.arange(b) + 100 * seed, index=torch.arange(b))


def test_assigner_frozen_by_module(tmp_path):
    a = FrozenAssigner.from_checkpoint(make_checkpoint(tmp_path / "c.pt", small_config()), "cpu")
    assert not a.model.training and all(not m.training for m in a.model.modules())
    assert all(not p.requires_grad for p in a.model.parameters())
    assert len(a.checkpoint_sha256) == 64


def test_assigner_outputs_match_model_and_are_autograd_usable(tmp_path):
    cfg = small_config()
    a = FrozenAssigner.from_checkpoint(make_checkpoint(tmp_path / "c.pt", cfg), "cpu")
    batch = random_hit_batch()
    flat = a(batch)
    with torch.no_grad():
        out = a.model(batch.hits, batch.hit_valid)
    assert torch.equal(flat.embed, out.hit_embed[batch.hit_valid])
    assert torch.equal(flat.logit, out.layers[-1]["mask_logit"].transpose(1, 2)[batch.hit_valid])
    assert torch.equal(flat.query_embed, out.query_embed)
    assert torch.equal(flat.raw, batch.hits[batch.hit_valid])
    assert torch.equal(flat.num_hits, batch.hit_valid.sum(1))
    assert ((flat.match >= -1) & (flat.match < 2)).all()
    assert not any(getattr(flat, f).is_inference() for f in FlatBatch.__dataclass_fields__)
    w = torch.nn.Linear(16, 1)
    w(flat.embed).sum().backward()  # a head can train on these tensors
    assert w.weight.grad is not None


def test_pruning_is_exact_for_pooling(tmp_path):
    """Every pool the head computes is identical from pruned and unpruned flat batches at threshold >= T."""
    cfg = small_config()
    a = FrozenAssigner.from_checkpoint(make_checkpoint(tmp_path / "c.pt", cfg, seed=3), "cpu")
    batch = random_hit_batch(b=8, m=40, seed=4)
    full = a(batch, prune_threshold=0.0)
    p = torch.sigmoid(full.logit)
    t = float(p.quantile(0.6))  # prune a good share of the hits
    pruned = a(batch, prune_threshold=t)
    assert 0 < pruned.raw.shape[0] < full.raw.shape[0]
    for threshold in (t, t + 0.05):
        for x_full, x_pruned in ((full.raw, pruned.raw), (full.embed, pruned.embed)):
            pf = pool_flat(x_full, full.logit, full.offsets, threshold)
            pp = pool_flat(x_pruned, pruned.logit, pruned.offsets, threshold)
            assert torch.equal(pf, pp)
            # the weighted sum spelled out: Σ p·(p ≥ T)·x per (event, query)
            ev_f, ev_p = full.hit_event(), pruned.hit_event()
            for n in range(cfg.model.num_queries):
                wf = (p[:, n] * (p[:, n] >= threshold))[:, None] * x_full
                pp_n = torch.sigmoid(pruned.logit[:, n])
                wp = (pp_n * (pp_n >= threshold))[:, None] * x_pruned
                sf = torch.zeros(full.size, x_full.shape[1]).index_add_(0, ev_f, wf)
                sp = torch.zeros(pruned.size, x_full.shape[1]).index_add_(0, ev_p, wp)
                torch.testing.assert_close(sf, sp, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------- the export stage
@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    from hepreg.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("data") / "tiny", events=400, seed=5, preset="light",
                    events_per_file=150)


def export_config(tmp_path, data, **export) -> Config:
    cfg = small_config()
    cfg.name, cfg.run_dir, cfg.data.path = "t", str(tmp_path / "runs"), str(data)
    cfg.data.batch_size = 32
    cfg.export.block_events, cfg.export.batch_size, cfg.export.hit_chunk = 24, 16, 256
    for k, v in export.items():
        setattr(cfg.export, k, v)
    return cfg


def export(cfg, checkpoint, **kw):
    from hepreg.stages.export import run

    return run(cfg, checkpoint=checkpoint, **kw)


def read_split(cfg, split) -> FlatBatch:
    return whole_split(open_cache(Path(cfg.run_dir) / cfg.name / "cache" / f"{split}.zarr"))


def test_export_round_trip_float32_exact(tmp_path, dataset_dir):
    """What the cache holds is exactly what the frozen model computed, event by event in dataset order."""
    from hepreg.data.batching import HitLoader
    from hepreg.data.reader import open_dataset, split_ranges

    cfg = export_config(tmp_path, dataset_dir, dtype="float32", prune_threshold=0.0)
    ckpt = make_checkpoint(tmp_path / "c.pt", cfg)
    records = export(cfg, ckpt, splits=["val", "test"])
    ds = open_dataset(dataset_dir)
    ranges = split_ranges(len(ds), cfg.data.val_fraction, cfg.data.test_fraction)
    a = FrozenAssigner.from_checkpoint(ckpt, "cpu")
    for split in ("val", "test"):
        start, stop = ranges[split]
        got = read_split(cfg, split)
        assert records[split]["events"] == got.size == stop - start
        assert records[split]["hits_kept"] == records[split]["hits_seen"] == got.raw.shape[0]
        blocks = []  # the frozen model on the same batches, put in dataset order
        for s in range(start, stop, cfg.export.block_events):
            e = min(s + cfg.export.block_events, stop)
            parts, index = [], []
            for batch in HitLoader(ds, s, e, batch_size=cfg.export.batch_size, shuffle=False, seed=cfg.seed,
                                   bucket_window=cfg.data.bucket_window, batch_by=cfg.export.batch_by):
                parts.append(Block.from_flat(a(batch)))
                index.append(batch.index.numpy())
            blocks.append(Block.concat(parts).take(np.argsort(np.concatenate(index))))
        assert_same(got, Block.concat(blocks).to_flat())
        # and, batched differently, the same numbers up to float rounding
        whole = next(iter(HitLoader(ds, start, stop, batch_size=stop - start, shuffle=False)))
        ref = Block.from_flat(a(whole)).take(np.argsort(whole.index.numpy())).to_flat()
        assert torch.equal(got.raw, ref.raw) and torch.equal(got.offsets, ref.offsets)
        torch.testing.assert_close(got.embed, ref.embed, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.logit, ref.logit, rtol=1e-4, atol=1e-4)


def test_export_default_prunes_at_head_threshold_float16(tmp_path, dataset_dir):
    cfg = export_config(tmp_path, dataset_dir)
    cfg.head.threshold = 0.35  # about half the hits of an untrained model fall below it for every query
    ckpt = make_checkpoint(tmp_path / "c.pt", cfg)
    record = export(cfg, ckpt, splits=["val"])["val"]
    split = open_cache(Path(cfg.run_dir) / "t" / "cache" / "val.zarr")
    assert split.prune_threshold == cfg.head.threshold
    assert split.attrs["dtypes"]["hits/embed"] == "float16"
    assert split.parts[0]["hits/embed"].dtype == np.float16
    assert record["hits_kept"] < record["hits_seen"]
    flat = whole_split(split)
    assert (torch.sigmoid(flat.logit) >= cfg.head.threshold).any(1).all()
    with pytest.raises(CacheError, match="0.3 cannot be used"):
        open_cache(split.path, min_threshold=0.3)


def test_pruned_cache_keeps_the_input_row_of_every_hit(tmp_path, dataset_dir):
    """hits/index names each kept hit's row in the input file: its raw features are that row's, scaled."""
    from hepreg.data.reader import open_dataset, split_ranges

    cfg = export_config(tmp_path, dataset_dir)
    cfg.head.threshold = 0.35
    export(cfg, make_checkpoint(tmp_path / "c.pt", cfg), splits=["val"])
    flat = read_split(cfg, "val")
    ds = open_dataset(dataset_dir)
    start, stop = split_ranges(len(ds), cfg.data.val_fraction, cfg.data.test_fraction)["val"]
    events = ds.read(start, stop)
    assert flat.raw.shape[0] < int(events.hit_valid.sum())  # pruned
    ev = flat.hit_event()
    assert (flat.hit_index < torch.from_numpy(events.num_hits)[ev]).all()
    assert torch.equal(flat.raw, torch.from_numpy(events.hits)[ev, flat.hit_index])


def test_cache_of_an_older_schema_asks_for_a_reexport(tmp_path, dataset_dir):
    import json

    cfg = export_config(tmp_path, dataset_dir)
    export(cfg, make_checkpoint(tmp_path / "c.pt", cfg), splits=["val"])
    path = Path(cfg.run_dir) / cfg.name / "cache" / "val.zarr"
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["hepreg"]["schema_version"] = 1
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(CacheError, match="schema version 1.*re-export"):
        open_cache(path)


def test_export_interrupted_then_resumed_identical(tmp_path, dataset_dir, monkeypatch):
    cfg = export_config(tmp_path / "a", dataset_dir, dtype="float32")
    ckpt = make_checkpoint(tmp_path / "c.pt", cfg)
    export(cfg, ckpt, splits=["val"])
    ref = read_split(cfg, "val")

    cfg2 = export_config(tmp_path / "b", dataset_dir, dtype="float32")
    original, calls = PartWriter.write_block, []

    def dying(self, k, batch, hits_seen=0):
        if len(calls) == 1:  # die halfway through the second block: hits grown, progress not recorded
            self.arrays["hits/embed"].resize((self.progress["hits_done"] + 7, cfg.model.dim))
            raise KeyboardInterrupt
        calls.append(k)
        return original(self, k, batch, hits_seen)

    monkeypatch.setattr(PartWriter, "write_block", dying)
    with pytest.raises(KeyboardInterrupt):
        export(cfg2, ckpt, splits=["val"])
    monkeypatch.setattr(PartWriter, "write_block", original)
    with pytest.raises(CacheError, match="incomplete"):
        read_split(cfg2, "val")
    export(cfg2, ckpt, splits=["val"])
    assert_same(read_split(cfg2, "val"), ref)
    a, b = (Path(c.run_dir) / "t" / "cache" / "val.zarr" for c in (cfg, cfg2))
    chunks = sorted(f.relative_to(a) for f in a.rglob("*") if f.is_file() and "c" in f.relative_to(a).parts)
    assert chunks and all((a / f).read_bytes() == (b / f).read_bytes() for f in chunks)


def test_export_refuses_complete_cache_unless_overwrite(tmp_path, dataset_dir):
    cfg = export_config(tmp_path, dataset_dir)
    ckpt = make_checkpoint(tmp_path / "c.pt", cfg)
    export(cfg, ckpt, splits=["test"])
    with pytest.raises(CacheError, match="already complete.*--overwrite"):
        export(cfg, ckpt, splits=["test"])
    export(cfg, ckpt, splits=["test"], dtype="float32", overwrite=True)
    assert open_cache(Path(cfg.run_dir) / "t" / "cache" / "test.zarr").attrs["dtypes"]["hits/embed"] == "float32"


def test_stale_checkpoint_refused_naming_both(tmp_path, dataset_dir):
    cfg = export_config(tmp_path, dataset_dir)
    old = make_checkpoint(tmp_path / "old.pt", cfg, seed=1)
    new = make_checkpoint(tmp_path / "new.pt", cfg, seed=2)
    export(cfg, old, splits=["test"])
    path = Path(cfg.run_dir) / "t" / "cache" / "test.zarr"
    with pytest.raises(CacheError, match=r"old\.pt.*new\.pt"):
        open_cache(path, expect_checkpoint=new)
    assert open_cache(path, expect_checkpoint=old).num_events > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_export_identical_to_one_rank(tmp_path, dataset_dir):
    cfg1 = export_config(tmp_path / "one", dataset_dir, dtype="float32")
    ckpt = make_checkpoint(tmp_path / "c.pt", cfg1)
    export(cfg1, ckpt, splits=["val"])
    cfg2 = export_config(tmp_path / "two", dataset_dir, dtype="float32")
    (tmp_path / "two.yaml").write_text(cfg2.to_yaml())
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "HEPREG_NO_PROGRESS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "hepreg", "export-embeddings", "-c",
                                       str(tmp_path / "two.yaml"), "--checkpoint", str(ckpt), "--splits", "val"],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    path = Path(cfg2.run_dir) / "t" / "cache" / "val.zarr"
    assert len(store.read_meta(path)["parts"]) == 2
    assert_same(read_split(cfg2, "val"), read_split(cfg1, "val"))


def test_cli_cache_info_and_verify(tmp_path, dataset_dir, monkeypatch, capsys):
    cfg = export_config(tmp_path, dataset_dir)
    export(cfg, make_checkpoint(tmp_path / "c.pt", cfg), splits=["val", "test"])
    cache = Path(cfg.run_dir) / "t" / "cache"
    code, out = cli(monkeypatch, capsys, "cache", "info", cache)
    assert code == 0 and "val" in out and "test" in out
    code, out = cli(monkeypatch, capsys, "cache", "verify", cache)
    assert code == 0 and "ok" in out
    chunk = cache / "val.zarr" / "part-0000" / "hits" / "logit" / "c" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-5])
    code, out = cli(monkeypatch, capsys, "cache", "verify", cache)
    assert code == 2 and "hits/logit chunk 0.0" in out and "Traceback" not in out
    (tmp_path / "run.yaml").write_text(cfg.to_yaml())
    code, out = cli(monkeypatch, capsys, "export-embeddings", "-c", tmp_path / "run.yaml",
                    "--checkpoint", tmp_path / "missing.pt")
    assert code == 2 and "missing.pt" in out


def test_export_killed_by_sigkill_resumes_identical(tmp_path, dataset_dir, monkeypatch, capsys):
    """kill -9 mid-export, then the same command: the finished cache equals an uninterrupted one."""
    cfg = export_config(tmp_path / "ref", dataset_dir, dtype="float32", block_events=4)
    ckpt = make_checkpoint(tmp_path / "c.pt", cfg)
    export(cfg, ckpt, splits=["val"])
    killed = export_config(tmp_path / "killed", dataset_dir, dtype="float32", block_events=4)
    (tmp_path / "k.yaml").write_text(killed.to_yaml())
    args = ["export-embeddings", "-c", tmp_path / "k.yaml", "--checkpoint", ckpt, "--splits", "val"]
    part = Path(killed.run_dir) / "t" / "cache" / "val.zarr" / "part-0000"
    proc = subprocess.Popen([sys.executable, "-m", "hepreg", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    done = 0
    while proc.poll() is None and done < 2:
        try:
            done = store.part_progress(store.open_part(part.parent, 0))["blocks_done"]
        except (CacheError, KeyError, ValueError):
            pass
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert 2 <= done < 10, "the export was not caught mid-way"
    code, out = cli(monkeypatch, capsys, *args)  # the same command again, in this process: no second start-up
    assert code == 0, out
    assert_same(read_split(killed, "val"), read_split(cfg, "val"))


def test_pruned_and_unpruned_caches_pool_identically(tmp_path, dataset_dir):
    cfg = export_config(tmp_path / "full", dataset_dir, dtype="float32", prune_threshold=0.0)
    ckpt = make_checkpoint(tmp_path / "c.pt", cfg)
    export(cfg, ckpt, splits=["val"])
    pruned_cfg = export_config(tmp_path / "pruned", dataset_dir, dtype="float32", prune_threshold=0.35)
    export(pruned_cfg, ckpt, splits=["val"])
    full, pruned = read_split(cfg, "val"), read_split(pruned_cfg, "val")
    assert pruned.raw.shape[0] < 0.8 * full.raw.shape[0]
    for threshold in (0.35, 0.5):
        for a, b in ((full.raw, pruned.raw), (full.embed, pruned.embed)):
            assert torch.equal(pool_flat(a, full.logit, full.offsets, threshold),
                               pool_flat(b, pruned.logit, pruned.offsets, threshold))


def test_export_resumes_when_killed_while_creating_its_part(tmp_path, dataset_dir, monkeypatch):
    cfg = export_config(tmp_path, dataset_dir, dtype="float32")
    ckpt = make_checkpoint(tmp_path / "c.pt", cfg)

    def killed(self, k, batch, hits_seen=0):
        raise KeyboardInterrupt

    monkeypatch.setattr(PartWriter, "write_block", killed)
    with pytest.raises(KeyboardInterrupt):
        export(cfg, ckpt, splits=["test"])
    monkeypatch.undo()
    part = store.open_part(Path(cfg.run_dir) / "t" / "cache" / "test.zarr", 0, mode="a")
    del part.attrs[store.PART_KEY]  # as if killed before the part's write record was stored
    assert export(cfg, ckpt, splits=["test"])["test"]["events"] == 40
    assert read_split(cfg, "test").size == 40
