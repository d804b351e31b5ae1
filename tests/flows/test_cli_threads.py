"""``geopipe --threads N`` (or GEOPIPE_THREADS) sets torch's CPU threads and the OpenMP/BLAS
variables its child processes inherit; 0 is refused; run in a child process (torch's thread
count is process-wide)."""

import json
import subprocess
import sys

import pytest

from geopipe.pipeline.core.device import set_cpu_threads
from geopipe.pipeline.core.errors import ConfigError

_PROBE = """
import json, os, sys, click, torch
from geopipe.flows.cli import cli

@cli.command("probe-threads")
def probe():
    click.echo(json.dumps([torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")]))

cli(sys.argv[1:], standalone_mode=True)
"""


def _probe(args, env=None):
    import os

    res = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **(env or {})})
    return res.returncode, res.stdout.strip().splitlines()[-1] if res.stdout.strip() else res.stderr


def test_threads_option_and_environment_variable():
    assert _probe(["--threads", "1", "probe-threads"]) == (0, json.dumps([1, "1"]))
    assert _probe(["probe-threads"], {"GEOPIPE_THREADS": "1"}) == (0, json.dumps([1, "1"]))
    code, err = _probe(["--threads", "0", "probe-threads"])
    assert code == 2 and "Invalid value for '--threads'" in err


def test_set_cpu_threads_checks_its_argument():
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ConfigError, match="threads must be an integer >= 1"):
            set_cpu_threads(bad)
