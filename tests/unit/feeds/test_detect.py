"""``--format auto``: the right parser is chosen from the content of a document."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.domain.feeds.base import FeedError
from pipeline.domain.feeds.detect import detect_format

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "feeds"
SAMPLES = Path(__file__).resolve().parents[3].parent / "shared" / "samples"

GDACS_ITEM = b"""\xef\xbb\xbf<?xml version="1.0" encoding="utf-8"?>
<rss version="2.0" xmlns:gdacs="http://www.gdacs.org" xmlns:georss="http://www.georss.org/georss">
<channel><title>GDACS RSS information</title>
<item><title>Green earthquake alert in Fiji</title><gdacs:eventtype>EQ</gdacs:eventtype>
<gdacs:bbox>-183.4 -175.4 -26.0 -18.0</gdacs:bbox></item></channel></rss>"""

USGS_SUMMARY = b"""{"type":"FeatureCollection","metadata":{"generated":1602348208000,
"url":"https://earthquake.usgs.gov/earthquakes/feed/v1.0/summary/4.5_week.geojson","count":1},
"features":[{"type":"Feature","properties":{"mag":5.1,"place":"Fiji region","time":1602300000000,
"updated":1602300500000,"tsunami":0,"alert":null},"geometry":{"type":"Point","coordinates":[-178.4,-17.9,560]},
"id":"us7000abcd"}]}"""

ADVISORY_INDEX = b"""{"metadata":{"generated":{"date":"2014-10-02 06:12:33"}},
"data":{"ID":{"country-iso":"ID","advisory-state":1,"has-regional-advisory":1}}}"""


@pytest.mark.parametrize(("data", "expected"), [
    (GDACS_ITEM, "gdacs"),
    (USGS_SUMMARY, "usgs"),
    (ADVISORY_INDEX, "advisory"),
    (b"country,level,summary\nID,2,Exercise a high degree of caution\n", "advisory"),
    (b'[{"country": "ID", "level": 2}]', "advisory"),
    (b'<alert xmlns="urn:oasis:names:tc:emergency:cap:1.1"><identifier>x</identifier></alert>', "cap"),
    (b'<feed xmlns="http://www.w3.org/2005/Atom" xmlns:cap="urn:oasis:names:tc:emergency:cap:1.2">'
     b"<entry><cap:event>Storm</cap:event></entry></feed>", "cap"),
    (b'<feed xmlns="http://www.w3.org/2005/Atom"><entry><title>Banjir di Jakarta</title></entry></feed>', "rss"),
    (b'<rss version="2.0"><channel><item><title>Gempa</title></item></channel></rss>', "rss"),
])
def test_documents_are_recognised_by_content(data: bytes, expected: str) -> None:
    assert detect_format(data) == expected


@pytest.mark.parametrize("name", sorted(p.name for p in (FIXTURES / "cap").glob("*.xml")))
def test_own_cap_fixtures_are_cap(name: str) -> None:
    assert detect_format((FIXTURES / "cap" / name).read_bytes()) == "cap"


@pytest.mark.parametrize("name", sorted(p.name for p in (FIXTURES / "news").glob("*.xml")))
def test_own_news_fixtures_are_rss(name: str) -> None:
    assert detect_format((FIXTURES / "news" / name).read_bytes()) == "rss"


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "empty document"),
    (b"   \n", "empty document"),
    (b'{"type": "FeatureCollection", "features": []}', "unknown document format"),
    (b"<html><body>Not a feed</body></html>", "unknown document format"),
    (b"just some words", "unknown document format"),
    (b"{not json", "looks like JSON but is not"),
])
def test_unknown_documents_are_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(FeedError, match=reason):
        detect_format(data)


def test_hostile_xml_is_refused_while_detecting() -> None:
    with pytest.raises(FeedError, match="entity-expansion"):
        detect_format((FIXTURES / "hostile" / "billion_laughs.xml").read_bytes())


SAMPLE_FORMATS = {"cap": "cap", "tricky": "cap", "gdacs": "gdacs", "usgs": "usgs", "advisories": "advisory", "news": "rss"}


@pytest.mark.parametrize("folder", sorted(SAMPLE_FORMATS))
def test_every_shared_sample_is_recognised(folder: str) -> None:
    paths = [p for p in sorted((SAMPLES / folder).glob("*")) if p.suffix in (".xml", ".json", ".geojson")]
    paths = [p for p in paths if not (folder == "tricky" and p.suffix == ".geojson")]  # bare geometries, not feeds
    if not paths:
        pytest.skip(f"no shared samples in {folder}/")
    for path in paths:
        assert detect_format(path.read_bytes()) == SAMPLE_FORMATS[folder], path.name
