"""The weighted-pooling regression head: pooled hits + query embedding -> (pT, eta, phi, q) per query.

raw hits [H, 23] -> Dense(23→D), hit embeddings [H, D] -> Dense(D→D); each is pooled per (event, query)
with the final assignment logits (see `pooling`), giving len(pooling)·2·D features, concatenated with the
query embedding: 9·D = 288 for D = 32 and all four pools. An MLP with ReLU, LayerNorm and Dropout maps that
to the standardised regression outputs of `TargetTransform`.

Raw hit features are standardised (per-feature mean/std of the training split, stored as buffers) before
the raw-hit net: positions in metres (|z| up to 21) next to angles of order 1 and station numbers up to 19
left the curvature, a millimetre-to-centimetre effect, nearly unlearnable (q/pT correlation 0.15 after 25
epochs on the demo data without it; see `fit_inputs`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hepreg.config import HeadConfig
from hepreg.data.layout import NUM_RAW_FEATURES, TARGETS
from hepreg.flat import FlatBatch
from hepreg.models.layers import Dense
from hepreg.models.pooling import POOLINGS, PoolPlan, make_plan, pool
from hepreg.models.targets import TargetTransform


def regression_mlp(dim_in: int, hidden: int, num_layers: int, dropout: float, dim_out: int) -> nn.Sequential:
    """`num_layers` Linear layers in all (1 = a direct projection); each hidden one ReLU, LayerNorm, Dropout."""
    layers: list[nn.Module] = []
    d = dim_in
    for _ in range(num_layers - 1):
        layers += [nn.Linear(d, hidden), nn.ReLU(), nn.LayerNorm(hidden), nn.Dropout(dropout)]
        d = hidden
    layers.append(nn.Linear(d, dim_out))
    return nn.Sequential(*layers)


class RegressionHead(nn.Module):
    def __init__(self, cfg: HeadConfig, dim: int, num_raw: int = NUM_RAW_FEATURES):
        super().__init__()
        unknown = [p for p in cfg.pooling if p not in POOLINGS]
        if unknown or not cfg.pooling:
            raise ValueError(f"head.pooling {cfg.pooling} must be a non-empty subset of {', '.join(POOLINGS)}")
        if cfg.num_layers < 1:
            raise ValueError(f"head.num_layers must be >= 1, got {cfg.num_layers}")
        self.cfg = cfg
        self.dim = dim
        self.pooling = tuple(cfg.pooling)
        self.raw_net = Dense(num_raw, dim)
        self.embed_net = Dense(dim, dim)
        self.targets = TargetTransform(cfg.pt_target)
        self.register_buffer("raw_mean", torch.zeros(num_raw))
        self.register_buffer("raw_std", torch.ones(num_raw))
        dim_in = (2 * len(self.pooling) + 1) * dim  # 9·D with all four pools
        self.mlp = regression_mlp(dim_in, cfg.hidden_dim, cfg.num_layers, cfg.dropout, self.targets.num_outputs)

    @torch.no_grad()
    def fit_inputs(self, raw: Tensor) -> None:
        """Fit the raw-feature standardisation on training hits [H, 23]; constant features pass unscaled."""
        if raw.shape[0] < 2:
            raise ValueError("need at least two hits to standardise the raw features")
        raw = raw.double()
        std = raw.std(0)
        self.raw_mean.copy_(raw.mean(0).float())
        self.raw_std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)).float())

    def plan(self, batch: FlatBatch) -> PoolPlan:
        return make_plan(batch.logit, batch.offsets, self.cfg.threshold)

    def hit_features(self, batch: FlatBatch) -> list[Tensor]:
        """The two per-hit feature sets that get pooled: [raw_net(raw) [H, D], embed_net(embed) [H, D]]."""
        raw = (batch.raw - self.raw_mean) / self.raw_std  # [H, 23]
        return [self.raw_net(raw), self.embed_net(batch.embed)]

    def regress(self, batch: FlatBatch, pooled: list[Tensor]) -> Tensor:
        """Pooled feature sets (each [B, N, len(pooling)·D]) + query embedding -> outputs [B, N, num_outputs]."""
        return self.mlp(torch.cat([batch.query_embed, *pooled], -1))  # MLP input [B, N, (2·len(pooling)+1)·D]

    def forward(self, batch: FlatBatch, plan: PoolPlan | None = None) -> Tensor:
        """FlatBatch -> standardised outputs [B, N, num_outputs]. Pass `plan` to share it across heads."""
        plan = plan if plan is not None else self.plan(batch)
        return self.regress(batch, [pool(x, plan, self.pooling) for x in self.hit_features(batch)])

    @torch.no_grad()
    def predict(self, batch: FlatBatch) -> Tensor:
        """Physical predictions [B, N, 4] in TARGETS order: pT GeV, eta, phi in (-π, π], q = ±1."""
        return self.targets.decode(self(batch))

    @torch.no_grad()
    def predict_columns(self, batch: FlatBatch) -> dict[str, Tensor]:
        """Named physical predictions, each [B, N]: pt, eta, phi, q (what `hepreg predict` writes)."""
        return dict(zip(TARGETS, self.predict(batch).unbind(-1)))

    def predict_padded(self, raw: Tensor, hit_valid: Tensor, embed: Tensor, mask_logit: Tensor,
                       query_embed: Tensor) -> dict[str, Tensor]:
        """`predict_columns` on padded stage-1 outputs, with dense masked pooling (exportable to ONNX).

        raw [B, M, 23], hit_valid [B, M] bool, embed [B, M, D], mask_logit [B, N, M], query_embed [B, N, D]
        -> {name: [B, N]}. The same pools as `pooling.pool` on the flat batch: w = p·a with
        a = (p >= threshold) ∧ hit valid; sum Σ w·x, mean Σ w·x / Σ w, masked max/min, 0 for an empty track.
        """
        p = torch.sigmoid(mask_logit.float())  # [B, N, M]
        active = (p >= self.cfg.threshold) & hit_valid.unsqueeze(1)  # [B, N, M]
        w = torch.where(active, p, torch.zeros_like(p))
        total = w.sum(-1, keepdim=True)  # [B, N, 1]
        norm = w / torch.where(total > 0, total, torch.ones_like(total))
        nonempty = active.any(-1, keepdim=True)  # [B, N, 1]
        feats = [self.raw_net((raw.float() - self.raw_mean) / self.raw_std), self.embed_net(embed.float())]
        pooled = []
        for x in feats:  # [B, M, D]
            ops = []
            for op in self.pooling:
                if op == "sum":
                    ops.append(torch.einsum("bnm,bmd->bnd", w, x))
                elif op == "mean":
                    ops.append(torch.einsum("bnm,bmd->bnd", norm, x))
                else:
                    fill = float("-inf") if op == "max" else float("inf")
                    masked = torch.where(active.unsqueeze(-1), x.unsqueeze(1), fill)  # [B, N, M, D]
                    y = masked.amax(2) if op == "max" else masked.amin(2)
                    ops.append(torch.where(nonempty, y, torch.zeros_like(y)))
            pooled.append(torch.cat(ops, -1))  # [B, N, len(pooling)·D]
        out = self.mlp(torch.cat([query_embed.float(), *pooled], -1))  # as `regress`
        return dict(zip(TARGETS, self.targets.decode(out).unbind(-1)))

    def loss(self, out: Tensor, batch: FlatBatch) -> tuple[Tensor, Tensor]:
        """Smooth-L1 over the matched, valid slots; returns (summed loss, number of slots).

        The sum (not the mean) lets the caller normalise over all ranks or accumulate exactly.
        """
        target, valid = matched_targets(batch)  # [B, N, 4], [B, N]
        res = self.targets.residual(out[valid], target[valid])  # [S, num_outputs]
        loss = F.smooth_l1_loss(res, torch.zeros_like(res), reduction="sum")
        return loss, valid.sum()


class HeadSet(nn.Module):
    """K heads trained on the same batches, pooled together: heads that share a threshold and pooling set have
    all their hit features concatenated and pooled in one pass (each column is reduced on its own, so every
    head gets exactly what it would alone). Measured on 2 cores, 16 feature sets of 32 columns over ~120k
    (hit, query) pairs, fwd+bwd: one fused pool 6.8 s against 12.3–14.0 s for 16 separate ones (loaded machine)."""

    def __init__(self, heads: list[RegressionHead]):
        super().__init__()
        self.heads = nn.ModuleList(heads)

    def forward(self, batch: FlatBatch, plans: dict[float, PoolPlan], active: list[int],
                contexts: list[Any]) -> list[Tensor]:
        """Outputs of the heads `active` (indices), in that order; `contexts[k]` wraps head k's MLP (its own
        random stream for dropout). `plans` maps each threshold to its pooling plan for this batch."""
        groups: dict[tuple, list[int]] = {}
        for k in active:
            h = self.heads[k]
            groups.setdefault((h.cfg.threshold, h.pooling), []).append(k)
        outs: dict[int, Tensor] = {}
        for (threshold, ops), ks in groups.items():
            feats = [x for k in ks for x in self.heads[k].hit_features(batch)]  # 2 per head, each [H, D_k]
            pooled = pool(torch.cat(feats, 1), plans[threshold], ops)  # [B, N, len(ops)·ΣD]
            pooled = pooled.view(*pooled.shape[:2], len(ops), -1)  # [B, N, len(ops), ΣD]
            parts = [p.flatten(2) for p in pooled.split([x.shape[1] for x in feats], -1)]  # [B, N, len(ops)·D_k]
            for i, k in enumerate(ks):
                with contexts[k]:
                    outs[k] = self.heads[k].regress(batch, parts[2 * i:2 * i + 2])
        return [outs[k] for k in active]


def matched_targets(batch: FlatBatch) -> tuple[Tensor, Tensor]:
    """Targets aligned with the queries via the stage-1 match: ([B, N, 4], valid [B, N])."""
    idx = batch.match.clamp_min(0)  # [B, N]
    target = torch.gather(batch.targets, 1, idx[..., None].expand(-1, -1, batch.targets.shape[-1]))
    valid = (batch.match >= 0) & torch.gather(batch.target_valid, 1, idx)
    return target, valid


def head_state(head: RegressionHead) -> dict[str, Any]:
    """What a checkpoint needs to rebuild the head: config, embedding width, weights (incl. target stats)."""
    return {"head_config": dataclasses.asdict(head.cfg), "dim": head.dim, "model": head.state_dict()}


def head_from_checkpoint(state: dict[str, Any]) -> RegressionHead:
    """Rebuild a trained head from a checkpoint dict (`head/best.pt` as loaded by `load_checkpoint`)."""
    head = RegressionHead(HeadConfig(**state["head_config"]), state["dim"])
    head.load_state_dict(state["model"])
    return head.eval()
