"""The toy muon spectrometer behind `hepreg generate`: ATLAS-like geometry, vectorised, deterministic.

The spectrometer itself (geometry, field, material, resolutions, acceptance, propagation) is
`hepreg.physics.detector`, the one model the fits and the Cramér–Rao bound use too. Muons come from the origin
(pT 3-300 GeV on a falling ~pT^-1.5 spectrum, |eta| < 2.7, uniform phi, q = +-1, 1..max_tracks per event);
each crosses the layers with its three multiple-scattering kinks drawn from their Highland widths, and leaves
a hit where a layer's chambers are and the layer is efficient (tubes 95 %, trigger strips 90 %), with its
drift radius smeared by 0.1 mm.

Background: uncorrelated hits (90 % random tubes with a uniform drift radius, 10 % random strip pairs)
with a log-normal count of the requested mean (long tail), capped so that no event has more than
`max_hits` hits. Hits within an event are in random order.

Hit columns as written (layout.HIT_COLUMNS):
    globEdgeLow/High{X,Y,Z}  MDT: the two ends of the wire (low = the end at smaller phi);
                             RPC/TGC: both equal to the strip crossing point
    time                     ns: time of flight + drift time (700 ns at the tube wall) for muons;
                             uniform 0..1200 ns for background
    driftR                   mm, MDT drift radius (distance of closest approach to the wire); 0 for strips
    readOutSide              +1 (readout at the high edge); not a model input
    covXX, covXY, covYX, covYY  mm^2: XX along the measured (bending) direction, YY along the wire/strip
    channel                  tube number within the chamber, or phi-strip number
    layer                    1..8 (MDT), 1..3 (trigger) within the station
    stationPhi               1..16 sector; stationEta: signed chamber (barrel) or ring (endcap) number
    stationIndex             0/2/4 barrel, 13/17/19 endcap; technology: 0 MDT, 2 RPC, 3 TGC
    truthLink                row of the muon in `tracks`, -1 for background

So eta comes from where the hits sit in r-z, phi from the trigger strips (and coarsely from the sector of
the tubes), and q/pT from the curvature seen in the precise tube coordinates across stations.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import h5py
import numpy as np
import yaml

from hepreg.data.layout import HIT_COLUMNS, TRACK_COLUMNS
from hepreg.errors import DataError
from hepreg.physics.detector import (
    C_LIGHT, CHAMBERS_PER_SIDE, DRIFT_SIGMA, MAX_DRIFT_TIME, N_SECTORS, SECTOR, SECTOR_COS, SECTOR_SIN, ST_CHAMBER,
    ST_HI, ST_INDEX, ST_LO, STRIP_PITCH, SURF_BARREL, SURF_LAYER, SURF_POS, SURF_STATION, SURF_TECH, TECH_MDT, TECH_RPC,
    TECH_TGC, TRIGGER_EFFICIENCY, TUBE_EFFICIENCY, TUBE_PITCH, TUBE_RADIUS, in_acceptance, propagate,
    scattering_widths)
from hepreg.runs.files import check_replaceable, replace_dir, stage_lock
from hepreg.runs.progress import progress

GENERATOR = "hepreg toy spectrometer"  # metadata.yaml generator.name: the mark `--overwrite` looks for


# ---- presets --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Params:
    noise_mean: float = 100.0  # mean background hits per event (log-normal, long tail)
    noise_sigma: float = 0.8  # log-normal width of the background count
    max_tracks: int = 2  # muons per event: uniform in 1..max_tracks
    pt_min: float = 3.0  # GeV
    pt_max: float = 300.0
    pt_index: float = 1.5  # dN/dpT ~ pT^-index
    eta_max: float = 2.7
    max_hits: int = 600  # cap on hits per event (after background)
    events_per_file: int = 100_000


PRESETS: dict[str, Params] = {
    "default": Params(),  # high-luminosity occupancy after hit filtering; every benchmark uses it
    "light": Params(noise_mean=15.0, max_hits=200),  # quick CPU demos
}
SUBCHUNK = 4096  # events simulated at once, each sub-chunk of each file with its own random stream
TILE_EVENTS = 16  # HDF5 chunk = 16 events x 64 hits x all features (lzf); padding-only chunks are not stored


# ---- muons ----------------------------------------------------------------------------------------------
@dataclass
class Muons:
    event: np.ndarray  # [K] event of each muon within the sub-chunk
    slot: np.ndarray  # [K] its row in `tracks`
    pt: np.ndarray
    eta: np.ndarray
    phi: np.ndarray
    q: np.ndarray


def _sample_muons(rng: np.random.Generator, n: int, prm: Params) -> Muons:
    count = rng.integers(1, prm.max_tracks + 1, size=n)
    event = np.repeat(np.arange(n), count)
    slot = np.arange(len(event)) - np.repeat(np.cumsum(count) - count, count)
    k = len(event)
    a, b, g = prm.pt_min, prm.pt_max, 1.0 - prm.pt_index  # inverse CDF of a power law
    u = rng.random(k)
    pt = (a ** g + u * (b ** g - a ** g)) ** (1.0 / g) if g != 0 else a * (b / a) ** u
    eta = rng.uniform(-prm.eta_max, prm.eta_max, k)
    phi = rng.uniform(-np.pi, np.pi, k)
    q = rng.choice(np.array([-1.0, 1.0]), k)
    return Muons(event, slot, pt, eta, phi, q)


def _draw_kinks(rng: np.random.Generator, mu: Muons) -> np.ndarray:
    """Each muon's three multiple-scattering kinks [K, 3] (calorimeter polar, azimuthal, spectrometer polar)."""
    theta = 2 * np.arctan(np.exp(-mu.eta))
    sin_t = np.sin(theta)
    calo, _, spectro = scattering_widths(mu.pt / sin_t, sin_t)
    kink_theta = rng.normal(size=len(sin_t)) * calo
    kink_phi = rng.normal(size=len(sin_t)) * calo / sin_t  # a transverse-plane angle
    kink_mid = rng.normal(size=len(sin_t)) * spectro
    return np.stack([kink_theta, kink_phi, kink_mid], -1)


def _muon_hits(rng: np.random.Generator, mu: Muons, kinks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Propagate every muon through every layer. Returns (hit rows [H, F] float32, event of each hit [H])."""
    theta = 2 * np.arctan(np.exp(-mu.eta))
    col = lambda x: x[:, None]  # noqa: E731  [K] -> [K, 1] against the layers [S]
    c = propagate(col(mu.q / mu.pt), col(theta), col(mu.phi), *(col(k) for k in kinks.T), SURF_BARREL, SURF_POS)
    ok = in_acceptance(c, SURF_STATION, SURF_BARREL) & c.ok
    tech = SURF_TECH
    eff = np.where(tech == TECH_MDT, TUBE_EFFICIENCY, TRIGGER_EFFICIENCY)
    ok &= rng.random(ok.shape) < eff
    tof = c.path / C_LIGHT

    k_idx, s_idx = np.nonzero(ok)
    ki = (k_idx, s_idx)
    is_mdt = tech[s_idx] == TECH_MDT
    off = (SURF_LAYER[s_idx] % 2) * TUBE_PITCH / 2
    prec = c.prec[ki]
    wire = np.round((prec - off) / TUBE_PITCH) * TUBE_PITCH + off
    drift = np.abs(prec - wire) * c.cos_normal[ki]
    drift = np.clip(drift + rng.normal(0, DRIFT_SIGMA, len(s_idx)), 0.0, TUBE_RADIUS)
    strip = lambda x: (np.floor(x / STRIP_PITCH) + 0.5) * STRIP_PITCH  # noqa: E731  centre of the strip hit
    time = tof[ki] + np.where(is_mdt, MAX_DRIFT_TIME * drift / TUBE_RADIUS + rng.normal(0, 1.0, len(s_idx)),
                              rng.normal(0, 1.5, len(s_idx)))
    zsign = np.where(np.cos(theta) >= 0, 1.0, -1.0)  # endcap side of each muon
    feats = _records(s_idx, c.sector[ki].astype(np.int64), np.where(SURF_BARREL[s_idx], 1.0, zsign[k_idx]),
                     np.where(is_mdt, wire, strip(prec)), strip(c.along[ki]), np.where(is_mdt, drift, 0.0),
                     time, mu.slot[k_idx])
    return feats, mu.event[k_idx]


# ---- hit records ----------------------------------------------------------------------------------------
def _records(si, sector, zsign, prec, along, drift, time, link) -> np.ndarray:
    """Hit rows [n, F] float32 in HIT_COLUMNS order.

    si: layer (SURFACES row); prec: wire position (MDT) or strip centre in the bending coordinate; along:
    strip centre along the wire direction (ignored for MDT, whose edges are the wire ends); zsign: endcap side.
    """
    barrel, st, is_mdt = SURF_BARREL[si], SURF_STATION[si], SURF_TECH[si] == TECH_MDT
    cos_c, sin_c = SECTOR_COS[sector], SECTOR_SIN[sector]
    pos = SURF_POS[si]
    y = np.where(barrel, pos, prec)  # distance from the beam line along the sector centre
    z = np.where(barrel, prec, zsign * pos)
    half = y * np.tan(SECTOR / 2)  # half length of a wire across the sector
    out = np.empty((len(si), len(HIT_COLUMNS)), dtype=np.float32)
    col = HIT_COLUMNS.index
    for edge, sign in (("Low", -1.0), ("High", 1.0)):
        t = np.where(is_mdt, sign * half, along)
        out[:, col(f"spacePoint_globEdge{edge}X")] = y * cos_c - t * sin_c
        out[:, col(f"spacePoint_globEdge{edge}Y")] = y * sin_c + t * cos_c
        out[:, col(f"spacePoint_globEdge{edge}Z")] = z
    # chamber (barrel, along |z|) or ring (endcap, along r) number, signed by the side
    lo, size = ST_LO[st], ST_CHAMBER[st]
    x = np.where(barrel, np.abs(prec), prec)
    chamber = np.clip(np.floor((x - lo) / size), 0, CHAMBERS_PER_SIDE - 1)
    out[:, col("spacePoint_time")] = time
    out[:, col("spacePoint_driftR")] = drift
    out[:, col("spacePoint_readOutSide")] = 1.0
    out[:, col("spacePoint_covXX")] = np.where(is_mdt, DRIFT_SIGMA ** 2, STRIP_PITCH ** 2 / 12)
    out[:, col("spacePoint_covXY")] = 0.0
    out[:, col("spacePoint_covYX")] = 0.0
    out[:, col("spacePoint_covYY")] = np.where(is_mdt, (2 * half) ** 2 / 12, STRIP_PITCH ** 2 / 12)
    out[:, col("spacePoint_channel")] = np.where(is_mdt, np.floor((x - lo - chamber * size) / TUBE_PITCH) + 1,
                                                 np.floor(along / STRIP_PITCH) + 1000)
    out[:, col("spacePoint_layer")] = SURF_LAYER[si]
    out[:, col("spacePoint_stationPhi")] = sector + 1
    out[:, col("spacePoint_stationEta")] = np.where(barrel, np.sign(prec + 1e-9), zsign) * (chamber + 1)
    out[:, col("spacePoint_stationIndex")] = ST_INDEX[st]
    out[:, col("spacePoint_technology")] = np.where(is_mdt, TECH_MDT, np.where(barrel, TECH_RPC, TECH_TGC))
    out[:, col("spacePoint_truthLink")] = link
    return out


def _noise_hits(rng: np.random.Generator, count: int) -> np.ndarray:
    """`count` uncorrelated background hits: random tubes (90 %) and random strip pairs (10 %)."""
    mdt_surf = np.nonzero(SURF_TECH == TECH_MDT)[0]
    trig_surf = np.nonzero(SURF_TECH != TECH_MDT)[0]
    is_mdt = rng.random(count) < 0.9
    si = np.where(is_mdt, rng.choice(mdt_surf, count), rng.choice(trig_surf, count))
    barrel, st = SURF_BARREL[si], SURF_STATION[si]
    lo, hi = ST_LO[st], ST_HI[st]
    zsign = rng.choice(np.array([-1.0, 1.0]), count)
    prec = np.where(barrel, zsign * rng.uniform(lo, hi), rng.uniform(lo, hi))
    off = (SURF_LAYER[si] % 2) * TUBE_PITCH / 2
    wire = np.round((prec - off) / TUBE_PITCH) * TUBE_PITCH + off
    strip = (np.floor(prec / STRIP_PITCH) + 0.5) * STRIP_PITCH
    width = np.where(barrel, SURF_POS[si], prec) * np.tan(SECTOR / 2)
    along = (np.floor(rng.uniform(-width, width) / STRIP_PITCH) + 0.5) * STRIP_PITCH
    drift = np.where(is_mdt, rng.uniform(0, TUBE_RADIUS, count), 0.0)
    return _records(si, rng.integers(0, N_SECTORS, count), zsign, np.where(is_mdt, wire, strip), along, drift,
                    rng.uniform(0, 1200.0, count), np.full(count, -1.0))


# ---- events ---------------------------------------------------------------------------------------------
def simulate(rng: np.random.Generator, n: int, prm: Params):
    """Simulate n events. Returns hit rows [H, F] float32 grouped by event (random order within an event),
    num_hits [n] int16, tracks [n, max_tracks, 4] float32 NaN-padded and num_tracks [n] int16."""
    mu = _sample_muons(rng, n, prm)
    mfeat, mev = _muon_hits(rng, mu, _draw_kinks(rng, mu))
    n_mu_hits = np.bincount(mev, minlength=n)
    mean, sig = prm.noise_mean, prm.noise_sigma
    draw = np.floor(rng.lognormal(np.log(max(mean, 1e-9)) - sig ** 2 / 2, sig, n)).astype(np.int64)
    n_noise = np.clip(np.minimum(draw if mean > 0 else 0, prm.max_hits - n_mu_hits), 0, None)
    feats = np.concatenate([mfeat, _noise_hits(rng, int(n_noise.sum()))])
    event = np.concatenate([mev, np.repeat(np.arange(n), n_noise)])
    order = np.argsort(event + rng.random(len(event)), kind="stable")  # by event, random within the event
    tracks = np.full((n, prm.max_tracks, len(TRACK_COLUMNS)), np.nan, dtype=np.float32)
    tracks[mu.event, mu.slot] = np.stack([mu.pt, mu.eta, mu.phi, mu.q], axis=1)
    num_tracks = np.bincount(mu.event, minlength=n)
    return feats[order], (n_mu_hits + n_noise).astype(np.int16), tracks, num_tracks.astype(np.int16)


def pad_hits(feats: np.ndarray, num_hits: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Scatter event-grouped hit rows into out[:len(num_hits), :max] (NaN elsewhere); returns that view."""
    n, m = len(num_hits), int(num_hits.max(initial=0))
    view = out[:n, :m]
    view.fill(np.nan)
    counts = num_hits.astype(np.int64)
    pos = np.arange(len(feats)) - np.repeat(np.cumsum(counts) - counts, counts)
    view[np.repeat(np.arange(n), counts), pos] = feats
    return view


def _resolve(preset: str, **overrides) -> Params:
    if preset not in PRESETS:
        raise DataError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    prm = replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
    checks = [
        (prm.noise_mean >= 0, "noise_mean must be >= 0"),
        (1 <= prm.max_tracks <= 100, "max_tracks must be in 1..100"),
        (0 < prm.pt_min < prm.pt_max, "need 0 < pt_min < pt_max"),
        (0 < prm.eta_max <= 4.0, "eta_max must be in (0, 4]"),
        (prm.events_per_file >= 1, "events_per_file must be >= 1"),
    ]
    for ok, msg in checks:
        if not ok:
            raise DataError(f"generate: {msg} (got {prm})")
    return prm


def _write_chunk_file(path: Path, file_index: int, first_event: int, n: int, seed: int, prm: Params,
                      advance) -> int:
    """Write one HDF5 chunk file of n events, simulated in sub-chunks; returns its padded hit size."""
    F = len(HIT_COLUMNS)
    with h5py.File(path, "w") as f:
        hits = f.create_dataset("hits", shape=(n, prm.max_hits, F), maxshape=(n, prm.max_hits, F),
                                dtype="f4", chunks=(min(n, TILE_EVENTS), 64, F), fillvalue=np.nan,
                                compression="lzf")
        tracks = f.create_dataset("tracks", shape=(n, prm.max_tracks, len(TRACK_COLUMNS)), dtype="f4")
        num_hits = f.create_dataset("num_hits", shape=(n,), dtype="i2")
        num_tracks = f.create_dataset("num_tracks", shape=(n,), dtype="i2")
        f.create_dataset("event_numbers", data=np.arange(first_event, first_event + n, dtype=np.int64))
        m_file = 0
        buf = np.empty((min(n, SUBCHUNK), prm.max_hits, F), dtype=np.float32)
        for a in range(0, n, SUBCHUNK):
            b = min(n, a + SUBCHUNK)
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, file_index, a // SUBCHUNK])))
            feats, nh, t, nt = simulate(rng, b - a, prm)
            padded = pad_hits(feats, nh, buf)
            for t0 in range(0, b - a, TILE_EVENTS):  # write each tile only as wide as its largest event,
                t1 = min(b - a, t0 + TILE_EVENTS)    # so chunks that are all padding are never stored
                w = int(nh[t0:t1].max())
                hits[a + t0:a + t1, :w] = padded[t0:t1, :w]
            tracks[a:b], num_hits[a:b], num_tracks[a:b] = t, nh, nt
            m_file = max(m_file, padded.shape[1])
            advance(b - a)
        hits.resize(max(m_file, 1), axis=1)
    return m_file


def generate(out, *, events: int, seed: int, preset: str = "default", noise_mean: float | None = None,
             max_tracks: int | None = None, pt_min: float | None = None, pt_max: float | None = None,
             eta_max: float | None = None, events_per_file: int | None = None, overwrite: bool = False) -> Path:
    """Write `events` synthetic events to the dataset directory `out` (ATLAS-muon HDF5 layout).

    Written under a temporary name and renamed when complete, so `out` is either absent or whole. The same
    seed and options give byte-identical arrays.
    """
    out = Path(out)
    if events < 1:
        raise DataError(f"generate: --events must be >= 1 (got {events})")
    prm = _resolve(preset, noise_mean=noise_mean, max_tracks=max_tracks, pt_min=pt_min, pt_max=pt_max,
                   eta_max=eta_max, events_per_file=events_per_file)
    if out.exists() and not overwrite:
        raise DataError(f"{out} already exists; pass --overwrite to replace it")
    check_replaceable(out, generated_dataset_problem, "dataset directories")
    with stage_lock(out.parent, name=f".{out.name}.lock"):
        return _generate(out, events, seed, preset, prm)


def generated_dataset_problem(path: Path) -> str | None:
    """None when `path` is a dataset `hepreg generate` wrote and holds nothing else; else what is not so."""
    try:
        meta = yaml.safe_load((path / "metadata.yaml").read_text())
        generator = meta["generator"]["name"]
        files = {e["h5_file"] for e in meta["event_mapping"]["chunk_summary"]}
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        return f"no metadata.yaml of a generated dataset: {type(e).__name__} {e}"
    if generator != GENERATOR:
        return f"metadata.yaml names the generator {generator!r}"
    other = sorted(p.name for p in path.iterdir()
                   if p.name not in files | {"metadata.yaml", "event_file_indices.npy", "event_row_indices.npy"})
    if other:
        return f"it also holds {', '.join(other[:5])}{' ...' if len(other) > 5 else ''}"
    return None


def _generate(out: Path, events: int, seed: int, preset: str, prm) -> Path:
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    summary, file_idx, row_idx = [], [], []
    try:
        with progress() as bar:
            task = bar.add_task(f"generate {out.name}", total=events)
            for i, first in enumerate(range(0, events, prm.events_per_file)):
                n = min(prm.events_per_file, events - first)
                name = f"chunk_{i:05d}.h5"
                _write_chunk_file(tmp / name, i, first, n, seed, prm, lambda k: bar.update(task, advance=k))
                summary.append({"h5_file": name, "event_count": n})
                file_idx.append(np.full(n, i, dtype=np.int32))
                row_idx.append(np.arange(n, dtype=np.int32))
        np.save(tmp / "event_file_indices.npy", np.concatenate(file_idx))
        np.save(tmp / "event_row_indices.npy", np.concatenate(row_idx))
        meta = {
            "hit_features": list(HIT_COLUMNS),
            "track_features": list(TRACK_COLUMNS),
            "event_mapping": {"num_events": events, "chunk_summary": summary},
            "generator": {"name": GENERATOR, "preset": preset, "seed": seed,
                          **{k: getattr(prm, k) for k in Params.__dataclass_fields__}},
        }
        (tmp / "metadata.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            check_replaceable(out, generated_dataset_problem, "dataset directories")
            os.replace(out, old)
            os.replace(tmp, out)
            replace_dir(old, generated_dataset_problem, "dataset directories")
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
