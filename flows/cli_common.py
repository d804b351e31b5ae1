"""Shared pieces of the command line: user-facing error handling, the global ``--quiet``."""

from __future__ import annotations

import functools
import signal
import sys
import traceback

import click

__all__ = ["user_errors", "report_hint", "progress_enabled", "device_option", "pipeline_progress"]


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
