"""The faster stage-1 step computes what the step before it computed, on the same batch.

The earlier step is kept here as the reference, written plainly: every attention through
`scaled_dot_product_attention` (the model with `FEW_KEYS = 0`), each batch as one padded tensor (no
sub-batches: `SPLIT_COST` infinite; the new step is made to split often), the matching cost of every (query, target)
pair from the loss formulas and scipy's Hungarian per event and evaluation, the matched rows' losses
recomputed, AdamW unfused. Loss, its parts, the matching, the gradients and the updated weights must agree
to float rounding.
"""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from hepreg.settings import AssignConfig, ModelConfig
from hepreg.data.batching import HitLoader
from hepreg.data.reader import open_dataset
from hepreg.models import layers, maskformer
from hepreg.models.assign_loss import assignment_loss
from hepreg.models.maskformer import MaskFormer, length_runs
from hepreg.runs.training import make_optimizer

MODEL = ModelConfig(dim=32, num_heads=4, encoder_layers=2, decoder_layers=2, num_queries=2)  # the demo's


def row_terms(x, t, v):
    """x [..., M] logits, t [..., M] target hits, v [..., M] real hits -> (BCE, 1 - dice) [...], the plain way."""
    x, t, v = x.float(), t.float(), v.float()
    bce = ((F.softplus(x) - x * t) * v).sum(-1) / v.sum(-1).clamp(min=1)
    p = torch.sigmoid(x) * v
    dice = 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)
    return bce, dice


def reference_match(track_logit, mask_logit, batch, cfg):
    """scipy's Hungarian on each event's [N, K] cost (targets padded with invalid ones up to N)."""
    B, N, M = mask_logit.shape
    P = batch.particle_valid.shape[1]
    K = max(N, P)
    tv = torch.zeros(B, K, dtype=torch.bool)
    tv[:, :P] = batch.particle_valid
    th = torch.zeros(B, K, M, dtype=torch.bool)
    th[:, :P] = batch.particle_hit_valid
    x = track_logit.detach().float()[:, :, None]  # [B, N, 1]
    bce, dice = row_terms(mask_logit.detach()[:, :, None, :], th[:, None], batch.hit_valid[:, None, None, :])
    cost = cfg.valid_cost * (F.softplus(x) - x * tv[:, None].float())
    cost = cost + tv[:, None].float() * (cfg.mask_cost * bce + cfg.dice_cost * dice)  # [B, N, K]
    match = torch.full((B, N), -1, dtype=torch.long)
    for b in range(B):
        rows, cols = linear_sum_assignment(cost[b].numpy())
        real = (cols < P) & tv[b, cols].numpy()
        match[b, rows[real]] = torch.from_numpy(cols[real])
    return match


def reference_loss(out, batch, cfg):
    """The earlier `assignment_loss`: match each evaluation, then the losses of its matched rows."""
    weights = {"valid": cfg.valid_weight, "mask": cfg.mask_weight, "dice": cfg.dice_weight}
    total, parts = torch.zeros(()), {}
    for layer in out.layers if cfg.intermediate_losses else out.layers[-1:]:
        match = reference_match(layer["track_logit"], layer["mask_logit"], batch, cfg)
        matched = match >= 0
        b, q = matched.nonzero(as_tuple=True)
        bce, dice = row_terms(layer["mask_logit"][b, q], batch.particle_hit_valid[b, match[b, q]],
                              batch.hit_valid[b])
        n_pairs = matched.sum().clamp(min=1)
        values = {"valid": F.binary_cross_entropy_with_logits(layer["track_logit"].float(), matched.float()),
                  "mask": bce.sum() / n_pairs}
        if cfg.dice_weight:
            values["dice"] = dice.sum() / n_pairs
        for name, value in values.items():
            total = total + weights[name] * value
            parts[name] = parts.get(name, 0.0) + value.item()
    return total, parts, match


@pytest.fixture(scope="module")
def batches(tiny_dataset):
    loader = HitLoader(open_dataset(tiny_dataset), 0, 256, batch_size=32, shuffle=True, seed=1, bucket_window=8,
                       batch_by="hits")
    return list(loader)[:3]


@pytest.fixture(autouse=True)
def split_often(monkeypatch):
    """Sub-batches even for the tiny dataset's narrow batches, so that the merged outputs are what is tested."""
    monkeypatch.setattr(maskformer, "SPLIT_COST", 500.0)


def reference_model(monkeypatch):
    """The earlier forward: every attention through SDPA, the batch as one padded tensor."""
    monkeypatch.setattr(layers, "FEW_KEYS", 0)
    monkeypatch.setattr(maskformer, "SPLIT_COST", float("inf"))


def close(new, old, what, rtol=1e-4):
    """Equal to float rounding: relative to the tensor's own scale (a gradient's small entries are sums of
    large terms that cancel)."""
    torch.testing.assert_close(new, old, rtol=rtol, atol=rtol * float(old.detach().abs().max()) + 1e-7, msg=what)


@pytest.mark.parametrize("dice", [0.0, 1.0])
def test_step_equals_the_reference_step(batches, monkeypatch, dice):
    cfg = AssignConfig(dice_cost=dice, dice_weight=dice, lr=3e-3)
    torch.manual_seed(0)
    model = MaskFormer(MODEL)
    reference = copy.deepcopy(model)
    new_opt = make_optimizer(model, type("C", (), {"assign": cfg})())
    old_opt = torch.optim.AdamW(reference.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)
    for batch in batches:
        assert batch.hits.shape[1] > layers.FEW_KEYS  # the hits' attention over the queries takes the new path
        assert len(length_runs(batch.hit_valid.sum(1).tolist())) > 1  # and the batch runs as sub-batches
        loss, parts, match = assignment_loss(model(batch.hits, batch.hit_valid), batch, cfg)
        with monkeypatch.context() as m:
            reference_model(m)
            ref_loss, ref_parts, ref_match = reference_loss(reference(batch.hits, batch.hit_valid), batch, cfg)
        assert torch.equal(match, ref_match)
        close(loss, ref_loss, "loss", rtol=1e-5)
        assert parts.keys() == ref_parts.keys()
        for k in parts:
            assert parts[k] == pytest.approx(ref_parts[k], rel=1e-5), k
        for opt, value in ((new_opt, loss), (old_opt, ref_loss)):
            opt.zero_grad(set_to_none=True)
            value.backward()
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            close(p.grad, q.grad, f"gradient of {name}")
            # the same gradient into both optimisers: Adam's first steps move by ~lr x sign(gradient), so a
            # near-zero entry whose sign differs by rounding would move the other way
            q.grad = p.grad.clone()
        new_opt.step()
        old_opt.step()
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            close(p, q, f"{name} after the optimiser step", rtol=1e-5)
        reference.load_state_dict(model.state_dict())  # the next batch from the same weights


def test_frozen_forward_equals_the_reference(batches, monkeypatch):
    torch.manual_seed(1)
    model = MaskFormer(MODEL).eval().requires_grad_(False)
    for batch in batches:
        with torch.inference_mode():
            new = model(batch.hits, batch.hit_valid)
            with monkeypatch.context() as m:
                reference_model(m)
                old = model(batch.hits, batch.hit_valid)
        real = batch.hit_valid.unsqueeze(-1)  # padded hits' embeddings are never read
        close(new.hit_embed * real, old.hit_embed * real, "hit_embed", rtol=1e-5)
        close(new.query_embed, old.query_embed, "query_embed", rtol=1e-5)
        for a, b in zip(new.layers, old.layers):
            for k in a:
                close(a[k], b[k], k, rtol=1e-5)


@pytest.mark.parametrize("mask", [False, True])
def test_few_keys_attention_equals_sdpa(mask):
    g = torch.Generator().manual_seed(0)
    B, Lq, Lk, H, d = 3, 11, 2, 4, 8
    q, k, v = (torch.randn(B, L, H * d, generator=g, requires_grad=True) for L in (Lq, Lk, Lk))
    m = torch.rand(B, Lq, Lk, generator=g) < 0.6 if mask else None
    if m is not None:
        m[..., 0] = True  # every row reads at least one key
    y = layers.few_keys_attention(q, k, v, H, m)
    heads = lambda t: t.view(B, -1, H, d).transpose(1, 2)  # noqa: E731
    ref = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=None if m is None else m[:, None])
    ref = ref.transpose(1, 2).reshape(B, Lq, H * d)
    torch.testing.assert_close(y, ref)
    grads = torch.autograd.grad(y.square().sum(), (q, k, v))
    for a, b in zip(grads, torch.autograd.grad(ref.square().sum(), (q, k, v))):
        torch.testing.assert_close(a, b)


def test_matching_is_scipys_on_real_batches(batches):
    """The closed-form matching picks scipy's assignment on every evaluation of real events."""
    torch.manual_seed(2)
    model = MaskFormer(MODEL)
    cfg = AssignConfig(dice_cost=1.0)
    for batch in batches:
        with torch.no_grad():
            out = model(batch.hits, batch.hit_valid)
        from hepreg.models.matcher import match_queries

        for layer in out.layers:
            new = match_queries(layer["track_logit"], layer["mask_logit"], batch.hit_valid, batch.particle_valid,
                                batch.particle_hit_valid, cfg)
            assert np.array_equal(new.numpy(), reference_match(layer["track_logit"], layer["mask_logit"], batch,
                                                               cfg).numpy())
