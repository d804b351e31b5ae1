"""The place-recognition file-name layout: positions written into the image's own name.

VPR benchmarks as laid out by VPR-datasets-downloader / VPR-methods-evaluation / CosPlace /
EigenPlaces (Pitts30k, Tokyo 24/7, MSLS, SF-XL, St Lucia, Nordland…) name every image::

    [prefix]@UTM_east@UTM_north@UTM_zone@UTM_letter@lat@lon@pano_id@tile_num@heading@pitch@roll@height@timestamp@note@.jpg

Fields 1–2 (metres) are the only ones the official evaluation needs; the others may be empty.
:func:`parse_vpr_name` turns a name into the typed label record a store keeps (json fields):

    latitude, longitude   degrees: the name's (5 decimals, ~1 m) or, when empty, converted from UTM
    utm_east, utm_north   metres (float), utm_zone (int 1–60), utm_letter (band "C"…"X")
    heading_deg, pitch_deg  degrees, when given (heading is the CosPlace class angle)
    capture_id            the panorama id (tiles of one panorama are one capture), when given
    tile                  tile number within the panorama (int), when given
    timestamp             ISO 8601, as precise as the name's YYYYMMDD_hhmmss prefix ("2017-08")
    note                  the note field, when given
    label_source          "vpr-name"; latlon_source "name" | "utm"

A name that does not parse raises :class:`VprNameError` with the field and what is wrong:
fewer than 3 fields, an easting/northing that is not a finite number, a zone outside 1–60, a
band letter outside C–X, one of lat/lon without the other or out of range, UTM without a zone
and without lat/lon (nothing places it on the globe), lat/lon and UTM more than
:data:`MAX_DISAGREEMENT_M` apart, a heading/pitch/tile that is not a number.
"""

from __future__ import annotations

import math
import re

from geopipe.pipeline.vpr.utm import BANDS, latlon_to_utm, utm_band, utm_to_latlon, utm_zone

__all__ = ["FIELDS", "MAX_DISAGREEMENT_M", "VprNameError", "looks_like_vpr_name", "parse_vpr_name", "name_label", "format_vpr_name"]

#: The @-separated fields, in order (index 0 is any prefix before the first "@").
FIELDS: tuple[str, ...] = ("prefix", "utm_east", "utm_north", "utm_zone", "utm_letter", "latitude", "longitude", "pano_id",
                           "tile_num", "heading", "pitch", "roll", "height", "timestamp", "note", "extension")
#: Largest distance (m) between the name's lat/lon and its UTM position (projected in its zone) that is accepted.
MAX_DISAGREEMENT_M = 50.0
_TIMESTAMP = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(?:_(\d{2})(\d{2})?(\d{2})?)?$")


class VprNameError(ValueError):
    """A file name that is not a valid VPR name; the message names the field and the problem."""


def looks_like_vpr_name(name: str) -> bool:
    """Whether a file name (any path; its base name is read) has at least the ``@east@north``
    fields, i.e. is meant to be read as a VPR name."""
    return name.rsplit("/", 1)[-1].count("@") >= 2


def _number(parts: list[str], i: int, what: str, required: bool = False) -> float | None:
    text = parts[i].strip() if i < len(parts) else ""
    if not text:
        if required:
            raise VprNameError(f"VPR name field {i} ({what}) is empty")
        return None
    try:
        value = float(text)
    except ValueError:
        raise VprNameError(f"VPR name field {i} ({what}) {text!r} is not a number") from None
    if not math.isfinite(value):
        raise VprNameError(f"VPR name field {i} ({what}) {text!r} is not finite")
    return value


def _timestamp(text: str) -> str | None:
    """``YYYY[MM[DD[_hh[mm[ss]]]]]`` → ISO 8601 of the same precision; anything else kept as it is."""
    m = _TIMESTAMP.match(text)
    if not m:
        return text or None
    y, mo, d, h, mi, s = m.groups()
    date = "-".join(p for p in (y, mo, d) if p)
    return date + (f"T{h}:{mi or '00'}:{s or '00'}" if h else "")


def _zone_letter(parts: list[str]) -> tuple[int | None, str | None]:
    zone = _number(parts, 3, "UTM zone")
    if zone is not None and (zone != int(zone) or not 1 <= zone <= 60):
        raise VprNameError(f"VPR name field 3 (UTM zone) {parts[3]!r} is not a zone number 1-60")
    letter = parts[4].strip().upper() if len(parts) > 4 and parts[4].strip() else None
    if letter is not None and (len(letter) != 1 or letter not in BANDS):
        raise VprNameError(f"VPR name field 4 (UTM letter) {parts[4]!r} is not a latitude band {BANDS[0]}-{BANDS[-1]}")
    return (None if zone is None else int(zone)), letter


def _position(parts: list[str]) -> dict:
    east, north = _number(parts, 1, "UTM east", True), _number(parts, 2, "UTM north", True)
    zone, letter = _zone_letter(parts)
    lat, lon = _number(parts, 5, "latitude"), _number(parts, 6, "longitude")
    if (lat is None) != (lon is None):
        raise VprNameError("VPR name has one of latitude (field 5) and longitude (field 6) without the other")
    if lat is not None and (abs(lat) > 90 or abs(lon) > 180):
        raise VprNameError(f"VPR name latitude/longitude {lat}, {lon} out of range")
    source = "name"
    if lat is None:
        if zone is None or letter is None:
            raise VprNameError("VPR name has UTM east/north but neither a UTM zone and letter (fields 3-4) nor "
                               "latitude/longitude (fields 5-6): nothing places it on the globe")
        la, lo = utm_to_latlon(east, north, zone, letter)
        lat, lon, source = float(la), float(lo), "utm"
    zone = int(utm_zone(lat, lon)) if zone is None else zone
    letter = str(utm_band(lat)) if letter is None else letter
    e, n, _, _ = latlon_to_utm(lat, lon, zone=zone)
    off = math.hypot(float(e) - east, float(n) - north)
    if off > MAX_DISAGREEMENT_M:
        raise VprNameError(f"VPR name's latitude/longitude ({lat}, {lon}) lie {off:.0f} m from its UTM position "
                           f"({east}, {north}, zone {zone}{letter}); at most {MAX_DISAGREEMENT_M:g} m is accepted")
    return {"latitude": lat, "longitude": lon, "utm_east": east, "utm_north": north, "utm_zone": zone, "utm_letter": letter,
            "latlon_source": source}


def parse_vpr_name(name: str) -> dict:
    """The typed label record of a VPR file name (see the module docstring); the base name of a
    path is read. Raises :class:`VprNameError` when it does not parse."""
    base = name.rsplit("/", 1)[-1]
    parts = base.split("@")
    if len(parts) < 3:
        raise VprNameError(f"{base!r} is not a VPR name: expected [prefix]@UTM_east@UTM_north@...@.jpg")
    rec = _position(parts)
    heading, pitch = _number(parts, 9, "heading"), _number(parts, 10, "pitch")
    tile = _number(parts, 8, "tile number")
    if heading is not None:
        rec["heading_deg"] = heading % 360.0
    if pitch is not None:
        rec["pitch_deg"] = pitch
    if tile is not None:
        rec["tile"] = int(tile) if tile == int(tile) else tile
    text = {f: parts[i].strip() for i, f in enumerate(FIELDS) if i < len(parts)}
    if text.get("pano_id"):
        rec["capture_id"] = text["pano_id"]
    when = _timestamp(text.get("timestamp", ""))
    if when:
        rec["timestamp"] = when
    if text.get("note"):
        rec["note"] = text["note"]
    rec["label_source"] = "vpr-name"
    return rec


def format_vpr_name(lat: float, lon: float, *, pano_id: str = "", tile: int | None = None, heading: float | None = None,
                    timestamp: str = "", note: str = "", extension: str = ".jpg") -> str:
    """A VPR file name for a position in the layout of VPR-datasets-downloader: UTM (7.2 digits)
    computed from lat/lon (3.5 / 4.5 digits) in the point's own zone, heading as an integer."""
    e, n, zone, letter = latlon_to_utm(lat, lon)

    def coord(v: float, left: int, right: int) -> str:
        sign = "-" if v < 0 else ""
        return f"{sign}{abs(v):0{left - len(sign) + right + 1}.{right}f}"

    head = "" if heading is None else f"{int(heading) % 360:03d}"
    tile_s = "" if tile is None else f"{int(tile):02d}"
    return (f"@{coord(float(e), 7, 2)}@{coord(float(n), 7, 2)}@{int(zone):02d}@{letter}@{coord(lat, 3, 5)}@{coord(lon, 4, 5)}"
            f"@{pano_id}@{tile_s}@{head}@@@@{timestamp}@{note}@{extension}")


def name_label(file_name: str, required: bool) -> dict | None:
    """The label record of an image file's name: with ``required`` (``--labels vpr-name``) the
    parsed record or :class:`VprNameError`; otherwise (``auto``) the record when the name looks
    like a VPR name and parses, else None (an ordinary photo name)."""
    if required:
        return parse_vpr_name(file_name)
    if not looks_like_vpr_name(file_name):
        return None
    try:
        return parse_vpr_name(file_name)
    except VprNameError:
        return None
