"""USGS earthquake GeoJSON feeds become crisis/1 events (own fixtures, and the real samples when present)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from shapely.geometry import Point, shape

from pipeline.domain.feeds import usgs
from pipeline.domain.feeds.base import FeedError, ParseContext, ParseResult, Skipped

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "feeds" / "usgs"
SAMPLES = Path(__file__).resolve().parents[4] / "shared" / "samples" / "usgs"
NOW = datetime(2023, 11, 15, tzinfo=UTC)


def parse(path: Path, now: datetime = NOW) -> ParseResult:
    return usgs.parse(path.read_bytes(), ParseContext(now=now))


def test_fixture_feed_yields_exactly_the_expected_events() -> None:
    result = parse(FIXTURES / "week.geojson")
    by_id = {e.crisis_id: e for e in result.events}
    assert set(by_id) == {"usgs:us7000abcd", "usgs:us7000deep", "usgs:uu6000blst", "usgs:us7000shal"}

    fiji = by_id["usgs:us7000abcd"]
    assert (fiji.op, fiji.version, fiji.source, fiji.source_ref, fiji.category) == ("upsert", 1700003600, "usgs", "us7000abcd", "geo")
    assert fiji.severity == "severe"  # PAGER orange; M6.8 is "strong"; tsunami flag
    assert fiji.urgency == "immediate" and "tsunami" in fiji.instruction.lower()
    assert fiji.references == ("usgs:pt23001000", "usgs:at00s1abcd")
    assert fiji.effective == datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
    assert fiji.expires == datetime(2023, 11, 17, 22, 13, 20, tzinfo=UTC)
    assert fiji.url == "https://earthquake.usgs.gov/earthquakes/eventpage/us7000abcd"
    assert fiji.country_codes == ("FJ",)
    assert fiji.geometry is not None and fiji.geometry["type"] == "MultiPolygon"  # the circle crosses 180°
    area = shape(fiji.geometry)
    assert area.covers(Point(-179.7, -17.6)) and area.covers(Point(179.5, -17.6))
    assert not area.covers(Point(0.0, -17.6))
    assert fiji.buffer_km == pytest.approx(152.6, abs=0.1)

    croatia = by_id["usgs:us7000shal"]
    assert (croatia.severity, croatia.urgency, croatia.country_codes) == ("moderate", "past", ("HR", "SI"))

    # a deep M4.6 is not strongly felt anywhere, a quarry blast is no earthquake: both cancel
    assert by_id["usgs:us7000deep"].op == "cancel" and by_id["usgs:us7000deep"].geometry is None
    assert by_id["usgs:uu6000blst"].op == "cancel"

    assert [(r.item_ref, r.reason) for r in result.rejected] == [("us7000bad1", "magnitude is not a number: 'strong'")]
    assert result.skipped == (Skipped("usgs:us7000old1", "expired"),)  # as of NOW, counted, not an event


def test_updated_event_updates_the_same_crisis() -> None:
    first = {e.crisis_id: e for e in parse(FIXTURES / "week.geojson").events}["usgs:us7000abcd"]
    (update,) = parse(FIXTURES / "week_updated.geojson").events
    assert update.crisis_id == first.crisis_id
    assert update.version > first.version
    assert update.severity == "extreme"  # PAGER red, M7.1
    assert "usgs:ak023zzzz" in update.references
    assert shape(update.geometry).area > shape(first.geometry).area


def test_felt_radius_follows_the_intensity_equation() -> None:
    # Allen et al. (2012): bigger magnitude -> wider; deeper -> narrower; a small deep event -> no area
    assert usgs.felt_radius_km(5.4, 10, 5.0) == pytest.approx(28.8, abs=0.1)
    assert usgs.felt_radius_km(7.5, 10, 5.0) > usgs.felt_radius_km(6.5, 10, 5.0) > usgs.felt_radius_km(5.5, 10, 5.0)  # type: ignore[operator]
    assert usgs.felt_radius_km(6.0, 300, 5.0) is None or usgs.felt_radius_km(6.0, 300, 5.0) < usgs.felt_radius_km(6.0, 10, 5.0)  # type: ignore[operator]
    assert usgs.felt_radius_km(4.5, 600, 5.0) is None
    assert usgs.intensity(6.0, 10.0) > usgs.intensity(6.0, 100.0)


@pytest.mark.parametrize(("magnitude", "alert", "tsunami", "expected"), [
    (4.7, None, False, "minor"), (5.2, None, False, "moderate"), (6.1, "green", False, "severe"),
    (5.4, "yellow", False, "moderate"), (5.0, "red", False, "extreme"), (7.5, "green", True, "extreme"),
    (4.8, None, True, "severe"),
])
def test_severity_mapping(magnitude: float, alert: str | None, tsunami: bool, expected: str) -> None:
    assert usgs.severity_for(magnitude, alert, tsunami) == expected


@pytest.mark.parametrize("document", [b"not json", b"[]", b'{"type": "Feature"}', b'{"type": "FeatureCollection"}'])
def test_unreadable_documents_are_refused(document: bytes) -> None:
    with pytest.raises(FeedError):
        usgs.parse(document, ParseContext(now=NOW))


def test_sniff() -> None:
    assert usgs.sniff((FIXTURES / "week.geojson").read_bytes())
    assert not usgs.sniff(b'{"data": {"AF": {"advisory-state": 3}}}')


def test_every_event_round_trips_through_the_wire_schema() -> None:
    from schemas import codec
    from schemas.models import Crisis

    for path in sorted(FIXTURES.glob("*.geojson")):
        for event in parse(path, now=datetime(2023, 11, 1, tzinfo=UTC)).events:
            assert codec.decode(codec.encode(event), Crisis) == event, event.crisis_id


needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason="shared samples not present")


@needs_samples
def test_sample_4_5_week() -> None:
    data = (SAMPLES / "usgs_4.5_week_2020-10-10_josem279.geojson").read_bytes()
    assert usgs.sniff(data)
    # as of the first event of the week, nothing has expired: every one of the 91 events is judged
    everything = usgs.parse(data, ParseContext(now=datetime(2020, 10, 3, tzinfo=UTC)))
    assert len(everything.events) == 91 and not everything.rejected
    # as of the moment the feed was generated, only the last 72 hours count
    result = usgs.parse(data, ParseContext(now=datetime.fromtimestamp(1602348208, UTC)))
    assert (len(result.events), len(result.rejected), len(result.skipped)) == (35, 0, 56)  # 56 expired
    by_id = {e.crisis_id: e for e in result.events}
    nikolski = by_id["usgs:us6000c6rg"]
    assert (nikolski.op, nikolski.severity, nikolski.urgency, nikolski.version) == ("upsert", "severe", "immediate", 1602340538)
    assert nikolski.references == ("usgs:at00qhvzxu", "usgs:ak020cym0qd0")
    easter = by_id["usgs:us6000c7b1"]
    assert (easter.op, easter.severity, easter.title) == ("upsert", "moderate", "M 5.9 - Easter Island region")
    for event in result.events:
        assert event.op == "cancel" or event.geometry is not None
    fiji = everything.events[[e.crisis_id for e in everything.events].index("usgs:us6000c617")]
    assert fiji.op == "cancel"  # M6.0 at 629 km under Fiji: intensity V is not reached even at the epicentre
    shallow = everything.events[[e.crisis_id for e in everything.events].index("usgs:us6000c6mu")]
    assert (shallow.op, shallow.severity, shallow.country_codes) == ("upsert", "severe", ("PG",))  # M6.3 PNG, 103 km deep


@needs_samples
def test_sample_significant_week_older_shape() -> None:
    data = (SAMPLES / "usgs_significant_week_2020-03-26_tasnuvaairen.geojson").read_bytes()
    result = usgs.parse(data, ParseContext(now=datetime(2020, 3, 22, tzinfo=UTC)))
    by_id = {e.crisis_id: e for e in result.events}
    assert len(by_id) == 5 and not result.rejected
    kuril = by_id["usgs:us70008fi4"]
    assert (kuril.severity, kuril.urgency, kuril.country_codes) == ("extreme", "immediate", ("RU",))
    assert kuril.references == ("usgs:at00q7qai7", "usgs:pt20085000")
    assert by_id["usgs:us70008dx7"].severity == "moderate"  # PAGER yellow, M5.4 Croatia
    assert by_id["usgs:us70008dx7"].country_codes == ("HR", "SI")
    assert by_id["usgs:uu60369062"].op == "cancel"  # M3.9 Utah: "significant", but not strongly felt
