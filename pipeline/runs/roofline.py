"""How close a step runs to the machine's limits: its FLOPs and bytes against the matmul rate and the memory
bandwidth, both measured in the same process as the step.

A step of t seconds that executes W FLOPs and moves Q bytes cannot run faster than the roofline time
max(W / matmul rate, Q / bandwidth); the achieved fraction is that time over t. W is counted by torch's
FlopCounterMode (matmuls, convolutions and attention; elementwise work is free to it). Q is the traffic of the
step as executed: every operator's tensor inputs and outputs, once each, views excepted (`OpTraffic`). That is
what an unfused implementation moves through memory, the cost a fused one (torch.compile) would cut, so a step
bound by it shows as memory bound at a fraction that fusion could raise. The arithmetic share W / (t · rate)
is given beside it: the rough count that puts the limit at the matmul rate alone.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count


def _cpu_sdpa_flops(query, key, value, *args, **kwargs) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape)


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


_cpu_sdpa_flops._get_raw = _cpu_sdpa_backward_flops._get_raw = True  # called with the op's own arguments
CPU_ATTENTION_FLOPS = {  # FlopCounterMode counts SDPA's CUDA kernels only
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


def matmul_gflops(n: int = 1024, repeats: int = 8) -> float:
    """fp32 GEMM rate of this process (n x n x n, best of `repeats`): the arithmetic limit the steps are set
    against."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def memory_gbps(nbytes: int = 256 * 2**20, repeats: int = 6) -> float:
    """Copy bandwidth of this process (read + write, best of `repeats`) over arrays well beyond the caches."""
    a = torch.ones(nbytes // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


def machine_limits() -> dict[str, float]:
    """The two roofs, measured now, with the threads this process has."""
    return {"matmul_gflops": matmul_gflops(), "memory_gbps": memory_gbps(), "threads": torch.get_num_threads()}


class OpTraffic(TorchDispatchMode):
    """Bytes read and written by the operators a block of code executes: each operator's distinct tensor
    arguments and outputs counted once per call (a view operator costs nothing; a broadcast argument counts its
    storage, not its expanded size)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            seen: dict[int, int] = {}
            for t in tree_leaves((args, kwargs, out)):
                if isinstance(t, torch.Tensor) and t.device.type != "meta":  # an expanded view: its storage
                    seen[id(t)] = min(t.numel() * t.element_size(), t.untyped_storage().nbytes())
            self.bytes += sum(seen.values())
        return out


def count(fn: Callable[[], object]) -> tuple[int, int]:
    """(FLOPs, bytes) of one call of `fn`."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as flops, OpTraffic() as traffic:
        fn()
    return flops.get_total_flops(), traffic.bytes


def roofline(flops: float, nbytes: float, seconds: float, limits: dict[str, float]) -> dict[str, float]:
    """What `flops` and `nbytes` in `seconds` reach of the roofs: achieved rates, the roofline time, the
    fraction, and which roof binds."""
    compute_s = flops / (limits["matmul_gflops"] * 1e9)
    memory_s = nbytes / (limits["memory_gbps"] * 1e9)
    return {"gflops": flops / seconds / 1e9, "gbps": nbytes / seconds / 1e9,
            "intensity": flops / max(nbytes, 1), "roofline_s": max(compute_s, memory_s),
            "fraction": max(compute_s, memory_s) / seconds, "arithmetic_fraction": compute_s / seconds,
            "bound": "compute" if compute_s >= memory_s else "memory"}


def roofline_markdown(rows: list[tuple[str, dict]], limits: dict[str, float], batch: int) -> str:
    """rows: (label, {"flops", "bytes", "seconds"} per batch of `batch` events, and the "limits" measured right
    before that step, else `limits`)."""
    lines = [f"Roofline ({limits['threads']} thread(s); the roofs measured in the same process just before each "
             f"step: fp32 matmul (1024³) and memory copy; FLOPs counted by FlopCounterMode, bytes as every "
             f"operator's inputs and outputs once, views excepted):", "",
             f"| step (per batch of {batch} events) | ms | GFLOP | MB moved | matmul GFLOP/s · copy GB/s | "
             f"achieved GFLOP/s | FLOP/byte | bound by | roofline ms | fraction of the roofline | "
             f"share of the matmul rate |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for label, r in rows:
        lim = r.get("limits", limits)
        f = roofline(r["flops"], r["bytes"], r["seconds"], lim)
        lines.append(f"| {label} | {1e3 * r['seconds']:.1f} | {r['flops'] / 1e9:.2f} | {r['bytes'] / 1e6:,.0f} | "
                     f"{lim['matmul_gflops']:.0f} · {lim['memory_gbps']:.1f} | "
                     f"{f['gflops']:.1f} | {f['intensity']:.1f} | {f['bound']} | {1e3 * f['roofline_s']:.1f} | "
                     f"**{100 * f['fraction']:.0f} %** | {100 * f['arithmetic_fraction']:.0f} % |")
    return "\n".join(lines)
