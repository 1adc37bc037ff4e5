"""Builders shared by the tests: random flat batches, hand-written cache splits, a small stage-1 config, a
checkpoint of an untrained model, and the pooled head's reduction of a flat batch composed from its parts."""
from __future__ import annotations

import sys

import torch

from hepreg.cache import store
from hepreg.cache.schema import SCHEMA_VERSION
from hepreg.cache.writer import PartWriter, begin_split, finish_split
from hepreg.settings import Config
from hepreg.runs.distributed import contiguous_range
from hepreg.flat import FlatBatch
from hepreg.models.head import POOLINGS, pool
from hepreg.models.maskformer import MaskFormer
from hepreg.models.tracks import from_flat, scatter_rows
from hepreg.runs.directory import save_checkpoint

N, D, P = 2, 8, 2  # queries, embedding width, particle slots of the hand-built batches


def random_offsets(g: torch.Generator, num_events: int, low: int, high: int) -> torch.Tensor:
    """CSR offsets [E + 1] of events with low..high-1 hits each."""
    counts = torch.randint(low, high, (num_events,), generator=g)
    offsets = torch.zeros(num_events + 1, dtype=torch.long)
    offsets[1:] = counts.cumsum(0)
    return offsets


def hit_rows(offsets: torch.Tensor) -> torch.Tensor:
    """[H] each hit's row within its event, for the hit_index field of events that were never pruned."""
    return torch.arange(int(offsets[-1])) - torch.repeat_interleave(offsets[:-1], offsets.diff())


def random_outputs(g: torch.Generator, offsets: torch.Tensor, n: int = N, d: int = D) -> dict[str, torch.Tensor]:
    """Random stage-1 outputs of the events of `offsets`: the embed, logit, query_embed and track_logit fields."""
    h, e = int(offsets[-1]), len(offsets) - 1
    return dict(embed=torch.randn(h, d, generator=g), logit=torch.randn(h, n, generator=g) * 3,
                query_embed=torch.randn(e, n, d, generator=g), track_logit=torch.randn(e, n, generator=g))


def random_flat(num_events: int, seed: int, first_id: int = 0) -> FlatBatch:
    g = torch.Generator().manual_seed(seed)
    offsets = random_offsets(g, num_events, 0, 12)
    valid = torch.rand(num_events, P, generator=g) < 0.7
    targets = torch.randn(num_events, P, 4, generator=g)
    targets[..., 0] = targets[..., 0].abs() * 20 + 3  # pt [GeV]
    targets[..., 3] = torch.where(targets[..., 3] > 0, 1.0, -1.0)  # q
    targets = targets * valid[..., None]
    return FlatBatch(raw=torch.randn(int(offsets[-1]), 23, generator=g), offsets=offsets, **random_outputs(g, offsets),
                     match=torch.randint(-1, P, (num_events, N), generator=g), targets=targets,
                     target_valid=valid, event_id=torch.arange(first_id, first_id + num_events),
                     hit_index=hit_rows(offsets))


def write_split(path, flat: FlatBatch, *, world: int = 1, block: int = 16, dtype: str = "float32",
                prune: float = 0.0, checkpoint: str = "a" * 64, fail_after: int | None = None, hit_chunk: int = 64,
                compressor: str = "lz4"):
    """Write `flat` as a split of `world` parts; raise after `fail_after` blocks to simulate a kill."""
    e = flat.size
    parts = [contiguous_range(e, r, world) for r in range(world)]
    meta = {"schema_version": SCHEMA_VERSION, "checkpoint": "ckpt.pt", "checkpoint_sha256": checkpoint,
            "num_events": e, "parts": [{"start": s, "stop": t} for s, t in parts], "block_events": block,
            "prune_threshold": prune, "dtypes": {"hits/embed": dtype}, "hit_chunk": hit_chunk}
    resumed = begin_split(path, meta, overwrite=False)
    written = 0
    for r, (s, t) in enumerate(parts):
        if resumed and (path / store.part_name(r)).exists():
            w = PartWriter.open(path, r)
        else:
            w = PartWriter.create(path, r, start=s, stop=t, num_queries=N, dim=D, num_raw=23, num_targets=P,
                                  embed_dtype=dtype, block_events=block, hit_chunk=hit_chunk, compressor=compressor,
                                  clevel=5)
        for k in range(w.blocks_done, w.num_blocks):
            if fail_after is not None and written == fail_after:
                raise KeyboardInterrupt
            bs, be = w.block_range(k)
            w.write_block(k, flat.slice(s + bs, s + be), hits_seen=0)
            written += 1
        w.finish()
    return finish_split(path, {"time": "now"})


def pool_flat(x: torch.Tensor, logit: torch.Tensor, offsets: torch.Tensor, threshold: float,
              ops: tuple[str, ...] = POOLINGS) -> torch.Tensor:
    """The pooled head's reduction of flat hit features x [H, F] with logits [H, N] -> [B, N, len(ops)·F], composed
    as the head composes it: `from_flat`'s buckets of tracks through `pool`, put back in slot order."""
    B, N = offsets.numel() - 1, logit.shape[1]
    t = from_flat(x, x[:, :0], logit, offsets, x.new_zeros(B, N, 0), threshold)
    pooled = [pool(b.raw, b.prob, b.mask, ops) for b in t.buckets]  # [R_b, len(ops)·F] each
    return scatter_rows(pooled, t.rows, hit_axis=False).view(B, N, len(ops) * x.shape[1])


def whole_split(split) -> FlatBatch:
    """Every event of an open cache split as one FlatBatch, through the loader's own read path."""
    return split.read(0, split.num_events).to_flat()


def assert_same(a: FlatBatch, b: FlatBatch) -> None:
    for name in FlatBatch.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape, name
        assert torch.equal(x, y), name


def small_config() -> Config:
    cfg = Config()
    cfg.model.dim, cfg.model.num_heads = 16, 4
    cfg.model.encoder_layers = cfg.model.decoder_layers = 1
    return cfg


def make_checkpoint(path, cfg: Config, seed: int = 0):
    torch.manual_seed(seed)
    model = MaskFormer(cfg.model)
    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(), "epoch": 0,
                     "data_fingerprint": "test"}, path)
    return path


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    """Run `hepreg ARGS` in this process (no second start-up); returns (exit code, everything printed)."""
    from hepreg.cli import main

    monkeypatch.setattr(sys, "argv", ["hepreg", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out + out.err
