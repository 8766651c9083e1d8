"""Government travel advisories as country-wide ``crisis/1`` events.

Two formats:

1. **Global Affairs Canada index** (``travel.gc.ca`` / ``data.international.gc.ca`` JSON): a ``data``
   object keyed by ISO alpha-2 code, each entry with ``advisory-state`` 0-3, ``date-published``
   ``{timestamp, date}``, ``has-regional-advisory`` and ``eng``/``fra`` blocks whose text is
   HTML-entity-encoded inside the JSON (``&Eacute;VITEZ TOUT VOYAGE``); entities are unescaped.
   Publisher ``gac``.
2. **A ministry's own list**, CSV with the header ``country,level,title,instruction,updated``
   (``url`` optional), or JSON ``{"publisher": "...", "advisories": [{...same keys...}]}`` (or just
   the list). ``country`` is an ISO alpha-2 code or a country name; ``level`` is 0-3 on the same
   scale as Canada's; ``updated`` is an ISO 8601 date or date-time (a date means 00:00 UTC). The
   publisher is the document's ``publisher``, else ``ctx.source_name``, else ``ministry``.

Levels (both formats) and severity:

====  =============================================  ========  ================
level  meaning                                        severity  crisis
====  =============================================  ========  ================
0      take normal security precautions               -         ``op: cancel``
1      exercise a high degree of caution              minor     upsert
2      avoid non-essential travel                     severe    upsert
3      avoid all travel                               extreme   upsert
====  =============================================  ========  ================

Identity: ``advisory:<publisher>:<ISO2>``, one crisis per publisher and country; ``version`` is the
advisory's publication time in epoch seconds. A country at level 0 is emitted as ``op: cancel``,
so an advisory that drops to 0 ends the crisis declared when it was higher; a cancel for a
country that never had one is a no-op downstream. Area: the country polygon from
:mod:`pipeline.domain.countries`; a country the shipped data has no area for is rejected with
that reason (never given an invented area). Regional advisories (parts of a country) are not
represented: only the country-wide level is used, and a note says which countries also have
regional ones. Category ``safety``, urgency ``expected``, certainty ``likely``; an advisory stands
until the publisher changes it, so ``expires`` is null.
"""

from __future__ import annotations

import csv
import html
import io
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from pipeline.domain import countries
from pipeline.domain.feeds.base import FeedError, ParseContext, ParseResult, Rejection
from schemas import Crisis
from schemas.models import Severity

SEVERITY: dict[int, Severity] = {1: "minor", 2: "severe", 3: "extreme"}
LEVEL_TEXT: dict[int, str] = {0: "Take normal security precautions", 1: "Exercise a high degree of caution",
                              2: "Avoid non-essential travel", 3: "Avoid all travel"}
GAC_PUBLISHER = "gac"
GAC_URL = "https://travel.gc.ca/destinations/"
DEFAULT_PUBLISHER = "ministry"
CSV_COLUMNS = ("country", "level", "title", "instruction", "updated")

_ISO2 = re.compile(r"[A-Z]{2}")
_PUBLISHER = re.compile(r"[a-z0-9][a-z0-9._-]{0,40}")


@dataclass(frozen=True, slots=True)
class _Advisory:
    ref: str
    country: str  # ISO alpha-2 or a name, as written
    level: int
    published: datetime
    title: str
    instruction: str
    url: str
    language: str | None = None


def sniff(data: bytes) -> bool:
    """Whether a document looks like a travel advisory index (GAC JSON, or the documented CSV/JSON)."""
    text = data[:65536].decode("utf-8-sig", errors="replace").lstrip()
    if text.startswith(("{", "[")):
        return '"advisory-state"' in text or '"advisories"' in text or ('"country"' in text and '"level"' in text)
    header = {c.strip().strip('"').lower() for c in text.split("\n", 1)[0].split(",")}
    return {"country", "level"} <= header


def parse(data: bytes, ctx: ParseContext) -> ParseResult:
    if len(data) > ctx.max_bytes:
        raise FeedError(f"document of {len(data)} bytes exceeds the {ctx.max_bytes}-byte limit")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FeedError(f"advisory document is not UTF-8: {exc}") from None
    stripped = text.lstrip()
    if not stripped:
        raise FeedError("empty advisory document")
    if stripped.startswith(("{", "[")):
        try:
            document = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise FeedError(f"advisory document is not valid JSON: {exc}") from None
        if isinstance(document, dict) and isinstance(document.get("data"), dict):
            return _build(GAC_PUBLISHER, *_gac(document["data"]))
        items, publisher = _own_json(document, ctx)
        return _build(publisher, *_own_rows(items))
    return _build(_publisher(None, ctx), *_own_rows(_csv_rows(text)))


# --- Global Affairs Canada ---------------------------------------------------------------------


def _gac(data: Mapping[str, Any]) -> tuple[list[_Advisory], list[Rejection], list[str]]:
    advisories: list[_Advisory] = []
    rejected: list[Rejection] = []
    notes: list[str] = []
    for key, entry in data.items():
        try:
            if not isinstance(entry, Mapping):
                raise ValueError("entry is not an object")
            level = _level(entry.get("advisory-state"))
            published = entry.get("date-published")
            stamp = published.get("timestamp") if isinstance(published, Mapping) else None
            if isinstance(stamp, bool) or not isinstance(stamp, int | float):
                raise ValueError("date-published.timestamp missing")
            when = datetime.fromtimestamp(stamp, tz=UTC)
            block = entry.get("eng")
            eng: Mapping[str, Any] = block if isinstance(block, Mapping) else {}
            name = _unescape(eng.get("name")) or str(key)
            advice = _unescape(eng.get("advisory-text")) or LEVEL_TEXT[level]
            advice = advice.capitalize() if advice.isupper() else advice
            slug = _unescape(eng.get("url-slug"))
            if entry.get("has-regional-advisory") in (1, "1", True):
                notes.append(f"{key}: regional advisories exist; only the country-wide level is used")
            advisories.append(_Advisory(
                ref=str(entry.get("full-info-url") or key), country=str(key), level=level, published=when,
                title=f"Travel advisory for {name}: {advice}", url=GAC_URL + slug if slug else "https://travel.gc.ca/travelling/advisories",
                instruction=f"Global Affairs Canada advises for {name}: {advice.rstrip('.')}.", language="en"))
        except (ValueError, TypeError, OverflowError, OSError) as exc:
            rejected.append(Rejection(str(key), str(exc)))
    return advisories, rejected, notes


# --- the documented own format -----------------------------------------------------------------


def _publisher(value: Any, ctx: ParseContext) -> str:
    candidate = str(value or ctx.source_name or DEFAULT_PUBLISHER).strip().lower()
    if not _PUBLISHER.fullmatch(candidate):
        raise FeedError(f"publisher must be a short lower-case name ([a-z0-9._-]), got {candidate!r}")
    return candidate


def _own_json(document: Any, ctx: ParseContext) -> tuple[list[Mapping[str, Any]], str]:
    if isinstance(document, list):
        return document, _publisher(None, ctx)
    if isinstance(document, dict) and isinstance(document.get("advisories"), list):
        return document["advisories"], _publisher(document.get("publisher"), ctx)
    raise FeedError("not an advisory document: expected a GAC 'data' object, an 'advisories' list or a list of advisories")


def _csv_rows(text: str) -> list[Mapping[str, Any]]:
    reader = csv.DictReader(io.StringIO(text))
    fields = {(f or "").strip().lower() for f in reader.fieldnames or ()}
    if not {"country", "level"} <= fields:
        raise FeedError(f"advisory CSV needs the columns {', '.join(CSV_COLUMNS)}; got {', '.join(sorted(fields)) or 'none'}")
    try:
        return [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items() if isinstance(v, str)} for row in reader]
    except csv.Error as exc:
        raise FeedError(f"unreadable advisory CSV: {exc}") from None


def _own_rows(rows: Iterable[Any]) -> tuple[list[_Advisory], list[Rejection], list[str]]:
    advisories: list[_Advisory] = []
    rejected: list[Rejection] = []
    for index, row in enumerate(rows):
        ref = f"row[{index}]"
        try:
            if not isinstance(row, Mapping):
                raise ValueError("advisory is not an object")
            country = str(row.get("country") or "").strip()
            if not country:
                raise ValueError("no country")
            ref = f"{ref}:{country}"
            level = _level(row.get("level"))
            published = _updated(row.get("updated"))
            name = _display_name(country)
            title = _unescape(row.get("title")) or f"Travel advisory for {name}: {LEVEL_TEXT[level]}"
            instruction = _unescape(row.get("instruction")) or f"{LEVEL_TEXT[level]} to {name}."
            advisories.append(_Advisory(ref, country, level, published, title, instruction, str(row.get("url") or "")))
        except (ValueError, TypeError) as exc:
            rejected.append(Rejection(ref, str(exc)))
    return advisories, rejected, []


def _updated(value: Any) -> datetime:
    text = str(value or "").strip()
    if not text:
        raise ValueError("no 'updated' date: the publication time is the advisory's version")
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            return datetime.combine(date.fromisoformat(text), datetime.min.time(), tzinfo=UTC)
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"'updated' is not an ISO 8601 date: {text!r}") from None
    if parsed.tzinfo is None:
        raise ValueError(f"'updated' has no UTC offset: {text!r}")
    return parsed


# --- shared ------------------------------------------------------------------------------------


def _level(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"advisory level must be 0-3, got {value!r}")
    try:
        level = int(str(value).strip())
    except ValueError:
        raise ValueError(f"advisory level must be 0-3, got {value!r}") from None
    if level not in LEVEL_TEXT:
        raise ValueError(f"advisory level must be 0-3, got {level}")
    return level


def _unescape(value: Any) -> str:
    return " ".join(html.unescape(str(value)).split()) if value not in (None, "") else ""


def _display_name(country: str) -> str:
    if _ISO2.fullmatch(country.upper()):
        found = countries.country(country)
        return found.name if found else country.upper()
    return country


def _iso2(country: str) -> str | None:
    if _ISO2.fullmatch(country.strip().upper()) and len(country.strip()) == 2:
        return country.strip().upper()
    return countries.iso2_from_name(country)


def _build(publisher: str, advisories: list[_Advisory], rejected: list[Rejection], notes: list[str]) -> ParseResult:
    events: list[Crisis] = []
    rejections = list(rejected)
    notes = list(notes)
    for advisory in advisories:
        iso2 = _iso2(advisory.country)
        if iso2 is None:
            if advisory.level == 0:
                notes.append(f"{advisory.ref}: level 0 for {advisory.country!r}, which is not a country code; nothing to cancel")
            else:
                rejections.append(Rejection(advisory.ref, f"not an ISO 3166-1 alpha-2 country code or known name: {advisory.country!r}"))
            continue
        crisis_id = f"advisory:{publisher}:{iso2}"
        version = max(int(advisory.published.timestamp()), 1)
        common: dict[str, Any] = {
            "crisis_id": crisis_id, "version": version, "source": "advisory", "source_ref": advisory.ref[:1024],
            "title": advisory.title[:500], "category": "safety", "urgency": "expected", "certainty": "likely",
            "buffer_km": 0.0, "country_codes": (iso2,), "effective": advisory.published, "expires": None,
            "url": advisory.url[:2048], "language": advisory.language,
        }
        if advisory.level == 0:
            events.append(Crisis(op="cancel", severity="minor", geometry=None, instruction="", **common))
            continue
        area = countries.country_geometry(iso2)
        if area is None:
            rejections.append(Rejection(advisory.ref, f"no country area for {iso2} in the shipped Natural Earth 1:110m data"))
            continue
        events.append(Crisis(op="upsert", severity=SEVERITY[advisory.level], geometry=area,
                             instruction=advisory.instruction[:5000], **common))
    return ParseResult(events=tuple(events), rejected=tuple(rejections), notes=tuple(notes))
