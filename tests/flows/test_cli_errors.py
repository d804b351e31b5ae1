"""The command line's error policy: a GeopipeError (user-fixable) prints one line; anything else
is a bug and keeps its traceback plus one line saying how to report it. Exit status 1 either way."""

import pytest
from click.testing import CliRunner

import geopipe
import geopipe.stages.evaluate
from geopipe.flows.cli import cli
from geopipe.pipeline.core.errors import ConfigError, GeopipeError


def _invoke(args):
    return CliRunner().invoke(cli, args)


def test_unexpected_exception_keeps_traceback_and_asks_for_a_report(monkeypatch, tmp_path):
    def broken(cfg):
        return {}["reports"]  # a KeyError deep inside a stage: a bug, not a user error

    monkeypatch.setattr(geopipe.stages.evaluate, "run_evaluate", broken)
    res = _invoke(["evaluate", str(tmp_path / "p.parquet")])
    assert res.exit_code == 1
    assert "Traceback (most recent call last)" in res.output and "KeyError: 'reports'" in res.output
    assert 'return {}["reports"]' in res.output  # the frame that failed is shown
    last = res.output.strip().splitlines()[-1]
    assert last == f"geopipe: this is a bug in geopipe {geopipe.__version__}; please report it with the traceback above"
    assert "geopipe: error:" not in res.output


@pytest.mark.parametrize("exc", [GeopipeError("store s.zarr is locked; wait or remove the lock\nsecond line"),
                                 ConfigError("prdc_k must be a positive integer, got 0")])
def test_geopipe_errors_are_one_line(monkeypatch, tmp_path, exc):
    def fails(cfg):
        raise exc

    monkeypatch.setattr(geopipe.stages.evaluate, "run_evaluate", fails)
    res = _invoke(["evaluate", str(tmp_path / "p.parquet")])
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [f"geopipe: error: {str(exc).splitlines()[0]}"]


def test_config_validation_is_a_one_line_user_error(tmp_path):
    """Config dataclasses raise ConfigError (a GeopipeError and a ValueError) for bad options."""
    res = _invoke(["train", "--store", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "m"), "--steps", "10", "--warmup", "20"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.strip().splitlines() == [
        "geopipe: error: warmup (20) must be smaller than steps (10); pass a smaller --warmup"]


def test_unknown_names_are_config_errors():
    from geopipe.pipeline.methods.registry import get_method
    from geopipe.pipeline.model.samplers import get_sampler
    from geopipe.pipeline.model.schedules import make_schedule

    for build, name in ((get_method, "rfn"), (get_sampler, "eulr"), (make_schedule, "sigmoyd")):
        with pytest.raises(ConfigError, match=name):
            build(name)


@pytest.mark.parametrize("exc, code, word", [(KeyboardInterrupt(), 130, "interrupted"), (SystemExit(143), 143, "terminated")])
def test_an_interrupted_command_says_how_to_resume(monkeypatch, tmp_path, exc, code, word):
    def interrupted(cfg):
        raise exc

    monkeypatch.setattr(geopipe.stages.evaluate, "run_evaluate", interrupted)
    res = _invoke(["evaluate", str(tmp_path / "p.parquet")])
    assert res.exit_code == code
    assert res.output.strip().splitlines() == [f"geopipe: {word}; finished work is kept: rerun the same command (extract, import, "
                                               "train and Dask predict go on from where they stopped)"]


def test_a_plain_exit_passes_through(monkeypatch, tmp_path):
    def done(cfg):
        raise SystemExit(3)

    monkeypatch.setattr(geopipe.stages.evaluate, "run_evaluate", done)
    res = _invoke(["evaluate", str(tmp_path / "p.parquet")])
    assert res.exit_code == 3 and res.output == ""
