"""What ``geopipe extract`` (and ``locate``) read: user arguments → sources, each one store record.

An argument is a WebDataset tar, an image file, a folder, a glob or a brace pattern of them
(local paths or fsspec urls). :func:`resolve_inputs` scans them once:

* a tar (``.tar``, ``.tar.gz``, ``.tgz``, ``.tar.bz2``, ``.tar.xz``; any file of a pattern that
  matched no image) is one source, as before;
* a folder is walked recursively (hidden files and folders skipped) for images
  (:data:`~geopipe.pipeline.ingest.images.IMAGE_FILE_EXTS`) and tars; image files, loose or
  matched by a glob, are grouped by folder and each folder's files, in name order, are split into
  :class:`~geopipe.pipeline.ingest.images.ImageSource` ranges of at most ``per_source`` files.

A record's key is the file's path relative to the argument's *root* without its extension: the
folder itself, a glob's folder before its first wildcard, a file's own folder. A json file beside
an image with the same stem is its sidecar label (see :mod:`~geopipe.pipeline.ingest.images`).

Incremental runs. An image source is named by the first and last file it was made of
(``<root>#<reldir>/<first>:<last>``, with ``%``, ``#``, ``:`` escaped in names), and
:meth:`Inputs.urls` is given the store's completion records and :func:`store_members` (the keys
each recorded source holds, rows and rejects): a file belongs to the recorded source holding its
key; files no source holds form new sources (in runs of name order, at most ``per_source``) that
are appended to the store — a photo added to a folder, wherever its name sorts, is extracted
alone instead of changing a source and re-extracting every later one. A recorded source whose
files were edited, removed or renamed is a changed source (``on_changed``): its total bytes or
newest mtime differ, or with ``verify_hash`` its digest of names and contents. Resumes are
stable: committed sources are recorded, the rest is split again exactly as before.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import unquote

from geopipe.pipeline.core import fsio
from geopipe.pipeline.core.errors import ConfigError, check_int
from geopipe.pipeline.core.limits import MAX_MEMBER_BYTES
from geopipe.pipeline.ingest.images import IMAGE_FILE_EXTS, LABELS, ImageSource, image_source_sha256, iter_image_samples, list_files, list_sidecars
from geopipe.pipeline.ingest.shards import ShardNotFoundError, file_sha256, iter_tar_samples, shard_stat
from geopipe.pipeline.store.format import ShardStat

__all__ = ["TAR_SUFFIXES", "PER_SOURCE", "Inputs", "SampleReader", "resolve_inputs", "store_members"]

#: File names read as WebDataset tars inside folders and image globs.
TAR_SUFFIXES: tuple[str, ...] = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
#: Default most image files per source (one store record, one resumable and Dask-parallel unit).
PER_SOURCE = 1000
_ESC = {"%": "%25", "#": "%23", ":": "%3A"}


def _esc(name: str) -> str:
    return "".join(_ESC.get(c, c) for c in name)


def _is_image(name: str) -> bool:
    return "." in name and name.rsplit(".", 1)[1].lower() in IMAGE_FILE_EXTS


def _is_tar(name: str) -> bool:
    return name.lower().endswith(TAR_SUFFIXES)


def _wanted(name: str) -> bool:
    """Files a folder walk keeps: images and tars."""
    return _is_image(name) or _is_tar(name)


@dataclass(frozen=True)
class SampleReader:
    """``reader(url, info)`` → the samples of source ``url``: its image files when ``images``
    holds it, else the tar's (:func:`~geopipe.pipeline.ingest.shards.iter_tar_samples`). Picklable
    (DataLoader and Dask workers); holds only the file lists of the sources given to it.
    max_member: largest tar member read (bytes; see :func:`iter_tar_samples`)."""

    images: Mapping[str, ImageSource] = field(default_factory=dict)
    labels: str = "auto"
    lat_key: str = "latitude"
    lon_key: str = "longitude"
    max_member: int = MAX_MEMBER_BYTES

    def __call__(self, url: str, info: dict | None = None) -> Iterator[dict]:
        src = self.images.get(url)
        if src is None:
            return iter_tar_samples(url, info, self.max_member)
        return iter_image_samples(src, self.labels, self.lat_key, self.lon_key, info)


class Inputs:
    """The scanned arguments (:func:`resolve_inputs`): tars and image folders in argument order."""

    def __init__(self, labels: str, per_source: int):
        self.labels, self.per_source = labels, per_source
        self._order: list[tuple[str, object]] = []  # ("tar", url) | ("images", (root, reldir))
        self._groups: dict[tuple[str, str], dict] = {}  # (root, reldir) → {file name: (size, mtime)}
        self._sidecars: dict[tuple[str, str], dict] = {}  # (root, reldir) → {stem: (json name, size, mtime)}
        self._seen: set[str] = set()
        self._made: dict[str, ImageSource] = {}

    @property
    def n_images(self) -> int:
        return sum(len(g) for g in self._groups.values())

    def urls(self, recorded: Iterable[str] = (), members: Callable[[str], Collection[str]] | None = None) -> list[str]:
        """Every source's url, in argument order (see the module docstring).

        recorded: the urls a store holds (its completion records); members(url): the keys that
        store recorded for such an image source (rows and rejects, :func:`store_members`). A file
        belongs to the recorded source holding its key; the others form new sources. Without
        ``members`` a recorded source holds the files now inside its name range.
        """
        spans: dict[tuple[str, str], list[tuple[str, str, str]]] = {}
        for url in recorded:
            parsed = _parse(url)
            if parsed is not None and parsed[:2] in self._groups:
                spans.setdefault(parsed[:2], []).append((*parsed[2:], url))
        out = []
        for kind, what in self._order:
            if kind == "tar":
                out.append(what)
                continue
            for src in self._sources(*what, sorted(spans.get(what, [])), members):
                self._made[src.url] = src
                out.append(src.url)
        return out

    def image_source(self, url: str) -> ImageSource | None:
        """The image source named ``url`` by :meth:`urls` (None for a tar)."""
        return self._made.get(url)

    def stat(self, url: str) -> ShardStat:
        """Size and mtime of a source (planning: which sources changed)."""
        src = self._made.get(url)
        return src.stat if src is not None else shard_stat(url)

    def sha256(self, url: str) -> str:
        """Content digest of a source (``verify_hash``): the tar's bytes, or the image source's
        :func:`~geopipe.pipeline.ingest.images.image_source_sha256`."""
        src = self._made.get(url)
        return image_source_sha256(src, self.labels) if src is not None else file_sha256(url)

    def reader(self, urls: Sequence[str] | None = None, lat_key: str = "latitude", lon_key: str = "longitude",
               max_member: int = MAX_MEMBER_BYTES) -> SampleReader:
        """A :class:`SampleReader` for ``urls`` (default: every source made so far)."""
        wanted = self._made if urls is None else {u: self._made[u] for u in urls if u in self._made}
        return SampleReader(dict(wanted), self.labels, lat_key, lon_key, max_member)

    def _sources(self, root: str, reldir: str, spans: list[tuple[str, str, str]], members) -> list[ImageSource]:
        """A folder's files split into its recorded sources (``spans``: (first, last, url)) and
        new ones of at most ``per_source`` files, each in name order, ordered by first file."""
        prefix = f"{reldir}/" if reldir else ""
        by_key = {}
        if members is not None:
            for *_, url in spans:
                by_key.update(dict.fromkeys(set(members(url)) - by_key.keys(), url))
        taken: dict[str, list[str]] = {}
        runs: list[list[str]] = [[]]  # new files, in runs not interrupted by a recorded one
        for name in sorted(self._groups[(root, reldir)]):
            if members is not None:
                owner = by_key.get((prefix + name).rsplit(".", 1)[0])
            else:
                owner = next((url for first, last, url in spans if first <= name <= last), None)
            if owner is None:
                runs[-1].append(name)
            else:
                taken.setdefault(owner, []).append(name)
                if runs[-1]:
                    runs.append([])
        made = [(names[0], self._image_source(root, reldir, names, url)) for url, names in taken.items()]
        n = self.per_source
        made += [(run[a], self._image_source(root, reldir, run[a:a + n])) for run in runs for a in range(0, len(run), n)]
        return [src for _, src in sorted(made, key=lambda t: t[0])]

    def _image_source(self, root: str, reldir: str, members: list[str], url: str | None = None) -> ImageSource:
        """The source of the files ``members`` (names in ``reldir``, sorted); url: its recorded name,
        or None for a new source (named by its first and last file)."""
        group, sidecars, prefix = self._groups[(root, reldir)], self._sidecars.get((root, reldir), {}), f"{reldir}/" if reldir else ""
        files, stats = [], []
        for name in members:
            side = sidecars.get(name.rsplit(".", 1)[0])
            stats += [group[name]] + ([side[1:]] if side is not None else [])
            files.append((prefix + name, prefix + side[0] if side is not None else None))
        size, known = sum(s for s, _ in stats), [m for _, m in stats if m is not None]
        first, last = members[0], members[-1]
        url = url or f"{root}#{_esc(prefix + first)}" + (f":{_esc(last)}" if last != first else "")
        return ImageSource(url, root, tuple(files), ShardStat(int(size), max(known) if known else None))

    # ------------------------------------------------------------------ scanning

    def add_tar(self, url: str) -> None:
        if url not in self._seen:
            self._seen.add(url)
            self._order.append(("tar", url))

    def add_image(self, root: str, rel: str, size: int, mtime: float | None) -> None:
        path = fsio.join(root, rel)
        if path in self._seen:  # the same file named by two arguments: the first one's key
            return
        self._seen.add(path)
        reldir, _, name = rel.rpartition("/")
        if (root, reldir) not in self._groups:
            self._groups[(root, reldir)] = {}
            self._order.append(("images", (root, reldir)))
        self._groups[(root, reldir)][name] = (size, mtime)

    def add_sidecars(self) -> None:
        """List the json files of every image folder (stem → (name, size, mtime)) when labels read sidecars."""
        if self.labels in ("auto", "sidecar"):
            for root, reldir in self._groups:
                self._sidecars[(root, reldir)] = list_sidecars(fsio.join(root, reldir) if reldir else root)


def _parse(url: str) -> tuple[str, str, str, str] | None:
    """``<root>#<reldir/first>[:<last>]`` → (root, reldir, first name, last name), or None."""
    root, sep, rest = url.rpartition("#")
    if not sep or not root or not rest or rest.count(":") > 1:
        return None
    first, _, last = rest.partition(":")
    reldir, _, first = unquote(first).rpartition("/")
    return root, reldir, first, unquote(last) if last else first


def store_members(store: str, records: Mapping[str, Mapping]) -> Callable[[str], set[str]]:
    """``members(url)``: the keys the store at ``store`` recorded for source ``url`` (one of
    ``records``, its completion records): its rows' keys and its rejects' keys — every file it
    read. The store's keys are read once, on first use (a new store's records are empty)."""
    from geopipe.pipeline.store.reader import open_store, rejects_part_path
    from geopipe.pipeline.store.rejects import read_rejects

    keys: list = []

    def members(url: str) -> set[str]:
        rec = records[url]
        if not keys:
            keys.append(open_store(store).keys[:])
        found = set(keys[0][rec["start"]:rec["stop"]].tolist())
        if rec.get("n_rejected"):
            found.update(read_rejects(rejects_part_path(store, rec["index"])).column("key").to_pylist())
        return found

    return members


def resolve_inputs(args: Sequence[str], *, labels: str = "auto", per_source: int = PER_SOURCE) -> Inputs:
    """Scan ``args`` (tars, image files, folders, globs, brace patterns; paths or fsspec urls)
    once: names, sizes and mtimes, no image bytes. Then :meth:`Inputs.urls` makes the sources.

    Raises ShardNotFoundError (a GeopipeError) for an argument that matches nothing (a folder
    without images or tars included), ConfigError for unknown ``labels`` or ``per_source`` < 1.
    """
    from braceexpand import braceexpand

    if labels not in LABELS:
        raise ConfigError(f"unknown labels {labels!r}; choose one of {list(LABELS)}")
    check_int(per_source, "per_source", 1)
    inputs = Inputs(labels, per_source)
    for arg in [args] if isinstance(args, str) else args:
        for path in braceexpand(arg):
            kind, root, files = list_files(fsio.normalize(path), _wanted)
            if not _add(inputs, kind, root, files):
                if kind == "dir":
                    raise ShardNotFoundError(f"folder {path} holds no image files ({', '.join(IMAGE_FILE_EXTS)}) or tars")
                raise ShardNotFoundError(f"{'image' if _is_image(path) else 'shard'} not found: {path} (check the path or brace pattern)")
    inputs.add_sidecars()
    return inputs


def _add(inputs: Inputs, kind: str, root: str, files: list[tuple[str, int, float | None, str]]) -> bool:
    """Add the files one path named: (rel, size, mtime, full). A named file that is not an image
    is a tar whatever its name (as before images were read); a folder's other files are ignored; a
    glob's are tars unless it matched images (then they are sidecars, raw files, notes...)."""
    if kind == "file":
        rel, size, mtime, full = files[0]
        inputs.add_image(root, rel, size, mtime) if _is_image(rel) else inputs.add_tar(full)
        return True
    files = [f for f in files if not f[0].endswith(".json")]
    images = [f for f in files if _is_image(f[0])]
    tars = [f for f in files if _is_tar(f[0]) or (kind == "glob" and not images and not _is_image(f[0]))]
    for rel, size, mtime, _ in images:
        inputs.add_image(root, rel, size, mtime)
    for *_, full in tars:
        inputs.add_tar(full)
    return bool(images or tars)
