"""Writing a predictions file: the overwrite rule and the streaming writer every stage uses.

:func:`check_output` is the rule for every output a command writes: an existing file is
replaced only when the user said so (``--overwrite``), otherwise the command stops in one line
before doing any work. :class:`PredictionsStream` writes a predictions file block by block (one
row group per block) into a hidden temporary file beside the output (local paths; in the
temporary directory for fsspec URLs), so memory holds one block, never the file; the footer gets
the final key-value metadata — the ``geopipe`` record, whose numbers may be known only at the
end, and the GeoParquet ``bbox`` of every block — and the file is then moved into place in one
step: readers see the old file or the new one, never half. Without ``overwrite`` the move is a
hard link that fails if the output appeared meanwhile (another run), so nothing is ever replaced
silently. A remote URL gets one upload. An error, or leaving the ``with`` block without
:meth:`PredictionsStream.finish`, removes the temporary file and leaves the output untouched.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from geopipe.pipeline.artifacts.geoparquet import BboxAccumulator
from geopipe.pipeline.artifacts.predictions import WRITE_OPTIONS, conform, predictions_table
from geopipe.pipeline.core import fsio
from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.core.lockfile import DirLock, NullLock
from geopipe.schemas.predictions import PREDICTIONS_SCHEMA

__all__ = ["check_output", "output_lock", "PredictionsStream"]


def check_output(path: str, overwrite: bool, *, option: str = "-o", example: str = "predictions.parquet") -> None:
    """Refuse (GeopipeError, one line) an output ``path`` that is a directory, or that exists
    when ``overwrite`` is false; ``option`` and ``example`` name the option and a file name in
    the message."""
    path = fsio.normalize(str(path))
    if fsio.is_local(path) and os.path.isdir(path):
        raise GeopipeError(f"output {path!r} is a directory; give a file path such as {os.path.join(path, example)!r}")
    if not overwrite and fsio.exists(path):
        raise GeopipeError(f"{path} exists; pass --overwrite to replace it, or choose another {option}")


def output_lock(path: str, *, dataset: bool, command: str = "predict or locate") -> DirLock | NullLock:
    """The exclusive run marker of the output ``path``, to hold while writing it: ``<path>/.lock``
    for a dataset directory (made here), ``.<name>.lock`` beside a file; a second writer's
    ``acquire`` is refused at once in one line naming the process holding it (the kernel drops
    a dead holder's lock). Object-store URLs have no locks (:class:`NullLock`)."""
    path = fsio.normalize(str(path))
    if not fsio.is_local(path):
        return NullLock(path)
    holder = f"another {command} is writing it"
    if dataset:
        fsio.makedirs(path, "predictions folder")  # a location that cannot take it: one line
        return DirLock(path, ".lock", target=path, holder=holder)
    parent, name = os.path.split(os.path.abspath(path))
    fsio.makedirs(parent, "the output folder")
    return DirLock(parent, f".{name}.lock", target=path, holder=holder)


def _publish(tmp: str, path: str, overwrite: bool) -> None:
    """Move the finished local file ``tmp`` to ``path`` in one step; without ``overwrite`` never
    over an existing file (a hard link fails when ``path`` exists, atomically)."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise GeopipeError(f"{path} was created by another run while this one wrote it; pass --overwrite to replace it, "
                           "or choose another -o") from None
    except OSError:  # a filesystem without hard links: check, then rename (a race here is the user's two runs)
        if os.path.exists(path):
            raise GeopipeError(f"{path} exists; pass --overwrite to replace it, or choose another -o") from None
        os.replace(tmp, path)
    else:
        os.unlink(tmp)


class PredictionsStream:
    """``with PredictionsStream(path) as out: out.write(columns, n) …; out.finish(metadata)``.

    ``overwrite``: replace an existing ``path`` (else GeopipeError at once, and at the end should
    another run have written it meanwhile)."""

    def __init__(self, path: str, *, overwrite: bool = False):
        self.path = fsio.normalize(str(path))
        self.overwrite = bool(overwrite)
        check_output(self.path, self.overwrite)
        local = fsio.is_local(self.path)
        where = os.path.dirname(os.path.abspath(self.path)) if local else tempfile.gettempdir()
        self._tmp = fsio.temporary_beside(os.path.join(where, os.path.basename(self.path)))  # one line if it cannot be made
        self._writer = pq.ParquetWriter(self._tmp, PREDICTIONS_SCHEMA, **WRITE_OPTIONS)
        self._bbox = BboxAccumulator()
        self.rows = 0

    @property
    def temporary(self) -> str:
        """The hidden file the row groups go to until :meth:`finish`."""
        return self._tmp

    def write(self, columns: Mapping, n: int) -> None:
        """Append ``n`` rows (columns as :func:`predictions_table` takes them) as one row group."""
        self.write_table(predictions_table(columns, n))

    def write_table(self, table: pa.Table) -> None:
        """Append a :data:`PREDICTIONS_SCHEMA` table as one row group (written to disk now)."""
        table = conform(table)
        self._writer.write_table(table)
        self._bbox.add(table)
        self.rows += table.num_rows

    def finish(self, metadata: Mapping[bytes, bytes]) -> None:
        """Write the footer with ``metadata`` (its ``geo`` entry gets the bbox of all rows) and move
        the file into place; the temporary file is gone afterwards whatever happens."""
        try:
            self._writer.add_key_value_metadata(self._bbox.metadata(metadata))
            self._writer.close()
            fd = os.open(self._tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            if fsio.is_local(self.path):
                _publish(self._tmp, self.path, self.overwrite)
            else:
                if not self.overwrite and fsio.exists(self.path):
                    raise GeopipeError(f"{self.path} exists; pass --overwrite to replace it, or choose another -o")
                fs, path = fsio.url_to_fs(self.path)
                parent = path.rsplit("/", 1)[0]
                if parent and parent != path:
                    fs.makedirs(parent, exist_ok=True)
                fs.put_file(self._tmp, path)
        finally:
            self.abort()

    def abort(self) -> None:
        """Close and remove the temporary file (the output is left as it was)."""
        self._writer.close()  # a second close does nothing
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)

    def __enter__(self) -> PredictionsStream:
        return self

    def __exit__(self, *exc) -> None:
        self.abort()
