"""The cache schema: which arrays a split holds, the fields of `hepreg.flat.FlatBatch` stored flat (CSR).

The cache knows tensors, never the model that made them.
"""
from __future__ import annotations

from hepreg.data.layout import TARGETS

SCHEMA_VERSION = 2  # 2: hits/index, the way back from a kept hit to its row in the input file

# Array paths inside one split's Zarr group, with the axis each is indexed by.
HIT_ARRAYS = ("hits/embed", "hits/raw", "hits/logit", "hits/index")  # [H, D], [H, 23], [H, N], [H]
EVENT_ARRAYS = ("events/query_embed", "events/track_logit", "events/match", "events/event_id")  # [E, ...]
OFFSETS = "events/hit_offsets"  # [E + 1] int64, CSR row pointer into the hit arrays
TARGET_ARRAYS = tuple(f"targets/{t}" for t in TARGETS) + ("targets/valid",)  # [E, P]
