"""Locate: photos → where they were taken, in one command (``geopipe locate``).

A composition of two stages (so it lives with the flows, which may chain stages; no stage imports
another). It runs the two stages a labelled evaluation runs separately: the photos (image files, folders,
globs, WebDataset tars) are embedded with the *model's own* backbone — named by the embedding
space recorded in its checkpoint — into an embedding store kept beside the output (a rerun skips
the photos already embedded), then every record is predicted into GeoParquet. Photos need no
coordinates; unreadable files are rejects listed with their reasons, the rest go on.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from geopipe.pipeline.core import fsio
from geopipe.pipeline.core.errors import ConfigError, GeopipeError
from geopipe.pipeline.infer.model_source import open_model_source
from geopipe.pipeline.store.reader import open_store
from geopipe.pipeline.store.space import check_same_space, store_space
from geopipe.stages.extract import ExtractConfig, run_extract
from geopipe.stages.predict import PredictConfig, run_predict

__all__ = ["LocateConfig", "LocateResult", "LocatedRow", "run_locate", "default_store", "located_rows"]


@dataclass(frozen=True)
class LocateConfig:
    """Options of ``geopipe locate``.

    model: checkpoint directory, PLONK directory or ``hf-hub:org/name``; inputs: image files,
    folders, globs, WebDataset tars (brace patterns, fsspec urls); out: predictions (``.parquet``
    file, or a dataset directory); store: the embedding store (default :func:`default_store`).
    region: mass q of the highest-density region polygon per photo (None = no region column);
    region_density: "auto" | "exact" | "kde" (see ``geopipe predict --region-density``).
    localizability: Monte-Carlo samples for the entropy / effective area (0 = off).
    Sampling options as for ``geopipe predict``.
    """

    model: str
    inputs: tuple[str, ...]
    out: str
    store: str | None = None
    region: float | None = None
    region_density: str = "auto"
    samples: int = 0
    localizability: int = 0
    steps: int = 16
    guidance: float = 2.0
    seed: int = 3407
    batch_size: int = 256
    overwrite: bool = False
    dask: str | None = None
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", (self.inputs,) if isinstance(self.inputs, str) else tuple(self.inputs))
        if not self.inputs:
            raise ConfigError("locate needs at least one photo, folder, glob or tar")
        if not isinstance(self.out, str) or not self.out:
            raise ConfigError("locate needs an output path (-o predictions.parquet)")


@dataclass(frozen=True)
class LocatedRow:
    """One line of the summary table: key, point (degrees), effective area and region area (km², or None)."""

    key: str
    lat: float
    lon: float
    effective_area_km2: float | None
    region_area_km2: float | None


@dataclass(frozen=True)
class LocateResult:
    """out: predictions written; store: embeddings kept for reruns; rows: the first ``head`` located
    photos; rejects: (key, file, reason, detail) of every unreadable input."""

    out: str
    store: str
    n_located: int
    n_rejected: int
    rows: tuple[LocatedRow, ...]
    rejects: tuple[tuple[str, str, str, str], ...]
    seconds: float


def default_store(out: str) -> str:
    """Where locate keeps the embeddings of ``out``'s photos: ``<out without .parquet>.zarr``."""
    base = out[: -len(".parquet")] if out.endswith(".parquet") else out.rstrip("/")
    return base + ".zarr"


def located_rows(out: str, head: int = 20) -> tuple[int, tuple[LocatedRow, ...]]:
    """(number of photos, the first ``head`` rows) of predictions written by locate at ``out``,
    read by geopipe's reader (page checksums and part digests verified: a damaged output is one
    line naming the file or part, not a table)."""
    from geopipe.pipeline.artifacts.predictions import read_columns

    table = read_columns(out, ("key", "lat", "lon", "effective_area_km2", "region_area_km2"))
    col = {n: table.column(n).slice(0, head).to_pylist() for n in table.column_names}
    none = [None] * min(head, table.num_rows)
    rows = tuple(LocatedRow(k, la, lo, ea, ra) for k, la, lo, ea, ra in
                 zip(col["key"], col["lat"], col["lon"], col.get("effective_area_km2", none), col.get("region_area_km2", none)))
    return table.num_rows, rows


def run_locate(cfg: LocateConfig, head: int = 20) -> LocateResult:
    """Embed ``cfg.inputs`` with the model's backbone into ``cfg.store`` and predict them into ``cfg.out``."""
    t0 = time.perf_counter()
    if fsio.exists(cfg.out) and not cfg.overwrite:
        raise GeopipeError(f"{cfg.out} exists; pass --overwrite to replace it, or choose another -o")
    source = open_model_source(cfg.model)
    space = source.space
    if not space.get("name"):
        raise GeopipeError(f"model {cfg.model} records no backbone, so its photos cannot be embedded; "
                           "extract them yourself and run geopipe predict")
    store = cfg.store or default_store(cfg.out)
    run_extract(ExtractConfig(shards=cfg.inputs, store=store, backbone=space["name"], pretrained=space.get("pretrained"),
                              normalize=bool(space.get("normalized", True)), max_reject_fraction=1.0, device=cfg.device,
                              dask=cfg.dask, progress=cfg.progress))
    opened = open_store(store)
    check_same_space(f"model {cfg.model}", space, f"store {store}", store_space(opened),
                     hint=f"the store {store} holds other embeddings: give locate another --store")
    rejects = opened.rejects().to_pylist()
    if len(opened) == 0:
        raise GeopipeError(f"none of the {len(rejects)} input(s) could be read (first: {_first(rejects)}); "
                           "locate reads jpg/png/webp files, folders of them and WebDataset tars")
    run_predict(PredictConfig(checkpoint=cfg.model, store=store, out=cfg.out, steps=cfg.steps, guidance=cfg.guidance,
                              samples=cfg.samples, localizability=cfg.localizability, seed=cfg.seed, batch_size=cfg.batch_size,
                              overwrite=cfg.overwrite, dask=cfg.dask, device=cfg.device, progress=cfg.progress,
                              region_density=cfg.region_density,
                              **({"region": cfg.region} if cfg.region is not None else {})))
    n, rows = located_rows(cfg.out, head)
    rej = tuple((r.get("key", ""), r.get("shard", ""), r.get("reason", ""), r.get("detail", "")) for r in rejects)
    return LocateResult(cfg.out, store, n, len(rej), rows, rej, time.perf_counter() - t0)


def _first(rejects: list[dict]) -> str:
    if not rejects:
        return "none"
    r = rejects[0]
    return f"{r.get('key') or os.path.basename(r.get('shard', ''))}: {r.get('reason')} ({r.get('detail')})"
