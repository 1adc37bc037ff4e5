import math

import torch

from hepreg.settings import AssignConfig, ModelConfig
from hepreg.data.batch import HitBatch
from hepreg.data.layout import RAW_FEATURES
from hepreg.models.assign_loss import assignment_loss
from hepreg.models.assign_metrics import counts_from_logits, rates
from hepreg.models.maskformer import PAD_LOGIT, MaskFormer


TINY = ModelConfig(dim=16, num_heads=4, encoder_layers=1, decoder_layers=2, num_queries=2, ffn_mult=2)


def toy_batch(num_events: int, seed: int = 0, max_hits: int = 24) -> HitBatch:
    """Events of 1-2 tracks (hits clustered in phi at a few radii) plus uniform noise, padded to max_hits."""
    g = torch.Generator().manual_seed(seed)
    B, P, M, F = num_events, 2, max_hits, len(RAW_FEATURES)
    hits = torch.zeros(B, M, F)
    hit_valid = torch.zeros(B, M, dtype=torch.bool)
    link = torch.full((B, M), -1, dtype=torch.long)
    particle_valid = torch.zeros(B, P, dtype=torch.bool)
    i_r, i_th, i_phi = (RAW_FEATURES.index(v) for v in ("r", "theta", "phi"))
    for b in range(B):
        n_tracks = int(torch.randint(1, 3, (1,), generator=g))
        particle_valid[b, :n_tracks] = True
        phis = [-2.0, 1.0][:n_tracks] if b % 2 else [0.5, 2.5][:n_tracks]
        rows = []
        for t, phi in enumerate(phis):
            for r in (5.0, 7.0, 9.0, 10.0, 11.0):
                rows.append((r, 1.2 + 0.1 * t, phi + 0.02 * torch.randn(1, generator=g).item(), t))
        n_noise = int(torch.randint(2, M - len(rows) - 2, (1,), generator=g))
        for _ in range(n_noise):
            rows.append((float(torch.rand(1, generator=g)) * 10 + 2, 1.5, float(torch.rand(1, generator=g)) * 2 * math.pi - math.pi, -1))
        order = torch.randperm(len(rows), generator=g)
        for m, j in enumerate(order.tolist()):
            r, th, phi, t = rows[j]
            hits[b, m, i_r], hits[b, m, i_th], hits[b, m, i_phi] = r, th, phi
            hits[b, m, 0], hits[b, m, 1] = r * math.cos(phi), r * math.sin(phi)
            hit_valid[b, m] = True
            link[b, m] = t
    particle_hit_valid = link.unsqueeze(1) == torch.arange(P).view(1, P, 1)
    return HitBatch(hits=hits, hit_valid=hit_valid, truth_link=link, particle_valid=particle_valid,
                    particle_hit_valid=particle_hit_valid, targets=torch.zeros(B, P, 4),
                    event_id=torch.arange(B), index=torch.arange(B))


def test_output_shapes_and_padding_logits():
    torch.manual_seed(0)
    model = MaskFormer(TINY).eval()
    batch = toy_batch(3)
    out = model(batch.hits, batch.hit_valid)
    assert len(out.layers) == TINY.decoder_layers + 1
    B, M = batch.hit_valid.shape
    for layer in out.layers:
        assert layer["track_logit"].shape == (B, 2)
        assert layer["mask_logit"].shape == (B, 2, M)
        assert (layer["mask_logit"].transpose(1, 2)[~batch.hit_valid] == PAD_LOGIT).all()
    assert out.hit_embed.shape == (B, M, 16) and out.query_embed.shape == (B, 2, 16)


def test_padded_batch_matches_events_run_one_by_one():
    torch.manual_seed(0)
    model = MaskFormer(ModelConfig(dim=32, num_heads=8)).eval()
    batch = toy_batch(5, seed=3)
    with torch.no_grad():
        out = model(batch.hits, batch.hit_valid)
        for b in range(batch.size):
            real = batch.hit_valid[b]
            one = model(batch.hits[b:b + 1, real], batch.hit_valid[b:b + 1, real])
            torch.testing.assert_close(out.hit_embed[b, real], one.hit_embed[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(out.query_embed[b], one.query_embed[0], atol=1e-5, rtol=1e-4)
            for full, single in zip(out.layers, one.layers):
                torch.testing.assert_close(full["mask_logit"][b][:, real], single["mask_logit"][0], atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(full["track_logit"][b], single["track_logit"][0], atol=1e-5, rtol=1e-4)


def test_event_without_hits_gives_finite_outputs_and_gradients():
    torch.manual_seed(0)
    model = MaskFormer(TINY)
    batch = toy_batch(2)
    batch.hit_valid[1] = False
    batch.particle_valid[1] = False
    batch.particle_hit_valid[1] = False
    out = model(batch.hits, batch.hit_valid)
    assert all(torch.isfinite(layer["track_logit"]).all() for layer in out.layers)
    assert torch.isfinite(out.hit_embed).all() and torch.isfinite(out.query_embed).all()
    loss, _, _ = assignment_loss(out, batch, AssignConfig())
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_tiny_model_overfits_16_events():
    torch.manual_seed(0)
    model = MaskFormer(TINY)
    batch = toy_batch(16, seed=1)
    cfg = AssignConfig()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for step in range(100):  # the loss has levelled off (at ~7.5 % of the first) by step 100
        loss, _, _ = assignment_loss(model(batch.hits, batch.hit_valid), batch, cfg)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first
    model.eval()
    with torch.no_grad():
        out = model(batch.hits, batch.hit_valid)
        _, _, match = assignment_loss(out, batch, cfg)
        final = out.final
        r = rates(counts_from_logits(final["track_logit"], final["mask_logit"], batch.hit_valid,
                                     batch.particle_valid, batch.particle_hit_valid, match))
    assert r["dm_eff"] == 1.0 and r["fake_rate"] == 0.0 and r["hit_purity"] > 0.95


def test_bf16_autocast_forward_and_backward():
    torch.manual_seed(0)
    model = MaskFormer(TINY)
    batch = toy_batch(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch.hits, batch.hit_valid)
    loss, _, _ = assignment_loss(out, batch, AssignConfig(dice_weight=1.0, dice_cost=1.0))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        ref = model(batch.hits, batch.hit_valid).final["mask_logit"]
    real = batch.hit_valid.unsqueeze(1).expand_as(ref)
    torch.testing.assert_close(out.final["mask_logit"].float()[real], ref[real], atol=0.3, rtol=0.1)


def test_length_runs_split_ascending_batches_only_where_it_pays():
    from hepreg.models.maskformer import SPLIT_COST, length_runs

    assert length_runs([]) == [] and length_runs([7]) == [(0, 1, 7)]
    assert length_runs([30] * 32) == [(0, 32, 30)]  # nothing to save
    assert length_runs([600, 40, 40]) == [(0, 3, 600)]  # not ascending: one run
    lengths = [40] * 16 + [300] * 8 + [600] * 8
    runs = length_runs(lengths)
    assert runs == [(0, 16, 40), (16, 24, 300), (24, 32, 600)]
    cost = lambda rs: sum((b - a) * (m * m + 256 * m) + SPLIT_COST for a, b, m in rs)  # noqa: E731
    assert cost(runs) < cost([(0, 32, 600)]) and cost(runs) < cost([(0, 24, 300), (24, 32, 600)])


def test_sub_batches_compute_what_the_whole_batch_does(monkeypatch):
    """A batch of very different event sizes, rows in ascending hit count, runs as sub-batches: the same outputs
    and gradients as the whole padded batch."""
    from hepreg.models import maskformer

    torch.manual_seed(0)
    model = MaskFormer(TINY)
    parts = [toy_batch(2, seed=s, max_hits=m) for s, m in ((1, 24), (2, 60), (3, 200))]
    M = 200
    hits = torch.cat([torch.nn.functional.pad(p.hits, (0, 0, 0, M - p.hits.shape[1])) for p in parts])
    valid = torch.cat([torch.nn.functional.pad(p.hit_valid, (0, M - p.hit_valid.shape[1])) for p in parts])
    order = valid.sum(1).argsort()
    hits, valid = hits[order], valid[order]
    assert len(maskformer.length_runs(valid.sum(1).tolist())) > 1
    split = model(hits, valid)
    monkeypatch.setattr(maskformer, "SPLIT_COST", float("inf"))
    whole = model(hits, valid)
    real = valid.unsqueeze(1).expand_as(whole.final["mask_logit"])
    for a, b in zip(split.layers, whole.layers):
        torch.testing.assert_close(a["track_logit"], b["track_logit"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a["mask_logit"][real], b["mask_logit"][real], atol=1e-4, rtol=1e-4)
        assert (a["mask_logit"][~real] == PAD_LOGIT).all()
    torch.testing.assert_close(split.hit_embed[valid], whole.hit_embed[valid], atol=1e-5, rtol=1e-4)
    loss = lambda out: sum(layer["mask_logit"][real].square().mean() + layer["track_logit"].square().sum()  # noqa: E731
                           for layer in out.layers) + out.query_embed.sum() + out.hit_embed[valid].sum()
    grads = [torch.autograd.grad(loss(out), list(model.parameters())) for out in (split, whole)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4 * float(b.abs().max()), rtol=1e-3)
