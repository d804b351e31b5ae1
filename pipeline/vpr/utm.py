"""UTM ↔ WGS 84 latitude/longitude on the ellipsoid (numpy, float64), no projection library.

Transverse Mercator by Krüger's series in the third flattening n to order n⁶ (Karney 2011,
"Transverse Mercator with an accuracy of a few nanometers", J. Geodesy 85: eqs. 7–11 and 35–36
in the notation below): errors stay under a micrometre within a zone and a few millimetres
6° beyond it. UTM: scale k0 = 0.9996 on the central meridian (zone z: −183° + 6z), false
easting 500 km, false northing 0 (north) or 10,000 km (south); zones 1–60 of 6° with the
Norway (32V) and Svalbard (31X–37X) exceptions; latitude bands C–X (no I, O) of 8° (X: 12°).

Units: metres for easting/northing, degrees for latitude/longitude. The functions broadcast;
zone numbers are integers, letters one-character strings ("N"…"X" north of the equator).
"""

from __future__ import annotations

import numpy as np

__all__ = ["WGS84_A", "WGS84_F", "UTM_K0", "BANDS", "utm_zone", "utm_band", "is_north", "latlon_to_utm", "utm_to_latlon"]

WGS84_A = 6378137.0
WGS84_F = 1 / 298.257223563
UTM_K0 = 0.9996
_FALSE_E, _FALSE_N_SOUTH = 500000.0, 10000000.0
#: Latitude band letters from 80° S (C) to 84° N (X).
BANDS = "CDEFGHJKLMNPQRSTUVWX"

_N = WGS84_F / (2 - WGS84_F)
_E = np.sqrt(WGS84_F * (2 - WGS84_F))  # first eccentricity
_A_RECT = WGS84_A / (1 + _N) * (1 + _N**2 / 4 + _N**4 / 64 + _N**6 / 256)  # rectifying radius
_n = _N
_ALPHA = (  # Krüger's forward coefficients α1..α6
    _n / 2 - 2 * _n**2 / 3 + 5 * _n**3 / 16 + 41 * _n**4 / 180 - 127 * _n**5 / 288 + 7891 * _n**6 / 37800,
    13 * _n**2 / 48 - 3 * _n**3 / 5 + 557 * _n**4 / 1440 + 281 * _n**5 / 630 - 1983433 * _n**6 / 1935360,
    61 * _n**3 / 240 - 103 * _n**4 / 140 + 15061 * _n**5 / 26880 + 167603 * _n**6 / 181440,
    49561 * _n**4 / 161280 - 179 * _n**5 / 168 + 6601661 * _n**6 / 7257600,
    34729 * _n**5 / 80640 - 3418889 * _n**6 / 1995840,
    212378941 * _n**6 / 319334400,
)
_BETA = (  # and the inverse ones β1..β6
    _n / 2 - 2 * _n**2 / 3 + 37 * _n**3 / 96 - _n**4 / 360 - 81 * _n**5 / 512 + 96199 * _n**6 / 604800,
    _n**2 / 48 + _n**3 / 15 - 437 * _n**4 / 1440 + 46 * _n**5 / 105 - 1118711 * _n**6 / 3870720,
    17 * _n**3 / 480 - 37 * _n**4 / 840 - 209 * _n**5 / 4480 + 5569 * _n**6 / 90720,
    4397 * _n**4 / 161280 - 11 * _n**5 / 504 - 830251 * _n**6 / 7257600,
    4583 * _n**5 / 161280 - 108847 * _n**6 / 3991680,
    20648693 * _n**6 / 638668800,
)


def utm_zone(lat, lon) -> np.ndarray:
    """UTM zone number(s) 1–60 of degree coordinates, with the Norway and Svalbard exceptions."""
    lat, lon = np.broadcast_arrays(np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64))
    lon = (lon + 180.0) % 360.0 - 180.0
    zone = np.clip(np.floor((lon + 180.0) / 6.0).astype(np.int64) + 1, 1, 60)
    zone = np.where((lat >= 56) & (lat < 64) & (lon >= 3) & (lon < 12), 32, zone)
    sval = (lat >= 72) & (lat < 84)
    for lo, hi, z in ((0, 9, 31), (9, 21, 33), (21, 33, 35), (33, 42, 37)):
        zone = np.where(sval & (lon >= lo) & (lon < hi), z, zone)
    return zone


def utm_band(lat) -> np.ndarray:
    """Latitude band letter(s) (:data:`BANDS`; latitudes beyond 80° S / 84° N get the end bands)."""
    i = np.clip(np.floor((np.asarray(lat, dtype=np.float64) + 80.0) / 8.0).astype(np.int64), 0, len(BANDS) - 1)
    return np.asarray(list(BANDS), dtype="<U1")[i]


def is_north(letter) -> np.ndarray:
    """Whether band letter(s) lie in the northern hemisphere ("N" and later)."""
    return np.char.upper(np.asarray(letter, dtype=str)) >= "N"


def _central_meridian(zone) -> np.ndarray:
    return np.deg2rad(-183.0 + 6.0 * np.asarray(zone, dtype=np.float64))


def latlon_to_utm(lat, lon, zone=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Degrees → (easting m, northing m, zone, band letter). ``zone``: project into this zone
    instead of the point's own (a neighbour zone keeps one grid across a boundary)."""
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    zone = utm_zone(lat, lon) if zone is None else np.broadcast_to(np.asarray(zone, dtype=np.int64), np.broadcast(lat, lon).shape)
    phi, lam = np.deg2rad(lat), np.deg2rad(lon) - _central_meridian(zone)
    lam = (lam + np.pi) % (2 * np.pi) - np.pi
    s = np.sin(phi)
    t = np.sinh(np.arctanh(s) - _E * np.arctanh(_E * s))  # tan of the conformal latitude
    xi_p = np.arctan2(t, np.cos(lam))
    eta_p = np.arctanh(np.sin(lam) / np.sqrt(1 + t * t))
    xi, eta = xi_p.copy(), eta_p.copy()
    for j, a in enumerate(_ALPHA, start=1):
        xi += a * np.sin(2 * j * xi_p) * np.cosh(2 * j * eta_p)
        eta += a * np.cos(2 * j * xi_p) * np.sinh(2 * j * eta_p)
    easting = _FALSE_E + UTM_K0 * _A_RECT * eta
    northing = UTM_K0 * _A_RECT * xi + np.where(lat < 0, _FALSE_N_SOUTH, 0.0)
    return easting, northing, zone, utm_band(lat)


def _tau_from_conformal(tau_p: np.ndarray) -> np.ndarray:
    """tan φ from tan χ (conformal latitude) by Newton's method (Karney 2011, eqs. 19–21)."""
    tau = tau_p / (1 - _E**2)
    for _ in range(5):  # quadratic convergence: 2-3 steps reach float64 rounding
        sigma = np.sinh(_E * np.arctanh(_E * tau / np.sqrt(1 + tau * tau)))
        tp = tau * np.sqrt(1 + sigma * sigma) - sigma * np.sqrt(1 + tau * tau)
        df = (1 - _E**2) * np.sqrt(1 + tp * tp) * np.sqrt(1 + tau * tau) / (1 + (1 - _E**2) * tau * tau)
        tau = tau - (tp - tau_p) / df
    return tau


def utm_to_latlon(easting, northing, zone, letter) -> tuple[np.ndarray, np.ndarray]:
    """(easting m, northing m, zone 1–60, band letter or "N"/"S" hemisphere) → (lat, lon) degrees,
    longitude wrapped to [−180, 180)."""
    e = np.asarray(easting, dtype=np.float64)
    n = np.asarray(northing, dtype=np.float64) - np.where(is_north(letter), 0.0, _FALSE_N_SOUTH)
    xi, eta = n / (UTM_K0 * _A_RECT), (e - _FALSE_E) / (UTM_K0 * _A_RECT)
    xi_p, eta_p = xi.copy(), eta.copy()
    for j, b in enumerate(_BETA, start=1):
        xi_p = xi_p - b * np.sin(2 * j * xi) * np.cosh(2 * j * eta)
        eta_p = eta_p - b * np.cos(2 * j * xi) * np.sinh(2 * j * eta)
    tau_p = np.sin(xi_p) / np.sqrt(np.sinh(eta_p) ** 2 + np.cos(xi_p) ** 2)
    lam = np.arctan2(np.sinh(eta_p), np.cos(xi_p))
    lat = np.rad2deg(np.arctan(_tau_from_conformal(tau_p)))
    lon = np.rad2deg(lam + _central_meridian(zone))
    return lat, (lon + 180.0) % 360.0 - 180.0
