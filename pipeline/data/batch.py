"""The padded hit batch that the reader yields and stage 1 consumes.

Events are bucketed by hit count before padding (see `hepreg.data.batching`), so M is the largest event
of *this* batch, which the bucketing keeps close to every event's own count.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class HitBatch:
    hits: Tensor                # [B, M, 23] float32 scaled model inputs (RAW_FEATURES), 0 at padding
    hit_valid: Tensor           # [B, M] bool
    truth_link: Tensor          # [B, M] long: target row of each hit, -1 for noise and padding
    particle_valid: Tensor      # [B, P] bool
    particle_hit_valid: Tensor  # [B, P, M] bool: hit m belongs to target p
    targets: Tensor             # [B, P, 4] float32 (TARGETS: pt GeV, eta, phi, q), 0 where invalid
    event_id: Tensor            # [B] long: event_numbers of the input files
    index: Tensor               # [B] long: position of the event in the dataset (global event index)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "HitBatch":
        return HitBatch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})

    @property
    def size(self) -> int:
        return self.hits.shape[0]
