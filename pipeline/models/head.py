"""Regression heads: one track per (event, query) slot -> (pT, eta, phi, q), optionally with uncertainties.

Every head computes on `HeadInputs` (see `track_inputs`): the slot's pooled hits padded per track, their
per-hit features, per-track features, and the reference it regresses against. Two kinds (`head.kind`):

- `pooled`: the seeds' design. Per-hit features -> Dense(F→D), hit embeddings -> Dense(D→D); each is pooled
  over the track's hits (p-weighted mean, p-weighted sum, max, min; 0 for a track with no hits), then
  concatenated with the query embedding (and the track features) into an MLP with ReLU, LayerNorm, Dropout.
  With `track_frame` and `fit_proxy` off this is exactly the seeds' head on global raw features. Training runs
  the per-hit MLPs on the real hits of every bucket at once and pools them flat (`hepreg.models.hit_pooling`).
- `attention`: a small pre-norm transformer over each track's own hits (tokens from the same per-hit
  features plus the hit embedding), with one extra token started from the query embedding and the track
  features; that token's output feeds the MLP. Tracks are padded to the longest track of their bucket, never to
  the longest event, and a track's output does not depend on the other tracks or on the padding.

Inputs are standardised with mean/std fitted on the training split (`estimate_scales`, buffers in the checkpoint).
Losses (`head.loss`): smooth-L1 on the standardised residuals, or a Gaussian negative log-likelihood with a
predicted width per target (sigma = softplus + floor, in standardised units).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hepreg.flat import FlatBatch
from hepreg.settings import HeadConfig, Pooling
from hepreg.data.layout import TARGETS
from hepreg.models.hit_pooling import POOLINGS, flat_hits, pool_hits
from hepreg.models.layers import Attention, Dense, FeedForward, exporting
from hepreg.models.stacked import StackMode, shared, stack_groups, stacked_pooled
from hepreg.models.targets import TargetTransform
from hepreg.models.track_inputs import BatchInputs, HeadInputs, InputSpec, feature_names, prepare
from hepreg.models.tracks import BUCKET_ROWS, BUCKET_SLACK, bucket_bounds, from_flat, from_padded

NLL_HUBER = 3.0  # standardised residuals beyond this many predicted widths count linearly in the Gaussian NLL
SIGMA_FLOOR = 1e-3  # standardised units: keeps the Gaussian NLL finite on a perfectly predicted track


@dataclass
class HeadOutput:
    """A head's raw outputs for a batch: standardised values (and widths), and the reference they are
    relative to, each [B, N, num_outputs]."""
    value: Tensor
    reference: Tensor
    sigma: Tensor | None = None
    scale: Tensor | None = None  # the unit of each output (a fit proxy's own widths; 1 without one)


def regression_mlp(dim_in: int, hidden: int, num_layers: int, dropout: float, dim_out: int) -> nn.Sequential:
    """`num_layers` Linear layers in all (1 = a direct projection); each hidden one ReLU, LayerNorm, Dropout."""
    layers: list[nn.Module] = []
    d = dim_in
    for _ in range(num_layers - 1):
        layers += [nn.Linear(d, hidden), nn.ReLU(), nn.LayerNorm(hidden), nn.Dropout(dropout)]
        d = hidden
    out = nn.Linear(d, dim_out)
    with torch.no_grad():  # a head starts near its reference (the fit proxy) and learns corrections to it
        out.weight.mul_(0.01)
        out.bias.zero_()
    layers.append(out)
    return nn.Sequential(*layers)


class Standardise(nn.Module):
    """Per-feature (x - mean) / std with statistics fitted once on training data; constant features pass."""

    def __init__(self, width: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))

    @torch.no_grad()
    def estimate(self, x: Tensor) -> None:  # x [R, width]
        if x.shape[-1] == 0:
            return
        if x.shape[0] < 2:
            raise ValueError("need at least two rows to standardise the head's inputs")
        x = x.double()
        std = x.std(0)
        self.mean.copy_(x.mean(0).float())
        self.std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)).float())

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class RegressionHead(nn.Module):
    """What every head kind shares: inputs, standardisation, targets, loss, decoding. Kinds implement
    `encode(inputs) -> [S, width]`, the track representation the MLP reads."""

    def __init__(self, cfg: HeadConfig, dim: int):
        super().__init__()
        if cfg.num_layers < 1:
            raise ValueError(f"head.num_layers must be >= 1, got {cfg.num_layers}")
        self.cfg, self.dim = cfg, dim
        self.hit_names, self.track_names = feature_names(cfg.track_frame, cfg.fit_proxy)
        self.hit_norm = Standardise(len(self.hit_names))
        self.track_norm = Standardise(len(self.track_names))
        self.targets = TargetTransform(cfg.pt_target)
        self.gaussian = cfg.loss == "gaussian_nll"
        # the reference of each output, from the (q/pT, eta, phi) of `HeadInputs.reference`
        self.reference_columns = [{"qpt": 0, "eta": 1, "phi": 2}.get(n, -1) for n in self.targets.names]

    # ---- inputs ---------------------------------------------------------------------------------------
    @property
    def input_key(self) -> InputSpec:
        """Heads with the same key share one `BatchInputs` per batch."""
        return InputSpec(threshold=self.cfg.threshold, track_frame=self.cfg.track_frame, fit_proxy=self.cfg.fit_proxy)

    def inputs(self, batch: FlatBatch) -> BatchInputs:
        tracks = from_flat(batch.raw, batch.embed, batch.logit, batch.offsets, batch.query_embed,
                           self.cfg.threshold)
        return prepare(tracks, self.cfg.track_frame, self.cfg.fit_proxy)

    @torch.no_grad()
    def estimate_scales(self, batch: FlatBatch) -> None:
        """Fit the input and target standardisation on a sample of the training split."""
        x = self.inputs(batch)
        self.hit_norm.estimate(x.active_hit_features())
        self.track_norm.estimate(x.nonempty_track_features())
        target, valid = matched_targets(batch)
        self.targets.estimate(target, valid, x.tracks.per_event(self._reference(x)), x.tracks.per_event(self._scale(x)))

    def _reference(self, x: BatchInputs) -> Tensor:  # [S, num_outputs]
        cols = [x.reference[:, c] if c >= 0 else torch.zeros_like(x.reference[:, 0]) for c in self.reference_columns]
        return torch.stack(cols, -1)

    def _scale(self, x: BatchInputs) -> Tensor:  # [S, num_outputs]
        cols = [x.reference[:, 3 + c] if c >= 0 else torch.ones_like(x.reference[:, 0]) for c in self.reference_columns]
        return torch.stack(cols, -1)

    # ---- the model ------------------------------------------------------------------------------------
    def encode(self, x: HeadInputs) -> Tensor:
        raise NotImplementedError

    def encode_buckets(self, xs: list[HeadInputs]) -> Tensor:
        """The tracks of several buckets, bucket after bucket -> [R, width]."""
        return torch.cat([self.encode(x) for x in xs]) if len(xs) > 1 else self.encode(xs[0])

    def forward(self, batch: FlatBatch, inputs: BatchInputs | None = None, only_matched: bool = False) -> HeadOutput:
        """FlatBatch -> HeadOutput with [B, N, num_outputs]. Pass `inputs` to share them across heads;
        `only_matched` computes the slots the loss uses and leaves the others 0 (training)."""
        x = inputs if inputs is not None else self.inputs(batch)
        return self.run(x, matched_targets(batch)[1].view(-1) if only_matched else None)

    def run(self, x: BatchInputs, wanted: Tensor | None = None) -> HeadOutput:
        """Outputs of the slots `wanted` ([S] bool, all by default), the others 0, bucket by bucket; a bucket
        of a compact layout is cut to the longest of its wanted tracks."""
        chosen, where = select_buckets(x, wanted)
        return self.finish(x, self.mlp(self.encode_buckets(chosen)), where)  # one MLP call per batch

    def finish(self, x: BatchInputs, y: Tensor, where: list[Tensor]) -> HeadOutput:
        """The MLP's outputs y [R, num_outputs (x2 with widths)] of the rows `where` -> HeadOutput per event."""
        t = x.tracks
        if t.rows is not None:
            y = y.new_zeros(t.num_slots, y.shape[1]).index_copy(0, torch.cat(where), y)
        reference, scale = t.per_event(self._reference(x)), t.per_event(self._scale(x))
        if not self.gaussian:
            return HeadOutput(t.per_event(y), reference, scale=scale)
        value, raw_sigma = y.chunk(2, -1)
        return HeadOutput(t.per_event(value), reference, t.per_event(F.softplus(raw_sigma) + SIGMA_FLOOR), scale)

    # ---- loss and outputs -----------------------------------------------------------------------------
    def loss(self, out: HeadOutput, batch: FlatBatch) -> tuple[Tensor, Tensor]:
        """Loss summed over the matched, valid slots, and their number (the caller normalises, over ranks)."""
        target, valid = matched_targets(batch)  # [B, N, 4], [B, N]
        res = self.targets.residual(out.value[valid], target[valid], out.reference[valid],
                                    None if out.scale is None else out.scale[valid])  # [S, num_outputs]
        if self.gaussian:
            sigma = out.sigma[valid]
            # Gaussian NLL, its square turned linear beyond NLL_HUBER widths: a wrongly assigned track 1000
            # widths off would otherwise set every width (the core is calibrated the same: 0.3 % lie beyond)
            z = (res / sigma).abs()
            core = torch.where(z <= NLL_HUBER, 0.5 * z * z, NLL_HUBER * z - 0.5 * NLL_HUBER ** 2)
            loss = (core + torch.log(sigma)).sum()
        else:
            loss = F.smooth_l1_loss(res, torch.zeros_like(res), reduction="sum")
        return loss, valid.sum()

    def decode(self, out: HeadOutput) -> Tensor:
        """Physical predictions [B, N, 4] in TARGETS order: pT GeV, eta, phi in (-π, π], q = ±1."""
        return self.targets.decode(out.value, out.reference, out.scale)

    def columns(self, out: HeadOutput) -> dict[str, Tensor]:
        """Physical predictions by name, each [B, N]: pt, eta, phi, q and, with widths, sigma_*."""
        pred = self.decode(out)
        cols = {name: pred[..., i] for i, name in enumerate(TARGETS)}
        if out.sigma is not None:
            cols.update(self.targets.sigma(out.sigma, pred, out.scale))
        return cols

    @torch.no_grad()
    def predict_columns(self, batch: FlatBatch) -> dict[str, Tensor]:
        return self.columns(self(batch))

    @torch.no_grad()
    def predict_padded(self, raw: Tensor, hit_valid: Tensor, embed: Tensor, mask_logit: Tensor,
                       query_embed: Tensor) -> dict[str, Tensor]:
        """The same numbers from event-padded stage-1 outputs (raw [B, M, 23], hit_valid [B, M], embed
        [B, M, D], mask_logit [B, N, M], query_embed [B, N, D]): no data-dependent shapes, for ONNX."""
        tracks = from_padded(raw, hit_valid, embed, mask_logit, query_embed, self.cfg.threshold)
        return self.columns(self.run(prepare(tracks, self.cfg.track_frame, self.cfg.fit_proxy)))

    @property
    def num_outputs(self) -> int:
        return self.targets.num_outputs * (2 if self.gaussian else 1)

    def _start_widths(self) -> None:
        """A Gaussian head starts with widths of 1 (in standardised units: its reference's own widths)."""
        if self.gaussian:
            with torch.no_grad():
                self.mlp[-1].bias[self.targets.num_outputs:] = math.log(math.expm1(1.0 - SIGMA_FLOOR))


class PooledHead(RegressionHead):
    def __init__(self, cfg: HeadConfig, dim: int):
        super().__init__(cfg, dim)
        self.pooling = tuple(cfg.pooling)
        self.hit_net = Dense(len(self.hit_names), dim)
        self.embed_net = Dense(dim, dim)
        dim_in = (2 * len(self.pooling) + 1) * dim + len(self.track_names)  # 9·D (+ track features)
        self.mlp = regression_mlp(dim_in, cfg.hidden_dim, cfg.num_layers, cfg.dropout, self.num_outputs)
        self._start_widths()

    def encode(self, x: HeadInputs) -> Tensor:
        """One bucket, padded: what exported graphs run (no data-dependent shape)."""
        t = x.tracks
        feats = [self.hit_net(self.hit_norm(x.hit_features)), self.embed_net(t.embed)]  # 2 × [S, L, D]
        pooled = [pool(f, t.prob, t.mask, self.pooling) for f in feats]
        return torch.cat([t.query_embed, *pooled, self.track_norm(x.track_features)], -1)

    def encode_buckets(self, xs: list[HeadInputs]) -> Tensor:
        """Every bucket at once on the real hits only (`hepreg.models.hit_pooling`): the same numbers as
        `encode` bucket by bucket, without the per-hit MLPs on padding or a masked pass for max and min."""
        if exporting() or (torch.is_grad_enabled() and any(x.tracks.prob.requires_grad for x in xs)):
            return super().encode_buckets(xs)  # exported, or fine-tuned end to end: the weights learn too
        hits = flat_hits([x.tracks.mask for x in xs], [x.tracks.prob for x in xs])
        features = torch.cat([x.hit_features[x.tracks.mask] for x in xs])  # [P, F_hit]
        embed = torch.cat([x.tracks.embed[x.tracks.mask] for x in xs])  # [P, D]
        h = torch.cat([self.hit_net(self.hit_norm(features)), self.embed_net(embed)], -1)  # [P, 2·D]
        pooled = pool_hits(h, hits, self.pooling)  # [R, ops·2·D], op-major
        R, ops, D = hits.num_tracks, len(self.pooling), self.dim
        pooled = pooled.view(R, ops, 2, D).transpose(1, 2).reshape(R, 2 * ops * D)  # as `encode`: net-major
        query = torch.cat([x.tracks.query_embed for x in xs])  # [R, D]
        track = torch.cat([x.track_features for x in xs])  # [R, F_track]
        return torch.cat([query, pooled, self.track_norm(track)], -1)


def select_buckets(x: BatchInputs, wanted: Tensor | None) -> tuple[list[HeadInputs], list[Tensor]]:
    """The buckets holding the slots `wanted` ([S] bool, all when None), each cut to its wanted rows, and those
    rows' slots; an empty selection when nothing is wanted, so that the graph still reaches every parameter."""
    t = x.tracks
    chosen, where = [], []
    for b, rows in zip(x.buckets, t.rows if t.rows is not None else [None]):
        if wanted is not None:
            keep = wanted[rows].nonzero()[:, 0]  # rows is None only for from_padded (never trained)
            if keep.numel() == 0:
                continue
            if keep.numel() < rows.numel():  # else every row is wanted (inputs prepared for these slots)
                lengths = b.tracks.mask[keep].sum(1)
                b, rows = b.take(keep, max(int(lengths.max()), 1)), rows[keep]
        chosen.append(b)
        where.append(rows)
    if not chosen:
        chosen, where = [x.buckets[0].take(t.rows[0][:0], 1)], [t.rows[0][:0]]
    return chosen, where


def pool(x: Tensor, prob: Tensor, mask: Tensor, ops: tuple[Pooling, ...] = POOLINGS) -> Tensor:
    """x [S, L, F] per-hit features, prob [S, L] (0 where inactive), mask [S, L] -> [S, len(ops)·F]. The mean is
    the weighted sum over Σp: one reduction over the hits for both (measured: the pooling 30 % faster)."""
    out: dict[str, Tensor] = {}
    nonempty = mask.any(1, keepdim=True)  # [S, 1]
    m = mask[..., None]
    if "sum" in ops or "mean" in ops:
        out["sum"] = torch.einsum("sl,slf->sf", prob, x)
        out["mean"] = out["sum"] / prob.sum(1, keepdim=True).clamp_min(1e-12)
    if "max" in ops:
        out["max"] = torch.where(nonempty, x.masked_fill(~m, float("-inf")).amax(1), 0.0)
    if "min" in ops:
        out["min"] = torch.where(nonempty, x.masked_fill(~m, float("inf")).amin(1), 0.0)
    return torch.cat([out[op] for op in ops], -1)


class AttentionBlock(nn.Module):
    """Pre-norm transformer layer: self-attention over a track's tokens under its padding mask, then FFN."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.ffn = FeedForward(dim, 2, dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:  # x [S, 1+L, d], mask [S, 1+L, 1+L]
        h = self.norm1(x)
        x = x + self.attn(h, h, mask)
        return x + self.ffn(self.norm2(x))


class AttentionHead(RegressionHead):
    def __init__(self, cfg: HeadConfig, dim: int):
        super().__init__(cfg, dim)
        d = cfg.attn_dim
        self.hit_net = nn.Linear(len(self.hit_names), d)
        self.embed_net = nn.Linear(dim, d)
        self.track_token = nn.Linear(dim + len(self.track_names), d)
        self.blocks = nn.ModuleList(AttentionBlock(d, cfg.attn_heads, cfg.dropout) for _ in range(cfg.attn_layers))
        self.norm = nn.LayerNorm(d)
        self.mlp = regression_mlp(d, cfg.hidden_dim, cfg.num_layers, cfg.dropout, self.num_outputs)
        self._start_widths()

    def encode_buckets(self, xs: list[HeadInputs]) -> Tensor:
        """Each bucket in sub-buckets cut to their own longest track by the attention's cost, which grows as the
        square of a track's tokens: a bucket cut for the linear layers (`bucket_bounds` over hits) pads a track
        of 26 hits to 51 at ~4x the attention cells (on a demo batch, the second bucket's 533 tracks padded to 51
        hits: 1.44M attention cells, 0.65M in three sub-buckets; the step 1.3-1.5x faster with fused AdamW)."""
        if exporting():
            return super().encode_buckets(xs)
        return torch.cat([self.encode(part) for x in xs for part in attention_parts(x)])

    def encode(self, x: HeadInputs) -> Tensor:
        t = x.tracks
        hits = self.hit_net(self.hit_norm(x.hit_features)) + self.embed_net(t.embed)  # [S, L, d]
        track = self.track_token(torch.cat([t.query_embed, self.track_norm(x.track_features)], -1))  # [S, d]
        tokens = torch.cat([track[:, None], hits], 1)  # [S, 1+L, d]
        keys = torch.cat([torch.ones_like(t.mask[:, :1]), t.mask], 1)  # [S, 1+L]: the track token always
        mask = keys[:, None, :].expand(-1, keys.shape[1], -1)  # [S, 1+L, 1+L] (padding queries see keys too)
        for block in self.blocks:
            tokens = block(tokens, mask)
        return self.norm(tokens[:, 0])


ATTENTION_FREE_CELLS = 32768  # token pairs a sub-bucket may pad beyond its slack before a cut pays for itself


def attention_parts(x: HeadInputs) -> list[HeadInputs]:
    """A compact bucket whose tracks come in ascending length (as `from_flat` and the prepared inputs order
    them) cut into runs of rows padded to their own longest, by the attention's cells (1 + L)² per track."""
    mask = x.tracks.mask
    if not x.tracks.compact or mask.shape[0] < 2:
        return [x]
    lengths = mask.sum(1).cpu().numpy()
    if (np.diff(lengths) < 0).any():
        return [x]
    bounds = bucket_bounds((lengths + 1) ** 2, BUCKET_ROWS, BUCKET_SLACK, ATTENTION_FREE_CELLS)
    if len(bounds) <= 2:
        return [x]
    rows = torch.arange(mask.shape[0], device=mask.device)
    return [x.take(rows[a:z], max(int(lengths[z - 1]), 1)) for a, z in zip(bounds[:-1], bounds[1:])]


def build_head(cfg: HeadConfig, dim: int) -> RegressionHead:
    return {"pooled": PooledHead, "attention": AttentionHead}[cfg.kind](cfg, dim)


class HeadSet(nn.Module):
    """K heads trained on the same batches: the inputs (tracks, frame, fit proxy) are computed once per batch
    for every group of heads that shares them, then each head runs its own network, or each group of heads of
    one architecture runs as one stacked model (`stack`: see `hepreg.models.stacked`)."""

    def __init__(self, heads: list[RegressionHead], stack: StackMode = "no", names: list[str] | None = None):
        super().__init__()
        self.heads = nn.ModuleList(heads)
        self.stack = stack
        stack_groups(heads, stack, names)  # `yes` refuses heads that cannot run stacked here, before training
        self._groups: dict[tuple[int, ...], list[tuple[list[int], bool]]] = {}

    def forward(self, batch: FlatBatch, inputs: dict[InputSpec, BatchInputs], active: list[int],
                contexts: list[Any]) -> list[HeadOutput]:
        """Outputs of the heads `active` (indices), in that order; `contexts[k]` wraps head k's random draws
        (its own stream for dropout). `inputs` maps each head's `input_key` to this batch's inputs."""
        key = tuple(active)
        if key not in self._groups:  # early-stopped heads leave their group; norms fitted once are checked once
            self._groups[key] = [([active[i] for i in g], shared([self.heads[active[i]].hit_norm for i in g]))
                                 for g in stack_groups([self.heads[k] for k in active], self.stack)]
        outs: dict[int, HeadOutput] = {}
        for ks, same_norm in self._groups[key]:
            x = inputs[self.heads[ks[0]].input_key]
            if len(ks) == 1 or exporting() or any(b.tracks.prob.requires_grad for b in x.buckets):
                for k in ks:
                    with contexts[k]:
                        outs[k] = self.heads[k](batch, x, only_matched=self.training)
                continue
            chosen, where = select_buckets(x, matched_targets(batch)[1].view(-1) if self.training else None)
            ys = stacked_pooled([self.heads[k] for k in ks], chosen, [contexts[k] for k in ks], same_norm)
            for i, k in enumerate(ks):
                outs[k] = self.heads[k].finish(x, ys[i], where)
        return [outs[k] for k in active]


def batch_inputs(batch: FlatBatch, heads: list[RegressionHead]) -> dict[InputSpec, BatchInputs]:
    """One `BatchInputs` per distinct input key among `heads`."""
    out: dict[InputSpec, BatchInputs] = {}
    for h in heads:
        if h.input_key not in out:
            out[h.input_key] = h.inputs(batch)
    return out


def matched_targets(batch: FlatBatch) -> tuple[Tensor, Tensor]:
    """Targets aligned with the queries via the stage-1 match: ([B, N, 4], valid [B, N])."""
    idx = batch.match.clamp_min(0)  # [B, N]
    target = torch.gather(batch.targets, 1, idx[..., None].expand(-1, -1, batch.targets.shape[-1]))
    valid = (batch.match >= 0) & torch.gather(batch.target_valid, 1, idx)
    return target, valid


def head_state(head: RegressionHead) -> dict[str, Any]:
    """What a checkpoint needs to rebuild the head: config, embedding width, weights (incl. statistics)."""
    return {"head_config": dataclasses.asdict(head.cfg), "dim": head.dim, "model": head.state_dict()}


def stage1_of(state: dict[str, Any]) -> str | None:
    """The sha256 of the stage-1 checkpoint whose outputs a head checkpoint was trained on (`stage1_sha256`;
    `cache_fingerprint` in checkpoints written before the key was named for what it holds)."""
    return state.get("stage1_sha256", state.get("cache_fingerprint"))


def head_from_checkpoint(state: dict[str, Any]) -> RegressionHead:
    """Rebuild a trained head from a checkpoint dict (`head/best.pt` as loaded by `load_checkpoint`)."""
    head = build_head(HeadConfig(**state["head_config"]), state["dim"])
    head.load_state_dict(state["model"])
    return head.eval()
