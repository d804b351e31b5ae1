"""Where a model comes from: a geopipe checkpoint directory, a PLONK directory, or a Hugging Face Hub id.

``open_model_source(source)`` reads only the configuration (no weights) and returns a
:class:`ModelSource`: the checkpoint-style config dict (``method``, ``network``, ``embed_dim``,
``backbone``, ``condition``, ...), the embedding space the model expects
(:mod:`geopipe.pipeline.store.space`), a content identity for caches, and a ``weights()`` loader
(safetensors only, never unpickled). Accepted forms:

* a geopipe checkpoint directory (``config.json`` of schema ``geopipe.checkpoint/1``);
* a directory holding a PLONK model as published on the Hub (``config.json`` with
  input_dim/dim/depth/expansion/cond_dim + ``model.safetensors``), mapped onto geopipe's network
  (:mod:`geopipe.pipeline.artifacts.plonk`);
* ``hf-hub:org/name`` — downloaded (or read from the Hugging Face cache when offline) and then
  read as one of the above.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from geopipe.pipeline.artifacts.checkpoint import checkpoint_identity, load_checkpoint_config, load_model_weights, weight_shapes
from geopipe.pipeline.core.errors import ConfigError, GeopipeError
from geopipe.pipeline.store.space import checkpoint_space
from geopipe.schemas.checkpoint import CHECKPOINT_SCHEMA, CONFIG_FILE

__all__ = ["HF_PREFIX", "ModelSource", "open_model_source"]

HF_PREFIX = "hf-hub:"


@dataclass(frozen=True)
class ModelSource:
    """A model's configuration and where its weights are.

    source: as the user gave it; directory: the local directory read; format: "geopipe" | "plonk";
    config: checkpoint-style config dict; identity: changes whenever the content may have changed.
    """

    source: str
    directory: str
    format: str
    config: dict
    identity: str
    _weights: Callable[[], dict] = field(repr=False, compare=False)
    _shapes: Callable[[], dict] = field(repr=False, compare=False)

    @property
    def space(self) -> dict:
        """The embedding space the model expects (a :func:`~geopipe.pipeline.store.space.embedding_space` record)."""
        return checkpoint_space(self.config)

    def weights(self) -> dict:
        """The network's state dict on the CPU (geopipe key names)."""
        return self._weights()

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """name → shape of every weight tensor (geopipe key names), read without loading tensors where possible."""
        return self._shapes()


def _is_geopipe_dir(path: Path) -> bool:
    from geopipe.pipeline.core.limits import load_json

    try:
        doc = load_json(str(path / CONFIG_FILE), "checkpoint config")  # size and depth limits: no RecursionError
    except ConfigError:
        return False
    return isinstance(doc, dict) and doc.get("schema") == CHECKPOINT_SCHEMA


def _geopipe(source: str, path: Path) -> ModelSource:
    config = load_checkpoint_config(path)
    return ModelSource(source, str(path), "geopipe", config, checkpoint_identity(path),
                       lambda: load_model_weights(path), lambda: weight_shapes(path))


def _plonk(source: str, path: Path) -> ModelSource:
    from geopipe.pipeline.artifacts import plonk

    config, weights = plonk.read_plonk(str(path))
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    return ModelSource(source, str(path), "plonk", config, checkpoint_identity(path), lambda: weights, lambda: shapes)


def open_model_source(source: str | os.PathLike) -> ModelSource:
    """Resolve ``source`` (checkpoint directory, PLONK directory or ``hf-hub:org/name``) and read its config.

    Raises GeopipeError (one line) when the source is neither, naming what was found.
    """
    source = str(source)
    directory = source
    if source.startswith(HF_PREFIX):
        from geopipe.pipeline.artifacts.plonk import resolve_model_source

        directory = resolve_model_source(source)
    path = Path(directory)
    if not path.exists():
        raise GeopipeError(f"model {source!r} not found; give a checkpoint directory of `geopipe train`, a PLONK model "
                           f"directory, or {HF_PREFIX}org/name (e.g. {HF_PREFIX}nicolas-dufour/PLONK_YFCC)")
    if _is_geopipe_dir(path):
        return _geopipe(source, path)
    from geopipe.pipeline.artifacts.plonk import is_plonk_dir

    if is_plonk_dir(str(path)):
        return _plonk(source, path)
    return _geopipe(source, path)  # not recognised: the checkpoint reader names what is wrong with it
