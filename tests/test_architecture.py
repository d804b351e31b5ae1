"""Architecture rules: one-way layering, prefect/click only in flows, public names resolve."""

import ast
import importlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERS = {"schemas": set(), "pipeline": {"schemas"}, "stages": {"pipeline", "schemas"}, "flows": {"stages", "pipeline", "schemas"}}
PROJECT = set(LAYERS)
FLOWS_ONLY = {"prefect", "click"}


def _modules():
    for pkg in LAYERS:
        for path in sorted((ROOT / pkg).glob("*.py")):
            yield pkg, path


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0]


@pytest.mark.parametrize("pkg,path", list(_modules()), ids=lambda v: str(v).split("/")[-1])
def test_layering(pkg, path):
    for top in _imports(path):
        if top in PROJECT and top != pkg:
            assert top in LAYERS[pkg], f"{path.relative_to(ROOT)} imports {top}: {pkg} may import only {sorted(LAYERS[pkg])}"
        if top in FLOWS_ONLY:
            assert pkg == "flows", f"{path.relative_to(ROOT)} imports {top}; only flows/ may"


@pytest.mark.parametrize("pkg,path", list(_modules()), ids=lambda v: str(v).split("/")[-1])
def test_public_surface(pkg, path):
    name = f"{pkg}.{path.stem}" if path.stem != "__init__" else pkg
    module = importlib.import_module(name)
    assert hasattr(module, "__all__"), f"{name} lacks __all__"
    for public in module.__all__:
        assert hasattr(module, public), f"{name}.__all__ names {public!r} which does not exist"


def test_cli_help_is_fast_and_light():
    import subprocess
    import sys

    code = "import sys, flows.cli; print(any(m.startswith(('torch', 'prefect', 'open_clip')) for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False", "importing the CLI must not import torch/prefect/open_clip"
