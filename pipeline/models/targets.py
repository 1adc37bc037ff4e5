"""Regression targets: the transform from physical (pt, eta, phi, q) to what the head regresses, and back.

`qpt` (default) regresses the signed curvature q/pT, which the sagitta measures linearly; pT = 1/|q/pT| and
q = sign(q/pT) come out of it, so there is no separate charge output. `pt` and `log_pt` regress pT (or its
log) and q as separate outputs. A head may regress relative to a per-track reference (`reference`, in the
regression units of `encode`: its track frame's eta and phi, a fit's q/pT): the output is the standardised
difference, and decoding adds the reference back. Every output is standardised with mean/std fitted on the
training tracks and stored as buffers (robustly: median and MAD), so the checkpoint carries them. phi residuals are wrapped
to (-π, π].
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from hepreg.data.layout import TARGETS

PT, ETA, PHI, Q = (TARGETS.index(t) for t in ("pt", "eta", "phi", "q"))
OUTPUTS = {
    "qpt": ("qpt", "eta", "phi"),
    "pt": ("pt", "eta", "phi", "q"),
    "log_pt": ("log_pt", "eta", "phi", "q"),
}


def wrap_angle(x: Tensor) -> Tensor:
    """Map angles to (-π, π]."""
    return math.pi - torch.remainder(math.pi - x, 2 * math.pi)


class TargetTransform(nn.Module):
    """Physical targets [.., 4] (TARGETS order) <-> standardised regression outputs [.., num_outputs]."""

    def __init__(self, pt_target: str = "qpt"):
        super().__init__()
        if pt_target not in OUTPUTS:
            raise ValueError(f"head.pt_target {pt_target!r} is not one of {', '.join(OUTPUTS)}")
        self.pt_target = pt_target
        self.names = OUTPUTS[pt_target]
        self.phi_index = self.names.index("phi")
        self.register_buffer("mean", torch.zeros(len(self.names)))
        self.register_buffer("std", torch.ones(len(self.names)))

    @property
    def num_outputs(self) -> int:
        return len(self.names)

    def encode(self, targets: Tensor) -> Tensor:
        """[.., 4] physical -> [.., num_outputs] in regression units (not standardised)."""
        pt, q = targets[..., PT], targets[..., Q]
        first = {"qpt": q / pt, "pt": pt, "log_pt": torch.log(pt)}[self.pt_target]
        cols = [first, targets[..., ETA], targets[..., PHI]]
        if self.pt_target != "qpt":
            cols.append(q)
        return torch.stack(cols, -1)

    def decode(self, out: Tensor, reference: Tensor | None = None, scale: Tensor | None = None) -> Tensor:
        """[.., num_outputs] standardised head outputs (+ reference, x scale [.., num_outputs]) -> [.., 4]
        physical (pt GeV, eta, phi, q)."""
        y = out * self.std + self.mean
        if scale is not None:
            y = y * scale
        if reference is not None:
            y = y + reference
        first, eta, phi = y[..., 0], y[..., 1], wrap_angle(y[..., 2])
        if self.pt_target == "qpt":
            pt, q = 1.0 / first.abs().clamp_min(1e-6), torch.where(first >= 0, 1.0, -1.0)
        else:
            pt = first if self.pt_target == "pt" else torch.exp(first)
            q = torch.where(y[..., 3] >= 0, 1.0, -1.0)
        cols = {PT: pt, ETA: eta, PHI: phi, Q: q}
        return torch.stack([cols[i] for i in range(len(TARGETS))], -1)

    def sigma(self, out_sigma: Tensor, decoded: Tensor, scale: Tensor | None = None) -> dict[str, Tensor]:
        """Standardised predicted widths [.., num_outputs] (x scale) -> physical ones by name (`sigma_<output>`),
        with sigma_pt propagated from q/pT (or log pT) where pT is not regressed directly."""
        s = out_sigma * self.std * (1.0 if scale is None else scale)
        out = {f"sigma_{n}": s[..., i] for i, n in enumerate(self.names) if n != "q"}
        pt = decoded[..., PT]
        if self.pt_target == "qpt":
            out["sigma_pt"] = pt * pt * s[..., 0]
        elif self.pt_target == "log_pt":
            out["sigma_pt"] = pt * s[..., 0]
        return out

    @torch.no_grad()
    def estimate(self, targets: Tensor, valid: Tensor, reference: Tensor | None = None, scale: Tensor | None = None) -> None:
        """Fit mean/std on the valid targets [.., 4] / [..] of the training split, relative to the heads'
        reference `reference` [.., num_outputs] where there is one (phi: mean 0), in units of `scale`."""
        y = self.encode(targets[valid].double())  # [T, num_outputs]
        if reference is not None:
            y = y - reference[valid].double()
            y[:, self.phi_index] = wrap_angle(y[:, self.phi_index])
        if scale is not None:
            y = y / scale[valid].double()
        if y.shape[0] < 2:
            raise ValueError("need at least two valid targets to standardise")
        # median and 1.4826 x median absolute deviation (sigma for a Gaussian): relative to a fit, the rare
        # tracks it got wrong would otherwise set the scale of the corrections to every other track
        mean = y.median(0).values
        std = (1.4826 * (y - mean).abs().median(0).values).clamp_min(1e-6)
        mean[self.phi_index] = 0.0  # phi is periodic: no shift, so the wrap stays at ±π
        self.mean.copy_(mean.float())
        self.std.copy_(std.float())

    def residual(self, out: Tensor, targets: Tensor, reference: Tensor | None = None,
                 scale: Tensor | None = None) -> Tensor:
        """Standardised residual of head outputs [.., num_outputs] (+ reference, x scale) against physical
        targets: in units of std x scale, so that a track whose reference is precise weighs as much as any."""
        scale = torch.ones_like(out) if scale is None else scale
        diff = (out * self.std + self.mean) * scale - self.encode(targets)
        if reference is not None:
            diff = diff + reference
        diff[..., self.phi_index] = wrap_angle(diff[..., self.phi_index])
        return diff / (self.std * scale)
