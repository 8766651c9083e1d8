"""Travel advisories become country-wide crisis/1 events (own fixtures, and the real GAC index when present)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from shapely.geometry import Point, shape

from pipeline.domain.feeds import advisory
from pipeline.domain.feeds.base import FeedError, ParseContext, ParseResult

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "feeds" / "advisory"
SAMPLES = Path(__file__).resolve().parents[4] / "shared" / "samples" / "advisories"
NOW = datetime(2024, 6, 3, tzinfo=UTC)


def parse(path: Path, source_name: str = "") -> ParseResult:
    return advisory.parse(path.read_bytes(), ParseContext(now=NOW, source_name=source_name))


def test_gac_index_fixture() -> None:
    result = parse(FIXTURES / "gac_index.json")
    by_id = {e.crisis_id: e for e in result.events}
    assert list(by_id) == ["advisory:gac:AF", "advisory:gac:ML", "advisory:gac:CI", "advisory:gac:NO"]

    af = by_id["advisory:gac:AF"]
    assert (af.op, af.version, af.source, af.source_ref, af.category) == ("upsert", 1699900000, "advisory", "cta-cap-AF.json", "safety")
    assert (af.severity, af.urgency, af.certainty, af.country_codes, af.expires) == ("extreme", "expected", "likely", ("AF",), None)
    assert af.title == "Travel advisory for Afghanistan: Avoid all travel"
    assert af.instruction == "Global Affairs Canada advises for Afghanistan: Avoid all travel."
    assert af.url == "https://travel.gc.ca/destinations/afghanistan"
    assert af.effective == datetime(2023, 11, 13, 18, 26, 40, tzinfo=UTC)
    assert af.geometry is not None and shape(af.geometry).covers(Point(69.17, 34.53))  # Kabul

    assert by_id["advisory:gac:ML"].severity == "severe"
    ci = by_id["advisory:gac:CI"]
    assert ci.severity == "minor" and ci.title == "Travel advisory for Côte d\u2019Ivoire: Exercise a high degree of caution"

    no = by_id["advisory:gac:NO"]  # level 0: ends any advisory crisis for Norway
    assert (no.op, no.geometry, no.version) == ("cancel", None, 1699600000)

    assert [(r.item_ref, r.reason) for r in result.rejected] == [
        ("SG", "advisory level must be 0-3, got 'high'"),
        ("cta-cap-DM.json", "no country area for DM in the shipped Natural Earth 1:110m data"),
    ]
    assert result.notes == ("ML: regional advisories exist; only the country-wide level is used",
                            "cta-cap-PT-20.json: level 0 for 'PT-20', which is not a country code; nothing to cancel")


def test_a_level_that_drops_to_zero_cancels_the_crisis() -> None:
    before = {e.crisis_id: e for e in parse(FIXTURES / "gac_index.json").events}
    after = {e.crisis_id: e for e in parse(FIXTURES / "gac_index_later.json").events}
    assert before["advisory:gac:AF"].op == "upsert"
    assert after["advisory:gac:AF"].op == "cancel"
    assert after["advisory:gac:AF"].version > before["advisory:gac:AF"].version
    assert (after["advisory:gac:ML"].op, after["advisory:gac:ML"].severity) == ("upsert", "extreme")
    assert after["advisory:gac:ML"].version > before["advisory:gac:ML"].version


def test_ministry_csv() -> None:
    result = parse(FIXTURES / "ministry.csv", source_name="id-kemlu")
    by_id = {e.crisis_id: e for e in result.events}
    assert list(by_id) == ["advisory:id-kemlu:TH", "advisory:id-kemlu:MM", "advisory:id-kemlu:JP"]
    th = by_id["advisory:id-kemlu:TH"]
    assert (th.severity, th.title, th.version) == ("severe", "Travel advisory: Thailand southern provinces unrest", 1714525200)
    assert th.instruction == "Avoid non-essential travel to Thailand; register your stay with the embassy in Bangkok."
    mm = by_id["advisory:id-kemlu:MM"]  # a country name, a plain date, empty title and instruction
    assert (mm.severity, mm.country_codes, mm.effective) == ("extreme", ("MM",), datetime(2024, 5, 2, tzinfo=UTC))
    assert mm.title == "Travel advisory for Myanmar: Avoid all travel" and mm.instruction == "Avoid all travel to Myanmar."
    assert by_id["advisory:id-kemlu:JP"].op == "cancel"
    assert sorted((r.item_ref, r.reason) for r in result.rejected) == [
        ("row[3]:Atlantis", "not an ISO 3166-1 alpha-2 country code or known name: 'Atlantis'"),
        ("row[4]:FR", "advisory level must be 0-3, got 5"),
        ("row[5]:Viet Nam", "no 'updated' date: the publication time is the advisory's version"),
    ]


def test_ministry_json_with_its_own_publisher() -> None:
    result = parse(FIXTURES / "ministry.json", source_name="ignored")
    by_id = {e.crisis_id: e for e in result.events}
    assert list(by_id) == ["advisory:kemlu:SG", "advisory:kemlu:KR", "advisory:kemlu:SD"]
    sg = by_id["advisory:kemlu:SG"]
    assert (sg.severity, sg.url, sg.title) == ("minor", "https://kemlu.example/advisories/sg", "Singapore: haze")
    assert shape(sg.geometry).covers(Point(103.82, 1.35))
    assert by_id["advisory:kemlu:SD"].version == 1717311600
    assert [(r.item_ref, r.reason) for r in result.rejected] == [
        ("row[3]:MY", "'updated' has no UTC offset: '2024-06-02T10:00:00'")]


def test_default_publisher_for_a_csv_without_a_source_name() -> None:
    result = parse(FIXTURES / "ministry.csv")
    assert result.events[0].crisis_id == "advisory:ministry:TH"


@pytest.mark.parametrize(("document", "reason"), [
    (b"", "empty"), (b"{not json", "not valid JSON"), (b'{"something": 1}', "not an advisory document"),
    (b"name,score\nx,1\n", "needs the columns"), (b'{"publisher": "Bad Name!", "advisories": []}', "publisher"),
    (b"\xff\xfe\x00", "not UTF-8"),
])
def test_unreadable_documents_are_refused(document: bytes, reason: str) -> None:
    with pytest.raises(FeedError, match=reason):
        advisory.parse(document, ParseContext(now=NOW))


def test_sniff() -> None:
    for name in ("gac_index.json", "ministry.csv", "ministry.json"):
        assert advisory.sniff((FIXTURES / name).read_bytes()), name
    assert not advisory.sniff(b'{"type": "FeatureCollection", "features": []}')


def test_every_event_round_trips_through_the_wire_schema() -> None:
    from schemas import codec
    from schemas.models import Crisis

    for path in sorted(FIXTURES.glob("*.*")):
        for event in parse(path).events:
            assert codec.decode(codec.encode(event), Crisis) == event, event.crisis_id


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="shared samples not present")
def test_sample_gac_index_2014() -> None:
    data = (SAMPLES / "canada_gac_travel_advisories_index-alpha-eng_2014-10-02.json").read_bytes()
    assert advisory.sniff(data)
    result = advisory.parse(data, ParseContext(now=datetime(2014, 10, 2, 6, 12, 33, tzinfo=UTC)))
    ops = [(e.op, e.severity) for e in result.events]
    assert ops.count(("cancel", "minor")) == 106  # 107 at level 0, less the Azores ("PT-20")
    assert (ops.count(("upsert", "minor")), ops.count(("upsert", "severe")), ops.count(("upsert", "extreme"))) == (93, 13, 12)
    # level 1 in the index but too small for a 1:110m polygon: refused with the reason, not given an invented area
    assert sorted(r.item_ref for r in result.rejected) == ["cta-cap-AG.json", "cta-cap-CV.json", "cta-cap-DM.json", "cta-cap-LC.json"]
    by_id = {e.crisis_id: e for e in result.events}
    assert (by_id["advisory:gac:AF"].op, by_id["advisory:gac:AF"].severity) == ("upsert", "extreme")
    assert by_id["advisory:gac:FR"].op == "cancel"
    assert by_id["advisory:gac:BH"].severity == "minor" and by_id["advisory:gac:BH"].geometry is not None  # tiny-country circle
    for crisis in result.events:
        assert not re.search(r"&[A-Za-z]+;", crisis.title + crisis.instruction), crisis.title  # HTML entities unescaped
        assert crisis.crisis_id == f"advisory:gac:{crisis.country_codes[0]}"
