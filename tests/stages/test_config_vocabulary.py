"""One vocabulary (issue 19, item 6): every TOML table's keys are its command's option names
(``-`` → ``_``; ``--no-X`` is ``X = false``); the old field names still parse, to the same
configs, with one deprecation line each; the demo's own config uses none of them."""

from __future__ import annotations

import dataclasses
import typing

import click
import pytest

from geopipe.flows.cli import cli
from geopipe.flows.cli_common import ConfigOption
from geopipe.stages.config import demo_pipeline_config, key_paths, parse_pipeline_config, toml_keys
from geopipe.stages.demo import DemoDataConfig
from geopipe.stages.evaluate import EvaluateConfig
from geopipe.stages.extract import ExtractConfig
from geopipe.stages.predict import PredictConfig
from geopipe.stages.retrieve import RetrieveConfig
from geopipe.stages.train import TrainConfig
from geopipe.stages.uncertainty import BayesCapStageConfig

#: TOML table → (its config class, the command whose options it mirrors)
TABLES = {
    "extract.NAME": (ExtractConfig, ("extract",)),
    "train": (TrainConfig, ("train",)),
    "predict": (PredictConfig, ("predict",)),
    "evaluate": (EvaluateConfig, ("evaluate",)),
    "demo_data": (DemoDataConfig, ("demo-data",)),
    "uncertainty.retrieve": (RetrieveConfig, ("retrieve",)),
    "uncertainty.bayescap": (BayesCapStageConfig, ("bayescap", "train")),
    "uncertainty.evaluate": (EvaluateConfig, ("evaluate",)),
}
#: options with no place in a table, and why
CLI_ONLY = {
    ("train", "min_pairs"): "deprecated bayescap pass-through of `train --method bayescap…`",
    ("train", "no_pairs_policy"): "deprecated bayescap pass-through of `train --method bayescap…`",
    ("demo-data", "world"): "the geoclip benchmark world is made by `demo-data --world geoclip`, not by the flow",
    ("demo-data", "n_val"): "geoclip world only",
    ("demo-data", "n_heldout"): "geoclip world only",
    ("bayescap train", "device"): "the heads train on the CPU",
    ("evaluate", "baseline_store"): "[evaluate] takes it (the generative branch only), see test below",
}


def _command(path):
    cmd = cli
    for name in path:
        cmd = cmd.commands[name]
    return cmd


def _key(param: click.Parameter) -> str:
    """The TOML key of a command-line parameter: the long option name, ``-`` → ``_``; ``--no-X`` flags are ``X``."""
    if isinstance(param, click.Argument):
        return param.name
    name = next((o for o in param.opts if o.startswith("--")), param.opts[0]).lstrip("-").replace("-", "_")
    return name[3:] if param.is_flag and name.startswith("no_") else name


def _resolve(cls, path: tuple[str, ...]):
    """(class holding the last field, field name) of a field path."""
    for name in path[:-1]:
        cls = typing.get_type_hints(cls)[name]
    return cls, path[-1]


@pytest.mark.parametrize("table", list(TABLES))
def test_every_option_is_a_key_of_its_table(table):
    cls, path = TABLES[table]
    keys, missing, wrong = key_paths(cls), [], []
    for param in _command(path).params:
        if param.name == "help" or (" ".join(path), _key(param)) in CLI_ONLY:
            continue
        key = _key(param)
        if key not in keys:
            missing.append(key)
            continue
        holders = [_resolve(cls, p) for p in keys[key]]
        assert all(dataclasses.is_dataclass(c) and n in {f.name for f in dataclasses.fields(c)} for c, n in holders), key
        if isinstance(param, ConfigOption):  # the option states the field it feeds: the key must feed the same
            target = (param.config.split(":")[1], param.field)
            if target not in [(c.__name__, n) for c, n in holders]:
                wrong.append(f"{key} → {holders}, the option feeds {target}")
    assert not missing, f"[{table}] has no key for option(s) {missing}; valid keys: {toml_keys(cls)}"
    assert not wrong, wrong


def test_old_field_names_parse_to_the_same_configs_with_one_notice_each(capsys):
    new = {"workdir": "w",
           "extract": {"a": {"shards": ["a.tar"], "store": "a.zarr", "workers": 3, "meta": ["city"], "normalize": False}},
           "train": {"store": "a.zarr", "out": "m", "resume": False},
           "predict": {"checkpoint": "m", "store": "a.zarr", "out": "p.parquet", "bayescap": "bc"},
           "evaluate": {"predictions": ["p.parquet"], "name": ["rfm"], "plots": "plots", "baseline_store": "a.zarr"},
           "uncertainty": {"retrieve": {"query": "a.zarr", "out": "r.parquet", "split": "blocks", "block_m": 250.0,
                                        "split_column": "part", "query_value": "q", "query_fraction": 0.3,
                                        "capture_field": "cap", "seed": 7, "bayescap": "bc"},
                           "evaluate": {"name": ["retrieval"], "plots": "uplots"}}}
    old = {"workdir": "w",
           "extract": {"a": {"shards": ["a.tar"], "store": "a.zarr", "num_workers": 3, "meta_fields": ["city"], "normalize": False}},
           "train": {"store": "a.zarr", "out": "m", "resume": False},
           "predict": {"checkpoint": "m", "store": "a.zarr", "out": "p.parquet", "uncertainty_checkpoint": "bc"},
           "evaluate": {"predictions": ["p.parquet"], "names": ["rfm"], "plots_dir": "plots", "baseline_store": "a.zarr"},
           "uncertainty": {"retrieve": {"query": "a.zarr", "out": "r.parquet", "seed": 7, "uncertainty_checkpoint": "bc",
                                        "split": {"mode": "blocks", "block_m": 250.0, "column": "part", "query_value": "q",
                                                  "query_fraction": 0.3, "capture_field": "cap", "seed": 7}},
                           "evaluate": {"names": ["retrieval"], "plots_dir": "uplots"}}}
    a = parse_pipeline_config(new)
    assert capsys.readouterr().err == ""
    b = parse_pipeline_config(old)
    notices = capsys.readouterr().err.splitlines()
    assert a == b
    e, r = a.extract[0], a.uncertainty.retrieve
    assert (e.num_workers, e.meta_fields, e.normalize, a.predict.uncertainty_checkpoint) == (3, ("city",), False, "bc")
    assert (a.evaluate.names, a.evaluate.plots_dir, a.baseline_store, a.uncertainty.evaluate.plots_dir) == (("rfm",), "plots", "a.zarr", "uplots")
    assert (r.split.mode, r.split.block_m, r.split.column, r.split.seed, r.seed, r.uncertainty_checkpoint) == ("blocks", 250.0, "part", 7, 7, "bc")
    assert len(notices) == 14 and all(n.startswith("geopipe: config: [") and " is deprecated; write " in n for n in notices)
    assert "geopipe: config: [extract.a] num_workers is deprecated; write workers (the --workers option's name)" in notices
    assert any("[uncertainty.retrieve] split.mode is deprecated; write split" in n for n in notices)


def test_bayescap_keys_and_the_old_pairs_table(capsys):
    base = {"uncertainty": {"retrieve": {"query": "q.zarr", "out": "r.parquet"}}}
    new = {**base, "uncertainty": {**base["uncertainty"], "bayescap": {"store": "s", "out": "b", "min_pairs": 7, "batch_size": 64,
                                                                       "pairs": {"pair_radius_m": 30.0}}}}
    old = {**base, "uncertainty": {**base["uncertainty"], "bayescap": {"store": "s", "out": "b", "batch": 64,
                                                                       "pairs": {"min_pairs": 7, "pair_radius_m": 30.0}}}}
    a = parse_pipeline_config(new).uncertainty.bayescap
    assert capsys.readouterr().err == ""  # pairs = { pair_radius_m = … } has no flag: not deprecated
    b = parse_pipeline_config(old).uncertainty.bayescap
    assert a == b and (a.pairs.min_pairs, a.pairs.pair_radius_m, a.batch) == (7, 30.0, 64)
    assert len(capsys.readouterr().err.splitlines()) == 2


def test_both_names_for_one_field_is_an_error():
    doc = {"uncertainty": {"retrieve": {"query": "q.zarr", "out": "r.parquet", "bayescap": "a", "uncertainty_checkpoint": "b"}}}
    with pytest.raises(Exception, match=r"both set uncertainty_checkpoint"):
        parse_pipeline_config(doc)


def test_unknown_keys_list_the_command_line_names():
    doc = {"uncertainty": {"retrieve": {"query": "q.zarr", "out": "r.parquet", "wrkers": 2}}}
    with pytest.raises(Exception, match=r"unknown key\(s\) \['wrkers'\] in \[uncertainty\.retrieve\]; valid keys: \[.*'bayescap'.*'split_column'"):
        parse_pipeline_config(doc)


def test_the_demo_config_and_run_help_speak_the_new_vocabulary(tmp_path, capsys):
    demo_pipeline_config(str(tmp_path))
    assert capsys.readouterr().err == ""
    from click.testing import CliRunner

    layout = CliRunner().invoke(cli, ["run", "--help"]).output
    assert "min_pairs = 500" in layout and "pairs = {" not in layout and "plots_dir" not in layout
