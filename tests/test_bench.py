import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hepreg.stages import bench, bench_process, bench_report

ROOT = Path(__file__).resolve().parents[1]


def test_break_even_epochs():
    # export 10 s, live epoch 3 s, cached epoch 1 s: n = 5 gives 10 + 5 = 15 = 15 (a tie), n = 6 wins
    assert bench_report.break_even_epochs(10.0, 3.0, 1.0) == 6
    assert bench_report.break_even_epochs(1.0, 3.0, 1.0) == 1
    assert bench_report.break_even_epochs(10.0, 1.0, 1.0) == math.inf


def test_sweep_file_has_k_distinct_configs(tmp_path):
    configs = yaml.safe_load(bench.sweep_file(tmp_path / "s.yaml").read_text())["configs"]
    assert len(configs) == bench.SWEEP_K
    assert len({c["name"] for c in configs}) == bench.SWEEP_K


def test_mean_rate_skips_the_warm_up_epoch(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("epoch,events_per_s\n0,10\n1,30\n2,50\n")
    assert bench.mean_rate(p, "events_per_s") == 40.0
    p.write_text("epoch,events_per_s\n0,10\n")
    assert bench.mean_rate(p, "events_per_s") == 10.0


def test_full_bench_trains_and_batches_as_the_demo(tmp_path):
    from hepreg.config import build_dataclass
    from hepreg.settings import Config

    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    cfg = bench.bench_config(tmp_path, bench.FULL)
    assert cfg["head_train"]["batch_size"] == demo["head_train"]["batch_size"]
    assert cfg["data"]["batch_size"] == demo["data"]["batch_size"]
    assert cfg["model"] == demo["model"] and cfg["head"] == demo["head"]
    assert cfg["data"].get("bucket_window") == demo["data"].get("bucket_window")
    a = cfg["assign"]
    assert a["batch_size"] == demo["assign"]["batch_size"] and a["lr"] == demo["assign"]["lr"]
    steps = 0.8 * bench.FULL.events * a["epochs"] / a["batch_size"]  # the demo: 3 epochs x 16k / 32 = 1500
    assert steps >= 0.8 * demo["assign"]["epochs"] * 0.8 * 20000 / demo["assign"]["batch_size"]
    build_dataclass(Config, cfg, "bench config")  # every key is a real config field


def test_assign_checkpoint_is_installed_with_its_model(tmp_path):
    from hepreg.settings import Config
    from hepreg.runs.directory import save_checkpoint

    cfg = Config()
    cfg.model.dim = 24
    save_checkpoint({"model": {}, "config": cfg.to_dict()}, tmp_path / "given.pt")
    model = bench.install_checkpoint(tmp_path / "given.pt", tmp_path / "run")
    assert model["dim"] == 24 and (tmp_path / "run" / "assign" / "best.pt").is_file()
    assert bench.bench_config(tmp_path, bench.FULL, model=model)["model"]["dim"] == 24


def test_head_kinds_cover_the_registered_ones():
    """The bench's kinds are those the config accepts, and each builds its own head class."""
    import typing

    from hepreg.settings import HeadConfig
    from hepreg.models.head import RegressionHead, build_head

    kinds = bench.head_kinds()
    assert sorted(kinds) == sorted(typing.get_args(typing.get_type_hints(HeadConfig)["kind"]))
    built = {kind: type(build_head(HeadConfig(kind=kind, attn_dim=8, attn_heads=2), dim=8)) for kind in kinds}
    assert RegressionHead not in built.values() and len(set(built.values())) == len(kinds)
    assert bench.kind_args(kinds[0]) == ("--set", f"head.kind={kinds[0]}")


def test_steps_run_without_the_makefile_malloc_variables(monkeypatch):
    monkeypatch.setenv("MALLOC_TOP_PAD_", "1")
    assert "MALLOC_TOP_PAD_" not in bench_process.env() and "HEPREG_MALLOPT" not in bench_process.env()
    assert bench_process.env("makefile")["MALLOC_TOP_PAD_"] == "536870912"
    assert bench_process.env("none")["HEPREG_MALLOPT"] == "0"


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-fallback path; `make gpu-check` itself runs on GPU")
def test_gpu_check_cpu_fallback_runs_the_quick_bench(tmp_path):
    """`make gpu-check` without CUDA: the cuda tests skip with a line saying so, `hepreg bench --quick` runs on
    the CPU, and its figures land in the output folder. The quick bench's own smoke test too."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # every step's process inherits it: no oversubscribed threads
    out = tmp_path / "gpu"
    proc = subprocess.run(["make", "-s", "gpu-check", f"GPU_OUT={out}", f"GPU_PY={sys.executable}"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (out / "gpu-check.txt").read_text()
    assert "CUDA: none" in log and "no CUDA device: the GPU checks are skipped" in log
    text = (out / "BENCHMARKS.md").read_text()
    for step in ("(a) joint", "(b) head, live", "(c) head from the cache", "(c') head from the cache, every hit",
                 "(d) K=8 sweep", "(e) export", "Every head kind", "allocator", "held on cpu",
                 "double-majority efficiency", "Where the time goes", "frozen stage-1 forward", "implied (c)/(b)",
                 "training step (forward, loss, backward, optimiser)", "frozen forward (eval, inference mode)",
                 "share of the matmul limit", "Where a training step's time goes", "streamed from Zarr",
                 "Roofline", "fraction of the roofline", "pooled head step", "attention head step"):
        assert step in text, step
    for kind in bench.head_kinds():
        assert f"| {kind} |" in text
    assert "Machine:" in text and "(c)/(b)" in text and "1 thread(s) per process" in text
    assert "(c)/(b)" in log  # the figures are printed too


def test_stage1_times_every_part_and_the_flops(tiny_dataset, tmp_path):
    """The stage-1 bench: each part of the step timed, FLOPs counted (the CPU attention kernels included), the
    frozen forward on the run's checkpoint, one markdown table of both."""
    import json

    from hepreg.config import load_config
    from hepreg.models.maskformer import MaskFormer
    from hepreg.runs.directory import RunDir, save_checkpoint
    from hepreg.stages import bench_assign

    overrides = [f"data.path={tiny_dataset}", f"run_dir={tmp_path}", "data.batch_size=16",
                 "model.dim=16", "model.num_heads=4", "model.encoder_layers=1", "export.batch_size=32"]
    cfg = load_config(None, overrides)
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    save_checkpoint({"model": MaskFormer(cfg.model).state_dict(), "config": cfg.to_dict()},
                    RunDir(cfg).assign / "best.pt")
    s = bench_assign.stage1_times(tmp_path / "c.yaml", tmp_path / "s.json", max_events=48)
    assert json.loads((tmp_path / "s.json").read_text())["train"]["events"] == 48
    assert set(s["train"]["seconds"]) == set(bench_assign.STEP_PARTS)
    assert set(s["frozen"]["seconds"]) == set(bench_assign.FORWARD_PARTS)
    assert s["train"]["flops_per_event"] > 2 * s["frozen"]["flops_per_event"] > 0
    text = bench_assign.stage1_markdown(s, loop_events_per_s=123.0)
    for row in ("training step", "frozen forward", "share of the matmul limit", "backward", "matching", "123"):
        assert row in text, row

    q = torch.randn(2, 4, 50, 8)
    attention = bench_assign.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert attention == 4 * 2 * 4 * 50 * 50 * 8  # QK^T and PV, 2 FLOPs per multiply-add


def test_roofline_counts_and_fractions():
    """FLOPs and bytes of a matmul counted as executed; the roofline time is the larger of the two roofs."""
    from hepreg.runs import roofline as r

    a = torch.randn(64, 32)
    flops, nbytes = r.count(lambda: a @ a.T)
    assert flops == 2 * 64 * 64 * 32 and nbytes == 4 * (2 * 64 * 32 + 64 * 64)  # both operands read, the output
    limits = {"matmul_gflops": 100.0, "memory_gbps": 10.0, "threads": 1}
    f = r.roofline(2e9, 1e8, 0.1, limits)  # 20 ms of arithmetic, 10 ms of memory, in 100 ms
    assert f["bound"] == "compute" and abs(f["fraction"] - 0.2) < 1e-9 and abs(f["arithmetic_fraction"] - 0.2) < 1e-9
    assert r.roofline(1e8, 1e9, 0.2, limits)["bound"] == "memory"
    text = r.roofline_markdown([("pooled head step", {"flops": 2e9, "bytes": 1e8, "seconds": 0.1})], limits, 1024)
    assert "**20 %**" in text and "pooled head step" in text
    assert r.memory_gbps(nbytes=2**22, repeats=2) > 0


def test_report_puts_the_stacked_sweep_beside_single_runs_and_unstacked():
    """(d) against 8 single cached runs; the full bench's unstacked sweep beside it, the quick bench without."""
    M = bench_report.Measured
    kinds = bench.head_kinds()
    results = {k: M(k, 100.0, 2**20, 1.0, 10) for k in ("joint", "live", "export", "cache_unpruned", "stream")}
    results.update({f"live:{k}": M("l", 100.0, 2**20, 1.0, 10) for k in kinds})
    results.update({f"cache:{k}": M("c", 1000.0, 2**20, 1.0, 10) for k in kinds})
    results.update({f"alloc:{k}": M("a", 1000.0, 2**20, 1.0, 10) for k in bench_report.ALLOCATORS})
    results.update(live=results[f"live:{kinds[0]}"], cache=results[f"cache:{kinds[0]}"],
                   sweep=M("sweep", 250.0, 2**20, 1.0, 10))
    info = {"kinds": kinds, "assign": {"dm_eff": 0.98}, "kept_fraction": 0.3, "events": 10, "preset": "",
            "hits_per_event": 50.0, "prune_threshold": 0.1, "assign_source": "here", "head_batch": 4,
            "live_batch": 4, "joint_events": 10, "device": "cpu",
            "stream": {"events": 80, "split": "s.zarr", "streamed": [90.0], "held": [100.0], "ratio": 0.9}}
    _, md, ratios = bench_report.report(results, 10, info, quick=True)
    assert ratios["streamed_vs_held"] == 0.9 and "**0.90×** the events/s (the median of the rounds' ratios after the first round; per round, streamed 90, held 100;" in md
    assert ratios["sweep_vs_8_cached"] == 2.0 and "unstacked" not in md
    results["sweep_unstacked"] = M("sweep_unstacked", 125.0, 2**20, 1.0, 10)
    _, md, ratios = bench_report.report(results, 10, info, quick=False)
    assert ratios["sweep_stacked_vs_unstacked"] == 2.0 and ratios["unstacked_sweep_vs_8_cached"] == 1.0
    assert "| (d) K=8 sweep from the cache, unstacked (`head_train.stack: no`) | 125 ×8 heads |" in md
    assert "so stacking gives 2.00× the events/s" in md


def test_a_step_runs_in_its_own_process_with_its_output_exit_code_and_memory(tmp_path, monkeypatch):
    """Forked steps (the usual) and exec'd ones (the Makefile's MALLOC_* variables) alike: the step's environment,
    its output in its log, its own peak RSS, and a failure that names the step and shows the log's tail."""
    monkeypatch.setenv("MALLOC_TOP_PAD_", "1")
    code = ("import os, sys, numpy as np; a = np.ones(64 * 2**20 // 8); a += 1; "
            "print('pid', os.getpid(), os.environ.get('HEPREG_NO_PROGRESS'), os.environ.get('MALLOC_TOP_PAD_'))")
    for allocator, malloc in (("mallopt", "None"), ("makefile", "536870912")):
        log = tmp_path / f"{allocator}.log"
        wall, rss = bench_process.run_process(bench_process.python(code), log, allocator)
        words = log.read_text().split()
        assert words[0] == "pid" and int(words[1]) != os.getpid() and words[2:] == ["1", malloc]
        assert rss > 64 * 2**20 and wall > 0
    with pytest.raises(Exception, match=r"failed with exit code 3.*\n.*went wrong"):
        bench_process.run_process(bench_process.python("import sys; print('went wrong'); sys.exit(3)"),
                                  tmp_path / "bad.log")
    with pytest.raises(Exception, match=r"exit code 2.*\n(.*\n)*.*--nope"):
        bench_process.run_process(bench_process.hepreg("train-head", "--nope"), tmp_path / "cli.log")
