"""`hepreg export-model`: the frozen stage 1 and a trained head as one ONNX model, checked with ONNX Runtime.

Inputs: `hits` [B, M, 23] float32, the scaled model-input features (the scale factors and feature names are in
the model's metadata, so raw columns can be fed from C++), and `hit_valid` [B, M] bool; B and M are dynamic.
Outputs: `track_logit` [B, N], `mask_logit` [B, N, M] (final layer; padded hits −1e4), `params` [B, N, 4]
(pT GeV, eta, phi, q) and, when the head predicts uncertainties, `sigma` [B, N, k]. The head runs on padded
tensors through `predict_padded` (dense masked pooling), which equals the flat path the head trains with.

The model is verified in the same command: ONNX Runtime and torch on real events of the config's test split
(bucketed batches, one event alone without padding, an event of `MAX_HITS` hits and one single-hit event
padded into one batch), the largest differences printed; over tolerance it is an error and no file is kept.
"""
from __future__ import annotations

import json
import os
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from hepreg.settings import Config
from hepreg.data.batching import HitLoader
from hepreg.data.layout import DERIVED, INPUT_COLUMNS, RAW_FEATURES, SCALE, TARGETS
from hepreg.data.reader import open_dataset, split_ranges
from hepreg.runs.digest import sha256_file
from hepreg.errors import HepregError
from hepreg.runs.progress import console
from hepreg.runs.files import check_output_file, stage_lock
from hepreg.runs.directory import RunDir
from hepreg.trained import load_trained, model_paths

OPSET = 18
MAX_HITS = 600  # the largest event the ATLAS-muon layout holds after hit filtering
SIGMAS = ("sigma_pt", "sigma_eta", "sigma_phi", "sigma_qpt")
# largest |onnx - torch| allowed: logits, and the parameters as (q/pT [1/GeV], eta, phi [rad], phi wrapped):
# pT = 1/|q/pT| of a near-straight track is huge and q its sign, so both are compared through q/pT, where
# float rounding stays float rounding; sigma relative to max(|value|, 1)
TOLERANCE = {"track_logit": 1e-3, "mask_logit": 1e-3, "params": 1e-4, "sigma": 1e-3}


class OnnxPipeline(nn.Module):
    """hits [B, M, 23], hit_valid [B, M] -> track_logit, mask_logit, params (+ sigma): what the ONNX model does."""

    def __init__(self, model: nn.Module, head: nn.Module):
        super().__init__()
        self.model, self.head = model, head
        self.eval()  # torch.onnx.export restores the mode it found, recursively: eval must be the mode it finds

    def forward(self, hits: Tensor, hit_valid: Tensor) -> tuple[Tensor, ...]:
        out = self.model(hits, hit_valid)
        final = out.final
        cols = self.head.predict_padded(hits, hit_valid, out.hit_embed, final["mask_logit"], out.query_embed)
        result = (final["track_logit"], final["mask_logit"], torch.stack([cols[t] for t in TARGETS], -1))
        sigma = [cols[s] for s in SIGMAS if s in cols]
        return result + ((torch.stack(sigma, -1),) if sigma else ())


def output_names(pipeline: OnnxPipeline, example: tuple[Tensor, Tensor]) -> list[str]:
    with torch.no_grad():
        n = len(pipeline(*example))
    return ["track_logit", "mask_logit", "params", "sigma"][:n]


def metadata(pipeline_outputs: list[str], stage1: Path, stage1_sha: str, head: Path, head_sha: str,
             sigma_names: list[str]) -> dict[str, str]:
    """What a user outside hepreg needs to feed the model and read its outputs (ONNX metadata_props)."""
    return {
        "hepreg.version": _version(),
        "hepreg.input.hits": ("float32 [B, M, 23]: the 23 model-input features of each hit, in the order of "
                              "hepreg.features; padded hits may hold anything (masked by hit_valid)"),
        "hepreg.input.hit_valid": "bool [B, M]: True for real hits",
        "hepreg.features": json.dumps(list(RAW_FEATURES)),
        "hepreg.scale": json.dumps({c: SCALE.get(c, 1.0) for c in INPUT_COLUMNS}),
        "hepreg.derived": json.dumps({
            "r": "hypot(x, y)", "s": "sqrt(r^2 + z^2)", "theta": "arccos(z / s)", "phi": "atan2(y, x)",
            "eta": "-ln(tan(theta / 2))",
            "from": "x, y, z = spacePoint_globEdgeLow{X,Y,Z} after scaling (metres)"}),
        "hepreg.derived_order": json.dumps(list(DERIVED)),
        "hepreg.outputs": json.dumps({
            "track_logit": "[B, N] logit that query n is a track (sigmoid >= 0.5)",
            "mask_logit": "[B, N, M] logit that hit m is on track n (sigmoid >= 0.5); -1e4 for padded hits",
            "params": f"[B, N, 4] {', '.join(TARGETS)}: pT [GeV], eta, phi [rad], q (+1/-1)",
            "sigma": f"[B, N, {len(sigma_names)}] {', '.join(sigma_names)}"}
            | ({} if "sigma" in pipeline_outputs else {"sigma": "not predicted by this head"})),
        "hepreg.stage1_checkpoint": str(stage1), "hepreg.stage1_sha256": stage1_sha,
        "hepreg.head_checkpoint": str(head), "hepreg.head_sha256": head_sha,
    }


def export_onnx(pipeline: OnnxPipeline, example: tuple[Tensor, Tensor], path: Path, meta: dict[str, str],
                exporter: str = "torchscript") -> None:
    """torch.onnx.export with dynamic batch and hit axes, then the metadata written into the model.

    Both exporters give the same model here (checked against torch alike); on 2 loaded CPU cores the
    TorchScript-based one takes ~2 s and the dynamo one (torch.export + onnxscript) 40-110 s, hence the default.
    """
    import onnx

    names = output_names(pipeline, example)
    pipeline.eval()
    with torch.no_grad():
        if exporter == "dynamo":
            batch, hits = torch.export.Dim("batch"), torch.export.Dim("hits")
            torch.onnx.export(pipeline, example, str(path), input_names=["hits", "hit_valid"], output_names=names,
                              dynamic_shapes={"hits": {0: batch, 1: hits}, "hit_valid": {0: batch, 1: hits}},
                              opset_version=OPSET, dynamo=True, external_data=False, verbose=False)
        elif exporter == "torchscript":
            dynamic = {"hits": {0: "batch", 1: "hits"}, "hit_valid": {0: "batch", 1: "hits"},
                       "track_logit": {0: "batch"}, "mask_logit": {0: "batch", 2: "hits"}, "params": {0: "batch"},
                       "sigma": {0: "batch"}}
            torch.onnx.export(pipeline, example, str(path), input_names=["hits", "hit_valid"], output_names=names,
                              dynamic_axes={k: v for k, v in dynamic.items() if k in names or k.startswith("hit")},
                              opset_version=OPSET, dynamo=False)
        else:
            raise HepregError(f"--exporter must be torchscript or dynamo, not {exporter!r}")
    model = onnx.load(str(path))
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def check_batches(dataset, start: int, stop: int, batch_size: int) -> list[tuple[str, Tensor, Tensor]]:
    """Real events to compare on: the first bucketed batches, one event alone (no padding), and an event of
    MAX_HITS hits (hits of consecutive events, stacked) padded together with a single-hit event."""
    out = []
    loader = HitLoader(dataset, start, min(stop, start + 4 * batch_size), batch_size=batch_size, shuffle=False)
    for i, batch in enumerate(loader):
        if i < 2:
            out.append((f"bucketed batch {i}", batch.hits, batch.hit_valid))
    events = dataset.read_flat(start, stop)
    one = int(np.argmax(events.num_hits))
    s, e = events.offsets[one], events.offsets[one + 1]
    out.append(("one event, unpadded", torch.from_numpy(events.hits[s:e])[None], torch.ones(1, e - s, dtype=torch.bool)))
    big = torch.from_numpy(events.hits[:MAX_HITS])  # [≤600, 23]
    if len(big) < MAX_HITS:  # a tiny split: repeat its hits
        big = big.repeat(-(-MAX_HITS // max(len(big), 1)), 1)[:MAX_HITS]
    hits = torch.zeros(2, MAX_HITS, big.shape[1])
    hits[0] = big
    hits[1, 0] = big[0]
    valid = torch.zeros(2, MAX_HITS, dtype=torch.bool)
    valid[0], valid[1, 0] = True, True
    out.append((f"{MAX_HITS}-hit event + single-hit event", hits, valid))
    return out


def params_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| of params [..., 4] (pt, eta, phi, q) as (q/pT, eta, wrapped phi): [..., 3]."""
    ca, cb = a[..., 3] / a[..., 0], b[..., 3] / b[..., 0]
    dphi = np.remainder(a[..., 2] - b[..., 2] + np.pi, 2 * np.pi) - np.pi
    return np.abs(np.stack([ca - cb, a[..., 1] - b[..., 1], dphi], -1))


def compare(pipeline: OnnxPipeline, session, batches) -> tuple[dict[str, float], float, float]:
    """Largest differences per output over all batches; torch and ONNX Runtime events/s on them."""
    worst: dict[str, float] = {}
    t_torch = t_ort = 0.0
    events = 0
    names = [o.name for o in session.get_outputs()]
    for _, hits, valid in batches:
        t0 = time.perf_counter()
        with torch.inference_mode():
            ref = pipeline(hits, valid)
        t1 = time.perf_counter()
        got = session.run(None, {"hits": hits.numpy(), "hit_valid": valid.numpy()})
        t_ort += time.perf_counter() - t1
        t_torch += t1 - t0
        events += hits.shape[0]
        for name, r, g in zip(names, ref, got):
            r, g = r.numpy(), np.asarray(g)
            if name == "mask_logit":  # padded hits are a constant in both; compare real hits
                keep = np.broadcast_to(valid.numpy()[:, None, :], r.shape)
                r, g = r[keep], g[keep]
            diff = params_difference(r, g) if name == "params" else np.abs(r - g)
            if name == "sigma":
                diff = diff / np.maximum(np.abs(r), 1.0)
            worst[name] = max(worst.get(name, 0.0), float(diff.max(initial=0.0)))
    return worst, events / max(t_torch, 1e-9), events / max(t_ort, 1e-9)


def throughput(pipeline: OnnxPipeline, session, hits: Tensor, valid: Tensor, repeats: int = 5) -> tuple[float, float]:
    """events/s of torch and ONNX Runtime on the same batch, alternated, best of `repeats` each."""
    best_t = best_o = float("inf")
    feed = {"hits": hits.numpy(), "hit_valid": valid.numpy()}
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.inference_mode():
            pipeline(hits, valid)
        t1 = time.perf_counter()
        session.run(None, feed)
        t2 = time.perf_counter()
        best_t, best_o = min(best_t, t1 - t0), min(best_o, t2 - t1)
    return hits.shape[0] / best_t, hits.shape[0] / best_o


def run(cfg: Config, *, head: Path | None = None, out: Path | None = None, checkpoint: Path | None = None,
        overwrite: bool = False, exporter: str = "torchscript", model: Path | None = None) -> dict:
    """Stage 1 and the head (the run's, or `model`: a fine-tuned checkpoint holding both) as one ONNX model."""
    target = Path(out) if out is not None else RunDir(cfg).root / "model.onnx"
    with stage_lock(target.parent, name=f".{target.name}.lock"):  # one writer per output file
        return _run(cfg, head=head, out=target, checkpoint=checkpoint, overwrite=overwrite, exporter=exporter,
                    model=model)


def _run(cfg: Config, *, head: Path | None, out: Path, checkpoint: Path | None, overwrite: bool,
         exporter: str, model: Path | None = None) -> dict:
    try:
        import onnx  # noqa: F401  (used by export_onnx)
        import onnxruntime as ort
    except ImportError:
        raise HepregError("export-model needs onnx and onnxruntime: pip install 'hepreg[onnx]' "
                          "(make setup installs them)") from None
    rd = RunDir(cfg)
    out = Path(out) if out is not None else rd.root / "model.onnx"
    check_output_file(out, overwrite, _made_by_hepreg, "an ONNX model hepreg exported")
    checkpoint, head_path = model_paths(cfg, checkpoint, head, model)
    assigner, head_model = load_trained(checkpoint, head_path, "cpu")
    pipeline = OnnxPipeline(assigner.model, head_model).float()

    dataset = open_dataset(cfg.data.path, cfg.data.max_events)
    start, stop = split_ranges(len(dataset), cfg.data.val_fraction, cfg.data.test_fraction)["test"]
    if stop <= start:
        start, stop = 0, len(dataset)
    batches = check_batches(dataset, start, stop, cfg.data.batch_size)
    example = (batches[0][1], batches[0][2])
    with torch.no_grad():
        sigma_names = [s for s in SIGMAS if s in head_model.predict_padded(
            example[0], example[1], *_stage1(pipeline, *example))]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    meta = metadata(output_names(pipeline, example), checkpoint, assigner.checkpoint_sha256, head_path,
                    sha256_file(head_path), sigma_names)
    worst, torch_rate, ort_rate = _write_checked(pipeline, example, batches, tmp, out, meta, exporter, ort, cfg)
    console.print(f"{len(batches)} checks ({', '.join(b[0] for b in batches)}) passed; on a batch of "
                  f"{example[0].shape[0]} events: torch {torch_rate:,.0f} events/s, ONNX Runtime {ort_rate:,.0f} "
                  f"events/s ({ort_rate / torch_rate:.2f}x) -> {out}")
    return {"path": out, "max_diff": worst, "torch_events_per_s": torch_rate, "ort_events_per_s": ort_rate}


def _write_checked(pipeline, example, batches, tmp: Path, out: Path, meta, exporter: str, ort, cfg):
    """Export to `tmp`, compare with ONNX Runtime, rename to `out` only when within tolerance."""
    try:
        export_onnx(pipeline, example, tmp, meta, exporter)
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        worst, _, _ = compare(pipeline, session, batches)
        torch_rate, ort_rate = throughput(pipeline, session, *example)
        for name, d in worst.items():
            console.print(f"max |onnx - torch| {name}: {d:.2e}" + (
                " (of q/pT [1/GeV], eta, phi)" if name == "params" else
                " (relative to max(|value|, 1))" if name == "sigma" else ""))
        bad = {k: d for k, d in worst.items() if not d <= TOLERANCE[k]}
        if bad:
            raise HepregError(f"the ONNX model differs from torch beyond tolerance on real events of "
                              f"{cfg.data.path}: " + ", ".join(f"{k} {d:.2e} > {TOLERANCE[k]:g}" for k, d in bad.items()))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return worst, torch_rate, ort_rate


def _made_by_hepreg(path: Path) -> bool:
    import onnx

    try:
        return any(p.key == "hepreg.version" for p in onnx.load(str(path), load_external_data=False).metadata_props)
    except Exception:  # not an ONNX file at all
        return False


def _stage1(pipeline: OnnxPipeline, hits: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    out = pipeline.model(hits, valid)
    return out.hit_embed, out.final["mask_logit"], out.query_embed


def _version() -> str:
    try:
        return version("hepreg")
    except PackageNotFoundError:
        return "unknown"
