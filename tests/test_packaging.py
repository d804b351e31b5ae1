"""Packaging (issue 19, item 7): a distribution name of our own in every install hint, the
licence files shipped, and every package geopipe imports declared in pyproject.toml."""

from __future__ import annotations

import ast
import functools
import importlib.metadata as md
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import geopipe
from geopipe.pipeline.core.provenance import DISTRIBUTION, install_hint, provenance

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SOURCE_ROOTS = ("geopipe", "pipeline", "stages", "flows", "schemas")
# import name → distribution, for optional packages that may not be installed here
_KNOWN = {"faiss": "faiss-cpu", "reverse_geocoder": "reverse_geocoder", "pillow_heif": "pillow-heif", "geoclip": "geoclip",
          "PIL": "pillow", "sklearn": "scikit-learn", "open_clip": "open_clip_torch", "yaml": "pyyaml"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(reqs) -> set[str]:
    return {_norm(re.split(r"[\s<>=!~;\[(]", r.strip(), maxsplit=1)[0]) for r in reqs}


def _tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / f for f in out.splitlines() if f.endswith((".py", ".md", ".toml", ".txt", ".cfg")) or f in ("Makefile",)
            if (ROOT / f).is_file()]


def _imports(paths) -> dict[str, set[str]]:
    """Top-level third-party module → files importing it (absolute imports, anywhere in the file)."""
    found: dict[str, set[str]] = {}
    for f in paths:
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "geopipe":
                    found.setdefault(top, set()).add(str(f.relative_to(ROOT)))
    return found


@functools.cache
def _packages() -> dict:
    return md.packages_distributions()


def _distribution(module: str) -> str:
    dists = _packages().get(module)
    return _norm(dists[0]) if dists else _norm(_KNOWN.get(module, module))


def test_distribution_name_is_ours_and_the_import_root_and_command_stay_geopipe():
    project = PYPROJECT["project"]
    assert project["name"] == DISTRIBUTION == geopipe.DISTRIBUTION == "geopipe-geolocation"
    assert project["scripts"] == {"geopipe": "geopipe.flows.cli:main"}
    assert md.version(DISTRIBUTION) == geopipe.__version__ == provenance()["version"] != "0+unknown"
    assert install_hint("faiss") == "pip install 'geopipe-geolocation[faiss]'"


def test_no_install_hint_names_the_unrelated_geopipe_distribution():
    bad, hints = [], 0
    for f in _tracked_text_files():
        for i, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for m in re.finditer(r"pip install\b([^`\"\n)]*)", line):
                args = m.group(1)
                hints += 1
                if re.search(r"(^|[\s'\"])geopipe(\[|['\"\s]|$)", args) and "would install" not in line:  # the README naming the wrong one
                    bad.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
                if re.search(r"-e\s+['\"]?\.\[", args) and f.name != "Makefile":  # an extra's hint names the distribution
                    bad.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
    assert hints > 5 and not bad, "\n".join(bad)


def test_every_extra_in_a_hint_exists():
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    named = set()
    for f in _tracked_text_files():
        named |= set(re.findall(r"geopipe-geolocation\[(\w+)\]", f.read_text(encoding="utf-8", errors="replace")))
        named |= set(re.findall(r"install_hint\(['\"](\w+)['\"]\)", f.read_text(encoding="utf-8", errors="replace")))
    assert named and named <= extras, named - extras


def test_licence_files_are_shipped():
    licence = (ROOT / "LICENSE").read_text()
    assert licence.startswith("MIT License") and "Permission is hereby granted, free of charge" in licence
    assert PYPROJECT["project"]["license"] == "MIT"
    assert set(PYPROJECT["project"]["license-files"]) >= {"LICENSE", "NOTICE"}
    notice = (ROOT / "NOTICE").read_text()
    assert "ne_110m_outline.json" in notice and "Natural Earth" in notice and "public domain" in notice
    assert (ROOT / "pipeline" / "viz" / "ne_110m_outline.json").is_file()
    files = {Path(str(p)).name for p in md.files(DISTRIBUTION) or ()}
    assert {"LICENSE", "NOTICE"} <= files  # in the installed dist-info


def test_every_imported_package_is_declared():
    project = PYPROJECT["project"]
    hard = _requirement_names(project["dependencies"])
    extras = {name: _requirement_names(reqs) for name, reqs in project["optional-dependencies"].items()}
    declared = hard | set().union(*extras.values()) | {"dask", "distributed"}  # dask[distributed]
    source = _imports(p for root in SOURCE_ROOTS for p in (ROOT / root).rglob("*.py"))
    missing = {m: sorted(fs)[:2] for m, fs in source.items() if _distribution(m) not in declared}
    assert not missing, f"imported by geopipe but not declared in pyproject.toml: {missing}"
    for name in ("filelock", "braceexpand", "pydantic", "scipy", "scikit-learn", "psutil", "huggingface-hub"):
        assert name in hard, name
    local = {p.stem for p in (ROOT / "tests").rglob("*.py")} | {"tests"}  # the suite's own helper modules
    tests = _imports((ROOT / "tests").rglob("*.py"))
    test_ok = hard | extras["test"] | {"dask", "distributed", "pytest"}
    missing = {m: sorted(fs)[:2] for m, fs in tests.items() if m not in local and _distribution(m) not in test_ok}
    assert not missing, f"imported by the tests but not in the test extra: {missing}"


def test_readme_says_how_to_get_a_cpu_only_torch():
    readme = (ROOT / "README.md").read_text()
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme and "geopipe-geolocation" in readme
