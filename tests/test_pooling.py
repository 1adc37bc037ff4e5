"""The pooled head's reduction of flat CSR batches (through per-track padding) against a straightforward
padded, per-event reference."""
import torch

from hepreg.models.head import POOLINGS, pool
from hepreg.models.hit_pooling import flat_hits, pool_hits
from hepreg.models.tracks import from_flat
from helpers import pool_flat


def padded_reference(x, logit, offsets, threshold):
    """Pad every event to the batch's largest and pool with plain masked tensor ops: [B, N, 4·F]."""
    counts = (offsets[1:] - offsets[:-1]).tolist()
    B, M, N, F = len(counts), max(counts), logit.shape[1], x.shape[1]
    xp = x.new_zeros(B, M, F)
    pp = logit.new_zeros(B, M, N)
    valid = torch.zeros(B, M, dtype=torch.bool)
    for b, c in enumerate(counts):
        s = int(offsets[b])
        xp[b, :c], pp[b, :c], valid[b, :c] = x[s:s + c], torch.sigmoid(logit[s:s + c]), True
    a = (pp >= threshold) & valid[..., None]  # [B, M, N]
    wa = pp * a
    w = wa / wa.sum(1, keepdim=True).clamp_min(1e-30)
    s = torch.einsum("bmn,bmf->bnf", wa, xp)
    m = torch.einsum("bmn,bmf->bnf", w, xp)
    am = a[..., None]  # [B, M, N, 1]
    xe = xp[:, :, None, :]
    mx = torch.where(am, xe, -1e30).amax(1)
    mn = torch.where(am, xe, 1e30).amin(1)
    has = a.any(1)[..., None]
    mx, mn = torch.where(has, mx, 0.0), torch.where(has, mn, 0.0)
    return torch.cat([m, s, mx, mn], -1)


def _batch(seed=0, B=7, N=2, F=5):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 9, (B,), generator=g)
    counts[2] = 0  # an event without hits
    offsets = torch.zeros(B + 1, dtype=torch.long)
    offsets[1:] = counts.cumsum(0)
    H = int(offsets[-1])
    logit = torch.randn(H, N, generator=g, dtype=torch.float64) * 2
    logit[offsets[4]:offsets[5], 1] = -10.0  # query 1 of event 4 gets no hit above threshold
    x = torch.randn(H, F, generator=g, dtype=torch.float64)
    return x, logit, offsets


def test_pool_matches_padded_reference_values_and_gradients():
    x, logit, offsets = _batch()
    threshold = 0.3
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    out = pool_flat(x1, logit, offsets, threshold, POOLINGS)
    ref = padded_reference(x2, logit, offsets, threshold)
    tracks = from_flat(x, x, logit, offsets, x.new_zeros(7, 2, 5), threshold).dense()
    assert out.shape == (7, 2, 4 * 5)
    torch.testing.assert_close(out.double(), ref)
    g = torch.randn_like(ref)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    assert tracks.mask.sum() == (torch.sigmoid(logit) >= threshold).sum()  # every active pair, once


def test_empty_tracks_pool_to_zero_without_nan():
    x, logit, offsets = _batch(seed=3)
    x = x.requires_grad_(True)
    out = pool_flat(x, logit, offsets, 0.3)
    assert torch.isfinite(out).all()
    assert (out[2] == 0).all()  # event with no hits
    assert (out[4, 1] == 0).all()  # query with no hit above threshold
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_threshold_and_pooling_subset():
    x, logit, offsets = _batch(seed=5)
    high = pool_flat(x, logit, offsets, 0.9, ("max",))
    ref = padded_reference(x, logit, offsets, 0.9)[..., 10:15]
    torch.testing.assert_close(high, ref)
    assert not torch.equal(high, pool_flat(x, logit, offsets, 0.1, ("max",)))
    tracks = from_flat(x, x, logit, offsets, x.new_zeros(7, 2, 5), 0.1).dense()
    total = tracks.weight.sum(1)
    nonempty = tracks.mask.any(1)
    torch.testing.assert_close(total[nonempty], torch.ones(int(nonempty.sum()), dtype=total.dtype))


def test_no_active_pair_and_no_event_give_zeros_with_gradients():
    x, logit, offsets = _batch(seed=7)
    x = x.requires_grad_(True)
    out = pool_flat(x, torch.full_like(logit, -30.0), offsets, 0.1)  # every hit below threshold
    assert out.shape == (7, 2, 20) and (out == 0).all()
    out.sum().backward()
    assert x.grad is not None and (x.grad == 0).all()
    empty = pool_flat(x[:0], logit[:0], offsets[:1], 0.1)
    assert empty.shape == (0, 2, 20)


def test_flat_pooling_equals_padded_pooling_values_and_gradients_ties_included():
    """`pool_hits` on the real hits of several buckets == `pool` bucket by bucket, forward and backward; a tie
    (two hits of a track with equal features) shares the gradient as amax does."""
    g = torch.Generator().manual_seed(0)
    masks = [torch.rand(6, 4, generator=g) < 0.7, torch.rand(3, 9, generator=g) < 0.8]
    masks[0][2] = False  # a track without hits
    probs = [torch.rand(m.shape, generator=g, dtype=torch.float64) * m for m in masks]
    xs = [torch.randn(*m.shape, 5, generator=g, dtype=torch.float64) for m in masks]
    xs[1][0, 1] = xs[1][0, 0]  # ties in every feature
    masks[1][0, :2] = True
    padded = [x.clone().requires_grad_(True) for x in xs]
    ref = torch.cat([pool(x, p, m) for x, p, m in zip(padded, probs, masks)])
    flat = torch.cat([x[m] for x, m in zip(xs, masks)]).requires_grad_(True)
    out = pool_hits(flat, flat_hits(masks, probs))
    torch.testing.assert_close(out, ref)
    weights = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    (ref * weights).sum().backward()
    (out * weights).sum().backward()
    torch.testing.assert_close(flat.grad, torch.cat([x.grad[m] for x, m in zip(padded, masks)]))
    assert (out[2] == 0).all()
