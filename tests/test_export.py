"""The frozen assigner and the export stage: cache contents equal what the frozen model computes."""
from __future__ import annotations

import torch

from hepreg.cache.loader import Block, open_cache
from hepreg.cache.schema import FlatBatch
from hepreg.config import Config
from hepreg.data.batch import HitBatch
from hepreg.frozen import FrozenAssigner
from hepreg.models.maskformer import MaskFormer
from hepreg.models.pooling import make_plan, pool
from hepreg.runs import save_checkpoint


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
            pf = pool(x_full, make_plan(full.logit, full.offsets, threshold))
            pp = pool(x_pruned, make_plan(pruned.logit, pruned.offsets, threshold))
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
