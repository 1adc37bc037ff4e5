"""The per-epoch validation of heads under training: each head's val loss and resolutions on one held split.

Shared by `train-head` (early stopping, best.pt) and `tune` (the figure a trial reports to its pruner); every
head is measured on the same batches, read and decoded once.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from hepreg.evaluation import metrics
from hepreg.models.head import RegressionHead, matched_targets
from hepreg.runs.distributed import DistInfo


@torch.no_grad()
def validate_heads(heads: list[RegressionHead], source, info: DistInfo, device: torch.device) -> list[dict[str, float]]:
    """Val loss (mean per slot), pT and q/pT resolution, charge mis-ID of each head, over all ranks."""
    # sums and predictions stay on the device until the split is done: one wait for it, not one per batch
    sums = torch.zeros(len(heads), 2, dtype=torch.float64, device=device)
    preds_d: list[list[torch.Tensor]] = [[] for _ in heads]
    truth_d: list[torch.Tensor] = []
    for batch in source:
        batch = batch.to(device)
        target, valid = matched_targets(batch)
        inputs = source.inputs(batch, heads, valid.view(-1))  # the slots read below
        truth_d.append(target[valid])
        for k, head in enumerate(heads):
            head.eval()
            out = head(batch, inputs[head.input_key])
            loss_sum, slots = head.loss(out, batch)
            sums[k, 0] += loss_sum.double()
            sums[k, 1] += slots.double()
            preds_d[k].append(head.decode(out)[valid])
    preds = [[torch.cat(p).cpu().numpy()] if p else [] for p in preds_d]
    truth = [torch.cat(truth_d).cpu().numpy()] if truth_d else []
    if info.enabled:
        dist.all_reduce(sums)
    sums = sums.cpu()
    if info.enabled:
        gathered: list[Any] = [None] * info.world_size
        dist.all_gather_object(gathered, (preds, truth))
        preds = [[p for g in gathered for p in g[0][k]] for k in range(len(heads))]
        truth = [t for g in gathered for t in g[1]]
    true = np.concatenate(truth) if truth else np.zeros((0, 4))
    out = []
    for k in range(len(heads)):
        pred = np.concatenate(preds[k]) if preds[k] else np.zeros((0, 4))
        res = metrics.residuals(pred, true)
        out.append({"val_loss": float(sums[k, 0] / max(float(sums[k, 1]), 1.0)),
                    "val_pt_res": metrics.robust_width(res["pt"]),
                    "val_qpt_res": metrics.robust_width(res["qpt"]),
                    "val_charge_misid": float(metrics.charge_misid(true[:, 3], pred[:, 3]).mean()) if len(true) else math.nan,
                    "val_tracks": int(len(true))})
    return out
