"""The frozen stage-1 model as a function from a padded HitBatch to the flat batch the head consumes.

Export and the head's `live` source both go through `FrozenAssigner.run_events`, so the cache holds exactly
what the live path computes (same batches, forward, matching, flattening and pruning, same dataset order).
It runs in the mixed precision stage 1 trained in (`assign.precision` of its config). Frozen means frozen by
module: eval mode (no dropout) and requires_grad off for every parameter, under `torch.inference_mode()`.
"""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from hepreg.config import config_from_dict
from hepreg.settings import Config
from hepreg.data.batch import HitBatch
from hepreg.data.batching import HitLoader
from hepreg.data.reader import Dataset, open_dataset, split_ranges
from hepreg.runs.digest import sha256_file
from hepreg.errors import ConfigError, DataError, HepregError
from hepreg.flat import Block, FlatBatch
from hepreg.models.maskformer import MaskFormer, MaskFormerOutput
from hepreg.models.matcher import match_queries
from hepreg.runs.directory import load_checkpoint
from hepreg.runs.training import autocast


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

    def forward(self, batch: HitBatch) -> MaskFormerOutput:
        """The bare frozen forward (no matching, no flattening); inference tensors."""
        with torch.inference_mode(), autocast(self.device, self.config.assign.precision):
            return self.model(batch.hits.to(self.device), batch.hit_valid.to(self.device))

    def __call__(self, batch: HitBatch, prune_threshold: float = 0.0) -> FlatBatch:
        """Final-layer outputs, matched to the targets and flattened; hits below `prune_threshold` for every
        query dropped. Returns ordinary float32 tensors on the assigner's device, usable under autograd."""
        batch = batch.to(self.device)
        return self.flatten(batch, self.forward(batch), prune_threshold)

    def flatten(self, batch: HitBatch, out: MaskFormerOutput, prune_threshold: float = 0.0) -> FlatBatch:
        """The forward's outputs of `batch` (on the assigner's device) matched to the targets and flattened."""
        with torch.inference_mode():
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

    def run_events(self, dataset: Dataset, start: int, stop: int, cfg: Config, *, prune_threshold: float = 0.0,
                   on_batch: Callable[[HitBatch, MaskFormerOutput, FlatBatch], None] | None = None,
                   keep: bool = True) -> tuple[Block | None, int]:
        """Events [start, stop) of `dataset` through the model, in dataset order, on the host; and the number of
        valid hits seen before pruning. The one way any command runs the frozen model over events: batched as
        export batches them (bucketed by hit count, the run config's `export.batch_size` and `export.batch_by`),
        matched, and put back in dataset order here, so every path computes the same numbers. `on_batch` sees
        each batch with its outputs and their flattened, matched form (a tally, a progress bar); `keep=False`
        keeps nothing (returns None) when the hook is all a caller needs."""
        loader = HitLoader(dataset, start, stop, batch_size=cfg.export.batch_size, shuffle=False, seed=cfg.seed,
                           bucket_window=cfg.data.bucket_window, batch_by=cfg.export.batch_by)
        blocks, index, seen = [], [], 0
        for batch in loader:
            batch = batch.to(self.device)
            out = self.forward(batch)
            flat = self.flatten(batch, out, prune_threshold)
            if keep:
                blocks.append(Block.from_flat(flat))
            index.append(batch.index.cpu().numpy())
            seen += int(batch.hit_valid.sum())
            if on_batch is not None:
                on_batch(batch, out, flat)
        index = np.concatenate(index)
        order = np.argsort(index, kind="stable")  # back to dataset order
        if not np.array_equal(index[order], np.arange(start, stop)):
            raise DataError(f"the data loader yielded {len(index)} events for events {start}..{stop} of "
                            f"{dataset.path}, not each exactly once")
        return (Block.concat(blocks).take(order) if keep else None), seen


class LiveSplit:
    """A dataset split as the cache would hold it, computed on demand by the frozen model: a `Split` that
    `CacheLoader` iterates exactly as it iterates a stored one (the live head source, the slow baseline).
    Never held in memory: every epoch recomputes, which is the point of the baseline."""

    def __init__(self, cfg: Config, split: str, assigner: FrozenAssigner, prune_threshold: float):
        self.cfg, self.assigner, self.prune_threshold = cfg, assigner, prune_threshold
        self.dataset = open_dataset(cfg.data.path, cfg.data.max_events)
        self.first, stop = split_ranges(len(self.dataset), cfg.data.val_fraction, cfg.data.test_fraction)[split]
        self.num_events = stop - self.first
        self.block_events = cfg.export.block_events
        self.checkpoint_sha256 = assigner.checkpoint_sha256
        self.dim = assigner.config.model.dim

    def read(self, start: int, stop: int) -> Block:
        return self.assigner.run_events(self.dataset, self.first + start, self.first + stop, self.cfg,
                                        prune_threshold=self.prune_threshold)[0]

    def targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All targets of the split ([E, P, 4], valid [E, P]), read from HDF5 (no model)."""
        n, b = self.num_events, self.block_events
        blocks = [self.dataset.read(self.first + s, self.first + min(s + b, n)) for s in range(0, n, b)]
        return (torch.from_numpy(np.concatenate([x.targets for x in blocks])).float(),
                torch.from_numpy(np.concatenate([x.particle_valid for x in blocks])).bool())
