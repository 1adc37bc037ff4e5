import itertools

import numpy as np
import pytest
import torch

from hepreg.settings import AssignConfig
from hepreg.models.assign_metrics import assignment_counts, rates
from hepreg.models.matcher import match_queries, pad_targets, pair_costs


def random_event_batch(B, N, P, M, seed=0):
    g = torch.Generator().manual_seed(seed)
    track_logit = torch.randn(B, N, generator=g) * 3
    mask_logit = torch.randn(B, N, M, generator=g) * 3
    hit_valid = torch.rand(B, M, generator=g) < 0.8
    particle_valid = torch.rand(B, P, generator=g) < 0.7
    owner = torch.randint(-1, P, (B, M), generator=g)
    particle_hit_valid = (owner.unsqueeze(1) == torch.arange(P).view(1, P, 1)) & hit_valid.unsqueeze(1)
    particle_hit_valid &= particle_valid.unsqueeze(-1)
    return track_logit, mask_logit, hit_valid, particle_valid, particle_hit_valid


def brute_force_cost(cost):
    """Minimum total cost over all injective query -> column assignments."""
    N, K = cost.shape
    return min(sum(cost[n, perm[n]] for n in range(N)) for perm in itertools.permutations(range(K), N))


@pytest.mark.parametrize("N,P", [(2, 2), (3, 2), (2, 4), (4, 4)])
def test_matcher_is_optimal_against_brute_force(N, P):
    cfg = AssignConfig(dice_cost=0.5)
    tl, ml, hv, pv, phv = random_event_batch(B=16, N=N, P=P, M=12, seed=N * 10 + P)
    match = match_queries(tl, ml, hv, pv, phv, cfg)
    assert match.shape == (16, N) and match.dtype == torch.long
    tv, th = pad_targets(pv, phv, N)
    cost = pair_costs(tl, ml, hv, tv, th, cfg.valid_cost, cfg.mask_cost, cfg.dice_cost).numpy()
    for b in range(16):
        m = match[b].numpy()
        real = m[m >= 0]
        assert len(set(real.tolist())) == len(real), "a target was matched twice"
        assert pv[b, real].all(), "matched to an invalid target"
        # the cost of the returned assignment, with -1 slots filled by the best free invalid columns
        used = set(real.tolist())
        free_invalid = [k for k in range(cost.shape[2]) if k not in used and not tv[b, k]]
        unmatched = [n for n in range(N) if m[n] < 0]
        chosen = sum(cost[b, n, m[n]] for n in range(N) if m[n] >= 0)
        if unmatched:
            chosen += brute_force_cost(cost[b][np.ix_(unmatched, free_invalid)])
        assert chosen == pytest.approx(brute_force_cost(cost[b]), rel=1e-5, abs=1e-5)


def test_matcher_assigns_obvious_pairs_and_handles_empty_and_single_track_events():
    cfg = AssignConfig()
    M = 6
    hit_valid = torch.ones(3, M, dtype=torch.bool)
    phv = torch.zeros(3, 2, M, dtype=torch.bool)
    phv[:, 0, :3] = True
    phv[:, 1, 3:] = True
    pv = torch.tensor([[True, True], [False, True], [False, False]])
    phv &= pv.unsqueeze(-1)
    # query 0 predicts target 1's hits, query 1 predicts target 0's hits
    ml = torch.full((3, 2, M), -8.0)
    ml[:, 0, 3:] = 8.0
    ml[:, 1, :3] = 8.0
    tl = torch.full((3, 2), 5.0)
    match = match_queries(tl, ml, hit_valid, pv, phv, cfg)
    assert match[0].tolist() == [1, 0]
    assert match[1].tolist() == [1, -1]  # one real track: the query holding its hits gets it
    assert match[2].tolist() == [-1, -1]


def test_metrics_counts_and_rates():
    target_valid = torch.tensor([[True, True]])
    target_hits = torch.tensor([[[1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1]]], dtype=torch.bool)
    pred_hits = torch.tensor([[[1, 1, 1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0, 1, 1]]], dtype=torch.bool)
    pred_valid = torch.tensor([[True, True]])
    c = assignment_counts(pred_valid, pred_hits, target_valid, target_hits, torch.tensor([[0, 1]]))
    r = rates(c)
    assert r["track_eff"] == 1.0 and r["fake_rate"] == 0.0
    assert r["hit_eff"] == pytest.approx((0.75 + 0.5) / 2)
    assert r["hit_purity"] == pytest.approx((0.75 + 1.0) / 2)
    assert r["dm_eff"] == 0.5  # the second track has efficiency exactly 0.5, not > 0.5
    c = assignment_counts(torch.tensor([[True, True]]), pred_hits, torch.tensor([[True, False]]),
                          target_hits, torch.tensor([[0, -1]]))
    r = rates(c)
    assert r["fake_rate"] == 0.5 and r["track_eff"] == 1.0


@pytest.mark.parametrize("K", [2, 3, 4])
def test_two_query_assignment_is_scipys(K):
    """Closed form for two queries: scipy's own assignment for K = 2 (ties included: integer costs tie often),
    an optimal one of distinct columns for more columns."""
    from scipy.optimize import linear_sum_assignment

    from hepreg.models.matcher import min_cost_columns

    g = torch.Generator().manual_seed(K)
    for cost in (torch.randint(0, 3, (4000, 2, K), generator=g).float(), torch.randn(4000, 2, K, generator=g)):
        ours = min_cost_columns(cost).numpy()
        ref = np.stack([linear_sum_assignment(c)[1] for c in cost.numpy()])
        assert (ours[:, 0] != ours[:, 1]).all()
        total = lambda cols: np.take_along_axis(cost.numpy(), cols[:, :, None], 2).sum((1, 2))  # noqa: E731
        np.testing.assert_array_equal(total(ours), total(ref))
        if K == 2:
            np.testing.assert_array_equal(ours, ref)


def test_one_query_and_many_queries_assignment():
    from hepreg.models.matcher import min_cost_columns

    cost = torch.tensor([[[3.0, 1.0, 1.0]], [[0.0, 2.0, -1.0]]])
    assert min_cost_columns(cost).tolist() == [[1], [2]]
    cost = torch.tensor([[[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [3.0, 6.0, 9.0]]])  # N = 3: scipy's Hungarian
    assert sorted(min_cost_columns(cost)[0].tolist()) == [0, 1, 2]
    assert min_cost_columns(torch.zeros(0, 2, 2)).shape == (0, 2)
