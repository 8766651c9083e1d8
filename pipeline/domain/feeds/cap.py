"""OASIS CAP (1.2 and 1.1) to ``crisis/1``: bare alerts, CAP inside Atom/RSS feeds, CAP inside EDXL-DE.

Documents read (namespace-agnostic, matched on local names, so CAP 1.1 and 1.2 read alike):

- a bare ``<alert>``;
- an EDXL-DE ``<EDXLDistribution>`` carrying many ``<alert>`` (NSW RFS): one event per alert;
- an Atom ``<feed>`` (or RSS ``<channel>``) whose entries embed a full ``<alert>``, or carry CAP
  elements inline (MeteoAlarm's legacy Atom, with its non-standard ``cap:message_type``, one entry
  per area of the same alert; Krisinformation.se). Inline entries sharing an identifier are one
  alert whose areas are united. Missing inline fields fall back to the Atom ones: identifier ->
  entry ``id``, sender -> entry/feed author, sent -> ``updated``/``published``, headline ->
  ``title``, description -> ``summary``, web -> the ``application/cap+xml`` or alternate link;
  a missing status is taken as Actual and a missing message type as Alert (noted).

Identity and lifecycle:

- ``crisis_id`` = ``cap:<sender>:<identifier of the original alert>``: the first ``<references>``
  entry names the original when there are references, else the alert is its own original. So an
  Update or a Cancel lands on the crisis of the alert it updates. ``version`` is ``sent`` in whole
  epoch seconds, ``source_ref`` is ``sender,identifier,sent`` (the CAP reference form) and
  ``references`` keeps the alert's references verbatim.
- ``msgType`` Cancel -> ``op: cancel`` (with or without ``<info>``; a cancel carries no geometry,
  it ends the crisis wherever it was). An Update that announces the end of the threat is a cancel
  too: when every chosen ``<info>`` has ``responseType`` AllClear (CAP 1.2 §3.2.2: "the subject event
  no longer poses a threat"), or when the alert carries NWS VTEC codes and every one of them has
  the action CAN (cancelled) or EXP (expired). This is how the NWS "Tsunami Cancellation", sent
  as msgType Update with ``/O.CAN.../`` VTEC, becomes the cancel it is. Ack and Error messages are
  rejected (they are not alerts).
- ``status`` Actual reaches citizens. Exercise, Test and Draft are rejected unless
  ``ctx.exercise_mode``, in which case the event carries that status; System is always rejected.
- Several ``<info>`` blocks in several languages make one event: the language chosen is
  ``ctx.language`` when present (exact tag, then the primary subtag), else English, else the first;
  every ``<info>`` in that language contributes its areas, the most severe severity wins.

Areas, through :mod:`pipeline.domain.geometry` (lat,lon converted to lon,lat there, invalid rings
repaired, antimeridian split): every ``<polygon>`` and ``<circle>`` of every ``<area>`` of the
chosen infos, united. Radius-0 circles get ``geometry.MIN_CIRCLE_RADIUS_KM``. An area with only
geocodes is resolved when a geocode names a country (ISO 3166-1 alpha-2 or alpha-3, NUTS level 0);
otherwise it stays unmapped and a note says so: an alert with no mappable area is kept with
geometry null, never given an invented one. ISO 3166-2, NUTS 1-3, EMMA and FIPS6/SAME codes
contribute the country they lie in to ``country_codes``.

Coordinate order plausibility (Krisinformation.se publishes ``lon,lat`` circles). For each polygon
or circle, its mean point is tested against the countries the alert itself points to: ISO 3166
geocodes, NUTS/EMMA prefixes, and the country-code top-level domain of the sender or Atom author
(``krisinformation.se`` -> SE, ``rfs.nsw.gov.au`` -> AU). When the point as published lies more than
:data:`SWAP_TOLERANCE_DEG` from all of them while the swapped point lies within it, the pair is read
as lon,lat and swapped, with a note. When neither reading fits, the published order is kept and
noted. Without any country hint nothing is swapped, unless the published latitude is impossible
(``|lat| > 90``) and the swapped reading is possible. A crisis is thus never moved to another
hemisphere silently, and never moved without evidence.
"""

from __future__ import annotations

import hashlib
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from typing import Any, Literal, cast

import shapely
from shapely.geometry import Point
from shapely.geometry.base import BaseGeometry

from pipeline.domain import countries, geometry
from pipeline.domain.feeds import xmlsafe
from pipeline.domain.feeds.base import FeedError, ParseContext, ParseResult, Rejection, Skipped
from schemas import Crisis
from schemas.models import SEVERITY_RANK, Certainty, Severity, Urgency

CAP_NAMESPACE_PREFIX = "urn:oasis:names:tc:emergency:cap:"
# A mean point this far (degrees) from every hinted country does not belong to the alert (see module doc).
SWAP_TOLERANCE_DEG = 0.5
# Proximity band around a CAP area: the authority drew the area; people just outside get a "near" heads-up.
CAP_BUFFER_KM = 5.0
DEFAULT_LANGUAGE = "en-US"  # CAP 1.2 §3.2.1: <language> defaults to en-US

_CATEGORIES = frozenset({"geo", "met", "safety", "security", "rescue", "fire", "health", "env", "transport",
                         "infra", "cbrne", "other"})
_SEVERITIES: frozenset[str] = frozenset({"minor", "moderate", "severe", "extreme", "unknown"})
_URGENCIES: frozenset[str] = frozenset({"immediate", "expected", "future", "past", "unknown"})
_CERTAINTIES: frozenset[str] = frozenset({"observed", "likely", "possible", "unlikely", "unknown"})
_NON_ACTUAL = frozenset({"exercise", "test", "draft"})
_CRISIS_ID_PART = re.compile(r"[^A-Za-z0-9._:@/-]+")
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_PAIR = re.compile(rf"({_NUMBER})\s*,\s*({_NUMBER})")
_CIRCLE = re.compile(rf"^\s*({_NUMBER})\s*,\s*({_NUMBER})\s+({_NUMBER})\s*$")
_VTEC_ACTION = re.compile(r"/[OTEX]\.([A-Z]{3})\.")
_NUTS_COUNTRY_FIX = {"EL": "GR", "UK": "GB"}  # NUTS and EMMA use EL for Greece and UK for the United Kingdom


# ---- intermediate form ------------------------------------------------------------------------


@dataclass(slots=True)
class _Area:
    desc: str = ""
    polygons: list[str] = field(default_factory=list)
    circles: list[str] = field(default_factory=list)
    geocodes: list[tuple[str, str]] = field(default_factory=list)


@dataclass(slots=True)
class _Info:
    language: str = DEFAULT_LANGUAGE
    category: str = ""
    event: str = ""
    response_types: list[str] = field(default_factory=list)
    urgency: str = ""
    severity: str = ""
    certainty: str = ""
    effective: str = ""
    expires: str = ""
    headline: str = ""
    description: str = ""
    instruction: str = ""
    web: str = ""
    parameters: list[tuple[str, str]] = field(default_factory=list)
    areas: list[_Area] = field(default_factory=list)


@dataclass(slots=True)
class _Alert:
    item_ref: str
    identifier: str
    sender: str
    sent: str
    status: str
    msg_type: str
    references: list[str] = field(default_factory=list)
    infos: list[_Info] = field(default_factory=list)
    fallback_url: str = ""
    fallback_title: str = ""
    country_hints: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)


# ---- entry point ------------------------------------------------------------------------------


def parse(data: bytes, ctx: ParseContext) -> ParseResult:
    root = xmlsafe.parse_xml(data, max_bytes=ctx.max_bytes)
    skipped: list[Skipped] = []
    alerts = _read_document(root, skipped)
    events: list[Crisis] = []
    rejected: list[Rejection] = []
    notes: list[str] = []
    for alert in alerts:
        outcome = _to_crisis(alert, ctx)
        notes.extend(alert.notes)
        if isinstance(outcome, Rejection):
            rejected.append(outcome)
        else:
            events.append(outcome)
    return ParseResult(events=tuple(events), rejected=tuple(rejected), notes=tuple(notes), skipped=tuple(skipped))


# ---- reading the XML --------------------------------------------------------------------------


def _read_document(root: ET.Element, skipped: list[Skipped]) -> list[_Alert]:
    name = xmlsafe.local_name(root.tag)
    if name == "alert":
        return [_read_alert(root, "alert")]
    if name == "EDXLDistribution":
        hints = {_country_of_subdivision(xmlsafe.text(s)) for s in xmlsafe.descendants(root, "subdivision")}
        hints |= {_iso2(xmlsafe.text(c)) for c in xmlsafe.descendants(root, "country")}
        alerts = [_read_alert(a, f"alert #{i + 1}") for i, a in enumerate(xmlsafe.descendants(root, "alert"))]
        if not alerts:
            raise FeedError("EDXL-DE envelope without any CAP alert")
        for alert in alerts:
            alert.country_hints |= {h for h in hints if h}
        return alerts
    if name in ("feed", "rss", "RDF"):
        return _read_feed(root, skipped)
    raise FeedError(f"not a CAP document: root element <{name}>")


def _read_alert(element: ET.Element, position: str) -> _Alert:
    identifier = xmlsafe.text(element, "identifier")
    sender = xmlsafe.text(element, "sender")
    alert = _Alert(
        item_ref=identifier or position, identifier=identifier, sender=sender, sent=xmlsafe.text(element, "sent"),
        status=xmlsafe.text(element, "status"), msg_type=xmlsafe.text(element, "msgType"),
        references=xmlsafe.text(element, "references").split(),
        infos=[_read_info(i) for i in xmlsafe.children(element, "info")])
    alert.country_hints |= _tld_country(sender)
    return alert


def _read_info(element: ET.Element) -> _Info:
    return _Info(
        language=xmlsafe.text(element, "language") or DEFAULT_LANGUAGE,
        category=xmlsafe.text(element, "category"),
        event=xmlsafe.text(element, "event"),
        response_types=[xmlsafe.text(r) for r in xmlsafe.children(element, "responseType")],
        urgency=xmlsafe.text(element, "urgency"), severity=xmlsafe.text(element, "severity"),
        certainty=xmlsafe.text(element, "certainty"), effective=xmlsafe.text(element, "effective"),
        expires=xmlsafe.text(element, "expires"), headline=xmlsafe.text(element, "headline"),
        description=xmlsafe.text(element, "description"), instruction=xmlsafe.text(element, "instruction"),
        web=xmlsafe.text(element, "web"),
        parameters=[(xmlsafe.text(p, "valueName"), xmlsafe.text(p, "value")) for p in xmlsafe.children(element, "parameter")],
        areas=[_read_area(a) for a in xmlsafe.children(element, "area")])


def _read_area(element: ET.Element) -> _Area:
    return _Area(
        desc=xmlsafe.text(element, "areaDesc"),
        polygons=[xmlsafe.text(p) for p in xmlsafe.children(element, "polygon")],
        circles=[xmlsafe.text(c) for c in xmlsafe.children(element, "circle")],
        geocodes=[(xmlsafe.text(g, "valueName"), xmlsafe.text(g, "value")) for g in xmlsafe.children(element, "geocode")])


def _is_cap(element: ET.Element) -> bool:
    return xmlsafe.namespace(element.tag).startswith(CAP_NAMESPACE_PREFIX)


def _cap_text(entry: ET.Element, name: str) -> str:
    found = next((c for c in entry if _is_cap(c) and xmlsafe.local_name(c.tag) == name), None)
    return xmlsafe.text(found)


def _author(element: ET.Element) -> str:
    author = xmlsafe.child(element, "author")
    if author is None:
        return ""
    return xmlsafe.text(author, "name") or xmlsafe.text(author)


def _entry_link(entry: ET.Element) -> str:
    links = [(link.get("type", ""), link.get("rel", "alternate"), link.get("href", "") or xmlsafe.text(link))
             for link in xmlsafe.children(entry, "link")]
    cap_link = next((href for kind, _rel, href in links if kind == "application/cap+xml" and href), "")
    return cap_link or next((href for _kind, rel, href in links if rel == "alternate" and href), "")


def _read_feed(root: ET.Element, skipped: list[Skipped]) -> list[_Alert]:
    """The alerts a feed's entries carry; an entry without CAP content is counted in ``skipped``: one
    that links to a CAP document is an index entry (the alert is elsewhere), any other is news."""
    channel = xmlsafe.child(root, "channel")
    container = channel if channel is not None else root
    feed_author = _author(container) or xmlsafe.text(container, "managingEditor")
    entries = [e for e in container if xmlsafe.local_name(e.tag) in ("entry", "item")]
    if xmlsafe.local_name(root.tag) == "RDF":
        entries += xmlsafe.children(root, "item")
    alerts: list[_Alert] = []
    by_identity: dict[tuple[str, str], _Alert] = {}
    for index, entry in enumerate(entries):
        embedded = next(xmlsafe.descendants(entry, "alert"), None)
        if embedded is not None and _is_cap(embedded):
            alert = _read_alert(embedded, f"entry #{index + 1}")
            alert.fallback_url = alert.fallback_url or _entry_link(entry)
            alerts.append(alert)
            continue
        if not any(_is_cap(c) for c in entry.iter()):
            ref = xmlsafe.text(entry, "id") or xmlsafe.text(entry, "guid") or _entry_link(entry) or f"entry #{index + 1}"
            links_cap = any(link.get("type", "") == "application/cap+xml" for link in xmlsafe.children(entry, "link"))
            skipped.append(Skipped(ref, "link_only" if links_cap else "no_hazard"))
            continue
        alert = _read_inline_entry(entry, index, feed_author)
        key = (alert.sender, alert.identifier)
        if key in by_identity:  # MeteoAlarm: one entry per area of the same alert
            by_identity[key].infos[0].areas.extend(alert.infos[0].areas)
            by_identity[key].country_hints |= alert.country_hints
            continue
        by_identity[key] = alert
        alerts.append(alert)
    if entries and not alerts and not any(s.reason == "link_only" for s in skipped):
        raise FeedError(f"feed of {len(entries)} entries without any CAP content: not a CAP feed")
    return alerts


def _read_inline_entry(entry: ET.Element, index: int, feed_author: str) -> _Alert:
    entry_id = xmlsafe.text(entry, "id") or xmlsafe.text(entry, "guid") or xmlsafe.text(entry, "link")
    identifier = _cap_text(entry, "identifier") or entry_id or f"entry-{index + 1}"
    sender = _cap_text(entry, "sender") or _author(entry) or feed_author
    sent = (_cap_text(entry, "sent") or xmlsafe.text(entry, "updated") or xmlsafe.text(entry, "published")
            or xmlsafe.text(entry, "pubDate"))
    status = _cap_text(entry, "status")
    msg_type = _cap_text(entry, "msgType") or _cap_text(entry, "message_type")
    alert = _Alert(item_ref=identifier, identifier=identifier, sender=sender, sent=sent, status=status or "Actual",
                   msg_type=msg_type or "Alert", references=_cap_text(entry, "references").split(),
                   fallback_url=_entry_link(entry), fallback_title=xmlsafe.text(entry, "title"))
    if not status:
        alert.notes.append(f"{identifier}: Atom entry without cap:status, taken as Actual")
    areas = [_read_area(a) for a in entry if _is_cap(a) and xmlsafe.local_name(a.tag) == "area"]
    direct = _Area(
        desc=_cap_text(entry, "areaDesc"),
        polygons=[xmlsafe.text(p) for p in entry if _is_cap(p) and xmlsafe.local_name(p.tag) == "polygon"],
        circles=[xmlsafe.text(c) for c in entry if _is_cap(c) and xmlsafe.local_name(c.tag) == "circle"],
        geocodes=[(xmlsafe.text(g, "valueName"), xmlsafe.text(g, "value"))
                  for g in entry if _is_cap(g) and xmlsafe.local_name(g.tag) == "geocode"])
    if direct.desc or direct.polygons or direct.circles or direct.geocodes:
        areas.append(direct)
    # No CAP default here: an Atom entry without a language is of unknown language, not en-US.
    language = _cap_text(entry, "language") or entry.get("{http://www.w3.org/XML/1998/namespace}lang", "")
    alert.infos.append(_Info(
        language=language, category=_cap_text(entry, "category"), event=_cap_text(entry, "event"),
        response_types=[t for t in [_cap_text(entry, "responseType")] if t],
        urgency=_cap_text(entry, "urgency"), severity=_cap_text(entry, "severity"),
        certainty=_cap_text(entry, "certainty"), effective=_cap_text(entry, "effective"),
        expires=_cap_text(entry, "expires"), headline=_cap_text(entry, "headline") or alert.fallback_title,
        description=_cap_text(entry, "description") or xmlsafe.text(entry, "summary"),
        instruction=_cap_text(entry, "instruction"), web=_cap_text(entry, "web"), areas=areas))
    alert.country_hints |= _tld_country(sender)
    return alert


# ---- building the crisis ----------------------------------------------------------------------


def _to_crisis(alert: _Alert, ctx: ParseContext) -> Crisis | Rejection:
    ref = alert.item_ref
    msg_type = alert.msg_type.strip().lower()
    if msg_type not in ("alert", "update", "cancel"):
        return Rejection(ref, f"msgType {alert.msg_type or '(missing)'!r} is not an alert, update or cancel")
    status = alert.status.strip().lower()
    if status == "system":
        return Rejection(ref, "status System: a system message, never for citizens")
    if status in _NON_ACTUAL and not ctx.exercise_mode:
        return Rejection(ref, f"status {alert.status}: not an actual alert (exercise mode is off)")
    if status != "actual" and status not in _NON_ACTUAL:
        return Rejection(ref, f"unknown status {alert.status or '(missing)'!r}")
    if not alert.identifier or not alert.sender:
        return Rejection(ref, "alert without identifier or sender")
    sent = _time(alert.sent)
    if sent is None:
        return Rejection(ref, f"sent {alert.sent or '(missing)'!r} is not a date-time with an offset")
    version = int(sent.timestamp())
    if version < 1:
        return Rejection(ref, f"sent {alert.sent!r} is before 1970")

    original = _original(alert)
    if msg_type in ("update", "cancel") and not alert.references:
        alert.notes.append(f"{ref}: {alert.msg_type} without references; treated as its own original")
    crisis_id = _crisis_id(*original)
    infos = _chosen_infos(alert.infos, ctx.language)
    primary = infos[0] if infos else _Info(language="")
    op: Literal["upsert", "cancel"] = "cancel" if msg_type == "cancel" else "upsert"
    if msg_type == "update" and (_announces_end(infos) or _over_on_arrival(infos, sent)):
        op = "cancel"
        alert.notes.append(f"{ref}: update announces the end of the threat (AllClear, VTEC CAN/EXP, or expiring "
                           "as it takes effect); emitted as cancel")
    elif msg_type == "alert" and _over_on_arrival(infos, sent):
        return Rejection(ref, "alert expires before it takes effect")
    if op == "upsert" and not infos:
        return Rejection(ref, f"{alert.msg_type} without any <info>: nothing to alert")

    area: dict[str, Any] | None = None
    hinted: set[str] = set()
    if op == "upsert":
        outcome = _geometry(alert, infos)
        if isinstance(outcome, Rejection):
            return outcome
        area, hinted = outcome
    codes = set(hinted)
    if area is not None:
        codes |= set(countries.countries_for(area))

    effective = _time(primary.effective) or sent
    expiries = [e for e in (_time(i.expires) for i in infos) if e is not None]
    expires = max(expiries) if expiries and len(expiries) == len(infos) else None  # no expiry if any info has none
    severity = max((_enum(i.severity, _SEVERITIES) for i in infos), key=lambda s: SEVERITY_RANK[s], default="unknown")
    title = primary.headline or primary.event or alert.fallback_title or (
        f"Cancellation of {original[1]}" if op == "cancel" else alert.identifier)
    return Crisis(
        crisis_id=crisis_id, op=op, version=version, source="cap",
        source_ref=f"{alert.sender},{alert.identifier},{alert.sent}"[:1024],
        title=_clip(title, 500), category=_category(primary.category),
        severity=cast(Severity, severity), urgency=cast(Urgency, _enum(primary.urgency, _URGENCIES)),
        certainty=cast(Certainty, _certainty(primary.certainty)), geometry=area,
        buffer_km=CAP_BUFFER_KM if area is not None else 0.0,
        country_codes=tuple(sorted(c for c in codes if re.fullmatch(r"[A-Z]{2}", c))),
        effective=effective, expires=expires,
        instruction=_clip(primary.instruction, 5000), url=_clip(primary.web or alert.fallback_url, 2048),
        references=tuple(r[:1024] for r in alert.references),
        language=primary.language[:35] or None, status=status)


def _original(alert: _Alert) -> tuple[str, str]:
    """(sender, identifier) of the alert this one descends from: the first reference, else itself."""
    for reference in alert.references:
        parts = reference.split(",")
        if len(parts) >= 2 and parts[0] and parts[1]:
            return parts[0], parts[1]
        alert.notes.append(f"{alert.item_ref}: malformed reference {reference!r} ignored")
    return alert.sender, alert.identifier


def _crisis_id(sender: str, identifier: str) -> str:
    def part(text: str) -> str:
        text = re.sub(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", "", text.strip()).strip("/")
        return _CRISIS_ID_PART.sub("-", text).strip("-") or "x"

    crisis_id = f"cap:{part(sender)}:{part(identifier)}"
    if len(crisis_id) > 128:
        digest = hashlib.sha256(f"{sender}\n{identifier}".encode()).hexdigest()[:32]
        crisis_id = f"cap:{part(sender)[:60]}:{digest}"
    return crisis_id


def _chosen_infos(infos: Sequence[_Info], preferred: str | None) -> list[_Info]:
    """The info blocks in the chosen language (see the module doc), in document order."""
    if not infos:
        return []
    languages = [i.language.strip().lower() for i in infos]

    def pick(tag: str) -> str | None:
        tag = tag.strip().lower()
        if tag in languages:
            return tag
        primary = tag.split("-")[0]
        return next((lang for lang in languages if lang.split("-")[0] == primary), None)

    chosen = (pick(preferred) if preferred else None) or pick("en") or languages[0]
    return [info for info, lang in zip(infos, languages, strict=True) if lang == chosen]


def _announces_end(infos: Sequence[_Info]) -> bool:
    if not infos:
        return False
    if all(any(r.strip().lower() == "allclear" for r in i.response_types) for i in infos):
        return True
    actions = [m.group(1) for i in infos for name, value in i.parameters if name.strip().upper() == "VTEC"
               for m in _VTEC_ACTION.finditer(value)]
    return bool(actions) and all(a in ("CAN", "EXP") for a in actions)


def _over_on_arrival(infos: Sequence[_Info], sent: datetime) -> bool:
    """Every info expires no later than it takes effect (Météo-France ends a warning this way)."""
    if not infos:
        return False
    for info in infos:
        expires, effective = _time(info.expires), _time(info.effective) or sent
        if expires is None or expires > effective:
            return False
    return True


def _geometry(alert: _Alert, infos: Sequence[_Info]) -> tuple[dict[str, Any] | None, set[str]] | Rejection:
    """The united area of the chosen infos (or None), plus countries named by geocodes."""
    ref = alert.item_ref
    parts: list[dict[str, Any]] = []
    failures: list[str] = []
    unmapped: list[str] = []
    hinted: set[str] = set()
    for info in infos:
        for area in info.areas:
            label = area.desc or "(no areaDesc)"
            area_codes, country_parts = _read_geocodes(area.geocodes)
            hinted |= area_codes
            expected = frozenset(alert.country_hints | area_codes)
            shapes = 0
            for text in area.polygons:
                pairs = [(float(a), float(b)) for a, b in _PAIR.findall(text)]
                if not pairs:
                    if text:
                        failures.append(f"area {label!r}: polygon without coordinates")
                    continue
                pairs = _oriented(pairs, expected, alert, label)
                shapes += 1
                try:
                    parts.append(geometry.polygon_from_latlon(pairs))
                except geometry.GeometryError as exc:
                    failures.append(f"area {label!r}: polygon refused: {exc}")
            for text in area.circles:
                match = _CIRCLE.match(text)
                if match is None:
                    failures.append(f"area {label!r}: circle {text[:60]!r} is not 'lat,lon radius'")
                    continue
                lat, lon, radius = (float(g) for g in match.groups())
                [(lat, lon)] = _oriented([(lat, lon)], expected, alert, label)
                shapes += 1
                try:
                    parts.append(geometry.circle(lat, lon, radius))
                except geometry.GeometryError as exc:
                    failures.append(f"area {label!r}: circle refused: {exc}")
            if shapes == 0:
                if country_parts:
                    parts.extend(country_parts)
                else:
                    codes = ", ".join(f"{n} {v}" for n, v in area.geocodes) or "no geocode"
                    unmapped.append(f"{label} ({codes[:200]})")
    for failure in failures:
        alert.notes.append(f"{ref}: {failure}")
    if unmapped:
        alert.notes.append(f"{ref}: {len(unmapped)} area(s) given only by geocodes that name no country, "
                           f"left without geometry: {'; '.join(unmapped)[:500]}")
    if not parts:
        if failures:
            return Rejection(ref, f"no usable area: {failures[0]}")
        return None, hinted
    try:
        return geometry.union(parts), hinted
    except geometry.GeometryError as exc:
        return Rejection(ref, f"area refused: {exc}")


def _read_geocodes(geocodes: Iterable[tuple[str, str]]) -> tuple[set[str], list[dict[str, Any]]]:
    """Countries the geocodes lie in, and the areas of those geocodes that name a whole country."""
    hinted: set[str] = set()
    whole: list[dict[str, Any]] = []
    for raw_name, raw_value in geocodes:
        name = raw_name.strip().upper().replace(" ", "").replace("_", "")
        value = raw_value.strip().upper()
        if not value:
            continue
        iso2: str | None = None
        is_country = False
        if "3166-2" in name:
            iso2 = _country_of_subdivision(value)
        elif "3166" in name or name in ("ISO2", "ISO3", "COUNTRY", "COUNTRYCODE"):
            iso2, is_country = _iso2(value), True
        elif name.startswith("NUTS") or name.startswith("EMMA"):
            iso2 = _NUTS_COUNTRY_FIX.get(value[:2], value[:2])
            is_country = name.startswith("NUTS") and len(value) == 2
        elif name in ("FIPS6", "SAME"):
            iso2 = "US"  # FIPS 6-4 county codes and SAME locations are US federal codes
        if iso2 is None:
            continue
        hinted.add(iso2)
        if is_country:
            found = countries.country_geometry(iso2)
            if found is not None:
                whole.append(found)
    return hinted, whole


def _iso2(value: str) -> str | None:
    value = value.strip().upper()
    if re.fullmatch(r"[A-Z]{2}", value):
        return value
    if re.fullmatch(r"[A-Z]{3}", value):
        return countries.iso2_from_iso3(value)
    return None


def _country_of_subdivision(value: str) -> str | None:
    head = value.strip().upper().split("-", 1)[0]
    return head if re.fullmatch(r"[A-Z]{2}", head) else None


def _tld_country(sender: str) -> set[str]:
    """The country of a sender's country-code top-level domain (``x@met.ie`` -> IE), if it has one."""
    host = sender.rsplit("@", 1)[-1]
    host = re.sub(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", "", host).split("/", 1)[0].rstrip(".")
    if "." not in host:
        return set()
    tld = host.rsplit(".", 1)[-1].upper()
    if not re.fullmatch(r"[A-Z]{2}", tld):
        return set()
    tld = _NUTS_COUNTRY_FIX.get(tld, tld)
    return {tld} if countries.country(tld) is not None else set()


@cache
def _hinted_area(codes: frozenset[str]) -> BaseGeometry | None:
    shapes = [shapely.geometry.shape(g) for c in sorted(codes) for g in [countries.country_geometry(c)] if g]
    return shapely.union_all(shapes) if shapes else None


def _oriented(pairs: list[tuple[float, float]], expected: frozenset[str], alert: _Alert,
              label: str) -> list[tuple[float, float]]:
    """``pairs`` as lat,lon: swapped when the published order is implausible (rule in the module doc)."""
    lat = sum(p[0] for p in pairs) / len(pairs)
    lon = sum(p[1] for p in pairs) / len(pairs)
    swapped = [(b, a) for a, b in pairs]
    swapped_possible = abs(lon) <= 90.0 and abs(lat) <= 180.0
    if abs(lat) > 90.0:
        if swapped_possible:
            alert.notes.append(f"{alert.item_ref}: area {label!r}: latitude {lat:.4f} is impossible; "
                               "coordinates read as lon,lat and swapped")
            return swapped
        return pairs
    hinted = _hinted_area(expected) if expected else None
    if hinted is None:
        return pairs
    if Point(lon, lat).distance(hinted) <= SWAP_TOLERANCE_DEG:
        return pairs
    where = ", ".join(sorted(expected))
    if swapped_possible and Point(lat, lon).distance(hinted) <= SWAP_TOLERANCE_DEG:
        alert.notes.append(f"{alert.item_ref}: area {label!r}: {lat:.4f},{lon:.4f} lies outside {where} but the "
                           f"swapped point lies inside; coordinates read as lon,lat and swapped")
        return swapped
    alert.notes.append(f"{alert.item_ref}: area {label!r}: {lat:.4f},{lon:.4f} lies outside {where} "
                       "in either coordinate order; kept as published")
    return pairs


# ---- small conversions ------------------------------------------------------------------------


def _time(text: str) -> datetime | None:
    text = text.strip()
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def _enum(value: str, allowed: frozenset[str]) -> str:
    low = value.strip().lower()
    return low if low in allowed else "unknown"


def _certainty(value: str) -> str:
    low = value.strip().lower()
    return "likely" if low == "very likely" else _enum(low, _CERTAINTIES)  # "Very Likely" is CAP 1.0


def _category(value: str) -> str:
    low = value.strip().lower()
    return low if low in _CATEGORIES else "other"


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split()) if limit <= 500 else text.strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"
