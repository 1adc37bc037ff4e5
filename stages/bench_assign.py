"""Where stage 1's time goes, and how much of the machine's arithmetic it uses.

The training step as `train-assign` runs it (the config's model, batches and optimiser), from an untrained
model on the first training events, each part timed per batch: the input net, the encoder, the decoder
layers, the tasks (track-valid and hit-mask logits of every evaluation), the pair loss terms, the matching,
the backward pass, and the optimiser (clipping and zeroing included). The frozen forward that export, the
live head source and predict run (eval mode, inference mode, export's batches) is timed the same way on the
trained checkpoint when there is one. FLOPs per event are counted with torch's FlopCounterMode (the CPU
attention kernels, which it does not know, by its own SDPA formulas) and set against the fp32 matmul rate
measured in the same process, with the same threads: the fraction is how much of that limit a step reaches.
Run by `hepreg bench` in its own process (`stage1_times`), which writes the figures as JSON.
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from hepreg.runs.roofline import CPU_ATTENTION_FLOPS, matmul_gflops  # the matmul rate is measured here too

FLOP_EVERY = 4  # FLOPs are counted on every 4th timed batch
STEP_PARTS = ("input", "encoder", "decoder", "tasks", "forward_other", "pair_terms", "matching", "loss_other",
              "backward", "optimizer")
FORWARD_PARTS = ("input", "encoder", "decoder", "tasks", "forward_other")
LABELS = {"input": "input net + position encoding", "encoder": "encoder layers", "decoder": "decoder layers",
          "tasks": "tasks (valid + mask logits, every evaluation)", "forward_other": "forward, the rest (masks)",
          "pair_terms": "pair loss terms (BCE, dice)", "matching": "matching", "loss_other": "matched loss",
          "backward": "backward", "optimizer": "clip + optimiser step"}


class ModuleClock:
    """Seconds spent inside named groups of modules, from forward hooks (the modules' own code is unchanged)."""

    def __init__(self, groups: dict[str, list[nn.Module]]):
        self.seconds: dict[str, float] = defaultdict(float)
        self._handles = []
        for name, modules in groups.items():
            for m in modules:
                self._handles.append(m.register_forward_pre_hook(self._start))
                self._handles.append(m.register_forward_hook(lambda mod, i, o, name=name: self._stop(mod, name)))
        self._t0: dict[int, float] = {}

    def _start(self, module, inputs) -> None:
        self._t0[id(module)] = time.perf_counter()

    def _stop(self, module, name: str) -> None:
        self.seconds[name] += time.perf_counter() - self._t0.pop(id(module))

    def take(self) -> dict[str, float]:
        out, self.seconds = dict(self.seconds), defaultdict(float)
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def model_groups(model) -> dict[str, list[nn.Module]]:
    """The MaskFormer's modules by part of the forward."""
    return {"input": [model.input_net] + ([model.pos_enc] if model.pos_enc is not None else []),
            "encoder": [*model.encoder, model.encoder_norm],
            "decoder": [*model.decoder, model.query_norm, model.hit_norm],
            "tasks": [model.tasks]}


def count_flops(fn) -> int:
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


def flops_per_event(run, batches: list, every: int = FLOP_EVERY) -> float:
    """FLOPs per event of `run(batch)` over every `every`-th batch (counting costs ~2.5 plain passes; the
    batches are shuffled and bucketed, so a regular sample of them is a fair one)."""
    sample = batches[::every]
    return sum(count_flops(lambda b=b: run(b)) for b in sample) / sum(b.size for b in sample)


def train_step_times(model, batches, cfg, optimizer) -> dict:
    """Seconds per part summed over `batches` (each a full training step), and the steps' FLOPs per event."""
    from hepreg.models.assign_loss import match_pairs, matched_losses, pair_terms, weighted_total

    clock = ModuleClock(model_groups(model))
    totals: dict[str, float] = defaultdict(float)
    a = cfg.assign

    def step(batch, timed: bool) -> None:
        t0 = time.perf_counter()
        out = model(batch.hits, batch.hit_valid)
        t1 = time.perf_counter()
        pt = pair_terms(out, batch, a)
        t2 = time.perf_counter()
        match = match_pairs(pt, a)
        t3 = time.perf_counter()
        loss, _ = weighted_total(matched_losses(pt, match, a), a)  # with the parts as floats, as the loop logs
        t4 = time.perf_counter()
        loss.backward()
        t5 = time.perf_counter()
        if a.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t6 = time.perf_counter()
        parts = clock.take()
        if timed:
            for k, v in parts.items():
                totals[k] += v
            totals["forward_other"] += (t1 - t0) - sum(parts.values())
            for k, dt in (("pair_terms", t2 - t1), ("matching", t3 - t2), ("loss_other", t4 - t3),
                          ("backward", t5 - t4), ("optimizer", t6 - t5)):
                totals[k] += dt

    model.train()
    step(batches[0], timed=False)  # warm-up: first-call allocations
    for b in batches:
        step(b, timed=True)
    clock.remove()
    return {"seconds": dict(totals), "flops_per_event": flops_per_event(lambda b: step(b, timed=False), batches)}


@torch.inference_mode()
def frozen_times(assigner, batches) -> dict:
    """Seconds per part of the frozen forward summed over `batches`, and its FLOPs per event."""
    clock = ModuleClock(model_groups(assigner.model))
    totals: dict[str, float] = defaultdict(float)
    assigner.forward(batches[0])
    clock.take()
    for b in batches:
        t0 = time.perf_counter()
        assigner.forward(b)
        dt = time.perf_counter() - t0
        parts = clock.take()
        for k, v in parts.items():
            totals[k] += v
        totals["forward_other"] += dt - sum(parts.values())
    clock.remove()
    return {"seconds": dict(totals), "flops_per_event": flops_per_event(assigner.forward, batches)}


def stage1_times(config: str | Path, out_json: str | Path, max_events: int = 2048) -> dict:
    """Time stage 1's training step and frozen forward on the first `max_events` training events; write JSON."""
    from hepreg.runs.allocator import tune
    from hepreg.config import load_config
    from hepreg.data.batching import HitLoader
    from hepreg.data.reader import open_dataset, split_ranges
    from hepreg.frozen import FrozenAssigner
    from hepreg.models.maskformer import MaskFormer
    from hepreg.runs.directory import RunDir
    from hepreg.runs.training import make_optimizer

    tune()
    cfg = load_config(config)
    dataset = open_dataset(cfg.data.path, cfg.data.max_events)
    start, stop = split_ranges(len(dataset), cfg.data.val_fraction, cfg.data.test_fraction)["train"]
    stop = min(stop, start + max_events)

    def batches(batch_size: int, shuffle: bool, batch_by: str = "events") -> list:
        return list(HitLoader(dataset, start, stop, batch_size=batch_size, shuffle=shuffle, seed=cfg.seed,
                              bucket_window=cfg.data.bucket_window, batch_by=batch_by))

    out: dict = {"threads": torch.get_num_threads(), "matmul_gflops": matmul_gflops()}
    torch.manual_seed(cfg.seed)
    model = MaskFormer(cfg.model)
    train = batches(cfg.assign.batch_size or cfg.data.batch_size, shuffle=True)
    step = train_step_times(model, train, cfg, make_optimizer(model, cfg))
    out["train"] = {**step, "events": sum(b.size for b in train), "batches": len(train),
                    "hits": int(sum(b.hit_valid.sum() for b in train)),
                    "padded": int(sum(b.hit_valid.numel() for b in train))}
    checkpoint = RunDir(cfg).assign_best
    if checkpoint.is_file():
        assigner = FrozenAssigner.from_checkpoint(checkpoint, "cpu")
        frozen = batches(cfg.export.batch_size, shuffle=False, batch_by=cfg.export.batch_by)
        out["frozen"] = {**frozen_times(assigner, frozen), "events": sum(b.size for b in frozen),
                         "batches": len(frozen)}
    out["matmul_gflops_after"] = matmul_gflops()  # the machine's load may change during the run
    Path(out_json).write_text(json.dumps(out, indent=1))
    return out


def _rate(part: dict, gflops: float) -> tuple[float, float]:
    """(events/s, fraction of the matmul rate) of a timed loop."""
    seconds = sum(part["seconds"].values())
    events_per_s = part["events"] / seconds
    return events_per_s, part["flops_per_event"] * events_per_s / (gflops * 1e9)


def stage1_markdown(s: dict, loop_events_per_s: float | None = None) -> str:
    """Stage 1's training events/s and frozen forward time per event, each against the matmul limit, and
    where each one's time goes; `loop_events_per_s`: train-assign's own rate, when it trained here."""
    gflops = max(s["matmul_gflops"], s.get("matmul_gflops_after", 0.0))
    tr = s["train"]
    rate, frac = _rate(tr, gflops)
    lines = [f"Stage 1 ({s['threads']} thread(s); fp32 matmul measured in the same process: {gflops:.0f} GFLOP/s; "
             f"FLOPs as executed, counted by torch's FlopCounterMode):", "",
             "| | per event | events/s | GFLOP/event | share of the matmul limit |", "|---|---:|---:|---:|---:|",
             f"| training step (forward, loss, backward, optimiser) | {1e3 / rate:.2f} ms | {rate:,.0f} | "
             f"{tr['flops_per_event'] / 1e9:.3f} | {100 * frac:.1f} % |"]
    fr = s.get("frozen")
    if fr:
        frate, ffrac = _rate(fr, gflops)
        lines.append(f"| frozen forward (eval, inference mode) | {1e3 / frate:.2f} ms | {frate:,.0f} | "
                     f"{fr['flops_per_event'] / 1e9:.3f} | {100 * ffrac:.1f} % |")
    if loop_events_per_s:
        lines += ["", f"train-assign's own training loop (the step plus reading and batching; validation excluded) "
                  f"ran at {loop_events_per_s:,.0f} events/s."]
    n = tr["batches"]
    lines += ["", f"Where a training step's time goes ({tr['events']:,} events in {n} batches, "
              f"{tr['hits'] / tr['events']:.0f} hits/event, {100 * tr['hits'] / tr['padded']:.0f} % of the batches' "
              f"padded slots real before the model's sub-batches):", "", "| part | ms per batch | share |" + (" frozen ms per batch | share |" if fr else ""),
              "|---|---:|---:|" + ("---:|---:|" if fr else "")]
    total = sum(tr["seconds"].values())
    ftotal = sum(fr["seconds"].values()) if fr else 0.0
    for part in STEP_PARTS:
        row = f"| {LABELS[part]} | {1e3 * tr['seconds'].get(part, 0.0) / n:.1f} | " \
              f"{100 * tr['seconds'].get(part, 0.0) / total:.0f} % |"
        if fr:
            v = fr["seconds"].get(part)
            row += (f" {1e3 * v / fr['batches']:.1f} | {100 * v / ftotal:.0f} % |" if part in FORWARD_PARTS and v
                    is not None else " – | – |")
        lines.append(row)
    return "\n".join(lines)
