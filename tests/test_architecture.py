"""Architecture rules: one import root, one-way layering between layers and between the
concept packages of ``pipeline/``, prefect/click only in flows, public names resolve."""

import ast
import importlib
import pathlib
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERS = {"schemas": set(), "pipeline": {"schemas"}, "stages": {"pipeline", "schemas"}, "flows": {"stages", "pipeline", "schemas"}}
FLOWS_ONLY = {"prefect", "click"}
BARE = set(LAYERS)  # the folder names, never importable on their own
# Concept packages of pipeline/, lowest first: a package may import only packages before it
# (uncertainty before retrieval: the retrieval predictor writes the training-free uncertainty scores).
PIPELINE_ORDER = ["core", "sphere", "store", "vpr", "vision", "ingest", "world", "artifacts", "model", "methods", "train", "infer",
                  "eval", "uncertainty", "retrieval", "inspection", "viz"]
MAX_MODULES = 10


def _modules():
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            yield layer, path


def _dotted(layer, path):
    rel = path.relative_to(ROOT / layer).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(["geopipe", layer, *parts])


def _imports(path):
    """Absolute module names imported by ``path`` (relative imports are not allowed)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.relative_to(ROOT)}: use absolute imports (geopipe....)"
            if node.module == "geopipe.pipeline" or (node.module and node.module.startswith("geopipe.pipeline.") and node.module.count(".") == 2):
                for alias in node.names:  # ``from geopipe.pipeline.core import fsio`` imports geopipe.pipeline.core.fsio
                    yield f"{node.module}.{alias.name}"
            else:
                yield node.module


ALL = list(_modules())
IDS = [str(p.relative_to(ROOT)) for _, p in ALL]


@pytest.mark.parametrize("layer,path", ALL, ids=IDS)
def test_layering(layer, path):
    for name in _imports(path):
        parts = name.split(".")
        assert parts[0] not in BARE, f"{path.relative_to(ROOT)} imports bare {name!r}; import geopipe.{name}"
        if parts[0] == "geopipe" and len(parts) > 1 and parts[1] in LAYERS and parts[1] != layer:
            assert parts[1] in LAYERS[layer], f"{path.relative_to(ROOT)} imports {name}: {layer} may import only {sorted(LAYERS[layer])}"
        if parts[0] in FLOWS_ONLY:
            assert layer == "flows", f"{path.relative_to(ROOT)} imports {parts[0]}; only flows/ may"


@pytest.mark.parametrize("path", [p for layer, p in ALL if layer == "pipeline"], ids=lambda p: str(p.relative_to(ROOT)))
def test_pipeline_packages_import_downwards(path):
    rel = path.relative_to(ROOT / "pipeline").parts
    if len(rel) < 2:
        return
    own = rel[0]
    assert own in PIPELINE_ORDER, f"pipeline/{own}/ is not in the package order of tests/test_architecture.py"
    for name in _imports(path):
        parts = name.split(".")
        if parts[:2] == ["geopipe", "pipeline"] and len(parts) > 2 and parts[2] != own:
            other = parts[2]
            assert PIPELINE_ORDER.index(other) < PIPELINE_ORDER.index(own), (
                f"{path.relative_to(ROOT)} imports {name}: pipeline/{own} may import only "
                f"{PIPELINE_ORDER[:PIPELINE_ORDER.index(own)]}")


def _import_graph() -> dict[str, set[str]]:
    """module → the project modules it imports (anywhere in the file, lazy imports included)."""
    modules = {_dotted(layer, path): path for layer, path in ALL}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for imported in _imports(path):
            while imported and imported not in modules:  # ``from pkg.mod import obj``: the module is the longest known prefix
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                edges.add(imported)
        graph[name] = edges
    return graph


#: Cycles being taken apart elsewhere (each must still exist: remove it here once it is gone).
KNOWN_CYCLES: set[frozenset] = set()


def test_no_import_cycles():
    """No circle anywhere in the tree (module level, lazy imports included): every module can be
    read after the modules it imports."""
    graph, state, cycles = _import_graph(), {}, []

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    new = [c for c in cycles if frozenset(c) not in KNOWN_CYCLES]
    assert not new, "import cycles: " + "; ".join(" → ".join(c) for c in new[:5])
    gone = KNOWN_CYCLES - {frozenset(c) for c in cycles}
    assert not gone, f"no longer cycles, remove them from KNOWN_CYCLES: {[sorted(c) for c in gone]}"


def test_pipeline_is_packages_of_a_few_modules():
    assert sorted(p.name for p in (ROOT / "pipeline").glob("*.py")) == ["__init__.py"], "pipeline/ holds packages, not modules"
    for pkg in (ROOT / "pipeline").iterdir():
        if pkg.is_dir() and (pkg / "__init__.py").exists():
            n = len([p for p in pkg.glob("*.py") if p.name != "__init__.py"])
            assert 2 <= n <= MAX_MODULES, f"pipeline/{pkg.name} has {n} modules (keep 2–{MAX_MODULES})"


def test_every_package_is_installed():
    """Each folder with an ``__init__.py`` is listed in pyproject's packages (one ``geopipe`` root)."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"geopipe"}
    for layer in LAYERS:
        for init in (ROOT / layer).rglob("__init__.py"):
            found.add(_dotted(layer, init))
    assert found == listed, f"pyproject packages differ: missing {sorted(found - listed)}, extra {sorted(listed - found)}"
    assert all(name == "geopipe" or name.startswith("geopipe.") for name in listed)


@pytest.mark.parametrize("layer,path", ALL, ids=IDS)
def test_public_surface(layer, path):
    name = _dotted(layer, path)
    module = importlib.import_module(name)
    assert hasattr(module, "__all__"), f"{name} lacks __all__"
    for public in module.__all__:
        assert hasattr(module, public), f"{name}.__all__ names {public!r} which does not exist"


def test_package_root_exposes_version_and_runs_as_module():
    import subprocess
    import sys

    import geopipe

    assert geopipe.__version__ and geopipe.__version__ != "0+unknown"
    out = subprocess.run([sys.executable, "-m", "geopipe", "--help"], capture_output=True, text=True, cwd="/", check=True)
    assert "Usage:" in out.stdout and "extract" in out.stdout


def test_cli_help_is_fast_and_light():
    import subprocess
    import sys

    code = "import sys, geopipe.flows.cli; print(any(m.startswith(('torch', 'prefect', 'open_clip')) for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert out.stdout.strip() == "False", "importing the CLI must not import torch/prefect/open_clip"


#: Modules of stages/ allowed to import other stages: the benchmarks (they time the stages
#: themselves). stages/config.py reads the pipeline's TOML into the stages' config dataclasses
#: and may import those dataclasses (names ending in ``Config``) and nothing else of a stage.
STAGE_IMPORT_EXCEPTIONS = ("bench",)


def _stage_imports(path):
    """(module, names) of every ``geopipe.stages.*`` import of ``path`` (names: None for ``import x``)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((a.name, None) for a in node.names if a.name.startswith("geopipe.stages."))
        elif isinstance(node, ast.ImportFrom) and node.module and (node.module.startswith("geopipe.stages.") or node.module == "geopipe.stages"):
            yield node.module, [a.name for a in node.names]


@pytest.mark.parametrize("path", [p for layer, p in ALL if layer == "stages"], ids=lambda p: str(p.relative_to(ROOT)))
def test_no_stage_imports_another_stage(path):
    """Shared logic lives in pipeline/ (principle 14): a stage composes library calls."""
    if path.stem.startswith(STAGE_IMPORT_EXCEPTIONS) or path.name == "__init__.py":
        return
    for module, names in _stage_imports(path):
        if module.rsplit(".", 1)[-1] == path.stem:
            continue
        if path.name == "config.py" and names and all(n.endswith("Config") for n in names):
            continue
        pytest.fail(f"{path.relative_to(ROOT)} imports {module}{'' if names is None else ' (' + ', '.join(names) + ')'}: a stage "
                    "imports no other stage; move the shared code to pipeline/")
