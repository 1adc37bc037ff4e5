"""What every loop shares, once: the mixed-precision choice, stage 1's optimiser, early stopping, the random states.

Stage 1 training, its frozen use in export and the live head source, and the head's training all read these,
so a precision or a stopping rule cannot differ between them.
"""
from __future__ import annotations

import math
import random
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from hepreg.settings import Config, Precision


def autocast(device: torch.device, precision: Precision):
    """bf16 autocast on CUDA by default (`auto`); fp32 elsewhere unless bf16 is asked for explicitly."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023): sign of an interpolated momentum, decoupled weight decay."""

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(m * b1 + p.grad * (1 - b1)), alpha=-group["lr"])
                m.mul_(b2).add_(p.grad, alpha=1 - b2)


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """Stage 1's optimiser (`cfg.assign`). AdamW runs fused: one kernel over all parameters instead of a dozen
    small ops per parameter tensor (the same update up to rounding; on CPU ~6x faster for the 70 small
    tensors of the MaskFormer)."""
    a = cfg.assign
    if a.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay, fused=True)
    return Lion(model.parameters(), lr=a.lr, weight_decay=a.weight_decay)


def head_optimizer(module: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """A head's AdamW, fused as stage 1's: one kernel over the head's ~20 parameter tensors (the same update up
    to rounding)."""
    return torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay, fused=True)


@dataclass
class EarlyStopping:
    """Stop once the validation loss has not improved for `patience` epochs in a row."""
    patience: int
    best: float = math.inf
    bad_epochs: int = 0

    def update(self, val_loss: float) -> bool:
        """Count one epoch's validation loss; True when it is the best so far."""
        if val_loss < self.best:
            self.best, self.bad_epochs = val_loss, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def stop(self) -> bool:
        return self.bad_epochs >= self.patience


# ----------------------------------------------------------------------------------------------- RNG states
def rng_state() -> dict:
    """Every RNG's state as tensors and plain data (what a checkpoint may hold)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class RngStream:
    """A private torch RNG state (CPU, and CUDA when used), swapped in around one head's work."""

    def __init__(self, seed: int, device: torch.device):
        self.cuda = device.type == "cuda"
        saved = self._get()
        torch.manual_seed(seed)
        self.state = self._get()
        self._set(saved)
        self._saved = None

    def _get(self):
        return (torch.get_rng_state(), torch.cuda.get_rng_state() if self.cuda else None)

    def _set(self, s) -> None:
        torch.set_rng_state(s[0])
        if self.cuda:
            torch.cuda.set_rng_state(s[1])

    def __enter__(self):
        self._saved = self._get()
        self._set(self.state)

    def __exit__(self, *exc):
        self.state = self._get()
        self._set(self._saved)


def finetune_learning_rates(ft, step: int, total: int) -> tuple[float, float]:
    """(stage 1, head) learning rates of optimiser step `step` of `total`: stage 1 at 0 while frozen, then each
    part constant or on a cosine from its rate down to 0 over its own steps."""
    def shape(done: int, steps: int) -> float:
        if ft.schedule == "constant":
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(done, steps) / max(steps, 1)))

    warm = ft.warmup_steps
    stage1 = 0.0 if step < warm else ft.lr_stage1 * shape(step - warm, total - warm)
    return stage1, ft.lr_head * shape(step, total)
