"""Stage 1 and a head as one model: the forward and loss of a step that trains both end to end.

`hepreg finetune` and the bench's joint step (a) both train through `joint_loss`, so the fine-tune measured in
the bench is the one users run. Stage 1's outputs reach the head through `FlatBatch.from_padded` with their
gradients, the same conversion export and the live source make without them: a head sees the same inputs
whether stage 1 is frozen, cached or training.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hepreg.settings import AssignConfig
from hepreg.data.batch import HitBatch
from hepreg.flat import FlatBatch
from hepreg.models.assign_loss import assignment_loss
from hepreg.models.head import HeadOutput, RegressionHead
from hepreg.models.maskformer import MaskFormer, MaskFormerOutput


@dataclass
class JointLoss:
    total: Tensor         # assign_weight x assignment loss + head_weight x head loss per matched slot
    assign: Tensor        # the matched assignment loss of stage 1, as it trains (mean per event of the batch)
    assign_parts: dict[str, float]
    head_sum: Tensor      # the head's loss summed over the matched slots
    slots: Tensor         # their number
    stage1: MaskFormerOutput
    flat: FlatBatch       # what the head read (final-layer outputs, matched to the truth)
    head_out: HeadOutput

    @property
    def head(self) -> Tensor:  # mean per matched slot
        return self.head_sum / self.slots.clamp_min(1)


def joint_loss(model: MaskFormer, head: RegressionHead, batch: HitBatch, assign_cfg: AssignConfig, *,
               assign_weight: float = 1.0, head_weight: float = 1.0, train_stage1: bool = True,
               prune_threshold: float = 0.0, autocast: Any = None, head_context: Any = None,
               estimate_scales: bool = False) -> JointLoss:
    """One batch through stage 1 and the head; the weighted sum of both losses.

    `train_stage1` False runs stage 1 without gradients (frozen: the caller puts it in eval mode). The head
    pools the final-layer outputs matched by the final layer's Hungarian match, as the cache holds them;
    `prune_threshold` drops hits no query could pool (exact, gradients included: they have zero weight).
    `autocast` wraps stage 1's forward (mixed precision), `head_context` the head's (its own dropout stream).
    `estimate_scales` first standardises the head on this batch (a head built from scratch).
    """
    with autocast or nullcontext(), (nullcontext() if train_stage1 else torch.no_grad()):
        out = model(batch.hits, batch.hit_valid)
    with nullcontext() if train_stage1 else torch.no_grad():
        assign, parts, match = assignment_loss(out, batch, assign_cfg)
    final = out.final
    flat = FlatBatch.from_padded(raw=batch.hits, hit_valid=batch.hit_valid, embed=out.hit_embed,
                                 mask_logit=final["mask_logit"], query_embed=out.query_embed,
                                 track_logit=final["track_logit"], match=match, targets=batch.targets,
                                 target_valid=batch.particle_valid, event_id=batch.event_id,
                                 prune_threshold=prune_threshold)
    if estimate_scales:
        head.estimate_scales(flat)
    with head_context or nullcontext():
        head_out = head(flat, only_matched=head.training)
    head_sum, slots = head.loss(head_out, flat)
    total = head_weight * head_sum / slots.clamp_min(1)
    if assign_weight:
        total = total + assign_weight * assign
    return JointLoss(total, assign, parts, head_sum, slots, out, flat, head_out)
