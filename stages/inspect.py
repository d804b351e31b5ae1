"""Inspect stage: what an embedding store encodes, without training anything.

Spherical k-means prototypes of ``store`` (medoid, nearest members, geo-purity, spatial and
heading spread) → ``prototypes.parquet``; ridge probes from its embeddings to its metadata and
location → ``probes.json`` (+ the probe directions in ``probe_directions.npz``); top-k
galleries in ``database`` (default: ``store`` itself, never retrieving the probe record) for
probe records, the k-means centroids and, on request, points along probe directions →
``galleries.parquet``; with ``plots``, gallery maps and a prototypes map (PNG). Embeddings are
compared by cosine (rows L2-normalised whatever the store's own normalisation). The store
keeps no thumbnails, so galleries are maps and metadata only.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from geopipe.pipeline.core import fsio
from geopipe.pipeline.core.errors import ConfigError, GeopipeError, check_int
from geopipe.pipeline.core.provenance import provenance
from geopipe.pipeline.inspection.galleries import ProbeSet, centroid_probes, concat_probes, direction_probes, record_probes, search_gallery
from geopipe.pipeline.inspection.kmeans import spherical_kmeans, store_source
from geopipe.pipeline.inspection.probes import ProbeConfig, run_probes
from geopipe.pipeline.inspection.prototypes import Prototypes, cluster_prototypes
from geopipe.pipeline.retrieval.split import decode_meta
from geopipe.pipeline.store.reader import EmbeddingStore, open_store
from geopipe.pipeline.store.space import check_query_database

__all__ = ["InspectConfig", "InspectResult", "run_inspect"]

_HEADING_FIELDS = ("heading_deg", "heading")


@dataclass(frozen=True)
class InspectConfig:
    """store: the store inspected; out_dir: output folder; database: store searched by the
    galleries (None: ``store``); keys: probe records by key, else ``n_probes`` seeded records;
    k: gallery size; clusters, n_iter: k-means; n_members: members listed per prototype;
    probe_fields: metadata fields to probe (None: all; the location is always probed unless
    ``location_probe`` is False); directions: probe directions (``"biome=desert"``,
    ``"heading_deg.sin"``, ``"location.z"``, …) walked from each probe record by
    ``direction_steps``; purity_radius_m: the main geo-purity radius; radius_m: gallery
    consistency radius; probe_split: split and ridge settings; max_probe_records: records
    (seeded sample) the ridge probes use; plots: write PNG maps (at most ``max_plots`` galleries)."""

    store: str
    out_dir: str
    database: str | None = None
    keys: tuple[str, ...] = ()
    n_probes: int = 16
    k: int = 8
    clusters: int = 64
    n_iter: int = 20
    n_members: int = 8
    probe_fields: tuple[str, ...] | None = None
    location_probe: bool = True
    directions: tuple[str, ...] = ()
    direction_steps: tuple[float, ...] = (0.25, 0.5, 1.0)
    purity_radius_m: float = 25.0
    radius_m: float = 25.0
    probe_split: ProbeConfig = field(default_factory=ProbeConfig)
    max_probe_records: int = 100_000
    plots: bool = False
    max_plots: int = 8
    chunk_rows: int = 65536
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name, flag, lo in (("n_probes", "--probes", 1), ("k", "-k", 1), ("clusters", "--clusters", 1),
                               ("n_iter", "--iterations", 1), ("n_members", "n_members", 1),
                               ("max_probe_records", "--max-probe-records", 1), ("max_plots", "max_plots", 0),
                               ("chunk_rows", "chunk_rows", 1)):
            check_int(getattr(self, name), flag, lo)
        for name, flag, lo in (("purity_radius_m", "--purity-radius-m", False), ("radius_m", "--radius-m", False),
                               ("block_m", "--block-m", True)):
            v = self.probe_split.block_m if name == "block_m" else getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (v == 0 and not lo):
                raise ConfigError(f"{flag} must be a finite number {'>= 0' if lo else '> 0'} (metres), got {v!r}")
        if not all(isinstance(t, (int, float)) and math.isfinite(t) for t in self.direction_steps):
            raise ConfigError(f"--direction-steps must be finite numbers, got {self.direction_steps!r}")


@dataclass(frozen=True)
class InspectResult:
    """paths: name → file written; kmeans: passes, convergence, mean cosine; purity: radius →
    median over clusters (and size-weighted mean); probes: one dict per probe (name, kind,
    metrics); skipped: field → why it was not probed; n_records, n_database, seconds."""

    out_dir: str
    paths: dict
    n_records: int
    n_database: int
    kmeans: dict
    purity: dict
    probes: list
    skipped: dict
    seconds: float


def _meta(store: EmbeddingStore, names, rows: np.ndarray | None = None) -> dict[str, list]:
    views = store.meta
    missing = [n for n in names if n not in views]
    if missing:
        raise GeopipeError(f"store {store.path} has no metadata field {missing[0]!r}; fields are {sorted(views)}")
    return {n: decode_meta(views[n][:] if rows is None else views[n][rows]) for n in names}


def _headings(store: EmbeddingStore) -> np.ndarray | None:
    name = next((n for n in _HEADING_FIELDS if n in store.meta), None)
    if name is None:
        return None
    vals = _meta(store, [name])[name]
    return np.array([float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else np.nan for v in vals])


def _probe_rows(store: EmbeddingStore, cfg: InspectConfig) -> np.ndarray:
    if cfg.keys:
        row_of = {str(k): i for i, k in enumerate(store.keys[:])}
        missing = [k for k in cfg.keys if k not in row_of]
        if missing:
            raise GeopipeError(f"store {store.path} has no record with key {missing[0]!r} (--keys)")
        return np.array([row_of[k] for k in cfg.keys], dtype=np.int64)
    n = min(cfg.n_probes, len(store))
    return np.sort(np.random.default_rng(cfg.seed).choice(len(store), size=n, replace=False)).astype(np.int64)


def _prototype_table(proto: Prototypes, keys: np.ndarray, latlon: np.ndarray):
    import pyarrow as pa

    med = proto.medoid
    cols = {"cluster": np.arange(len(med), dtype=np.int64), "size": proto.sizes, "medoid_key": [str(k) for k in keys[med]],
            "medoid_lat": latlon[med, 0], "medoid_lon": latlon[med, 1], "medoid_cos": proto.medoid_cos.astype(np.float64),
            "mean_lat": proto.mean_latlon[:, 0], "mean_lon": proto.mean_latlon[:, 1], "spread_km": proto.spread_km}
    cols.update({f"purity_{r}": v for r, v in proto.purity.items()})
    if proto.heading_spread_deg is not None:
        cols["heading_spread_deg"] = proto.heading_spread_deg
    cols["member_keys"] = [[str(keys[i]) for i in row if i >= 0] for row in proto.members]
    cols["member_cos"] = [[float(c) for c, i in zip(cr, row) if i >= 0] for cr, row in zip(proto.member_cos, proto.members)]
    return pa.table(cols)


def _gallery_table(probes: ProbeSet, gal, probe_keys: list, db_keys: np.ndarray):
    import pyarrow as pa

    p, k = gal.indices.shape
    ok = gal.indices >= 0
    rep = np.repeat(np.arange(p), k)[ok.reshape(-1)]
    rank = np.tile(np.arange(1, k + 1), p)[ok.reshape(-1)]
    idx = gal.indices[ok]
    return pa.table({"probe": rep, "probe_kind": [probes.kind[i] for i in rep], "probe_label": [probes.label[i] for i in rep],
                     "probe_key": [probe_keys[i] for i in rep], "probe_lat": probes.latlon[rep, 0], "probe_lon": probes.latlon[rep, 1],
                     "rank": rank, "key": [str(x) for x in db_keys[idx]], "similarity": gal.similarity[ok],
                     "lat": gal.latlon[ok][:, 0], "lon": gal.latlon[ok][:, 1], "distance_km": gal.distance_km[ok],
                     "nn_geo_consistency": gal.nn_geo_consistency[rep], "frac_within_radius": gal.frac_within_radius[rep]})


def _write_parquet(table, path: str, meta: dict) -> None:
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table.replace_schema_metadata({b"geopipe": json.dumps(meta, default=str).encode()}), buf)
    fsio.write_atomic(path, buf.getvalue())


def _directions(cfg: InspectConfig, found: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    for name in cfg.directions:
        if name not in found:
            head = name.split("=", 1)[0].split(".", 1)[0]
            same = sorted(n for n in found if n.split("=", 1)[0].split(".", 1)[0] == head) or sorted(found)
            shown = same[:12] + ([f"... {len(same) - 12} more"] if len(same) > 12 else [])
            raise GeopipeError(f"no probe direction {name!r}; probes gave {shown or 'none'} (probe its field with --probe-fields)")
    return [(n, found[n]) for n in cfg.directions]


def _plots(cfg: InspectConfig, probes: ProbeSet, gal, proto: Prototypes, latlon: np.ndarray) -> dict:
    from geopipe.pipeline.viz.inspection_maps import render_gallery_map, render_prototypes_map

    paths = {"prototypes_png": render_prototypes_map(os.path.join(cfg.out_dir, "prototypes.png"), latlon[proto.medoid],
                                                     proto.purity[next(iter(proto.purity))], proto.sizes,
                                                     title=f"{len(proto.sizes)} prototypes: geo-purity at {next(iter(proto.purity))}")}
    for n, i in enumerate(np.flatnonzero(probes.kind == "record")[:cfg.max_plots]):
        ok = gal.indices[i] >= 0
        paths[f"gallery_{n}_png"] = render_gallery_map(os.path.join(cfg.out_dir, f"gallery-{n:03d}.png"), probes.latlon[i],
                                                       gal.latlon[i][ok], gal.similarity[i][ok], title=f"{probes.label[i]}: top-{int(ok.sum())}")
    return paths


def run_inspect(cfg: InspectConfig) -> InspectResult:
    """Prototypes, probes and galleries of ``cfg.store`` (see the module docstring)."""
    t0 = time.perf_counter()
    st = open_store(cfg.store)
    db = open_store(cfg.database) if cfg.database else st
    check_query_database(st, db)
    if cfg.k < 1:
        raise GeopipeError(f"-k must be at least 1, got {cfg.k}")
    if cfg.k > len(db):  # no more neighbours than database records (a huge -k must not allocate)
        cfg = replace(cfg, k=len(db))
    for name in cfg.directions:  # before the k-means passes, not after them
        head = name.split("=", 1)[0].split(".", 1)[0]
        if head != "location" and head not in st.meta:
            raise GeopipeError(f"no probe direction {name!r} (--direction): store {st.path} has no metadata field {head!r}; use FIELD=VALUE, "
                               f"FIELD.sin/.cos or location.x/.y/.z with one of {sorted(st.meta)}")
    rows = _probe_rows(st, cfg)  # unknown --keys and --probe-fields fail before the k-means passes
    unknown = [f for f in (cfg.probe_fields or ()) if f not in st.meta]
    if unknown:
        raise GeopipeError(f"store {st.path} has no metadata field {unknown[0]!r} (--probe-fields); fields are {sorted(st.meta)}")
    fsio.makedirs(cfg.out_dir)
    meta_out = {"config": {**asdict(cfg), "probe_split": asdict(cfg.probe_split)}, "store": st.path, "database": db.path,
                "backbone": st.attrs.get("backbone"), **provenance()}
    latlon, keys = st.latlon[:].astype(np.float64), st.keys[:]
    km = spherical_kmeans(store_source(st, cfg.chunk_rows), min(cfg.clusters, len(st)), n_iter=cfg.n_iter, seed=cfg.seed, progress=cfg.progress)
    proto = cluster_prototypes(km.labels, km.cos, latlon, len(km.sizes), n_members=cfg.n_members, purity_radius_m=cfg.purity_radius_m,
                               heading_deg=_headings(st))
    kmeans = {"clusters": len(km.sizes), "n_iter": km.n_iter, "converged": km.converged, "mean_cos": km.mean_cos,
              "min_size": int(km.sizes.min()), "max_size": int(km.sizes.max())}
    purity = {r: {"median": float(np.nanmedian(v)), "weighted": float(np.nansum(v * proto.sizes) / proto.sizes.sum())}
              for r, v in proto.purity.items()}
    purity["spread_km"] = {"median": float(np.nanmedian(proto.spread_km))}
    paths = {"prototypes": os.path.join(cfg.out_dir, "prototypes.parquet"), "probes": os.path.join(cfg.out_dir, "probes.json"),
             "directions": os.path.join(cfg.out_dir, "probe_directions.npz"), "galleries": os.path.join(cfg.out_dir, "galleries.parquet")}
    _write_parquet(_prototype_table(proto, keys, latlon), paths["prototypes"], {**meta_out, "kmeans": kmeans})
    fields = tuple(st.meta) if cfg.probe_fields is None else cfg.probe_fields
    n_fit = min(cfg.max_probe_records, len(st))
    fit_rows = np.sort(np.random.default_rng(cfg.seed + 1).choice(len(st), size=n_fit, replace=False)) if n_fit < len(st) else np.arange(len(st))
    results, skipped = run_probes(st.embeddings[fit_rows], latlon[fit_rows], _meta(st, fields, fit_rows), cfg.probe_split, location=cfg.location_probe)
    probes_out = [{"name": r.name, "kind": r.kind, "n_fit": r.n_fit, "n_test": r.n_test, "lambda": r.lam, **r.metrics} for r in results]
    found = {n: v for r in results for n, v in r.directions.items()}
    fsio.write_atomic(paths["probes"], json.dumps({**meta_out, "probes": probes_out, "skipped": skipped}, indent=1, default=str).encode())
    with fsio.atomic_path(paths["directions"]) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **found)
    uniq, back = np.unique(rows, return_inverse=True)
    base = record_probes(st.embeddings[uniq][back.reshape(-1)], rows, keys[rows], latlon[rows])
    parts = [base, centroid_probes(km.centroids, proto.mean_latlon)]
    parts += [direction_probes(base, w, cfg.direction_steps, name) for name, w in _directions(cfg, found)]
    probes = concat_probes(*parts)
    same = db.path == st.path
    gal = search_gallery(probes, store_source(db, cfg.chunk_rows).chunks(), db.latlon[:].astype(np.float64), cfg.k, same_store=same,
                         radius_m=cfg.radius_m)
    probe_keys = [str(keys[r]) if r >= 0 else None for r in probes.row]
    _write_parquet(_gallery_table(probes, gal, probe_keys, db.keys[:]), paths["galleries"], meta_out)
    if cfg.plots:
        paths.update(_plots(cfg, probes, gal, proto, latlon))
    return InspectResult(out_dir=cfg.out_dir, paths=paths, n_records=len(st), n_database=len(db), kmeans=kmeans, purity=purity,
                         probes=probes_out, skipped=skipped, seconds=time.perf_counter() - t0)
