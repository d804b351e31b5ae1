"""GeoCLIP's pretrained location encoder and its 100K MP-16 GPS gallery, read from the files the
pip package ``geoclip`` (MIT) ships — without importing or running any of its code.

The package is located with :func:`importlib.util.find_spec` (its ``__init__`` is never
executed, so none of its hub-download paths can run); the weights are read with
``torch.load(weights_only=True)`` (tensors only, never a full unpickle) into
:func:`build_location_encoder`, a re-implementation of GeoCLIP's architecture: the Equal Earth
projection of (lat, lon) degrees, then for each of three scales σ ∈ {2⁰, 2⁴, 2⁸} random Fourier
features ``[cos 2πBv, sin 2πBv]`` (B: (256, 2) fixed), three ReLU layers of 1024 and a linear
head to 512, summed over the scales. Output: (n, 512) float32, not normalised.

:func:`random_location_encoder` builds the same interface with small random weights (tests,
and worlds without the package).
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os

import numpy as np

from geopipe.pipeline.core.errors import GeopipeError

__all__ = ["GEOCLIP_SCALES", "geoclip_dir", "load_gallery", "build_location_encoder", "load_geoclip_encoder",
           "random_location_encoder", "encode_locations"]

#: GeoCLIP's random-Fourier-feature scales σ (per unit of the projected plane).
GEOCLIP_SCALES = (1.0, 16.0, 256.0)
_WEIGHTS = os.path.join("model", "weights", "location_encoder_weights.pth")
_GALLERY = os.path.join("model", "gps_gallery", "coordinates_100K.csv")
# Equal Earth projection constants (Šavrič, Patterson & Jenny 2018), as GeoCLIP uses them.
_A1, _A2, _A3, _A4, _SF = 1.340264, -0.081106, 0.000893, 0.003796, 66.50336
_INSTALL = "pip install --no-deps 'geoclip>=1.3' (or pip install 'geopipe-geolocation[geoclip]')"


def geoclip_dir() -> str:
    """Folder of the installed ``geoclip`` package (found, not imported); GeopipeError saying how to install it."""
    spec = importlib.util.find_spec("geoclip")
    if spec is None or not spec.submodule_search_locations:
        raise GeopipeError(f"the geoclip world needs GeoCLIP's location encoder and gallery: {_INSTALL}")
    folder = list(spec.submodule_search_locations)[0]
    for rel in (_WEIGHTS, _GALLERY):
        if not os.path.isfile(os.path.join(folder, rel)):
            raise GeopipeError(f"{folder} lacks {rel}: the installed geoclip is incomplete; reinstall it ({_INSTALL})")
    return folder


def load_gallery(folder: str | None = None) -> np.ndarray:
    """(100000, 2) float64 degrees (lat, lon) of GeoCLIP's MP-16 GPS gallery."""
    path = os.path.join(folder or geoclip_dir(), _GALLERY)
    return np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64).reshape(-1, 2)


def _equal_earth(latlon):
    """(n, 2) degrees → (n, 2) Equal Earth plane coordinates scaled as GeoCLIP does (x ∈ [−1, 1] at the equator)."""
    import torch

    lat, lon = torch.deg2rad(latlon[:, 0]), torch.deg2rad(latlon[:, 1])
    th = torch.asin(math.sqrt(3.0) / 2.0 * torch.sin(lat))
    den = 3.0 * (9 * _A4 * th**8 + 7 * _A3 * th**6 + 3 * _A2 * th**2 + _A1)
    x = 2.0 * math.sqrt(3.0) * lon * torch.cos(th) / den
    y = _A4 * th**9 + _A3 * th**7 + _A2 * th**3 + _A1 * th
    return torch.stack((x, y), dim=1) * _SF / 180.0


def _modules():
    """The torch module classes, built on first use (torch stays out of CLI imports)."""
    import torch
    from torch import nn

    class _Fourier(nn.Module):
        def __init__(self, n_freq: int):
            super().__init__()
            self.b = nn.Parameter(torch.zeros(n_freq, 2), requires_grad=False)

        def forward(self, v):
            vp = 2.0 * math.pi * v @ self.b.T
            return torch.cat((torch.cos(vp), torch.sin(vp)), dim=-1)

    class _Capsule(nn.Module):
        def __init__(self, n_freq: int, hidden: int, dim: int):
            super().__init__()
            self.capsule = nn.Sequential(_Fourier(n_freq), nn.Linear(2 * n_freq, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                         nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
            self.head = nn.Sequential(nn.Linear(hidden, dim))

        def forward(self, v):
            return self.head(self.capsule(v))

    class _LocationEncoder(nn.Module):
        """(n, 2) degrees (lat, lon) → (n, dim) float32: Σ over scales of capsule(RFF(EqualEarth(x)))."""

        def __init__(self, name: str, scales=GEOCLIP_SCALES, n_freq: int = 256, hidden: int = 1024, dim: int = 512):
            super().__init__()
            self.name, self.scales, self.embed_dim = name, tuple(scales), dim
            for i in range(len(self.scales)):
                self.add_module(f"LocEnc{i}", _Capsule(n_freq, hidden, dim))

        def forward(self, latlon):
            v = _equal_earth(latlon)
            return sum(getattr(self, f"LocEnc{i}")(v) for i in range(len(self.scales)))

    return _LocationEncoder


def build_location_encoder(name: str, scales=GEOCLIP_SCALES, n_freq: int = 256, hidden: int = 1024, dim: int = 512):
    """An un-initialised location encoder (GeoCLIP's sizes by default); ``name`` is its identity (cache key)."""
    return _modules()(name, scales, n_freq, hidden, dim)


def load_geoclip_encoder(folder: str | None = None):
    """GeoCLIP's pretrained location encoder in eval mode, named ``geoclip-location@<sha256[:12] of the weights>``."""
    import torch

    path = os.path.join(folder or geoclip_dir(), _WEIGHTS)
    with open(path, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: never a full unpickle
    enc = build_location_encoder(f"geoclip-location@{digest[:12]}")
    try:
        enc.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise GeopipeError(f"{path} does not hold GeoCLIP's location encoder ({str(exc).splitlines()[0]}); reinstall geoclip") from None
    return enc.eval()


def random_location_encoder(seed: int = 0, dim: int = 32, hidden: int = 64, n_freq: int = 16, scales=(1.0, 4.0, 16.0)):
    """A small random encoder with GeoCLIP's interface: B ~ N(0, σ²) per scale, default Linear init (seeded)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    enc = build_location_encoder(f"random-location@seed{seed}-d{dim}-h{hidden}-f{n_freq}", scales, n_freq, hidden, dim)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            scale = scales[int(name[6])] if name.endswith(".b") else 1.0 / math.sqrt(max(p.shape[-1], 1))
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return enc.eval()


def encode_locations(encoder, latlon: np.ndarray, batch: int = 4096, progress=None) -> np.ndarray:
    """(n, 2) degrees → (n, D) float32 unit vectors (encoder outputs L2-normalised, as GeoCLIP
    compares them); ``progress(n_done)`` is called after each batch."""
    import torch

    ll = np.asarray(latlon, dtype=np.float32).reshape(-1, 2)
    out = np.empty((ll.shape[0], encoder.embed_dim), dtype=np.float32)
    with torch.no_grad():
        for s in range(0, ll.shape[0], batch):
            e = encoder(torch.from_numpy(ll[s:s + batch]))
            out[s:s + e.shape[0]] = torch.nn.functional.normalize(e, dim=1).numpy()
            if progress is not None:
                progress(e.shape[0])
    return out
