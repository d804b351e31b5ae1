"""Shared pieces of the command line: user-facing error handling."""

from __future__ import annotations

import functools
import sys

import click

__all__ = ["user_errors"]


def user_errors(fn):
    """Turn expected failures into one-line messages (no traceback) and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from geopipe.pipeline.core.errors import GeopipeError

        try:
            return fn(*args, **kwargs)
        except (GeopipeError, ValueError, FileNotFoundError, KeyError) as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            click.echo(f"geopipe: error: {msg}", err=True)
            sys.exit(1)

    return wrapper
