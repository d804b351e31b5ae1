"""The @-separated VPR file names: the layouts of SF-XL, Pitts30k and Tokyo 24/7, typed fields,
conversion of UTM-only names, and the reasons names are refused."""

import pytest

from geopipe.pipeline.vpr.names import VprNameError, format_vpr_name, looks_like_vpr_name, name_label, parse_vpr_name
from geopipe.pipeline.vpr.utm import utm_to_latlon


def test_sf_xl_name_typed_fields():
    rec = parse_vpr_name("data/@0544000.32@4177609.18@10@S@037.74472@-122.50057@NY0VsOD8K4d0YA9fd0CCGA@@0@@@@201708@@.jpg")
    assert rec["utm_east"] == 544000.32 and rec["utm_north"] == 4177609.18 and rec["utm_zone"] == 10 and rec["utm_letter"] == "S"
    assert (rec["latitude"], rec["longitude"], rec["latlon_source"]) == (37.74472, -122.50057, "name")
    assert rec["heading_deg"] == 0.0 and rec["capture_id"] == "NY0VsOD8K4d0YA9fd0CCGA" and rec["timestamp"] == "2017-08"
    assert rec["label_source"] == "vpr-name" and "tile" not in rec and "note" not in rec


def test_utm_only_name_gets_latlon_by_conversion_and_keeps_utm():
    rec = parse_vpr_name("@0584262.48@4477304.64@17@T@@@000123@05@@@@@@pitch1_yaw6@.jpg")
    lat, lon = utm_to_latlon(584262.48, 4477304.64, 17, "T")
    assert rec["latlon_source"] == "utm" and rec["latitude"] == float(lat) and rec["longitude"] == float(lon)
    assert 40.4 < rec["latitude"] < 40.5 and -80.1 < rec["longitude"] < -79.9  # Pittsburgh
    assert rec["utm_east"] == 584262.48 and rec["tile"] == 5 and rec["capture_id"] == "000123" and rec["note"] == "pitch1_yaw6"


def test_prefix_before_the_first_at_and_format_round_trip():
    rec = parse_vpr_name("NIGHT@0381904.46@3946329.36@54@S@035.65375@0139.69540@00405@@@@@@@@.jpg")
    assert rec["utm_zone"] == 54 and rec["capture_id"] == "00405"
    name = format_vpr_name(40.44533, -79.99512, pano_id="p1", tile=3, heading=451.7, timestamp="20190101_1230")
    assert name == "@0585217.14@4477671.21@17@T@040.44533@-079.99512@p1@03@091@@@@20190101_1230@@.jpg"
    rec = parse_vpr_name(name)
    assert rec["heading_deg"] == 91.0 and rec["timestamp"] == "2019-01-01T12:30:00" and rec["tile"] == 3


@pytest.mark.parametrize("name,words", [
    ("holiday.jpg", "is not a VPR name"),
    ("@abc@4477000@17@T@@@.jpg", "field 1 (UTM east) 'abc' is not a number"),
    ("@1@nan@17@T@@@.jpg", "field 2 (UTM north) 'nan' is not finite"),
    ("@584000@4477000@@@@@p@.jpg", "nothing places it on the globe"),
    ("@584000@4477000@61@T@@@.jpg", "field 3 (UTM zone) '61' is not a zone number 1-60"),
    ("@584000@4477000@17@I@@@.jpg", "field 4 (UTM letter) 'I' is not a latitude band"),
    ("@584000@4477000@17@T@40.4@@.jpg", "one of latitude (field 5) and longitude (field 6) without the other"),
    ("@500000@0@31@N@10@3@.jpg", "lie 1105412 m from its UTM position"),
    ("@584000@4477000@17@T@@@p@@north@.jpg", "field 9 (heading) 'north' is not a number"),
])
def test_names_that_do_not_parse_say_why(name, words):
    with pytest.raises(VprNameError, match=words.replace("(", r"\(").replace(")", r"\)")):
        parse_vpr_name(name)


def test_auto_mode_leaves_ordinary_names_alone():
    assert not looks_like_vpr_name("me@home.jpg") and name_label("me@home.jpg", required=False) is None
    assert name_label("@abc@1@17@T@@@.jpg", required=False) is None  # looks like one but does not parse: no label, no reject
    assert name_label("@0584262.48@4477304.64@17@T@@@@@@@@@@@@.jpg", required=False)["utm_zone"] == 17
    with pytest.raises(VprNameError):
        name_label("me@home.jpg", required=True)
