"""Image files: finding them (:func:`list_files`, names, sizes and mtimes only) and reading them as
samples, one folder's photos one at a time, labelled by sidecar json or EXIF GPS.

An :class:`ImageSource` is a few hundred to ``per_source`` image files of one folder (built by
:mod:`geopipe.pipeline.ingest.sources`); :func:`iter_image_samples` yields them as
WebDataset-like samples, so :class:`geopipe.pipeline.ingest.decode.ShardBatches` decodes them
like a tar's::

    __key__   the file's path relative to the argument's root, without its extension
    __url__   the file's full path or url (rejects name it)
    <ext>     the image bytes (``jpg`` for formats outside decode.IMAGE_EXTS: PIL reads the bytes' own format)
    json      the label record: the sidecar ``<stem>.json``'s fields and/or EXIF GPS coordinates
              (``label_source``: "sidecar" | "exif"), plus ``file`` (the relative path) and
              ``datetime_original`` (EXIF DateTimeOriginal, ISO 8601) when known
    __error__ (reason, detail) instead of the bytes when the file could not be read

Labels (:data:`LABELS`): ``auto`` = the sidecar's coordinates, else a place-recognition file
name (``@utm_east@utm_north@zone@letter@lat@lon@pano@tile@heading@…@.jpg``, parsed by
:mod:`geopipe.pipeline.vpr.names` into typed UTM, lat/lon, heading, capture id and timestamp),
else EXIF GPS, else none (an unlabelled record); ``sidecar`` / ``exif`` = only that one;
``vpr-name`` = only the file name, and a name that does not parse is an ``invalid_name`` reject
with the reason; ``none`` = never read labels (blind geolocation: no sidecar is opened and GPS
is ignored; ``file`` and ``datetime_original`` stay).
EXIF GPS without a fix (GPSStatus "V", exactly (0, 0), out of range or undefined) is no label.
"""

from __future__ import annotations

import datetime
import glob
import hashlib
import io
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from geopipe.pipeline.core import fsio
from geopipe.pipeline.store.format import ShardStat
from geopipe.pipeline.vpr.names import VprNameError, name_label

__all__ = ["IMAGE_FILE_EXTS", "LABELS", "ImageSource", "list_files", "list_sidecars", "iter_image_samples", "image_source_sha256",
           "exif_fields"]


def _optional_exts() -> tuple[str, ...]:
    """AVIF when this Pillow was built with it; HEIC/HEIF when pillow-heif is installed (found
    without importing either: the CLI imports this module)."""
    from importlib.util import find_spec

    avif = ("avif",) if find_spec("PIL._avif") is not None else ()
    return avif + (("heic", "heif") if find_spec("pillow_heif") is not None else ())


#: File extensions (lower case) read as images from folders, globs and file arguments.
IMAGE_FILE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "jpe", "jfif", "png", "webp", "tif", "tiff", "bmp", "gif") + _optional_exts()
#: How image files are labelled (see the module docstring); ``auto`` is the default.
LABELS: tuple[str, ...] = ("auto", "sidecar", "exif", "vpr-name", "none")
_DECODE_EXTS = ("jpg", "jpeg", "png", "webp")  # decode.IMAGE_EXTS: the entries ShardBatches looks for
_GPS_IFD, _EXIF_IFD = 0x8825, 0x8769
_DATETIME_ORIGINAL, _OFFSET_ORIGINAL = 36867, 36881
_EXIF_TIME = re.compile(r"^(\d{4}):(\d{2}):(\d{2})[ T](\d{2}:\d{2}:\d{2})$")


@dataclass(frozen=True)
class ImageSource:
    """Image files of one folder, extracted together as one store record (a "shard").

    url: the stable name ``<root>#<first file>[:<last file name>]`` (file names with ``%``, ``#``
    or ``:`` escaped); root: the argument's root folder (absolute path or fsspec url), keys are
    paths relative to it; files: (image path, sidecar ``.json`` path or None) relative to root,
    in name order; stat: bytes and newest mtime of the images and the sidecars read.
    """

    url: str
    root: str
    files: tuple[tuple[str, str | None], ...]
    stat: ShardStat


def _reads_sidecar(labels: str) -> bool:
    return labels in ("auto", "sidecar")


def _one_line(exc: BaseException) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= 200 else text[:197] + "..."


def _dms(value) -> float:
    """EXIF degrees: (deg, min, sec) rationals, or one rational of decimal degrees."""
    parts = [float(v) for v in (value if isinstance(value, (tuple, list)) else (value,))]
    if not 1 <= len(parts) <= 3:
        raise ValueError(f"{len(parts)} GPS parts")
    return sum(p / 60.0 ** i for i, p in enumerate(parts))


def _ref(value, negative: str) -> float:
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value or "")
    return -1.0 if text.strip("\x00 ").upper().startswith(negative) else 1.0


def _gps(gps) -> tuple[float, float] | None:
    """(lat, lon) degrees of an EXIF GPS IFD, or None when it holds no usable fix."""
    try:
        status = gps.get(9)
        if status is not None and _ref(status, "V") < 0:  # "V": void measurement
            return None
        lat, lon = _dms(gps[2]) * _ref(gps.get(1), "S"), _dms(gps[4]) * _ref(gps.get(3), "W")
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    if not (math.isfinite(lat) and math.isfinite(lon)) or abs(lat) > 90 or abs(lon) > 180 or (lat == 0 and lon == 0):
        return None
    return lat, lon


def _when(value, offset) -> str | None:
    """EXIF ``YYYY:MM:DD HH:MM:SS`` (+ OffsetTimeOriginal) → ``YYYY-MM-DDTHH:MM:SS[+hh:mm]``."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    text = str(value or "").strip("\x00 ")
    m = _EXIF_TIME.match(text)
    if not m:
        return text or None
    tz = str(offset or "").strip("\x00 ")
    return f"{m[1]}-{m[2]}-{m[3]}T{m[4]}" + (tz if re.fullmatch(r"[+-]\d{2}:\d{2}|Z", tz) else "")


def exif_fields(raw: bytes) -> tuple[tuple[float, float] | None, str | None]:
    """(GPS (lat, lon) degrees or None, DateTimeOriginal as ISO 8601 or None) of image bytes;
    (None, None) when the bytes hold no readable EXIF (never raises: decoding judges the image)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as img:  # the header only: no pixels are decoded
            exif = img.getexif()
            gps, sub = exif.get_ifd(_GPS_IFD), exif.get_ifd(_EXIF_IFD)
            return _gps(gps), _when(sub.get(_DATETIME_ORIGINAL), sub.get(_OFFSET_ORIGINAL))
    except Exception:  # PIL raises many types on odd EXIF; no EXIF is no label
        return None, None


def _record(rel: str, sidecar: bytes | None, raw: bytes, labels: str, lat_key: str, lon_key: str, named: dict | None = None) -> bytes:
    """The sample's json: the sidecar's object (bytes that are not one are passed on as they are,
    for decode to reject) with the file name's VPR record (``named``) then EXIF GPS as the
    fallback labels, ``file`` and ``datetime_original``."""
    rec: dict = {}
    if sidecar is not None:
        try:
            rec = json.loads(sidecar)
        except (ValueError, RecursionError):
            return sidecar
        if not isinstance(rec, dict):
            return sidecar
    gps, when = exif_fields(raw)
    if rec.get(lat_key) is not None or rec.get(lon_key) is not None:
        rec.setdefault("label_source", "sidecar")
    elif named is not None:
        named = dict(named)
        rec[lat_key], rec[lon_key] = named.pop("latitude"), named.pop("longitude")
        rec.update(named)
    elif labels in ("auto", "exif") and gps is not None:
        rec[lat_key], rec[lon_key] = gps
        rec["label_source"] = "exif"
    rec.setdefault("file", rel)
    if when:
        rec.setdefault("datetime_original", when)
    return json.dumps(rec, ensure_ascii=False).encode()


def _entry(rel: str) -> str:
    ext = rel.rsplit(".", 1)[-1].lower()
    return ext if ext in _DECODE_EXTS else _DECODE_EXTS[0]


def _register_heif(rel: str) -> None:
    if rel.lower().endswith((".heic", ".heif")):
        import pillow_heif

        pillow_heif.register_heif_opener()


def iter_image_samples(src: ImageSource, labels: str = "auto", lat_key: str = "latitude", lon_key: str = "longitude",
                       info: dict | None = None) -> Iterator[dict]:
    """Yield the samples of ``src`` in file order (see the module docstring), one file in memory
    at a time. A file that cannot be read is a sample with ``__error__`` (a corrupt_image reject;
    an unreadable sidecar: invalid_json), never an exception. info: receives ``info["sha256"]``,
    the source's content digest (:func:`image_source_sha256`; None when a file was unreadable),
    once the generator is exhausted."""
    digest, ok = hashlib.sha256(), True
    if info is not None:
        info["sha256"] = None
    for rel, side in src.files:
        path = fsio.join(src.root, rel)
        sample = {"__key__": rel.rsplit(".", 1)[0], "__url__": path}
        try:
            raw = fsio.read_bytes(path)
        except Exception as exc:  # vanished, permissions, network: this file only
            ok = False
            yield {**sample, "__error__": ("corrupt_image", f"cannot read the file: {_one_line(exc)}")}
            continue
        sidecar = None
        if side is not None and _reads_sidecar(labels):
            try:
                sidecar = fsio.read_bytes(fsio.join(src.root, side))
            except Exception as exc:
                ok = False
                yield {**sample, "__error__": ("invalid_json", f"cannot read the sidecar {side}: {_one_line(exc)}")}
                continue
        _digest_file(digest, rel, raw, sidecar)
        _register_heif(rel)
        try:
            named = name_label(rel, labels == "vpr-name") if labels in ("auto", "vpr-name") else None
        except VprNameError as exc:
            yield {**sample, "__error__": ("invalid_name", str(exc))}
            continue
        yield {**sample, _entry(rel): raw, "json": _record(rel, sidecar, raw, labels, lat_key, lon_key, named)}
    if info is not None:
        info["sha256"] = digest.hexdigest() if ok else None


def _digest_file(digest, rel: str, raw: bytes, sidecar: bytes | None) -> None:
    side = hashlib.sha256(sidecar).hexdigest() if sidecar is not None else ""
    digest.update(f"{rel}\0{hashlib.sha256(raw).hexdigest()}\0{side}\n".encode())


def image_source_sha256(src: ImageSource, labels: str = "auto") -> str:
    """sha256 hex over ``src``'s file paths and the sha256 of each image and of each sidecar
    read under ``labels``: changes when a file is renamed, added, removed or edited (the digest
    :func:`iter_image_samples` reports, computed here without decoding)."""
    digest = hashlib.sha256()
    for rel, side in src.files:
        sidecar = fsio.read_bytes(fsio.join(src.root, side)) if side is not None and _reads_sidecar(labels) else None
        _digest_file(digest, rel, fsio.read_bytes(fsio.join(src.root, rel)), sidecar)
    return digest.hexdigest()


# --------------------------------------------------------------------------- finding files (names, sizes, mtimes)


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def _glob_root(path: str) -> str:
    """The folder of a glob before its first wildcard component ("/"-separated)."""
    parts = path.split("/")
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    return "/".join(parts[:fixed]) or ("/" if path.startswith("/") else ".")


def list_files(path: str, wanted: Callable[[str], bool]) -> tuple[str, str, list[tuple[str, int, float | None, str]]]:
    """What one path names, without reading any file: (kind "file" | "dir" | "glob" | "none", root,
    [(path relative to root ("/"-separated), size in bytes, mtime or None, full path or url)]).

    root: the folder itself, a glob's folder before its first wildcard, a file's folder. Folders
    (named, or matched by a glob) are walked recursively for files whose name ``wanted`` accepts;
    hidden files and folders (".name") are skipped; a glob keeps every file it matched. Sorted.
    """
    if not fsio.is_local(path):
        return _list_remote(path, wanted)
    if glob.has_magic(path):
        root, files = os.path.abspath(_glob_root(path.replace(os.sep, "/"))), []
        for match in sorted(glob.glob(path, recursive=True)):
            full = os.path.abspath(match)
            files.extend(_walk_local(full, root, wanted) if os.path.isdir(full) else _local_file(full, root))
        return "glob", root, [f for f in files if not _hidden(f[0])]
    full = os.path.abspath(path)
    if os.path.isdir(full):
        return "dir", full, _walk_local(full, full, wanted)
    if os.path.isfile(full):
        return "file", os.path.dirname(full), _local_file(full, os.path.dirname(full))
    return "none", full, []


def _local_file(full: str, root: str) -> list:
    if not os.path.isfile(full):
        return []
    st = os.stat(full)
    return [(os.path.relpath(full, root).replace(os.sep, "/"), st.st_size, st.st_mtime, full)]


def _walk_local(top: str, root: str, wanted) -> list:
    out = []
    for folder, dirs, names in os.walk(top):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith(".") and wanted(name):
                out.extend(_local_file(os.path.join(folder, name), root))
    return out


def _list_remote(path: str, wanted) -> tuple[str, str, list]:
    fs, p = fsio.url_to_fs(path)

    def walk(folder: str) -> dict:
        return {n: i for n, i in fs.find(folder, detail=True).items() if wanted(n.rsplit("/", 1)[-1])}

    if glob.has_magic(p):
        kind, root, found = "glob", _glob_root(p), {}
        for name, info in fs.glob(p, detail=True).items():
            found.update(walk(name) if info.get("type") == "directory" else {name: info})
    elif fs.isdir(p):
        kind, root, found = "dir", p.rstrip("/"), walk(p)
    elif fs.isfile(p):
        kind, root, found = "file", p.rsplit("/", 1)[0], {p: fs.info(p)}
    else:
        return "none", path, []
    files = [(name[len(root):].lstrip("/"), int(info.get("size") or 0), _info_mtime(info), fs.unstrip_protocol(name))
             for name, info in sorted(found.items())]
    return kind, fs.unstrip_protocol(root), [f for f in files if not _hidden(f[0])]


def _info_mtime(info: Mapping) -> float | None:
    """Modification time of an fsspec info dict (seconds), whatever the filesystem calls it."""
    for name in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, datetime.datetime):
            return value.timestamp()
    return None


def list_sidecars(folder: str) -> dict[str, tuple[str, int, float | None]]:
    """stem → (name, size, mtime) of the json files directly in ``folder``."""
    folder, out = fsio.normalize(folder), {}
    if fsio.is_local(folder):
        entries = [(e.name, e.stat()) for e in os.scandir(folder) if e.name.endswith(".json") and e.is_file()]
        return {name[:-5]: (name, st.st_size, st.st_mtime) for name, st in entries if not name.startswith(".")}
    fs, p = fsio.url_to_fs(folder)
    for info in fs.ls(p, detail=True):
        name = info["name"].rstrip("/").rsplit("/", 1)[-1]
        if info.get("type") == "file" and name.endswith(".json") and not name.startswith("."):
            out[name[:-5]] = (name, int(info.get("size") or 0), _info_mtime(info))
    return out
