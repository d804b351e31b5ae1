"""A default is stated once: the config dataclasses and the methods' TRAIN_DEFAULTS own them,
the CLI passes only what was given, ``--help`` shows the real value, and checkpoints record it."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np
import pytest
from click.testing import CliRunner

from geopipe.flows.cli import cli
from geopipe.flows.cli_common import ConfigOption, config_default
from geopipe.pipeline.store.format import ShardStat
from geopipe.pipeline.store.writer import StoreWriter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Only what keeps the runs small is given; every other option is left to the dataclass / method.
SMALL = ["--dim", "16", "--steps", "2", "--warmup", "1", "--batch-size", "16", "--val-every", "2", "--device", "cpu"]
GIVEN = {"store", "out", "method", "dim", "steps", "warmup", "batch_size", "val_every"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("defaults") / "s.zarr"
    rng = np.random.default_rng(0)
    with StoreWriter.open(str(path), backbone={"name": "t", "pretrained": None}, embed_dim=8, dtype="float32") as w:
        ll = np.column_stack([rng.uniform(-80, 80, 64), rng.uniform(-170, 170, 64)])
        w.append_shard("a.tar", rng.normal(size=(64, 8)), ll, [f"k{i}" for i in range(64)], {}, [], ShardStat(1, 0.0))
    return str(path)


def _documented_defaults() -> dict:
    """method → {"depth", "lr", "grad_clip"} from the table of docs/methods.md#training."""
    text = open(os.path.join(ROOT, "docs", "methods.md"), encoding="utf-8").read()
    out = {}
    for names, depth, lr, clip in re.findall(r"^\s*\| ([a-z_, ]+) \| (\d+) \| ([0-9.e-]+) \| ([0-9.]+|none) \|", text, flags=re.M):
        for name in names.split(", "):
            out[name] = {"depth": int(depth), "lr": float(lr), "grad_clip": None if clip == "none" else float(clip)}
    return out


def test_the_documented_defaults_are_the_methods_train_defaults():
    from geopipe.pipeline.methods.registry import METHODS

    documented = _documented_defaults()
    assert {"rfm", "vmf"} <= set(documented), documented
    for name, values in documented.items():
        assert METHODS[name].TRAIN_DEFAULTS == values, name


@pytest.mark.parametrize("method", __import__("geopipe.pipeline.methods.names", fromlist=["METHOD_NAMES"]).METHOD_NAMES)
def test_train_records_the_methods_defaults(store, tmp_path, method):
    """`geopipe train --method M` (no depth, lr or clip given) records M's TRAIN_DEFAULTS, and
    every option left out is the TrainConfig default (vmf: depth 11, lr 1e-4, grad clip 0.05)."""
    from geopipe.pipeline.methods.registry import METHODS
    from geopipe.stages.train import TrainConfig

    out = tmp_path / method
    res = CliRunner().invoke(cli, ["train", "--store", store, "-o", str(out), "--method", method, *SMALL])
    assert res.exit_code == 0, res.output
    saved = json.loads((out / "config.json").read_text())
    expected = METHODS[method].TRAIN_DEFAULTS
    assert saved["kind"] == "generative"
    assert {k: saved["train"][k] for k in expected} == expected and saved["network"]["depth"] == expected["depth"]
    if method == "vmf":
        assert (saved["train"]["depth"], saved["train"]["lr"], saved["train"]["grad_clip"]) == (11, 1e-4, 0.05)
    for f in dataclasses.fields(TrainConfig):
        if f.name in saved["train"] and f.name not in GIVEN | set(expected) and f.name not in ("resume", "stream", "allow_changes"):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            assert saved["train"][f.name] == json.loads(json.dumps(default)), f.name


def test_bayescap_train_passes_only_what_was_given(store, tmp_path):
    out = tmp_path / "bc"
    res = CliRunner().invoke(cli, ["bayescap", "train", "--store", store, "-o", str(out), "--steps", "2", "--val-every", "2",
                                   "--no-pairs-policy", "identity"])
    assert res.exit_code == 0 and "trained bayescap-cycle" in res.output, res.output
    saved = json.loads((out / "config.json").read_text())
    assert saved["kind"] == "uncertainty" and saved["method"] == config_default("geopipe.stages.uncertainty:BayesCapStageConfig", "method")
    assert (saved["train"]["steps"], saved["train"]["batch"], saved["train"]["lr"]) == (2, 96, 1e-3)
    assert saved["train"]["pairs"]["min_pairs"] == 2000
    # the old spelling still works, says it is deprecated, and keeps the BayesCap defaults (not the generative ones)
    res = CliRunner().invoke(cli, ["train", "--method", "bayescap", "--store", store, "-o", str(tmp_path / "old"), "--steps", "2",
                                   "--val-every", "2", "--no-pairs-policy", "identity"])
    assert res.exit_code == 0 and "deprecated; use `geopipe bayescap train`" in res.output, res.output
    old = json.loads((tmp_path / "old" / "config.json").read_text())
    assert (old["method"], old["train"]["batch"], old["train"]["lr"]) == ("bayescap", 96, 1e-3)


def _config_options():
    def walk(group, prefix=()):
        for name, cmd in group.commands.items():
            if hasattr(cmd, "commands"):
                yield from walk(cmd, prefix + (name,))
            else:
                for p in cmd.params:
                    yield prefix + (name,), cmd, p
    return list(walk(cli))


def test_help_shows_the_dataclass_defaults():
    import click

    found = 0
    for path, cmd, p in _config_options():
        if isinstance(p, ConfigOption):
            found += 1
            assert p.default is None, f"{' '.join(path)} {p.opts[0]}: the CLI must not state a default"
            ctx = click.Context(cmd, info_name=path[-1])
            help_text = p.get_help_record(ctx)[1]
            assert "[default: " in help_text, f"{' '.join(path)} {p.opts[0]}"
            if p.describe is None:
                value = config_default(p.config, p.field)
                assert str(value) in help_text, (path, p.opts, help_text)
    assert found >= 40
    out = CliRunner().invoke(cli, ["train", "--help"]).output
    assert "[default: 12 (vmf, vmf_mixture: 11; hybrid: 2)]" in " ".join(out.split())


def test_checkpoint_kind_of_old_checkpoints():
    from geopipe.schemas.checkpoint import checkpoint_kind, checkpoint_method

    assert checkpoint_kind({"method": {"name": "rfm"}}) == "generative"
    assert checkpoint_kind({"method": "bayescap"}) == "uncertainty"
    assert checkpoint_kind({"kind": "uncertainty", "method": "bayescap-cycle"}) == "uncertainty"
    assert checkpoint_method({"method": {"name": "vmf"}}) == "vmf" and checkpoint_method({"method": "bayescap"}) == "bayescap"


def test_bayescap_choices_are_the_registry():
    from geopipe.flows.cli_bayescap import BAYESCAP_METHODS
    from geopipe.pipeline.uncertainty.bayescap import BAYESCAP_METHODS as REGISTRY

    assert BAYESCAP_METHODS == REGISTRY
