"""The regression head, its targets and checkpoint round trip, on hand-built FlatBatch tensors."""
import math

import pytest
import torch

from hepreg.config import HeadConfig
from hepreg.flat import FlatBatch
from hepreg.models.head import RegressionHead, head_from_checkpoint, head_state, matched_targets
from hepreg.models.targets import TargetTransform, wrap_angle
from helpers import random_offsets, random_outputs


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def flat_batch(B=6, N=2, D=8, P=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    offsets = random_offsets(g, B, 1, 12)
    pt = torch.rand(B, P, generator=g) * 50 + 5
    q = torch.where(torch.rand(B, P, generator=g) > 0.5, 1.0, -1.0)
    targets = torch.stack([pt, torch.randn(B, P, generator=g), (torch.rand(B, P, generator=g) * 2 - 1) * math.pi, q], -1)
    match = torch.tensor([[0, 1], [1, 0], [0, -1], [-1, -1], [0, 1], [1, 0]])[:B]
    valid = torch.ones(B, P, dtype=torch.bool)
    valid[4, 1] = False
    return FlatBatch(raw=torch.randn(int(offsets[-1]), 23, generator=g), offsets=offsets,
                     **random_outputs(g, offsets, N, D), match=match, targets=targets, target_valid=valid,
                     event_id=torch.arange(B))


def test_head_shapes_loss_and_gradients():
    batch = flat_batch()
    head = RegressionHead(HeadConfig(hidden_dim=16, num_layers=3, dropout=0.0), dim=8)
    assert head.mlp[0].in_features == 9 * 8
    out = head(batch)
    assert out.shape == (6, 2, 3)  # qpt, eta, phi
    loss, n = head.loss(out, batch)
    # matched and valid: events 0,1 (2 each), 2 (1), 3 (0), 4 (slot 1 -> invalid target), 5 (2)
    assert int(n) == 2 + 2 + 1 + 0 + 1 + 2
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())
    assert head.raw_net.net[0].weight.grad.abs().sum() > 0


def test_matched_targets_follow_the_match():
    batch = flat_batch()
    target, valid = matched_targets(batch)
    torch.testing.assert_close(target[1, 0], batch.targets[1, 1])
    torch.testing.assert_close(target[1, 1], batch.targets[1, 0])
    assert not valid[2, 1] and not valid[4, 1] and valid[4, 0]


def test_target_transform_round_trip_and_phi_wrap():
    batch = flat_batch()
    for kind in ("qpt", "pt", "log_pt"):
        t = TargetTransform(kind)
        t.fit(batch.targets, batch.target_valid)
        std_out = (t.encode(batch.targets) - t.mean) / t.std
        back = t.decode(std_out)
        torch.testing.assert_close(back, batch.targets, rtol=1e-4, atol=1e-4)
        assert torch.allclose(t.residual(std_out, batch.targets), torch.zeros(()), atol=1e-5)
    assert abs(float(t.mean[t.phi_index])) == 0.0
    # a prediction at +π-0.01 against a truth at -π+0.01 is 0.02 away, not 2π-0.02
    t = TargetTransform("pt")
    truth = torch.tensor([[10.0, 0.0, -math.pi + 0.01, 1.0]])
    out = torch.tensor([[10.0, 0.0, math.pi - 0.01, 1.0]])
    torch.testing.assert_close(t.residual(out, truth)[0, 2], torch.tensor(-0.02), atol=1e-5, rtol=0)
    torch.testing.assert_close(wrap_angle(torch.tensor([math.pi, -math.pi, 3 * math.pi / 2])),
                               torch.tensor([math.pi, math.pi, -math.pi / 2]))


def test_predict_is_physical_and_checkpoint_round_trip():
    batch = flat_batch()
    head = RegressionHead(HeadConfig(hidden_dim=16, num_layers=2, pooling=["mean", "max"]), dim=8)
    head.targets.fit(batch.targets, batch.target_valid)
    head.eval()
    pred = head.predict(batch)
    assert pred.shape == (6, 2, 4)
    assert (pred[..., 0] > 0).all() and set(pred[..., 3].unique().tolist()) <= {-1.0, 1.0}
    assert (pred[..., 2].abs() <= math.pi).all()
    again = head_from_checkpoint(head_state(head))
    torch.testing.assert_close(again.predict(batch), pred)
    torch.testing.assert_close(again.targets.std, head.targets.std)


def test_pools_use_final_logits_only():
    """Changing a logit below threshold to another value below threshold leaves the prediction unchanged."""
    batch = flat_batch()
    head = RegressionHead(HeadConfig(hidden_dim=16, dropout=0.0, threshold=0.5), dim=8).eval()
    before = head(batch)
    low = torch.sigmoid(batch.logit) < 0.5
    batch.logit = torch.where(low, batch.logit - 5.0, batch.logit)
    torch.testing.assert_close(head(batch), before)
    batch.logit = batch.logit + 5.0  # now more hits pass: the prediction must change
    assert not torch.allclose(head(batch), before)


def test_head_set_pools_together_exactly_as_each_head_alone():
    from contextlib import nullcontext

    from hepreg.models.head import HeadSet

    batch = flat_batch()
    heads = [RegressionHead(HeadConfig(hidden_dim=w, dropout=0.0, threshold=t, pooling=p), dim=8).eval()
             for w, t, p in ((16, 0.1, ["mean", "sum", "max", "min"]), (32, 0.1, ["mean", "sum", "max", "min"]),
                             (8, 0.4, ["max", "mean"]))]
    hs = HeadSet(heads)
    plans = {t: heads[0].plan(batch) if t == 0.1 else heads[2].plan(batch) for t in (0.1, 0.4)}
    outs = hs(batch, plans, [2, 0, 1], [nullcontext()] * 3)
    for k, out in zip([2, 0, 1], outs):
        assert torch.equal(out, heads[k](batch))


def test_raw_inputs_are_standardised_with_fitted_statistics():
    torch.manual_seed(0)
    head = RegressionHead(HeadConfig(hidden_dim=16, dropout=0.0), dim=8).eval()
    raw = torch.randn(500, 23) * torch.linspace(0.1, 20.0, 23) + torch.linspace(-5.0, 5.0, 23)
    raw[:, 3] = 7.0  # a constant feature passes through unscaled
    head.fit_inputs(raw)
    assert torch.allclose(head.raw_mean, raw.mean(0), atol=1e-4)
    assert head.raw_std[3] == 1.0 and torch.allclose(head.raw_std[:3], raw[:, :3].std(0), rtol=1e-4)
    batch = FlatBatch(raw=raw[:4], embed=torch.zeros(4, 8), logit=torch.zeros(4, 2),
                      offsets=torch.tensor([0, 4]), query_embed=torch.zeros(1, 2, 8),
                      track_logit=torch.zeros(1, 2), match=torch.tensor([[0, -1]]), targets=torch.ones(1, 2, 4),
                      target_valid=torch.tensor([[True, False]]), event_id=torch.tensor([0]))
    seen = head.hit_features(batch)[0]
    expected = head.raw_net((raw[:4] - raw.mean(0)) / head.raw_std)
    assert torch.allclose(seen, expected, atol=1e-5)
    state = head_state(head)
    assert torch.equal(head_from_checkpoint(state).raw_std, head.raw_std)


def padded(batch: FlatBatch, extra: int = 3):
    """The flat batch as padded tensors (M = largest event + `extra` padding slots)."""
    B, counts = batch.size, batch.num_hits
    M = int(counts.max()) + extra
    hit_valid = torch.arange(M)[None, :] < counts[:, None]  # [B, M]

    def pad(x, fill=0.0):
        out = torch.full((B, M) + tuple(x.shape[1:]), fill)
        out[hit_valid] = x
        return out

    return (pad(batch.raw), hit_valid, pad(batch.embed), pad(batch.logit, -1e4).transpose(1, 2),
            batch.query_embed)


@pytest.mark.parametrize("pooling,pt_target", [(["mean", "sum", "max", "min"], "qpt"), (["max", "mean"], "pt"),
                                               (["sum"], "log_pt")])
def test_padded_prediction_equals_flat(pooling, pt_target):
    batch = flat_batch(B=6, seed=3)
    batch.logit[:4] = -8.0  # the first event's (some) hits below threshold for every query
    head = RegressionHead(HeadConfig(hidden_dim=16, num_layers=2, dropout=0.0, pooling=pooling,
                                     pt_target=pt_target, threshold=0.2), dim=8).eval()
    head.fit_inputs(batch.raw * 3 + 1)
    head.targets.fit(batch.targets, batch.target_valid)
    flat = head.predict_columns(batch)
    with torch.no_grad():
        dense = head.predict_padded(*padded(batch))
    assert list(flat) == ["pt", "eta", "phi", "q"] and list(dense) == list(flat)
    for k in flat:
        assert flat[k].shape == (6, 2)
        torch.testing.assert_close(dense[k], flat[k], rtol=1e-5, atol=1e-5)


def test_padded_prediction_of_an_event_without_hits_is_finite():
    batch = flat_batch()
    head = RegressionHead(HeadConfig(hidden_dim=16, num_layers=2, dropout=0.0), dim=8).eval()
    raw, hit_valid, embed, logit, q = padded(batch)
    hit_valid[1] = False
    with torch.no_grad():
        out = head.predict_padded(raw, hit_valid, embed, logit, q)
    assert all(torch.isfinite(v).all() for v in out.values())
