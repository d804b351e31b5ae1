"""How an artifact was made: package version and git revision (written into every output)."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

__all__ = ["provenance"]

_UNKNOWN_VERSION = "0+unknown"


def _package_version() -> str:
    try:
        return metadata.version("geopipe")
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
