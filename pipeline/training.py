"""What every loop shares, once: the mixed-precision choice and early stopping.

Stage 1 training, its frozen use in export and the live head source, and the head's training all read these,
so a precision or a stopping rule cannot differ between them.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from hepreg.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16")


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA by default (`auto`); fp32 elsewhere unless bf16 is asked for explicitly."""
    if precision not in PRECISIONS:
        raise ConfigError(f"assign.precision must be auto, fp32 or bf16, got {precision!r}")
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


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
