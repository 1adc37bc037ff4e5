"""A track's hits as measurements of the detector model: residuals, their Jacobian and the Fisher information.

The optimal fit (`hepreg.physics.fit`) and the Cramér–Rao bound (`hepreg.physics.bound`) both need the same
three things of a track's hits: what each hit measures, what the model predicts it to measure for given track
parameters, and how the prediction moves with them. They are here, once.

Track parameters, in this order (`PARAMS`): q/pT [1/GeV], the polar angle theta and the azimuth phi at the
origin, and the three multiple-scattering kinks of the detector model (calorimeter polar, calorimeter
azimuthal, spectrometer polar; rad). Muons come from the origin, so there is no offset to fit: that is the
beam-line constraint. The kinks are nuisance parameters with Gaussian priors of their Highland widths.

Measurements per hit (padded [T, L], float64):
- a tube: its drift radius, against |prec - wire| x cos(incidence) of the model, with the side of the wire
  taken from the current prediction (left/right resolved), sigma 0.1 mm;
- a trigger strip: its centre in both coordinates (bending and along the strip), sigma pitch / sqrt(12).
Everything is plain tensor algebra with no data-dependent shape (the heads' fit proxy is exported to ONNX):
trigonometry in float64 except atan2, small systems solved by an unrolled Cholesky decomposition.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from hepreg.data.layout import RAW_FEATURES
from hepreg.physics.detector import (
    BARREL_MAX_INDEX, DRIFT_SIGMA, N_SECTORS, SECTOR, STRIP_SIGMA, TECH_MDT, TUBE_PITCH, propagate, scattering_widths)

F = {c: i for i, c in enumerate(RAW_FEATURES)}
LOW = slice(F["spacePoint_globEdgeLowX"], F["spacePoint_globEdgeLowZ"] + 1)  # x, y, z: adjacent columns
HIGH = slice(F["spacePoint_globEdgeHighX"], F["spacePoint_globEdgeHighZ"] + 1)
TECH, DRIFT, STATION = F["spacePoint_technology"], F["spacePoint_driftR"], F["spacePoint_stationIndex"]
SECTOR_COLUMN = F["spacePoint_stationPhi"]
STATION_SCALE = 0.1  # hits/raw holds stationIndex x 0.1 (hepreg.data.layout.SCALE)
PARAMS = ("qpt", "theta", "phi", "kink_calo_theta", "kink_calo_phi", "kink_spectro")
NUM_PARAMS = len(PARAMS)
# forward-difference steps: each moves a prediction by ~0.01-1 mm, far above float64 rounding of 10 m
WIRE_SIGMA = TUBE_PITCH / math.sqrt(12)  # mm: a tube's wire as the measurement, before its side is known
STEPS = (1e-5, 1e-6, 1e-5, 1e-6, 1e-5, 1e-6)


class TorchOps:
    """`hepreg.physics.detector`'s array functions for torch tensors (float64)."""
    where = staticmethod(torch.where)
    minimum = staticmethod(torch.minimum)
    abs = staticmethod(torch.abs)
    sqrt = staticmethod(torch.sqrt)
    sin = staticmethod(torch.sin)
    cos = staticmethod(torch.cos)
    isfinite = staticmethod(torch.isfinite)
    round = staticmethod(torch.round)
    mod = staticmethod(torch.remainder)

    @staticmethod
    def tan(x):
        return torch.sin(x) / torch.cos(x)  # float64 throughout (ONNX Runtime has no float64 Tan)

    @staticmethod
    def clip(x, lo, hi=None):
        return x.clamp(lo, hi)

    @staticmethod
    def hypot(a, b):
        return torch.sqrt(a * a + b * b)


TORCH = TorchOps()


@contextmanager
def one_thread():
    """Run the fits on one intra-op thread: their ops are many small elementwise ones, and two threads on a
    2-core machine with another busy process ran the optimal fit 35x slower (measured) than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def atan2(y: Tensor, x: Tensor) -> Tensor:
    """atan2 in float32 (ONNX Runtime has no float64 Atan; 1e-7 rad is a micrometre at 10 m), returned in the
    callers' dtype, with atan2(0, 0) = 0 also where it is exported as atan(y / x): padding is all zeros."""
    x = torch.where((x == 0) & (y == 0), torch.ones_like(x), x)
    return torch.atan2(y.float(), x.float()).to(y.dtype)


@dataclass
class Hits:
    """What each hit of padded tracks measures, each [T, L] float64 (bools for the masks)."""
    tube: Tensor    # a drift tube of the track
    strip: Tensor   # a trigger strip of the track
    barrel: Tensor
    pos: Tensor     # the layer's plane: distance from the beam line along the sector centre (barrel) or |z|
    sector: Tensor  # the sector of the hit's chamber (0..15)
    station: Tensor  # its stationIndex (0, 2, 4 barrel; 13, 17, 19 endcap)
    prec: Tensor    # mm, the wire (tube) or strip centre in the bending coordinate (barrel z, endcap y)
    along: Tensor   # mm, the strip centre along the strip direction
    drift: Tensor   # mm, the tube's drift radius
    x: Tensor       # mm, the hit's global position (wire centre or strip crossing)
    y: Tensor
    z: Tensor

    @property
    def rho(self) -> Tensor:
        return torch.sqrt(self.x * self.x + self.y * self.y)

    def rows(self, rows: Tensor) -> "Hits":
        """The tracks `rows` [R] alone."""
        return Hits(**{f: getattr(self, f)[rows] for f in self.__dataclass_fields__})

    def index_copy(self, rows: Tensor, other: "Hits", where: Tensor) -> "Hits":
        """These hits with the counted ones of tracks `rows` [R] taken from `other` where `where` [R]."""
        w = where[:, None]
        pick = lambda a, b: (w & a) | (~w & b)  # noqa: E731  a bool `where` that ONNX Runtime runs
        tube = self.tube.index_copy(0, rows, pick(other.tube, self.tube[rows]))
        strip = self.strip.index_copy(0, rows, pick(other.strip, self.strip[rows]))
        return Hits(**{**{f: getattr(self, f) for f in self.__dataclass_fields__}, "tube": tube, "strip": strip})

    def repeat(self, n: int) -> "Hits":
        """The tracks n times over, [nT, L]: to predict n parameter sets of each in one batch."""
        return Hits(**{f: getattr(self, f).repeat(n, 1) for f in self.__dataclass_fields__})

    def take(self, keep: Tensor) -> "Hits":
        """The same hits with only `keep` [T, L] bool still counted."""
        return Hits(**{**{f: getattr(self, f) for f in self.__dataclass_fields__}, "tube": self.tube & keep,
                       "strip": self.strip & keep})


def hits_of(raw: Tensor, mask: Tensor) -> Hits:
    """raw [T, L, 23] scaled hit features (RAW_FEATURES), mask [T, L] the hits of each track -> Hits."""
    h = raw.double()
    tech = h[..., TECH].round()
    mid = 0.5 * (h[..., LOW] + h[..., HIGH]) * 1e3  # [T, L, 3] mm: wire centre or strip crossing
    x, y, z = mid.unbind(-1)
    sector = torch.remainder(h[..., SECTOR_COLUMN].round() - 1, N_SECTORS)  # stationPhi 1..16: the chamber's sector
    cos_c, sin_c = torch.cos(sector * SECTOR), torch.sin(sector * SECTOR)
    y_c = x * cos_c + y * sin_c  # along the sector centre
    station = torch.round(h[..., STATION] / STATION_SCALE)
    barrel = station < BARREL_MAX_INDEX
    tube = mask & (tech == TECH_MDT)
    return Hits(tube=tube, strip=mask & ~tube, barrel=barrel, pos=torch.where(barrel, y_c, z.abs()), sector=sector,
                station=station,
                prec=torch.where(barrel, z, y_c), along=y * cos_c - x * sin_c, drift=h[..., DRIFT], x=x, y=y, z=z)


def predict(params: Tensor, hits: Hits, path: Tensor | None = None, newton_steps: int = 5):
    """The model's crossing of every hit's layer for the track parameters params [T, 6]. `path` [T, L] is the
    crossing of nearby parameters to start from: one or two Newton steps then reach float64 rounding."""
    p = [params[:, i:i + 1] for i in range(NUM_PARAMS)]  # each [T, 1]
    return propagate(*p, hits.barrel, hits.pos, sector=hits.sector, ops=TORCH, newton_steps=newton_steps, path=path)


def residuals(params: Tensor, hits: Hits, side: Tensor | None = None, wires: bool = False,
              tube_sigma: float = DRIFT_SIGMA, path: Tensor | None = None, newton_steps: int = 5):
    """Normalised residuals (measured - predicted) / sigma of every measurement, [T, L, 2]: a tube's drift
    radius in column 0 (0 in column 1), a strip's bending and along coordinates. `side` [T, L] (+1/-1) is the
    side of the wire each drift circle is on; None takes it from this prediction. Returns (residuals, side,
    the crossings); padding and hits not counted are 0. `wires` measures each tube by its wire alone (sigma
    pitch / sqrt(12)): no left/right ambiguity, for the first steps of a fit from a rough start; a larger
    `tube_sigma` than the drift resolution smooths the next steps, while sides may still be wrong."""
    c = predict(params, hits, path, newton_steps)
    d = c.prec - hits.prec
    if side is None:
        side = torch.where(d >= 0, 1.0, -1.0).to(d.dtype)
    r_tube = -d / WIRE_SIGMA if wires else (hits.drift - side * d * c.cos_normal) / tube_sigma
    r0 = torch.where(hits.tube, r_tube, torch.where(hits.strip, -d / STRIP_SIGMA, torch.zeros_like(d)))
    r1 = torch.where(hits.strip, (hits.along - c.along) / STRIP_SIGMA, torch.zeros_like(d))
    res = torch.stack([r0, r1], -1)
    return torch.where(torch.isfinite(res), res, torch.zeros_like(res)), side, c


def jacobian(params: Tensor, hits: Hits, side: Tensor, wires: bool = False, base=None,
             tube_sigma: float = DRIFT_SIGMA) -> tuple[Tensor, Tensor]:
    """Residuals [T, L, 2] at params and their derivatives [T, L, 2, 6] (forward differences, the side of
    every drift circle held fixed). `base`: `residuals`' (residuals, side, crossings) at params, if known.
    In an exported graph the six shifted predictions run as one batch of 6T tracks: a sixth of the graph's
    nodes. Eager, six propagations of T tracks are as fast for a few tracks and faster for many (measured: 2.4
    s against 3.8 s for 3,000 tracks, the memory traffic of the 6T batch). The numbers are the same."""
    r, _, c = residuals(params, hits, side, wires=wires, tube_sigma=tube_sigma) if base is None else base
    n = params.shape[1]
    steps = torch.tensor(STEPS, dtype=params.dtype, device=params.device)
    if not torch.onnx.is_in_onnx_export():  # eager: one propagation per parameter
        cols = []
        for i in range(n):
            shifted = params + torch.diag(steps)[i]
            cols.append((residuals(shifted, hits, side, wires, tube_sigma, c.path, newton_steps=1)[0] - r) / steps[i])
        return r, torch.stack(cols, -1)
    shifted = (params[None] + torch.diag(steps)[:, None, :]).reshape(n * params.shape[0], n)  # [6T, 6]
    rep = lambda x: x.repeat(n, *[1] * (x.dim() - 1))  # noqa: E731  [T, ...] -> [6T, ...]
    r_all, _, _ = residuals(shifted, hits.repeat(n), rep(side), wires, tube_sigma, rep(c.path), newton_steps=1)
    J = (r_all.view(n, *r.shape) - r) / steps.view(n, 1, 1, 1)  # [6, T, L, 2]
    return r, J.permute(1, 2, 3, 0)


def prior_information(params: Tensor) -> Tensor:
    """[T, 6] diagonal of the kinks' Gaussian priors (0 for q/pT, theta, phi): 1 / Highland width^2 at the
    momentum of `params` (at least 1 GeV)."""
    sin_t = torch.sin(params[:, 1]).abs().clamp_min(1e-3)
    p = (1.0 / (params[:, 0].abs().clamp_min(1e-4) * sin_t)).clamp(1.0, 1e5)
    calo, calo_phi, spectro = scattering_widths(p, sin_t)
    zero = torch.zeros_like(p)
    return torch.stack([zero, zero, zero, calo ** -2, calo_phi ** -2, spectro ** -2], -1)


def diag(v: Tensor) -> Tensor:
    """[T, n] -> [T, n, n] diagonal matrices (written out: ONNX has no diag_embed)."""
    return v[..., None] * torch.eye(v.shape[-1], dtype=v.dtype, device=v.device)


def diagonal(N: Tensor) -> Tensor:
    """[T, n, n] -> [T, n] the diagonals (written out: ONNX has no diagonal)."""
    return (N * torch.eye(N.shape[-1], dtype=N.dtype, device=N.device)).sum(-1)


def information(J: Tensor, prior: Tensor) -> Tensor:
    """Fisher information [T, 6, 6] of normalised measurements with Jacobian J [T, L, 2, 6] and the priors'
    diagonal [T, 6]."""
    A = J.flatten(1, 2)  # [T, 2L, 6]
    return A.transpose(1, 2) @ A + diag(prior)


def cholesky_solve(N: Tensor, rhs: Tensor, jitter: float = 1e-12) -> tuple[Tensor, Tensor]:
    """Solve the symmetric positive-definite systems N [T, n, n] x = rhs [T, n, k] by a Cholesky decomposition
    unrolled over n (small n; no LAPACK, so it exports to ONNX). Returns (x, ok [T]): ok is False where N is
    not positive definite (x is then finite but meaningless)."""
    n = N.shape[-1]
    scale = torch.sqrt(diagonal(N).abs().clamp_min(1e-300))  # [T, n] equilibration
    A = N / (scale[:, :, None] * scale[:, None, :])
    b = rhs / scale[:, :, None]
    Lc = [[None] * n for _ in range(n)]
    ok = torch.ones(N.shape[0], dtype=torch.bool, device=N.device)
    for j in range(n):
        d = A[:, j, j] - sum((Lc[j][k] ** 2 for k in range(j)), torch.zeros_like(A[:, 0, 0]))
        ok = ok & (d > jitter)
        Lc[j][j] = torch.sqrt(d.clamp_min(jitter))
        for i in range(j + 1, n):
            s = A[:, i, j] - sum((Lc[i][k] * Lc[j][k] for k in range(j)), torch.zeros_like(A[:, 0, 0]))
            Lc[i][j] = s / Lc[j][j]
    y = [None] * n  # forward: L y = b
    for i in range(n):
        y[i] = (b[:, i] - sum((Lc[i][k][:, None] * y[k] for k in range(i)), torch.zeros_like(b[:, 0]))) \
            / Lc[i][i][:, None]
    x = [None] * n  # backward: L^T x = y
    for i in reversed(range(n)):
        x[i] = (y[i] - sum((Lc[k][i][:, None] * x[k] for k in range(i + 1, n)), torch.zeros_like(b[:, 0]))) \
            / Lc[i][i][:, None]
    return torch.stack(x, 1) / scale[:, :, None], ok


def covariance(N: Tensor, k: int = 3) -> tuple[Tensor, Tensor]:
    """The [T, k, k] block of N^-1 for the first k parameters (the kinks marginalised), and ok [T]."""
    eye = torch.eye(N.shape[-1], k, dtype=N.dtype, device=N.device).expand(N.shape[0], -1, -1)
    x, ok = cholesky_solve(N, eye)
    return x[:, :k], ok


def eta_of(theta: Tensor) -> Tensor:
    """Pseudorapidity -ln tan(theta / 2), with tan(theta / 2) = sin / (1 + cos) (no float64 Tan in ONNX)."""
    return -torch.log((torch.sin(theta) / (1 + torch.cos(theta))).clamp_min(1e-12))


def theta_of(eta: Tensor) -> Tensor:
    return 2 * atan2(torch.exp(-eta), torch.ones_like(eta))
