"""Failure-prediction pictures (matplotlib Agg, no pyplot): sparsification curves with their
oracle and random references, and reliability (binned accuracy against binned uncertainty),
from the rows of :func:`geopipe.pipeline.eval.failure.failure_rows`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from geopipe.pipeline.core import fsio

__all__ = ["render_sparsification_plot", "render_reliability_plot"]


def _save(fig, path: str) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    fsio.write_atomic(path, buf.getvalue())


def render_sparsification_plot(path: str, rows: Sequence[dict], title: str = "Sparsification") -> str:
    """Accuracy of the kept records against the fraction removed (most uncertain first), one
    curve per score row of one model's records; their oracle dashed and random level dotted."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    for i, r in enumerate(rows):
        x = np.arange(len(r["curve"])) / len(r["curve"])
        ax.plot(x, r["curve"], lw=1.6, label=f"{r['score']} (AUSC {r['ausc']:.3f})")
        if i == 0:
            ax.plot(x, r["oracle"], "k--", lw=1.0, label=f"oracle (AUSC {r['ausc_oracle']:.3f})")
            ax.axhline(r["accuracy"], color="0.5", ls=":", lw=1.0, label="random")
    ax.set_xlabel("fraction of records removed (most uncertain first)")
    ax.set_ylabel(f"accuracy of the rest ({rows[0]['failure']})" if rows else "accuracy")
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, frameon=False)
    fig.suptitle(title)
    _save(fig, path)
    return path


def render_reliability_plot(path: str, rows: Sequence[dict], title: str = "Reliability") -> str:
    """Binned accuracy against the bin's uncertainty level (rank of its mean score), one line per row."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    for r in rows:
        levels = np.arange(1, len(r["bin_accuracy"]) + 1)
        s = "-" if r["spearman"] is None else f"{r['spearman']:.2f}"
        ax.plot(levels, r["bin_accuracy"], "o-", ms=3, lw=1.4, label=f"{r['score']} (S {s})")
    ax.set_xlabel("uncertainty level (adaptive bins, low → high)")
    ax.set_ylabel(f"accuracy in the bin ({rows[0]['failure']})" if rows else "accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, frameon=False)
    fig.suptitle(title)
    _save(fig, path)
    return path
