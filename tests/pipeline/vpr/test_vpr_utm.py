"""UTM ↔ WGS 84 by Krüger's series against PROJ's numbers (pyproj 3.8, EPSG:326zz/327zz), round
trips and the zone/band rules."""

import numpy as np
import pytest

from geopipe.pipeline.vpr.utm import is_north, latlon_to_utm, utm_band, utm_to_latlon, utm_zone

#: (lat, lon, zone, band, easting, northing) as PROJ projects them (transverse Mercator, WGS 84).
PROJ = [
    (51.2, 7.5, 32, "U", 395201.31038158754, 5673135.240771767),
    (40.44533, -79.99512, 17, "T", 585217.1406219255, 4477671.209353265),
    (35.65375, 139.6954, 54, "S", 381904.3726974508, 3946329.141230532),
    (-33.8688, 151.2093, 56, "H", 334368.633648097, 6250948.345385009),
    (0.0, 3.0, 31, "N", 500000.0, 0.0),
    (-0.5, 2.1, 31, "M", 399852.1754591882, 9944728.09849069),
    (60.0, 5.0, 32, "V", 276979.92640100635, 6658157.202407252),  # Norway exception (lon 5° is zone 31 by rule)
    (78.2, 15.6, 33, "X", 513696.94541704346, 8680760.053195585),  # Svalbard exception
    (37.74472, -122.50057, 10, "S", 544000.3243310496, 4177609.1812008014),  # an SF-XL name: @0544000.32@4177609.18@10@S@
    (-54.8, -68.3, 19, "F", 545000.0533637819, 3927239.3813000415),
]


@pytest.mark.parametrize("lat,lon,zone,band,east,north", PROJ)
def test_forward_and_inverse_match_proj(lat, lon, zone, band, east, north):
    e, n, z, b = latlon_to_utm(lat, lon)
    assert (int(z), str(b)) == (zone, band)
    assert abs(float(e) - east) < 1e-6 and abs(float(n) - north) < 1e-6  # micrometres
    la, lo = utm_to_latlon(east, north, zone, band)
    assert abs(float(la) - lat) < 1e-11 and abs(float(lo) - lon) < 1e-11


def test_round_trip_over_zones_and_hemispheres():
    rng = np.random.default_rng(0)
    lat, lon = rng.uniform(-79.9, 83.9, 5000), rng.uniform(-180, 180, 5000)
    e, n, z, b = latlon_to_utm(lat, lon)
    la, lo = utm_to_latlon(e, n, z, b)
    assert np.abs(la - lat).max() < 1e-9 and np.abs((lo - lon + 180) % 360 - 180).max() < 1e-9
    assert (np.abs(e - 500000) < 700000).all() and (n >= 0).all() and (n <= 10_000_000).all()


def test_central_meridian_and_scale():
    """On the central meridian at the equator: easting 500 km exactly; 1° of latitude there is
    k0 × the meridian arc (110,574.389 m on WGS 84)."""
    e, n, _, _ = latlon_to_utm(1.0, -75.0)
    assert abs(float(e) - 500000.0) < 1e-6
    assert abs(float(n) - 0.9996 * 110574.389) < 0.01


def test_zone_band_hemisphere_rules():
    assert utm_zone(0.0, -180.0) == 1 and utm_zone(0.0, 179.99) == 60 and utm_zone(0.0, 180.0) == 1
    assert utm_zone(56.5, 4.0) == 32 and utm_zone(55.5, 4.0) == 31 and utm_zone(80.0, 10.0) == 33 and utm_zone(80.0, 8.0) == 31
    assert list(utm_band([-80.0, -0.1, 0.0, 71.9, 72.0, 84.0])) == ["C", "M", "N", "W", "X", "X"]
    assert list(is_north(["M", "N", "x", "c"])) == [False, True, True, False]
