"""Shared pieces of the command line: user-facing error handling, the global ``--quiet``."""

from __future__ import annotations

import functools
import signal
import sys
import traceback

import click

__all__ = ["user_errors", "report_hint", "progress_enabled", "device_option", "pipeline_progress", "ConfigOption", "config_option",
           "config_default", "given"]


def progress_enabled() -> bool:
    """False when ``geopipe --quiet …`` was given: commands then show no progress on stderr."""
    ctx = click.get_current_context(silent=True)
    return not (ctx is not None and ctx.find_root().params.get("quiet"))


def report_hint() -> str:
    """The line printed under the traceback of an unexpected exception."""
    from geopipe import __version__

    return f"geopipe: this is a bug in geopipe {__version__}; please report it with the traceback above"


#: What to do after an interrupted command (Ctrl-C, SIGTERM).
RESUME_HINT = ("finished work is kept: rerun the same command (extract, import, train and Dask predict go on "
               "from where they stopped)")


def user_errors(fn):
    """Error policy of every command, exit status 1 either way:

    - :class:`~geopipe.pipeline.core.errors.GeopipeError` (a problem the user can fix) prints its
      message as one line, ``geopipe: error: ...``, without a traceback;
    - any other exception is a bug: its full traceback is printed, then one line saying how to
      report it. Click's own exceptions (usage errors, aborts, exits) pass through untouched;
    - Ctrl-C (exit status 130) and SIGTERM (143) print one line saying how to resume.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from geopipe.pipeline.core.errors import GeopipeError

        try:
            return fn(*args, **kwargs)
        except GeopipeError as exc:
            text = str(exc).strip()
            msg = text.splitlines()[0] if text else type(exc).__name__
            click.echo(f"geopipe: error: {msg}", err=True)
            sys.exit(1)
        except (click.exceptions.ClickException, click.exceptions.Abort, click.exceptions.Exit):
            raise
        except KeyboardInterrupt:
            click.echo(f"geopipe: interrupted; {RESUME_HINT}", err=True)
            sys.exit(130)
        except SystemExit as exc:
            if exc.code == 128 + signal.SIGTERM:  # raised by the SIGTERM handler of long stages
                click.echo(f"geopipe: terminated; {RESUME_HINT}", err=True)
            raise
        except Exception:
            traceback.print_exc(file=sys.stderr)
            click.echo(report_hint(), err=True)
            sys.exit(1)

    return wrapper


def device_option(fn):
    """The ``--device`` option shared by every command that runs a model."""
    return click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")(fn)


def config_default(config: str, name: str):
    """The default of field ``name`` of the config dataclass ``config`` ("module:Class"); the
    module is imported now (call it when the value is needed, never at import)."""
    import dataclasses
    import importlib

    module, cls = config.split(":")
    fields = {f.name: f for f in dataclasses.fields(getattr(importlib.import_module(module), cls))}
    f = fields[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


class ConfigOption(click.Option):
    """An option whose default is stated once, in a stage's config dataclass: the command gets
    None when the option is not given (and passes nothing, so the dataclass decides), and
    ``--help`` shows the real default, read when the help is rendered (the stage module is
    imported then, never when ``geopipe`` starts). ``describe`` (a callable → str) replaces the
    plain field default, e.g. for per-method defaults."""

    def __init__(self, *args, config: str, field: str | None = None, describe=None, **kwargs):
        super().__init__(*args, default=None, **kwargs)
        self.config, self.field, self.describe = config, field or self.name, describe

    def get_help_extra(self, ctx: click.Context):
        extra = super().get_help_extra(ctx)
        value = self.describe() if self.describe is not None else config_default(self.config, self.field)
        if value is not None and value != "":
            extra["default"] = ", ".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)
        return extra


def config_option(*decls, config: str, field: str | None = None, describe=None, **kwargs):
    """``click.option`` of a :class:`ConfigOption` (``type=`` is needed: there is no default to infer it from)."""
    return click.option(*decls, cls=ConfigOption, config=config, field=field, describe=describe, **kwargs)


def given(**options) -> dict:
    """The options the user gave: those not None (a flag left off counts as not given when passed as ``flag or None``)."""
    return {k: v for k, v in options.items() if v is not None}


def pipeline_progress(cfg):
    """The pipeline config with each stage's progress switched off under ``--quiet``."""
    if progress_enabled():
        return cfg
    import dataclasses

    off = lambda c: c if c is None else dataclasses.replace(c, progress=False)  # noqa: E731
    unc = cfg.uncertainty
    if unc is not None:
        unc = dataclasses.replace(unc, retrieve=off(unc.retrieve), bayescap=off(unc.bayescap))
    return dataclasses.replace(cfg, extract=tuple(off(e) for e in cfg.extract), train=off(cfg.train), predict=off(cfg.predict),
                               uncertainty=unc)
