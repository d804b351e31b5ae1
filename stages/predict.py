"""Predict stage: checkpoint + store → predictions (geopipe.schemas.predictions).

Records are split into partitions of the store's rows (whole stored chunks once the store is
large; a fixed minimum count of partitions for small stores, so every worker gets work);
the partition boundaries depend on the store and the options only, never on where they run.
Noise is seeded per batch from (seed, first row), so the numbers do not depend on how many
workers ran them.

Output: with ``--dask``, or an ``-o`` not ending in ``.parquet``, a Parquet *dataset
directory*: each partition is scored and written as ``part-<start>-<stop>.parquet`` by the
process that scored it (a Dask worker loads the model once: ``cached_predictor``), the client
receives only each part's row range and name, reads the part's footer (a few kB) and writes
``_metadata``/``_common_metadata`` last.
A rerun skips the parts already written, once each is read whole and found intact (its
recorded SHA-256, every page's checksum; a damaged part is said on stderr and scored again);
parts of other predictions are refused unless ``overwrite``. A run holds the output's lock
(:func:`geopipe.pipeline.artifacts.outputs.output_lock`) from before it loads the model to its
end: a second predict or locate into the same output is refused in one line. Otherwise (``-o x.parquet`` in process, the default) one file, streamed partition
by partition (one row group each, one partition in memory) into a hidden file beside it and
moved into place at the end; an existing file is refused unless ``overwrite``.
"""

from __future__ import annotations

import math
import pickle
import sys
import time
from dataclasses import asdict, dataclass

import pyarrow.parquet as pq

from geopipe.pipeline.artifacts.dataset import PartRecord, finish_dataset, read_part_footer, verified_parts, write_part
from geopipe.pipeline.artifacts.outputs import PredictionsStream, check_output, output_lock
from geopipe.pipeline.artifacts.predictions import DATASET_METADATA, list_parts, predictions_metadata
from geopipe.pipeline.core import fsio
from geopipe.pipeline.core.device import resolve_device
from geopipe.pipeline.core.errors import ConfigError, GeopipeError
from geopipe.pipeline.core.parallel import map_partitions, parse_dask_spec
from geopipe.pipeline.core.progress import Progress
from geopipe.pipeline.core.provenance import provenance
from geopipe.pipeline.infer.predictor import PredictOptions, cached_predictor, predict_rows
from geopipe.pipeline.store.reader import open_store
from geopipe.pipeline.store.space import store_space
from geopipe.schemas.predictions import METADATA_KEY

__all__ = ["PredictConfig", "PredictResult", "PartDone", "run_predict", "partition_bounds", "writes_dataset"]

#: Config fields that do not change the numbers (a rerun with other values resumes the dataset).
_VOLATILE = ("out", "dask", "device", "progress", "overwrite")


@dataclass(frozen=True)
class PredictConfig:
    """Options of ``geopipe predict``; sampling defaults as in docs/methods.md#samplers
    (16 steps, guidance 2). ``min_partitions``: split small stores into at least this many
    partitions (at least one row each)."""

    checkpoint: str
    store: str
    out: str
    steps: int = 16
    guidance: float = 2.0
    sampler: str | None = None
    samples: int = 0
    ensemble: int = 0
    nll: bool = False
    localizability: int = 0
    rtol: float = 1e-5  # tolerances and solver of the likelihood ODE (README, "Likelihood cost")
    atol: float = 1e-4
    likelihood_every: int = 1  # exact NLL / localizability for every k-th store row only (others null)
    batch_size: int = 4096
    partition_batches: int = 8
    min_partitions: int = 16
    seed: int = 3407
    overwrite: bool = False  # an existing file, or a dataset of other predictions, at ``out`` is replaced instead of refused
    dask: str | None = None  # None: in process; "local:N": LocalCluster(N); else a scheduler address
    device: str = "auto"
    progress: bool = True
    uncertainty_checkpoint: str | None = None  # BayesCap checkpoint: adds log_u, log_u_alea, log_u_epi
    mc_passes: int = 15  # MC-dropout passes of those scores
    region: float | None = None  # mass q: each record's q-HDR polygon and its mass and area (columns region, region_mass, region_area_km2)
    region_density: str = "auto"  # exact | kde | auto (exact for closed-form densities, a KDE of the draws for flows)
    solver: str = "bosh3"  # adaptive ODE solver of the likelihoods (dopri5, bosh3, adaptive_heun, dopri8)

    def __post_init__(self) -> None:
        self.options()  # sampling options: ConfigError naming the option
        for name in ("batch_size", "partition_batches", "min_partitions", "mc_passes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be a whole number >= 1, got {v!r}")
        if self.dask:
            parse_dask_spec(self.dask)  # local:0, malformed specs: refused before anything loads

    def options(self) -> PredictOptions:
        return PredictOptions(self.steps, self.guidance, self.sampler, self.samples, self.ensemble,
                              self.nll, self.localizability, self.rtol, self.atol, self.likelihood_every, self.region,
                              self.region_density, solver=self.solver)


@dataclass(frozen=True)
class PredictResult:
    """``largest_reply_bytes``: the largest result one partition sent back to this process."""

    out: str
    n_records: int
    seconds: float
    records_per_s: float
    parts_written: int = 0
    parts_skipped: int = 0
    largest_reply_bytes: int = 0
    n_unlabelled: int = 0  # records without a location: predicted, with null truth columns


@dataclass(frozen=True)
class PartDone:
    """What a partition sends back: its row range, file name, SHA-256 and size, never its rows."""

    start: int
    stop: int
    name: str
    sha256: str = ""
    bytes: int = 0


def writes_dataset(cfg: PredictConfig) -> bool:
    """True when ``cfg.out`` is a dataset directory (``--dask``, or ``-o`` not ending in .parquet)."""
    return bool(cfg.dask) or not str(cfg.out).endswith(".parquet")


def partition_bounds(n: int, chunk_rows: int, batch_size: int, partition_batches: int, min_partitions: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges covering [0, n): ``batch_size × partition_batches`` rows, fewer
    when that leaves under ``min_partitions`` ranges, rounded up to whole chunks of
    ``chunk_rows`` when at least one chunk (a partition then reads only its own chunks)."""
    rows = min(batch_size * partition_batches, math.ceil(n / max(1, min_partitions)))
    if rows >= chunk_rows:
        rows = math.ceil(rows / chunk_rows) * chunk_rows
    rows = max(1, rows)
    return [(s, min(n, s + rows)) for s in range(0, n, rows)]


def _predict_table(cfg: PredictConfig, start: int, stop: int):
    """Score rows [start, stop) of the store (the model stays loaded between partitions)."""
    store = open_store(cfg.store)
    p = cached_predictor(cfg.checkpoint, resolve_device(cfg.device), store_space(store), f"store {cfg.store}")
    table = predict_rows(p, store, start, stop, cfg.options(), seed=cfg.seed, batch_size=cfg.batch_size)
    if cfg.uncertainty_checkpoint:  # MC-dropout noise seeded from (seed, first row) like the sampling noise
        import numpy as np
        import pyarrow as pa

        from geopipe.pipeline.uncertainty.scoring import score_rows

        scores = score_rows(cfg.uncertainty_checkpoint, store, np.arange(start, stop), passes=cfg.mc_passes, seed=cfg.seed + start)
        for name, values in scores.items():
            table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, type=pa.float64()))
    return table


def _predict_part(cfg: PredictConfig, start: int, stop: int, metadata: dict) -> PartDone:
    """Score rows [start, stop) and write them as one part of the dataset ``cfg.out``; runs in a
    Dask worker (or this process) and returns only where the part is."""
    record = write_part(_predict_table(cfg, start, stop), cfg.out, start, stop, metadata)
    return PartDone(start, stop, record.name, record.sha256, record.bytes)


def _model_identity(cfg: PredictConfig, config: dict) -> dict:
    model = {k: config.get(k) for k in ("method", "network", "backbone", "embed_dim", "step", "data_fingerprint", "git_rev", "version")}
    model["checkpoint"] = cfg.checkpoint
    model["space"] = config["method"].get("space")
    return model


def _same_run(a: dict, b: dict) -> bool:
    def core(meta):
        return ({k: v for k, v in meta.get("config", {}).items() if k not in _VOLATILE}, meta.get("model"))

    return core(a) == core(b)


def _existing_parts(cfg: PredictConfig, bounds, metadata: dict) -> dict:
    """(start, stop) → :class:`PartRecord` of the intact parts a previous run of the same
    predictions already wrote (damaged ones are removed, to be scored again); GeopipeError when
    ``cfg.out`` holds parts of other predictions (another checkpoint, store or option)."""
    import json

    existing, damaged = verified_parts(cfg.out, list_parts(cfg.out))
    for name in damaged:  # never silently
        print(f"geopipe: predict: part {name} of {cfg.out} is damaged; scoring it again", file=sys.stderr)
    if not existing:
        return {}
    name = next(iter(existing.values())).name
    with fsio.open_read(fsio.join(cfg.out, name)) as fh:
        theirs = json.loads(pq.read_schema(fh).metadata[METADATA_KEY])
    stray = sorted(set(existing) - set(bounds))
    if (stray or not _same_run(theirs, json.loads(metadata[METADATA_KEY]))) and cfg.overwrite:
        for name in [*(r.name for r in existing.values()), *DATASET_METADATA]:
            if fsio.exists(fsio.join(cfg.out, name)):
                fsio.remove(fsio.join(cfg.out, name))
        return {}
    if stray or not _same_run(theirs, json.loads(metadata[METADATA_KEY])):
        raise GeopipeError(f"{cfg.out} holds parts of other predictions (another checkpoint, store or option); "
                           "remove it or choose another -o")
    return existing


def _run_dataset(cfg: PredictConfig, bounds, metadata: dict, existing: dict, bar: Progress) -> tuple[int, int, int]:
    todo = [b for b in bounds if b not in existing]
    records = dict(existing)
    largest = 0

    def done(_i, part: PartDone) -> None:
        nonlocal largest
        largest = max(largest, len(pickle.dumps(part)))
        footer = read_part_footer(cfg.out, part.name)  # a few kB, read here
        records[(part.start, part.stop)] = PartRecord(part.name, footer, part.sha256, part.bytes)
        bar.update(part.stop - part.start)

    fsio.makedirs(cfg.out)
    map_partitions(_predict_part, [(cfg, s, e, metadata) for s, e in todo], cfg.dask, on_done=done, keep_results=False)
    finish_dataset(cfg.out, [records[b] for b in bounds], metadata)
    return len(todo), len(existing), largest


def _run_file(cfg: PredictConfig, bounds, metadata: dict, bar: Progress) -> None:
    """One file, streamed partition by partition (at most one partition's table in memory)."""
    with PredictionsStream(cfg.out, overwrite=cfg.overwrite) as out:
        for s, e in bounds:
            out.write_table(_predict_table(cfg, s, e))
            bar.update(e - s)
        out.finish(metadata)


def _say_likelihood_cost(cfg: PredictConfig, p, store, n: int) -> None:
    """One stderr line: the expected time of --nll/--localizability from a timed probe on a few
    labelled records, and the --likelihood-every that would shorten a long run."""
    import numpy as np

    from geopipe.pipeline.infer.cost import probe_likelihood_cost

    latlon = np.asarray(store.latlon[: min(n, 256)])
    rows = (np.flatnonzero(np.isfinite(latlon).all(axis=1)).tolist() or list(range(len(latlon))))[:4]
    part = partition_bounds(n, store.chunk_rows, cfg.batch_size, cfg.partition_batches, cfg.min_partitions)[0]
    batch = max(1, min(cfg.batch_size, part[1] - part[0]) // cfg.likelihood_every)  # records per likelihood batch in the run
    cost = probe_likelihood_cost(p, np.asarray(store.embeddings[: min(n, 256)])[rows], latlon[rows], cfg.options(), n, batch=batch)
    if cost:
        what = " and ".join(x for x in ("--nll" if cfg.nll else "", f"--localizability {cfg.localizability}" if cfg.localizability else "") if x)
        print(cost.message("predict", what), file=sys.stderr)


def run_predict(cfg: PredictConfig) -> PredictResult:
    """Predict every record of ``cfg.store`` and write ``cfg.out`` (file or dataset directory)."""
    t0 = time.perf_counter()
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.partition_batches < 1 or cfg.min_partitions < 1:
        raise GeopipeError("--steps, --batch-size, partition_batches and min_partitions must be positive")
    if writes_dataset(cfg) and fsio.is_local(cfg.out) and fsio.isfile(cfg.out):
        raise GeopipeError(f"output {cfg.out!r} is a file; a dataset output (-o without .parquet, or --dask) is a directory: "
                           f"give a new path, or one ending in .parquet for a single file")
    if not writes_dataset(cfg):  # before any work: an existing file is replaced only with --overwrite
        if fsio.is_local(cfg.out) and fsio.exists(cfg.out) and not fsio.isfile(cfg.out):
            raise GeopipeError(f"output {cfg.out!r} is a directory; give a file path ending in .parquet, or drop .parquet for a dataset")
        check_output(cfg.out, cfg.overwrite)
    with output_lock(cfg.out, dataset=writes_dataset(cfg)):  # one writer at a time: a second is refused in one line
        return _predict_locked(cfg, t0)


def _predict_locked(cfg: PredictConfig, t0: float) -> PredictResult:
    """:func:`run_predict` once it holds the output's lock."""
    store = open_store(cfg.store)
    p = cached_predictor(cfg.checkpoint, resolve_device(cfg.device), store_space(store), f"store {cfg.store}")  # fail fast on mismatch
    if cfg.uncertainty_checkpoint:
        from geopipe.pipeline.uncertainty.scoring import check_bayescap

        check_bayescap(cfg.uncertainty_checkpoint, store)  # another backbone or dimension: refused before any work
    n = len(store)
    if store.labelled < n:  # never silently: unlabelled records are predicted, their truth columns are null
        print(f"geopipe: predict: {n - store.labelled} of {n} records of {cfg.store} are unlabelled (no location): "
              f"predicted, with null truth columns", file=sys.stderr)
    if cfg.nll or cfg.localizability:
        _say_likelihood_cost(cfg, p, store, n)
    bounds = partition_bounds(n, store.chunk_rows, cfg.batch_size, cfg.partition_batches, cfg.min_partitions)
    metadata = predictions_metadata(asdict(cfg), _model_identity(cfg, p.config), provenance())
    written, skipped, largest = len(bounds), 0, 0
    existing = _existing_parts(cfg, bounds, metadata) if writes_dataset(cfg) else {}
    with Progress(total=n, desc="predict", unit="rec", initial=sum(e - s for s, e in existing), enabled=cfg.progress) as bar:
        if writes_dataset(cfg):
            written, skipped, largest = _run_dataset(cfg, bounds, metadata, existing, bar)
        else:
            _run_file(cfg, bounds, metadata, bar)
    dt = time.perf_counter() - t0
    return PredictResult(cfg.out, n, dt, n / dt if dt > 0 else float("inf"), written, skipped, largest, n - store.labelled)
