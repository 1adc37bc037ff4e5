"""The toy muon spectrometer as one model: geometry, field, material, resolutions, acceptance and propagation.

The generator draws muons through it (`hepreg.data.synthetic`), the fits fit with it (`hepreg.physics.fit`)
and the Cramér–Rao bound differentiates it (`hepreg.physics.bound`): one description, so that what a fit
assumes is what the data are. Torch-free: `propagate` runs on numpy arrays (the generator) or on torch
tensors (the fits), given the matching `ops`.

Geometry (mm; z along the beam, r transverse, phi azimuth; 16 phi sectors of 2*pi/16, sector k centred
at phi = k*2*pi/16, stationPhi = k + 1):

    barrel stations    BI r=5000 |z|<6500   BM r=7500 |z|<9500   BO r=10000 |z|<12500   (stationIndex 0, 2, 4)
    endcap wheels      EI |z|=7500 1000<r<7000   EM |z|=13500 1800<r<12000   EO |z|=21000 2800<r<16000
                                                                                        (stationIndex 13, 17, 19)

Each station holds 8 layers of drift tubes (MDT): two multilayers of 4 at offsets +-150..228 mm from the
station centre, tube pitch 30 mm, odd layers staggered by half a pitch. Within a sector a layer is a plane
(barrel: at distance R from the beam line, normal to the sector's centre direction; endcap: z = +-Z). Tube
wires run across the sector, so a tube measures the bending coordinate (barrel: z; endcap: the distance y
from the beam line along the sector's centre direction) through its drift radius, to 0.1 mm, and nothing
along the wire. Trigger chambers (RPC in the barrel, TGC in the endcap) measure both coordinates with 30 mm
strips.

Field: B_phi = 0.5 T in the shell between {r = 5500 or |z| = 8000} and {r = 9000 or |z| = 12500}; where the
field starts and ends along the path is taken from the initial direction, and inside it the trajectory is
the small-angle parabola of the circle of radius p / (0.3 B) in the muon's r-z plane.
Material: multiple scattering as kinks, with Highland widths: the calorimeter (100 X0, at r = 3500 or
|z| = 6000) in the polar and the azimuthal direction, and the spectrometer (0.3 X0) in the polar direction at
the middle of the field. No energy loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# ---- geometry -------------------------------------------------------------------------------------------
N_SECTORS = 16
SECTOR = 2 * np.pi / N_SECTORS
TUBE_PITCH = 30.0  # mm
TUBE_RADIUS = 14.6  # mm, the largest drift radius
STRIP_PITCH = 30.0  # mm
LAYER_OFFSETS = (-228.0, -202.0, -176.0, -150.0, 150.0, 176.0, 202.0, 228.0)  # MDT layers around a station

# name, barrel?, stationIndex, position (R or |Z|), acceptance low, high (barrel: |z|; endcap: r)
STATIONS = (
    ("BI", True, 0, 5000.0, 0.0, 6500.0),
    ("BM", True, 2, 7500.0, 0.0, 9500.0),
    ("BO", True, 4, 10000.0, 0.0, 12500.0),
    ("EI", False, 13, 7500.0, 1000.0, 7000.0),
    ("EM", False, 17, 13500.0, 1800.0, 12000.0),
    ("EO", False, 19, 21000.0, 2800.0, 16000.0),
)
TRIGGER_LAYERS = (("BM", -350.0), ("BM", 350.0), ("BO", 350.0), ("EM", 500.0), ("EM", 700.0), ("EM", 900.0))
TECH_MDT, TECH_RPC, TECH_TGC = 0, 2, 3
CHAMBERS_PER_SIDE = 6  # barrel chambers along |z| (stationEta), endcap rings along r

# ---- resolutions and efficiencies -----------------------------------------------------------------------
DRIFT_SIGMA = 0.1  # mm, a tube's drift radius
STRIP_SIGMA = STRIP_PITCH / math.sqrt(12)  # mm, a strip's position (uniform across its pitch)
MAX_DRIFT_TIME = 700.0  # ns at the tube wall
C_LIGHT = 299.792458  # mm/ns
TUBE_EFFICIENCY, TRIGGER_EFFICIENCY = 0.95, 0.90

# ---- field and material ---------------------------------------------------------------------------------
B_FIELD = 0.5  # T
FIELD_INNER = (5500.0, 8000.0)  # (r, |z|): B_phi in the shell between the inner and outer surfaces
FIELD_OUTER = (9000.0, 12500.0)
CALO_SURFACE = (3500.0, 6000.0)  # multiple-scattering kink of the calorimeter
CALO_X0, SPECTRO_X0 = 100.0, 0.3  # radiation lengths
MAX_PATH = 1e5  # mm: a crossing further along the path than this is none


def _surfaces():
    """All sensitive layers: (barrel?, station row, technology, layer number, offset from the station)."""
    out = []
    for i, st in enumerate(STATIONS):
        for j, off in enumerate(LAYER_OFFSETS):
            out.append((st[1], i, TECH_MDT, j + 1, off))
    names = [st[0] for st in STATIONS]
    count: dict[str, int] = {}
    for name, off in TRIGGER_LAYERS:
        i = names.index(name)
        count[name] = count.get(name, 0) + 1
        out.append((STATIONS[i][1], i, TECH_RPC if STATIONS[i][1] else TECH_TGC, count[name], off))
    return out


SURFACES = _surfaces()
SURF_BARREL = np.array([x[0] for x in SURFACES])  # [S] per-layer lookup tables
SURF_STATION = np.array([x[1] for x in SURFACES])
SURF_TECH = np.array([x[2] for x in SURFACES])
SURF_LAYER = np.array([x[3] for x in SURFACES], dtype=np.float64)
SURF_POS = np.array([STATIONS[x[1]][3] + x[4] for x in SURFACES])  # R (barrel) or |Z| (endcap)
ST_LO = np.array([x[4] for x in STATIONS])
ST_HI = np.array([x[5] for x in STATIONS])
ST_INDEX = np.array([x[2] for x in STATIONS], dtype=np.float64)
ST_CHAMBER = (ST_HI - ST_LO) / CHAMBERS_PER_SIDE  # length of a chamber (barrel) or ring (endcap)
SECTOR_COS, SECTOR_SIN = np.cos(np.arange(N_SECTORS) * SECTOR), np.sin(np.arange(N_SECTORS) * SECTOR)
BARREL_MAX_INDEX = 10  # stationIndex below it: barrel (0, 2, 4); above: endcap (13, 17, 19)


# ---- array operations: numpy here, torch in hepreg.physics.hits -----------------------------------------
class NumpyOps:
    """The handful of array functions `propagate` needs, for numpy arrays."""
    where = staticmethod(np.where)
    minimum = staticmethod(np.minimum)
    abs = staticmethod(np.abs)
    sqrt = staticmethod(np.sqrt)
    sin = staticmethod(np.sin)
    cos = staticmethod(np.cos)
    tan = staticmethod(np.tan)
    isfinite = staticmethod(np.isfinite)
    round = staticmethod(np.round)
    mod = staticmethod(np.mod)

    @staticmethod
    def clip(x, lo, hi=None):
        return np.clip(x, lo, hi)

    @staticmethod
    def hypot(a, b):
        return np.hypot(a, b)


NUMPY = NumpyOps()


# ---- physics --------------------------------------------------------------------------------------------
def highland(p, x0: float):
    """Highland formula: rms plane scattering angle [rad] for momentum p [GeV] through x0 radiation lengths."""
    return 0.0136 / p * math.sqrt(x0) * (1 + 0.038 * math.log(x0))


def scattering_widths(p, sin_theta):
    """The widths of the three kinks of a muon of momentum p [GeV]: calorimeter polar, calorimeter azimuthal
    (a transverse-plane angle: the plane angle over sin theta) and spectrometer polar, in rad."""
    calo = highland(p, CALO_X0)
    return calo, calo / sin_theta, highland(p, SPECTRO_X0)


def shell_path(theta, surface: tuple[float, float], ops=NUMPY):
    """Path length from the origin to a surface {r = R or |z| = Z} along polar angle theta."""
    s, c = ops.abs(ops.sin(theta)), ops.abs(ops.cos(theta))
    with np.errstate(divide="ignore"):
        return ops.minimum(surface[0] / s, surface[1] / c)


def curvature(qpt, theta, ops=NUMPY):
    """Signed curvature [1/mm] in the r-z plane: q / R with R = p / (0.3 B), p = pT / sin(theta)."""
    return 0.3e-3 * B_FIELD * qpt * ops.abs(ops.sin(theta))


def field_deflection(s, s_in, s_out, kappa, ops=NUMPY):
    """Deflection normal to the initial direction after path s: parabola in the field, tangent line after."""
    inside = ops.clip(ops.minimum(s, s_out) - s_in, 0.0)
    after = ops.clip(s - s_out, 0.0)
    return 0.5 * kappa * inside ** 2 + kappa * ops.clip(s_out - s_in, 0.0) * after


def sector_of(phi, ops=NUMPY):
    """The phi sector (0..15) a direction points into."""
    return ops.mod(ops.round(phi / SECTOR), N_SECTORS)


def wrap(a, ops=NUMPY):
    return ops.mod(a + np.pi, 2 * np.pi) - np.pi


@dataclass
class Crossing:
    """Where a muon crosses a layer, each [..., S]: the coordinates a hit there measures, and what sets them."""
    prec: object        # mm, the bending coordinate a tube or strip measures (barrel: z; endcap: y)
    along: object       # mm, the coordinate along the wire (strips measure it)
    y: object           # mm, distance from the beam line along the sector's centre direction
    z: object           # mm
    r: object           # mm, transverse distance from the beam line
    phi: object         # azimuth at the crossing
    sector: object      # the sector whose plane was crossed (given, or the one the muon is in)
    cos_normal: object  # |direction . layer normal| in the r-z plane: a tube's drift radius is |prec - wire| x it
    path: object        # mm along the initial direction
    ok: object          # a crossing was found


def propagate(qpt, theta, phi, kink_theta, kink_phi, kink_mid, barrel, pos, sector=None, ops=NUMPY,
              newton_steps: int = 5, path=None) -> Crossing:
    """The muon (q/pT [1/GeV], polar angle, azimuth, three scattering kinks [rad], each [..., 1]) at the
    layers (barrel? and position R or |Z| [mm], each broadcastable to [..., S]).

    `sector` [..., S] is the sector whose plane is crossed (a hit's own sector, for fits); None takes the one
    the muon is in (the generator). The crossing is found by Newton steps along the path from the origin, or
    from `path` (the crossing of a nearby track: one step is then enough)."""
    sin_t, cos_t = ops.sin(theta), ops.cos(theta)
    kappa = curvature(qpt, theta, ops)
    s_calo, s_in, s_out = (shell_path(theta, x, ops) for x in (CALO_SURFACE, FIELD_INNER, FIELD_OUTER))
    s_mid = 0.5 * (s_in + s_out)
    rho_calo = s_calo * sin_t

    def deflection(s):  # displacement along n = (-cos, sin) in (r, z), and its derivative
        d = (field_deflection(s, s_in, s_out, kappa, ops)
             + kink_theta * ops.clip(s - s_calo, 0, None)
             + kink_mid * ops.clip(s - s_mid, 0, None))
        dd = (kappa * ops.clip(ops.minimum(s, s_out) - s_in, 0, None)
              + kink_theta * (s > s_calo) + kink_mid * (s > s_mid))
        return d, dd

    def phi_at(rho):  # azimuth after the calorimeter kink, at transverse distance rho
        with np.errstate(divide="ignore", invalid="ignore"):
            return phi + kink_phi * ops.clip(1 - rho_calo / rho, 0, None)

    side = ops.where(cos_t >= 0, 1.0, -1.0)  # endcap side
    # Barrel: the plane at distance R in the sector is crossed at rho = R / cos(delta).
    phi_b = phi_at(pos + 0 * phi)
    sector_b = sector_of(phi_b, ops) if sector is None else sector
    delta_b = wrap(phi_b - sector_b * SECTOR, ops)
    rho_target = pos / ops.cos(delta_b)
    # Endcap: the plane z = side * Z.
    z_target = side * pos
    s = ops.where(barrel, rho_target / ops.clip(sin_t, 1e-6, None),
                  z_target / ops.where(ops.abs(cos_t) < 1e-6, 1e-6, cos_t))
    s = ops.clip(s, 0.0, MAX_PATH) if path is None else path
    for _ in range(newton_steps):  # Newton steps on r(s) = rho (barrel) or z(s) = Z (endcap)
        d, dd = deflection(s)
        f = ops.where(barrel, s * sin_t - d * cos_t - rho_target, s * cos_t + d * sin_t - z_target)
        df = ops.where(barrel, sin_t - dd * cos_t, cos_t + dd * sin_t)
        s = ops.clip(s - f / ops.where(ops.abs(df) < 1e-6, 1e-6, df), 0.0, MAX_PATH)
    d, dd = deflection(s)
    r = s * sin_t - d * cos_t
    z = s * cos_t + d * sin_t
    dr, dz = sin_t - dd * cos_t, cos_t + dd * sin_t  # direction in the r-z plane
    norm = ops.hypot(dr, dz)
    phi_c = phi_at(r)
    sec = sector_of(phi_c, ops) if sector is None else sector
    delta = wrap(phi_c - sec * SECTOR, ops)
    y = r * ops.cos(delta)  # distance from the beam line along the sector centre (endcap coordinate)
    prec = ops.where(barrel, z, y)  # the bending coordinate a tube measures
    along = ops.where(barrel, pos, y) * ops.tan(delta)  # coordinate along the wire
    ok = (s > 0) & (s < MAX_PATH) & ops.isfinite(prec)
    cos_normal = ops.abs(ops.where(barrel, dr, dz)) / norm
    return Crossing(prec=prec, along=along, y=y, z=z, r=r, phi=phi_c, sector=sec, cos_normal=cos_normal, path=s,
                    ok=ok)


def in_acceptance(crossing: Crossing, station, barrel):
    """Whether each crossing lies on its station's chambers (station rows of STATIONS, [..., S])."""
    coord = np.where(barrel, np.abs(crossing.z), crossing.y)
    return (coord >= ST_LO[station]) & (coord < ST_HI[station])
