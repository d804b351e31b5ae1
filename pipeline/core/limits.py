"""Limits on hostile input, stated once: each bounds the memory one input can take, and each is
named in the one-line reject or error that enforces it (with the flag that raises it, where one
does).

========================  ===============  ==================================================
limit                     default          enforced by (flag to raise it)
========================  ===============  ==================================================
MAX_MEMBER_BYTES          128 MiB          a tar member's decompressed size, from its header:
                                           ``member_too_large`` reject (``--max-member-mb``)
MAX_IMAGE_PIXELS          89,478,485 px    width × height from an image header, before decoding:
                                           ``image_too_large`` reject (``--max-image-pixels``;
                                           Pillow's own decompression-bomb threshold)
MAX_CONFIG_BYTES          16 MiB           a TOML/JSON config or checkpoint ``config.json``
MAX_CONFIG_DEPTH          64               nesting of tables/arrays/objects in such a file
MAX_STEPS                 10**9            training steps (``steps``)
========================  ===============  ==================================================

Configuration documents (TOML pipeline configs, JSON such as a checkpoint's ``config.json``, a
run's state) are read by :func:`load_toml` / :func:`load_json`, the one loader every such file
goes through: a file over ``max_bytes`` is refused before it is read, text that is not UTF-8 (a
binary file) or not valid TOML/JSON is refused naming the file, and nesting deeper than
``max_depth`` (tables, arrays, objects) is refused whether the parser gives up first (a
RecursionError) or not. Every error is a :class:`~geopipe.pipeline.core.errors.ConfigError`
whose one line names the file.
"""

from __future__ import annotations

import json
import os
from typing import Any

from geopipe.pipeline.core import fsio
from geopipe.pipeline.core.errors import ConfigError

__all__ = ["MAX_MEMBER_BYTES", "MAX_IMAGE_PIXELS", "MAX_CONFIG_BYTES", "MAX_CONFIG_DEPTH", "MAX_STEPS", "load_toml", "load_json",
           "parse_json", "nesting_depth"]

MAX_MEMBER_BYTES = 128 << 20
MAX_IMAGE_PIXELS = 89_478_485
MAX_CONFIG_BYTES = 16 << 20
MAX_CONFIG_DEPTH = 64
MAX_STEPS = 10**9


def nesting_depth(value: Any) -> int:
    """Nesting depth of a parsed document (a scalar is 0, ``{"a": [1]}`` is 2), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            node = list(node.values())
        elif not isinstance(node, list):
            deepest = max(deepest, depth)
            continue
        deepest = max(deepest, depth + 1)
        stack.extend((child, depth + 1) for child in node)
    return deepest


def _size(n: int) -> str:
    return f"{n / 2**20:g} MiB" if n >= 2**20 else f"{n} bytes"


def _read_text(path: str, what: str, max_bytes: int) -> str:
    url = fsio.normalize(os.fspath(path))
    try:
        with fsio.open_read(url) as fh:
            data = fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise ConfigError(f"{what} {url} not found") from None
    except OSError as exc:
        raise ConfigError(f"{what} {url} cannot be read: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise ConfigError(f"{what} {url} is over the {_size(max_bytes)} limit for such a file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {url} is not UTF-8 text (byte {exc.start}: a binary file?)") from None


def _checked(doc: Any, where: str, max_depth: int) -> Any:
    if nesting_depth(doc) > max_depth:
        raise ConfigError(f"{where} is nested deeper than {max_depth} levels")
    return doc


def load_toml(path: str, what: str = "config", *, max_bytes: int = MAX_CONFIG_BYTES, max_depth: int = MAX_CONFIG_DEPTH) -> dict:
    """The TOML document at ``path`` (a dict), within the limits (see the module docstring)."""
    import tomllib

    text = _read_text(path, what, max_bytes)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} {path} is not valid TOML ({exc})") from None
    except RecursionError:
        raise ConfigError(f"{what} {path} is nested deeper than {max_depth} levels") from None
    return _checked(doc, f"{what} {path}", max_depth)


def parse_json(text: str | bytes, where: str, *, max_bytes: int = MAX_CONFIG_BYTES, max_depth: int = MAX_CONFIG_DEPTH) -> Any:
    """A JSON document from ``text`` (``where`` names it in errors), within the limits."""
    if len(text) > max_bytes:
        raise ConfigError(f"{where} is over the {_size(max_bytes)} limit for such a document")
    try:
        doc = json.loads(text)
    except RecursionError:
        raise ConfigError(f"{where} is nested deeper than {max_depth} levels") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where} is not UTF-8 text (byte {exc.start}: a binary file?)") from None
    except ValueError as exc:  # JSONDecodeError
        raise ConfigError(f"{where} is not valid JSON ({exc})") from None
    return _checked(doc, where, max_depth)


def load_json(path: str, what: str = "JSON file", *, max_bytes: int = MAX_CONFIG_BYTES, max_depth: int = MAX_CONFIG_DEPTH) -> Any:
    """The JSON document at ``path``, within the limits (see the module docstring)."""
    return parse_json(_read_text(path, what, max_bytes), f"{what} {path}", max_bytes=max_bytes, max_depth=max_depth)
