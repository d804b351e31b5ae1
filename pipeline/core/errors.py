"""User-facing errors: the CLI prints their message as one line and exits with status 1.

Raise :class:`GeopipeError` (or a subclass) only for problems the user can fix — a bad path, an
option out of range, incompatible inputs — with one line naming the file/record/option and
what to do. Every other exception is a bug: the CLI keeps its traceback and asks for a report.
"""

from __future__ import annotations

__all__ = ["GeopipeError", "ConfigError", "check_int"]


class GeopipeError(Exception):
    """An error the user can fix (bad path, incompatible inputs, bad option); message is one line."""


class ConfigError(GeopipeError, ValueError):
    """An option or configuration value is invalid (unknown name, out of range); one line naming
    the option, what it got and what it accepts. Also a ``ValueError``, so callers that validate
    values the standard way keep catching it."""


def check_int(value, name: str, minimum: int = 1, *, where: str = "", maximum: int | None = None) -> int:
    """``value`` when it is an ``int`` (not a ``bool``) of at least ``minimum`` (and at most
    ``maximum`` when given); else ConfigError ``"<where>: <name> must be an integer >= <minimum>,
    got <value>"`` (``in [<minimum>, <maximum>]`` with a maximum)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum:,}]"
        raise ConfigError(f"{where + ': ' if where else ''}{name} must be an integer {bound}, got {value!r}")
    return value
