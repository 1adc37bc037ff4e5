"""A split streamed from Zarr against the same split held in memory, in one process.

A cache larger than memory is read block by block as it trains (`head_train.in_memory: no`): its batches are
made by a reading thread, and the heads' inputs come from those stored beside the split, read ahead with it.
This measures what that costs: one head trained epoch by epoch from the same split, held and streamed in
turn (so that both see the same state of the machine), the same batches in the same order (round r is epoch
r of both). As in training, a streamed epoch's end starts reading the next epoch's first buffer (a training
loop's validation would overlap it): an epoch's time runs until that read is done, so that none of the
reading is left out of the timed epochs. The first round is the warm-up (the streamed split's first buffer
has nothing to overlap with, and the arrays its reads reuse are touched for the first time), left out as every bench step leaves out its first epoch. The demo's 80,000-event
training split is the size that counts; `hepreg bench` takes it when `make demo` has made it.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from hepreg.cache.loader import CacheLoader
from hepreg.config import load_config
from hepreg.prepared import HeadSource
from hepreg.runs.distributed import DistInfo
from hepreg.stages.train_head import build_member, head_set, train_step


def stream_vs_held(config_path: str, split_path: str, out_json: str, rounds: int = 3) -> dict:
    """Events/s of `rounds` epochs held and `rounds` streamed, alternating; writes and returns the figures (the
    ratio: the median over the rounds after the first of streamed over held in the same round, so that a
    machine whose speed drifts over the minutes of the run moves both sides of each ratio alike)."""
    cfg = load_config(config_path)
    ht = cfg.head_train
    info, device = DistInfo(), torch.device("cpu")
    args = dict(batch_size=ht.batch_size, shuffle=True, seed=cfg.seed, shuffle_buffer=ht.shuffle_buffer,
                device=device)
    sources = {}
    for mode in ("held", "streamed"):
        loader = CacheLoader(split_path, in_memory="yes" if mode == "held" else "no", **args)
        sources[mode] = HeadSource(loader.split, loader)
    held = sources["held"]
    steps = len(held)
    member = build_member("head", cfg.head, cfg, held.dim, device, info, held.sample(), 2 * rounds * steps,
                          Path(out_json).parent)
    said = {mode: s.prepare([member.head]) for mode, s in sources.items()}  # stored once, then read by both
    model = head_set([member], info, device)
    rates: dict[str, list[float]] = {"held": [], "streamed": []}
    for epoch in range(rounds):
        for mode in ("held", "streamed"):
            source = sources[mode]
            source.set_epoch(epoch)
            t0, events = time.perf_counter(), 0
            for batch in source:
                train_step(model, [member], batch, ht.grad_clip, source)
                events += batch.size
            source.next_pass_read()  # the next epoch's first buffer, counted in this epoch where it is not read yet
            rates[mode].append(events / (time.perf_counter() - t0))
    after = slice(1, None) if rounds > 1 else slice(None)
    out = {"split": split_path, "events": held.split.num_events, "rounds": rounds, "held": rates["held"],
           "streamed": rates["streamed"], "inputs": said,
           "ratio": statistics.median(s / h for s, h in zip(rates["streamed"][after], rates["held"][after]))}
    Path(out_json).write_text(json.dumps(out, indent=1))
    return out
