"""`hepreg bench`: the cached pipeline against the live baseline, measured side by side in one run.

On one freshly generated dataset (the generator's default, high-occupancy settings) and one machine, every
measured step runs as its own `hepreg` process (forked from one that imported torch once,
`hepreg.stages.bench_process`), so that its peak memory (the child's ru_maxrss) is its own and no step warms
another's caches:
  (a) joint training of the stage-1 model and the head (one backward through both),
  (b) head training with the live frozen stage-1 model on every batch (the seeds' approach),
  (c) head training from the cache, and (c') from a cache that keeps every hit (pruning's share of the gain),
      and (c) with the split streamed from Zarr instead of held in memory (as a cache larger than memory trains),
  (d) a K = 8 sweep from the cache (eight head configurations of one shape trained from one read, stacked;
      the full bench runs it unstacked too),
  (e) export of the cache (train, val and test splits);
(b) and (c) for every head kind the head module registers; (c) once more with the Makefile's MALLOC_*
variables and once with no allocator settings at all (every other step runs as `hepreg` started directly:
MALLOC_* removed, `hepreg.runs.allocator` applying them by mallopt); the loader alone, Zarr against held on
the device; and stage 1 itself: its training step's and frozen forward's time per event, part by part, and
the share of the machine's matmul rate each reaches (`hepreg.stages.bench_assign`).

What users get: the model, stage-1 training and batch sizes are the demo config's (configs/demo.yaml), and
stage 1 trains as long as the demo's (~1500 steps) so that it assigns as well and prunes as much; or
`--assign-checkpoint` reuses a trained one (e.g. runs/demo/assign/best.pt) and skips that step. Stage 1's
double-majority efficiency and the fraction of hits the cache keeps are reported next to the ratios.
Training throughput is the stages' own per-epoch train events/s (the optimisation loop, not start-up or
validation), averaged over the epochs after the first; export is timed as a whole command (from the fork, not
from exec), which only makes the cache look slower (by its set-up, not by the imports). Ratios are the result;
absolute rates depend on the machine.

Every step inherits the environment, so `OMP_NUM_THREADS=1 hepreg bench` runs them all single-threaded: do
that on a machine other jobs share. With more busy threads than cores, torch's OpenMP threads wait on each
other; on 2 shared cores (load ~7) that made the head step 5-7x slower with 2 threads than with 1 and hid
the cache's gain behind the contention.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from hepreg.settings import HeadKind, Split
from hepreg.errors import HepregError
from hepreg.runs.progress import console
from hepreg.stages.bench_assign import stage1_markdown
from hepreg.stages.bench_process import hepreg, python, run_process
from hepreg.stages.bench_report import SWEEP_K, Measured, cache_section, machine, report
from hepreg.stages.bench_components import components_markdown

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@dataclass(frozen=True)
class Sizes:
    events: int  # generated events; 80 % train, 10 % val, 10 % test
    epochs: int  # per measured training step
    assign_epochs: int  # stage-1 training (4000 training events x 12 epochs / 32 = 1500 steps, as the demo)
    joint_events: int  # (a) trains on this many training events per epoch (its rate per event is what counts)
    component_events: int = 4096  # training events the per-component times are taken over
    batch_size: int | None = None  # stage-1 data / live batch (events); None: the demo's
    head_batch_size: int | None = None  # head batch (events); None: the demo's
    assign_batch_size: int | None = None  # stage-1 training batch; None: the demo's
    noise_mean: float | None = None  # background hits per event; None: the generator's default (high occupancy)


# stage 1 as the demo's, on these 4,000 training events: val DM efficiency 0.979, 32 % of the hits kept at the
# demo's prune threshold (measured; the demo: 0.985 and 31 %)
FULL = Sizes(events=5000, epochs=3, assign_epochs=12, joint_events=640)
QUICK = Sizes(events=80, epochs=1, assign_epochs=1, joint_events=64, batch_size=16, head_batch_size=32,
              assign_batch_size=16, noise_mean=10.0, component_events=64)


def mean_rate(csv_path: Path, column: str = "events_per_s") -> float:
    """Mean of a per-epoch rate column, leaving out the first epoch when there are more (warm-up)."""
    if not csv_path.is_file():
        raise HepregError(f"bench: {csv_path} was not written by the measured step")
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or column not in rows[0]:
        raise HepregError(f"bench: {csv_path} has no column {column!r}")
    values = [float(r[column]) for r in rows]
    values = values[1:] if len(values) > 1 else values
    return sum(values) / len(values)


# ---------------------------------------------------------------------------------------------- (a) joint


# ---------------------------------------------------------------------------------------------- the run

def demo_settings() -> dict:
    """The demo config's sections (an empty dict where the repository's configs/ is not at hand)."""
    if not DEMO_CONFIG.is_file():
        return {}
    return yaml.safe_load(DEMO_CONFIG.read_text()) or {}


def bench_config(workdir: Path, sizes: Sizes, device: str = "auto", model: dict | None = None) -> dict:
    """The run config every step shares: one dataset, one stage-1 model, one cache; model, stage-1 training,
    head and batch sizes as the demo's. `model`: the stage-1 model section of a given checkpoint."""
    demo = demo_settings()
    data, assign, head_train = demo.get("data", {}), dict(demo.get("assign", {})), demo.get("head_train", {})
    assign.update({"epochs": sizes.assign_epochs, "patience": 100, "device": device})
    if sizes.assign_batch_size is not None:
        assign["batch_size"] = sizes.assign_batch_size
    assign.pop("max_minutes", None)  # a step count, not a wall-time budget: the same model on any machine
    export = {k: v for k, v in demo.get("export", {}).items()
              if k in ("dtype", "compressor", "prune_threshold", "batch_by")}
    cfg = {
        "name": "bench",
        "seed": 0,
        "run_dir": str(workdir / "runs"),
        "data": {"path": str(workdir / "data"), "batch_size": sizes.batch_size or data.get("batch_size", 128),
                 **{k: v for k, v in data.items() if k == "bucket_window"}},
        "model": model if model is not None else demo.get("model", {}),
        "assign": assign,
        "head": demo.get("head", {}),
        "head_train": {"epochs": sizes.epochs, "batch_size": sizes.head_batch_size or head_train.get("batch_size", 512),
                       "patience": 100, "device": device},
        "export": {**export, "device": device},
        "eval": {"plots": False},  # rates, not figures: a learning curve costs seconds per run on a CPU
    }
    return cfg


def head_kinds() -> tuple[str, ...]:
    """The head kinds the config accepts (`head.kind`)."""
    return typing.get_args(HeadKind)


def kind_args(kind: str) -> tuple[str, ...]:
    """`--set head.kind=...` where the head config has a kind (nothing to set before it had)."""
    import dataclasses

    from hepreg.settings import HeadConfig

    return ("--set", f"head.kind={kind}") if "kind" in {f.name for f in dataclasses.fields(HeadConfig)} else ()


def install_checkpoint(checkpoint: Path, run_root: Path) -> dict:
    """Copy a trained stage-1 checkpoint in as the bench run's assign/best.pt; returns its model section."""
    from hepreg.runs.directory import RunDir, load_checkpoint

    state = load_checkpoint(checkpoint)
    try:
        model = dict(state["config"]["model"])
    except (KeyError, TypeError):
        raise HepregError(f"bench: {checkpoint} is not a stage-1 checkpoint (no config.model in it)") from None
    dest = RunDir(run_root).assign_best
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(checkpoint, dest)
    return model


@torch.inference_mode()
def assign_quality(cfg_path: Path, split: str = "val") -> dict[str, float]:
    """Stage 1's assignment rates (double-majority efficiency, fake rate, hit efficiency and purity) on a
    split, as stage-1 validation counts them: the frozen model, matched by the training costs."""
    from hepreg.config import load_config
    from hepreg.data.batching import HitLoader
    from hepreg.data.reader import open_dataset, split_ranges
    from hepreg.frozen import FrozenAssigner
    from hepreg.models.assign_loss import assignment_loss
    from hepreg.models.assign_metrics import add_counts, counts_from_logits, rates
    from hepreg.runs.directory import RunDir

    cfg = load_config(cfg_path)
    assigner = FrozenAssigner.from_checkpoint(RunDir(cfg).assign_best, "cpu")
    dataset = open_dataset(cfg.data.path, cfg.data.max_events)
    start, stop = split_ranges(len(dataset), cfg.data.val_fraction, cfg.data.test_fraction)[split]
    counts = None
    for batch in HitLoader(dataset, start, stop, batch_size=cfg.data.batch_size, shuffle=False, seed=cfg.seed,
                           bucket_window=cfg.data.bucket_window):
        out = assigner.forward(batch)
        _, _, match = assignment_loss(out, batch, assigner.config.assign)
        final = out.final
        counts = add_counts(counts, counts_from_logits(final["track_logit"], final["mask_logit"], batch.hit_valid,
                                                       batch.particle_valid, batch.particle_hit_valid, match))
    return rates(counts) if counts else {}


def sweep_file(path: Path) -> Path:
    """K = 8 head configurations of the demo head's shape: learning rate x dropout. One shape, so that (d) is
    K single (c) runs trained at once, stacked (`head_train.stack`, `hepreg.models.stacked`)."""
    configs = [{"name": f"lr{lr:g}_d{d:g}", "lr": lr, "dropout": d} for lr in (1e-3, 2e-3, 3e-3, 5e-3)
               for d in (0.1, 0.2)]
    assert len(configs) == SWEEP_K
    path.write_text(yaml.safe_dump({"configs": configs}, sort_keys=False))
    return path


def run(quick: bool = False, out: Path = Path("BENCHMARKS.md"), workdir: Path = Path("runs/bench"),
        device: str = "auto", assign_checkpoint: Path | None = None, stream_split: Path | None = None) -> dict:
    """Generate data, train stage 1 (or take `assign_checkpoint`), then measure (a)-(e) each in its own
    process, (b) and (c) for every head kind; write the tables to `out`."""
    from hepreg.cache.store import read_meta
    from hepreg.runs.distributed import resolve_device
    from hepreg.runs.directory import RunDir

    sizes = QUICK if quick else FULL
    dev = resolve_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HepregError("bench --device cuda: torch sees no CUDA device on this machine")
    if assign_checkpoint is not None and not Path(assign_checkpoint).is_file():
        raise HepregError(f"bench --assign-checkpoint: {assign_checkpoint} does not exist")
    workdir = Path(workdir).resolve()
    logs = workdir / "logs"
    run_root = workdir / "runs" / "bench"
    if run_root.exists():
        shutil.rmtree(run_root)
    workdir.mkdir(parents=True, exist_ok=True)
    model = install_checkpoint(Path(assign_checkpoint), run_root) if assign_checkpoint is not None else None
    cfg_data = bench_config(workdir, sizes, dev.type, model)
    cfg_path = workdir / "bench.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg_data, sort_keys=False))
    sweep = sweep_file(workdir / "sweep.yaml")
    kinds = head_kinds()
    console.print(f"bench: {machine()}", highlight=False)
    load_start = f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"

    def step(label: str, cmd: list[str], log: str, allocator: str = "mallopt") -> tuple[float, int]:
        console.print(f"bench: {label} …", highlight=False)
        wall, rss = run_process(cmd, logs / log, allocator)
        console.print(f"bench: {label} done in {wall:.1f} s, peak RSS {rss / 2**20:,.0f} MiB", highlight=False)
        return wall, rss

    noise = ("--noise-mean", sizes.noise_mean) if sizes.noise_mean is not None else ()
    # seed 2: not the demo's events (seed 1), so that a demo checkpoint is measured on events it never saw
    step("generating data", hepreg("generate", cfg_data["data"]["path"], "--events", sizes.events, "--seed", 2,
                                   *noise, "--overwrite"), "generate.log")
    if model is None:
        step("training stage 1 (input of steps b-e)", hepreg("train-assign", "-c", cfg_path, "--overwrite"),
             "train_assign.log")
        assign_source = (f"Stage 1 trained here as the demo's ({cfg_data['assign']['epochs']} epoch(s) of batches of "
                         f"{cfg_data['assign'].get('batch_size', 'default')})")
    else:
        assign_source = f"Stage 1 from `{assign_checkpoint}` (not trained here)"
    console.print("bench: stage-1 assignment quality on the val split …")
    quality = assign_quality(cfg_path)
    console.print(f"bench: DM efficiency {quality.get('dm_eff', math.nan):.3f}", highlight=False)
    train_events = split_events(cfg_path, "train")

    results: dict[str, Measured] = {}
    joint_csv = run_root / "joint" / "metrics.csv"
    joint = (f"from hepreg.stages.bench_joint import joint_training; "
             f"joint_training({str(cfg_path)!r}, {str(joint_csv)!r}, {sizes.joint_events})")
    wall, rss = step("(a) joint training", python(joint), "joint.log")
    results["joint"] = Measured("joint", mean_rate(joint_csv), rss, wall, min(sizes.joint_events, train_events))

    wall, rss = step("(e) export", hepreg("export-embeddings", "-c", cfg_path, "--overwrite"), "export.log")
    metas = [read_meta(RunDir(run_root).cache_split(s)) for s in typing.get_args(Split)]
    exported = sum(int(m["num_events"]) for m in metas)
    results["export"] = Measured("export", exported / wall, rss, wall, exported)

    def head_step(key: str, label: str, *args: str, allocator: str = "mallopt") -> Measured:
        wall, rss = step(label, hepreg("train-head", "-c", cfg_path, "--overwrite", *args),
                         f"head_{key.replace(':', '_')}.log",
                         allocator)
        head_dir = run_root / "head"
        csvs = sorted((head_dir / "sweep").glob("*/metrics.csv")) if "--sweep" in args else [head_dir / "metrics.csv"]
        rate = sum(mean_rate(p, "events_per_s") for p in csvs) / len(csvs)  # every member logs the shared rate
        dest = run_root / f"head_{key.replace(':', '_')}"
        if dest.exists():
            shutil.rmtree(dest)
        head_dir.rename(dest)
        return Measured(key, rate, rss, wall, train_events)

    for kind in kinds:
        for src, letter in (("live", "b"), ("cache", "c")):
            results[f"{src}:{kind}"] = head_step(f"{src}:{kind}", f"({letter}) head training, {src}, {kind}",
                                                 "--source", src, *kind_args(kind))
    results["live"], results["cache"] = results[f"live:{kinds[0]}"], results[f"cache:{kinds[0]}"]
    results["alloc:mallopt"] = results["cache"]
    for alloc in () if quick else ("makefile", "none"):  # at smoke sizes (c) is start-up, not the allocator
        results[f"alloc:{alloc}"] = head_step(f"alloc:{alloc}", f"(c) head training, cache, allocator: {alloc}",
                                              "--source", "cache", *kind_args(kinds[0]), allocator=alloc)
    if not quick:  # (c) once more with the split read from Zarr block by block, as its own process
        results["stream"] = head_step("stream", "(c) head training, cache streamed from Zarr", "--source", "cache",
                                      *kind_args(kinds[0]), "--set", "head_train.in_memory=no")
    # streamed against held in one process, on the demo's 80k training split where `make demo` made it
    demo_split = Path("runs/demo/cache/train.zarr")
    split = stream_split or (demo_split if demo_split.is_dir() and not quick else RunDir(run_root).cache_split("train"))
    stream_json = workdir / "stream.json"
    step(f"streamed against held, one process ({split})", python(
        f"from hepreg.stages.bench_stream import stream_vs_held; "
        f"stream_vs_held({str(cfg_path)!r}, {str(split)!r}, {str(stream_json)!r}, {1 if quick else 5})"), "stream.log")
    stream = json.loads(stream_json.read_text())
    results["sweep"] = head_step("sweep", "(d) head training, sweep", "--sweep", str(sweep), *kind_args(kinds[0]))
    if not quick:  # the same sweep with each head run on its own: what stacking gains
        results["sweep_unstacked"] = head_step("sweep_unstacked", "(d) head training, sweep, unstacked", "--sweep",
                                               str(sweep), *kind_args(kinds[0]), "--set", "head_train.stack=no")
    console.print("bench: cache reads (train split) …")
    cache_md = cache_section(RunDir(run_root).cache_split("train"), cfg_data["head_train"]["batch_size"], dev.type)
    components_json = workdir / "components.json"
    step("where the time goes (components, one process)", python(
        f"from hepreg.stages.bench_components import component_times; "
        f"component_times({str(cfg_path)!r}, {str(components_json)!r}, {sizes.component_events})"), "components.log")
    components = json.loads(components_json.read_text())
    stage1_json = workdir / "stage1.json"
    step("stage 1: training step and frozen forward, part by part (one process)", python(
        f"from hepreg.stages.bench_assign import stage1_times; "
        f"stage1_times({str(cfg_path)!r}, {str(stage1_json)!r}, {sizes.component_events})"), "stage1.log")
    stage1 = json.loads(stage1_json.read_text())
    stage1_loop = mean_rate(run_root / "assign" / "metrics.csv") if model is None else None

    # (c) once more from a cache that keeps every hit: the gain of the cache alone, whatever pruning a better or
    # worse trained stage 1 would allow
    step("re-export without pruning", hepreg("export-embeddings", "-c", cfg_path, "--overwrite", "--splits",
                                             "train,val", "--prune-threshold", 0), "export_unpruned.log")
    results["cache_unpruned"] = head_step("cache_unpruned", "(c') head training, unpruned cache", "--source",
                                          "cache", *kind_args(kinds[0]))

    kept = sum(m["complete"]["hits_kept"] for m in metas)
    seen = sum(m["complete"]["hits_seen"] for m in metas)
    preset = " (default preset)" if sizes.noise_mean is None else f" (--noise-mean {sizes.noise_mean:g})"
    info = {"events": sizes.events, "preset": preset, "hits_per_event": seen / max(exported, 1),
            "kept_fraction": kept / max(seen, 1), "assign": quality, "assign_source": assign_source,
            "prune_threshold": float(metas[0]["prune_threshold"]), "kinds": kinds, "device": str(dev),
            "head_batch": cfg_data["head_train"]["batch_size"], "live_batch": cfg_data["data"]["batch_size"],
            "joint_events": results["joint"].events, "stream": stream}
    info["prepare_s"] = components["kinds"]["pooled"]["prepare_s"] if "pooled" in components["kinds"] else 0.0
    table, md, ratios = report(results, train_events, info, quick)
    md += ("\n\n" + components_markdown(components, str(dev)) + "\n\n" + stage1_markdown(stage1, stage1_loop)
           + "\n\n" + cache_md)
    console.print(table)
    for line in md.splitlines():
        if line.startswith(("- ", "|", "Stage 1")):
            console.print(line[2:].replace("**", "") if line.startswith("- ") else line.replace("**", ""),
                          highlight=False)
    load = f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"
    header = ("# Benchmarks\n\n`hepreg bench` (`make bench`): one run, one dataset, one machine; each step in its "
              "own process (peak RSS is that process's own). Quote the ratios; absolute rates are this machine's.\n\n"
              f"Machine: {machine()}; load average {load_start} at the start, {load} at the end (other "
              f"processes on the machine slow every step alike only if the load stays steady).\n\n")
    if quick:
        header += "**--quick smoke run: sizes too small for the numbers to mean anything.**\n\n"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(header + md + "\n")
    console.print(f"bench: table written to {out}")
    return {"ratios": ratios, "results": {k: vars(v) for k, v in results.items()}, "info": info}


def split_events(cfg_path: Path, split: str) -> int:
    from hepreg.config import load_config
    from hepreg.data.reader import open_dataset, split_ranges

    cfg = load_config(cfg_path)
    start, stop = split_ranges(len(open_dataset(cfg.data.path, cfg.data.max_events)), cfg.data.val_fraction,
                               cfg.data.test_fraction)[split]
    return stop - start
