"""Rejects table: one row per skipped sample, written as Parquet beside the output."""

from __future__ import annotations

import pyarrow as pa

__all__ = ["REJECTS_SCHEMA", "REJECT_REASONS"]

#: Reasons a sample can be rejected (the ``reason`` column takes exactly these values).
REJECT_REASONS: tuple[str, ...] = (
    "corrupt_image",  # bytes that PIL cannot decode (truncated, zero-byte, not an image)
    "missing_image",  # no jpg/jpeg/png/webp entry in the sample
    "missing_json",  # no json entry (no longer a reject: such a sample is an unlabelled record; older stores may list it)
    "invalid_json",  # json that does not parse or is not an object
    "missing_coordinates",  # one of latitude/longitude absent or null while the other is given (neither: unlabelled record)
    "invalid_coordinates",  # NaN/inf, |lat| > 90 or |lon| > 180, or not a number
    "duplicate_key",  # key already present in the store (first occurrence is kept)
    "corrupt_shard",  # the tar itself ended early; the key is the last good one or ""
    "invalid_embedding",  # embedding with wrong shape, non-finite, zero or overflowing values
    "missing_key",  # imported row whose key is null or empty
    "member_too_large",  # a tar member whose header size is over the limit (skipped unread; --max-member-mb)
    "image_too_large",  # an image whose width x height is over the limit (found before decoding; --max-image-pixels)
    "invalid_name",  # an image file name that --labels vpr-name cannot read as @utm_east@utm_north@...@.jpg
)

REJECTS_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=False),
    ],
    metadata={b"geopipe_schema": b"geopipe.rejects/1"},
)
