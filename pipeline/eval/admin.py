"""Administrative-area accuracies (country / region / sub-region / city;
docs/methods.md#admin).

Predicted labels follow the reference: from a ``reverse_geocoder`` hit (nearest GeoNames place, offline)
country = ``cc``, region = ``admin1_cc``, sub-region = ``admin2_admin1_cc``,
city = ``name_admin2_admin1_cc``; ground truth are the dataset's labels (OSV-5M:
``unique_country``, ``unique_region``, ``unique_sub-region``, ``unique_city``). Accuracy is the
exact string-match rate over records whose true label is known; :func:`store_admin_labels` reads
true labels from an embedding store's ``meta/`` arrays. ``reverse_geocoder`` is an
optional dependency (``pip install 'geopipe-geolocation[geocode]'``; the ``geopipe`` name on the
public package index is another project), imported only when labels are needed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

import numpy as np

from geopipe.pipeline.core.errors import ConfigError, GeopipeError
from geopipe.pipeline.store.format import meta_as_json
from geopipe.schemas.store import META_TEXT_ATTR, META_TEXT_SUFFIX

__all__ = ["ADMIN_AREAS", "is_missing_label", "admin_accuracy", "reverse_geocode_labels", "store_admin_labels"]

#: Area name -> reverse_geocoder fields joined with "_" to form the label.
ADMIN_AREAS: dict[str, tuple[str, ...]] = {
    "country": ("cc",),
    "region": ("admin1", "cc"),
    "sub-region": ("admin2", "admin1", "cc"),
    "city": ("name", "admin2", "admin1", "cc"),
}

# "NaN" is what OSV-5M stores for a missing attribute; the reference implementation only skipped "nan".
_MISSING = {"", "nan"}


def is_missing_label(label) -> bool:
    """True for an unknown label: None, a float NaN, "", "nan", "NaN" (any case, surrounding blanks)."""
    if label is None:
        return True
    if isinstance(label, float) and math.isnan(label):
        return True
    return isinstance(label, str) and label.strip().lower() in _MISSING


def admin_accuracy(true_labels: Mapping[str, Sequence], pred_labels: Mapping[str, Sequence]) -> dict:
    """Per-area accuracy of predicted vs true labels, ``{area: {"n", "accuracy"}}``.

    ``true_labels[area]`` and ``pred_labels[area]`` are (N,) sequences of labels for the same
    records in the same order. Records with a missing true label (see :func:`is_missing_label`)
    leave numerator and denominator; a missing predicted label counts as a miss. ``accuracy``
    is ``None`` when no true label of that area is known.
    """
    out: dict = {}
    for area, truth in true_labels.items():
        if area not in pred_labels:
            raise ValueError(f"admin_accuracy: no predicted labels for area {area!r}; have {sorted(pred_labels)}")
        pred = pred_labels[area]
        if len(pred) != len(truth):
            raise ValueError(f"admin_accuracy: area {area!r} has {len(truth)} true and {len(pred)} predicted labels")
        known = [(t, p) for t, p in zip(truth, pred) if not is_missing_label(t)]
        hits = sum(1 for t, p in known if not is_missing_label(p) and str(p) == str(t))
        out[area] = {"n": len(known), "accuracy": hits / len(known) if known else None}
    return out


def _geocoder():
    from geopipe.pipeline.core.provenance import install_hint

    try:
        import reverse_geocoder
    except ImportError:
        raise GeopipeError(
            "admin accuracy needs reverse geocoding of the predicted points, but the optional package 'reverse_geocoder' "
            f"is not installed: {install_hint('geocode')}"
        ) from None
    return reverse_geocoder


def reverse_geocode_labels(lat, lon, areas: Sequence[str] = ("country", "region", "city")) -> dict[str, list[str]]:
    """Labels ``{area: [label…]}`` of (N,) degree coordinates via ``reverse_geocoder`` (offline).

    Raises :class:`GeopipeError` telling to ``pip install 'geopipe-geolocation[geocode]'`` when the package is
    absent, and ValueError for an unknown area name.
    """
    unknown = [a for a in areas if a not in ADMIN_AREAS]
    if unknown:
        raise ConfigError(f"unknown admin area {unknown[0]!r}; choose from {list(ADMIN_AREAS)}")
    lat = np.asarray(lat, dtype=np.float64).reshape(-1)
    lon = np.asarray(lon, dtype=np.float64).reshape(-1)
    if lat.size == 0:
        return {a: [] for a in areas}
    rg = _geocoder()
    # mode=1: single-process k-d tree (mode 2 forks a pool); verbose=False: no loading banner
    hits = rg.search(list(zip(lat.tolist(), lon.tolist())), mode=1, verbose=False)
    return {a: ["_".join(str(h.get(f, "")) for f in ADMIN_AREAS[a]) for h in hits] for a in areas}


def _decode_meta(value: str):
    # store meta/ values are JSON-encoded scalars, "" when absent (schemas/store.py)
    if value == "":
        return None
    try:
        decoded = json.loads(value)
    except ValueError:
        return value
    return None if decoded is None else str(decoded)


def store_admin_labels(store: str, fields: Mapping[str, str], keys: Sequence[str],
                       optional: Sequence[str] = ()) -> dict[str, list]:
    """True labels ``{area: [label | None …]}`` aligned with ``keys``, read from an embedding store.

    ``fields`` maps an area to a ``meta/<field>`` array of the Zarr store (schemas/store.py; values
    JSON-encoded scalars, "" when absent); a key not in the store gets ``None``. Areas in
    ``optional`` whose field the store lacks are left out (any subset of the areas works).
    Raises :class:`GeopipeError` when the store cannot be read, lacks a field that is not
    optional, or has none of the fields.
    """
    import zarr

    checked = _checked_store(store)  # a geopipe store: every chunk read is checked against its commit-time digest
    try:
        group = zarr.open_group(store, mode="r")
        rows = int(group.attrs.get("rows", group["keys"].shape[0]))
        keys_read = checked.keys[:] if checked is not None else group["keys"][:rows]
        index = {str(k): i for i, k in enumerate(np.asarray(keys_read).tolist())}
        available = list(group.attrs.get("meta_fields", []))
    except GeopipeError:
        raise  # a damaged chunk, named
    except Exception as exc:  # zarr raises several types for a missing / foreign path
        raise GeopipeError(f"cannot read embedding store {store!r} for admin labels ({type(exc).__name__}: {exc})") from None
    out: dict[str, list] = {}
    fields = {a: f for a, f in fields.items() if f in available or a not in optional}
    if not fields:
        raise GeopipeError(f"store {store!r} has none of the meta fields for admin labels; available: {available}; "
                           f"name them with --country-field/--region-field/--city-field")
    for area, field in fields.items():
        if field not in available:
            raise GeopipeError(f"store {store!r} has no meta field {field!r} for {area} labels; available: {available}")
        if checked is not None:  # JSON texts whatever the stored encoding ("" = absent)
            decoded = [_decode_meta(str(v)) for v in np.asarray(checked.meta[field][:]).tolist()]
        else:
            decoded = _raw_meta(store, group, field, rows)
        out[area] = [decoded[index[k]] if k in index else None for k in keys]
    return out


def _checked_store(store: str):
    """The store opened by geopipe's reader (digest-checked reads), or None for a Zarr group that
    is not a geopipe store (read as it is)."""
    from geopipe.pipeline.store.reader import StoreError, open_store

    try:
        return open_store(store)
    except StoreError:
        return None


def _raw_meta(store: str, group, field: str, rows: int) -> list:
    """Decoded labels of ``meta/<field>`` of a plain Zarr group; a chunk that cannot be decoded is
    one line naming the store and the field."""
    try:
        arr = group["meta"][field]
        raw = np.asarray(arr[:rows]).tolist()
        if arr.attrs.get("encoding") in ("number", "integer"):  # float64 numbers (schemas/store.py): their JSON texts
            texts = group["meta"][field + META_TEXT_SUFFIX][:rows] if field in group.attrs.get(META_TEXT_ATTR, []) else None
            raw = meta_as_json(np.asarray(raw), arr.attrs["encoding"], texts).tolist()
    except Exception as exc:  # codecs raise RuntimeError, ValueError, ...: the bytes on disk are damaged
        raise GeopipeError(f"store {store}: cannot read meta/{field} ({type(exc).__name__}: {exc}); "
                           f"run `geopipe store verify {store}`") from None
    if arr.attrs.get("encoding") == "string":  # the strings themselves (schemas/store.py)
        return [str(v) if v != "" else None for v in raw]
    return [_decode_meta(str(v)) for v in raw]
