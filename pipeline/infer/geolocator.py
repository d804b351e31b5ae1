"""The Python entry point: photos (or their embeddings) in, location distributions out.

    >>> from geopipe import Geolocator
    >>> geo = Geolocator.load("data/demo/model")          # or "hf-hub:nicolas-dufour/PLONK_YFCC"
    >>> res = geo.predict(["a.jpg", "b.jpg"], samples=64, localizability=32)
    >>> res.lat, res.lon                                   # (N,) degrees: the point predictions
    >>> res.log_prob(48.86, 2.35, per="km2")               # (N,) log density at Paris, nats per km²
    >>> res.region(0.9)                                    # the 90 % highest-density region of each photo
    >>> res.to_geodataframe()                              # one row per photo, GeoParquet columns

A :class:`Geolocator` holds one model (:func:`~geopipe.pipeline.infer.predictor.load_predictor`) and,
loaded on first use, the backbone its embedding space names — the same backbone, weights and
preprocessing as the store it was trained on, checked by fingerprint. :meth:`Geolocator.predict`
takes image paths, PIL images, raw image bytes, or an (N, D) array of embeddings of that space.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from geopipe.pipeline.core.device import resolve_device
from geopipe.pipeline.core.errors import ConfigError, GeopipeError
from geopipe.pipeline.infer.predictor import PredictOptions, Predictor, load_predictor, predict_batch, record_generator
from geopipe.pipeline.infer.regions import LOG_KM2_PER_SR
from geopipe.pipeline.sphere.geometry import latlon_to_xyz
from geopipe.pipeline.store.space import check_same_space, embedding_space

__all__ = ["Geolocator", "GeoPrediction", "LOG_KM2_PER_SR"]



@dataclass(frozen=True)
class GeoPrediction:
    """Predictions for N photos.

    keys: (N,) names (file names, or "0", "1", ... for images/embeddings given without names);
    lat, lon: (N,) degrees, the point predictions; columns: every column of
    :data:`geopipe.schemas.predictions.PREDICTIONS_SCHEMA` that was computed (numpy arrays or
    lists), e.g. ``sample_lat``/``sample_lon`` (N lists of S degrees), ``neg_entropy_nats``,
    ``effective_area_km2``, ``region`` (WKB) with ``region_mass``/``region_area_km2``.
    """

    keys: list[str]
    lat: np.ndarray
    lon: np.ndarray
    columns: dict
    _locator: Geolocator = field(repr=False, compare=False)
    _embeddings: np.ndarray = field(repr=False, compare=False)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def samples(self) -> np.ndarray | None:
        """(N, S, 2) unguided samples (lat, lon) in degrees, or None when ``samples=0``."""
        if "sample_lat" not in self.columns:
            return None
        return np.stack([np.asarray(self.columns["sample_lat"], float), np.asarray(self.columns["sample_lon"], float)], axis=-1)

    @property
    def effective_area_km2(self) -> np.ndarray | None:
        """(N,) exp(entropy)·R_E² in km² (the area a uniform density of equal entropy covers), or None."""
        v = self.columns.get("effective_area_km2")
        return None if v is None else np.asarray(v, float)

    def log_prob(self, lat, lon, per: str = "sr") -> np.ndarray:
        """(N,) log density of each photo's distribution at (lat, lon) degrees — one location for
        all photos (scalars) or one per photo ((N,) arrays); nats per steradian (``per="sr"``) or
        per km² (``per="km2"``, = per sr − 2 ln R_E). Exact (an ODE solve for flow models)."""
        if per not in ("sr", "km2"):
            raise ConfigError(f"per must be 'sr' or 'km2', got {per!r}")
        ll = np.broadcast_to(np.stack(np.broadcast_arrays(np.asarray(lat, float), np.asarray(lon, float)), axis=-1),
                             (len(self), 2))
        lp = self._locator._log_prob(self._embeddings, ll)
        return lp - LOG_KM2_PER_SR if per == "km2" else lp

    def region(self, q: float = 0.9, density: str = "auto") -> list:
        """The highest-density region of mass ``q`` of each photo (list of N
        :class:`geopipe.pipeline.infer.regions.HDRRegion`: shapely polygon in lon/lat degrees
        (OGC:CRS84), WKB, area km², mass on the grid, density level τ per sr and per km²). density:
        "exact" (the model's own), "kde" (a KDE of 1000 draws) or "auto" (exact for closed-form
        densities, kde for flows). Cached per (q, density)."""
        return self._locator._regions(self, q, density)

    def to_table(self):
        """A pyarrow Table of the predictions schema (GeoParquet point geometry)."""
        from geopipe.pipeline.artifacts.predictions import predictions_table

        return predictions_table({**self.columns, "key": list(self.keys), "lat": self.lat, "lon": self.lon}, len(self))

    def to_geodataframe(self):
        """A geopandas GeoDataFrame (EPSG:4326 points; a ``region`` column of polygons when computed);
        needs the ``geo`` extra (``pip install 'geopipe-geolocation[geo]'``)."""
        import shapely

        try:
            import geopandas as gpd
        except ImportError:
            from geopipe.pipeline.core.provenance import install_hint

            raise GeopipeError(f"to_geodataframe needs geopandas: {install_hint('geo')}") from None

        df = self.to_table().to_pandas()
        df["geometry"] = shapely.from_wkb(df["geometry"])
        if "region" in df and df["region"].notna().any():
            df["region"] = shapely.from_wkb(df["region"])
        return gpd.GeoDataFrame(df, geometry="geometry", crs="EPSG:4326")


class Geolocator:
    """A loaded model and (lazily) its backbone. Build with :meth:`load`."""

    def __init__(self, predictor: Predictor, source: str):
        self.predictor, self.source = predictor, source
        self._backbone = None

    @classmethod
    def load(cls, source: str | os.PathLike, device: str = "auto") -> Geolocator:
        """Load a model: a checkpoint directory of ``geopipe train``, a PLONK model directory, or
        ``hf-hub:org/name`` (e.g. ``hf-hub:nicolas-dufour/PLONK_YFCC``; downloaded once, then read
        from the Hugging Face cache)."""
        return cls(load_predictor(str(source), resolve_device(device)), str(source))

    @property
    def space(self) -> dict:
        """The embedding space the model expects (backbone name, weights fingerprint, width, normalisation)."""
        return self.predictor.space or {}

    @property
    def backbone(self):
        """The backbone named by the model's embedding space, loaded on first use and checked to reproduce it."""
        if self._backbone is None:
            from geopipe.pipeline.vision.backbones import BackboneSpec, load_backbone

            sp = self.space
            if not sp.get("name"):
                raise GeopipeError(f"model {self.source} records no backbone; give predict() embeddings instead of images")
            bb = load_backbone(BackboneSpec(sp["name"], sp.get("pretrained")), self.predictor.device)
            check_same_space(f"model {self.source}", sp, "the loaded backbone",
                             embedding_space(bb.identity, bb.embed_dim, sp.get("normalized")),
                             hint="the backbone's weights differ from the model's training data; load the same weights")
            self._backbone = bb
        return self._backbone

    def embed(self, images: Sequence[Any], batch_size: int = 32) -> np.ndarray:
        """(N, D) float32 embeddings of images (paths, PIL images or encoded bytes), L2-normalised
        when the model was trained on normalised embeddings. An unreadable image raises one line naming it."""
        from geopipe.pipeline.ingest.decode import SampleError, decode_image

        bb, out = self.backbone, []
        for i in range(0, len(images), batch_size):
            batch = []
            for j, img in enumerate(images[i : i + batch_size], start=i):
                try:
                    batch.append(_preprocess(img, bb.preprocess, decode_image))
                except SampleError as exc:
                    raise GeopipeError(f"image {_name(img, j)}: {exc.detail}; skip it or fix the file") from None
            out.append(bb.encode(torch.stack(batch)).cpu().numpy())
        emb = np.concatenate(out) if out else np.zeros((0, bb.embed_dim), np.float32)
        return self._normalise(emb)

    def _normalise(self, emb: np.ndarray) -> np.ndarray:
        if self.space.get("normalized"):
            emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        return emb.astype(np.float32)

    def predict(self, inputs, *, keys: Sequence[str] | None = None, samples: int = 0, localizability: int = 0,
                region: float | None = None, region_density: str = "auto", nll: bool = False, truth=None, steps: int = 16, guidance: float = 2.0,
                seed: int = 0, batch_size: int = 256) -> GeoPrediction:
        """Predict where each input was taken.

        inputs: image paths / PIL images / bytes (a single one or a sequence), or an (N, D) array
        of embeddings of the model's space. samples: S unguided samples per photo; localizability:
        Monte-Carlo samples for the entropy (0 = off); region: q for the HDR polygon column;
        nll + truth ((N, 2) degrees): the exact log-likelihood of known locations. Noise is seeded
        from (seed, index), so a photo's answer does not depend on its batch.
        """
        emb, names = self._inputs(inputs, keys)
        opts = PredictOptions(steps=steps, guidance=guidance, samples=samples, nll=nll, localizability=localizability,
                              region=region, region_density=region_density)
        truth = None if truth is None else np.asarray(truth, float).reshape(len(emb), 2)
        if nll and truth is None:
            raise ConfigError("nll=True needs truth=(N, 2) known latitudes/longitudes in degrees")
        parts = []
        for b0 in range(0, len(emb), batch_size):
            sl = slice(b0, b0 + batch_size)
            gen = record_generator(seed, b0, self.predictor.device)
            parts.append(predict_batch(self.predictor, emb[sl], None if truth is None else truth[sl], names[sl], opts, gen))
        cols = _concat(parts)
        return GeoPrediction(names, np.asarray(cols.pop("lat", []), float), np.asarray(cols.pop("lon", []), float), cols, self, emb)

    def _inputs(self, inputs, keys) -> tuple[np.ndarray, list[str]]:
        if isinstance(inputs, np.ndarray) and inputs.ndim == 2 and inputs.dtype.kind == "f":
            d = int(self.predictor.config["embed_dim"])
            if inputs.shape[1] != d:
                raise GeopipeError(f"embeddings have width {inputs.shape[1]} but model {self.source} expects {d}-d embeddings "
                                   f"of {self.space.get('name')!r}")
            emb, default = self._normalise(inputs), [str(i) for i in range(len(inputs))]
        else:
            items = [inputs] if isinstance(inputs, (str, os.PathLike, bytes)) or hasattr(inputs, "convert") else list(inputs)
            emb, default = self.embed(items), [_name(x, i) for i, x in enumerate(items)]
        names = list(keys) if keys is not None else default
        if len(names) != len(emb):
            raise ConfigError(f"keys has {len(names)} names for {len(emb)} inputs")
        return emb, names

    def _log_prob(self, emb: np.ndarray, latlon: np.ndarray) -> np.ndarray:
        p = self.predictor
        with torch.no_grad():
            cond = p.condition(emb)
            x = latlon_to_xyz(torch.tensor(latlon, dtype=torch.float64)).float().to(p.device)
            return p.method.log_likelihood(p.model, x, cond).double().cpu().numpy()

    def _regions(self, pred: GeoPrediction, q: float, density: str) -> list:
        from geopipe.pipeline.infer.predictor import region_density
        from geopipe.pipeline.infer.regions import hdr_regions

        density = region_density(self.predictor.method, PredictOptions(region_density=density))
        if (q, density) not in pred._cache:
            p = self.predictor
            with torch.no_grad():
                cond = p.condition(pred._embeddings)
                gen = record_generator(0, 0, p.device)
                pred._cache[q, density] = hdr_regions(p.method, p.model, cond, q, generator=gen, keys=list(pred.keys), density=density)
        return pred._cache[q, density]


def _preprocess(img, preprocess, decode_image) -> torch.Tensor:
    if isinstance(img, (str, os.PathLike)):
        with open(img, "rb") as fh:
            return decode_image(fh.read(), preprocess)
    if isinstance(img, bytes):
        return decode_image(img, preprocess)
    return preprocess(img.convert("RGB"))  # a PIL image


def _name(img, i: int) -> str:
    return os.path.basename(os.fspath(img)) if isinstance(img, (str, os.PathLike)) else str(i)


def _concat(parts: list[dict]) -> dict:
    out: dict = {}
    for name in parts[0] if parts else ():
        vals = [p[name] for p in parts]
        out[name] = np.concatenate([np.asarray(v) for v in vals]) if isinstance(vals[0], np.ndarray) else sum((list(v) for v in vals), [])
    return out
