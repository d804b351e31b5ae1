"""Progress of long work: items done / total with a rate and an ETA, on stderr.

One helper for every long loop (extract images, imported rows, predicted records, ODE solves,
grid points, benchmark repeats, training steps). On a terminal it draws a tqdm bar; on a
non-terminal (a log file, a pipe, a Prefect worker) it prints one plain line every
``every_s`` seconds and a last line when done, so logs stay readable; ``enabled=False``
(``--quiet``) prints nothing. Counting is cheap enough to call per record.

    with Progress(total=n, desc="predict", unit="rec", enabled=not quiet) as bar:
        for batch in batches:
            ...
            bar.update(len(batch))
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress", "DEFAULT_EVERY_S"]

DEFAULT_EVERY_S = 10.0  # seconds between plain log lines on a non-terminal

_LINE = "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
_LINE_NO_TOTAL = "{desc}: {n_fmt} {unit} [{elapsed}, {rate_fmt}{postfix}]"


class Progress:
    """Count ``update(n)`` calls towards ``total`` (None: unknown) and show them.

    desc: what runs (``"predict"``); unit: what is counted (``"rec"``, ``"img"``, ``"step"``,
    ``"point"``); initial: already done (a resumed run); enabled: False prints nothing;
    every_s: seconds between plain lines on a non-terminal; stream: default ``sys.stderr``.
    ``total`` may be raised or set later (``bar.total = m``) when the size becomes known.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "rec", *, initial: int = 0,
                 enabled: bool = True, every_s: float = DEFAULT_EVERY_S, stream: TextIO | None = None):
        self.desc, self.unit, self.enabled, self.every_s = desc, unit, enabled, float(every_s)
        self.stream = stream if stream is not None else sys.stderr
        self.n, self._initial, self._total, self._postfix = int(initial), int(initial), total, ""
        self._t0 = self._last = time.monotonic()
        self._closed, self._printed = False, None
        self._bar = None
        if enabled and _is_terminal(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream,
                             dynamic_ncols=True, mininterval=0.5)

    @property
    def total(self) -> int | None:
        return self._total

    @total.setter
    def total(self, value: int | None) -> None:
        self._total = value
        if self._bar is not None:
            self._bar.total = value
            self._bar.refresh()

    def update(self, n: int = 1) -> None:
        """Count ``n`` more items done."""
        self.n += int(n)
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled:
            now = time.monotonic()
            if now - self._last >= self.every_s:
                self._last = now
                self._print(now)

    def set_postfix(self, **values) -> None:
        """Extra ``key=value`` fields shown after the rate (a loss, a reject count)."""
        self._postfix = ", ".join(f"{k}={v}" for k, v in values.items())
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)

    def line(self) -> str:
        """The plain progress line for the current count."""
        from tqdm import tqdm

        elapsed = time.monotonic() - self._t0
        done = self.n - self._initial
        rate = done / elapsed if elapsed > 0 and done > 0 else None
        fmt = _LINE if self._total else _LINE_NO_TOTAL
        return tqdm.format_meter(self.n, self._total, elapsed, prefix=self.desc, unit=self.unit, rate=rate,
                                 postfix=self._postfix or None, bar_format=fmt.replace("{desc}", self.desc))

    def _print(self, now: float) -> None:
        if self._printed != self.n:  # never the same count twice
            self._printed = self.n
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        """Finish: close the bar, or print the last plain line (once)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.n > self._initial:
            self._print(time.monotonic())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a real file
        return False
