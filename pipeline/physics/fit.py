"""The optimal track fit: least squares with the full detector model, the beam line and fitted scattering.

Parameters are those of `hepreg.physics.measurements` (q/pT, theta, phi at the origin and the three
multiple-scattering kinks with their Highland priors); the trajectory is the generator's own
(`hepreg.physics.detector.propagate`: field volume as generated, both scattering layers). Gauss-Newton steps
from the linear beam-line fit of `hepreg.physics.linear_fit`, every drift circle's side re-resolved from the
current trajectory at each step; after `REJECT_AFTER` steps the hits further than `OUTLIER_PULL` sigmas from
it are left out (a noise tube or another muon's hit pulls a least-squares fit far) and the steps go on.

Its covariance is the inverse Fisher information at the fitted parameters: for the track's own hits, the
Cramér–Rao bound at its estimate. On truth hits the fit reaches the bound (tests/test_physics.py); a head
that takes it as its proxy gets each track's expected resolution with it.

No data-dependent shapes, no LAPACK, float64 except atan2: the heads' fit proxy runs it inside ONNX.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from hepreg.physics.detector import ST_INDEX
from hepreg.physics.linear_fit import fit_with_outliers
from hepreg.physics.measurements import (
    DRIFT_SIGMA, Hits, atan2, one_thread, cholesky_solve, diag, diagonal, covariance, eta_of, hits_of, information, jacobian, prior_information, residuals,
    theta_of)

# The tube measurement of each step: None = the wire alone (from a rough start no side of a wire is known), else
# the drift circle with this sigma [mm], annealed down to the resolution so that early steps, while some sides
# are still wrong, do not lock them in.
SCHEDULE = (None, None, 3.0, 1.0, 0.3, 0.3, DRIFT_SIGMA, DRIFT_SIGMA, DRIFT_SIGMA, DRIFT_SIGMA)
REJECT_AFTER = 7  # steps before the outliers are left out
OUTLIER_PULL = 5.0  # a hit further than this many sigmas from the trajectory is left out
HUBER = 3.0  # sigmas: beyond, a residual counts linearly in the steps before (an outlier cannot drag the fit)
MAX_DPHI, MAX_DTHETA = 0.3, 0.25  # rad: hits further than this from the start, seen from the origin, are not
                                  # the track's (a 3 GeV muon bends by ~0.1 rad)
PHI_PRIOR = 0.1  # rad: the start's azimuth as a loose prior (tubes alone barely see phi; its chamber bounds it)
RETRY_CHI2_NDF = 1.8  # a fit worse than this is tried again from the start's own drift-circle sides
MIN_TUBES = 6  # tubes a fit needs (after outliers)
MAX_QPT = 2.0  # 1/GeV: a fit beyond it (pT < 0.5 GeV) has failed


@dataclass
class OptimalFit:
    """Per track [T]: the estimate, its covariance-derived widths and quality; per hit [T, L]: its pull and
    whether it was kept."""
    qpt: Tensor
    eta: Tensor
    phi: Tensor
    sigma_qpt: Tensor  # sqrt of the inverse Fisher information: absolute widths
    sigma_eta: Tensor
    sigma_phi: Tensor
    chi2: Tensor       # over the kept measurements, normalised
    ndf: Tensor
    tube_hits: Tensor  # tubes kept
    ok: Tensor
    pull: Tensor       # [T, L] a hit's (measured - fitted) / sigma: the drift radius of a tube, the bending
                       # coordinate of a strip; 0 for padding; outliers keep theirs
    kept: Tensor       # [T, L] bool

    def replace_rows(self, rows: Tensor, other: "OptimalFit") -> "OptimalFit":
        """This fit with the tracks `rows` [R] replaced by `other`'s R tracks."""
        return OptimalFit(**{f: getattr(self, f).index_copy(0, rows, getattr(other, f))
                             for f in self.__dataclass_fields__})


@torch.no_grad()
def optimal_fit(raw: Tensor, mask: Tensor, qpt0: Tensor, eta0: Tensor, phi0: Tensor, start_ok: Tensor,
                compact: bool = True, pull_mask: Tensor | None = None, suspect: Tensor | None = None) -> OptimalFit:
    """raw [T, L, 23] scaled hit features, mask [T, L] the hits to fit, and a start (q/pT, eta, phi, ok [T])
    -> OptimalFit. Tracks without a usable start, or with too few tubes, are not ok.

    Each track is fitted from the start in two phases (wires, then drift circles). A track whose fit stays poor
    (a whole station's drift circles on the wrong side: a local minimum) is fitted again from the start's own
    sides, and the better of the two kept by their chi2 with every outlier counted at the cut. `compact`
    refits only those tracks; without it every track is refitted (no data-dependent shape, for ONNX) and
    the results are the same. `pull_mask` [T, L]: the hits to give a pull (default: those fitted). `suspect`
    [T, L]: hits the start found off its trajectory, left out until the outliers are chosen."""
    hits = hits_of(raw, mask)
    zero = torch.zeros_like(qpt0, dtype=torch.float64)
    x0 = torch.stack([qpt0.double(), theta_of(eta0.double()), phi0.double(), zero, zero, zero], -1)  # [T, 6]
    # a hit far off the track's direction (another muon's, or noise elsewhere) crosses no plane near it
    near = ((torch.cos(atan2(hits.y, hits.x) - x0[:, 2:3]) > math.cos(MAX_DPHI))
            & (torch.cos(atan2(hits.rho, hits.z) - x0[:, 1:2]) > math.cos(MAX_DTHETA)))
    hits = hits.take(near & _station_mates(hits))
    x, used = _descend(hits, x0, SCHEDULE, x0, None if suspect is None else ~suspect)
    chi2, ndf = _chi2(x, used)
    poor = start_ok & ~((chi2 <= RETRY_CHI2_NDF * ndf) & (used.tube.sum(-1) >= MIN_TUBES))
    rows = poor.nonzero()[:, 0] if compact else torch.arange(poor.shape[0], device=poor.device)
    if not compact or rows.numel():
        sub = hits.rows(rows)
        x_b, used_b = _descend(sub, x0[rows], tuple(s for s in SCHEDULE if s is not None), x0[rows],
                               None if suspect is None else ~suspect[rows])
        better = poor[rows] & (_truncated_cost(x_b, sub, x0[rows]) < _truncated_cost(x[rows], sub, x0[rows]))
        x = x.index_copy(0, rows, torch.where(better[:, None], x_b, x[rows]))
        used = used.index_copy(rows, used_b, better)
    return _result(x, hits if pull_mask is None else hits_of(raw, pull_mask), used, start_ok)


def _descend(hits: Hits, x: Tensor, schedule: tuple, start: Tensor, first: Tensor | None) -> tuple[Tensor, Hits]:
    """Levenberg-Marquardt steps from x [T, 6]: a step that raises the cost is not taken. The steps before the
    outliers are chosen use the hits `first` [T, L] (all by default). Returns the parameters and the hits kept
    (outliers of all the hits left out after REJECT_AFTER steps)."""
    used = hits if first is None else hits.take(first)
    damping = torch.full_like(x[:, 0], 1e-3)  # [T]
    path = None  # [T, L] the crossings of the current x: the next prediction starts from them
    for step, sigma in enumerate(schedule):
        if step == len(schedule) - (len(SCHEDULE) - REJECT_AFTER):
            r, _, _ = residuals(x, hits)
            inlier = (r.abs() <= OUTLIER_PULL).all(-1)  # [T, L]
            enough = (hits.tube & inlier).sum(-1) >= MIN_TUBES  # else the fit is wrong, not its hits: keep all
            used = hits.take(inlier | ~enough[:, None])
        kw = dict(wires=True) if sigma is None else dict(tube_sigma=sigma)
        prior, centre = _prior(x, start)
        base = residuals(x, used, path=path, newton_steps=5 if path is None else 1, **kw)
        r, J = jacobian(x, used, base[1], base=base, **kw)
        w = _huber_weight(r)[..., None]  # iteratively reweighted: an outlier pulls by HUBER sigmas at most
        r_w, J = r * w[..., 0], J * w
        A = J.flatten(1, 2)  # [T, 2L, 6]
        N = information(J, prior)
        g = -(A.transpose(1, 2) @ r_w.flatten(1, 2)[..., None])[..., 0] - prior * (x - centre)  # [T, 6]
        N = N + damping[:, None, None] * diag(diagonal(N))
        delta, ok_step = cholesky_solve(N, g[..., None])
        trial = x + torch.where(ok_step[:, None], delta[..., 0], torch.zeros_like(x))
        r_trial, _, c_trial = residuals(trial, used, path=base[2].path, newton_steps=2, **kw)
        better = _cost(r_trial, trial - centre, prior) < _cost(r, x - centre, prior)
        x = torch.where(better[:, None], trial, x)
        path = torch.where(better[:, None], c_trial.path, base[2].path)
        damping = torch.where(better, damping * 0.1, damping * 10).clamp(1e-7, 1e7)
    return x, used


def _station_mates(hits: Hits, least: int = 3) -> Tensor:
    """[T, L] True for strips, and for tubes with at least `least` tubes of the track in their station: a muon
    crossing a station leaves ~8, so a lone tube there is noise."""
    count = torch.zeros_like(hits.station)
    for c in ST_INDEX.tolist():
        same = (hits.station == c) & hits.tube
        count = count + same * same.sum(-1, keepdim=True)
    return ~hits.tube | (count >= least)


def _prior(x: Tensor, start: Tensor) -> tuple[Tensor, Tensor]:
    """The Gaussian priors of a fit [T, 6] (inverse variances) and their centres [T, 6]: the kinks' Highland
    widths around 0, and PHI_PRIOR around the start's azimuth."""
    prior = prior_information(x)
    phi = torch.zeros_like(prior)
    phi[:, 2] = 1.0
    return prior + phi / PHI_PRIOR ** 2, start * phi


def _huber_weight(r: Tensor) -> Tensor:
    """sqrt of the Huber weight of each normalised residual: 1 within HUBER, HUBER / |r| beyond."""
    return torch.sqrt(HUBER / r.abs().clamp_min(HUBER))


def _cost(r: Tensor, x: Tensor, prior: Tensor) -> Tensor:
    """Huber cost of the measurements' residuals r [T, L, 2] (r^2 within HUBER, linear beyond) and chi2 of the
    priors (x: the parameters less the priors' centres) [T] (inf where not finite)."""
    a = r.abs()
    cost = torch.where(a <= HUBER, a * a, 2 * HUBER * a - HUBER * HUBER).sum((1, 2)) + (prior * x * x).sum(-1)
    return torch.where(torch.isfinite(cost), cost, torch.full_like(cost, float("inf")))


def _chi2(x: Tensor, used: Hits) -> tuple[Tensor, Tensor]:
    r = residuals(x, used)[0]
    return (r ** 2).sum((1, 2)), (used.tube.sum(-1) + 2 * used.strip.sum(-1) - 3).double()


def _truncated_cost(x: Tensor, hits: Hits, start: Tensor) -> Tensor:
    """chi2 over all the hits with each measurement counted at most OUTLIER_PULL^2: fits that keep different
    hits compared on the same hits."""
    r = residuals(x, hits)[0]
    prior, centre = _prior(x, start)
    cost = (r ** 2).clamp_max(OUTLIER_PULL ** 2).sum((1, 2)) + (prior * (x - centre) ** 2).sum(-1)
    return torch.where(torch.isfinite(cost), cost, torch.full_like(cost, float("inf")))


def _result(x: Tensor, hits: Hits, used: Hits, start_ok: Tensor) -> OptimalFit:
    """The estimate, its covariance (inverse Fisher information at x) and its quality."""
    r, side, crossing = residuals(x, used)
    _, J = jacobian(x, used, side, base=(r, side, crossing))
    C, ok_cov = covariance(information(J, prior_information(x)))
    sd = torch.sqrt(diagonal(C).clamp_min(0.0))  # [T, 3]
    pull_all, _, _ = residuals(x, hits)
    tubes = used.tube.sum(-1)
    ok = (start_ok & ok_cov & (tubes >= MIN_TUBES) & torch.isfinite(x).all(-1) & (x[:, 0].abs() < MAX_QPT)
          & torch.isfinite(sd).all(-1))
    theta = x[:, 1]
    keep = lambda v: torch.where(ok, v, torch.zeros_like(v))  # noqa: E731
    return OptimalFit(
        qpt=keep(x[:, 0]), eta=keep(eta_of(theta)), phi=keep(x[:, 2]), sigma_qpt=keep(sd[:, 0]),
        sigma_eta=keep(sd[:, 1] / torch.sin(theta).abs().clamp_min(1e-6)), sigma_phi=keep(sd[:, 2]),
        chi2=keep((r ** 2).sum((1, 2))), ndf=keep((tubes + 2 * used.strip.sum(-1) - 3).double()),
        tube_hits=tubes.double(), ok=ok,
        pull=torch.where(ok[:, None], pull_all[..., 0], torch.zeros_like(pull_all[..., 0])),
        kept=(used.tube | used.strip) & ok[:, None])


def fit_hits(raw: Tensor, mask: Tensor, compact: bool = True, pull_mask: Tensor | None = None) -> OptimalFit:
    """The optimal fit of tracks from their hits alone (raw [T, L, 23], mask [T, L]), started from the linear
    beam-line fit (`hepreg.physics.linear_fit`, its outliers refitted), whose outliers it leaves out until it
    chooses its own."""
    with one_thread():
        start = fit_with_outliers(raw, mask, vertex=True, compact=compact)
        return optimal_fit(raw, mask, start.qpt, start.eta, start.phi, start.ok, compact=compact,
                           pull_mask=pull_mask, suspect=start.outlier)
