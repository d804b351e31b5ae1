"""What an ingest run (``extract`` or ``import``) did, and its one-line summary for humans."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["IngestResult"]


@dataclass(frozen=True)
class IngestResult:
    """Rows added and rejects (this run); shards/pairs ingested, skipped (already done), whose file
    changed since the store recorded it, and in the store but not given; wall time of the stage.

    Subclasses name their unit (``UNIT``: "shards", "pairs"), their verb and their throughput.
    """

    store: str
    n_ok: int
    n_rejected: int
    rejects_by_reason: dict = field(default_factory=dict)
    shards_done: int = 0
    shards_skipped: int = 0
    seconds: float = 0.0
    shards_changed: tuple[str, ...] = ()
    shards_missing: tuple[str, ...] = ()

    VERB = "ingest"
    UNIT = "shards"

    def _changed_how(self) -> str:
        """How changed shards were handled, for the summary ('' = not said)."""
        return ""

    def _throughput(self) -> str:
        return ""

    def summary(self) -> str:
        """One line: counts, rejects by reason, changed/missing shards, throughput, wall time."""
        why = ", ".join(f"{r}: {c}" for r, c in self.rejects_by_reason.items())
        text = (f"{self.VERB} → {self.store}: {self.n_ok} ok, {self.n_rejected} rejected" + (f" ({why})" if why else "")
                + f"; {self.shards_done} {self.UNIT} {self.VERB}ed, {self.shards_skipped} already done")
        changed, missing = self.shards_changed, self.shards_missing
        if changed:
            how = self._changed_how()
            text += f"; {len(changed)} changed (" + (f"{how}, " if how else "") + f"e.g. {changed[0]})"
        if missing:
            text += f"; {len(missing)} in the store but not given (rows kept, e.g. {missing[0]})"
        return text + f"; {self._throughput()}, {self.seconds:.1f} s"
