"""Faults and bad inputs, each run through the `hepreg` command line as a user would meet it.

Every case asserts the same contract: exit code 2, one paragraph naming the file/event/field/key at fault, no
traceback, and nothing valid deleted or replaced.
"""
from __future__ import annotations

import errno
import os
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from hepreg.runs.files import stage_lock
from hepreg.runs.directory import RunDir
from helpers import run_cli

pytestmark = pytest.mark.xdist_group("test_faults")  # its module fixture trains a run: one worker makes it once


# ----------------------------------------------------------------------------------------------- helpers
def hepreg(monkeypatch, capsys, *args) -> tuple[int, str]:
    """`hepreg ARGS` in this process: (exit code, everything printed, whitespace collapsed)."""
    from hepreg.runs.progress import console

    monkeypatch.setattr(console, "width", 2000)  # one message, one line: assert on it whole
    code, out = run_cli(monkeypatch, capsys, *args)
    return code, " ".join(out.split())


def refused(result: tuple[int, str], *names: str) -> str:
    code, out = result
    assert code == 2, out
    assert "Traceback" not in out and "error:" in out, out
    for n in names:
        assert n in out, (n, out)
    return out


def fill_the_disk(monkeypatch, path: Path) -> None:
    """Every checkpoint write from here on meets a full disk (ENOSPC naming `path`)."""
    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(torch, "save", full)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes (lock files aside), to show that nothing valid changed."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def run(tiny_dataset, tmp_path_factory):
    """A whole tiny run (stage 1, export, head), and the overrides that reproduce its config."""
    from hepreg.config import load_config
    from hepreg.stages import export, train_assign, train_head

    root = tmp_path_factory.mktemp("faults")
    sets = [f"data.path={tiny_dataset}", f"run_dir={root / 'runs'}", "name=f", "data.max_events=120",
            "data.val_fraction=0.25", "data.test_fraction=0.25", "data.batch_size=30", "assign.epochs=1",
            "head_train.epochs=1", "head_train.batch_size=32", "assign.device=cpu", "export.device=cpu",
            "head_train.device=cpu", "export.hit_chunk=512", "export.block_events=16"]
    cfg = load_config("configs/demo.yaml", sets)
    train_assign.run(cfg)
    export.run(cfg)
    train_head.run(cfg)
    args = ["-c", "configs/demo.yaml"] + [a for s in sets for a in ("--set", s)]
    return cfg, args


@pytest.fixture
def data_copy(tiny_dataset, tmp_path) -> Path:
    out = tmp_path / "data"
    shutil.copytree(tiny_dataset, out)
    return out


def edit_h5(path: Path, fn) -> None:
    with h5py.File(path, "r+") as h:
        fn(h)


def edit_meta(data: Path, fn) -> None:
    meta = yaml.safe_load((data / "metadata.yaml").read_text())
    fn(meta)
    (data / "metadata.yaml").write_text(yaml.safe_dump(meta))


TRACK = {"pt": 0, "eta": 1, "phi": 2, "q": 3}


# ----------------------------------------------------------------------------------------------- 1 checkpoints
class Evil:
    """A pickle that would create a file when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("stage", ["export", "resume-assign", "resume-head", "evaluate"])
def test_malicious_checkpoint_never_runs(run, stage, tmp_path, monkeypatch, capsys):
    cfg, args = run
    rd = RunDir(cfg)
    marker = tmp_path / "pwned"
    target, command = {"export": (rd.assign / "best.pt", ["export-embeddings", "--splits", "test", "--overwrite"]),
                       "resume-assign": (rd.assign / "last.pt", ["train-assign", "--resume"]),
                       "resume-head": (rd.head / "last.pt", ["train-head", "--resume"]),
                       "evaluate": (rd.head / "best.pt", ["evaluate"])}[stage]
    good = target.read_bytes()
    state = torch.load(target, weights_only=True)
    torch.save({**state, "extra": Evil(marker)}, target)
    evil = target.read_bytes()
    try:
        before = snapshot(rd.root)
        out = refused(hepreg(monkeypatch, capsys, *command, *args), str(target), "tensors and plain data")
        assert "posix.system" in out or "system" in out
        assert not marker.exists()
        assert snapshot(rd.root) == before  # the refusal replaced nothing
        assert target.read_bytes() == evil
    finally:
        target.write_bytes(good)


def test_checkpoints_hold_only_plain_data(run):
    cfg, _ = run
    rd = RunDir(cfg)
    for path in (rd.assign / "best.pt", rd.assign / "last.pt", rd.head / "best.pt", rd.head / "last.pt"):
        state = torch.load(path, weights_only=True)  # raises on anything but tensors and plain data
        assert isinstance(state["config"], dict)


def test_checkpoint_that_is_not_a_dict_or_truncated(run, tmp_path, monkeypatch, capsys):
    cfg, args = run
    bad = tmp_path / "list.pt"
    torch.save([1, 2], bad)
    refused(hepreg(monkeypatch, capsys, "export-embeddings", *args, "--checkpoint", bad, "--splits", "test"),
            str(bad), "not a hepreg checkpoint")
    cut = tmp_path / "cut.pt"
    cut.write_bytes((RunDir(cfg).assign / "best.pt").read_bytes()[:1000])
    refused(hepreg(monkeypatch, capsys, "export-embeddings", *args, "--checkpoint", cut, "--splits", "test"),
            str(cut), "cannot be read")


# ----------------------------------------------------------------------------------------------- 2 damaged cache
@pytest.mark.parametrize("damage", ["delete", "corrupt"])
def test_damaged_cache_chunk_stops_training(run, damage, monkeypatch, capsys):
    cfg, args = run
    rd = RunDir(cfg)
    chunk = rd.cache / "train.zarr" / "part-0000" / "hits" / "embed" / "c" / "1" / "0"
    good = chunk.read_bytes()
    head = snapshot(rd.head)
    if damage == "delete":
        chunk.unlink()
    else:
        chunk.write_bytes(good[:20] + bytes(b ^ 0xFF for b in good[20:40]) + good[40:])
    try:
        out = refused(hepreg(monkeypatch, capsys, "train-head", "--overwrite", *args), "hits/embed", "chunk 1/0",
                      str(chunk))
        assert ("missing" if damage == "delete" else "damaged") in out
        assert snapshot(rd.head) == head
    finally:
        chunk.write_bytes(good)


@pytest.mark.parametrize("damage", ["delete", "corrupt"])
def test_cache_is_readable_again_once_repaired(run, damage, tmp_path, monkeypatch, capsys):
    """A damaged chunk put back makes the cache whole again: nothing remembers the damage. On a copy of its own,
    so that it holds whatever ran before it, alone or in parallel."""
    cfg, _ = run
    cache = tmp_path / "cache"
    shutil.copytree(RunDir(cfg).cache, cache)
    chunk = cache / "train.zarr" / "part-0000" / "hits" / "embed" / "c" / "1" / "0"
    good = chunk.read_bytes()
    if damage == "delete":
        chunk.unlink()
    else:
        chunk.write_bytes(good[:20] + bytes(b ^ 0xFF for b in good[20:40]) + good[40:])
    refused(hepreg(monkeypatch, capsys, "cache", "verify", cache), "hits/embed", "chunk 1.0")
    chunk.write_bytes(good)
    code, out = hepreg(monkeypatch, capsys, "cache", "verify", cache)
    assert code == 0, out


# ----------------------------------------------------------------------------------------------- 3, 4, 5 config
@pytest.mark.parametrize("override, names", [
    ("name=../../x", ["name", "plain name"]),
    ("name=/tmp/abs", ["name", "plain name"]),
    ("name=.hidden", ["name", "plain name"]),
    ("head_train.epochs=-1", ["head_train.epochs", "[1, inf)"]),
    ("head.hidden_dim=0", ["head.hidden_dim", "[1, inf)"]),
    ("model.mask_attn_threshold=2", ["model.mask_attn_threshold", "[0, 1]"]),
    ("head.threshold=1", ["head.threshold", "[0, 1)"]),
    ("head.pt_target=ptt", ["head.pt_target", "qpt, pt, log_pt"]),
    ("assign.optimizer=sgd", ["assign.optimizer", "adamw, lion"]),
    ("export.compressor=gzip", ["export.compressor", "lz4, zstd, none"]),
    ("head_train.in_memory=maybe", ["head_train.in_memory", "auto, yes, no"]),
    ("export.clevel=12", ["export.clevel", "[0, 9]"]),
    ("seed=-1", ["seed", "[0, inf)"]),
    ("head.dropout=1", ["head.dropout", "[0, 1)"]),
    ("assign.lr=.nan", ["assign.lr"]),
    ("data.val_fraction=0.8", ["data.val_fraction", "below 1"]),
    ("eval.pt_bins=[5,3]", ["eval.pt_bins", "ascending"]),
    ("model.num_heads=5", ["model.num_heads", "multiple"]),
    ("head.hidden_dim=abc", ["--set head.hidden_dim=abc", "expected an integer"]),
    ("export.splits=train,tset", ["export.splits", "train, val, test"]),
])
def test_invalid_config_value_refused_before_any_work(run, override, names, monkeypatch, capsys):
    cfg, args = run
    rd = RunDir(cfg)
    before = snapshot(rd.root)
    out = refused(hepreg(monkeypatch, capsys, "train-head", *args, "--set", override, "--print-config"), *names)
    assert f"--set {override}" in out  # blames the override, not the YAML file
    refused(hepreg(monkeypatch, capsys, "train-head", *args, "--set", override))
    assert snapshot(rd.root) == before
    assert not (Path(cfg.run_dir).parent / "x").exists()


def test_bad_value_in_the_yaml_file_names_the_file(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("head:\n  hidden_dim: 0\n")
    refused(hepreg(monkeypatch, capsys, "train-head", "-c", bad, "--print-config"), str(bad), "head.hidden_dim")


def test_generate_overwrite_only_replaces_a_generated_dataset(tmp_path, monkeypatch, capsys):
    thesis = tmp_path / "mine" / "thesis.tex"
    thesis.parent.mkdir()
    thesis.write_text("three years of work")
    refused(hepreg(monkeypatch, capsys, "generate", thesis.parent, "-n", "20", "--overwrite"),
            str(thesis.parent), "nothing was deleted")
    assert thesis.read_text() == "three years of work"
    data = tmp_path / "data"
    assert hepreg(monkeypatch, capsys, "generate", data, "-n", "20", "--preset", "light")[0] == 0
    assert hepreg(monkeypatch, capsys, "generate", data, "-n", "30", "--preset", "light", "--overwrite")[0] == 0
    (data / "notes.txt").write_text("mine")  # a generated dataset with a file of the user's in it
    before = snapshot(data)
    refused(hepreg(monkeypatch, capsys, "generate", data, "-n", "20", "--overwrite"), "notes.txt")
    assert snapshot(data) == before


def test_export_overwrite_keeps_a_directory_hepreg_did_not_make(run, tmp_path, monkeypatch, capsys):
    cfg, args = run
    other = tmp_path / "runs"
    victim = other / "f" / "cache" / "test.zarr"
    victim.mkdir(parents=True)
    (victim / "results.csv").write_text("precious")
    refused(hepreg(monkeypatch, capsys, "export-embeddings", *args, "--set", f"run_dir={other}",
                   "--checkpoint", RunDir(cfg).assign / "best.pt", "--splits", "test", "--overwrite"),
            str(victim), "nothing was deleted")
    assert (victim / "results.csv").read_text() == "precious"


# ----------------------------------------------------------------------------------------------- 6 reader
@pytest.mark.parametrize("field, value, message", [
    ("pt", -5.0, "truthMuon_pt"), ("pt", 0.0, "truthMuon_pt"), ("q", 0.0, "truthMuon_q"),
    ("q", 2.0, "truthMuon_q"), ("eta", np.inf, "truthMuon_eta"),
])
def test_reader_refuses_bad_track_values(data_copy, field, value, message, monkeypatch, capsys):
    def poison(h):
        t = h["tracks"][5]
        t[0, TRACK[field]] = value
        h["tracks"][5] = t
    edit_h5(data_copy / "chunk_00000.h5", poison)
    refused(hepreg(monkeypatch, capsys, "reference-fit", data_copy), "chunk_00000.h5", "event 5", message)


def test_reader_refuses_an_infinite_hit(data_copy, monkeypatch, capsys):
    cols = yaml.safe_load((data_copy / "metadata.yaml").read_text())["hit_features"]

    def poison(h):
        row = h["hits"][4]
        row[1, cols.index("spacePoint_globEdgeLowX")] = np.inf
        h["hits"][4] = row
    edit_h5(data_copy / "chunk_00001.h5", poison)
    refused(hepreg(monkeypatch, capsys, "reference-fit", data_copy), "chunk_00001.h5", "event 154", "hit 1",
            "spacePoint_globEdgeLowX", "inf")


@pytest.mark.parametrize("h5_file", ["../outside.h5", "/etc/passwd", "sub/../../x.h5"])
def test_chunk_paths_outside_the_dataset_refused(data_copy, h5_file, monkeypatch, capsys):
    shutil.copy(data_copy / "chunk_00000.h5", data_copy.parent / "outside.h5")
    edit_meta(data_copy, lambda m: m["event_mapping"]["chunk_summary"][0].update(h5_file=h5_file))
    refused(hepreg(monkeypatch, capsys, "reference-fit", data_copy), "metadata.yaml",
            "chunk_summary[0].h5_file", "inside it")


@pytest.mark.parametrize("edit, names", [
    (lambda m: m["event_mapping"]["chunk_summary"][0].update(event_count="150"), ["event_count", "'150'"]),
    (lambda m: m["event_mapping"]["chunk_summary"][0].update(event_count=-1), ["event_count"]),
    (lambda m: m["event_mapping"]["chunk_summary"][0].update(h5_file=7), ["h5_file"]),
    (lambda m: m.update(hit_features="spacePoint_time"), ["hit_features"]),
    (lambda m: m.update(event_mapping=[1, 2]), ["event_mapping.chunk_summary"]),
    (lambda m: m["event_mapping"].update(chunk_summary={"a": 1}), ["event_mapping.chunk_summary"]),
])
def test_malformed_metadata_field_types(data_copy, edit, names, monkeypatch, capsys):
    edit_meta(data_copy, edit)
    refused(hepreg(monkeypatch, capsys, "reference-fit", data_copy), "metadata.yaml", *names)


def test_corrupted_compressed_chunk_inside_hdf5(data_copy, monkeypatch, capsys):
    path = data_copy / "chunk_00000.h5"
    with h5py.File(path, "r") as h:
        info = h["hits"].id.get_chunk_info(0)
    with open(path, "r+b") as f:
        f.seek(info.byte_offset + 16)
        f.write(os.urandom(64))
    refused(hepreg(monkeypatch, capsys, "reference-fit", data_copy), "chunk_00000.h5", "'hits'", "damaged")


def test_zero_event_dataset(data_copy, run, monkeypatch, capsys):
    for name in ("chunk_00000.h5", "chunk_00001.h5"):
        with h5py.File(data_copy / name, "r+") as h:
            for k in list(h):
                d = h[k]
                shape, dtype = (0,) + d.shape[1:], d.dtype
                del h[k]
                h.create_dataset(k, shape=shape, dtype=dtype)
    edit_meta(data_copy, lambda m: [e.update(event_count=0) for e in m["event_mapping"]["chunk_summary"]]
              + [m["event_mapping"].update(num_events=0)])
    np.save(data_copy / "event_file_indices.npy", np.zeros(0, np.int32))
    np.save(data_copy / "event_row_indices.npy", np.zeros(0, np.int32))
    refused(hepreg(monkeypatch, capsys, "reference-fit", data_copy), str(data_copy), "no events")
    cfg, args = run
    rd = RunDir(cfg)
    before = snapshot(rd.root)
    for command in (["train-head", "--source", "live", "--overwrite"], ["export-embeddings", "--overwrite"],
                    ["train-assign", "--overwrite"]):
        refused(hepreg(monkeypatch, capsys, *command, *args, "--set", f"data.path={data_copy}"), "no events")
    assert snapshot(rd.root) == before


def test_export_refuses_an_empty_split(run, tmp_path, monkeypatch, capsys):
    cfg, args = run
    out = tmp_path / "runs"
    refused(hepreg(monkeypatch, capsys, "export-embeddings", *args, "--set", f"run_dir={out}", "--set",
                   "data.test_fraction=0", "--checkpoint", RunDir(cfg).assign / "best.pt"), "test split", "empty")
    assert not list(out.rglob("zarr.json"))


# ----------------------------------------------------------------------------------------------- 7 locks, partial runs
def test_second_writer_refused_naming_the_holder(run, monkeypatch, capsys):
    cfg, args = run
    rd = RunDir(cfg)
    before = snapshot(rd.root)
    with stage_lock(rd.head):
        refused(hepreg(monkeypatch, capsys, "train-head", "--overwrite", *args), f"PID {os.getpid()}", str(rd.head))
    with stage_lock(rd.cache):
        refused(hepreg(monkeypatch, capsys, "export-embeddings", *args, "--overwrite"), f"PID {os.getpid()}")
    assert snapshot(rd.root) == before


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    import subprocess

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".lock").write_text(dead.stdout)
    with stage_lock(tmp_path) as lock:
        assert lock.read_text().strip() == str(os.getpid())
    assert not (tmp_path / ".lock").exists()


def test_export_killed_during_val_continues_on_rerun(run, tmp_path, monkeypatch, capsys):
    from hepreg.cache.writer import PartWriter

    cfg, args = run
    other = ["--set", f"run_dir={tmp_path / 'runs'}", "--checkpoint", RunDir(cfg).assign / "best.pt"]
    original = PartWriter.write_block

    def killed(self, k, batch, hits_seen=0):
        if "val.zarr" in str(self.group.store):
            raise KeyboardInterrupt
        return original(self, k, batch, hits_seen)

    monkeypatch.setattr(PartWriter, "write_block", killed)
    assert hepreg(monkeypatch, capsys, "export-embeddings", *args, *other)[0] == 130  # click's exit on Ctrl-C
    monkeypatch.setattr(PartWriter, "write_block", original)
    cache = tmp_path / "runs" / "f" / "cache"
    train = snapshot(cache / "train.zarr")
    code, out = hepreg(monkeypatch, capsys, "export-embeddings", *args, *other)
    assert code == 0, out
    assert "already complete" in out and snapshot(cache / "train.zarr") == train
    refused(hepreg(monkeypatch, capsys, "export-embeddings", *args, *other), "already complete", "--overwrite")


# ----------------------------------------------------------------------------------------------- 8 environment
def test_cuda_without_cuda(run, monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg, args = run
    refused(hepreg(monkeypatch, capsys, "train-head", "--overwrite", *args, "--set", "head_train.device=cuda"),
            "cuda", "cpu")


def test_disk_full_while_saving_a_checkpoint(run, monkeypatch, capsys):
    cfg, args = run
    rd = RunDir(cfg)
    before = snapshot(rd.head)
    fill_the_disk(monkeypatch, rd.head / "best.pt")
    # one more epoch on the finished run: its first checkpoint write meets the full disk
    refused(hepreg(monkeypatch, capsys, "train-head", "--resume", *args, "--set", "head_train.epochs=2"),
            "disk is full", "best.pt")
    after = snapshot(rd.head)
    checkpoints = [k for k in before if str(k).endswith(".pt")]
    assert checkpoints and {k: after.get(k) for k in checkpoints} == {k: before[k] for k in checkpoints}


def test_read_only_run_directory(run, tmp_path, monkeypatch, capsys):
    cfg, args = run

    def read_only(self, *a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    refused(hepreg(monkeypatch, capsys, "train-head", *args, "--set", f"run_dir={tmp_path / 'ro'}"),
            "read-only", str(tmp_path / "ro"))


# ----------------------------------------------------------------------------------------------- more bad inputs
def test_config_file_problems(tmp_path, monkeypatch, capsys):
    tagged = tmp_path / "tag.yaml"
    tagged.write_text("name: !!python/object/apply:os.system ['touch pwned']\n")
    refused(hepreg(monkeypatch, capsys, "train-head", "-c", tagged, "--print-config"), str(tagged), "YAML")
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    refused(hepreg(monkeypatch, capsys, "train-head", "-c", listed, "--print-config"), str(listed), "mapping")
    refused(hepreg(monkeypatch, capsys, "train-head", "-c", tmp_path, "--print-config"), str(tmp_path))
    refused(hepreg(monkeypatch, capsys, "train-head", "--set", "head.hidden_dim", "--print-config"),
            "head.hidden_dim", "key=value")
    refused(hepreg(monkeypatch, capsys, "train-head", "--set", "head.width=3", "--print-config"), "head.width")
    refused(hepreg(monkeypatch, capsys, "export-embeddings", "--dtype", "float8", "--print-config"),
            "export.dtype", "float16, float32")
    refused(hepreg(monkeypatch, capsys, "evaluate", "--split", "training", "--print-config"), "eval.split")
    refused(hepreg(monkeypatch, capsys, "train-head", "--source", "disk", "--print-config"), "head_train.source")
    assert not Path("pwned").exists()


def test_sweep_entries_are_checked_like_the_config(run, tmp_path, monkeypatch, capsys):
    cfg, args = run
    before = snapshot(RunDir(cfg).root)
    for entry, names in (("{name: ../x}", ["../x", "plain name"]), ("{name: a, hidden_dim: 0}", ["hidden_dim"]),
                         ("{name: a, pt_target: ptt}", ["pt_target", "qpt"])):
        sweep = tmp_path / "sweep.yaml"
        sweep.write_text(f"configs:\n  - {entry}\n")
        refused(hepreg(monkeypatch, capsys, "train-head", *args, "--sweep", sweep), str(sweep), *names)
    assert snapshot(RunDir(cfg).root) == before


def test_damaged_cache_metadata(run, monkeypatch, capsys):
    cfg, args = run
    rd = RunDir(cfg)
    before = snapshot(rd.head)
    for rel in ("train.zarr/zarr.json", "train.zarr/part-0000/zarr.json", "train.zarr/part-0000/hits/embed/zarr.json"):
        f = rd.cache / rel
        good = f.read_bytes()
        f.write_bytes(good[: len(good) // 2])
        try:
            refused(hepreg(monkeypatch, capsys, "train-head", "--overwrite", *args), "train.zarr")
        finally:
            f.write_bytes(good)
    assert snapshot(rd.head) == before


def test_checkpoint_missing_what_a_stage_needs(run, tmp_path, monkeypatch, capsys):
    cfg, args = run
    rd = RunDir(cfg)
    good = (rd.head / "best.pt").read_bytes()
    try:
        torch.save({"model": {}}, rd.head / "best.pt")
        refused(hepreg(monkeypatch, capsys, "evaluate", *args), str(rd.head / "best.pt"))
    finally:
        (rd.head / "best.pt").write_bytes(good)
    bad = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, bad)
    refused(hepreg(monkeypatch, capsys, "export-embeddings", *args, "--checkpoint", bad, "--splits", "test"),
            str(bad), "stage-1")


def test_truncated_or_foreign_chunk_file(data_copy, monkeypatch, capsys):
    f = data_copy / "chunk_00001.h5"
    f.write_bytes(f.read_bytes()[:5000])
    refused(hepreg(monkeypatch, capsys, "reference-fit", data_copy), "chunk_00001.h5")
    (data_copy / "event_row_indices.npy").write_bytes(b"not numpy")
    refused(hepreg(monkeypatch, capsys, "reference-fit", data_copy), "event_row_indices.npy")


def test_generate_onto_a_file_or_with_no_events(tmp_path, monkeypatch, capsys):
    f = tmp_path / "file.txt"
    f.write_text("keep")
    refused(hepreg(monkeypatch, capsys, "generate", f, "-n", "10", "--overwrite"), str(f), "not a directory")
    assert f.read_text() == "keep"
    refused(hepreg(monkeypatch, capsys, "generate", tmp_path / "d", "-n", "0"), "--events")


def test_run_dir_that_is_a_file(run, tmp_path, monkeypatch, capsys):
    cfg, args = run
    f = tmp_path / "runs"
    f.write_text("keep")
    refused(hepreg(monkeypatch, capsys, "train-head", *args, "--set", f"run_dir={f}"), str(f))
    assert f.read_text() == "keep"


def test_cache_commands_on_damage_and_on_what_is_not_a_cache(run, tmp_path, monkeypatch, capsys):
    cfg, args = run
    chunk = RunDir(cfg).cache / "val.zarr" / "part-0000" / "hits" / "raw" / "c" / "0" / "0"
    good = chunk.read_bytes()
    chunk.unlink()
    try:
        out = refused(hepreg(monkeypatch, capsys, "cache", "verify", RunDir(cfg).cache), "hits/raw")
        assert "0/0" in out
    finally:
        chunk.write_bytes(good)
    refused(hepreg(monkeypatch, capsys, "cache", "info", tmp_path), str(tmp_path))


def test_missing_inputs_are_named(run, tmp_path, monkeypatch, capsys):
    cfg, args = run
    refused(hepreg(monkeypatch, capsys, "train-head", "--overwrite", *args, "--set", f"data.path={tmp_path / 'nope'}",
                   "--source", "live"), str(tmp_path / "nope"))
    refused(hepreg(monkeypatch, capsys, "export-embeddings", *args, "--checkpoint", tmp_path, "--splits", "test"),
            str(tmp_path))
    refused(hepreg(monkeypatch, capsys, "train-head", *args, "--set", f"run_dir={tmp_path / 'empty'}"),
            "export-embeddings")
    parent = tmp_path / "a-file"
    parent.write_text("keep")
    refused(hepreg(monkeypatch, capsys, "generate", parent / "data", "-n", "10"), str(parent))
    assert parent.read_text() == "keep"


def test_export_disk_full_keeps_what_was_written(run, tmp_path, monkeypatch, capsys):
    """ENOSPC in the middle of an export: a one-line error, and the same command continues afterwards."""
    from hepreg.cache.writer import PartWriter

    cfg, args = run
    other = ["--set", f"run_dir={tmp_path / 'runs'}", "--checkpoint", RunDir(cfg).assign / "best.pt",
             "--splits", "train"]
    original = PartWriter.write_block

    def full(self, k, batch, hits_seen=0):
        if k == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.group.store))
        return original(self, k, batch, hits_seen)

    monkeypatch.setattr(PartWriter, "write_block", full)
    refused(hepreg(monkeypatch, capsys, "export-embeddings", *args, *other), "disk is full")
    monkeypatch.setattr(PartWriter, "write_block", original)
    code, out = hepreg(monkeypatch, capsys, "export-embeddings", *args, *other)
    assert code == 0 and "continuing" in out, out


# ----------------------------------------------------------------------------------------------- last inputs
@pytest.mark.parametrize("override, names", [
    ("head.hidden_dim=[1,", ["--set head.hidden_dim=[1,", "not valid YAML"]),
    ("name={a: b", ["--set name={a: b", "not valid YAML"]),
    ("name=!!python/object/apply:os.system ['touch pwned']", ["--set name=", "tag"]),
    ("head.hidden_dim=!!python/name:os.system", ["--set head.hidden_dim=", "tag"]),
    ("name=!!str demo", ["--set name=", "tag"]),
])
def test_set_value_that_is_not_plain_yaml(override, names, monkeypatch, capsys):
    refused(hepreg(monkeypatch, capsys, "train-head", "-c", "configs/demo.yaml", "--set", override,
                   "--print-config"), *names)
    assert not Path("pwned").exists()


@pytest.mark.parametrize("text, names", [
    ("configs:\n  - {name: a}\nhidden_dim: 256\n", ["hidden_dim", "configs:"]),  # a head field outside an entry
    ("head: {lr: 0.01}\nconfigs:\n  - {name: a}\n", ["'head'", "configs:"]),
    ("configs:\n  - {name: a}\nconfig:\n  - {name: b}\n", ["'config'"]),  # a typo beside the real key
])
def test_sweep_file_with_unknown_top_level_keys(run, text, names, tmp_path, monkeypatch, capsys):
    cfg, args = run
    before = snapshot(RunDir(cfg).root)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(text)
    for command in ("train-head", "evaluate"):
        refused(hepreg(monkeypatch, capsys, command, *args, "--sweep", sweep), str(sweep), *names)
    assert snapshot(RunDir(cfg).root) == before


@pytest.mark.parametrize("edit, names", [
    (lambda m: m["event_mapping"].update(num_events=301), ["event_mapping.num_events", "301", "300"]),
    (lambda m: [m["event_mapping"]["chunk_summary"][0].update(event_count=149),
                m["event_mapping"]["chunk_summary"][1].update(event_count=151)],
     ["chunk_summary[0].event_count", "149", "chunk_00000.h5", "150"]),
])
def test_metadata_event_counts_that_disagree_with_the_chunk_files(data_copy, edit, names, monkeypatch, capsys):
    edit_meta(data_copy, edit)
    refused(hepreg(monkeypatch, capsys, "reference-fit", data_copy), "metadata.yaml", *names)


def test_evaluate_refuses_a_cache_of_another_dataset_of_the_same_size(run, tmp_path, monkeypatch, capsys):
    """Another dataset with as many events (and the same event numbers) as the one the cache was exported from:
    the cache's outputs must not be paired with its truth."""
    from hepreg.data.synthetic import generate

    cfg, args = run
    other = generate(tmp_path / "other", events=300, seed=8, noise_mean=30.0, events_per_file=150)
    rd = RunDir(cfg)
    before = snapshot(rd.root)
    out = refused(hepreg(monkeypatch, capsys, "evaluate", *args, "--set", f"data.path={other}", "--overwrite"),
                  str(other), "test.zarr")
    assert "another dataset" in out or "other dataset" in out
    assert snapshot(rd.root) == before


def test_train_assign_overwrite_keeps_the_earlier_run_when_the_input_is_bad(run, data_copy, monkeypatch, capsys):
    """A damaged event found only once training reads it: the earlier stage 1 is still there afterwards."""
    cfg, args = run
    rd = RunDir(cfg)
    cols = yaml.safe_load((data_copy / "metadata.yaml").read_text())["hit_features"]

    def poison(h):
        row = h["hits"][3]
        row[0, cols.index("spacePoint_globEdgeLowX")] = np.inf
        h["hits"][3] = row
    edit_h5(data_copy / "chunk_00000.h5", poison)
    before = snapshot(rd.assign)
    refused(hepreg(monkeypatch, capsys, "train-assign", "--overwrite", *args, "--set", f"data.path={data_copy}"),
            "chunk_00000.h5", "event 3", "spacePoint_globEdgeLowX")
    assert snapshot(rd.assign) == before


def test_disk_full_during_train_head_overwrite_keeps_the_earlier_head(run, monkeypatch, capsys):
    cfg, args = run
    rd = RunDir(cfg)
    before = snapshot(rd.head)
    fill_the_disk(monkeypatch, rd.head / "best.pt")
    refused(hepreg(monkeypatch, capsys, "train-head", "--overwrite", *args), "disk is full")
    assert snapshot(rd.head) == before


def test_export_overwrite_keeps_the_earlier_split_until_the_new_one_is_complete(run, tmp_path, monkeypatch, capsys):
    from hepreg.cache.writer import PartWriter

    cfg, args = run
    other = ["--set", f"run_dir={tmp_path / 'runs'}", "--checkpoint", RunDir(cfg).assign / "best.pt",
             "--splits", "test"]
    assert hepreg(monkeypatch, capsys, "export-embeddings", *args, *other)[0] == 0
    cache = tmp_path / "runs" / "f" / "cache"
    before = snapshot(cache)
    original = PartWriter.write_block

    def full(self, k, batch, hits_seen=0):
        if k == 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.group.store))
        return original(self, k, batch, hits_seen)

    monkeypatch.setattr(PartWriter, "write_block", full)
    refused(hepreg(monkeypatch, capsys, "export-embeddings", *args, *other, "--overwrite"), "disk is full")
    assert snapshot(cache) == before and sorted(p.name for p in cache.iterdir()) == ["test.zarr"]


def test_results_set_aside_by_a_killed_run_come_back(tmp_path):
    """A run killed (kill -9) after --overwrite set the earlier results aside, before its first checkpoint: the next
    run finds them, puts them back, and they are what a failure of that run leaves too."""
    from hepreg.runs.outputs import ASIDE, Replacement

    results = ("best.pt", "last.pt", "metrics.csv")
    for name in (*results, "config.yaml", "notes.txt"):
        (tmp_path / name).write_text(name)
    before = snapshot(tmp_path)
    Replacement().files(tmp_path, results)  # ... and the process dies here
    (tmp_path / "config.yaml").write_text("the killed run's")
    assert not (tmp_path / "best.pt").exists() and (tmp_path / ASIDE / "best.pt").exists()
    again = Replacement()
    again.files(tmp_path, results)
    again.restore()
    assert snapshot(tmp_path) == before and not (tmp_path / ASIDE).exists()
