"""Builders shared by the tests: a small stage-1 config and a checkpoint of an untrained model."""
from __future__ import annotations

import torch

from hepreg.config import Config
from hepreg.models.maskformer import MaskFormer
from hepreg.runs import save_checkpoint


def small_config() -> Config:
    cfg = Config()
    cfg.model.dim, cfg.model.num_heads = 16, 4
    cfg.model.encoder_layers = cfg.model.decoder_layers = 1
    return cfg


def make_checkpoint(path, cfg: Config, seed: int = 0):
    torch.manual_seed(seed)
    model = MaskFormer(cfg.model)
    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(), "epoch": 0,
                     "data_fingerprint": "test"}, path)
    return path
