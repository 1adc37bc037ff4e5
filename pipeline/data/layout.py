"""The ATLAS-muon HDF5 layout (hepattn atlas_muon experiment): column names and the model-input scaling.

One place defines which columns exist and how they become the 23 model-input features, so the generator,
the reader, the cache (`hits/raw`) and the head all agree.
"""
from __future__ import annotations

import numpy as np

# Columns of `hits` in a chunk file, in the order `hepreg generate` writes them. Real datasets may order or
# extend them differently: the reader looks columns up by name from metadata.yaml.
HIT_COLUMNS: tuple[str, ...] = (
    "spacePoint_globEdgeHighX", "spacePoint_globEdgeHighY", "spacePoint_globEdgeHighZ",
    "spacePoint_globEdgeLowX", "spacePoint_globEdgeLowY", "spacePoint_globEdgeLowZ",
    "spacePoint_time", "spacePoint_driftR", "spacePoint_readOutSide",
    "spacePoint_covXX", "spacePoint_covXY", "spacePoint_covYX", "spacePoint_covYY",
    "spacePoint_channel", "spacePoint_layer", "spacePoint_stationPhi", "spacePoint_stationEta",
    "spacePoint_stationIndex", "spacePoint_technology", "spacePoint_truthLink",
)
TRACK_COLUMNS: tuple[str, ...] = ("truthMuon_pt", "truthMuon_eta", "truthMuon_phi", "truthMuon_q")
TRUTH_LINK = "spacePoint_truthLink"  # -1 = noise, else the row of the track in `tracks`

# Multiplicative scale of each spacePoint input (as the reference does); unlisted inputs are used raw.
SCALE: dict[str, float] = {
    **{f"spacePoint_globEdge{e}{c}": 1e-3 for e in ("High", "Low") for c in "XYZ"},  # mm -> m
    "spacePoint_time": 1e-5,
    **{f"spacePoint_cov{c}": 1e-6 for c in ("XX", "XY", "YX", "YY")},
    "spacePoint_channel": 1e-3,
    "spacePoint_stationIndex": 0.1,
}
# The 18 spacePoint columns that enter the model (readOutSide and truthLink do not).
INPUT_COLUMNS: tuple[str, ...] = tuple(c for c in HIT_COLUMNS if c not in ("spacePoint_readOutSide", TRUTH_LINK))
DERIVED: tuple[str, ...] = ("r", "s", "theta", "phi", "eta")  # from the (scaled) low edge, in metres
RAW_FEATURES: tuple[str, ...] = INPUT_COLUMNS + DERIVED  # 23 model-input features, the cache's hits/raw
NUM_RAW_FEATURES = len(RAW_FEATURES)

# Regression targets, in the order of the last axis of every target tensor [.., P, 4].
TARGETS: tuple[str, ...] = ("pt", "eta", "phi", "q")
TARGET_COLUMNS: dict[str, str] = {"pt": "truthMuon_pt", "eta": "truthMuon_eta", "phi": "truthMuon_phi",
                                  "q": "truthMuon_q"}


def scale_hits(hits: np.ndarray, columns: list[str] | tuple[str, ...]) -> np.ndarray:
    """Raw `hits` [..., len(columns)] -> model inputs [..., 23] float32 (RAW_FEATURES order).

    Padding rows (NaN) stay NaN; callers zero them with the hit mask. One gather and one multiply for the
    18 inputs (a per-column loop over strided memory cost as much as the HDF5 read).
    """
    index = {c: i for i, c in enumerate(columns)}
    take = np.array([index[c] for c in INPUT_COLUMNS])
    scale = np.array([SCALE.get(c, 1.0) for c in INPUT_COLUMNS], dtype=np.float32)
    k = len(INPUT_COLUMNS)
    out = np.empty(hits.shape[:-1] + (NUM_RAW_FEATURES,), dtype=np.float32)
    np.multiply(np.take(hits, take, axis=-1), scale, out=out[..., :k])
    x, y, z = (out[..., INPUT_COLUMNS.index(f"spacePoint_globEdgeLow{c}")] for c in "XYZ")
    r = np.hypot(x, y)
    s = np.sqrt(r * r + z * z)
    with np.errstate(invalid="ignore", divide="ignore"):
        theta = np.arccos(np.clip(z / s, -1.0, 1.0))
        eta = -np.log(np.tan(theta / 2))
    out[..., k], out[..., k + 1], out[..., k + 2] = r, s, theta
    out[..., k + 3], out[..., k + 4] = np.arctan2(y, x), eta
    return out
