"""GDACS RSS feeds become crisis/1 events (own fixtures, and the real samples when present)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import shapely
from shapely.geometry import Point, shape

from pipeline.domain.feeds import gdacs
from pipeline.domain.feeds.base import FeedError, ParseContext, ParseResult, Skipped

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "feeds" / "gdacs"
SAMPLES = Path(__file__).resolve().parents[4] / "shared" / "samples" / "gdacs"
NOW = datetime(2023, 11, 15, tzinfo=UTC)


def parse(path: Path, now: datetime = NOW) -> ParseResult:
    return gdacs.parse(path.read_bytes(), ParseContext(now=now))


def parts_bounds(geometry: object) -> list[tuple[float, ...]]:
    return sorted(tuple(round(v, 4) for v in p.bounds) for p in shapely.get_parts(shape(geometry)))


def test_current_feed_yields_exactly_the_expected_events() -> None:
    result = parse(FIXTURES / "rss_current.xml")
    by_id = {e.crisis_id: e for e in result.events}
    assert list(by_id) == ["gdacs:EQ:1400001", "gdacs:TC:1000900", "gdacs:FL:1102000", "gdacs:WF:1020304"]

    quake = by_id["gdacs:EQ:1400001"]
    assert (quake.op, quake.version, quake.source, quake.source_ref) == ("upsert", 1700002800, "gdacs", "EQ1400001/1500001")
    assert (quake.category, quake.severity, quake.urgency, quake.country_codes) == ("geo", "severe", "past", ("FJ",))
    assert quake.url == "https://www.gdacs.org/report.aspx?eventtype=EQ&eventid=1400001"
    assert quake.effective == datetime(2023, 11, 14, 22, tzinfo=UTC)
    assert quake.expires == datetime(2023, 11, 17, 23, tzinfo=UTC)  # 72 h after the last modification
    assert "score 1.6" in quake.instruction
    # "-182.5 -174.5 -21 -13": split at the antimeridian, both halves in the right place
    assert parts_bounds(quake.geometry) == [(-180.0, -21.0, -174.5, -13.0), (177.5, -21.0, 180.0, -13.0)]
    assert shape(quake.geometry).covers(Point(-178.5, -17.0))

    cyclone = by_id["gdacs:TC:1000900"]
    assert (cyclone.category, cyclone.severity, cyclone.certainty, cyclone.country_codes) == ("met", "extreme", "likely", ("PH",))

    flood = by_id["gdacs:FL:1102000"]  # gdacs:iscurrent false: the event is over
    assert (flood.op, flood.geometry, flood.version) == ("cancel", None, 1699876800)

    fire = by_id["gdacs:WF:1020304"]
    assert (fire.category, fire.severity, fire.country_codes) == ("fire", "minor", ("AU",))  # no iso3: the country name

    assert [(r.item_ref, r.reason) for r in result.rejected] == [
        ("EQ1400002", "gdacs:bbox needs 4 numbers (lonmin lonmax latmin latmax), got '8.0 12.0 6.0'")]
    assert result.skipped == (Skipped("DR1016000", "expired"),)  # as of NOW, counted, not an event


def test_new_episode_updates_the_same_crisis() -> None:
    first = {e.crisis_id: e for e in parse(FIXTURES / "rss_current.xml").events}["gdacs:TC:1000900"]
    (update,) = parse(FIXTURES / "rss_next_episode.xml").events
    assert update.crisis_id == first.crisis_id
    assert update.version > first.version
    assert update.source_ref == "TC1000900/6"
    assert update.country_codes == ("PH", "TW")
    assert update.expires is not None and first.expires is not None and update.expires > first.expires


def test_2016_format_without_bbox_falls_back_to_a_circle() -> None:
    result = parse(FIXTURES / "rss_2016_archive.xml", now=datetime(2014, 11, 21, tzinfo=UTC))
    by_id = {e.crisis_id: e for e in result.events}
    assert list(by_id) == ["gdacs:TC:41000", "gdacs:FL:4300", "gdacs:EQ:1043000"]
    assert result.notes == ("FL4300 repeated in the document",)
    cyclone = by_id["gdacs:TC:41000"]
    assert cyclone.version == 1438236000  # pubDate: the old format has no datemodified
    assert cyclone.country_codes == ("BD", "IN", "MM")  # "India, Bangladesh, Myanmar"
    assert shape(cyclone.geometry).covers(Point(91.8, 22.5))
    assert shape(cyclone.geometry).covers(Point(91.8, 22.5 + 3.5))  # Red cyclone: 400 km
    assert not shape(cyclone.geometry).covers(Point(91.8, 22.5 + 3.7))
    assert by_id["gdacs:EQ:1043000"].country_codes == ("IN", "MM")  # free-text region: countries under the area


def test_expired_items_are_counted_not_events() -> None:
    result = parse(FIXTURES / "rss_2016_archive.xml", now=datetime(2016, 4, 9, tzinfo=UTC))
    assert result.events == () and [s.reason for s in result.skipped] == ["expired"] * 4


def test_entity_bomb_is_refused_with_a_reason() -> None:
    with pytest.raises(FeedError, match="DTD"):
        parse(FIXTURES / "rss_entity_bomb.xml")


@pytest.mark.parametrize("document", [b"", b"<rss><channel>", b"<feed xmlns='http://www.w3.org/2005/Atom'/>", b"<rss/>"])
def test_unreadable_documents_are_refused(document: bytes) -> None:
    with pytest.raises(FeedError):
        gdacs.parse(document, ParseContext(now=NOW))


def test_sniff() -> None:
    assert gdacs.sniff((FIXTURES / "rss_current.xml").read_bytes())
    assert not gdacs.sniff(b"<rss version='2.0'><channel><title>news</title></channel></rss>")


def test_every_event_round_trips_through_the_wire_schema() -> None:
    from schemas import codec
    from schemas.models import Crisis

    for path in sorted(FIXTURES.glob("rss_[!e]*.xml")):
        for event in parse(path, now=datetime(2014, 1, 1, tzinfo=UTC)).events:
            assert codec.decode(codec.encode(event), Crisis) == event, event.crisis_id


needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason="shared samples not present")


@needs_samples
def test_sample_7_day_feed() -> None:
    data = (SAMPLES / "gdacs_rss_7d_2022-11-26_whatisc-up25.xml").read_bytes()
    assert data.startswith(b"\xef\xbb\xbf") and gdacs.sniff(data)
    result = gdacs.parse(data, ParseContext(now=datetime(2022, 11, 26, 21, 27, 3, tzinfo=UTC)))
    assert (len(result.events), len(result.rejected), len(result.skipped)) == (301, 0, 14)  # 14 expired
    assert sum(e.op == "cancel" for e in result.events) == 160  # gdacs:iscurrent false
    by_id = {e.crisis_id: e for e in result.events}
    fiji = by_id["gdacs:EQ:1347632"]  # bbox "-183.4738 -175.4738 -26.0701 -18.0701"
    assert parts_bounds(fiji.geometry) == [(-180.0, -26.0701, -175.4738, -18.0701), (176.5262, -26.0701, 180.0, -18.0701)]
    for crisis in result.events:
        if crisis.op == "upsert" and crisis.geometry is not None and crisis.geometry["type"] == "MultiPolygon":
            widths = [p.bounds[2] - p.bounds[0] for p in shapely.get_parts(shape(crisis.geometry))]
            assert sum(widths) == pytest.approx(8.0)  # every split bbox keeps its 8° width, no 360° band
    turkey = by_id["gdacs:EQ:1347428"]
    assert (turkey.op, turkey.severity, turkey.country_codes, turkey.source_ref) == ("upsert", "severe", ("TR",), "EQ1347428/1474706")
    indonesia = by_id["gdacs:EQ:1347183"]  # the Red M5.6, no longer current
    assert (indonesia.op, indonesia.severity) == ("cancel", "extreme")


@needs_samples
def test_sample_fiji_and_kermadec_bboxes_land_on_both_sides_of_180() -> None:
    data = (SAMPLES / "gdacs_rss_7d_2022-11-26_whatisc-up25.xml").read_bytes()
    result = gdacs.parse(data, ParseContext(now=datetime(2022, 11, 18, tzinfo=UTC)))
    by_id = {e.crisis_id: e for e in result.events}
    for event_id in ("1347788", "1347750", "1347632", "1347617", "1347578", "1347576", "1347541", "1347457", "1347421", "1347361",
                     "1347358", "1347315", "1347130", "1347102", "1347055"):
        crisis = by_id[f"gdacs:EQ:{event_id}"]
        if crisis.op == "cancel":
            continue
        west, east = parts_bounds(crisis.geometry)
        assert west[0] == -180.0 and -176.0 <= west[2] <= -172.5
        assert east[2] == 180.0 and 176.0 <= east[0] <= 180.0
        assert -36 < west[1] < -14


@needs_samples
def test_sample_2019_fixture() -> None:
    data = (SAMPLES / "gdacs_rss_2019-12-30_exxamalte_fixture.xml").read_bytes()
    result = gdacs.parse(data, ParseContext(now=datetime(2019, 12, 30, 2, tzinfo=UTC)))
    by_id = {e.crisis_id: e for e in result.events}
    assert list(by_id) == ["gdacs:TC:1000643", "gdacs:EQ:1199929", "gdacs:DR:1013682", "gdacs:DR:1013588"]
    assert by_id["gdacs:TC:1000643"].country_codes == ("MU",)
    assert by_id["gdacs:DR:1013682"].country_codes == ("BG", "IQ", "IR", "TR")
    assert all(e.severity == "minor" and e.op == "upsert" for e in result.events)


@needs_samples
def test_sample_2016_archive() -> None:
    data = (SAMPLES / "gdacs_rss_archive_india_orange_2016-04-09_erectus.xml").read_bytes()
    result = gdacs.parse(data, ParseContext(now=datetime(2012, 7, 1, tzinfo=UTC)))
    assert (len(result.events), len(result.rejected), len(result.notes)) == (20, 0, 3)
    by_id = {e.crisis_id: e for e in result.events}
    assert by_id["gdacs:TC:1000189"].country_codes == ("BD", "IN", "MM")
    assert by_id["gdacs:EQ:1077755"].severity == "extreme"
    assert shape(by_id["gdacs:EQ:1077755"].geometry).covers(Point(93.6556, 24.8339))
    assert sum(e.severity == "extreme" for e in result.events) == 7
    late = gdacs.parse(data, ParseContext(now=datetime(2016, 4, 9, tzinfo=UTC)))
    assert late.events == ()  # everything in the archive has expired
