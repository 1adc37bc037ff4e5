"""The weighted-pooling regression head: pooled hits + query embedding -> (pT, eta, phi, q) per query.

raw hits [H, 23] -> Dense(23→D), hit embeddings [H, D] -> Dense(D→D); each is pooled per (event, query)
with the final assignment logits (see `pooling`), giving len(pooling)·2·D features, concatenated with the
query embedding: 9·D = 288 for D = 32 and all four pools. An MLP with ReLU, LayerNorm and Dropout maps that
to the standardised regression outputs of `TargetTransform`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hepreg.cache.schema import FlatBatch
from hepreg.config import HeadConfig
from hepreg.data.layout import NUM_RAW_FEATURES
from hepreg.models.pooling import POOLINGS, PoolPlan, make_plan, pool
from hepreg.models.targets import TargetTransform


class Dense(nn.Module):
    """Linear(in, 2·in) -> SiLU -> Linear(2·in, out), the reference's input nets."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim_in, 2 * dim_in), nn.SiLU(), nn.Linear(2 * dim_in, dim_out))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


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
        dim_in = (2 * len(self.pooling) + 1) * dim  # 9·D with all four pools
        self.mlp = regression_mlp(dim_in, cfg.hidden_dim, cfg.num_layers, cfg.dropout, self.targets.num_outputs)

    def plan(self, batch: FlatBatch) -> PoolPlan:
        return make_plan(batch.logit, batch.offsets, self.cfg.threshold)

    def forward(self, batch: FlatBatch, plan: PoolPlan | None = None) -> Tensor:
        """FlatBatch -> standardised outputs [B, N, num_outputs]. Pass `plan` to share it across heads."""
        plan = plan if plan is not None else self.plan(batch)
        raw = pool(self.raw_net(batch.raw), plan, self.pooling)  # [B, N, len(pooling)·D]
        emb = pool(self.embed_net(batch.embed), plan, self.pooling)  # [B, N, len(pooling)·D]
        x = torch.cat([batch.query_embed, raw, emb], -1)  # [B, N, (2·len(pooling)+1)·D]
        return self.mlp(x)

    @torch.no_grad()
    def predict(self, batch: FlatBatch) -> Tensor:
        """Physical predictions [B, N, 4] in TARGETS order: pT GeV, eta, phi in (-π, π], q = ±1."""
        return self.targets.decode(self(batch))

    def loss(self, out: Tensor, batch: FlatBatch) -> tuple[Tensor, Tensor]:
        """Smooth-L1 over the matched, valid slots; returns (summed loss, number of slots).

        The sum (not the mean) lets the caller normalise over all ranks or accumulate exactly.
        """
        target, valid = matched_targets(batch)  # [B, N, 4], [B, N]
        res = self.targets.residual(out[valid], target[valid])  # [S, num_outputs]
        loss = F.smooth_l1_loss(res, torch.zeros_like(res), reduction="sum")
        return loss, valid.sum()


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
