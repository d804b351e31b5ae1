"""Default limits on hostile input, stated once: each bounds the memory one input can take, and
each is raised by a flag named in the one-line reject or error that enforces it.

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
"""

from __future__ import annotations

__all__ = ["MAX_MEMBER_BYTES", "MAX_IMAGE_PIXELS", "MAX_CONFIG_BYTES", "MAX_CONFIG_DEPTH", "MAX_STEPS"]

MAX_MEMBER_BYTES = 128 << 20
MAX_IMAGE_PIXELS = 89_478_485
MAX_CONFIG_BYTES = 16 << 20
MAX_CONFIG_DEPTH = 64
MAX_STEPS = 10**9
