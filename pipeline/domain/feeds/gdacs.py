"""GDACS RSS feeds (``gdacs.org/xml/rss.xml``, ``rss_7d.xml``, archive searches) as ``crisis/1`` events.

The XML is read through :mod:`pipeline.domain.feeds.xmlsafe` (defusedxml, DTDs and entities
refused, size and time bounded, UTF-8 BOM accepted); elements are matched by local name within
the ``gdacs:``, ``geo:`` and ``georss:`` namespaces.

Identity. One crisis per GDACS event: ``crisis_id`` is ``gdacs:<eventtype>:<eventid>``; every new
episode of the event (a new cyclone advisory, a new flood assessment) is an update of that
crisis. ``version`` is ``gdacs:datemodified`` in whole epoch seconds, or ``pubDate`` where the
feed has no ``datemodified`` (the 2016 archive format). ``source_ref`` is
``<eventtype><eventid>/<episodeid>``; ``url`` is the item's report link.

Area. ``gdacs:bbox`` ("lonmin lonmax latmin latmax", longitudes may run past -180 or 180 near
Fiji and the Kermadecs) through :func:`pipeline.domain.geometry.bbox`, which splits it at the
antimeridian. Feeds without a bbox (the 2016 format) fall back to a circle around the event's
point (``geo:Point``, else ``georss:point``) with a radius by event type and alert level
(:data:`FALLBACK_RADIUS_KM`): the order of magnitude of the area such events affect (felt area
of an earthquake, wind field of a cyclone, a flooded river basin, a volcano's evacuation and
ash-fall zone, a wildfire and its smoke, a drought region), larger for higher alert levels.

Severity from the alert level of the current episode (``gdacs:episodealertlevel``, else
``gdacs:alertlevel``): Green -> minor, Orange -> severe, Red -> extreme. The alert score goes
into the instruction text. Category: EQ, VO, TS -> geo; TC, FL, DR -> met; WF -> fire.

Countries. ``gdacs:iso3`` and the names in ``gdacs:country`` (a comma-separated list, or a
free-text region in the old format) resolved to ISO alpha-2; when neither resolves, the
countries the area touches.

Lifecycle. ``effective`` is ``gdacs:fromdate`` (else ``pubDate``); ``expires`` is the version time
plus :data:`EXPIRES_AFTER` for the event type, so an event that keeps getting new episodes stays
alive and one GDACS stops updating ends by itself. ``gdacs:iscurrent`` false means GDACS considers
the event over: the item is emitted as ``op: cancel`` so that a crisis declared from an earlier
episode ends now (a cancel for a crisis never declared is a no-op downstream). Items already
expired at ``ctx.now`` yield nothing (a note says so). The same event and version twice in one
document (the archive repeats items) yields one event.
"""

from __future__ import annotations

import email.utils
import math
import re
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta

from pipeline.domain import countries, geometry
from pipeline.domain.feeds import xmlsafe
from pipeline.domain.feeds.base import FeedError, ParseContext, ParseResult, Rejection, Skipped
from schemas import Crisis
from schemas.models import Certainty, Severity, Urgency

GDACS_NAMESPACE = "http://www.gdacs.org"

CATEGORY: dict[str, str] = {"EQ": "geo", "VO": "geo", "TS": "geo", "TC": "met", "FL": "met", "DR": "met", "WF": "fire"}
EVENT_NAME: dict[str, str] = {"EQ": "Earthquake", "VO": "Volcanic eruption", "TS": "Tsunami", "TC": "Tropical cyclone",
                              "FL": "Flood", "DR": "Drought", "WF": "Wildfire"}
SEVERITY: dict[str, Severity] = {"green": "minor", "orange": "severe", "red": "extreme"}

# km, by event type, for Green / Orange / Red, when an item has no bbox.
FALLBACK_RADIUS_KM: dict[str, tuple[float, float, float]] = {
    "EQ": (50.0, 100.0, 200.0),
    "TC": (150.0, 250.0, 400.0),
    "FL": (50.0, 100.0, 150.0),
    "VO": (20.0, 50.0, 100.0),
    "WF": (20.0, 40.0, 80.0),
    "DR": (200.0, 300.0, 500.0),
    "TS": (100.0, 200.0, 400.0),
}
_DEFAULT_RADIUS_KM = (50.0, 100.0, 200.0)
_LEVEL_INDEX = {"green": 0, "orange": 1, "red": 2}

EXPIRES_AFTER: dict[str, timedelta] = {
    "EQ": timedelta(hours=72), "TS": timedelta(hours=24), "TC": timedelta(hours=48), "FL": timedelta(days=7),
    "VO": timedelta(days=7), "WF": timedelta(days=3), "DR": timedelta(days=30),
}
_DEFAULT_EXPIRY = timedelta(days=3)

_INSTRUCTION: dict[str, str] = {
    "EQ": "Expect aftershocks: stay out of damaged buildings and follow the local authorities.",
    "TS": "Move away from the coast to high ground and follow local tsunami warnings.",
    "TC": "Follow the local authorities' cyclone warnings; stay indoors away from windows and be ready to evacuate.",
    "FL": "Avoid flooded areas and rivers; move to higher ground if told to and follow the local authorities.",
    "VO": "Keep out of the exclusion zone, protect yourself from ash and follow the local authorities.",
    "WF": "Keep away from the fire, be ready to evacuate and follow the local authorities.",
    "DR": "Expect water and food shortages; follow the local authorities' advice.",
}


def sniff(data: bytes) -> bool:
    """Whether a document looks like a GDACS RSS feed."""
    head = xmlsafe.strip_bom(data[:8192])
    return b"<rss" in head and b"gdacs.org" in head


def parse(data: bytes, ctx: ParseContext) -> ParseResult:
    root = xmlsafe.parse_xml(data, max_bytes=ctx.max_bytes)
    if xmlsafe.local_name(root.tag) != "rss":
        raise FeedError(f"not a GDACS RSS feed: root element <{xmlsafe.local_name(root.tag)}>")
    channel = xmlsafe.child(root, "channel")
    if channel is None:
        raise FeedError("not a GDACS RSS feed: no <channel>")
    events: list[Crisis] = []
    rejected: list[Rejection] = []
    notes: list[str] = []
    skipped: list[Skipped] = []
    seen: set[tuple[str, int]] = set()
    for index, item in enumerate(xmlsafe.children(channel, "item")):
        ref = xmlsafe.text(item, "guid") or f"item[{index}]"
        try:
            crisis = _crisis(item, ctx)
        except (ValueError, geometry.GeometryError) as exc:
            rejected.append(Rejection(ref, str(exc)))
            continue
        if crisis is None:
            skipped.append(Skipped(ref, "expired"))
            continue
        if (crisis.crisis_id, crisis.version) in seen:
            notes.append(f"{ref} repeated in the document")
            continue
        seen.add((crisis.crisis_id, crisis.version))
        events.append(crisis)
    return ParseResult(events=tuple(events), rejected=tuple(rejected), notes=tuple(notes), skipped=tuple(skipped))


def _gdacs(item: ET.Element, name: str) -> ET.Element | None:
    """The first child ``gdacs:<name>`` (GDACS namespace, or unqualified local name as a fallback)."""
    found = None
    for element in item:
        if xmlsafe.local_name(element.tag) == name:
            if xmlsafe.namespace(element.tag).rstrip("/") == GDACS_NAMESPACE:
                return element
            found = found if found is not None else element
    return found


def _field(item: ET.Element, name: str) -> str:
    return xmlsafe.text(_gdacs(item, name))


def _time(value: str, what: str) -> datetime:
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        raise ValueError(f"{what} is not an RFC 822 date: {value!r}") from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _float(value: str, what: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{what} is not a number: {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{what} is not finite: {value!r}")
    return number


def _point(item: ET.Element) -> tuple[float, float] | None:
    """(lat, lon) of the event: ``geo:Point`` first, else ``georss:point`` ("lat lon")."""
    point = xmlsafe.child(item, "Point")
    if point is not None and xmlsafe.text(point, "lat") and xmlsafe.text(point, "long"):
        return _float(xmlsafe.text(point, "lat"), "geo:lat"), _float(xmlsafe.text(point, "long"), "geo:long")
    georss = xmlsafe.text(item, "point").split()
    if len(georss) == 2:
        return _float(georss[0], "georss:point latitude"), _float(georss[1], "georss:point longitude")
    return None


def _area(item: ET.Element, event_type: str, level: str) -> dict[str, object]:
    box = _field(item, "bbox").split()
    if box:
        if len(box) != 4:
            raise ValueError(f"gdacs:bbox needs 4 numbers (lonmin lonmax latmin latmax), got {' '.join(box)!r}")
        lon_min, lon_max, lat_min, lat_max = (_float(v, "gdacs:bbox") for v in box)
        return geometry.bbox(lon_min, lon_max, lat_min, lat_max)
    point = _point(item)
    if point is None:
        raise ValueError("no gdacs:bbox and no point")
    radius = FALLBACK_RADIUS_KM.get(event_type, _DEFAULT_RADIUS_KM)[_LEVEL_INDEX.get(level, 0)]
    return geometry.circle(point[0], point[1], radius)


def _country_codes(item: ET.Element, area: dict[str, object]) -> tuple[str, ...]:
    codes: set[str] = set()
    iso3 = _field(item, "iso3")
    if iso3:
        code = countries.iso2_from_iso3(iso3)
        if code:
            codes.add(code)
    for name in _field(item, "country").split(","):
        code = countries.iso2_from_name(name) if name.strip() else None
        if code:
            codes.add(code)
    return tuple(sorted(codes)) if codes else countries.countries_for(area)


def _crisis(item: ET.Element, ctx: ParseContext) -> Crisis | None:
    event_type = _field(item, "eventtype").upper()
    event_id = _field(item, "eventid")
    if not re.fullmatch(r"[A-Z]{2}", event_type):
        raise ValueError(f"gdacs:eventtype missing or not a GDACS type: {event_type!r}")
    if not re.fullmatch(r"[0-9A-Za-z._-]{1,64}", event_id):
        raise ValueError(f"gdacs:eventid missing or malformed: {event_id!r}")
    episode = _field(item, "episodeid")
    modified = _field(item, "datemodified") or xmlsafe.text(item, "pubDate")
    if not modified:
        raise ValueError("neither gdacs:datemodified nor pubDate")
    updated = _time(modified, "gdacs:datemodified/pubDate")
    version = max(int(updated.timestamp()), 1)
    start_text = _field(item, "fromdate") or xmlsafe.text(item, "pubDate")
    effective = _time(start_text, "gdacs:fromdate") if start_text else updated
    level = (_field(item, "episodealertlevel") or _field(item, "alertlevel")).lower()
    score = _field(item, "episodealertscore") or _field(item, "alertscore")
    title = (xmlsafe.text(item, "title") or f"{EVENT_NAME.get(event_type, event_type)} {event_id}")[:500]
    url = xmlsafe.text(item, "link")[:2048]
    crisis_id = f"gdacs:{event_type}:{event_id}"
    source_ref = f"{event_type}{event_id}/{episode}" if episode else f"{event_type}{event_id}"
    category = CATEGORY.get(event_type, "other")
    severity = SEVERITY.get(level, "unknown")

    if _field(item, "iscurrent").lower() == "false":
        return Crisis(crisis_id, "cancel", version, "gdacs", source_ref, title, category, severity, "past", "observed", None, 0.0,
                      (), effective, None, "", url)
    expires = updated + EXPIRES_AFTER.get(event_type, _DEFAULT_EXPIRY)
    if expires <= ctx.now and not ctx.keep_expired:
        return None
    area = _area(item, event_type, level)
    temporary = _field(item, "temporary").lower() == "true"
    certainty: Certainty = "likely" if temporary or event_type == "TC" else "observed"
    urgency: Urgency = "past" if event_type == "EQ" else "expected" if event_type == "DR" else "immediate"
    alert = f"GDACS {level.capitalize() or 'unknown'} alert" + (f" (score {_float(score, 'alert score'):g})" if score else "")
    instruction = f"{alert}. {_INSTRUCTION.get(event_type, 'Follow the local authorities.')}"
    return Crisis(
        crisis_id=crisis_id, op="upsert", version=version, source="gdacs", source_ref=source_ref, title=title, category=category,
        severity=severity, urgency=urgency, certainty=certainty, geometry=area, buffer_km=0.0,
        country_codes=_country_codes(item, area), effective=effective, expires=expires, instruction=instruction, url=url,
    )
