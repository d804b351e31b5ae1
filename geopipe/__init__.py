"""geopipe — generative image geolocation with cached embedding stores.

One import root with four layers (arrows mean "may import")::

    geopipe.flows ──► geopipe.stages ──► geopipe.pipeline ──► geopipe.schemas

The folders ``flows/``, ``stages/``, ``pipeline/`` and ``schemas/`` at the top of the
repository are installed as these subpackages (see ``pyproject.toml``).
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("geopipe")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
