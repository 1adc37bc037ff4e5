"""`hepreg predict`: the predictions file, its hit lists, truth-less data, the cache path, resumption, bad input."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from hepreg.settings import Config, HeadConfig
from hepreg.runs.digest import sha256_file
from hepreg.errors import HepregError
from hepreg.models.head import build_head, head_state
from hepreg.models.maskformer import PAD_LOGIT, MaskFormer, MaskFormerOutput
from hepreg.runs.directory import save_checkpoint


def small_config(tmp_path, data) -> Config:
    cfg = Config()
    cfg.name, cfg.run_dir, cfg.data.path = "p", str(tmp_path / "runs"), str(data)
    cfg.model.dim, cfg.model.num_heads = 16, 4
    cfg.model.encoder_layers = cfg.model.decoder_layers = 1
    cfg.data.max_events, cfg.data.val_fraction, cfg.data.test_fraction = 120, 0.2, 0.2
    cfg.data.block_events, cfg.export.batch_size, cfg.export.block_events = 8, 4, 8
    cfg.head_train.device = cfg.export.device = "cpu"
    return cfg


def make_run(cfg: Config, seed: int = 0, fit_proxy: bool = False) -> tuple[Path, Path]:
    """A (random) stage-1 checkpoint and a head checkpoint that records it, in the run directory; its head reads
    the track frame, and the fit proxy only when asked (the ONNX test: predict's own paths do not need it)."""
    root = Path(cfg.run_dir) / cfg.name
    torch.manual_seed(seed)
    stage1 = root / "assign" / "best.pt"
    save_checkpoint({"model": MaskFormer(cfg.model).state_dict(), "config": cfg.to_dict(), "epoch": 0}, stage1)
    head = build_head(HeadConfig(hidden_dim=16, num_layers=3, dropout=0.1, fit_proxy=fit_proxy),  # dropout: eval matters
                      dim=cfg.model.dim)
    head.targets.estimate(torch.tensor([[[10.0, 0.5, 1.0, 1.0]], [[40.0, -1.0, -2.0, -1.0]], [[5.0, 2.0, 0.1, 1.0]]]),
                     torch.ones(3, 1, dtype=torch.bool))
    path = root / "head" / "best.pt"
    save_checkpoint({**head_state(head), "stage1_sha256": sha256_file(stage1)}, path)
    return stage1, path


def predict(cfg, **kw) -> Path:
    from hepreg.stages.predict import run

    return run(cfg, **kw)


def read(path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        out = {}
        f.visititems(lambda n, o: out.__setitem__(n, o[:]) if isinstance(o, h5py.Dataset) else None)
        return out


def hit_lists(rows, e: int, n: int, num_queries: int) -> np.ndarray:
    off = rows["tracks/hit_offsets"]
    return rows["tracks/hit_index"][off[e * num_queries + n]:off[e * num_queries + n + 1]]


@pytest.fixture
def run_cfg(tmp_path, tiny_dataset):
    cfg = small_config(tmp_path, tiny_dataset)
    make_run(cfg)
    return cfg


def test_file_layout_attrs_and_no_nan(run_cfg):
    path = predict(run_cfg, split="test")
    assert path == Path(run_cfg.run_dir) / "p" / "predict" / "test.h5" and path.is_file()
    assert not path.with_name("test.h5.partial").exists()
    rows = read(path)
    E, N = 24, 2
    assert rows["events/index"].tolist() == list(range(96, 120))  # the test split, in dataset order
    for k in ("tracks/valid_prob", "tracks/pt", "tracks/eta", "tracks/phi", "tracks/q", "truth/match"):
        assert rows[k].shape == (E, N), k
    assert np.isfinite(rows["tracks/pt"]).all() and set(np.unique(rows["tracks/q"])) <= {-1.0, 1.0}
    assert rows["tracks/hit_offsets"].shape == (E * N + 1,) and rows["tracks/hit_offsets"][-1] == len(
        rows["tracks/hit_index"])
    with h5py.File(path, "r") as f:
        assert f.attrs["stage1_sha256"] == sha256_file(Path(run_cfg.run_dir) / "p" / "assign" / "best.pt")
        assert f.attrs["head_sha256"] == sha256_file(Path(run_cfg.run_dir) / "p" / "head" / "best.pt")
        assert f.attrs["progress"] == "complete" and f.attrs["has_truth"]
        assert "GeV" in f["tracks/pt"].attrs["meaning"]
        assert yaml.safe_load(f.attrs["config"])["name"] == "p"


def oracle_forward(self, batch):
    """Stage 1 replaced by the truth: query n claims exactly the hits of particle n, and is a track if it exists."""
    B, M = batch.hit_valid.shape
    N = self.config.model.num_queries
    hits_of = batch.truth_link[:, None, :] == torch.arange(N)[None, :, None]  # [B, N, M]
    mask_logit = torch.where(hits_of, 8.0, -8.0).masked_fill(~batch.hit_valid[:, None, :], PAD_LOGIT)
    track_logit = torch.where(hits_of.any(-1), 8.0, -8.0)
    D = self.config.model.dim
    final = {"track_logit": track_logit, "mask_logit": mask_logit}
    return MaskFormerOutput(layers=[final], hit_embed=batch.hits[..., :1].expand(B, M, D).clone(),
                            query_embed=torch.zeros(B, N, D))


def test_hit_lists_name_the_input_rows_of_each_track(run_cfg, monkeypatch):
    """With a perfect assignment, each track's hits are exactly the input rows whose truthLink is its particle."""
    from hepreg.frozen import FrozenAssigner

    monkeypatch.setattr(FrozenAssigner, "forward", oracle_forward)
    rows = read(predict(run_cfg, split="val"))
    data = Path(run_cfg.data.path)
    files = yaml.safe_load((data / "metadata.yaml").read_text())["event_mapping"]["chunk_summary"]
    link = yaml.safe_load((data / "metadata.yaml").read_text())["hit_features"].index("spacePoint_truthLink")
    fidx, ridx = np.load(data / "event_file_indices.npy"), np.load(data / "event_row_indices.npy")
    checked = 0
    for e, index in enumerate(rows["events/index"]):
        with h5py.File(data / files[fidx[index]]["h5_file"], "r") as h:
            n_hits = int(h["num_hits"][ridx[index]])
            truth = h["hits"][ridx[index], :n_hits, link]
        assert rows["events/num_hits"][e] == n_hits
        for n in range(2):
            m = rows["truth/match"][e, n]
            got = hit_lists(rows, e, n, 2)
            if m < 0:
                assert len(got) == 0 and rows["tracks/valid_prob"][e, n] < 0.5
                continue
            assert m == n and rows["tracks/valid_prob"][e, n] > 0.5
            assert got.tolist() == np.nonzero(truth == m)[0].tolist()
            checked += 1
    assert checked >= 24


@pytest.mark.parametrize("how", ["no_link", "no_tracks", "empty_tracks"])
def test_truthless_copy_predicts_the_same(run_cfg, tmp_path, how):
    from conftest import truthless_copy

    full = read(predict(run_cfg, data=Path(run_cfg.data.path), out=tmp_path / "full.h5"))
    bare_dir = truthless_copy(Path(run_cfg.data.path), tmp_path / "bare", how)
    bare = read(predict(run_cfg, data=bare_dir, out=tmp_path / "bare.h5"))
    assert not any(k.startswith(("truth/", "particles/")) for k in bare)
    assert len(bare["events/index"]) == 300
    for k, v in bare.items():
        np.testing.assert_array_equal(v, full[k], err_msg=k)


def test_cache_path_equals_hdf5_path(run_cfg):
    from hepreg.stages.export import run as export

    run_cfg.export.dtype = "float32"
    export(run_cfg, splits=["test"])
    a = read(predict(run_cfg, split="test"))
    b = read(predict(run_cfg, split="test", source="cache", out=Path(run_cfg.run_dir) / "c.h5"))
    assert a.keys() == b.keys()
    for k in a:
        if a[k].dtype.kind == "f":
            np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-5, err_msg=k)
        else:
            np.testing.assert_array_equal(b[k], a[k], err_msg=k)


def test_interrupted_then_resumed_is_identical_and_never_under_the_final_name(run_cfg, monkeypatch):
    from hepreg.evaluation.predictions import PredictionWriter

    whole = read(predict(run_cfg, split="val", out=Path(run_cfg.run_dir) / "whole.h5"))
    out = Path(run_cfg.run_dir) / "resumed.h5"
    append, calls = PredictionWriter.append, []

    def failing(self, rows):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        append(self, rows)

    monkeypatch.setattr(PredictionWriter, "append", failing)
    with pytest.raises(KeyboardInterrupt):
        predict(run_cfg, split="val", out=out)
    assert not out.exists() and out.with_name("resumed.h5.partial").exists()
    monkeypatch.setattr(PredictionWriter, "append", append)
    done = []
    monkeypatch.setattr(PredictionWriter, "append", lambda self, rows: (done.append(1), append(self, rows)))
    predict(run_cfg, split="val", out=out)
    assert len(done) == 1  # 3 blocks of 8: two were kept
    got = read(out)
    assert got.keys() == whole.keys()
    for k in got:
        np.testing.assert_array_equal(got[k], whole[k], err_msg=k)


def test_rank_parts_merge_into_one_file(run_cfg, tmp_path):
    """Two parts written as two ranks would write them read back as the one-process file."""
    from hepreg.evaluation.predictions import PredictionWriter, merge
    from hepreg.stages import predict as stage

    whole = read(predict(run_cfg, split="test", out=tmp_path / "whole.h5"))
    from hepreg.data.reader import open_dataset
    from hepreg.frozen import FrozenAssigner
    from hepreg.models.head import head_from_checkpoint
    from hepreg.runs.directory import load_checkpoint

    root = Path(run_cfg.run_dir) / "p"
    a = FrozenAssigner.from_checkpoint(root / "assign" / "best.pt")
    head = head_from_checkpoint(load_checkpoint(root / "head" / "best.pt"))
    ds = open_dataset(run_cfg.data.path, run_cfg.data.max_events)
    parts = []
    for r, (s, e) in enumerate(((96, 112), (112, 120))):
        w = PredictionWriter(tmp_path / f"part{r}.h5", {"r": r}, {"format": "hepreg-predictions"})
        for b in range(s, e, 8):
            w.append(stage._block_rows(a.run_events(ds, b, min(b + 8, e), run_cfg)[0], head, ds, b, "cpu"))
        parts.append(w.finish())
    merged = read(merge(parts, tmp_path / "merged.h5"))
    assert not any(p.exists() for p in parts)
    for k in whole:
        np.testing.assert_array_equal(merged[k], whole[k], err_msg=k)


def test_event_without_hits_predicts_no_track(run_cfg, tmp_path):
    import shutil

    data = tmp_path / "zero"
    shutil.copytree(run_cfg.data.path, data)
    with h5py.File(data / "chunk_00000.h5", "r+") as h:
        h["num_hits"][3] = 0
        hits = h["hits"][3]
        hits[:] = np.nan
        h["hits"][3] = hits
    rows = read(predict(run_cfg, data=data, out=tmp_path / "z.h5"))
    e = int(np.nonzero(rows["events/index"] == 3)[0][0])
    assert rows["events/num_hits"][e] == 0 and (rows["tracks/valid_prob"][e] == 0).all()
    assert all(len(hit_lists(rows, e, n, 2)) == 0 for n in range(2))
    assert all(np.isfinite(rows[f"tracks/{k}"]).all() for k in ("pt", "eta", "phi", "q", "valid_prob"))


def test_bad_inputs(run_cfg, tmp_path):
    out = predict(run_cfg, split="val")
    with pytest.raises(HepregError, match="exists; pass --overwrite"):
        predict(run_cfg, split="val")
    predict(run_cfg, split="val", overwrite=True)
    assert out.is_file()
    foreign = tmp_path / "notes.h5"
    foreign.write_text("not ours")
    with pytest.raises(HepregError, match="not a predictions file hepreg wrote"):
        predict(run_cfg, split="val", out=foreign, overwrite=True)
    assert foreign.read_text() == "not ours"
    # a head trained on another stage 1
    other = small_config(tmp_path / "other", run_cfg.data.path)
    _, other_head = make_run(other, seed=1)
    stage1 = sha256_file(Path(run_cfg.run_dir) / "p" / "assign" / "best.pt")
    trained_on = sha256_file(Path(other.run_dir) / "p" / "assign" / "best.pt")
    with pytest.raises(HepregError, match=f"sha256 {trained_on}.*sha256 {stage1}"):
        predict(run_cfg, split="val", head=other_head, out=tmp_path / "x.h5")
    assert not (tmp_path / "x.h5").exists()


def test_two_ranks_write_one_file_equal_to_one_process(run_cfg, tmp_path):
    """Under torchrun each rank writes its part; the file that remains is the one-process file."""
    import os
    import socket
    import subprocess
    import sys

    whole = read(predict(run_cfg, split="val", out=tmp_path / "one.h5"))
    (tmp_path / "cfg.yaml").write_text(run_cfg.to_yaml())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "hepreg", "predict", "-c", str(tmp_path / "cfg.yaml"),
                                       "--split", "val", "--out", str(tmp_path / "two.h5")],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("two")) == ["two.h5"]
    got = read(tmp_path / "two.h5")
    assert got.keys() == whole.keys()
    for k in got:
        np.testing.assert_array_equal(got[k], whole[k], err_msg=k)
