"""What `hepreg bench` writes: the machine it ran on, the table of (a)-(e) with their ratios, the loader's
section, as markdown for BENCHMARKS.md and a rich table for the terminal."""
from __future__ import annotations

import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.table import Table

SWEEP_K = 8
DM_EFF_TARGET = 0.95  # the demo's stage 1 reaches 0.985; below this the bench's pruning is not the demo's
ALLOCATORS = {  # how a step's process gets its glibc allocator settings
    "mallopt": "`hepreg` run directly: mallopt at start-up",
    "makefile": "the Makefile's MALLOC_* variables",
    "none": "neither (HEPREG_MALLOPT=0)",
}


@dataclass
class Measured:
    name: str
    events_per_s: float
    peak_rss: int  # bytes
    wall_s: float
    events: int  # events per epoch (training) or in total (export)


def machine() -> str:
    """CPU model and cores available to this process, RAM, accelerator, torch version."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ram = ""
    try:
        kb = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal")).split()[1])
        ram = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    threads = os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads()  # what the step processes will use
    return (f"{cpu}, {cores} cores{ram}{gpu}; Python {platform.python_version()}, torch {torch.__version__} "
            f"with {threads} thread(s) per process, {platform.system()} {platform.release()}")


def break_even_epochs(export_s: float, live_epoch_s: float, cache_epoch_s: float) -> float:
    """Smallest whole number n of head epochs with export + n cached epochs < n live epochs (inf if never)."""
    gain = live_epoch_s - cache_epoch_s
    if gain <= 0:
        return math.inf
    return math.floor(export_s / gain) + 1


def report(results: dict[str, Measured], train_events: int, info: dict, quick: bool) -> tuple[Table, str, dict]:
    a, b, c, d, e = (results[k] for k in ("joint", "live", "cache", "sweep", "export"))
    live_epoch, cache_epoch = train_events / b.events_per_s, train_events / c.events_per_s
    ratios = {
        "cache_vs_live": c.events_per_s / b.events_per_s,  # (c)/(b): head events/s, cached over live
        "unpruned_cache_vs_live": results["cache_unpruned"].events_per_s / b.events_per_s,
        "sweep_vs_8_live": SWEEP_K * d.events_per_s / b.events_per_s,  # 8 live trainings' time over the sweep's
        "sweep_vs_8_cached": SWEEP_K * d.events_per_s / c.events_per_s,  # 8 single cached runs' time over it
        "live_vs_joint": b.events_per_s / a.events_per_s,
        "streamed_vs_held": info["stream"]["ratio"],  # Zarr read ahead over held, epochs alternating in one process
        # the one-off cost: export, and preparing the heads' inputs from the held split
        "break_even_epochs": break_even_epochs(e.wall_s + info.get("prepare_s", 0.0), live_epoch, cache_epoch),
    }
    kind0 = info["kinds"][0]
    labels = {"joint": "(a) joint stage 1 + head training", "live": f"(b) head, live frozen stage 1 ({kind0})",
              "cache": f"(c) head from the cache ({kind0})",
              "cache_unpruned": "(c') head from the cache, every hit kept",
              "sweep": f"(d) K={SWEEP_K} sweep from the cache, stacked",
              "sweep_unstacked": f"(d) K={SWEEP_K} sweep from the cache, unstacked (`head_train.stack: no`)",
              "export": "(e) export (train+val+test)"}
    if "sweep_unstacked" not in results:  # the quick bench runs the sweep stacked only
        del labels["sweep_unstacked"]
    else:
        ratios["sweep_stacked_vs_unstacked"] = d.events_per_s / results["sweep_unstacked"].events_per_s
        ratios["unstacked_sweep_vs_8_cached"] = SWEEP_K * results["sweep_unstacked"].events_per_s / c.events_per_s
    table = Table(title="hepreg bench" + (" (--quick: smoke sizes, not a measurement)" if quick else ""),
                  header_style="bold")
    for col in ("step", "events/s", "vs (b)", "peak RSS"):
        table.add_column(col, justify="left" if col == "step" else "right")
    rows = []
    for key, label in labels.items():
        m = results[key]
        k = SWEEP_K if key.startswith("sweep") else 1
        rate = f"{m.events_per_s:,.0f}" + (f" ×{SWEEP_K} heads" if k > 1 else "")
        rel = "" if key == "export" else f"{m.events_per_s * k / b.events_per_s:.2f}×"
        rss = f"{m.peak_rss / 2**20:,.0f} MiB"
        table.add_row(label, rate, rel, rss)
        rows.append(f"| {label} | {rate} | {rel} | {rss} |")
    n = ratios["break_even_epochs"]
    kinds = ["| head kind | (b) live events/s | (c) cached events/s | (c)/(b) | peak RSS live / cached |",
             "|---|---:|---:|---:|---:|"]
    for kind in info["kinds"]:
        lv, ca = results[f"live:{kind}"], results[f"cache:{kind}"]
        ratios[f"cache_vs_live:{kind}"] = ca.events_per_s / lv.events_per_s
        kinds.append(f"| {kind} | {lv.events_per_s:,.0f} | {ca.events_per_s:,.0f} | "
                     f"**{ca.events_per_s / lv.events_per_s:.1f}×** | {lv.peak_rss / 2**20:,.0f} / "
                     f"{ca.peak_rss / 2**20:,.0f} MiB |")
    alloc = ["| allocator settings of the (c) process | events/s | vs mallopt |", "|---|---:|---:|"]
    for key, label in ALLOCATORS.items():
        if f"alloc:{key}" not in results:
            alloc.append(f"| {label} | not measured with --quick | |")
            continue
        m = results[f"alloc:{key}"]
        ratios[f"alloc_{key}_vs_mallopt"] = m.events_per_s / results["alloc:mallopt"].events_per_s
        alloc.append(f"| {label} | {m.events_per_s:,.0f} | {ratios[f'alloc_{key}_vs_mallopt']:.2f}× |")
    q = info["assign"]
    quality = (f"Stage 1 (val split): double-majority efficiency **{q.get('dm_eff', math.nan):.3f}**, fake rate "
               f"{q.get('fake_rate', math.nan):.3f}, hit efficiency {q.get('hit_eff', math.nan):.3f}, purity "
               f"{q.get('hit_purity', math.nan):.3f}; the cache kept **{100 * info['kept_fraction']:.0f} %** of "
               f"the hits (the demo's stage 1: 0.985 and 31 %).")
    if q.get("dm_eff", 0.0) < DM_EFF_TARGET:
        quality += (f" **Below the demo's assignment quality (DM efficiency < {DM_EFF_TARGET}): pruning keeps more "
                    f"hits than a user's cache would, so the cached ratios are understated.**")
    lines = [
        f"- (c)/(b), head training from the cache over live: **{ratios['cache_vs_live']:.1f}×** the events/s",
        f"- (c')/(b), the same from a cache that keeps every hit (no pruning): "
        f"**{ratios['unpruned_cache_vs_live']:.1f}×**",
        f"- (d)/(8×(b)), a K={SWEEP_K} sweep from the cache against {SWEEP_K} live trainings: "
        f"**{ratios['sweep_vs_8_live']:.1f}×** faster (time ratio {1 / ratios['sweep_vs_8_live']:.3f}); against "
        f"{SWEEP_K} single cached runs (the same head, {SWEEP_K} learning rates and dropouts, stacked): "
        f"**{ratios['sweep_vs_8_cached']:.2f}×**"
        + (f"; unstacked (`head_train.stack: no`): {ratios['unstacked_sweep_vs_8_cached']:.2f}×, so stacking gives "
           f"{ratios['sweep_stacked_vs_unstacked']:.2f}× the events/s" if "sweep_stacked_vs_unstacked" in ratios else ""),
        f"- a split streamed from Zarr (`head_train.in_memory: no`: batches made by a reading thread, the heads' "
        f"inputs read ahead from those stored beside the split) against the same split held in memory, epochs "
        f"alternating in one process on {info['stream']['events']:,} training events ({info['stream']['split']}): "
        f"**{info['stream']['ratio']:.2f}×** the events/s (the median of the rounds' ratios after the first round; per round, streamed "
        f"{', '.join(f'{r:,.0f}' for r in info['stream']['streamed'])}, held "
        f"{', '.join(f'{r:,.0f}' for r in info['stream']['held'])}; each streamed epoch timed until the next epoch's "
        f"first buffer is read)" + (
            f"; as its own (c) process on the bench's {train_events:,} events (read in one buffer, which nothing "
            f"overlaps): {results['stream'].events_per_s / c.events_per_s:.2f}×, peak RSS "
            f"{results['stream'].peak_rss / 2**20:,.0f} MiB" if "stream" in results else ""),
        f"- export + cached training beats live training from **{n if math.isfinite(n) else 'never'}** head "
        f"epoch(s) on (export {e.wall_s:.0f} s, preparing the heads' inputs {info.get('prepare_s', 0.0):.1f} s, one "
        f"live epoch {live_epoch:.1f} s, one cached epoch {cache_epoch:.2f} s on {train_events:,} training events)",
    ]
    md = "\n".join([
        quality, "",
        "| step | events/s | vs (b) | peak RSS |", "|---|---:|---:|---:|", *rows, "", *lines, "",
        "Every head kind, live against cached (same data, batches and epochs):", "", *kinds, "",
        "The allocator: (c) once per way its process can get the glibc settings (every other step runs as "
        "`hepreg` run directly):", "", *alloc, "",
        f"Data: {info['events']:,} events from `hepreg generate`{info['preset']}, {info['hits_per_event']:.0f} "
        f"hits/event on average (prune threshold {info['prune_threshold']:g}). {info['assign_source']}; "
        f"batches{' (smoke sizes)' if quick else ' as the demo trains'}: {info['head_batch']} events per head step, "
        f"{info['live_batch']} per live frozen forward. (a) trains on the first {info['joint_events']:,} training events per epoch, the others "
        f"on all {train_events:,}; rates average the epochs after the first. Device: {info['device']}.",
    ])
    return table, md, ratios


def cache_section(train_split: Path, batch_size: int, device: str = "cpu") -> str:
    """Reading the cache alone (no training): Zarr against held on the device, numpy blocks in host memory and
    numpy memmap, and its size on disk."""
    from hepreg.cache.bench import bytes_per_event, loader_throughput

    r = loader_throughput(train_split, batch_size=batch_size, device=device)
    b = bytes_per_event(train_split)
    pinned = ", pinned, copied non-blocking one batch ahead" if device == "cuda" else ""
    return "\n".join([
        f"The loader alone: shuffled epochs of the train split ({r['events']:,} events, batches of {batch_size}), "
        f"as float32 batches on {device}:",
        "",
        "| source | events/s | vs memmap |", "|---|---:|---:|",
        f"| Zarr, read block by block{pinned} | {r['zarr_events_per_s']:,.0f} | {r['zarr_vs_memmap']:.2f}× |",
        f"| held on {device} (loaded in {r['load_s']:.1f} s), a batch is a gather there | "
        f"{r['device_events_per_s']:,.0f} | {r['device_events_per_s'] / r['memmap_events_per_s']:.2f}× |",
        f"| numpy blocks in host memory | {r['memory_events_per_s']:,.0f} | "
        f"{r['memory_events_per_s'] / r['memmap_events_per_s']:.2f}× |",
        f"| numpy memmap of the same bytes | {r['memmap_events_per_s']:,.0f} | 1.00× |",
        "",
        f"On disk: {b['bytes_per_event']:,.0f} bytes/event ({b['decoded_bytes_per_event']:,.0f} decoded, "
        f"compression {b['compression_ratio']:.2f}×), hits/embed as {b['dtype']}.",
    ])
