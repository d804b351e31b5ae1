"""Training inputs of gallery methods (hybrid): the gallery itself and each training record's
neighbour block, found once before the first step (docs/methods.md#hybrid).

The gallery is every labelled row of the training store (both splits), stored as float16 unit
rows so that the neighbours found here are exactly those prediction finds with the saved
weights. Each record's block excludes its own place: the rows chained to it by links shorter
than ``exclude_km`` (:mod:`geopipe.pipeline.sphere.places`, the splits' near-duplicate rule).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.model.neighbours import neighbour_block, split_block
from geopipe.pipeline.sphere.geometry import latlon_to_xyz
from geopipe.pipeline.sphere.places import place_ids
from geopipe.pipeline.store.format import labelled_rows
from geopipe.pipeline.store.reader import open_store, read_store
from geopipe.pipeline.store.space import check_same_space, store_space

__all__ = ["Gallery", "build_gallery", "with_neighbours", "standardize_embedding_part", "place_field_ids", "calibrate_on_store"]


@dataclass(frozen=True)
class Gallery:
    """emb (N, D) float16 unit rows, xyz (N, 3) float32 unit locations."""

    emb: torch.Tensor
    xyz: torch.Tensor

    def attach(self, model) -> None:
        """Copy into a gallery method's network buffers (``gallery_emb``, ``gallery_xyz``)."""
        with torch.no_grad():
            model.gallery_emb.copy_(self.emb)
            model.gallery_xyz.copy_(self.xyz)


def build_gallery(embeddings: torch.Tensor, xyz: torch.Tensor) -> Gallery:
    """The gallery of labelled rows: embeddings (N, D) any float dtype, xyz (N, 3) unit."""
    return Gallery(F.normalize(embeddings.float(), dim=-1).half(), xyz.float().contiguous())


def with_neighbours(embeddings: torch.Tensor, gallery: Gallery, k: int, exclude_km: float, *, places=None, block: int = 2048,
                    progress: bool = True) -> torch.Tensor:
    """(N, D + F·k) float32: the gallery's own rows (row i = gallery row i) followed by their
    neighbour blocks, none of them of the row's own place: ``places`` (N,) ids when given (a
    store's place metadata), else locations chained at ``exclude_km`` (the row itself when 0)."""
    t0, n, given = time.perf_counter(), len(embeddings), places is not None
    if places is None:
        places = place_ids(gallery.xyz.double().numpy(), exclude_km)
    else:
        places = np.unique(np.asarray(places).astype(str), return_inverse=True)[1].astype(np.int64)
    places = torch.as_tensor(places)
    g32 = gallery.emb.float()
    out = [neighbour_block(gallery.emb[i : i + block].float(), g32, gallery.xyz, k, groups=places[i : i + block], gallery_groups=places)
           for i in range(0, n, block)]
    if progress:
        how = "from the store's metadata" if given else f"chained at {exclude_km:g} km"
        print(f"geopipe: train: neighbours of {n:,} records ({k} each, none of the record's own place: "
              f"{len(torch.unique(places)):,} places {how}): {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return torch.cat([embeddings.float(), torch.cat(out)], dim=1)


def standardize_embedding_part(stats, dim: int):
    """The loop's conditioning map for rows [embedding (D) | neighbour block]: z-scores the first
    ``dim`` columns with ``stats`` and keeps the block."""
    def condition(c: torch.Tensor) -> torch.Tensor:
        return torch.cat([stats.apply(c[:, :dim]), c[:, dim:].float()], dim=1)

    return condition


def place_field_ids(store, field: str | None, labelled: np.ndarray, name: str):
    """The labelled rows' place ids from a loaded store's metadata ``field`` (None when not given);
    ``name``: the store as the user gave it."""
    if field is None:
        return None
    if field not in store.meta:
        raise GeopipeError(f"store {name} has no metadata field {field!r} (it has {sorted(store.meta)}); "
                           "leave out --place-field to chain places by --exclude-km")
    return np.asarray(store.meta[field])[labelled]


def calibrate_on_store(method, model, stats, train_store, train_name: str, val_store: str, device, limit: int = 20000) -> None:
    """Fit the hybrid ``method``'s held-out calibration (in place; :mod:`~geopipe.pipeline.methods.hybrid_calibration`)
    on the labelled rows of ``val_store`` (at most ``limit``) by NLL, with ``model`` (the trained,
    EMA network) fixed; ``stats`` standardise the embeddings as in training."""
    from geopipe.pipeline.methods.hybrid_calibration import fit_hybrid_calibration

    val = read_store(val_store)
    check_same_space(f"training store {train_name}", store_space(train_store), f"--val-store {val_store}",
                     store_space(open_store(val_store)))
    rows = np.flatnonzero(labelled_rows(val.latlon))[:limit]
    if len(rows) == 0:
        raise GeopipeError(f"--val-store {val_store} has no labelled rows to calibrate on")
    raw = torch.as_tensor(np.asarray(val.embeddings[rows])).to(device)
    x = latlon_to_xyz(torch.as_tensor(val.latlon[rows], dtype=torch.float64)).to(device)
    with torch.no_grad():
        cond = method.condition(model, raw, stats.apply(raw))
        p = model(cond)
    _, sim, valid, _ = split_block(cond[:, model.embed_dim :], method.neighbours)
    fit = fit_hybrid_calibration(p, sim, valid, x, scales=method.scales, components=method.components)
    method.calibration, method.width_scale, method.weight_temperature, method.floor = fit, 1.0, 1.0, 0.0
    print(f"geopipe: train: calibrated on {len(rows):,} records of {val_store}: held-out NLL {fit.val_nll_before:.3f} -> "
          f"{fit.val_nll:.3f} nats/sr", file=sys.stderr)
