"""The Cramér–Rao bound of (q/pT, eta, phi) per track: the smallest resolution the hits allow.

For a track of known parameters and the layers it left hits in, the Fisher information of the detector model
(`hepreg.physics.measurements`) is J^T J over its normalised measurements plus the Gaussian priors of the three
multiple-scattering kinks (their Highland widths at the track's momentum); the origin is a constraint (the
model has no offset). The bound is the (q/pT, theta, phi) block of its inverse, the kinks marginalised.

It is a lower bound under stated assumptions, so read it as one:
- Gaussian measurement errors (drift radius 0.1 mm; strips of 30 mm pitch as Gaussians of pitch / sqrt(12));
- every drift circle's left/right ambiguity resolved;
- perfect assignment: the track's own hits, all of them, nothing else;
- the scattering widths known (taken at the true momentum), energy loss absent, as in the generator.
An efficient estimator on truth hits reaches it; a head on predicted hits can only be compared against it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hepreg.physics.measurements import covariance, diagonal, one_thread, hits_of, information, jacobian, prior_information, residuals


@dataclass
class Bound:
    """Per-track bound, each [T]: absolute widths of q/pT [1/GeV], eta and phi [rad]; ok where defined."""
    qpt: Tensor
    eta: Tensor
    phi: Tensor
    ok: Tensor

    def relative_qpt(self, qpt: Tensor) -> Tensor:
        """sigma(q/pT) / |q/pT|: the bound on the relative q/pT (and pT) resolution."""
        return self.qpt / qpt.abs()


@torch.no_grad()
def track_bound(raw: Tensor, mask: Tensor, qpt: Tensor, theta: Tensor, phi: Tensor) -> Bound:
    """raw [T, L, 23] scaled hit features of each track's own hits (mask [T, L]), its true q/pT, theta and phi
    [T] -> the Cramér–Rao bound of each track."""
    with one_thread():
        return _bound(raw, mask, qpt, theta, phi)


def _bound(raw: Tensor, mask: Tensor, qpt: Tensor, theta: Tensor, phi: Tensor) -> Bound:
    hits = hits_of(raw, mask)
    zero = torch.zeros_like(qpt, dtype=torch.float64)
    params = torch.stack([qpt.double(), theta.double(), phi.double(), zero, zero, zero], -1)  # [T, 6]
    _, side, _ = residuals(params, hits)  # the side each drift circle is on, at the truth
    _, J = jacobian(params, hits, side)
    C, ok = covariance(information(J, prior_information(params)))
    var = diagonal(C).clamp_min(0.0)  # [T, 3]
    sd = torch.sqrt(var)
    ok = ok & torch.isfinite(sd).all(-1) & (hits.tube.sum(-1) >= 3)
    nan = torch.full_like(zero, float("nan"))
    pick = lambda x: torch.where(ok, x, nan)  # noqa: E731
    return Bound(qpt=pick(sd[:, 0]), eta=pick(sd[:, 1] / torch.sin(params[:, 1]).abs()), phi=pick(sd[:, 2]),
                 ok=ok)
