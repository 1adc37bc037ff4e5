"""The regression heads, their inputs, targets and checkpoint round trip, on hand-built FlatBatch tensors."""
import math
from contextlib import nullcontext

import pytest
import torch

from hepreg.flat import FlatBatch
from hepreg.settings import HeadConfig
from hepreg.data.layout import RAW_FEATURES
from hepreg.models.head import (HeadSet, batch_inputs, build_head, head_from_checkpoint, head_state,
                                matched_targets, pool)
from hepreg.models.targets import TargetTransform, wrap_angle
from hepreg.models.track_inputs import FRAME_HIT_FEATURES, FRAME_TRACK_FEATURES, InputSpec, prepare
from hepreg.models.tracks import from_flat, from_padded

KINDS = {  # every kind and input option a sweep may mix
    "seeds": dict(kind="pooled", track_frame=False, fit_proxy=False),
    "frame": dict(kind="pooled", track_frame=True, fit_proxy=False),
    "fit": dict(kind="pooled", track_frame=True, fit_proxy=True),
    "attention": dict(kind="attention", track_frame=True, fit_proxy=True, attn_dim=16, attn_heads=2),
    "gaussian": dict(kind="pooled", loss="gaussian_nll"),
}
F = {c: i for i, c in enumerate(RAW_FEATURES)}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def flat_batch(B=6, N=2, D=8, P=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 12, (B,), generator=g)
    offsets = torch.zeros(B + 1, dtype=torch.long)
    offsets[1:] = counts.cumsum(0)
    H = int(offsets[-1])
    pt = torch.rand(B, P, generator=g) * 50 + 5
    q = torch.where(torch.rand(B, P, generator=g) > 0.5, 1.0, -1.0)
    targets = torch.stack([pt, torch.randn(B, P, generator=g), (torch.rand(B, P, generator=g) * 2 - 1) * math.pi, q], -1)
    match = torch.tensor([[0, 1], [1, 0], [0, -1], [-1, -1], [0, 1], [1, 0]])[:B]
    valid = torch.ones(B, P, dtype=torch.bool)
    valid[4, 1] = False
    raw = torch.randn(H, 23, generator=g)
    raw[:, F["spacePoint_technology"]] = torch.randint(0, 4, (H,), generator=g).float()
    return FlatBatch(raw=raw, embed=torch.randn(H, D, generator=g),
                     logit=torch.randn(H, N, generator=g) * 3, offsets=offsets,
                     query_embed=torch.randn(B, N, D, generator=g), track_logit=torch.randn(B, N, generator=g),
                     match=match, targets=targets, target_valid=valid, event_id=torch.arange(B))


def make_head(name, **kw):
    head = build_head(HeadConfig(hidden_dim=16, num_layers=3, dropout=0.0, **{**KINDS[name], **kw}), dim=8)
    head.estimate_scales(flat_batch(seed=1))
    return head


@pytest.mark.parametrize("name", KINDS)
def test_head_shapes_loss_and_gradients(name):
    batch = flat_batch()
    head = make_head(name)
    out = head(batch)
    assert out.value.shape == (6, 2, 3) and out.reference.shape == (6, 2, 3)  # qpt, eta, phi
    assert (out.sigma is not None) == (name == "gaussian")
    loss, n = head.loss(out, batch)
    # matched and valid: events 0,1 (2 each), 2 (1), 3 (0), 4 (slot 1 -> invalid target), 5 (2)
    assert int(n) == 2 + 2 + 1 + 0 + 1 + 2
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())
    assert head.hit_net.weight.grad.abs().sum() > 0 if name == "attention" else \
        head.hit_net.net[0].weight.grad.abs().sum() > 0


def test_the_seeds_head_reads_global_raw_features_and_pools_nine_times_the_width():
    head = make_head("seeds")
    assert head.mlp[0].in_features == 9 * 8 and head.hit_names == RAW_FEATURES and head.track_names == ()
    x = head.inputs(flat_batch())
    assert torch.equal(x.reference[:, :3], torch.zeros_like(x.reference[:, :3]))  # regressed absolutely,
    assert torch.equal(x.reference[:, 3:], torch.ones_like(x.reference[:, 3:]))  # in the targets' own units


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
        t.estimate(batch.targets, batch.target_valid)
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


def test_target_transform_relative_to_a_reference():
    """Regressing relative to a reference: decode adds it back, residuals do not depend on it."""
    batch = flat_batch()
    t = TargetTransform("qpt")
    reference = torch.randn(6, 2, 3)
    t.estimate(batch.targets, batch.target_valid, reference)
    std_out = (t.encode(batch.targets) - reference - t.mean) / t.std
    std_out[..., 2] = wrap_angle(std_out[..., 2] * t.std[2]) / t.std[2]
    torch.testing.assert_close(t.decode(std_out, reference), batch.targets, rtol=1e-4, atol=1e-4)
    assert torch.allclose(t.residual(std_out, batch.targets, reference), torch.zeros(()), atol=1e-4)


@pytest.mark.parametrize("name", KINDS)
def test_predict_is_physical_and_checkpoint_round_trip(name):
    batch = flat_batch()
    head = make_head(name, pooling=["mean", "max"]).eval()
    cols = head.predict_columns(batch)
    assert {"pt", "eta", "phi", "q"} <= set(cols) and all(v.shape == (6, 2) for v in cols.values())
    assert (cols["pt"] > 0).all() and set(cols["q"].unique().tolist()) <= {-1.0, 1.0}
    assert (cols["phi"].abs() <= math.pi).all()
    if name == "gaussian":
        assert all((cols[f"sigma_{n}"] > 0).all() for n in ("qpt", "eta", "phi", "pt"))
    again = head_from_checkpoint(head_state(head))
    torch.testing.assert_close(again.predict_columns(batch), cols)
    torch.testing.assert_close(again.targets.std, head.targets.std)


@pytest.mark.parametrize("name", KINDS)
def test_pools_use_final_logits_only(name):
    """Changing a logit below threshold to another value below threshold leaves the prediction unchanged."""
    batch = flat_batch()
    head = make_head(name, threshold=0.5).eval()
    before = head(batch).value
    low = torch.sigmoid(batch.logit) < 0.5
    batch.logit = torch.where(low, batch.logit - 5.0, batch.logit)
    torch.testing.assert_close(head(batch).value, before)
    batch.logit = batch.logit + 5.0  # now more hits pass: the prediction must change
    assert not torch.allclose(head(batch).value, before)


@pytest.mark.parametrize("name", KINDS)
def test_dropping_inactive_hits_changes_nothing(name):
    """Export prunes hits no query pools: a pruned batch gives bit-identical outputs."""
    batch = flat_batch()
    head = make_head(name, threshold=0.3).eval()
    keep = (torch.sigmoid(batch.logit) >= 0.3).any(1)
    counts = torch.stack([keep[s:e].sum() for s, e in zip(batch.offsets[:-1], batch.offsets[1:])])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    pruned = FlatBatch(raw=batch.raw[keep], embed=batch.embed[keep], logit=batch.logit[keep], offsets=offsets,
                       query_embed=batch.query_embed, track_logit=batch.track_logit, match=batch.match,
                       targets=batch.targets, target_valid=batch.target_valid, event_id=batch.event_id)
    assert keep.sum() < keep.numel()
    assert torch.equal(head(pruned).value, head(batch).value)


def test_head_set_runs_mixed_kinds_exactly_as_each_head_alone():
    batch = flat_batch()
    heads = [make_head(n, threshold=t).eval() for n, t in
             (("seeds", 0.1), ("fit", 0.1), ("attention", 0.4), ("frame", 0.4), ("gaussian", 0.1))]
    inputs = batch_inputs(batch, heads)
    spec = lambda t, frame, fit: InputSpec(threshold=t, track_frame=frame, fit_proxy=fit)  # noqa: E731
    # fit and gaussian share one; each key names the head's own settings
    assert set(inputs) == {spec(0.1, False, False), spec(0.1, True, True), spec(0.4, True, True), spec(0.4, True, False)}
    outs = HeadSet(heads).eval()(batch, inputs, [2, 0, 1, 4, 3], [nullcontext()] * 5)
    for k, out in zip([2, 0, 1, 4, 3], outs):
        assert torch.equal(out.value, heads[k](batch).value)


@pytest.mark.parametrize("name", KINDS)
def test_training_computes_the_matched_slots_only_and_exactly(name):
    batch = flat_batch()
    head = make_head(name).eval()
    _, valid = matched_targets(batch)
    part, full = head(batch, only_matched=True).value, head(batch).value
    torch.testing.assert_close(part[valid], full[valid], atol=1e-6, rtol=1e-5)  # other buckets, same numbers
    assert (part[~valid] == 0).all() and (full[~valid] != 0).any()


def test_inputs_are_standardised_with_fitted_statistics():
    batch = flat_batch()
    head = make_head("fit")
    x = head.inputs(flat_batch(seed=1))
    active = x.active_hit_features()
    assert torch.allclose(head.hit_norm.mean, active.mean(0), atol=1e-4)
    std = active.std(0)
    assert torch.allclose(head.hit_norm.std[std > 1e-6], std[std > 1e-6], rtol=1e-4)
    assert (head.hit_norm.std[std <= 1e-6] == 1.0).all()  # a constant feature passes through unscaled
    again = head_from_checkpoint(head_state(head))
    assert torch.equal(again.hit_norm.std, head.hit_norm.std) and torch.equal(again.track_norm.mean, head.track_norm.mean)
    torch.testing.assert_close(again(batch).value, head.eval()(batch).value)


def test_track_frame_features_against_a_hand_computation():
    """Two strips and a barrel tube of one track: centroid direction, relative positions, azimuths."""
    raw = torch.zeros(3, 23)
    points = torch.tensor([[5.0, 0.0, 2.0], [7.5, 0.75, 3.0], [10.0, 0.0, 4.0]])  # metres
    for i, c in enumerate("XYZ"):
        raw[:, F[f"spacePoint_globEdgeLow{c}"]] = points[:, i]
        raw[:, F[f"spacePoint_globEdgeHigh{c}"]] = points[:, i]
    raw[:, F["spacePoint_technology"]] = torch.tensor([2.0, 0.0, 2.0])  # RPC, MDT, RPC
    raw[:, F["spacePoint_driftR"]] = torch.tensor([0.0, 7.0, 0.0])
    logit = torch.tensor([[5.0, -9.0], [0.0, -9.0], [5.0, -9.0]])  # query 0 takes all three (p = 0.99, 0.5, 0.99)
    tracks = from_flat(raw, torch.zeros(3, 4), logit, torch.tensor([0, 3]), torch.zeros(1, 2, 4), 0.1)
    x = prepare(tracks, track_frame=True, fit_proxy=False).dense()
    p = torch.sigmoid(logit[:, 0])
    phi = torch.atan2(points[:, 1], points[:, 0])
    phi0 = torch.atan2((p * phi.sin()).sum(), (p * phi.cos()).sum())
    rho = torch.hypot(points[:, 0], points[:, 1]) / torch.tensor([1.0, float(torch.cos(phi[1] - phi0)), 1.0])
    theta0 = torch.atan2((p * rho).sum() / p.sum(), (p * points[:, 2]).sum() / p.sum())
    u = rho * theta0.sin() + points[:, 2] * theta0.cos()
    v = (-rho * theta0.cos() + points[:, 2] * theta0.sin()) * 1e3
    hit = dict(zip(FRAME_HIT_FEATURES, x.hit_features[0].T))
    track = dict(zip(FRAME_TRACK_FEATURES, x.track_features[0]))
    torch.testing.assert_close(hit["u"], u - (p * u).sum() / p.sum())
    torch.testing.assert_close(hit["v"], v, atol=1e-3, rtol=1e-5)
    assert abs(float((p * v).sum())) < 1e-2  # the centroid lies on the track's axis
    torch.testing.assert_close(hit["dphi"], phi - phi0)
    torch.testing.assert_close(hit["tube"], torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(hit["drift"], torch.tensor([0.0, 7.0, 0.0]))
    torch.testing.assert_close(track["eta0"], -torch.log(torch.tan(theta0 / 2)))
    torch.testing.assert_close(x.reference[0, 1:3], torch.stack([-torch.log(torch.tan(theta0 / 2)), phi0]))
    assert not x.tracks.mask[1].any() and torch.equal(x.hit_features[1], torch.zeros_like(x.hit_features[1]))


def test_attention_track_output_ignores_other_tracks_and_padding():
    head = make_head("attention").eval()
    batch = flat_batch()
    x = head.inputs(batch).dense()  # every slot, padded to the longest track of the batch
    full = head.encode(x)
    # the same tracks with 7 more padding columns, and each track alone
    t = x.tracks
    pad = lambda a, v: torch.cat([a, a.new_full((*a.shape[:1], 7, *a.shape[2:]), v)], 1)
    padded = type(x)(type(t)(raw=pad(t.raw, 0.0), embed=pad(t.embed, 0.0), prob=pad(t.prob, 0.0),
                             mask=pad(t.mask, False), query_embed=t.query_embed, hit=pad(t.hit, -1)),
                     pad(x.hit_features, 0.0), x.track_features, x.reference)
    torch.testing.assert_close(head.encode(padded), full, atol=1e-5, rtol=1e-5)
    for s in (0, 5, 9):
        one = x.take(torch.tensor([s]), max(int(t.mask[s].sum()), 1))  # cut to its own length
        torch.testing.assert_close(head.encode(one)[0], full[s], atol=1e-5, rtol=1e-5)


def test_gaussian_nll_gradients_are_finite_on_extreme_inputs():
    batch = flat_batch()
    head = make_head("gaussian")
    for scale in (1e-6, 1e6):
        for p in head.mlp.parameters():
            p.grad = None
        with torch.no_grad():
            head.mlp[-1].weight.mul_(scale)
            head.mlp[-1].bias.fill_(scale)
        out = head(batch)
        loss, _ = head.loss(out, batch)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in head.parameters())
        with torch.no_grad():
            head.mlp[-1].weight.div_(scale)
    batch.targets[..., 0] = 1e4  # a truth far from anything predicted
    loss, _ = head.loss(head(batch), batch)
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", KINDS)
def test_padded_path_gives_the_flat_numbers(name):
    """predict_padded (event-padded stage-1 outputs, as ONNX sees them) == predict on the flat batch."""
    batch = flat_batch()
    head = make_head(name).eval()
    B, N, M = batch.size, batch.logit.shape[1], int(batch.num_hits.max())
    raw, embed = torch.zeros(B, M, 23), torch.zeros(B, M, 8)
    logit, valid = torch.full((B, N, M), -30.0), torch.zeros(B, M, dtype=torch.bool)
    for b, (s, e) in enumerate(zip(batch.offsets[:-1].tolist(), batch.offsets[1:].tolist())):
        raw[b, :e - s], embed[b, :e - s], logit[b, :, :e - s] = batch.raw[s:e], batch.embed[s:e], batch.logit[s:e].T
        valid[b, :e - s] = True
    flat = head.predict_columns(batch)
    padded = head.predict_padded(raw, valid, embed, logit, batch.query_embed)
    assert set(flat) == set(padded)
    for k in flat:
        torch.testing.assert_close(padded[k], flat[k], atol=1e-4, rtol=1e-3)  # pT = 1/|q/pT| amplifies
    tracks = from_padded(raw, valid, embed, logit, batch.query_embed, head.cfg.threshold)
    assert len(tracks.buckets) == 1 and tracks.buckets[0].raw.shape == (B * N, M, 23)


def test_pool_against_a_loop():
    x = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    prob = torch.rand(3, 5) * mask
    out = pool(x, prob, mask).view(3, 4, 4)
    for s in range(3):
        m = mask[s]
        if not m.any():
            assert torch.equal(out[s], torch.zeros(4, 4))
            continue
        w = prob[s][m]
        xs = x[s][m]
        torch.testing.assert_close(out[s, 0], (w[:, None] * xs).sum(0) / w.sum())
        torch.testing.assert_close(out[s, 1], (w[:, None] * xs).sum(0))
        torch.testing.assert_close(out[s, 2], xs.amax(0))
        torch.testing.assert_close(out[s, 3], xs.amin(0))


@pytest.mark.parametrize("name", ["fit", "attention"])
def test_attention_sub_buckets_and_flat_pooling_give_the_bucket_numbers(name):
    """The fast paths (per-hit MLPs on the real hits of all buckets; attention sub-buckets) against each bucket
    encoded alone, padded, as exported graphs run them."""
    from hepreg.models.head import RegressionHead, attention_parts

    batch = flat_batch(B=6)
    head = make_head(name).eval()
    x = head.inputs(batch)
    fast = head.encode_buckets(x.buckets)
    slow = RegressionHead.encode_buckets(head, x.buckets)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    lengths = torch.tensor([1, 2, 2, 3, 20, 21, 40])
    t = x.buckets[0].tracks
    mask = torch.arange(40)[None] < lengths[:, None]
    from hepreg.models.track_inputs import HeadInputs
    from hepreg.models.tracks import TrackHits
    R = len(lengths)
    wide = TrackHits(raw=torch.zeros(R, 40, 0), embed=torch.randn(R, 40, t.embed.shape[-1]), prob=mask.float(),
                     mask=mask, query_embed=torch.randn(R, t.query_embed.shape[-1]), hit=torch.zeros(R, 40).long())
    parts = attention_parts(HeadInputs(wide, torch.zeros(R, 40, 1), torch.zeros(R, 0), torch.zeros(R, 6)))
    assert sum(p.tracks.mask.shape[0] for p in parts) == R and max(p.tracks.mask.shape[1] for p in parts) == 40


def test_compile_falls_back_to_eager_when_no_compiler_works(monkeypatch):
    from hepreg.runs.compiled import compile_head

    head = make_head("fit").eval()
    batch = flat_batch()
    before = head(batch).value

    def broken(self, *a, **k):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch.nn.Module, "compile", broken)
    assert compile_head(head).startswith("not compiled, eager instead: RuntimeError: no C++ compiler")
    assert torch.equal(head(batch).value, before)


def test_pooling_weights_carry_the_gradient_to_the_logits_end_to_end():
    """Fine-tuning end to end trains stage 1 through the pooling weights p = sigmoid(logit): the pooled head gives
    the logits the gradient the padded pooling gives."""
    from hepreg.models.head import RegressionHead

    batch = flat_batch()
    head = make_head("seeds").train()
    grads = []
    for encode in (head.encode_buckets, lambda xs: RegressionHead.encode_buckets(head, xs)):
        batch.logit = batch.logit.detach().requires_grad_(True)
        head.encode_buckets = encode
        loss, _ = head.loss(head(batch, only_matched=True), batch)
        loss.backward()
        grads.append(batch.logit.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])
