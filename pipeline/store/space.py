"""Embedding spaces: which backbone, weights and preprocessing made a vector, and whether two agree.

Every consumer of embeddings — predict, locate, retrieve, BayesCap scoring, inspection — compares
the space of what it reads (a store's attributes) with the space of what it applies (a checkpoint's
config, another store) through :func:`check_same_space`, the one definition of "same embedding
space" (fields declared in :data:`geopipe.schemas.store.EMBEDDING_SPACE_FIELDS`):

* the backbone's weights: ``fingerprint`` (sha256 of the weights or of the pretrained tag) when both
  sides record one, else the backbone ``name`` and ``pretrained`` tag;
* the preprocessing (image size, mean/std, resize mode), when both sides record it;
* the width ``embed_dim`` and whether rows are L2-normalised (``normalized``).

A space is a plain JSON-able dict (:func:`embedding_space`), written into checkpoints as
``"embedding_space"`` and derived from store attributes on the fly, so old stores and checkpoints
(without the record) are compared by the same rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.core.lockfile import writer_note
from geopipe.schemas.store import EMBEDDING_SPACE_FIELDS

__all__ = ["EmbeddingSpaceError", "embedding_space", "store_space", "checkpoint_space", "same_space", "space_difference",
           "describe_space", "check_same_space", "check_query_database"]


class EmbeddingSpaceError(GeopipeError, ValueError):
    """Two artefacts hold embeddings of different spaces (one-line message naming both)."""


def embedding_space(backbone: Mapping[str, Any] | None, embed_dim: int | None, normalized: bool | None) -> dict:
    """The space record {name, pretrained, fingerprint, preprocess, embed_dim, normalized} of
    embeddings made by ``backbone`` (an identity dict as in store attrs; None/{} = unknown)."""
    b = dict(backbone or {})
    space = {k: b.get(k) for k in ("name", "pretrained", "fingerprint", "preprocess")}
    space["embed_dim"] = int(embed_dim) if embed_dim is not None else b.get("embed_dim")
    space["normalized"] = None if normalized is None else bool(normalized)
    return {k: space[k] for k in EMBEDDING_SPACE_FIELDS}


def store_space(store) -> dict:
    """Space of an opened embedding store (its ``backbone``, ``embed_dim``, ``normalized`` attrs)."""
    attrs = store.attrs
    return embedding_space(attrs.get("backbone"), attrs.get("embed_dim", getattr(store, "embed_dim", None)), attrs.get("normalized"))


def checkpoint_space(config: Mapping[str, Any]) -> dict:
    """Space of a checkpoint's config.json: its ``embedding_space`` record, else derived from
    ``backbone``/``embed_dim``/``normalized`` (checkpoints written before the record existed)."""
    rec = config.get("embedding_space")
    if isinstance(rec, Mapping):
        return embedding_space(rec, rec.get("embed_dim"), rec.get("normalized"))
    return embedding_space(config.get("backbone"), config.get("embed_dim"), config.get("normalized"))


def space_difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> str | None:
    """None when ``a`` and ``b`` are the same space, else the first differing field as a phrase."""
    if a.get("embed_dim") is not None and b.get("embed_dim") is not None and int(a["embed_dim"]) != int(b["embed_dim"]):
        return f"width {a['embed_dim']} vs {b['embed_dim']}"
    if a.get("fingerprint") and b.get("fingerprint"):
        if a["fingerprint"] != b["fingerprint"]:
            return "backbone weights (fingerprint)"
    elif (a.get("name"), a.get("pretrained")) != (b.get("name"), b.get("pretrained")):
        return "backbone name or pretrained tag"
    if a.get("preprocess") and b.get("preprocess") and a["preprocess"] != b["preprocess"]:
        return "preprocessing"
    if a.get("normalized") is not None and b.get("normalized") is not None and a["normalized"] != b["normalized"]:
        return "normalisation (L2-normalised vs raw)"
    return None


def same_space(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """True when embeddings of space ``a`` may be used where space ``b`` is expected."""
    return space_difference(a, b) is None


def describe_space(space: Mapping[str, Any]) -> str:
    """Short human form, e.g. ``'ViT-B-32' (laion2b_s34b_b79k, 512-d, normalised, fingerprint 3fa2c1d9e0b1)``."""
    bits = [str(space.get("pretrained"))] if space.get("pretrained") else []
    if space.get("embed_dim") is not None:
        bits.append(f"{space['embed_dim']}-d")
    if space.get("normalized") is not None:
        bits.append("normalised" if space["normalized"] else "raw")
    if space.get("fingerprint"):
        bits.append(f"fingerprint {str(space['fingerprint'])[:12]}")
    return f"{space.get('name')!r} ({', '.join(bits)})"


def check_same_space(what_a: str, a: Mapping[str, Any], what_b: str, b: Mapping[str, Any], hint: str = "") -> None:
    """Raise :class:`EmbeddingSpaceError` in one line naming both sides when ``a`` and ``b`` differ.

    what_a / what_b: how to name each side (e.g. ``"checkpoint m/"``, ``"store test.zarr"``);
    hint: what to do (default: re-extract with the other side's backbone).
    """
    diff = space_difference(a, b)
    if diff is None:
        return
    hint = hint or f"extract the images again with the backbone of {what_a} (geopipe extract --backbone {a.get('name')})"
    raise EmbeddingSpaceError(f"{what_a} holds embeddings of backbone {describe_space(a)} but {what_b} of {describe_space(b)}: "
                              f"different embedding spaces ({diff}); {hint}")


def check_query_database(query, database) -> None:
    """One GeopipeError for an empty query or database store (opened
    :class:`geopipe.pipeline.store.reader.EmbeddingStore`), a dimension mismatch or different backbones."""
    if len(query) == 0:
        raise GeopipeError(f"query store {query.path} has no records" + (writer_note(query.path) or "; extract or import some first"))
    if len(database) == 0:
        raise GeopipeError(f"database store {database.path} has no records"
                           + (writer_note(database.path) or "; extract or import some first"))
    check_same_space(f"query store {query.path}", store_space(query), f"database store {database.path}", store_space(database),
                     hint="different backbones: re-extract one of them with the other's backbone")
