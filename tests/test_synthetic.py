import h5py
import numpy as np
import pytest
import yaml

from hepreg.data.layout import HIT_COLUMNS, TRACK_COLUMNS
from hepreg.data.reader import open_dataset
from hepreg.data.synthetic import generate, simulate, PRESETS
from hepreg.errors import DataError

CHUNK_FIELDS = ("hits", "tracks", "num_hits", "num_tracks", "event_numbers")


def _arrays(path):
    out = {}
    for f in sorted(path.glob("*.h5")):
        with h5py.File(f, "r") as h:
            out.update({f"{f.name}/{k}": h[k][:] for k in CHUNK_FIELDS})
    for name in ("event_file_indices.npy", "event_row_indices.npy"):
        out[name] = np.load(path / name)
    return out


def test_layout_matches_the_atlas_muon_format(tiny_dataset):
    meta = yaml.safe_load((tiny_dataset / "metadata.yaml").read_text())
    assert meta["hit_features"] == list(HIT_COLUMNS)
    assert meta["track_features"] == list(TRACK_COLUMNS)
    summary = meta["event_mapping"]["chunk_summary"]
    assert [s["event_count"] for s in summary] == [150, 150]
    fi, ri = np.load(tiny_dataset / "event_file_indices.npy"), np.load(tiny_dataset / "event_row_indices.npy")
    assert fi.dtype == np.int32 and ri.dtype == np.int32
    assert fi.tolist() == [0] * 150 + [1] * 150 and ri.tolist() == list(range(150)) * 2
    with h5py.File(tiny_dataset / summary[1]["h5_file"], "r") as h:
        hits, tracks = h["hits"][:], h["tracks"][:]
        nh, nt, ev = h["num_hits"][:], h["num_tracks"][:], h["event_numbers"][:]
    assert hits.dtype == np.float32 and hits.shape[0] == 150 and hits.shape[2] == len(HIT_COLUMNS)
    assert tracks.dtype == np.float32 and tracks.shape == (150, 2, 4)
    assert nh.dtype == np.int16 and nt.dtype == np.int16 and ev.dtype == np.int64
    assert ev.tolist() == list(range(150, 300))
    assert hits.shape[1] == nh.max()  # padded to the file's largest event
    for e in range(150):
        assert not np.isnan(hits[e, :nh[e]]).any() and np.isnan(hits[e, nh[e]:]).all()
        assert not np.isnan(tracks[e, :nt[e]]).any() and np.isnan(tracks[e, nt[e]:]).all()
        link = hits[e, :nh[e], HIT_COLUMNS.index("spacePoint_truthLink")]
        assert set(np.unique(link)) <= set(range(-1, nt[e]))
    assert set(np.unique(nt)) <= {1, 2}


def test_same_seed_gives_identical_arrays_and_another_seed_differs(tmp_path):
    a = generate(tmp_path / "a", events=100, seed=3, noise_mean=20.0, events_per_file=60)
    b = generate(tmp_path / "b", events=100, seed=3, noise_mean=20.0, events_per_file=60)
    c = generate(tmp_path / "c", events=100, seed=4, noise_mean=20.0, events_per_file=60)
    xa, xb, xc = _arrays(a), _arrays(b), _arrays(c)
    assert xa.keys() == xb.keys()
    for k in xa:
        assert xa[k].tobytes() == xb[k].tobytes(), k
    assert xa["chunk_00000.h5/tracks"].tobytes() != xc["chunk_00000.h5/tracks"].tobytes()
    assert open_dataset(a).fingerprint() == open_dataset(b).fingerprint() != open_dataset(c).fingerprint()


def test_default_physics_is_realistic():
    rng = np.random.Generator(np.random.PCG64(0))
    feats, nh, tracks, nt = simulate(rng, 1000, PRESETS["default"])
    link = feats[:, HIT_COLUMNS.index("spacePoint_truthLink")]
    muon_hits = (link >= 0).sum() / nt.sum()
    assert 20 <= muon_hits <= 30  # ~20-30 hits per muon across three stations
    assert 80 <= (link < 0).sum() / len(nh) <= 120  # background mean ~100
    assert nh.max() <= 600 and np.percentile(nh, 99) > 2 * np.median(nh)  # long tail under the cap
    pt, eta = tracks[..., 0][~np.isnan(tracks[..., 0])], tracks[..., 1][~np.isnan(tracks[..., 1])]
    assert pt.min() >= 3.0 and pt.max() <= 300.0 and np.median(pt) < 20  # falling spectrum
    assert np.abs(eta).max() < 2.7
    tech = feats[:, HIT_COLUMNS.index("spacePoint_technology")]
    assert set(np.unique(tech)) == {0.0, 2.0, 3.0}
    drift = feats[tech == 0, HIT_COLUMNS.index("spacePoint_driftR")]
    assert drift.min() >= 0 and drift.max() <= 14.6


def test_light_preset_has_few_background_hits():
    rng = np.random.Generator(np.random.PCG64(0))
    feats, nh, _, nt = simulate(rng, 500, PRESETS["light"])
    link = feats[:, HIT_COLUMNS.index("spacePoint_truthLink")]
    assert 10 <= (link < 0).sum() / len(nh) <= 20


def test_existing_output_needs_overwrite_and_nothing_is_left_half_written(tmp_path):
    out = generate(tmp_path / "d", events=20, seed=1, noise_mean=5.0)
    with pytest.raises(DataError, match="already exists"):
        generate(out, events=20, seed=1)
    generate(out, events=30, seed=2, noise_mean=5.0, overwrite=True)
    assert yaml.safe_load((out / "metadata.yaml").read_text())["event_mapping"]["num_events"] == 30
    with pytest.raises(DataError, match="pt_min"):
        generate(tmp_path / "e", events=10, seed=1, pt_min=50.0, pt_max=10.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporary directories left behind
