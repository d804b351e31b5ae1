"""Small WebDataset samples the extract tests write into generated shards."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def jpeg(i: int, size: int = 20) -> bytes:
    """A seeded noisy single-colour JPEG of ``size`` pixels."""
    rng = np.random.default_rng(i)
    img = (rng.uniform(0, 1, (size, size, 3)) * 60 + rng.uniform(0, 190, 3)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def good_sample(key: str, i: int, size: int = 20, **extra) -> dict:
    """A valid sample: image ``i``, coordinates spread over the globe, meta city/n (+ ``extra``)."""
    meta = {"latitude": (i * 37.0) % 170 - 85, "longitude": (i * 71.0) % 350 - 175, "city": f"c{i}", "n": i, **extra}
    return {"__key__": key, "jpg": jpeg(i, size), "json": meta}

