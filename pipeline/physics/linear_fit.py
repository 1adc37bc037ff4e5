"""The linear least-squares drift-circle fit of padded tracks: the standalone reference, and the start of the
optimal fit (`hepreg.physics.fit`).

`hepreg reference-fit` and evaluate run it standalone on the truth-assigned hits of each muon, for comparison;
with `vertex=True` it is the fast first estimate that the optimal fit (full detector model) starts from. It is
a deterministic function of cached tensors, computed without gradient.

Per track (hits [S, L] with a mask):
- phi: circular mean of its trigger-strip hits (RPC/TGC measure the second coordinate); without any, the
  mean phi of its tube centres (sector precision).
- bending plane: each drift tube gives the wire's position in the track's r-z plane (the wire crosses that
  plane at r = y_wire / cos(phi - phi_sector)) and a drift circle. In a frame rotated to the track's rough
  direction (u along it, v across) the trajectory is v(u) = a + b u + c h(u), with h the field shape of the
  toy spectrometer (parabola inside the toroid, straight line after), so the fit is linear in (a, b, c).
  The left/right ambiguity of each drift circle is resolved iteratively from the previous fit, from three
  starts (wire positions only; a straight line; the opposite curvature), keeping the best chi2. c is the
  curvature q / R = 0.3 B q sin(theta) / pT, which gives q/pT; theta - atan(b) gives eta.
- `vertex=True` adds the beam line: muons come from the origin, so the trajectory starts at (u, v) = (0, 0)
  in the direction that gives eta, and the multiple scattering in the calorimeter is a kink there, a fitted
  angle with a Gaussian prior (the Highland angle at the momentum of the free fit).
A track is fitted when it has at least 6 tube hits spanning a well-conditioned (a, b, c) system.

Everything is plain tensor algebra on [S, L] (3x3 systems solved in closed form), in float64: millimetre
drift radii next to 20-metre positions. It models less than the detector has (the field's extent from the
rough direction, no scattering in the spectrometer), which is why it is the standalone reference and a start,
not the optimal fit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hepreg.physics.detector import (
    B_FIELD, CALO_SURFACE, CALO_X0, DRIFT_SIGMA, FIELD_INNER, FIELD_OUTER, TECH_MDT, highland)
from hepreg.physics.measurements import DRIFT, HIGH, LOW, STATION, TECH, atan2
MIN_TUBE_HITS = 6
LR_ITERATIONS = 4
OUTLIER_MIN_MM, OUTLIER_RMS = 1.0, 2.0  # fit_with_outliers: tubes further off than max(1 mm, 2 rms) are left out
MIN_COS_DPHI = 0.5  # tubes more than 60 degrees off the track's phi are left out of its fit
MIN_HADAMARD = 1e-9  # det(N) / prod(diag N) of the normal equations: below it (a, b, c) is ill-determined
FIT_FEATURES = ("qpt", "eta", "phi", "log_chi2_ndf", "tube_hits", "ok")


@dataclass
class TrackFit:
    """Fit results per track, each [S]; `residual` [S, L] is each tube's resolved distance to the fit (mm)."""
    qpt: Tensor       # q/pT [1/GeV] (0 where not ok)
    eta: Tensor
    phi: Tensor
    chi2: Tensor      # sum of squared tube residuals [mm^2]
    tube_hits: Tensor
    ok: Tensor        # bool
    residual: Tensor  # [S, L], 0 off the tubes
    outlier: Tensor | None = None  # [S, L] bool: the tubes `fit_with_outliers` left out

    @property
    def pt(self) -> Tensor:
        return torch.where(self.ok, 1.0 / self.qpt.abs().clamp_min(1e-5), 0.0)

    def features(self) -> Tensor:
        """[S, len(FIT_FEATURES)] float32 inputs for a head (zeros where the fit failed, flagged by `ok`)."""
        ndf = (self.tube_hits - 3).clamp_min(1)
        cols = [self.qpt, self.eta, self.phi, torch.log(1 + self.chi2 / ndf), self.tube_hits, self.ok.double()]
        out = torch.stack([torch.where(self.ok, c, torch.zeros_like(c)) for c in cols[:-1]] + [cols[-1]], -1)
        return out.float()


def _f(fn, *args: Tensor) -> Tensor:
    """A trigonometric function in float32, returned in the callers' float64: ONNX Runtime has no float64
    atan/tan kernels, and angles need no more than float32 (1e-7 rad is a micrometre at 10 m)."""
    return fn(*(a.float() for a in args)).to(args[0].dtype)


def _shell_path(theta: Tensor, surface: tuple[float, float]) -> Tensor:
    """Path length from the origin to the surface {r = R or |z| = Z} along polar angle theta."""
    s, c = _f(torch.sin, theta).abs().clamp_min(1e-12), _f(torch.cos, theta).abs().clamp_min(1e-12)
    return torch.minimum(surface[0] / s, surface[1] / c)


def _field_shape(u: Tensor, s_in: Tensor, s_out: Tensor) -> Tensor:
    """Deflection per unit curvature after path u: parabola inside the field, its tangent after."""
    inside = (torch.minimum(u, s_out) - s_in).clamp_min(0.0)
    return 0.5 * inside ** 2 + (s_out - s_in).clamp_min(0.0) * (u - s_out).clamp_min(0.0)


def _circular_mean(angle: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Weighted circular mean over the last axis, and whether any weight was there."""
    s, c = (weight * _f(torch.sin, angle)).sum(-1), (weight * _f(torch.cos, angle)).sum(-1)
    return atan2(s, c), weight.sum(-1) > 0


def _solve3(N: Tensor, rhs: Tensor) -> Tensor:
    """Solve the symmetric 3x3 systems N [S, 3, 3] x = rhs [S, 3] by the adjugate (no LAPACK; exportable)."""
    a, b, c = N[:, 0, 0], N[:, 0, 1], N[:, 0, 2]
    d, e, f = N[:, 1, 1], N[:, 1, 2], N[:, 2, 2]
    A, B, C = d * f - e * e, c * e - b * f, b * e - c * d
    D, E, Fc = a * f - c * c, b * c - a * e, a * d - b * b
    det = a * A + b * B + c * C
    inv = torch.stack([torch.stack([A, B, C], -1), torch.stack([B, D, E], -1), torch.stack([C, E, Fc], -1)], -2)
    return (inv @ rhs[..., None])[..., 0] / det[:, None]


def fit_tracks(raw: Tensor, mask: Tensor, vertex: bool = False, compact: bool = True) -> TrackFit:
    """raw [S, L, 23] scaled hit features (RAW_FEATURES), mask [S, L] the hits of each track -> TrackFit.

    phi comes from all hits; the bending-plane fit runs on the tube hits alone. `compact` gathers them to the
    front of each row and fits only the tracks with enough of them (a track is ~half tubes, and a batch holds
    empty slots); without it every row is fitted as it is, with no data-dependent shape (ONNX)."""
    with torch.no_grad():
        h = raw.double()
        S, L = mask.shape
        tech = h[..., TECH].round()
        tube = mask & (tech == TECH_MDT)  # [S, L]
        mid = 0.5 * (h[..., LOW] + h[..., HIGH]) * 1e3  # [S, L, 3] mm: wire centre or strip crossing
        phi_hit = atan2(mid[..., 1], mid[..., 0])
        phi_strip, has_strip = _circular_mean(phi_hit, (mask & ~tube).double())
        phi_tube, _ = _circular_mean(phi_hit, tube.double())
        phi = torch.where(has_strip, phi_strip, phi_tube)  # [S]
        n_tube = tube.sum(-1)
        if not compact:
            fit = _fit_tubes(mid[..., 0], mid[..., 1], mid[..., 2], h[..., DRIFT], h[..., STATION], tube.double(),
                             phi, vertex)
            return TrackFit(qpt=fit[0], eta=fit[1], phi=phi, chi2=fit[2], tube_hits=n_tube.double(), ok=fit[3],
                            residual=fit[4])

        rows = (n_tube >= MIN_TUBE_HITS).nonzero()[:, 0]  # [R]
        width = int(n_tube[rows].max()) if rows.numel() else 0
        order = torch.argsort((~tube[rows]).to(torch.uint8), dim=1, stable=True)[:, :width]  # tubes first
        gather = lambda x: x[rows].gather(1, order)  # noqa: E731  [R, width]
        fit = _fit_tubes(gather(mid[..., 0]), gather(mid[..., 1]), gather(mid[..., 2]),
                         gather(h[..., DRIFT]), gather(h[..., STATION]), gather(tube.double()), phi[rows], vertex)
        qpt, eta, chi2, ok, resid = (torch.zeros(S, dtype=h.dtype) for _ in range(5))
        ok = ok.bool()
        qpt[rows], eta[rows], chi2[rows], ok[rows] = fit[0], fit[1], fit[2], fit[3]
        residual = torch.zeros(S, L, dtype=h.dtype)
        residual[rows] = residual[rows].scatter(1, order, fit[4])
        return TrackFit(qpt=qpt, eta=eta, phi=phi, chi2=chi2, tube_hits=n_tube.double(), ok=ok, residual=residual)


def _fit_tubes(x: Tensor, y: Tensor, z: Tensor, drift_r: Tensor, station: Tensor, w: Tensor, phi: Tensor,
               vertex: bool, start: Tensor | None = None):
    """The bending-plane fit of R tracks from their tube hits [R, W] (wire centres x, y, z in mm, drift radii,
    scaled stationIndex, w = 1 for a hit, 0 for padding) and their phi [R].
    Returns (q/pT, eta, chi2, ok, residual [R, W], the measured v of each drift circle on its side [R, W])."""
    phi_hit = atan2(y, x)
    barrel = station < 1.0  # scaled stationIndex: barrel 0-0.4, endcap >= 1.3
    cos_d = _f(torch.cos, phi_hit - phi[:, None])
    w = w * (cos_d > MIN_COS_DPHI)  # a tube far off the track's azimuth (a wrongly assigned hit) does not cross its plane
    cos_d = torch.where(w > 0, cos_d, torch.ones_like(x))
    rho = torch.sqrt(x * x + y * y) / cos_d  # the wire in the track's r-z plane
    drift = drift_r / torch.where(barrel, torch.ones_like(cos_d), cos_d)  # endcap radii are in y
    n_tube = w.sum(-1)

    theta0 = atan2((w * rho).sum(-1), (w * z).sum(-1))  # rough direction
    st, ct = _f(torch.sin, theta0)[:, None], _f(torch.cos, theta0)[:, None]
    u = rho * st + z * ct  # along the rough direction, mm
    v_wire = -rho * ct + z * st  # across it
    s_in, s_out = _shell_path(theta0, FIELD_INNER)[:, None], _shell_path(theta0, FIELD_OUTER)[:, None]
    hu = _field_shape(u, s_in, s_out)
    dhu = (torch.minimum(u, s_out) - s_in).clamp_min(0.0)
    # v(u) = x0 g(u) + x1 u + x2 h(u) in metres (conditioned): free, g = 1 (offset a at the origin); with the
    # vertex, the track leaves the origin (no offset) and g = (u - d_calo)+ is the calorimeter's kink
    g, dg = torch.ones_like(u), torch.zeros_like(u)
    if vertex:
        d_calo = _shell_path(theta0, CALO_SURFACE)[:, None]
        g, dg = (u - d_calo).clamp_min(0.0) * 1e-3, (u > d_calo).double() * 1e-3
    A = torch.stack([g, u * 1e-3, hu * 1e-6], -1) * w[..., None]  # [R, W, 3]
    N = A.transpose(1, 2) @ A  # [R, 3, 3]
    diag = N[:, 0, 0] * N[:, 1, 1] * N[:, 2, 2]
    ok = (diag > 0) & (n_tube >= MIN_TUBE_HITS)
    free = None
    if vertex:
        # a Gaussian prior on the kink: the Highland angle at the momentum of the free fit, weighed against
        # the tubes by their own scatter about the free fit (multiple scattering in the spectrometer included)
        free = _fit_tubes(x, y, z, drift_r, station, w, phi, vertex=False)
        qpt_f, eta_f, chi2_f, ok_f, _, v_free = free
        sin_t = _f(torch.sin, 2 * _f(torch.atan, torch.exp(-eta_f))).abs().clamp_min(1e-3)
        p = (1.0 / qpt_f.abs().clamp_min(1e-4) / sin_t).clamp(1.0, 1e4)  # GeV
        kink = highland(p, CALO_X0) * 1e3  # mrad
        sigma_tube2 = chi2_f / (n_tube - 3).clamp_min(1) + DRIFT_SIGMA ** 2
        corner = torch.zeros(3, 3, dtype=N.dtype, device=N.device)
        corner[0, 0] = 1.0
        N = N + (sigma_tube2 / kink ** 2)[:, None, None] * corner
        ok = ok & ok_f
    ok = ok & (_det3(N) > MIN_HADAMARD * diag)
    Nreg = torch.where(ok[:, None, None], N, torch.eye(3, dtype=N.dtype, device=N.device))

    def solve(v: Tensor) -> Tensor:
        return _solve3(Nreg, (A * v[..., None]).sum(1))  # [R, 3]: x0, x1 [mm per m], x2 [mm per m^2]

    def trajectory(p: Tensor) -> tuple[Tensor, Tensor]:
        v = p[:, :1] * g + p[:, 1:2] * u * 1e-3 + p[:, 2:] * hu * 1e-6
        return v, p[:, :1] * dg + p[:, 1:2] * 1e-3 + p[:, 2:] * 1e-6 * dhu  # v and dv/du at each hit

    def resolve_sides(p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Iterate: choose each drift circle's side from the trajectory, refit. -> (params, chi2 [R], resid)."""
        for _ in range(LR_ITERATIONS):
            v_pred, slope = trajectory(p)
            side = torch.where(v_pred >= v_wire, 1.0, -1.0)
            v_meas = v_wire + side * drift * torch.sqrt(1 + slope ** 2)
            p = solve(v_meas)
        resid = (v_meas - trajectory(p)[0]) * w
        return p, (resid ** 2).sum(-1), resid, v_meas

    if free is not None:  # start from the drift-circle sides the free fit resolved
        params, chi2, resid, v_meas = resolve_sides(solve(v_free))
    else:
        # The wire-only start can settle in the mirror solution of the left/right choices: also start from a
        # straight line and from the opposite curvature, and keep the best chi2.
        p0 = solve(v_wire)
        params, chi2, resid, v_meas = resolve_sides(p0)
        for scale in (0.0, -1.0):
            pa, ca, ra, va = resolve_sides(p0 * torch.tensor([1.0, 1.0, scale], dtype=p0.dtype, device=p0.device))
            better = ca < chi2
            params, chi2 = torch.where(better[:, None], pa, params), torch.where(better, ca, chi2)
            resid, v_meas = torch.where(better[:, None], ra, resid), torch.where(better[:, None], va, v_meas)

    b, kappa = params[:, 1] * 1e-3, params[:, 2] * 1e-6  # slope at the origin, curvature [1/mm]
    theta = theta0 - _f(torch.atan, b)
    qpt = kappa / (0.3e-3 * B_FIELD * _f(torch.sin, theta).abs().clamp_min(1e-12))
    eta = -torch.log(_f(torch.tan, theta / 2))
    ok = ok & torch.isfinite(qpt) & torch.isfinite(eta) & torch.isfinite(chi2) & (qpt.abs() < 1e3)
    resid = torch.where(ok[:, None] & torch.isfinite(resid), resid, torch.zeros_like(resid))
    zero = torch.zeros_like(qpt)
    return (torch.where(ok, qpt, zero), torch.where(ok, eta, zero), torch.where(ok, chi2, zero), ok, resid,
            v_meas)


def _det3(N: Tensor) -> Tensor:
    a, b, c = N[:, 0, 0], N[:, 0, 1], N[:, 0, 2]
    return a * (N[:, 1, 1] * N[:, 2, 2] - N[:, 1, 2] ** 2) - b * (b * N[:, 2, 2] - c * N[:, 1, 2]) \
        + c * (b * N[:, 1, 2] - c * N[:, 1, 1])


def fit_with_outliers(raw: Tensor, mask: Tensor, vertex: bool = True, compact: bool = True) -> TrackFit:
    """Fit, leave out the tubes further from the fit than max(1 mm, 2 x its rms residual), refit: one wrong
    hit pulls a least-squares fit far. Where the refit fails (too few tubes left), the first fit stays."""
    first = fit_tracks(raw, mask, vertex, compact)
    rms = (first.chi2 / (first.tube_hits - 3).clamp_min(1)).sqrt()
    limit = torch.maximum(torch.full_like(rms, OUTLIER_MIN_MM), OUTLIER_RMS * rms)[:, None]
    outlier = first.residual.abs() > limit
    second = fit_tracks(raw, mask & ~outlier, vertex, compact)
    use = second.ok[:, None]
    pick = lambda a, b: torch.where(second.ok, b, a)  # noqa: E731
    return TrackFit(qpt=pick(first.qpt, second.qpt), eta=pick(first.eta, second.eta), phi=first.phi,
                    chi2=pick(first.chi2, second.chi2), tube_hits=pick(first.tube_hits, second.tube_hits),
                    ok=first.ok | second.ok, residual=torch.where(use, second.residual, first.residual),
                    outlier=use & outlier)
