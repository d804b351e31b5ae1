"""Importing geopipe changes nothing outside it: no environment variable, no warnings filter
and no logging filter is set by a geopipe module at import (they are scoped to the code that
needs them)."""

from __future__ import annotations

import subprocess
import sys

CODE = r"""
import importlib, logging, os, pathlib, sys, warnings

root = pathlib.Path(sys.argv[1])
names = []
for layer in ("schemas", "pipeline", "stages", "flows"):
    for p in sorted((root / layer).rglob("*.py")):
        parts = [x for x in p.relative_to(root / layer).with_suffix("").parts if x != "__init__"]
        names.append(".".join(["geopipe", layer, *parts]))
calls = []

def caller():
    frame = sys._getframe(2)
    return frame.f_globals.get("__name__", "")

def spy(fn, what):
    def wrapped(*args, **kwargs):
        if caller().startswith("geopipe"):
            calls.append(f"{what} from {caller()}")
        return fn(*args, **kwargs)
    return wrapped

warnings.filterwarnings = spy(warnings.filterwarnings, "warnings.filterwarnings")
warnings.simplefilter = spy(warnings.simplefilter, "warnings.simplefilter")
logging.Filterer.addFilter = spy(logging.Filterer.addFilter, "logging addFilter")
env = dict(os.environ)
for name in names:
    importlib.import_module(name)
calls += [f"environment variable {k}" for k in sorted(set(env) ^ set(os.environ) | {k for k in env if os.environ.get(k) != env[k]})]
print(len(names), calls)
"""


def test_importing_every_module_has_no_side_effects():
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", CODE, str(root)], capture_output=True, text=True, cwd="/", check=True)
    n, calls = out.stdout.strip().split(" ", 1)
    assert int(n) > 100 and calls == "[]", out.stdout
