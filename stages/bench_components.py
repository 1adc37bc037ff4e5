"""Where a head step's time goes, live and cached: each component timed in one process, per head batch.

The bench's ratios say how much faster the cache trains; this says why, and what bounds each path. On the
first training events of the bench's data and stage 1, in the batches training takes:
  live:   HDF5 read and bucketing (`HitLoader`), the frozen forward, matching and flattening (with the block
          assembly that cuts them into head batches), the heads' inputs computed from the batch, the head step;
  cached: the held split's batch gather, the heads' inputs gathered from those prepared once for the split
          (`hepreg.prepared`; the one-off preparation is reported beside), the head step.
Each component is the median over the batches of its time per head batch. Run by `hepreg bench` in its own
process (`component_times`), which writes the figures as JSON.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from hepreg.runs.roofline import count, machine_limits, roofline_markdown

FLOP_EVERY = 4  # the frozen forward's FLOPs and bytes are counted on every 4th batch
KINDS = {  # what is timed: the demo head, the attention head with the same inputs, the seeds' head
    "pooled": {},
    "attention": {"kind": "attention"},
    "seeds": {"kind": "pooled", "track_frame": False, "fit_proxy": False},
}


def _median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times) if times else float("nan")


def component_times(config: str | Path, out_json: str | Path, max_events: int = 4096) -> dict:
    from hepreg.runs.allocator import tune
    from hepreg.cache.loader import CacheLoader
    from hepreg.config import load_config
    from hepreg.data.batching import HitLoader
    from hepreg.data.reader import open_dataset, split_ranges
    from hepreg.runs.distributed import resolve_device
    from hepreg.flat import Block
    from hepreg.frozen import FrozenAssigner
    from hepreg.models.head import build_head, matched_targets
    from hepreg.prepared import PreparedInputs
    from hepreg.runs.directory import RunDir
    from hepreg.runs.training import head_optimizer

    tune()
    cfg = load_config(config)
    device = resolve_device(cfg.head_train.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    hb = cfg.head_train.batch_size
    run = RunDir(cfg)

    # ---- cached: the held split, batches in training order
    loader = CacheLoader(run.cache_split("train"), batch_size=hb, shuffle=True, seed=cfg.seed, in_memory="yes",
                         device=device)
    n_batches = max(1, min(len(loader), max_events // hb))
    gather, batches = [], []
    it = iter(loader)
    for _ in range(n_batches):
        sync()
        t0 = time.perf_counter()
        b = next(it)
        sync()
        gather.append(time.perf_counter() - t0)
        batches.append(b)
    events = sum(b.size for b in batches)
    out: dict = {"head_batch": hb, "events": events, "split_events": loader.split.num_events,
                 "cached": {"gather": _median_ms(gather)}, "live": {}, "kinds": {}}

    # ---- live: the same number of events through the frozen model, as the live source runs them
    dataset = open_dataset(cfg.data.path, cfg.data.max_events)
    start, stop = split_ranges(len(dataset), cfg.data.val_fraction, cfg.data.test_fraction)["train"]
    stop = min(stop, start + events)
    assigner = FrozenAssigner.from_checkpoint(run.assign_best, device)
    hits = HitLoader(dataset, start, stop, batch_size=cfg.export.batch_size, shuffle=False, seed=cfg.seed,
                     bucket_window=cfg.data.bucket_window, batch_by=cfg.export.batch_by)
    limits = machine_limits()
    read = forward = flatten = 0.0
    blocks, frozen_flops, frozen_bytes, frozen_counted = [], 0, 0, 0
    t0 = time.perf_counter()
    for i, batch in enumerate(hits):
        batch = batch.to(device)
        sync()
        t1 = time.perf_counter()
        outputs = assigner.forward(batch)
        sync()
        t2 = time.perf_counter()
        blocks.append(Block.from_flat(assigner.flatten(batch, outputs, loader.split.prune_threshold)))
        sync()
        t3 = time.perf_counter()
        if i % FLOP_EVERY == 0:  # counted apart from the timing (counting costs a few plain passes)
            flops, nbytes = count(lambda: assigner.forward(batch))
            frozen_flops, frozen_bytes, frozen_counted = frozen_flops + flops, frozen_bytes + nbytes, \
                frozen_counted + batch.size
        read, forward, flatten = read + t1 - t0, forward + t2 - t1, flatten + t3 - t2
        t0 = time.perf_counter()
    t0 = time.perf_counter()
    whole = Block.concat(blocks)
    for s in range(0, whole.size, hb):
        whole.slice(s, min(s + hb, whole.size)).to_flat().to(device)
    assemble = time.perf_counter() - t0
    per_batch = 1e3 * hb / max(stop - start, 1)  # seconds over these events -> ms per head batch
    out["live"] = {"read": read * per_batch, "forward": forward * per_batch,
                   "match_flatten": (flatten + assemble) * per_batch}
    out["limits"] = limits
    out["roofline"] = {"frozen forward (eval, inference mode)": {  # per head batch
        "flops": frozen_flops * hb / max(frozen_counted, 1), "bytes": frozen_bytes * hb / max(frozen_counted, 1),
        "seconds": forward * hb / max(stop - start, 1), "limits": limits}}

    # ---- per head kind: inputs (per batch, as live pays; prepared, as cached pays) and the step
    for kind, kw in KINDS.items():
        hc = dataclasses.replace(cfg.head, **kw)
        torch.manual_seed(cfg.seed)
        head = build_head(hc, loader.split.dim).to(device)
        head.estimate_scales(batches[0])
        opt = head_optimizer(head, hc.lr, hc.weight_decay)  # as train-head builds it
        sync()
        t0 = time.perf_counter()
        prepared = PreparedInputs.held(loader.resident, head.input_key)
        sync()
        prepare_s = time.perf_counter() - t0
        def head_step(b, x) -> None:
            loss, n = head.loss(head(b, x, only_matched=True), b)
            opt.zero_grad(set_to_none=True)
            (loss / n.clamp_min(1)).backward()
            opt.step()

        kind_limits = machine_limits()  # right before this kind's steps: the load of a shared machine moves
        per_batch_in, prepared_in, step, flops, nbytes = [], [], [], 0, 0
        for b in batches:
            sync()
            t0 = time.perf_counter()
            head.inputs(b)
            sync()
            t1 = time.perf_counter()
            x = prepared.inputs(b, matched_targets(b)[1].view(-1))  # the slots training reads, as it gathers them
            sync()
            t2 = time.perf_counter()
            head_step(b, x)
            sync()
            t3 = time.perf_counter()
            per_batch_in.append(t1 - t0), prepared_in.append(t2 - t1), step.append(t3 - t2)
        for b in batches:  # counted after the timing: counting runs each operator a few times over
            x = prepared.inputs(b, matched_targets(b)[1].view(-1))
            f, q = count(lambda: head_step(b, x))
            flops, nbytes = flops + f, nbytes + q
        out["roofline"][f"{kind} head step (forward, backward, optimiser)"] = {
            "flops": flops / len(batches), "bytes": nbytes / len(batches), "seconds": sum(step) / len(batches),
            "limits": kind_limits}
        out["kinds"][kind] = {"inputs_per_batch": _median_ms(per_batch_in), "inputs_prepared": _median_ms(prepared_in),
                              "step": _median_ms(step), "prepare_s": prepare_s,
                              "prepared_mib": prepared.nbytes / 2**20}
    Path(out_json).write_text(json.dumps(out, indent=1))
    return out


def components_markdown(c: dict, device: str) -> str:
    """The per-component table: ms per head batch, live against cached, and the ratio they imply."""
    hb, live, cached = c["head_batch"], c["live"], c["cached"]
    fixed_live = live["read"] + live["forward"] + live["match_flatten"]
    rows = ["| component (ms per batch of {} events) | live | cached |".format(hb), "|---|---:|---:|",
            f"| read: HDF5 + bucketing / held split's gather | {live['read']:.0f} | {cached['gather']:.1f} |",
            f"| frozen stage-1 forward | {live['forward']:.0f} | – |",
            f"| matching + flattening + batch assembly | {live['match_flatten']:.0f} | – |"]
    implied = []
    for kind, k in c["kinds"].items():
        rows.append(f"| {kind}: head inputs (per batch / prepared once) | {k['inputs_per_batch']:.0f} | "
                    f"{k['inputs_prepared']:.0f} |")
        rows.append(f"| {kind}: head step (forward, backward, optimiser) | {k['step']:.0f} | {k['step']:.0f} |")
        total_live = fixed_live + k["inputs_per_batch"] + k["step"]
        total_cached = cached["gather"] + k["inputs_prepared"] + k["step"]
        once = 1e3 * k["prepare_s"] * hb / max(c["split_events"], 1)  # the preparation, spread over one epoch
        implied.append(f"| {kind} | {total_live:.0f} | {total_cached:.0f} | **{total_live / total_cached:.1f}×** | "
                       f"{k['prepare_s']:.1f} s ({once:.0f} ms per batch of one epoch), {k['prepared_mib']:.0f} MiB |")
    roof = roofline_markdown(list(c["roofline"].items()), c["limits"], hb) if "roofline" in c else ""
    return "\n".join([
        f"Where the time goes ({device}; medians over {c['events']:,} training events in batches of {hb}, each "
        f"component timed alone in one process; the step is the same computation in both paths):", "", *rows, "",
        "| head kind | live total ms | cached total ms | implied (c)/(b) | inputs prepared once (train split) |",
        "|---|---:|---:|---:|---:|", *implied] + (["", roof] if roof else []))
