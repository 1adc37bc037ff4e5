"""A trained stage 1 and a head that belong together: what predict, export-model and evaluate load.

A head is trained on the outputs of one stage-1 checkpoint (its checkpoint records that checkpoint's sha256 as
`cache_fingerprint`); fed another stage 1's embeddings it would silently predict nonsense, so it is refused.
"""
from __future__ import annotations

from pathlib import Path

import torch

from hepreg.errors import HepregError
from hepreg.frozen import FrozenAssigner
from hepreg.models.head import head_from_checkpoint
from hepreg.runs import load_checkpoint


def load_head(head_path: str | Path, stage1_sha256: str, stage1_path: str | Path):
    """The trained head of `head_path` (eval mode), refused when trained on another stage-1 checkpoint."""
    state = load_checkpoint(head_path, kind="head", needs=("model", "head_config", "dim"))
    trained_on = state.get("cache_fingerprint")
    if trained_on != stage1_sha256:
        raise HepregError(f"head checkpoint {head_path} was trained on the outputs of the stage-1 checkpoint with "
                          f"sha256 {trained_on}, but {stage1_path} has sha256 {stage1_sha256}; use a head trained "
                          f"on this stage 1, or the stage 1 the head was trained on")
    try:
        return head_from_checkpoint(state)
    except (RuntimeError, TypeError, ValueError, KeyError) as e:  # weights that do not fit their config
        raise HepregError(f"checkpoint {head_path} does not hold a head this hepreg can rebuild: "
                          f"{type(e).__name__}: {str(e).splitlines()[0]}") from None


def load_trained(stage1_path: str | Path, head_path: str | Path, device: torch.device | str = "cpu"):
    """(FrozenAssigner, head) on `device`, checked to belong together."""
    assigner = FrozenAssigner.from_checkpoint(stage1_path, device)
    return assigner, load_head(head_path, assigner.checkpoint_sha256, stage1_path).to(device)
