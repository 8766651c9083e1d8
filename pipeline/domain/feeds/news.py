"""News RSS/Atom items to ``crisis/1``: a documented keyword rule, geocoded places, a confidence score.

The document is first read by :mod:`pipeline.domain.feeds.xmlsafe` (so every hostile-XML refusal
applies) and only then handed to feedparser, as a byte stream (never as a string feedparser could
take for a URL or a file name).

**Is it a crisis?** An item is a candidate when its *title* names a hazard of :data:`HAZARDS`
(English and Indonesian keywords, whole words, plural ``-s``/``-es`` allowed) that is not negated
by one of :data:`NEGATIONS` in the three words before it ("There are no tropical cyclones at this
time", "tidak ada gempa"). Hazard words only in the body do not make a crisis: a headline states
the event, while a body mentions hazards in passing (a weather outlook's "could cause some flash
flooding"). The first hazard of the table found in the title decides the category and the radius.

**Where?** Candidate place names are runs of capitalised words in the title and summary (1-3
words, longest first, minus :data:`NOT_PLACES`). A candidate that is a country name
(``countries.iso2_from_name``) is a country; names of natural features (:data:`FEATURE_WORDS`:
"laut Banda", "Gunung Semeru") are skipped; any other is looked up through ``ctx.geocoder`` (any
geopy geocoder: ``.geocode(query)`` returning a Location or None). When exactly one country is named
in the item, lookups are narrowed to it (``"Palu, Indonesia"``). The best place is the first found
after a locative word (:data:`LOCATIVES`: "in", "near", "di", "guncang"...), else the first in the
title, else the first in the summary. A geocoded town outside every country the item names is not
chosen ("La Palma" is also a town in California; an item about Spain's La Palma that names Spain gets
Spain, and an operator's review, rather than California).

**Confidence** (0..1), the sum of:

- 0.30 the title names a hazard; +0.20 the text reports impact (:data:`IMPACT`: killed, evacuated,
  tewas, mengungsi...); -0.20 the text hedges or forecasts (:data:`HEDGES`: could, outlook, potensi...);
- place: +0.40 a geocoded place after a locative word, +0.25 a geocoded place elsewhere,
  +0.10 only a country.
- An item located only to a country never exceeds 0.5: a whole country is not a crisis area for
  citizens without an operator's look.

Items at or above ``ctx.min_confidence`` (0.6 by default) become events; the others go to
``ParseResult.review`` for an operator. The area is a circle of the hazard's radius around the place
(a search area around a reported town, not a hazard footprint), or the country's polygon, or none.

``crisis_id`` is ``rss:`` + a digest of the item's guid (else link, else title); ``version`` its
``updated`` or ``published`` time (else ``ctx.now``); news crises expire :data:`NEWS_TTL` after that.
"""

from __future__ import annotations

import calendar
import hashlib
import html
import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import feedparser
from geopy.exc import GeopyError

from pipeline.domain import countries, geometry
from pipeline.domain.feeds import xmlsafe
from pipeline.domain.feeds.base import FeedError, ParseContext, ParseResult, Rejection, Skipped
from schemas import Crisis


@dataclass(frozen=True, slots=True)
class Hazard:
    name: str
    category: str  # a CAP category, lower case
    radius_km: float  # search radius around a geocoded town (see the module doc)
    keywords: tuple[str, ...]  # English and Indonesian, lower case


# Order matters: the first hazard named in a title wins (a tsunami after an earthquake is a tsunami).
# Radii: a town-centred search area sized to the hazard's typical reach. Earthquake damage reaches tens
# of km beyond the epicentral town (MMI VI+ for a shallow M6 spans ~50-100 km); volcano exclusion zones
# run 3-15 km (PVMBG's are 2-7 km, 6 km at Ruang 2024); floods and wildfires cover a district; an attack
# or an urban fire is a neighbourhood.
HAZARDS: tuple[Hazard, ...] = (
    Hazard("tsunami", "geo", 50.0, ("tsunami",)),
    Hazard("earthquake", "geo", 75.0, ("earthquake", "quake", "tremor", "gempa", "gempa bumi", "gempabumi", "lindu")),
    Hazard("volcano", "geo", 15.0, ("volcano", "volcanic", "eruption", "erupts", "erupted", "erupting", "lava",
                                    "letusan", "erupsi", "meletus", "gunung api", "gunungapi", "awan panas", "lahar")),
    Hazard("landslide", "geo", 10.0, ("landslide", "mudslide", "longsor", "tanah longsor")),
    Hazard("cyclone", "met", 150.0, ("hurricane", "typhoon", "cyclone", "tropical storm", "siklon", "topan")),
    Hazard("flood", "met", 25.0, ("flood", "flooding", "flash flood", "inundation", "banjir", "banjir bandang")),
    Hazard("storm", "met", 30.0, ("tornado", "storm", "blizzard", "puting beliung", "badai", "angin kencang")),
    Hazard("heat", "met", 50.0, ("heatwave", "heat wave", "gelombang panas")),
    Hazard("wildfire", "fire", 25.0, ("wildfire", "bushfire", "forest fire", "kebakaran hutan", "karhutla")),
    Hazard("fire", "fire", 5.0, ("fire", "blaze", "kebakaran")),
    Hazard("attack", "security", 5.0, ("terror attack", "terrorist", "bombing", "explosion", "blast", "shooting",
                                       "gunmen", "hostage", "serangan", "ledakan", "bom", "teror", "penembakan",
                                       "penyanderaan")),
    Hazard("unrest", "security", 10.0, ("riot", "unrest", "clashes", "coup", "curfew", "kerusuhan", "bentrok",
                                        "bentrokan", "kudeta", "jam malam")),
    Hazard("outbreak", "health", 50.0, ("outbreak", "epidemic", "cholera", "ebola", "wabah", "kejadian luar biasa")),
    Hazard("transport", "transport", 5.0, ("plane crash", "ferry sinks", "capsized", "capsizes", "derailed",
                                           "kapal tenggelam", "pesawat jatuh", "kereta anjlok")),
)
NEGATIONS = frozenset({"no", "not", "without", "zero", "none", "tidak", "tanpa", "bukan", "belum", "tak"})
IMPACT = ("killed", "kills", "dead", "deaths", "died", "dies", "injured", "missing", "evacuated", "evacuate",
          "evacuation", "displaced", "destroyed", "trapped", "stranded", "rescue", "tewas", "meninggal", "korban",
          "luka", "hilang", "mengungsi", "pengungsi", "evakuasi", "rusak", "terjebak")
HEDGES = ("could", "might", "may", "possible", "possibility", "chance", "outlook", "forecast", "forecasts",
          "potensi", "berpotensi", "prakiraan", "kemungkinan", "diprediksi")
LOCATIVES = frozenset({"in", "near", "at", "outside", "across", "off", "hits", "hit", "strikes", "struck", "rocks",
                       "di", "dekat", "kota", "kabupaten", "provinsi", "wilayah", "guncang", "mengguncang", "landa",
                       "melanda", "terjang", "menerjang"})
NOT_PLACES = frozenset(normal for normal in (
    "the", "a", "an", "in", "on", "at", "of", "for", "from", "to", "by", "with", "as", "and", "but", "after", "before",
    "over", "under", "near", "amid", "more", "most", "many", "some", "new", "news", "live", "update", "updates",
    "breaking", "watch", "video", "police", "president", "minister", "prime minister", "pm", "government", "army",
    "mr", "mrs", "ms", "dr", "north", "south", "east", "west", "central", "monday", "tuesday", "wednesday",
    "thursday", "friday", "saturday", "sunday", "january", "february", "march", "april", "may", "june", "july",
    "august", "september", "october", "november", "december", "senin", "selasa", "rabu", "kamis", "jumat", "sabtu",
    "minggu", "januari", "februari", "maret", "mei", "juni", "juli", "agustus", "oktober", "desember", "warga",
    "pemerintah", "presiden", "polisi", "gubernur", "bupati", "there", "this", "that", "these", "what", "how", "why",
    "who", "it", "its", "we", "they", "he", "she", "i", "you", "our", "atlantic", "pacific", "tropical", "weather",
))
# A capitalised name right after one of these (or starting with one) is a natural feature, not a town:
# "laut Banda" is the Banda Sea, not Banda in India; "Gunung Semeru", "Gulf of Mexico".
FEATURE_WORDS = frozenset({"sea", "gulf", "bay", "strait", "river", "lake", "mount", "mountain", "volcano", "island",
                           "islands", "ocean", "coast", "laut", "teluk", "selat", "sungai", "danau", "gunung", "pulau",
                           "kepulauan", "samudra", "pantai", "perairan"})
NEWS_TTL = timedelta(days=3)
NEWS_BUFFER_KM = 10.0
MAX_GEOCODER_QUERIES = 6

_CANDIDATE_WORD = re.compile(r"[A-ZÀ-ÖØ-Þ][\w'’.-]*")
_CONNECTORS = frozenset({"de", "del", "da", "do", "la", "le", "of", "al", "el", "van", "von"})
_TAG = re.compile(r"<[^>]*>")


@dataclass(frozen=True, slots=True)
class _Place:
    text: str
    iso2: str | None  # set for a country
    latitude: float | None  # set for a geocoded place
    longitude: float | None
    after_locative: bool
    in_title: bool


def parse(data: bytes, ctx: ParseContext) -> ParseResult:
    xmlsafe.parse_xml(data, max_bytes=ctx.max_bytes)  # the hardening gate: refuses hostile XML with a reason
    parsed: Any = feedparser.parse(io.BytesIO(xmlsafe.strip_bom(data)))
    if not parsed.entries and parsed.get("bozo") and not parsed.get("feed"):
        raise FeedError(f"not an RSS/Atom feed: {parsed.get('bozo_exception')}")
    feed_language = str(parsed.get("feed", {}).get("language") or "") or None
    lookups: dict[str, Any] = {}
    events: list[Crisis] = []
    review: list[Crisis] = []
    rejected: list[Rejection] = []
    notes: list[str] = []
    skipped: list[Skipped] = []
    for index, entry in enumerate(parsed.entries):
        ref = str(entry.get("id") or entry.get("link") or f"item #{index + 1}")
        try:
            outcome = _item(entry, ref, feed_language, ctx, lookups, notes)
        except (ValueError, TypeError, KeyError, geometry.GeometryError) as exc:
            rejected.append(Rejection(ref, f"unusable news item: {exc}"))
            continue
        if outcome is None:
            quiet = says_all_quiet(_plain(str(entry.get("title") or "")))
            skipped.append(Skipped(ref, "all_quiet" if quiet else "no_hazard"))
            continue
        crisis, confident = outcome
        (events if confident else review).append(crisis)
    return ParseResult(events=tuple(events), rejected=tuple(rejected), review=tuple(review), notes=tuple(notes),
                       skipped=tuple(skipped))


# ---- classification ---------------------------------------------------------------------------


def _plain(text: str) -> str:
    return " ".join(html.unescape(_TAG.sub(" ", text)).split())


def _keyword_pattern(keyword: str) -> re.Pattern[str]:
    return re.compile(r"(?<!\w)" + r"\s+".join(map(re.escape, keyword.split())) + r"(?:s|es)?(?!\w)", re.IGNORECASE)


_HAZARD_PATTERNS: tuple[tuple[Hazard, tuple[re.Pattern[str], ...]], ...] = tuple(
    (h, tuple(_keyword_pattern(k) for k in h.keywords)) for h in HAZARDS)
_IMPACT_PATTERNS = tuple(_keyword_pattern(k) for k in IMPACT)
_HEDGE_PATTERNS = tuple(_keyword_pattern(k) for k in HEDGES)


def _negated(text: str, start: int) -> bool:
    before = re.findall(r"\w+", text[:start].lower())[-3:]
    return any(word in NEGATIONS for word in before)


def hazard_of(title: str) -> Hazard | None:
    """The first hazard of :data:`HAZARDS` the title names without negating it, or None."""
    for hazard, patterns in _HAZARD_PATTERNS:
        for pattern in patterns:
            if any(not _negated(title, m.start()) for m in pattern.finditer(title)):
                return hazard
    return None


def says_all_quiet(title: str) -> bool:
    """Whether the title names a hazard only to deny it ("There are no tropical cyclones at this time")."""
    return any(_negated(title, m.start()) for _hazard, patterns in _HAZARD_PATTERNS for pattern in patterns
               for m in pattern.finditer(title))


def _mentions(text: str, patterns: Sequence[re.Pattern[str]]) -> bool:
    return any(p.search(text) for p in patterns)


# ---- places -----------------------------------------------------------------------------------


def _candidates(text: str, in_title: bool) -> list[tuple[str, bool, bool]]:
    """(name, after a locative word, in the title) for runs of capitalised words, longest first per run."""
    out: list[tuple[str, bool, bool]] = []
    words = list(re.finditer(r"[\w'’.-]+", text))
    i = 0
    while i < len(words):
        if not _CANDIDATE_WORD.fullmatch(words[i].group()):
            i += 1
            continue
        j = i + 1
        while j < len(words) and (_CANDIDATE_WORD.fullmatch(words[j].group()) or (
                words[j].group() in _CONNECTORS and j + 1 < len(words) and _CANDIDATE_WORD.fullmatch(words[j + 1].group()))):
            j += 1
        run = [re.sub(r"['’]s$", "", w.group()).strip(".'’") for w in words[i:j]]  # "Spain's" -> "Spain"
        previous = words[i - 1].group().lower() if i > 0 else ""
        locative = previous in LOCATIVES
        if previous in FEATURE_WORDS or run[0].lower() in FEATURE_WORDS:
            i = j
            continue
        for size in range(min(3, len(run)), 0, -1):
            for start in range(0, len(run) - size + 1):
                name = " ".join(run[start:start + size])
                if run[start] in _CONNECTORS or run[start + size - 1] in _CONNECTORS:
                    continue
                if name.lower() in NOT_PLACES or len(name) < 3 or (name.isupper() and len(name) <= 5):
                    continue
                out.append((name, locative and start == 0, in_title))
        i = j
    return out


def _geocode(query: str, ctx: ParseContext, lookups: dict[str, Any], notes: list[str], ref: str) -> Any:
    if query in lookups:
        return lookups[query]
    try:
        found = ctx.geocoder.geocode(query)
    except (GeopyError, OSError, ValueError) as exc:
        notes.append(f"{ref}: geocoder failed for {query!r}: {exc}")
        found = None
    lookups[query] = found
    return found


def _places(title: str, summary: str, ctx: ParseContext, lookups: dict[str, Any], notes: list[str],
            ref: str) -> tuple[list[_Place], set[str]]:
    candidates = _candidates(title, True) + _candidates(summary, False)
    country_names = {iso: name for name, _loc, _t in reversed(candidates) for iso in [countries.iso2_from_name(name)] if iso}
    named_countries = set(country_names)
    places: list[_Place] = []
    seen: set[str] = set()
    queries = 0
    for name, locative, in_title in candidates:
        key = name.lower()
        if key in seen or any(key in other for other in seen):
            continue
        iso2 = countries.iso2_from_name(name)
        if iso2 is not None:
            seen.add(key)
            places.append(_Place(name, iso2, None, None, locative, in_title))
            continue
        if ctx.geocoder is None or queries >= MAX_GEOCODER_QUERIES:
            continue
        queries += 1
        narrowed = f"{name}, {next(iter(country_names.values()))}" if len(country_names) == 1 else name
        found = _geocode(narrowed, ctx, lookups, notes, ref)
        if found is None and narrowed != name:
            found = _geocode(name, ctx, lookups, notes, ref)
        latitude, longitude = getattr(found, "latitude", None), getattr(found, "longitude", None)
        if isinstance(latitude, int | float) and isinstance(longitude, int | float):
            seen.add(key)
            places.append(_Place(name, None, float(latitude), float(longitude), locative, in_title))
    return places, named_countries


def _country_of(place: _Place) -> tuple[str, ...]:
    assert place.latitude is not None and place.longitude is not None
    return countries.countries_for(geometry.circle(place.latitude, place.longitude, geometry.MIN_CIRCLE_RADIUS_KM))


def _best(places: Sequence[_Place], named: set[str]) -> _Place | None:
    """The place the item is about (see the module doc); a town outside every country the item names loses."""
    located = [p for p in places if p.latitude is not None and (not named or set(_country_of(p)) & named)]
    for pool in (located, [p for p in places if p.iso2 is not None], places):
        for wanted in (lambda p: p.after_locative, lambda p: p.in_title, lambda p: True):
            found = next((p for p in pool if wanted(p)), None)
            if found is not None:
                return found
    return None


# ---- the event ----------------------------------------------------------------------------------


def _time_of(entry: Mapping[str, Any], ctx: ParseContext) -> datetime:
    for key in ("updated_parsed", "published_parsed"):
        value = entry.get(key)
        if value:
            return datetime.fromtimestamp(calendar.timegm(value), UTC)
    return ctx.now


def _item(entry: Mapping[str, Any], ref: str, feed_language: str | None, ctx: ParseContext,
          lookups: dict[str, Any], notes: list[str]) -> tuple[Crisis, bool] | None:
    title = _plain(str(entry.get("title") or ""))
    hazard = hazard_of(title)
    if hazard is None:
        return None
    summary = _plain(str(entry.get("summary") or entry.get("description") or ""))
    text = f"{title}. {summary}"
    confidence = 0.30
    if _mentions(text, _IMPACT_PATTERNS):
        confidence += 0.20
    if _mentions(text, _HEDGE_PATTERNS):
        confidence -= 0.20
    places, named = _places(title, summary, ctx, lookups, notes, ref)
    place = _best(places, named)
    area: dict[str, Any] | None = None
    if place is not None and place.latitude is not None and place.longitude is not None:
        confidence += 0.40 if place.after_locative else 0.25
        area = geometry.circle(place.latitude, place.longitude, hazard.radius_km)
    elif place is not None and place.iso2 is not None:
        confidence = min(confidence + 0.10, 0.5)
        area = countries.country_geometry(place.iso2)
        if area is None:
            notes.append(f"{ref}: country {place.iso2} has no polygon; item kept without geometry")
    if place is not None and place.iso2 is not None:
        codes: tuple[str, ...] = (place.iso2,)  # the country itself, not every neighbour its border touches
    else:
        codes = countries.countries_for(area) if area is not None else ()
    confidence = round(max(0.0, min(1.0, confidence)), 2)
    confident = confidence >= ctx.min_confidence
    published = _time_of(entry, ctx)
    version = max(1, int(published.timestamp()))
    identity = str(entry.get("id") or entry.get("link") or title)
    certainty: Literal["likely", "possible"] = "likely" if confident else "possible"
    language = str(entry.get("language") or feed_language or "") or None
    crisis = Crisis(
        crisis_id="rss:" + hashlib.sha256(identity.encode()).hexdigest()[:24], op="upsert", version=version,
        source="rss", source_ref=identity[:1024], title=title[:500], category=hazard.category, severity="unknown",
        urgency="unknown", certainty=certainty, geometry=area, buffer_km=NEWS_BUFFER_KM if area is not None else 0.0,
        country_codes=codes,
        effective=published, expires=published + NEWS_TTL,
        instruction="", url=str(entry.get("link") or "")[:2048], references=(),
        language=language[:35] if language else None)
    where = place.text if place is not None else "no place"
    notes.append(f"{ref}: {hazard.name} at {where}, confidence {confidence:.2f} -> {'event' if confident else 'review'}")
    return crisis, confident
