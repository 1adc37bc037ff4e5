"""`hepreg export-model`: one ONNX model equal to torch on padded and unpadded batches, with its metadata."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from hepreg.data.layout import RAW_FEATURES, SCALE  # noqa: E402
from hepreg.errors import HepregError  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("test_export_model")]  # its fixture exports a model: ~80 s,
# made once on one worker


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_dataset):
    from test_predict import make_run, small_config

    from hepreg.stages.export_model import run

    tmp = tmp_path_factory.mktemp("onnx")
    cfg = small_config(tmp, tiny_dataset)
    make_run(cfg, fit_proxy=True)  # the optimal fit runs inside the exported model
    return cfg, run(cfg)


def test_command_verifies_within_tolerance(exported):
    from hepreg.stages.export_model import TOLERANCE

    cfg, result = exported
    assert result["path"] == Path(cfg.run_dir) / "p" / "model.onnx" and result["path"].is_file()
    assert set(result["max_diff"]) == {"track_logit", "mask_logit", "params"}
    assert all(d <= TOLERANCE[k] for k, d in result["max_diff"].items())
    assert result["torch_events_per_s"] > 0 and result["ort_events_per_s"] > 0


def test_onnx_equals_torch_on_padded_and_unpadded_batches(exported):
    from hepreg.stages.export_model import OnnxPipeline, params_difference
    from hepreg.trained import load_trained

    cfg, result = exported
    root = Path(cfg.run_dir) / "p"
    assigner, head = load_trained(root / "assign" / "best.pt", root / "head" / "best.pt")
    pipeline = OnnxPipeline(assigner.model, head)
    plain = ort.SessionOptions()  # the graph's math as exported (the command's own check runs the optimised one)
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # 5x quicker to open
    session = ort.InferenceSession(str(result["path"]), plain, providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(0)
    cases = [[600, 1], [1], [37, 5, 12], [600], [9, 9]]  # hit counts per event; padded to the largest
    for counts in cases:
        M = max(counts)
        hits = torch.randn(len(counts), M, 23, generator=g)
        hits[..., RAW_FEATURES.index("r")] = hits[..., RAW_FEATURES.index("r")].abs() * 5
        valid = torch.arange(M)[None, :] < torch.tensor(counts)[:, None]
        with torch.inference_mode():
            ref = [t.numpy() for t in pipeline(hits, valid)]
        got = session.run(None, {"hits": hits.numpy(), "hit_valid": valid.numpy()})
        assert [o.name for o in session.get_outputs()] == ["track_logit", "mask_logit", "params"]
        for r, o in zip(ref, got):
            assert r.shape == o.shape
        np.testing.assert_allclose(got[0], ref[0], atol=1e-4)
        keep = np.broadcast_to(valid.numpy()[:, None, :], ref[1].shape)
        np.testing.assert_allclose(got[1][keep], ref[1][keep], atol=1e-4, rtol=1e-4)
        assert params_difference(ref[2], got[2]).max() < 1e-4  # q/pT, eta, phi
        np.testing.assert_array_equal(np.isfinite(got[2]), True)


def test_metadata_tells_how_to_feed_raw_columns(exported):
    _, result = exported
    meta = {p.key: p.value for p in onnx.load(str(result["path"])).metadata_props}
    assert json.loads(meta["hepreg.features"]) == list(RAW_FEATURES)
    assert json.loads(meta["hepreg.scale"])["spacePoint_time"] == SCALE["spacePoint_time"]
    assert len(meta["hepreg.stage1_sha256"]) == 64 and len(meta["hepreg.head_sha256"]) == 64
    model = onnx.load(str(result["path"]))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims[:2]] == ["batch", "hits"]


def test_existing_output_refused(exported):
    from hepreg.stages.export_model import run

    cfg, result = exported
    with pytest.raises(HepregError, match="exists; pass --overwrite"):
        run(cfg)
    assert result["path"].is_file()
    foreign = result["path"].with_name("other.onnx")
    foreign.write_text("not ours")
    with pytest.raises(HepregError, match="not an ONNX model hepreg exported"):
        run(cfg, out=foreign, overwrite=True)
    assert foreign.read_text() == "not ours"
