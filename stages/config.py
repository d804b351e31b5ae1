"""Pipeline configuration: a strict TOML file → frozen stage configs.

Two branches share one flow, the stores and the run-state file: the generative branch
(``[train]``, ``[predict]``, ``[evaluate]``: all three or none) and the retrieval + uncertainty
branch (``[uncertainty.*]``); a config has at least one of them. Layout::

    workdir = "data/demo"
    [demo_data]            # optional: generate the offline demo world first
    out = "data/demo/shards"
    [extract.train]        # one table per store to extract
    shards = ["data/demo/shards/train-{000000..000005}.tar"]
    store = "data/demo/train.zarr"
    [extract.test]
    ...
    [train]
    store = "data/demo/train.zarr"
    out = "data/demo/model"
    [predict]
    checkpoint = "data/demo/model"
    store = "data/demo/test.zarr"
    out = "data/demo/predictions.parquet"
    [evaluate]
    predictions = ["data/demo/predictions.parquet"]
    baseline_store = "data/demo/train.zarr"
    [uncertainty.retrieve]   # optional branch: place recognition on the same stores (geopipe retrieve)
    query = "data/demo/test.zarr"
    database = "data/demo/train.zarr"
    out = "data/demo/retrieval.parquet"
    mode = "kernel"
    [uncertainty.bayescap]   # optional: pairs mined on `store`, BayesCap trained there (geopipe bayescap train)
    store = "data/demo/train.zarr"
    out = "data/demo/bayescap"
    min_pairs = 500
    no_pairs_policy = "skip"  # too few pairs: go on with the training-free scores (logged)
    [uncertainty.evaluate]   # optional: evaluate --uncertainty options (failure table, plots)
    out = "data/demo/uncertainty.json"
    failure_km = 200
    [rerun]                # optional: what a rerun (geopipe serve) redoes
    skip_unchanged = true  # skip steps whose stores and options are unchanged since the last successful run
    on_new_data = "scratch"  # or "continue": the last checkpoint for continue_steps more steps
    continue_steps = 1000

The uncertainty branch runs retrieve → BayesCap → score → evaluate: ``retrieve`` searches
(``uncertainty_checkpoint``/``mc_passes`` there score with an existing BayesCap checkpoint
when ``[uncertainty.bayescap]`` is absent), ``bayescap`` mines pairs and trains, ``score`` writes
the log_u columns into the retrieval table, ``evaluate`` prints the evaluation and
failure-prediction tables (``predictions`` there: more files scored next to the retrieval, e.g.
the generative predictions).

One vocabulary: a table's keys are its command's option names with ``_`` for ``-`` (``workers``
for ``--workers``, ``meta``, ``plots``, ``name``, ``bayescap``, ``min_pairs``, ``split`` …; a
switch ``--no-X`` is ``X = false``); options without a command-line flag keep their field names,
and nested options without one stay tables (``pairs = { pair_radius_m = 30 }``). The field names
that differed (``num_workers``, ``meta_fields``, ``plots_dir``, ``names``, ``batch``,
``uncertainty_checkpoint``, ``pairs.min_pairs``, ``split = { mode = … }``) still work, with a
one-line deprecation notice on stderr. Unknown keys and wrong types are errors that list the
valid keys.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from dataclasses import dataclass, field

from geopipe.pipeline.core.errors import ConfigError, GeopipeError
from geopipe.stages.demo import DemoDataConfig
from geopipe.stages.evaluate import EvaluateConfig
from geopipe.stages.extract import ExtractConfig
from geopipe.stages.predict import PredictConfig
from geopipe.stages.rerun import RerunConfig
from geopipe.stages.retrieve import RetrieveConfig
from geopipe.stages.train import TrainConfig
from geopipe.stages.uncertainty import BayesCapStageConfig

__all__ = ["PipelineConfig", "UncertaintyBranch", "load_pipeline_config", "parse_pipeline_config", "demo_pipeline_config",
           "build_config", "CLI_KEYS", "toml_keys", "key_paths"]

#: TOML key (the command's option name, ``-`` → ``_``) → field path(s) where they differ; a key
#: with two paths sets both (``seed``: the retrieval's and its split's, as ``--seed`` does).
CLI_KEYS: dict[type, dict[str, tuple[tuple[str, ...], ...]]] = {
    ExtractConfig: {"workers": (("num_workers",),), "meta": (("meta_fields",),)},
    PredictConfig: {"bayescap": (("uncertainty_checkpoint",),)},
    EvaluateConfig: {"name": (("names",),), "plots": (("plots_dir",),)},
    RetrieveConfig: {"bayescap": (("uncertainty_checkpoint",),), "split": (("split", "mode"),),
                     "split_column": (("split", "column"),), "query_value": (("split", "query_value"),),
                     "block_m": (("split", "block_m"),), "query_fraction": (("split", "query_fraction"),),
                     "capture_field": (("split", "capture_field"),), "seed": (("seed",), ("split", "seed"))},
    BayesCapStageConfig: {"batch_size": (("batch",),), "min_pairs": (("pairs", "min_pairs"),)},
}


@dataclass(frozen=True)
class UncertaintyBranch:
    """The ``[uncertainty.*]`` tables: retrieve, then (optionally) train BayesCap, score the
    retrieval table with it, evaluate with ``uncertainty=True`` (the retrieval table first)."""

    retrieve: RetrieveConfig
    evaluate: EvaluateConfig
    bayescap: BayesCapStageConfig | None = None


@dataclass(frozen=True)
class PipelineConfig:
    """The chained pipeline: optional demo data, extract per store, then the generative branch
    (train, predict, evaluate; all or none) and/or the uncertainty branch."""

    train: TrainConfig | None = None
    predict: PredictConfig | None = None
    evaluate: EvaluateConfig | None = None
    extract: tuple[ExtractConfig, ...] = ()
    demo_data: DemoDataConfig | None = None
    baseline_store: str | None = None
    workdir: str = "."
    rerun: RerunConfig = field(default_factory=RerunConfig)
    uncertainty: UncertaintyBranch | None = None


def _coerce(value, hint, where: str):
    """``value`` checked against the field's type ``hint`` with pydantic in strict mode (no
    "1" → 1 or 1 → "1"; an int is a valid float; TOML arrays become tuples)."""
    from pydantic import ConfigDict, TypeAdapter, ValidationError

    if isinstance(value, list):
        value = tuple(value)
    try:
        return TypeAdapter(hint, config=ConfigDict(strict=True)).validate_python(value)
    except ValidationError as exc:
        err = exc.errors()[0]
        at = "".join(f"[{p}]" for p in err["loc"] if not isinstance(p, str) or not p.startswith(("function-", "tuple[")))
        raise ConfigError(f"{where}{at}: {err['msg'][0].lower()}{err['msg'][1:]}, got {err['input']!r}") from None


def _table(doc: dict, name: str, where: str | None = None) -> dict:
    value, where = doc[name], where or name
    if not isinstance(value, dict):
        raise ConfigError(f"[{where}] must be a table (a [{where}] header with key = value lines), got {value!r}")
    return value


def key_paths(cls) -> dict[str, tuple[tuple[str, ...], ...]]:
    """Every TOML key of a table building ``cls`` → the field path(s) it sets: the command-line
    names of :data:`CLI_KEYS`, then each other field under its own name."""
    keys = dict(CLI_KEYS.get(cls, {}))
    renamed = {paths[0][0] for paths in keys.values() if len(paths[0]) == 1 and len(paths) == 1}
    for f in dataclasses.fields(cls):
        if f.name not in renamed and f.name not in keys:
            keys[f.name] = ((f.name,),)
    return keys


def toml_keys(cls) -> list[str]:
    """The valid keys of a TOML table building ``cls`` (what error messages list)."""
    return list(key_paths(cls))


def _deprecated(where: str, old: str, new: str) -> None:
    print(f"geopipe: config: [{where}] {old} is deprecated; write {new} (the --{new.replace('_', '-')} option's name)",
          file=sys.stderr)


def _set(values: dict, path: tuple[str, ...], value, key: str, where: str, derived: bool = False) -> None:
    """values[path] = (value, key), nested paths into a dict; two keys for one field are an error,
    except that a ``derived`` value (a key's second path) yields to one set explicitly."""
    *tables, name = path
    target = values
    for t in tables:
        target = target.setdefault(t, {})
        if not isinstance(target, dict):
            raise ConfigError(f"[{where}] {t} is given both as a table and as {key}; keep one")
    if name in target:
        if derived:
            return
        if not target[name][2]:
            raise ConfigError(f"[{where}] {key} and {target[name][1]} both set {'.'.join(path)}; keep {key}")
    target[name] = (value, key, derived)


def _translate(cls, section: dict, where: str) -> dict:
    """A TOML table in command-line vocabulary → ``{field: (value, key, derived)}`` (nested options as
    dicts of the same), old field names accepted with a deprecation notice."""
    keys, hints = CLI_KEYS.get(cls, {}), typing.get_type_hints(cls)
    new_name = {paths[0]: key for key, paths in keys.items() if len(paths) == 1}  # field path → its key
    values: dict = {}
    for key, value in section.items():
        nested_table = isinstance(value, dict) and dataclasses.is_dataclass(hints.get(key))  # an options table
        if key in keys and not nested_table:
            for i, path in enumerate(keys[key]):
                _set(values, path, value, key, where, derived=i > 0)
            continue
        if (key,) in new_name and new_name[(key,)] != key:
            _deprecated(where, key, new_name[(key,)])
        if nested_table:
            for inner, v in value.items():
                flat = new_name.get((key, inner))
                if flat is not None:
                    _deprecated(where, f"{key}.{inner}", flat)
                _set(values, (key, inner), v, f"{key}.{inner}", where)
        else:
            _set(values, (key,), value, key, where)
    return values


def build_config(cls, section: dict, where: str):
    """Build dataclass ``cls`` from a TOML table, rejecting unknown keys and wrong types."""
    return _build(cls, _translate(cls, section, where), where)


def _build(cls, values: dict, where: str):
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(values[k][1].rsplit(".", 1)[-1] if isinstance(values[k], tuple) else k for k in set(values) - set(valid))
    if unknown:
        raise GeopipeError(f"unknown key(s) {unknown} in [{where}]; valid keys: {toml_keys(cls)}")
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in values]
    if missing:
        raise GeopipeError(f"missing key(s) {missing} in [{where}]")
    out = {}
    for k, v in values.items():
        if dataclasses.is_dataclass(hints[k]):  # a nested options table (``pairs = { pair_radius_m = 30 }``)
            if not isinstance(v, dict):
                raise ConfigError(f"[{where}.{k}] must be a table (a [{where}.{k}] header with key = value lines), got {v[0]!r}")
            out[k] = _build(hints[k], v, f"{where}.{k}")
        else:
            out[k] = _coerce(v[0], hints[k], f"[{where}] {v[1]}")
    try:
        return cls(**out)
    except ConfigError as exc:  # a value out of range: say which table of the TOML holds it
        raise ConfigError(f"[{where}] {exc}") from None


def _uncertainty_branch(doc: dict) -> UncertaintyBranch:
    """The ``[uncertainty]`` tables (see the module docstring)."""
    unknown = sorted(set(doc) - {"retrieve", "bayescap", "evaluate"})
    if unknown:
        raise GeopipeError(f"unknown table(s) {unknown} in [uncertainty]; valid: ['bayescap', 'evaluate', 'retrieve']")
    if "retrieve" not in doc:
        raise GeopipeError("[uncertainty] lacks its [uncertainty.retrieve] table (query, out and the search options)")
    retrieve = build_config(RetrieveConfig, _table(doc, "retrieve", "uncertainty.retrieve"), "uncertainty.retrieve")
    bayescap = None
    if "bayescap" in doc:
        bayescap = build_config(BayesCapStageConfig, _table(doc, "bayescap", "uncertainty.bayescap"), "uncertainty.bayescap")
        if retrieve.uncertainty_checkpoint:
            raise GeopipeError("[uncertainty.retrieve] uncertainty_checkpoint and [uncertainty.bayescap] both give the BayesCap "
                               "checkpoint; keep one (the trained one is [uncertainty.bayescap] out)")
    evaluate = dict(_table(doc, "evaluate", "uncertainty.evaluate")) if "evaluate" in doc else {}
    if "uncertainty" in evaluate:
        raise GeopipeError("[uncertainty.evaluate] uncertainty: always on in this branch; remove the key")
    more = _coerce(evaluate.pop("predictions", ()), tuple[str, ...], "[uncertainty.evaluate] predictions")
    evaluate = build_config(EvaluateConfig, {**evaluate, "predictions": (retrieve.out, *more), "uncertainty": True},
                            "uncertainty.evaluate")
    return UncertaintyBranch(retrieve=retrieve, evaluate=evaluate, bayescap=bayescap)


def parse_pipeline_config(doc: dict) -> PipelineConfig:
    """Validate a parsed TOML document into a :class:`PipelineConfig`."""
    top = {"workdir", "demo_data", "extract", "train", "predict", "evaluate", "rerun", "uncertainty"}
    unknown = sorted(set(doc) - top)
    if unknown:
        raise GeopipeError(f"unknown section(s) {unknown}; valid: {sorted(top)}")
    generative = [name for name in ("train", "predict", "evaluate") if name in doc]
    if generative or "uncertainty" not in doc:
        for name in ("train", "predict", "evaluate"):
            if name not in doc:
                raise GeopipeError(f"config lacks the [{name}] section ([train], [predict] and [evaluate] come together; "
                                   "a config without them needs [uncertainty.retrieve])")
    uncertainty = _uncertainty_branch(_table(doc, "uncertainty")) if "uncertainty" in doc else None
    stores = _table(doc, "extract") if "extract" in doc else {}
    extract = tuple(build_config(ExtractConfig, _table(stores, name, f"extract.{name}"), f"extract.{name}") for name in stores)
    demo = build_config(DemoDataConfig, _table(doc, "demo_data"), "demo_data") if "demo_data" in doc else None
    evaluate = dict(_table(doc, "evaluate")) if generative else {}
    if "baseline_store" in evaluate:
        _coerce(evaluate["baseline_store"], str, "[evaluate] baseline_store")
    baseline = evaluate.pop("baseline_store", None)
    return PipelineConfig(
        train=build_config(TrainConfig, _table(doc, "train"), "train") if generative else None,
        predict=build_config(PredictConfig, _table(doc, "predict"), "predict") if generative else None,
        evaluate=build_config(EvaluateConfig, evaluate, "evaluate") if generative else None,
        uncertainty=uncertainty,
        extract=extract,
        demo_data=demo,
        baseline_store=baseline,
        workdir=_coerce(doc.get("workdir", "."), str, "workdir"),
        rerun=build_config(RerunConfig, _table(doc, "rerun"), "rerun") if "rerun" in doc else RerunConfig(),
    )


def load_pipeline_config(path: str) -> PipelineConfig:
    """Read and validate a pipeline TOML file (size, depth and encoding checked by
    :func:`geopipe.pipeline.core.limits.load_toml`: every problem is one line naming the file)."""
    from geopipe.pipeline.core.limits import load_toml

    return parse_pipeline_config(load_toml(path, "pipeline config"))


def demo_pipeline_config(workdir: str, train_steps: int = 3000, n_train: int = 3000, n_test: int = 500,
                         views_per_place: int = 4, bayescap_steps: int = 2000, min_pairs: int = 500) -> PipelineConfig:
    """The ``make demo`` pipeline: a multi-view demo world (single-view test queries) → two stores → CPU-sized RFM → predict →
    evaluate; and the uncertainty branch on the same stores: retrieval (kernel mode) → viewpoint
    pairs + BayesCapCycle → scores → evaluate --uncertainty with the RFM predictions beside it."""
    w = lambda *p: os.path.join(workdir, *p)  # noqa: E731
    shards = w("shards")
    n_train_shards = -(-n_train // 500)
    n_test_shards = -(-n_test // 500)
    doc = {
        "workdir": workdir,
        "demo_data": {"out": shards, "n_train": n_train, "n_test": n_test, "shard_size": 500, "views_per_place": views_per_place,
                      "test_views_per_place": 1},
        "extract": {
            # the demo world is the flow's own output: a regenerated world (new settings or version) is re-extracted
            "train": {"shards": [w("shards", f"train-{{000000..{n_train_shards - 1:06d}}}.tar")], "store": w("train.zarr"), "backbone": "tiny",
                      "on_changed": "reextract"},
            "test": {"shards": [w("shards", f"test-{{000000..{n_test_shards - 1:06d}}}.tar")], "store": w("test.zarr"), "backbone": "tiny",
                     "on_changed": "reextract"},
        },
        "train": {"store": w("train.zarr"), "out": w("model"), "method": "rfm", "dim": 128, "depth": 4,
                  "steps": train_steps, "batch_size": 256, "lr": 3e-3, "warmup": min(200, train_steps // 10),
                  "val_every": 500},
        "predict": {"checkpoint": w("model"), "store": w("test.zarr"), "out": w("predictions.parquet"),
                    "nll": True, "localizability": 16, "rtol": 1e-3, "atol": 1e-3, "likelihood_every": 5},
        "evaluate": {"predictions": [w("predictions.parquet")], "out": w("report.json"), "baseline_store": w("train.zarr")},
        "uncertainty": {
            "retrieve": {"query": w("test.zarr"), "database": w("train.zarr"), "out": w("retrieval.parquet"), "k": 10, "mode": "kernel"},
            # the demo world yields fewer viewpoint pairs than the default minimum of 2,000
            # CPU-sized: 2,000 steps at 3e-3 (the thesis's 1e-4 needs many epochs; at 2,000 steps its log_u ranked no better than random)
            "bayescap": {"store": w("train.zarr"), "out": w("bayescap"), "method": "bayescap-cycle", "steps": bayescap_steps, "lr": 3e-3,
                         "min_pairs": min_pairs},
            "evaluate": {"predictions": [w("predictions.parquet")], "name": ["retrieval", "rfm"], "out": w("uncertainty.json"),
                         "failure_km": 750.0, "plots": w("plots")},
        },
    }
    return parse_pipeline_config(doc)
