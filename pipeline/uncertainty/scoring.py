"""Scoring store records with a trained BayesCap checkpoint: load it (refusing another kind of
checkpoint or another embedding space) and compute ``log_u``, ``log_u_alea``, ``log_u_epi``.

Rows are scored in groups of ``4·batch`` rows; group ``g`` (the rows at positions
[g, g + 4·batch) of the row list) draws its MC-dropout masks from ``seed + g``. The numbers
of a row therefore depend on (checkpoint, seed, its position in the row list, passes, batch)
only, never on how a caller slices the list: :class:`RowScorer` serves consecutive slices
(e.g. the query blocks of a retrieval) with the numbers :func:`score_rows` gives for the
whole list, holding one group's scores at a time.
"""

from __future__ import annotations

import numpy as np
import torch

from geopipe.pipeline.artifacts.checkpoint import load_checkpoint_config, load_model_weights
from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.store.reader import EmbeddingStore
from geopipe.pipeline.store.space import check_same_space, checkpoint_space, store_space
from geopipe.pipeline.uncertainty.bayescap import BAYESCAP_METHODS, BayesCapConfig, BayesCapMLP
from geopipe.pipeline.uncertainty.mc_dropout import score_embeddings
from geopipe.schemas.checkpoint import UNCERTAINTY, checkpoint_method
from geopipe.schemas.predictions import score_columns

__all__ = ["SCORE_NAMES", "load_bayescap", "check_bayescap", "RowScorer", "score_rows"]

#: The columns a BayesCap checkpoint fills, (N,) float64 each (the schema's ``bayescap`` scores).
SCORE_NAMES = score_columns("bayescap")


def load_bayescap(checkpoint: str) -> tuple[BayesCapMLP, dict]:
    """A trained BayesCap network (eval mode) and its checkpoint config."""
    cfg = load_checkpoint_config(checkpoint)
    if cfg["kind"] != UNCERTAINTY or cfg["method"] not in BAYESCAP_METHODS:
        raise GeopipeError(f"{checkpoint} is a checkpoint of method {checkpoint_method(cfg)!r}, not a BayesCap one; give --bayescap a "
                           f"checkpoint of `geopipe bayescap train`")
    net = {k: v for k, v in cfg["network"].items() if k != "kind"}
    model = BayesCapMLP(BayesCapConfig(**net))
    model.load_state_dict(load_model_weights(checkpoint))
    model.eval()
    return model, cfg


def check_bayescap(checkpoint: str, store: EmbeddingStore) -> tuple[BayesCapMLP, dict]:
    """:func:`load_bayescap`, refusing (one line) a checkpoint trained on another backbone or
    embedding dimension than ``store``'s."""
    model, cfg = load_bayescap(checkpoint)
    check_same_space(f"BayesCap checkpoint {checkpoint}", checkpoint_space(cfg), f"store {store.path}", store_space(store),
                     hint="train BayesCap on a store of this backbone")
    return model, cfg


class RowScorer:
    """Scores of ``rows`` (R,) of ``store`` served slice by slice, in order (see the module
    docstring): ``scores(a, b)`` → {name: (b − a,) float64} for positions [a, b) with ``a``
    where the previous slice stopped. Memory: one group (4·batch rows) of scores and the
    MC-dropout passes of one batch."""

    def __init__(self, model: BayesCapMLP, store: EmbeddingStore, rows: np.ndarray, passes: int = 15, seed: int = 0,
                 batch: int = 4096):
        self.model, self.store, self.rows = model, store, np.asarray(rows, dtype=np.int64)
        self.passes, self.seed, self.batch, self.group = passes, seed, batch, 4 * batch
        self._start, self._scores = 0, {k: np.zeros(0) for k in SCORE_NAMES}

    def _load(self, g: int) -> None:
        emb = np.asarray(self.store.embeddings[self.rows[g:g + self.group]], dtype=np.float32)
        with torch.inference_mode():
            self._scores = score_embeddings(self.model, emb, self.passes, batch=self.batch, seed=self.seed + g)
        self._start = g

    def scores(self, a: int, b: int) -> dict[str, np.ndarray]:
        parts = {k: [] for k in SCORE_NAMES}
        pos = a
        while pos < b:
            g = pos - pos % self.group
            if g != self._start or self._scores["log_u"].size == 0:
                self._load(g)
            stop = min(b, g + self.group)
            for k in SCORE_NAMES:
                parts[k].append(self._scores[k][pos - g:stop - g])
            pos = stop
        return {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}


def score_rows(checkpoint: str, store: EmbeddingStore, rows: np.ndarray, passes: int = 15, seed: int = 0,
               batch: int = 4096) -> dict[str, np.ndarray]:
    """log_u, log_u_alea, log_u_epi (len(rows),) float64 of a store's rows; the checkpoint's
    backbone must match the store's."""
    model, _ = check_bayescap(checkpoint, store)
    return RowScorer(model, store, rows, passes, seed, batch).scores(0, int(np.asarray(rows).size))
