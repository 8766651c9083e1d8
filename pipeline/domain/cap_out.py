"""The ministry's crises as OASIS CAP 1.2 alerts, and an Atom feed of them: pure XML building, no I/O.

Other agencies and aggregators read CAP, not ``crisis/1``; so each stored version of a crisis is
also a CAP alert. Everything here is deterministic in its inputs (the versions of a crisis as
PostgreSQL recorded them, the sender, the time), so a version always gives the same document,
byte for byte: an aggregator polling twice sees the same identifier and the same content.

Mapping (CAP 1.2 §3):

- ``identifier`` = ``<sender>:<crisis_id>:<version>`` (characters CAP forbids in it — spaces,
  commas, ``<`` and ``&`` — replaced by ``_``); ``sent`` = when the version was recorded, in UTC
  written ``-00:00`` as CAP requires (no ``Z``, no fractions);
- ``status`` from the crisis status (Actual, Exercise, Test, Draft); ``scope`` Public;
- ``msgType`` Alert for the first version, Update for later ones, Cancel for ``op: cancel``.
  Update and Cancel carry ``<references>`` naming the FIRST version, then the previous one: a
  CAP reader (ours, :mod:`pipeline.domain.feeds.cap`, among them) takes the first reference as
  the original alert, so every version of a crisis lands on one crisis there too;
- two ``<info>`` blocks, ``id-ID`` then ``en-US``, with the CAP enumerations capitalised
  (``Unknown`` where unknown), event names and fixed texts in each language. Title and
  instruction are the operator's words in both (we have no translation), except the operator
  defaults, which are known texts and are translated. A Cancel describes the version it ends
  (responseType AllClear, urgency Past), or has no ``<info>`` when nothing was ever declared;
- ``<area>``: ``areaDesc`` the countries' names, one ``<polygon>`` per polygon exterior in CAP's
  ``lat,lon`` order (first point = last point), and a ``geocode`` ISO3166-1 per country code.
  CAP polygons have no holes: a hole is left out, so the published area covers it — wider
  rather than narrower, the safe side for a warning.
"""

from __future__ import annotations

import re
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from pipeline.domain import countries
from schemas import Crisis

CAP_NS: Final = "urn:oasis:names:tc:emergency:cap:1.2"
ATOM_NS: Final = "http://www.w3.org/2005/Atom"
CAP_MEDIA_TYPE: Final = "application/cap+xml"
ATOM_MEDIA_TYPE: Final = "application/atom+xml"
LANGUAGES: Final = ("id-ID", "en-US")

_CATEGORIES: Final = {"geo": "Geo", "met": "Met", "safety": "Safety", "security": "Security", "rescue": "Rescue",
                      "fire": "Fire", "health": "Health", "env": "Env", "transport": "Transport", "infra": "Infra",
                      "cbrne": "CBRNE", "other": "Other"}
_STATUSES: Final = {"actual": "Actual", "exercise": "Exercise", "test": "Test", "draft": "Draft"}
_URGENCIES: Final = frozenset({"Immediate", "Expected", "Future", "Past", "Unknown"})
_SEVERITIES: Final = frozenset({"Extreme", "Severe", "Moderate", "Minor", "Unknown"})
_CERTAINTIES: Final = frozenset({"Observed", "Likely", "Possible", "Unlikely", "Unknown"})

# Event names per CAP category, in Indonesian and English.
EVENTS: Final[Mapping[str, Mapping[str, str]]] = {
    "id-ID": {"Geo": "Bencana geologi", "Met": "Cuaca ekstrem", "Safety": "Ancaman keselamatan",
              "Security": "Ancaman keamanan", "Rescue": "Operasi penyelamatan", "Fire": "Kebakaran",
              "Health": "Darurat kesehatan", "Env": "Bencana lingkungan", "Transport": "Gangguan transportasi",
              "Infra": "Gangguan infrastruktur", "CBRNE": "Bahaya kimia, biologi, radiologi, nuklir atau bahan peledak",
              "Other": "Krisis"},
    "en-US": {"Geo": "Geological hazard", "Met": "Severe weather", "Safety": "Safety threat",
              "Security": "Security threat", "Rescue": "Rescue operation", "Fire": "Fire",
              "Health": "Health emergency", "Env": "Environmental hazard", "Transport": "Transport disruption",
              "Infra": "Infrastructure failure", "CBRNE": "Chemical, biological, radiological, nuclear or explosive hazard",
              "Other": "Crisis"},
}
DEFAULT_INSTRUCTION: Final = {"id-ID": "Ikuti arahan otoritas setempat.",
                              "en-US": "Follow the instructions of local authorities."}
CANCELLED: Final = {"id-ID": "Dibatalkan", "en-US": "Cancelled"}
CRISIS_AREA: Final = {"id-ID": "Wilayah krisis", "en-US": "Crisis area"}
SENDER_NAME: Final = {"id-ID": "crisiswatch", "en-US": "crisiswatch"}
# Texts the ingest API fills in for an operator (producers.api.OPERATOR_DEFAULTS), known and so translated.
KNOWN_TEXTS: Final[Mapping[str, str]] = {
    "Follow the instructions of local authorities and reply to tell us whether you are safe.":
        "Ikuti arahan otoritas setempat dan balas untuk memberi tahu kami apakah Anda aman.",
    "Crisis declared by operator": "Krisis dinyatakan oleh operator",
}

_UNRESERVED: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_NOT_IN_IDENTIFIER = re.compile(r"[\s,<&]")
# XML 1.0 forbids these characters even escaped; a title carrying one would make the document unreadable.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


@dataclass(frozen=True, slots=True)
class Published:
    """One stored version of a crisis and when it was recorded (the alert's ``sent``)."""

    crisis: Crisis
    sent: datetime


# ---- CAP ------------------------------------------------------------------------------------------


def cap_time(when: datetime) -> str:
    """CAP's date-time: whole seconds, UTC written ``-00:00`` (CAP 1.2 §3.3.2: no ``Z``)."""
    if when.tzinfo is None:
        raise ValueError("a CAP time needs a timezone")
    return when.astimezone(UTC).replace(microsecond=0, tzinfo=None).isoformat() + "-00:00"


def identifier(sender: str, crisis_id: str, version: int) -> str:
    return _NOT_IN_IDENTIFIER.sub("_", f"{sender}:{crisis_id}:{version}")


def reference(sender: str, version: Published) -> str:
    """CAP's reference form ``sender,identifier,sent``."""
    clean_sender = _NOT_IN_IDENTIFIER.sub("_", sender)
    return f"{clean_sender},{identifier(sender, version.crisis.crisis_id, version.crisis.version)},{cap_time(version.sent)}"


def msg_type(versions: Sequence[Published]) -> str:
    if versions[-1].crisis.op == "cancel":
        return "Cancel"
    return "Alert" if len(versions) == 1 else "Update"


def cap_alert(versions: Sequence[Published], sender: str) -> bytes:
    """The CAP 1.2 alert of the LAST of ``versions`` (all versions of one crisis, oldest first)."""
    if not versions:
        raise ValueError("a crisis with no version has no alert")
    ordered = sorted(versions, key=lambda v: v.crisis.version)
    if len({v.crisis.crisis_id for v in ordered}) != 1:
        raise ValueError("versions of more than one crisis")
    current = ordered[-1]
    crisis = current.crisis
    kind = msg_type(ordered)
    alert = ET.Element("alert", xmlns=CAP_NS)
    _add(alert, "identifier", identifier(sender, crisis.crisis_id, crisis.version))
    _add(alert, "sender", _NOT_IN_IDENTIFIER.sub("_", sender))
    _add(alert, "sent", cap_time(current.sent))
    _add(alert, "status", _STATUSES.get(crisis.status, "Actual"))
    _add(alert, "msgType", kind)
    _add(alert, "scope", "Public")
    earlier = [ordered[0], ordered[-2]] if len(ordered) > 1 else []
    refs = list(dict.fromkeys(reference(sender, v) for v in earlier))
    if refs:
        _add(alert, "references", " ".join(refs))
    if kind == "Cancel":
        described = next((v.crisis for v in reversed(ordered) if v.crisis.op == "upsert"), None)
        if described is not None:
            for language in LANGUAGES:
                _info(alert, described, language, cancelled_at=crisis.effective)
    else:
        for language in LANGUAGES:
            _info(alert, crisis, language)
    return _serialise(alert)


def _info(alert: ET.Element, crisis: Crisis, language: str, cancelled_at: datetime | None = None) -> None:
    info = _add(alert, "info")
    _add(info, "language", language)
    category = _CATEGORIES.get(crisis.category, "Other")
    _add(info, "category", category)
    _add(info, "event", EVENTS[language][category])
    if cancelled_at is not None:
        _add(info, "responseType", "AllClear")
    _add(info, "urgency", "Past" if cancelled_at is not None else _enum(crisis.urgency, _URGENCIES))
    _add(info, "severity", _enum(crisis.severity, _SEVERITIES))
    _add(info, "certainty", _enum(crisis.certainty, _CERTAINTIES))
    _add(info, "effective", cap_time(cancelled_at or crisis.effective))
    if crisis.expires is not None and cancelled_at is None:
        _add(info, "expires", cap_time(crisis.expires))
    _add(info, "senderName", SENDER_NAME[language])
    title = _translated(crisis.title, language) or EVENTS[language][category]
    _add(info, "headline", f"{CANCELLED[language]}: {title}" if cancelled_at is not None else title)
    _add(info, "instruction", _translated(crisis.instruction, language) or DEFAULT_INSTRUCTION[language])
    if crisis.url.strip():
        _add(info, "web", crisis.url.strip())
    _area(info, crisis, language)


def _area(info: ET.Element, crisis: Crisis, language: str) -> None:
    polygons = exteriors(crisis.geometry) if crisis.geometry is not None else []
    if not polygons and not crisis.country_codes:
        return
    area = _add(info, "area")
    names = [c.name if (c := countries.country(code)) is not None else code for code in crisis.country_codes]
    _add(area, "areaDesc", ", ".join(names) or CRISIS_AREA[language])
    for ring in polygons:
        _add(area, "polygon", " ".join(f"{_number(lat)},{_number(lon)}" for lon, lat in ring))
    for code in crisis.country_codes:
        geocode = _add(area, "geocode")
        _add(geocode, "valueName", "ISO3166-1")
        _add(geocode, "value", code)


def exteriors(geometry: Mapping[str, Any]) -> list[list[tuple[float, float]]]:
    """The exterior ring of each polygon of a GeoJSON Polygon or MultiPolygon, as closed (lon, lat) lists."""
    kind = geometry.get("type")
    coordinates = geometry.get("coordinates") or []
    polygons = [coordinates] if kind == "Polygon" else list(coordinates) if kind == "MultiPolygon" else []
    rings: list[list[tuple[float, float]]] = []
    for polygon in polygons:
        if not polygon:
            continue
        ring = [(float(p[0]), float(p[1])) for p in polygon[0]]
        if ring and ring[0] != ring[-1]:
            ring.append(ring[0])
        if len(ring) >= 4:
            rings.append(ring)
    return rings


def _translated(text: str, language: str) -> str:
    text = text.strip()
    return KNOWN_TEXTS.get(text, text) if language == "id-ID" else text


def _enum(value: str, allowed: frozenset[str]) -> str:
    word = value.strip().capitalize()
    return word if word in allowed else "Unknown"


def _number(value: float) -> str:
    """Plain decimal (never ``1e-05``), to 7 places (about a centimetre)."""
    text = f"{value:.7f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _serialise(root: ET.Element) -> bytes:
    """The root carries its namespace as a plain ``xmlns`` attribute and every element is unqualified,
    so the document uses one default namespace and no prefixes (what CAP and Atom readers expect)."""
    out: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return out


def _add(parent: ET.Element, name: str, text: str | None = None) -> ET.Element:
    element = ET.SubElement(parent, name)
    if text is not None:
        element.text = _NOT_XML.sub("\ufffd", text)
    return element


# ---- Atom -----------------------------------------------------------------------------------------


def cap_path(crisis_id: str) -> str:
    """Where the API serves a crisis's CAP alert, relative to its root."""
    return f"/v1/crises/{_percent_encoded(crisis_id)}.cap"


def _percent_encoded(text: str) -> str:
    """RFC 3986 percent-encoding of everything but the unreserved characters (``/`` included)."""
    return "".join(c if c in _UNRESERVED else "".join(f"%{b:02X}" for b in c.encode("utf-8")) for c in text)


def entry_id(sender: str, crisis_id: str) -> str:
    """A stable Atom id for a crisis (one entry per crisis, updated with each version)."""
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'crisiswatch:{sender}:{crisis_id}')}"


def atom_feed(active: Sequence[Published], *, sender: str, base_url: str, now: datetime) -> bytes:
    """An Atom 1.0 feed of the active crises (their latest version each), newest first, each entry
    linking its CAP alert; ``base_url`` is the API's root (no trailing slash)."""
    base = base_url.rstrip("/")
    entries = sorted(active, key=lambda v: (v.sent, v.crisis.crisis_id), reverse=True)
    feed = ET.Element("feed", xmlns=ATOM_NS)
    _atom(feed, "id", entry_id(sender, "cap.atom"))
    _atom(feed, "title", "crisiswatch: active crises (CAP 1.2)")
    _atom(feed, "updated", _atom_time(entries[0].sent if entries else now))
    _atom(feed, "link").attrib.update(rel="self", type=ATOM_MEDIA_TYPE, href=f"{base}/v1/cap.atom")
    _atom(_atom(feed, "author"), "name", sender)
    for version in entries:
        crisis = version.crisis
        entry = _atom(feed, "entry")
        _atom(entry, "id", entry_id(sender, crisis.crisis_id))
        _atom(entry, "title", crisis.title.strip() or EVENTS["en-US"][_CATEGORIES.get(crisis.category, "Other")])
        _atom(entry, "updated", _atom_time(version.sent))
        _atom(entry, "published", _atom_time(crisis.effective))
        _atom(_atom(entry, "author"), "name", sender)
        _atom(entry, "link").attrib.update(rel="alternate", type=CAP_MEDIA_TYPE, href=base + cap_path(crisis.crisis_id))
        _atom(entry, "category").attrib["term"] = _CATEGORIES.get(crisis.category, "Other")
        _atom(entry, "summary", f"{_enum(crisis.severity, _SEVERITIES)}: {crisis.instruction.strip()}")
    return _serialise(feed)


def _atom(parent: ET.Element, name: str, text: str | None = None) -> ET.Element:
    return _add(parent, name, text)


def _atom_time(when: datetime) -> str:
    return when.astimezone(UTC).replace(microsecond=0, tzinfo=None).isoformat() + "Z"
