"""What the exact likelihoods of a run will cost, said before it starts.

``--nll`` and ``--localizability N`` solve an ODE per record (localizability: one per sample,
batched), about a second per record on a CPU: scoring 10K records can take hours.
:func:`probe_likelihood_cost` times them on a few records — after one warm-up record, since
torch's forward-mode AD sets itself up on first use (seconds) — as the difference between
:func:`~geopipe.pipeline.infer.predictor.predict_batch` with and without them, and
:class:`LikelihoodCost` turns that into the expected time of the run and, when it is long, the
``--likelihood-every K`` that brings it under :data:`SUGGEST_AFTER_S`. An ODE solve of a batch
costs a fixed part (the solver's steps) plus a part per record, so the probe times 1 and 4
records, fits time = a + b·records, and charges each record b + a / (the run's records per
likelihood batch): 4 records alone would cost 3× the per-record time of 32-record batches.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

__all__ = ["SUGGEST_AFTER_S", "MIN_PROBED_RUN", "LikelihoodCost", "likelihood_records", "probe_likelihood_cost"]

#: Expected likelihood time (seconds) above which the message suggests ``--likelihood-every``.
SUGGEST_AFTER_S = 600.0
#: Runs with fewer likelihood records than this are not probed (the probe would cost a real share).
MIN_PROBED_RUN = 64


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def likelihood_records(n_rows: int, every: int) -> int:
    """Store rows r < n_rows with r % every == 0: the records that get the likelihood columns."""
    return len(range(0, int(n_rows), max(1, int(every))))


@dataclass(frozen=True)
class LikelihoodCost:
    """seconds_per_record: measured cost of the likelihood columns of one record; records: how
    many records get them; probed: records timed; every: the run's ``likelihood_every``."""

    seconds_per_record: float
    records: int
    probed: int
    every: int = 1

    @property
    def expected_s(self) -> float:
        return self.seconds_per_record * self.records

    def suggested_every(self) -> int | None:
        """The ``--likelihood-every`` that brings the expected time under SUGGEST_AFTER_S (None: not needed)."""
        if self.expected_s <= SUGGEST_AFTER_S:
            return None
        return self.every * math.ceil(self.expected_s / SUGGEST_AFTER_S)

    def message(self, what: str, options: str) -> str:
        """One line for stderr, e.g. ``geopipe: predict: --nll take about 0.8 s per record (…)``."""
        line = (f"geopipe: {what}: {options} take about {self.seconds_per_record:.2g} s per record (probe of {self.probed} records): "
                f"about {_duration(self.expected_s)} for {self.records:,} records")
        k = self.suggested_every()
        if k:
            n = self.records * self.every
            line += (f"; --likelihood-every {k} scores one record in {k} "
                     f"(about {_duration(self.seconds_per_record * likelihood_records(n, k))})")
        return line


def probe_likelihood_cost(p, embeddings, latlon, opts, n_rows: int, *, batch: int = 4096, probe: int = 4) -> LikelihoodCost | None:
    """Time the likelihood columns of ``opts`` on the first 1 and ``probe`` records of (P, D)
    ``embeddings`` / (P, 2) ``latlon`` degrees with predictor ``p``; ``batch``: records per
    likelihood batch in the run. None when ``opts`` asks for none or the run has fewer than
    :data:`MIN_PROBED_RUN` likelihood records among ``n_rows``."""
    import torch

    from geopipe.pipeline.infer.predictor import predict_batch

    records = likelihood_records(n_rows, opts.likelihood_every)
    k = min(int(probe), len(embeddings))
    if not (opts.nll or opts.localizability) or records < MIN_PROBED_RUN or k < 1:
        return None
    full = dataclasses.replace(opts, samples=0, ensemble=0, region=None, likelihood_every=1)
    point = dataclasses.replace(full, nll=False, localizability=0)
    keys = [f"probe-{i}" for i in range(k)]

    def timed(o, n) -> float:
        t0 = time.perf_counter()
        predict_batch(p, embeddings[:n], latlon[:n], keys[:n], o, torch.Generator(device=p.device).manual_seed(0))
        return time.perf_counter() - t0

    timed(full, 1)  # warm-up
    one = max(timed(full, 1) - timed(point, 1), 0.0)
    many = max(timed(full, k) - timed(point, k), one)
    per_record = (many - one) / (k - 1) if k > 1 else many
    per_batch = max(one - per_record, 0.0)
    return LikelihoodCost(per_record + per_batch / max(1, min(int(batch), records)), records, k, int(opts.likelihood_every))
