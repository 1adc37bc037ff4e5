"""torchrun helpers: one place that knows about ranks, so stages read `dist_info()` and never os.environ."""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from hepreg.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device: torch.device) -> DistInfo:
    """Initialise the process group under torchrun (NCCL on CUDA, gloo on CPU); a no-op otherwise."""
    info = dist_info()
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return info


@contextmanager
def started(device_name: str) -> Iterator[tuple[torch.device, DistInfo]]:
    """A stage's start-up, the same for every stage: this rank's device (`auto` picks CUDA when there is one)
    and, under torchrun, the process group, destroyed on the way out whatever happens."""
    device = resolve_device(device_name, dist_info().local_rank)
    info = init_distributed(device)
    try:
        yield device, info
    finally:
        shutdown()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` picks CUDA when there is one."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device cuda was asked for, but torch finds no CUDA device here "
                              "(torch.cuda.is_available() is False); set the stage's device to auto or cpu")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def contiguous_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """The [start, stop) slice of n items owned by `rank`: contiguous, disjoint, covering everything."""
    per, extra = divmod(n, world)
    start = rank * per + min(rank, extra)
    return start, start + per + (1 if rank < extra else 0)
