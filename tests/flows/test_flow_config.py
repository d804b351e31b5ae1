"""`geopipe run` configs: pydantic-checked types with one-line errors, the layout in --help, user
errors fail the flow without Prefect retries."""

from __future__ import annotations

import copy

import pytest
from click.testing import CliRunner

from geopipe.pipeline.core.errors import GeopipeError
from geopipe.stages.config import parse_pipeline_config

BASE = {"train": {"store": "t.zarr", "out": "m"}, "predict": {"checkpoint": "m", "store": "s.zarr", "out": "p.parquet"},
        "evaluate": {"predictions": ["p.parquet"]}, "extract": {"train": {"shards": ["a.tar"], "store": "t.zarr"}}}


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["extract"]["train"].update(shards=[1]), r"^\[extract\.train\] shards\[0\]: input should be a valid string, got 1$"),
    (lambda d: d["evaluate"].update(predictions=[1]), r"^\[evaluate\] predictions\[0\]: input should be a valid string, got 1$"),
    (lambda d: d.update(workdir=3), r"^workdir: input should be a valid string, got 3$"),
    (lambda d: d["train"].update(steps=True), r"^\[train\] steps: input should be a valid integer, got True$"),
    (lambda d: d.update(extract=["a.tar"]), r"^\[extract\] must be a table"),
    (lambda d: d["evaluate"].update(baseline_store=5), r"^\[evaluate\] baseline_store: input should be a valid string"),
])
def test_wrong_types_are_one_line_errors(edit, message):
    doc = copy.deepcopy(BASE)
    edit(doc)
    with pytest.raises(GeopipeError, match=message):
        parse_pipeline_config(doc)


def test_ints_are_valid_floats_and_arrays_become_tuples():
    doc = copy.deepcopy(BASE)
    doc["train"]["lr"] = 1
    cfg = parse_pipeline_config(doc)
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float) and cfg.extract[0].shards == ("a.tar",)


def test_run_help_publishes_the_layout():
    from geopipe.flows.cli import cli

    out = CliRunner().invoke(cli, ["run", "--help"]).output
    for line in ("[extract.train]", "shards = [", "[train]", "[predict]", "[evaluate]", "baseline_store", "workdir"):
        assert line in out, line
    import tomllib

    from geopipe.flows.cli_flow import run_command as run

    example = run.help.split("\b\n", 1)[1]  # the layout shown is a valid config (click marks it with a backspace)
    cfg = parse_pipeline_config(tomllib.loads("\n".join(line.strip() for line in example.splitlines())))
    assert cfg.train.steps == 3000 and cfg.baseline_store == "data/run/train.zarr" and len(cfg.extract) == 2


def test_a_missing_shard_fails_the_run_at_once_in_one_line(tmp_path):
    """`geopipe run` in its own process (a failed in-process flow leaves Prefect state that upsets
    later Dask clients in the same test session): no retry, no traceback, one line in all."""
    import os
    import subprocess
    import sys

    t = str(tmp_path)
    (tmp_path / "run.toml").write_text(
        f'[extract.train]\nshards = ["{t}/nope-000000.tar"]\nstore = "{t}/t.zarr"\n'
        f'[train]\nstore = "{t}/t.zarr"\nout = "{t}/m"\n[predict]\ncheckpoint = "{t}/m"\nstore = "{t}/t.zarr"\n'
        f'out = "{t}/p.parquet"\n[evaluate]\npredictions = ["{t}/p.parquet"]\n')
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    res = subprocess.run([sys.executable, "-m", "geopipe", "run", str(tmp_path / "run.toml")], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 1, res.stderr
    err = res.stderr
    assert "Retry" not in err and "Traceback" not in err, err
    # one line: Prefect's own lines (temporary server start/stop, flow and task run states) are
    # held while the run goes and dropped when it fails (before: 7-10 of them around the error)
    (line,) = err.strip().splitlines()
    assert line.startswith(f"geopipe: error: shard not found: {t}/nope-000000.tar") and " (flow run '" in line, err
    assert res.stdout == ""


def test_prefect_logs_user_errors_without_traceback():
    """Inside brief_user_errors only (nothing is installed at import): a GeopipeError is logged
    without its traceback, a bug with it; with debug every traceback stays."""
    import logging
    import sys

    import geopipe.flows.pipeline_flow  # noqa: F401  (importing installs nothing)
    from geopipe.flows.tasks import brief_user_errors
    from geopipe.pipeline.ingest.shards import ShardNotFoundError

    def record(exc):
        try:
            raise exc
        except Exception:
            return logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())

    logger = logging.getLogger("prefect.flow_runs")
    outside = record(ShardNotFoundError("shard not found: x.tar"))
    assert logger.filter(outside) and outside.exc_info is not None
    with brief_user_errors(debug=True):
        debug = record(ShardNotFoundError("shard not found: x.tar"))
        assert logger.filter(debug) and debug.exc_info is not None
    with brief_user_errors():
        user, bug = record(ShardNotFoundError("shard not found: x.tar")), record(RuntimeError("bug"))
        assert logger.filter(user) and logger.filter(bug)
    assert user.exc_info is None and bug.exc_info is not None  # bugs keep their traceback
    assert not [f for f in logger.filters if type(f).__module__.startswith("geopipe")]  # Prefect may install its own


def test_prefect_console_lines_are_held_and_dropped_when_the_run_fails(monkeypatch):
    """console_on_success: Prefect's console lines are printed once the block ends normally (and
    bugs keep them), dropped with a GeopipeError, live with debug; nothing stays installed."""
    import logging

    import geopipe.flows.tasks as tasks
    from geopipe.pipeline.core.errors import GeopipeError

    class PrefectConsoleHandler(logging.Handler):  # stands for Prefect's own (matched by class name)
        def __init__(self):
            super().__init__()
            self.lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    handler, logger = PrefectConsoleHandler(), logging.getLogger("prefect.geopipe-test")
    logging.getLogger().addHandler(handler)
    exits = []
    monkeypatch.setattr("atexit.register", exits.append)
    try:
        with tasks.console_on_success():
            logger.warning("flow run started")
            assert handler.lines == []  # held
        assert handler.lines == ["flow run started"]
        with pytest.raises(GeopipeError), tasks.console_on_success():
            logger.warning("task run failed")
            raise GeopipeError("shard not found")
        assert handler.lines == ["flow run started"] and exits == [tasks._quiet_console_at_exit]
        with pytest.raises(KeyError), tasks.console_on_success():  # a bug: its lines are shown
            logger.warning("before the bug")
            raise KeyError("x")
        with tasks.console_on_success(debug=True):
            logger.warning("live")
            assert handler.lines[-2:] == ["before the bug", "live"]
        assert not handler.filters
        tasks._quiet_console_at_exit()
        logger.warning("Stopping temporary server")
        assert handler.lines[-1] == "live"
    finally:
        logging.getLogger().removeHandler(handler)
