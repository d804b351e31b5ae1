"""Decoding WebDataset samples in DataLoader workers, with per-sample fault isolation.

Each worker owns whole shards (shard ``i`` goes to worker ``i % num_workers``) and yields
:data:`ShardPart` dicts in sample order, so the consumer can reassemble every shard exactly in
tar order whatever the number of workers. A bad sample never raises inside a worker: it
becomes a :class:`~geopipe.pipeline.store.rejects.Reject` carried in the part that follows it.

A part is a plain dict (so DataLoader pin-memory handles it)::

    shard    int        position of the shard in the dataset's url list
    seq      int        0, 1, 2, ... within the shard
    last     bool       True on the shard's final part (always sent, possibly empty)
    idx      list[int]  sample index within the shard of each row
    images   Tensor (b, 3, H, W) float preprocessed images — or, when the spec names an
             ``embedding_key``, (b, D) float32 precomputed embeddings — or None when b == 0
    keys     list[str]  (b,)
    latlon   list[(lat, lon)]  degrees, validated, not yet wrapped; (NaN, NaN) for an unlabelled
             record (no json, or a json with neither coordinate: see :func:`parse_record`)
    meta     list[dict[str, str]]  JSON-encoded extra fields per row
    rejects  list[(int, Reject)]   (sample index, reject); corrupt_shard uses index len(samples)
    n_samples int       samples consumed (rows + rejects) in this part
    sha256   str | None  on the last part: sha256 hex of the shard file's bytes (None if unreadable)
"""

from __future__ import annotations

import functools
import io
import json
import math
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from geopipe.pipeline.core.errors import ConfigError
from geopipe.pipeline.core.limits import MAX_IMAGE_PIXELS, MAX_MEMBER_BYTES
from geopipe.pipeline.ingest.shards import CorruptShardError, iter_tar_samples
from geopipe.pipeline.sphere.geometry import LAT_LIMIT, LON_LIMIT, coordinate_problem
from geopipe.pipeline.store.reader import META_NAME
from geopipe.pipeline.store.rejects import Reject

__all__ = ["IMAGE_EXTS", "SampleError", "SampleSpec", "ShardPart", "parse_record", "decode_image", "decode_embedding",
           "find_embed_dim", "ShardBatches"]

#: Sample extensions read as the image, in order of preference.
IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
_SCALARS = (str, int, float, bool, type(None))
_UNLABELLED = (math.nan, math.nan)  # the store's latlon of a record without a location
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")

ShardPart = dict  # documented in the module docstring


@dataclass(frozen=True)
class SampleSpec:
    """Where the label lives in a sample's json and which extra fields to carry.

    meta_fields: names to carry (JSON-encoded, any JSON value), or None for every scalar
    field other than the coordinates whose name is a valid array name (:data:`META_NAME`).
    embedding_key: sample extension holding a precomputed ``.npy`` embedding (e.g.
    ``"street_clip.npy"``) to read instead of decoding and embedding the image.
    max_member_bytes: largest tar member read (decompressed bytes, from its header; a bigger one
    is a ``member_too_large`` reject); max_image_pixels: largest image decoded (width × height;
    a bigger one is an ``image_too_large`` reject, found from the header before decoding).
    """

    lat_key: str = "latitude"
    lon_key: str = "longitude"
    meta_fields: tuple[str, ...] | None = None
    embedding_key: str | None = None
    max_member_bytes: int = MAX_MEMBER_BYTES
    max_image_pixels: int = MAX_IMAGE_PIXELS


class SampleError(ValueError):
    """A sample that cannot be used; ``reason`` is one of :data:`geopipe.schemas.rejects.REJECT_REASONS`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = _ADDRESS.sub("", " ".join(f"{type(exc).__name__}: {exc}".split()))  # reproducible rejects tables
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _coordinate(rec: dict, name: str, other: str, limit: float) -> float:
    value = rec.get(name)
    if value is None:
        how = "is null" if name in rec else "field is absent"
        raise SampleError("missing_coordinates", f"json {name!r} {how} but {other!r} is given (an unlabelled record has neither)")
    problem = coordinate_problem(value, name, limit)
    if problem is not None:
        raise SampleError(*problem)
    return float(value)


def _coordinates(rec: dict, spec: SampleSpec) -> tuple[float, float]:
    """(lat, lon) degrees of a json object; (NaN, NaN) when it has neither coordinate (both keys
    absent or null): an unlabelled record. One without the other is a reject."""
    if rec.get(spec.lat_key) is None and rec.get(spec.lon_key) is None:
        return _UNLABELLED
    return _coordinate(rec, spec.lat_key, spec.lon_key, LAT_LIMIT), _coordinate(rec, spec.lon_key, spec.lat_key, LON_LIMIT)


def parse_record(raw: bytes | None, spec: SampleSpec) -> tuple[tuple[float, float], dict[str, str]]:
    """A sample's json bytes → ((lat, lon) degrees, {field: JSON-encoded value}).

    A sample without json, or whose json has neither coordinate (keys absent or null), is an
    *unlabelled record*: (NaN, NaN) (schemas/store.py). Raises :class:`SampleError`
    (invalid_json; missing_coordinates: one coordinate without the other; invalid_coordinates:
    NaN, infinite, out of range or not a number).
    """
    if raw is None:
        return _UNLABELLED, {}
    try:
        rec = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, absurd nesting
        raise SampleError("invalid_json", _one_line(exc)) from None
    if not isinstance(rec, dict):
        raise SampleError("invalid_json", f"json is a {type(rec).__name__}, not an object")
    latlon = _coordinates(rec, spec)
    if spec.meta_fields is None:
        skip = (spec.lat_key, spec.lon_key)
        items = [(k, v) for k, v in rec.items() if k not in skip and isinstance(v, _SCALARS) and META_NAME.match(k)]
    else:
        items = [(k, rec[k]) for k in spec.meta_fields if k in rec]
    return latlon, {k: json.dumps(v, ensure_ascii=False) for k, v in items}


def decode_image(raw: bytes, preprocess: Callable[[Any], torch.Tensor], max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Image bytes → preprocessed (3, H, W) tensor; raises :class:`SampleError` (corrupt_image;
    image_too_large when width × height, read from the header before decoding, is over
    ``max_pixels``: a decompression bomb never reaches memory)."""
    from PIL import Image

    if not raw:
        raise SampleError("corrupt_image", "image entry is empty (0 bytes)")
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels  # a raised limit: Pillow's own bomb check must not refuse first
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the check below names the limit
            img = Image.open(io.BytesIO(raw))
        with img:
            width, height = img.size
            if width * height > max_pixels:
                raise SampleError("image_too_large", _too_many_pixels(width, height, max_pixels))
            img.load()  # decode fully now: truncated data fails here, not later
            rgb = img.convert("RGB")
        return preprocess(rgb)
    except SampleError:
        raise
    except Image.DecompressionBombError:  # over twice Pillow's threshold: refused inside open()
        raise SampleError("image_too_large", f"image over {2 * Image.MAX_IMAGE_PIXELS} pixels, over the {max_pixels} "
                          "pixel limit (raise it with --max-image-pixels)") from None
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise SampleError("corrupt_image", _one_line(exc)) from None


def _too_many_pixels(width: int, height: int, limit: int) -> str:
    return f"image is {width} x {height} = {width * height} pixels, over the {limit} pixel limit (raise it with --max-image-pixels)"


def decode_embedding(raw: bytes | None, embed_dim: int | None, name: str = "npy") -> np.ndarray:
    """``.npy`` bytes of one embedding, shape (D,) or (1, D) → (D,) float32.

    Raises :class:`SampleError` (invalid_embedding) for a missing entry, unreadable bytes, a
    non-numeric array or a width other than ``embed_dim`` (None accepts any width).
    Non-finite values are left to the store writer's check.
    """
    if raw is None:
        raise SampleError("invalid_embedding", f"sample has no {name!r} entry")
    try:
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception as exc:  # ValueError, EOFError, UnpicklingError, ...
        raise SampleError("invalid_embedding", f"{name}: {_one_line(exc)}") from None
    if arr.dtype.kind not in "fiu" or arr.ndim not in (1, 2) or (arr.ndim == 2 and arr.shape[0] != 1):
        raise SampleError("invalid_embedding", f"{name}: expected a (D,) or (1, D) numeric array, got {arr.shape} {arr.dtype}")
    arr = arr.reshape(-1).astype(np.float32)
    if embed_dim is not None and arr.shape[0] != embed_dim:
        raise SampleError("invalid_embedding", f"{name}: width {arr.shape[0]} differs from the store's {embed_dim}")
    return arr


def find_embed_dim(urls: Sequence[str], embedding_key: str) -> int:
    """Width D of the first decodable ``embedding_key`` entry in ``urls`` (read in order).

    Raises ValueError when no shard holds one (the store needs D before anything is written).
    """
    for url in urls:
        try:
            for sample in iter_tar_samples(url):
                try:
                    return int(decode_embedding(sample.get(embedding_key), None, embedding_key).shape[0])
                except SampleError:
                    continue
        except CorruptShardError:
            continue
    raise ConfigError(f"no sample in {len(urls)} shard(s) has a readable {embedding_key!r} entry; "
                     f"check the embedding key (an extension such as 'street_clip.npy')")


def _image_bytes(sample: dict) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise SampleError("missing_image", f"sample has no image entry ({'/'.join(IMAGE_EXTS)}); has {sorted(k for k in sample if k != '__key__')}")


class ShardBatches(torch.utils.data.IterableDataset):
    """Iterable of :data:`ShardPart` dicts over ``urls`` (see the module docstring).

    preprocess: PIL.Image → (3, H, W) tensor (the backbone's eval transform); unused when
    ``spec.embedding_key`` is set, in which case ``embed_dim`` is the expected width D.
    batch_size: rows per part (a shard's last part may hold fewer); parts never span shards,
    so a shard's batches — and hence its embeddings — do not depend on the worker count.
    samples(url, info): a url's samples (default :func:`iter_tar_samples`; image folders:
    :class:`geopipe.pipeline.ingest.sources.SampleReader`, picklable). A sample's ``__url__``
    (its own file) names it in rejects; its ``__error__`` (reason, detail) makes it one.
    """

    def __init__(self, urls: Sequence[str], preprocess: Callable | None, spec: SampleSpec, batch_size: int,
                 embed_dim: int | None = None, samples: Callable[[str, dict], Iterator[dict]] | None = None):
        super().__init__()
        self.urls, self.preprocess, self.spec, self.batch_size = list(urls), preprocess, spec, int(batch_size)
        self.embed_dim = embed_dim
        self.samples = samples or functools.partial(iter_tar_samples, max_member=spec.max_member_bytes)

    def __iter__(self) -> Iterator[ShardPart]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for pos, url in enumerate(self.urls):
            if pos % workers == worker:
                yield from self._shard(pos, url)

    def _part(self, pos: int, seq: int, rows: list, rejects: list, n: int, last: bool) -> ShardPart:
        stack = (lambda xs: torch.from_numpy(np.stack(xs))) if self.spec.embedding_key else torch.stack
        return {
            "shard": pos, "seq": seq, "last": last, "n_samples": n,
            "idx": [r[0] for r in rows],
            "images": stack([r[1] for r in rows]) if rows else None,
            "keys": [r[2] for r in rows],
            "latlon": [r[3] for r in rows],
            "meta": [r[4] for r in rows],
            "rejects": rejects,
        }

    def _decode(self, sample: dict):
        ekey = self.spec.embedding_key
        if ekey:
            return decode_embedding(sample.get(ekey), self.embed_dim, ekey)
        return decode_image(_image_bytes(sample), self.preprocess, self.spec.max_image_pixels)

    def _shard(self, pos: int, url: str) -> Iterator[ShardPart]:
        rows, rejects, seq, n, idx, info = [], [], 0, 0, 0, {}
        samples = self.samples(url, info)
        while True:
            try:
                sample = next(samples)
            except StopIteration:
                break
            except CorruptShardError as exc:
                rejects.append((idx, Reject(exc.last_key, url, "corrupt_shard", exc.detail)))
                n += 1
                break
            key = sample["__key__"]
            try:
                if "__error__" in sample:  # a file the reader could not read
                    raise SampleError(*sample["__error__"])
                latlon, meta = parse_record(sample.get("json"), self.spec)
                rows.append((idx, self._decode(sample), key, latlon, meta))
            except SampleError as bad:
                rejects.append((idx, Reject(key, sample.get("__url__", url), bad.reason, bad.detail)))
            idx, n = idx + 1, n + 1
            if len(rows) == self.batch_size:
                yield self._part(pos, seq, rows, rejects, n, False)
                rows, rejects, seq, n = [], [], seq + 1, 0
        yield {**self._part(pos, seq, rows, rejects, n, True), "sha256": info.get("sha256")}
