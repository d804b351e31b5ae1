"""User-facing errors: the CLI prints their message as one line and exits with status 1."""

from __future__ import annotations

__all__ = ["GeopipeError"]


class GeopipeError(Exception):
    """An error the user can fix (bad path, incompatible inputs, bad option); message is one line."""
