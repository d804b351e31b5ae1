"""How an artifact was made: package version and git revision (written into every output)."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

__all__ = ["DISTRIBUTION", "install_hint", "provenance"]

#: The distribution name on the package index (import root and console script stay ``geopipe``;
#: the ``geopipe`` name on PyPI is an unrelated project).
DISTRIBUTION = "geopipe-geolocation"

_UNKNOWN_VERSION = "0+unknown"


def install_hint(extra: str) -> str:
    """The pip command that installs optional dependency group ``extra``, e.g.
    ``pip install 'geopipe-geolocation[faiss]'`` (also right in an editable checkout: pip keeps the
    installed project and adds the extra's packages)."""
    return f"pip install '{DISTRIBUTION}[{extra}]'"


def _package_version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return _UNKNOWN_VERSION


def _git_rev() -> str | None:
    """``git rev-parse HEAD`` of the checkout holding this file, or None (no git, no commit, not a repo)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    rev = out.stdout.strip()
    return rev if out.returncode == 0 and len(rev) == 40 else None


def provenance() -> dict[str, str | None]:
    """``{"version": installed geopipe version or "0+unknown", "git_rev": 40-hex HEAD or None}``."""
    return {"version": _package_version(), "git_rev": _git_rev()}
