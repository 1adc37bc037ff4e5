import shutil

import h5py
import numpy as np
import pytest
import yaml

from hepreg.data.layout import HIT_COLUMNS, RAW_FEATURES, TRUTH_LINK
from hepreg.data.reader import open_dataset, split_ranges
from hepreg.errors import DataError

COL = {c: i for i, c in enumerate(HIT_COLUMNS)}
FEAT = {c: i for i, c in enumerate(RAW_FEATURES)}


def _raw(path, file, row):
    with h5py.File(path / file, "r") as h:
        n, t = int(h["num_hits"][row]), int(h["num_tracks"][row])
        return h["hits"][row, :n].astype(np.float64), h["tracks"][row, :t], int(h["event_numbers"][row])


def test_round_trip_exact_values_across_chunk_files(tiny_dataset):
    ds = open_dataset(tiny_dataset)
    assert ds.num_events == 300 and len(ds.files) == 2 and ds.max_tracks == 2
    block = ds.read(140, 160)  # straddles the two chunk files
    assert block.hits.shape == (20, block.num_hits.max(), 23)
    for e in (0, 9, 10, 19):
        file, row = ("chunk_00000.h5", 140 + e) if e < 10 else ("chunk_00001.h5", e - 10)
        raw, tracks, ev = _raw(tiny_dataset, file, row)
        n = len(raw)
        assert block.num_hits[e] == n == ds.hit_counts[140 + e]
        assert block.hit_valid[e].sum() == n and block.hit_valid[e, :n].all()
        assert block.event_id[e] == ev == 140 + e
        assert (block.truth_link[e, :n] == raw[:, COL[TRUTH_LINK]]).all()
        assert (block.truth_link[e, n:] == -1).all() and (block.hits[e, n:] == 0).all()
        # scaling as the reference does it, by hand
        x, y, z = (raw[:, COL[f"spacePoint_globEdgeLow{c}"]] * 1e-3 for c in "XYZ")
        expect = {
            "spacePoint_globEdgeHighY": raw[:, COL["spacePoint_globEdgeHighY"]] * 1e-3,
            "spacePoint_time": raw[:, COL["spacePoint_time"]] * 1e-5,
            "spacePoint_driftR": raw[:, COL["spacePoint_driftR"]],
            "spacePoint_covYY": raw[:, COL["spacePoint_covYY"]] * 1e-6,
            "spacePoint_channel": raw[:, COL["spacePoint_channel"]] * 1e-3,
            "spacePoint_stationIndex": raw[:, COL["spacePoint_stationIndex"]] * 0.1,
            "spacePoint_stationEta": raw[:, COL["spacePoint_stationEta"]],
            "spacePoint_technology": raw[:, COL["spacePoint_technology"]],
            "r": np.hypot(x, y), "s": np.sqrt(x * x + y * y + z * z),
            "theta": np.arccos(z / np.sqrt(x * x + y * y + z * z)), "phi": np.arctan2(y, x),
            "eta": -np.log(np.tan(np.arccos(z / np.sqrt(x * x + y * y + z * z)) / 2)),
        }
        for name, value in expect.items():
            np.testing.assert_allclose(block.hits[e, :n, FEAT[name]], value, rtol=2e-5, atol=1e-6, err_msg=name)
        t = len(tracks)
        assert block.particle_valid[e].tolist() == [True] * t + [False] * (2 - t)
        assert (block.targets[e, :t] == tracks).all() and (block.targets[e, t:] == 0).all()


def test_many_chunk_files_with_few_open_handles(tmp_path, monkeypatch):
    import hepreg.data.reader as reader
    from hepreg.data.synthetic import generate

    monkeypatch.setattr(reader, "MAX_OPEN_FILES", 2)
    path = generate(tmp_path / "many", events=50, seed=1, noise_mean=5.0, events_per_file=7)
    ds = open_dataset(path)
    assert len(ds.files) == 8 and len(ds._handles) <= 2
    whole = ds.read(0, 50)
    assert len(ds._handles) <= 2
    pieces = [ds.read(a, a + 5) for a in range(45, -1, -5)]  # out of order, across files
    for k, a in enumerate(range(45, -1, -5)):
        n = pieces[k].hits.shape[1]
        assert (pieces[k].hits == whole.hits[a:a + 5, :n]).all()
        assert (pieces[k].event_id == np.arange(a, a + 5)).all()


def test_read_flat_matches_read(tiny_dataset):
    ds = open_dataset(tiny_dataset)
    flat, padded = ds.read_flat(100, 220), ds.read(100, 220)
    assert flat.offsets[-1] == padded.hit_valid.sum() == len(flat.hits)
    assert (flat.hits == padded.hits[padded.hit_valid]).all()
    assert (flat.truth_link == padded.truth_link[padded.hit_valid]).all()


def test_max_events_fingerprint_and_splits(tiny_dataset):
    ds = open_dataset(tiny_dataset, max_events=50)
    assert ds.num_events == 50 and len(ds.hit_counts) == 50 and ds.max_hits == ds.hit_counts.max()
    full = open_dataset(tiny_dataset)
    assert full.fingerprint() == open_dataset(tiny_dataset).fingerprint() != ds.fingerprint()
    assert len(full.fingerprint()) == 64
    assert split_ranges(300, 0.1, 0.2) == {"train": (0, 210), "val": (210, 240), "test": (240, 300)}
    with pytest.raises(DataError, match="val_fraction"):
        split_ranges(300, 0.6, 0.5)
    with pytest.raises(DataError, match="outside"):
        full.read(290, 301)


@pytest.fixture
def copy(tiny_dataset, tmp_path):
    dst = tmp_path / "ds"
    shutil.copytree(tiny_dataset, dst)
    return dst


def _edit(path, file, fn):
    with h5py.File(path / file, "r+") as h:
        fn(h)


def test_missing_directory_and_files(tmp_path, copy):
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(tmp_path / "nope")
    (copy / "event_row_indices.npy").unlink()
    with pytest.raises(DataError, match="event_row_indices.npy is missing"):
        open_dataset(copy)
    (copy / "chunk_00001.h5").unlink()
    with pytest.raises(DataError, match=r"chunk_00001\.h5.*missing"):
        open_dataset(copy)
    (copy / "metadata.yaml").unlink()
    with pytest.raises(DataError, match="metadata.yaml is missing"):
        open_dataset(copy)


def test_missing_feature_column(copy):
    meta = yaml.safe_load((copy / "metadata.yaml").read_text())
    meta["hit_features"].remove("spacePoint_driftR")
    (copy / "metadata.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(DataError, match=r"metadata.yaml.*spacePoint_driftR"):
        open_dataset(copy)


def test_shapes_disagreeing_with_metadata(copy):
    def drop_column(h):
        hits = h["hits"][:, :, :-1]
        del h["hits"]
        h["hits"] = hits
    _edit(copy, "chunk_00001.h5", drop_column)
    with pytest.raises(DataError, match=r"chunk_00001\.h5.*'hits' has shape \(150, \d+, 19\).*20 hit"):
        open_dataset(copy)


def test_event_count_disagreeing_with_metadata(copy):
    meta = yaml.safe_load((copy / "metadata.yaml").read_text())
    meta["event_mapping"]["chunk_summary"][0]["event_count"] = 149
    (copy / "metadata.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(DataError, match=r"event_mapping\.num_events = 300.*add up to 299"):
        open_dataset(copy)


def test_num_hits_above_padded_size(copy):
    def bump(h):
        h["num_hits"][5] = h["hits"].shape[1] + 1
    _edit(copy, "chunk_00000.h5", bump)
    with pytest.raises(DataError, match=r"chunk_00000\.h5: row 5: field 'num_hits'.*padded size of 'hits'"):
        open_dataset(copy)


def test_nan_inside_an_event(copy):
    def poison(h):
        row = h["hits"][3]
        row[2, COL["spacePoint_driftR"]] = np.nan
        h["hits"][3] = row
    _edit(copy, "chunk_00001.h5", poison)
    ds = open_dataset(copy)
    ds.read(0, 150)  # the other file is fine
    with pytest.raises(DataError, match=r"chunk_00001\.h5: event 153 \(row 3\), hit 2: field 'spacePoint_driftR' is NaN"):
        ds.read(140, 160)


def test_truth_link_pointing_to_no_track(copy):
    def relink(h):
        row = h["hits"][4]
        row[1, COL[TRUTH_LINK]] = 5
        h["hits"][4] = row
    _edit(copy, "chunk_00000.h5", relink)
    with pytest.raises(DataError, match=r"chunk_00000\.h5: event 4 \(row 4\), hit 1: field 'spacePoint_truthLink' = 5 points to no track"):
        open_dataset(copy).read(0, 10)


def test_nan_in_a_valid_track(copy):
    def poison(h):
        h["tracks"][7, 0, 0] = np.nan
    _edit(copy, "chunk_00000.h5", poison)
    with pytest.raises(DataError, match=r"event 7 \(row 7\), track 0: field 'truthMuon_pt' is NaN"):
        open_dataset(copy).read(0, 10)


@pytest.mark.parametrize("how", ["no_link", "no_tracks", "empty_tracks"])
def test_truthless_copy_reads_the_same_hits(tiny_dataset, tmp_path, how):
    from conftest import truthless_copy

    full = open_dataset(tiny_dataset)
    bare = open_dataset(truthless_copy(tiny_dataset, tmp_path / "bare", how))
    assert full.has_truth and not bare.has_truth and bare.missing_truth()
    a, b = full.read(130, 170), bare.read(130, 170)
    assert np.array_equal(a.hits, b.hits) and np.array_equal(a.hit_valid, b.hit_valid)
    assert np.array_equal(a.event_id, b.event_id) and np.array_equal(bare.hit_counts, full.hit_counts)
    assert (b.truth_link == -1).all() and not b.particle_valid.any()


def test_missing_input_columns_all_named(copy):
    meta = yaml.safe_load((copy / "metadata.yaml").read_text())
    meta["hit_features"].remove("spacePoint_driftR")
    meta["hit_features"].remove("spacePoint_time")
    (copy / "metadata.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(DataError, match=r"spacePoint_time, spacePoint_driftR"):
        open_dataset(copy)
