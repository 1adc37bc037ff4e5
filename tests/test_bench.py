import math

import pytest
import yaml

from hepreg.stages import bench


def test_break_even_epochs():
    # export 10 s, live epoch 3 s, cached epoch 1 s: n = 5 gives 10 + 5 = 15 = 15 (a tie), n = 6 wins
    assert bench.break_even_epochs(10.0, 3.0, 1.0) == 6
    assert bench.break_even_epochs(1.0, 3.0, 1.0) == 1
    assert bench.break_even_epochs(10.0, 1.0, 1.0) == math.inf


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


@pytest.mark.slow
def test_bench_quick_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # every step's process inherits it: no oversubscribed threads
    out = tmp_path / "BENCH.md"
    result = bench.run(quick=True, out=out, workdir=tmp_path / "work")
    text = out.read_text()
    for step in ("(a) joint", "(b) head, live", "(c) head from the cache", "(c') head from the cache, every hit",
                 "(d) K=8 sweep", "(e) export"):
        assert step in text
    assert "Machine:" in text and "(c)/(b)" in text
    for m in result["results"].values():
        assert m["events_per_s"] > 0 and m["peak_rss"] > 10 * 2**20
    assert result["ratios"]["cache_vs_live"] > 0 and result["ratios"]["break_even_epochs"] >= 1
    assert "1 thread(s) per process" in text
