"""geopipe — generative image geolocation with cached embedding stores.

Geolocate photos from Python::

    from geopipe import Geolocator
    geo = Geolocator.load("data/demo/model")        # a `geopipe train` checkpoint, or "hf-hub:nicolas-dufour/PLONK_YFCC"
    res = geo.predict(["photo.jpg"], samples=64, region=0.9)
    res.lat, res.lon, res.region(0.9), res.to_geodataframe()

One import root with four layers (arrows mean "may import")::

    geopipe.flows ──► geopipe.stages ──► geopipe.pipeline ──► geopipe.schemas

The folders ``flows/``, ``stages/``, ``pipeline/`` and ``schemas/`` at the top of the
repository are installed as these subpackages (see ``pyproject.toml``). ``import geopipe`` stays
light: the API names below load torch only when first used.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

#: The distribution name on the package index (the ``geopipe`` name there is an unrelated project).
DISTRIBUTION = "geopipe-geolocation"

try:
    __version__ = _version(DISTRIBUTION)
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

#: Public API name → module defining it (imported on first attribute access).
_LAZY = {
    "Geolocator": "geopipe.pipeline.infer.geolocator",
    "GeoPrediction": "geopipe.pipeline.infer.geolocator",
    "HDRRegion": "geopipe.pipeline.infer.regions",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'geopipe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
