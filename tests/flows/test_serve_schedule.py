"""geopipe serve checks its schedule (one validator for --cron and --interval) and its config
(the one TOML loader) before it starts anything: each bad value is one line, and no Prefect
server is started for it."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from geopipe.flows.cli import cli
from geopipe.flows.serve import MAX_INTERVAL_S, check_schedule
from geopipe.pipeline.core.errors import ConfigError

GOOD_CRONS = ["0 3 * * *", "*/5 * * * *", "0 9-17 * * mon-fri", "0 0 1 JAN,jul *", "15,45 */2 1-31/3 * 0,7", "@daily", "@HOURLY"]
BAD_CRONS = {"not a cron": "it has 3 fields", "61 25 * * *": "minute field '61' is outside 0-59",
             "0 25 * * *": "hour field '25' is outside 0-23", "0 0 0 * *": "day of month field '0' is outside 1-31",
             "0 0 * 13 *": "month field '13' is outside 1-12", "0 0 * * 8": "day of week field '8' is outside 0-7",
             "*/0 * * * *": "minute field '\\*/0' is not", "5-1 * * * *": "runs backwards", "0 3 * * * *": "it has 6 fields",
             "": "it has 0 fields", "@fortnightly": "it has 1 fields", "a b c d e": "minute field 'a' is not"}


@pytest.mark.parametrize("cron", GOOD_CRONS)
def test_standard_cron_expressions_pass(cron):
    check_schedule(cron, None)


@pytest.mark.parametrize("cron, why", BAD_CRONS.items())
def test_bad_cron_expressions_are_one_line_saying_why(cron, why):
    with pytest.raises(ConfigError, match=rf"^--cron {re.escape(repr(cron))} is not a cron schedule: .*{why}") as err:
        check_schedule(cron, None)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("interval", [0, -5, 0.0, float("nan"), float("inf"), MAX_INTERVAL_S + 1, 1e308, True])
def test_bad_intervals_are_one_line(interval):
    with pytest.raises(ConfigError, match=r"^--interval must be a number of seconds in \(0, 31622400\]"):
        check_schedule(None, interval)


def test_exactly_one_schedule():
    check_schedule(None, 0.5)
    check_schedule(None, MAX_INTERVAL_S)
    for cron, interval in ((None, None), ("0 3 * * *", 60)):
        with pytest.raises(ConfigError, match="give exactly one of --cron or --interval"):
            check_schedule(cron, interval)


@pytest.mark.parametrize("args", [["--cron", "not a cron"], ["--cron", "61 25 * * *"], ["--interval", "0"], ["--interval", "-5"]])
def test_serve_refuses_before_starting_a_server(tmp_path, monkeypatch, args):
    import geopipe.flows.serve as serve

    def started(echo):
        raise AssertionError("a Prefect server was started for a schedule that cannot run")

    monkeypatch.setattr(serve, "scheduling_api", started)
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'[extract.t]\nshards = ["{tmp_path}/x-*.tar"]\nstore = "{tmp_path}/t.zarr"\n')
    res = CliRunner().invoke(cli, ["serve", str(cfg), *args])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
    assert res.output.startswith("geopipe: error: --") and "Traceback" not in res.output
    binary = tmp_path / "b.toml"
    binary.write_bytes(bytes(range(256)))
    res = CliRunner().invoke(cli, ["serve", str(binary), "--cron", "0 3 * * *"])
    assert res.exit_code == 1 and res.output.strip() == f"geopipe: error: pipeline config {binary} is not UTF-8 text (byte 128: a binary file?)"
