"""What a head sees of one track: per-hit features, per-track features and the reference it regresses against.

Global coordinates make a poor regression input: the sagitta that measures q/pT is a millimetre-scale second
difference of positions metres from the origin, and mean/sum/max/min of global positions are first-order
statistics of where the track is, not of how it bends. So, per (event, query) slot, from the hits it pools
(weights p = sigmoid(logit) >= threshold; cached logits, so no gradient and pruning stays exact):

- the track frame: the p-weighted centroid of the hit positions gives the track's direction (theta0, eta0)
  and the circular mean of the hit azimuths its phi0. Each hit is expressed in that frame: u along the track
  and v across it in the track's r-z plane (a tube wire is placed where it crosses that plane), its azimuth
  relative to phi0, its drift radius, technology and station. eta and phi are regressed relative to the frame.
- the fit proxy (`fit_proxy`): the optimal fit of `hepreg.physics.fit` (full detector model, beam line, fitted
  scattering, outliers left out), run on the hits of the track the assignment is sure of (p >= FIT_MIN_PROB);
  its q/pT, eta, phi, chi2, tube count and covariance feed the head, each hit gets its pull and whether the fit
  kept it, and the head regresses q/pT, eta and phi as corrections to the fit in units of the fit's own
  widths (`HeadInputs.reference`'s scale), so that every track weighs alike in the loss, whatever its pT.
With neither, the per-hit features are the 23 scaled raw features and the head is the seeds' design.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hepreg.data.layout import RAW_FEATURES
from hepreg.physics.detector import TECH_MDT, TECH_RPC, TECH_TGC
from hepreg.models.targets import wrap_angle
from hepreg.physics.fit import OptimalFit, fit_hits
from hepreg.physics.measurements import DRIFT, HIGH, LOW, STATION, TECH, atan2
from hepreg.models.tracks import TrackBatch, TrackHits, scatter_rows

F = {c: i for i, c in enumerate(RAW_FEATURES)}
FRAME_HIT_FEATURES = ("u", "v", "dphi", "drift", "tube", "rpc", "tgc", "barrel", "station", "layer", "time",
                      "prob")
FRAME_TRACK_FEATURES = ("sin_phi0", "cos_phi0", "eta0", "rho", "z", "hits", "prob_sum")
FIT_HIT_FEATURES = ("fit_pull", "fit_abs_pull", "fit_kept")
FIT_TRACK_FEATURES = ("fit_qpt", "fit_deta", "fit_dphi", "fit_log_chi2_ndf", "fit_tube_hits", "fit_ok",
                      "fit_log_sigma_qpt", "fit_log_sigma_eta", "fit_log_sigma_phi", "fit_all_hits")
FIT_MIN_PROB = 0.9  # the fit takes the hits the assignment is sure of: a noise tube pulls a least-squares fit far
# the scale of the corrections where the fit failed (~the spread of the frame's own residuals): q/pT [1/GeV],
# eta, phi [rad]
NO_FIT_SCALE = (0.1, 0.01, 0.01)


@dataclass(frozen=True, kw_only=True)
class InputSpec:
    """Everything a head's inputs depend on: heads with equal specs share one `BatchInputs` per batch, and a
    held split's inputs are prepared once per spec. Keyword-only: two of the fields are bools, and a swap by
    position would silently prepare other inputs."""
    threshold: float  # sigmoid(final logit) at or above which a hit is pooled into a track
    track_frame: bool
    fit_proxy: bool


@dataclass
class HeadInputs:
    """One bucket of tracks at one `InputSpec`."""
    tracks: TrackHits
    hit_features: Tensor    # [R, L, F_hit] (0 at padding), not standardised
    track_features: Tensor  # [R, F_track] (width 0 without frame and fit)
    reference: Tensor          # [R, 6] (q/pT, eta, phi) the head regresses relative to (0 where none), then the
                            # scale of each correction (1 where none)

    def take(self, rows: Tensor, width: int | None = None) -> "HeadInputs":
        t = self.tracks.take(rows, width)
        return HeadInputs(t, self.hit_features[rows, :t.mask.shape[1]], self.track_features[rows], self.reference[rows])


@dataclass
class BatchInputs:
    """A batch's `HeadInputs`, bucket by bucket, computed once and shared by a sweep's heads. The buckets hold
    every slot, or (prepared inputs for training) the slots asked for: a head gives 0 for a slot not held."""
    buckets: list[HeadInputs]
    tracks: TrackBatch  # the buckets' rows, events and queries
    reference: Tensor      # [S, 6] every slot's reference and scale, in slot order

    def active_hit_features(self) -> Tensor:  # [pairs, F_hit]
        return torch.cat([b.hit_features[b.tracks.mask] for b in self.buckets])

    def nonempty_track_features(self) -> Tensor:  # [tracks with a hit, F_track]
        return torch.cat([b.track_features[b.tracks.mask.any(1)] for b in self.buckets])

    def dense(self) -> HeadInputs:
        """All slots in slot order, padded to the longest track (for inspection and tests, not for speed)."""
        rows = self.tracks.rows
        S = self.tracks.num_slots
        return HeadInputs(self.tracks.dense(), scatter_rows([b.hit_features for b in self.buckets], rows, S=S),
                          scatter_rows([b.track_features for b in self.buckets], rows, hit_axis=False, S=S),
                          self.reference)


def feature_names(track_frame: bool, fit_proxy: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    hit = FRAME_HIT_FEATURES if track_frame else RAW_FEATURES
    track = FRAME_TRACK_FEATURES if track_frame else ()
    if fit_proxy:
        hit, track = hit + FIT_HIT_FEATURES, track + FIT_TRACK_FEATURES
    return tuple(hit), tuple(track)


@torch.no_grad()
def prepare(tracks: TrackBatch, track_frame: bool, fit_proxy: bool) -> BatchInputs:
    buckets = [prepare_bucket(t, track_frame, fit_proxy) for t in tracks.buckets]
    return BatchInputs(buckets, tracks, scatter_rows([b.reference for b in buckets], tracks.rows, hit_axis=False))


@torch.no_grad()
def prepare_bucket(tracks: TrackHits, track_frame: bool, fit_proxy: bool) -> HeadInputs:
    S = tracks.mask.shape[0]
    zeros = tracks.raw.new_zeros(S)
    ones = torch.ones_like(zeros)
    eta0, phi0 = zeros, zeros
    if track_frame:
        hit, track, eta0, phi0 = _frame(tracks)
    else:
        hit, track = tracks.raw, tracks.raw.new_zeros(S, 0)
    reference = torch.stack([zeros, eta0, phi0, ones, ones, ones], -1)
    if fit_proxy:
        fit, all_hits = proxy_fit(tracks)
        ok = fit.ok
        pull = (fit.pull * tracks.mask).float()  # [S, L] every pooled hit's pull to the fit (0 where none)
        hit = torch.cat([hit, pull[..., None], pull.abs()[..., None], fit.kept.float()[..., None]], -1)
        sigma = torch.stack([fit.sigma_qpt, fit.sigma_eta, fit.sigma_phi], -1)  # [S, 3]
        rel = torch.stack([fit.sigma_qpt / fit.qpt.abs().clamp_min(1e-6), fit.sigma_eta, fit.sigma_phi], -1)
        log_sigma = torch.where(ok[:, None], torch.log(rel.clamp_min(1e-9)), torch.zeros_like(rel))
        chi2_ndf = torch.log1p(fit.chi2 / fit.ndf.clamp_min(1))
        deta, dphi = (fit.eta - eta0) * ok, wrap_angle(fit.phi - phi0) * ok
        track = torch.cat([track, torch.stack([fit.qpt, deta, dphi, chi2_ndf, fit.tube_hits, ok.double()], -1).float(),
                           log_sigma.float(), all_hits.float()[:, None]], -1)
        no_fit = torch.stack([zeros, eta0, phi0, *(torch.full_like(zeros, s) for s in NO_FIT_SCALE)], -1)
        reference = torch.where(ok[:, None], torch.cat([torch.stack([fit.qpt, fit.eta, fit.phi], -1), sigma], -1).float(),
                             no_fit)
    return HeadInputs(tracks, hit * tracks.mask[..., None], track, reference)


def proxy_fit(t: TrackHits) -> tuple[OptimalFit, Tensor]:
    """The optimal fit of each track's hits the assignment is sure of (p >= FIT_MIN_PROB); where that fails (too
    few sure tubes, or a fit gone wrong), of all its pooled hits. Returns the fit and where the second was
    used [R] (measured on the demo: it recovers ~60 % of the 2.6 % of tracks the first loses)."""
    sure = t.mask & (t.prob >= FIT_MIN_PROB)  # [R, L]
    if not t.compact:  # no data-dependent shape: both fits of every track, side by side in one fit of 2R tracks
        R = t.raw.shape[0]  # (half the exported graph of two fits one after the other, the same numbers)
        both = fit_hits(torch.cat([t.raw, t.raw]), torch.cat([sure, t.mask]), compact=False,
                        pull_mask=torch.cat([t.mask, t.mask]))
        again = ~both.ok[:R] & t.mask.any(1)  # [R]
        return OptimalFit(**{f: _pick(~again, getattr(both, f)[:R], getattr(both, f)[R:])
                             for f in both.__dataclass_fields__}), again
    fit = fit_hits(t.raw, sure, pull_mask=t.mask)
    again = ~fit.ok & t.mask.any(1)  # [R]
    rows = again.nonzero()[:, 0]
    if rows.numel():
        fit = fit.replace_rows(rows, fit_hits(t.raw[rows], t.mask[rows], pull_mask=t.mask[rows]))
    return fit, again


def _pick(keep: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """a where keep [R] else b, for tensors [R, ...] (bools by logic: ONNX Runtime has no bool Where)."""
    k = keep.view(-1, *[1] * (a.dim() - 1))
    return (k & a) | (~k & b) if a.dtype == torch.bool else torch.where(k, a, b)


def _frame(t: TrackHits) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-hit features in each track's frame [R, L, 12], per-track features [R, 7], eta0 and phi0 [R]."""
    raw, w = t.raw, t.prob  # [S, L, 23], [S, L]
    mid = 0.5 * (raw[..., LOW] + raw[..., HIGH])  # [S, L, 3] m: wire centre or strip crossing
    phi_hit = atan2(mid[..., 1], mid[..., 0])
    phi0 = atan2((w * phi_hit.sin()).sum(1), (w * phi_hit.cos()).sum(1))  # [S] circular mean
    dphi = wrap_angle(phi_hit - phi0[:, None])
    tech = raw[..., TECH].round()
    tube = tech == TECH_MDT
    # a tube's wire crosses the track's r-z plane at r = r_wire / cos(dphi); a strip crossing is a point
    rho = torch.sqrt(mid[..., 0] ** 2 + mid[..., 1] ** 2) / torch.where(tube, dphi.cos().clamp_min(0.5),
                                                                      torch.ones_like(dphi))
    z = mid[..., 2]
    total = w.sum(1).clamp_min(1e-12)
    rho_c, z_c = (w * rho).sum(1) / total, (w * z).sum(1) / total
    theta0 = atan2(rho_c, z_c)
    st, ct = theta0.sin()[:, None], theta0.cos()[:, None]
    u = rho * st + z * ct
    v = (-rho * ct + z * st) * 1e3  # mm across the track: the sagitta's scale
    u = u - (w * u).sum(1, keepdim=True) / total[:, None]
    hit = torch.stack([
        u, v, dphi, raw[..., DRIFT], tube.float(), (tech == TECH_RPC).float(), (tech == TECH_TGC).float(),
        (raw[..., STATION] < 1.0).float(), raw[..., STATION], raw[..., F["spacePoint_layer"]],
        raw[..., F["spacePoint_time"]], t.prob], -1)
    eta0 = -torch.log(torch.tan(0.5 * theta0).clamp_min(1e-6))
    track = torch.stack([phi0.sin(), phi0.cos(), eta0, rho_c, z_c, t.mask.sum(1).float(), w.sum(1)], -1)
    return hit, track, eta0, phi0

