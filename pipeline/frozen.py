"""The frozen stage-1 model as a function from a padded HitBatch to the flat batch the head consumes.

Export and the head's `live` source both go through `FrozenAssigner`, so the cache holds exactly what the
live path computes (same forward, same matching, same flattening and pruning). Frozen means frozen by module:
eval mode (no dropout) and requires_grad off for every parameter, under `torch.inference_mode()`.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import fields
from pathlib import Path

import torch

from hepreg.config import Config, config_from_dict
from hepreg.data.batch import HitBatch
from hepreg.digest import sha256_file
from hepreg.errors import ConfigError, HepregError
from hepreg.flat import FlatBatch
from hepreg.models.maskformer import MaskFormer, MaskFormerOutput
from hepreg.models.matcher import match_queries
from hepreg.runs import load_checkpoint


class FrozenAssigner:
    def __init__(self, model: MaskFormer, config: Config, checkpoint_sha256: str, device: torch.device | str = "cpu",
                 checkpoint_path: str | Path | None = None):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.config = config
        self.checkpoint_sha256 = checkpoint_sha256
        self.checkpoint_path = checkpoint_path

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: torch.device | str = "cpu") -> "FrozenAssigner":
        ckpt = load_checkpoint(path)
        missing = [k for k in ("model", "config") if k not in ckpt]
        if missing:
            raise HepregError(f"checkpoint {path} is not a stage-1 checkpoint (no {', '.join(missing)})")
        try:
            config = config_from_dict(ckpt["config"])
        except ConfigError as e:
            raise HepregError(f"checkpoint {path} holds a config this hepreg cannot read: {e}") from None
        model = MaskFormer(config.model)
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise HepregError(f"checkpoint {path} does not fit its own model config: {e}") from None
        return cls(model, config, sha256_file(path), device, checkpoint_path=path)

    def _autocast(self):
        """bf16 on CUDA, as stage 1 trains, unless its config says fp32 (`assign.precision`); full precision on
        CPU."""
        if self.device.type == "cuda" and self.config.assign.precision != "fp32":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def forward(self, batch: HitBatch) -> MaskFormerOutput:
        """The bare frozen forward (no matching, no flattening); inference tensors."""
        with torch.inference_mode(), self._autocast():
            return self.model(batch.hits.to(self.device), batch.hit_valid.to(self.device))

    def __call__(self, batch: HitBatch, prune_threshold: float = 0.0) -> FlatBatch:
        """Final-layer outputs, matched to the targets and flattened; hits below `prune_threshold` for every
        query dropped. Returns ordinary float32 tensors on the assigner's device, usable under autograd."""
        batch = batch.to(self.device)
        with torch.inference_mode():
            out = self.forward(batch)
            final = out.layers[-1]
            match = match_queries(final["track_logit"].float(), final["mask_logit"].float(), batch.hit_valid,
                                  batch.particle_valid, batch.particle_hit_valid, self.config.assign)
            flat = FlatBatch.from_padded(
                raw=batch.hits, hit_valid=batch.hit_valid, embed=out.hit_embed, mask_logit=final["mask_logit"],
                query_embed=out.query_embed, track_logit=final["track_logit"], match=match,
                targets=batch.targets, target_valid=batch.particle_valid, event_id=batch.event_id,
                prune_threshold=prune_threshold)
        # inference tensors cannot be saved for backward: a head training on these needs ordinary copies
        return FlatBatch(**{f.name: getattr(flat, f.name).clone() for f in fields(flat)})
