"""CAP out, pure: each msgType, areas (holes, MultiPolygons), escaping; valid against the OASIS CAP 1.2
schema; parsed back by our own CAP reader into the same crisis; the Atom feed read by feedparser."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import defusedxml.ElementTree as SafeET
import feedparser
import pytest
import xmlschema

from pipeline.domain.cap_out import CAP_NS, KNOWN_TEXTS, Published, atom_feed, cap_alert, cap_time, identifier
from pipeline.domain.feeds.base import ParseContext, parse_document
from producers.api import DEFAULT_CRISIS_TITLE, OPERATOR_DEFAULTS
from schemas import Crisis

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "fixtures" / "schemas" / "cap-1.2.xsd"
SENDER = "crisiswatch@kemlu.example"
T0 = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
NS = {"cap": CAP_NS}
SQUARE = {"type": "Polygon", "coordinates": [[[28.9, 41.0], [29.1, 41.0], [29.1, 41.1], [28.9, 41.1], [28.9, 41.0]]]}


@pytest.fixture(scope="module")
def cap_schema() -> xmlschema.XMLSchema:
    return xmlschema.XMLSchema(str(SCHEMA_FILE))


def crisis(version: int = 1, **changes: object) -> Crisis:
    base = Crisis("op-istanbul", "upsert", version, "operator", "op-istanbul", "Earthquake in Istanbul", "geo", "severe",
                  "immediate", "observed", SQUARE, 0.0, ("TR",), T0, T0 + timedelta(days=2), "Move to open ground.",
                  "https://kemlu.example/alerts/1")
    return replace(base, **changes)  # type: ignore[arg-type]


def published(c: Crisis, minutes: int = 0) -> Published:
    return Published(c, T0 + timedelta(minutes=minutes))


def root(doc: bytes) -> ET.Element:
    return SafeET.fromstring(doc)


def texts(doc: bytes, path: str) -> list[str]:
    return [e.text or "" for e in root(doc).findall(path, NS)]


def test_first_version_is_an_alert_valid_against_the_schema(cap_schema: xmlschema.XMLSchema) -> None:
    doc = cap_alert([published(crisis())], SENDER)
    cap_schema.validate(doc)
    assert texts(doc, "cap:msgType") == ["Alert"]
    assert texts(doc, "cap:identifier") == [f"{SENDER}:op-istanbul:1"]
    assert texts(doc, "cap:sent") == ["2025-03-01T12:00:00-00:00"]
    assert texts(doc, "cap:status") == ["Actual"]
    assert texts(doc, "cap:scope") == ["Public"]
    assert texts(doc, "cap:references") == []
    assert texts(doc, "cap:info/cap:language") == ["id-ID", "en-US"]
    assert texts(doc, "cap:info/cap:event") == ["Bencana geologi", "Geological hazard"]
    assert texts(doc, "cap:info/cap:category") == ["Geo", "Geo"]
    assert texts(doc, "cap:info/cap:severity") == ["Severe", "Severe"]
    assert texts(doc, "cap:info/cap:urgency") == ["Immediate", "Immediate"]
    assert texts(doc, "cap:info/cap:certainty") == ["Observed", "Observed"]
    assert texts(doc, "cap:info/cap:expires") == ["2025-03-03T12:00:00-00:00"] * 2
    assert texts(doc, "cap:info/cap:web") == ["https://kemlu.example/alerts/1"] * 2
    assert texts(doc, "cap:info/cap:area/cap:areaDesc") == ["Turkey"] * 2
    assert texts(doc, "cap:info/cap:area/cap:polygon") == ["41,28.9 41,29.1 41.1,29.1 41.1,28.9 41,28.9"] * 2
    assert texts(doc, "cap:info/cap:area/cap:geocode/cap:valueName") == ["ISO3166-1"] * 2
    assert texts(doc, "cap:info/cap:area/cap:geocode/cap:value") == ["TR"] * 2


def test_the_same_version_gives_the_same_document() -> None:
    assert cap_alert([published(crisis())], SENDER) == cap_alert([published(crisis())], SENDER)


def test_later_version_is_an_update_referencing_the_first_and_the_previous(cap_schema: xmlschema.XMLSchema) -> None:
    versions = [published(crisis(1)), published(crisis(2), 5), published(crisis(3, severity="extreme"), 9)]
    doc = cap_alert(versions, SENDER)
    cap_schema.validate(doc)
    assert texts(doc, "cap:msgType") == ["Update"]
    assert texts(doc, "cap:references") == [
        f"{SENDER},{SENDER}:op-istanbul:1,2025-03-01T12:00:00-00:00 {SENDER},{SENDER}:op-istanbul:2,2025-03-01T12:05:00-00:00"]
    assert texts(doc, "cap:info/cap:severity") == ["Extreme", "Extreme"]
    # Order of the input does not matter: the newest version is the alert.
    assert cap_alert(list(reversed(versions)), SENDER) == doc


def test_second_version_references_the_first_once() -> None:
    doc = cap_alert([published(crisis(1)), published(crisis(2), 5)], SENDER)
    assert texts(doc, "cap:references") == [f"{SENDER},{SENDER}:op-istanbul:1,2025-03-01T12:00:00-00:00"]


def test_cancel_describes_what_it_ends(cap_schema: xmlschema.XMLSchema) -> None:
    cancel = crisis(2, op="cancel", title="", geometry=None, country_codes=(), instruction="", url="",
                    effective=T0 + timedelta(hours=1))
    doc = cap_alert([published(crisis(1)), published(cancel, 60)], SENDER)
    cap_schema.validate(doc)
    assert texts(doc, "cap:msgType") == ["Cancel"]
    assert texts(doc, "cap:references") == [f"{SENDER},{SENDER}:op-istanbul:1,2025-03-01T12:00:00-00:00"]
    assert texts(doc, "cap:info/cap:responseType") == ["AllClear", "AllClear"]
    assert texts(doc, "cap:info/cap:urgency") == ["Past", "Past"]
    assert texts(doc, "cap:info/cap:headline") == ["Dibatalkan: Earthquake in Istanbul", "Cancelled: Earthquake in Istanbul"]
    assert texts(doc, "cap:info/cap:expires") == []


def test_a_cancel_of_nothing_declared_has_no_info(cap_schema: xmlschema.XMLSchema) -> None:
    doc = cap_alert([published(crisis(5, op="cancel", geometry=None, country_codes=()))], SENDER)
    cap_schema.validate(doc)
    assert texts(doc, "cap:msgType") == ["Cancel"]
    assert root(doc).findall("cap:info", NS) == []


@pytest.mark.parametrize(("status", "expected"), [("actual", "Actual"), ("exercise", "Exercise"), ("test", "Test"),
                                                  ("draft", "Draft")])
def test_status(status: str, expected: str, cap_schema: xmlschema.XMLSchema) -> None:
    doc = cap_alert([published(crisis(status=status))], SENDER)
    cap_schema.validate(doc)
    assert texts(doc, "cap:status") == [expected]


def test_unknown_enumerations_and_every_category_are_valid(cap_schema: xmlschema.XMLSchema) -> None:
    for category in ("geo", "met", "safety", "security", "rescue", "fire", "health", "env", "transport", "infra",
                     "cbrne", "other"):
        doc = cap_alert([published(crisis(category=category, severity="unknown", urgency="unknown",
                                          certainty="unknown"))], SENDER)
        cap_schema.validate(doc)
        assert texts(doc, "cap:info/cap:severity") == ["Unknown", "Unknown"]
        assert texts(doc, "cap:info/cap:category")[0] == ("CBRNE" if category == "cbrne" else category.capitalize())


def test_polygon_holes_are_left_out_and_multipolygons_give_one_polygon_each(cap_schema: xmlschema.XMLSchema) -> None:
    outer = [[0.0, 0.0], [4.0, 0.0], [4.0, 4.0], [0.0, 4.0], [0.0, 0.0]]
    hole = [[1.0, 1.0], [1.0, 2.0], [2.0, 2.0], [2.0, 1.0], [1.0, 1.0]]
    other = [[10.0, -5.5], [11.0, -5.5], [11.0, -4.5], [10.0, -5.5]]
    geometry = {"type": "MultiPolygon", "coordinates": [[outer, hole], [other]]}
    doc = cap_alert([published(crisis(geometry=geometry, country_codes=("GA", "ZZ")))], SENDER)
    cap_schema.validate(doc)
    info = root(doc).find("cap:info", NS)
    assert info is not None
    polygons = [p.text or "" for p in info.findall("cap:area/cap:polygon", NS)]
    assert polygons == ["0,0 0,4 4,4 4,0 0,0", "-5.5,10 -5.5,11 -4.5,11 -5.5,10"]
    for polygon in polygons:
        pairs = polygon.split()
        assert pairs[0] == pairs[-1] and len(pairs) >= 4
    assert texts(doc, "cap:info/cap:area/cap:areaDesc")[0] == "Gabon, ZZ"  # an unknown code keeps its code


def test_titles_with_markup_characters_are_escaped_and_illegal_characters_replaced(cap_schema: xmlschema.XMLSchema) -> None:
    title = 'Flood <script>alert("x")</script> & "fire" \x07 at A&B'
    doc = cap_alert([published(crisis(title=title, instruction="Go to <high> ground & wait"))], SENDER)
    cap_schema.validate(doc)
    assert b"<script>" not in doc
    assert texts(doc, "cap:info/cap:headline")[1] == title.replace("\x07", "\ufffd")
    assert texts(doc, "cap:info/cap:instruction") == ["Go to <high> ground & wait"] * 2


def test_identifier_keeps_out_what_cap_forbids(cap_schema: xmlschema.XMLSchema) -> None:
    sender = "Kemlu RI, <ops>&co"
    assert identifier(sender, "x y", 3) == "Kemlu_RI___ops>_co:x_y:3"
    cap_schema.validate(cap_alert([published(crisis())], sender))


def test_operator_defaults_are_translated_and_empty_texts_get_fixed_ones() -> None:
    assert OPERATOR_DEFAULTS["instruction"] in KNOWN_TEXTS and DEFAULT_CRISIS_TITLE in KNOWN_TEXTS
    doc = cap_alert([published(crisis(title=DEFAULT_CRISIS_TITLE, instruction=OPERATOR_DEFAULTS["instruction"]))], SENDER)
    assert texts(doc, "cap:info/cap:headline") == ["Krisis dinyatakan oleh operator", DEFAULT_CRISIS_TITLE]
    assert texts(doc, "cap:info/cap:instruction")[0].startswith("Ikuti arahan otoritas setempat")
    bare = cap_alert([published(crisis(title="", instruction=" ", url=""))], SENDER)
    assert texts(bare, "cap:info/cap:headline") == ["Bencana geologi", "Geological hazard"]
    assert texts(bare, "cap:info/cap:instruction") == ["Ikuti arahan otoritas setempat.",
                                                       "Follow the instructions of local authorities."]
    assert texts(bare, "cap:info/cap:web") == []


def test_times_are_cap_times() -> None:
    assert cap_time(datetime(2025, 1, 2, 3, 4, 5, 999, tzinfo=UTC)) == "2025-01-02T03:04:05-00:00"
    with pytest.raises(ValueError, match="timezone"):
        cap_time(datetime(2025, 1, 2))


def test_round_trip_through_our_cap_reader() -> None:
    ctx = ParseContext(now=T0)
    first, update = crisis(1), crisis(2, severity="extreme", title="Aftershocks <&> more", expires=T0 + timedelta(days=3))
    cancel = crisis(3, op="cancel", title="", geometry=None, country_codes=())
    docs = [cap_alert([published(first)], SENDER),
            cap_alert([published(first), published(update, 5)], SENDER),
            cap_alert([published(first), published(update, 5), published(cancel, 10)], SENDER)]
    parsed = [parse_document(doc, "cap", ctx) for doc in docs]
    assert all(not p.rejected for p in parsed)
    events = [p.events[0] for p in parsed]
    assert len({e.crisis_id for e in events}) == 1  # every version lands on one crisis
    assert events[0].crisis_id == f"cap:{SENDER}:{identifier(SENDER, 'op-istanbul', 1)}"
    for event, original in zip(events[:2], (first, update), strict=True):
        assert event.op == "upsert"
        assert event.geometry == original.geometry
        assert event.country_codes == original.country_codes
        assert (event.severity, event.urgency, event.certainty) == (original.severity, original.urgency, original.certainty)
        assert (event.title, event.instruction, event.url) == (original.title, original.instruction, original.url)
        # CAP times are whole seconds.
        assert event.effective == original.effective.replace(microsecond=0)
        assert event.expires == (original.expires.replace(microsecond=0) if original.expires else None)
        assert event.category == original.category
    assert events[1].version > events[0].version
    assert events[2].op == "cancel"
    # Indonesian chosen: the same crisis, read from the other info block.
    indonesian = parse_document(docs[1], "cap", ParseContext(now=T0, language="id")).events[0]
    assert indonesian.language == "id-ID" and indonesian.geometry == update.geometry


def test_atom_feed_is_valid_atom_read_by_feedparser() -> None:
    active = [published(crisis(2)), published(crisis(1, crisis_id="op-b/c", title="Storm & <flood>"), 30)]
    doc = atom_feed(active, sender=SENDER, base_url="http://api.example:8080/", now=T0 + timedelta(hours=1))
    parsed = feedparser.parse(doc)
    assert not parsed.bozo, parsed.get("bozo_exception")
    assert parsed.version == "atom10"
    assert parsed.feed.id.startswith("urn:uuid:")
    assert parsed.feed.updated == "2025-03-01T12:30:00Z"
    assert parsed.feed.author == SENDER
    assert [e.title for e in parsed.entries] == ["Storm & <flood>", "Earthquake in Istanbul"]
    first = parsed.entries[0]
    assert first.updated == "2025-03-01T12:30:00Z" and first.id.startswith("urn:uuid:")
    [link] = [link for link in first.links if link.rel == "alternate"]
    assert link.type == "application/cap+xml"
    assert link.href == "http://api.example:8080/v1/crises/op-b%2Fc.cap"
    assert parsed.entries[1].links[0].href == "http://api.example:8080/v1/crises/op-istanbul.cap"
    assert len({e.id for e in parsed.entries}) == 2


def test_empty_atom_feed_is_still_a_feed() -> None:
    parsed = feedparser.parse(atom_feed([], sender=SENDER, base_url="http://x", now=T0))
    assert not parsed.bozo and parsed.entries == [] and parsed.feed.updated == "2025-03-01T12:00:00Z"
