"""torch.compile for a head's dense parts, behind `head_train.compile`, with a fallback to eager.

What compiles well in a head is its dense stacks: the per-hit MLPs and the regression MLP of the pooled head,
the transformer blocks and MLP of the attention head (Linear, SiLU/ReLU, LayerNorm, dropout: elementwise work
that inductor fuses around the matmuls). Bucketing, gathers and the flat pooling stay eager: their shapes
change with every batch. Modules are compiled in place (`nn.Module.compile`), so checkpoints keep their keys,
with dynamic shapes (the number of hits and tracks changes every batch). Where no compiler works (no C++
compiler on a CPU node, no Triton on a GPU node), a trial forward and backward fails at set-up and the head
trains eagerly, saying why.
"""
from __future__ import annotations

import torch
from torch import nn


def dense_parts(head: nn.Module) -> list[nn.Module]:
    """The modules of a head worth compiling (whatever of them it has)."""
    names = ("hit_net", "embed_net", "mlp")
    parts = [getattr(head, n) for n in names if isinstance(getattr(head, n, None), nn.Module)]
    return parts + list(getattr(head, "blocks", []))


def compile_head(head: nn.Module) -> str:
    """Compile `head`'s dense parts in place; returns what was done, for the run's header."""
    parts = dense_parts(head)
    if not parts:
        return "not compiled: no dense part"
    try:
        for m in parts:
            m.compile(dynamic=True)
        _trial(parts)
    except Exception as e:  # noqa: BLE001  (inductor raises many kinds: a missing compiler, an unsupported op)
        for m in parts:
            m._compiled_call_impl = None  # back to eager
        return f"not compiled, eager instead: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    return f"compiled (torch.compile, dynamic shapes): {len(parts)} dense parts"


def _trial(parts: list[nn.Module]) -> None:
    """One forward and backward of each part on a small random input of its own width, so that a compiler
    that cannot work fails here and not in the first training step."""
    with torch.random.fork_rng(devices=[]):  # the trial's random input and dropout leave no trace in the RNG
        for m in parts:
            _trial_one(m)


def _trial_one(m: nn.Module) -> None:
    p = next(m.parameters())
    width = _input_width(m)
    if width is None:
        return
    block = "Block" in type(m).__name__  # a transformer block: tokens [S, T, d] and a mask [S, T, T]
    x = torch.randn((3, 5, width) if block else (7, width), device=p.device, dtype=p.dtype)
    args = (x, torch.ones(3, 5, 5, dtype=torch.bool, device=p.device)) if block else (x,)
    m(*args).sum().backward()
    m.zero_grad(set_to_none=True)


def _input_width(m: nn.Module) -> int | None:
    for sub in m.modules():
        if isinstance(sub, nn.Linear):
            return sub.in_features
        if isinstance(sub, nn.LayerNorm):
            return sub.normalized_shape[0]
    return None
