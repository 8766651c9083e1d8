"""One incident per real-world disaster, however many sources report it.

GDACS, USGS and a national agency's CAP alert often describe the same earthquake. Published
as three crises, a citizen would get three warnings and, worse, three areas flapping in and
out as each source updates. :func:`merge` folds the ``crisis/1`` events of every source into
*incidents*: one ``crisis_id`` per incident, a version that only grows, and one combined view.

The join rule (every part must hold; see :class:`MergeRule` for the numbers):

1. **Sources that may merge**: ``cap``, ``gdacs``, ``usgs`` and ``rss``. Travel advisories are
   standing country levels, not events, and operator declarations are deliberate human
   decisions; both always stand alone.
2. **Same kind of hazard**: the same CAP ``category``, the same ``status`` (an exercise never
   merges with a real alert) and, when the hazard type can be told from both events (GDACS
   event type, USGS is always an earthquake, keywords in the title), the same type — a tsunami
   warning is not merged into the earthquake that caused it, its area is a different one.
3. **Close in time**: the newcomer's ``effective`` lies within the category's window of the span
   of ``effective`` times of the incident's active members (6 h for ``geo``, 72 h for ``met``...).
4. **Close in space**: both have an area and the gap between the two areas (0 when they touch)
   is at most ``max_gap_km`` (great-circle, across the antimeridian too). An event without an
   area never merges: without one, two floods in one country cannot be told apart.
5. **One report per authority**: an incident holds at most one event from each GDACS, USGS or
   CAP sender. A source that reports two events (a main shock and an aftershock) has already
   said they are distinct. News items are exempt: many articles describe one disaster.

Among several incidents that qualify, the one whose nearest member is closest (distance
between representative points), then closest in time, wins.

The combined view published for an incident: ``crisis_id`` of its first report; ``version`` =
max(previous + 1, the newcomer's own version), so it only grows and, for a lone report,
stays the source's own version; the text (title, instruction, url, language, urgency,
certainty) of the most authoritative active member (CAP, then GDACS, USGS, news; the latest
on a tie); the highest severity; the union of every active member's area (so an update of
one source never shrinks the area another source still warns about); the widest buffer; all
countries; the earliest ``effective``; the latest ``expires`` (none if any member has none);
and in ``references`` every source reference of every member, past and present.

Updates and cancels of a member always map back to its incident. A cancel removes that
member: if others remain the incident is republished without it, otherwise the incident is
cancelled. An event the registry already holds (same version, same content) or an older
version yields nothing to publish, so :func:`merge` is idempotent.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import shapely
from shapely.affinity import translate
from shapely.geometry import mapping, shape
from shapely.geometry.base import BaseGeometry
from shapely.ops import nearest_points

from pipeline.domain import geometry
from schemas import Crisis, format_time, parse_time
from schemas.models import SEVERITY_RANK

EARTH_RADIUS_KM = 6371.0088

MERGEABLE_SOURCES = frozenset({"cap", "gdacs", "usgs", "rss"})
# Text of the merged view comes from the first of these that is active: an official CAP alert
# carries instructions in the local language; GDACS and USGS are global summaries.
SOURCE_PRECEDENCE: tuple[str, ...] = ("cap", "gdacs", "usgs", "rss", "advisory", "operator")

GDACS_TYPES: dict[str, str] = {"EQ": "earthquake", "TC": "cyclone", "FL": "flood", "VO": "volcano", "DR": "drought",
                               "WF": "wildfire", "TS": "tsunami"}
# Hazard words in titles (English and Indonesian, plus common European words), first match wins;
# tsunami comes before earthquake so "tsunami warning after earthquake" is a tsunami.
HAZARD_WORDS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(pattern, re.IGNORECASE)) for kind, pattern in (
        ("tsunami", r"tsunami"),
        ("earthquake", r"earthquake|\bquake|gempa|s[eé]isme|terremoto|sismo|erdbeben"),
        ("volcano", r"volcan|erupt|gunung api|erupsi|vulkan"),
        ("cyclone", r"cyclone|typhoon|hurricane|tropical storm|topan|siklon|badai tropis"),
        ("flood", r"flood|banjir|inundation|inondation|hochwasser|flash flood"),
        ("wildfire", r"wildfire|bushfire|forest fire|kebakaran hutan|karhutla|incendie"),
        ("drought", r"drought|kekeringan|s[eé]cheresse"),
    ))


@dataclass(frozen=True, slots=True)
class MergeRule:
    """The numbers of the join rule (module docstring)."""

    max_gap_km: float = 100.0
    window: timedelta = timedelta(hours=24)
    # Earthquakes are reported within minutes by every source; storms and floods are warned
    # about for days, so a met office's warning issued two days after GDACS opened the event
    # still belongs to it.
    window_by_category: Mapping[str, timedelta] = field(default_factory=lambda: {
        "geo": timedelta(hours=6), "met": timedelta(hours=72), "fire": timedelta(hours=48)})
    # How long a closed (or long expired) incident is remembered, so a source that repeats an
    # old item is recognised instead of announcing it again.
    retention: timedelta = timedelta(days=30)

    def window_for(self, category: str) -> timedelta:
        return self.window_by_category.get(category, self.window)


@dataclass(frozen=True, slots=True)
class Member:
    """The latest event of one source's report, and whether the source still stands by it."""

    event: Crisis
    active: bool

    @property
    def key(self) -> str:
        return self.event.crisis_id


@dataclass(frozen=True, slots=True)
class Incident:
    crisis_id: str
    version: int
    members: tuple[Member, ...]
    # The last view published, so a cancel that carries no text or area (a CAP Cancel has no
    # <info>) still tells citizens which crisis ended and where.
    last_view: Crisis | None = None
    # When a feed last mentioned one of its members (the ``now`` given to :func:`merge`): an
    # incident is forgotten only once its sources stopped repeating it, however old its events.
    seen: datetime | None = None

    @property
    def active(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.active)

    def member(self, key: str) -> Member | None:
        return next((m for m in self.members if m.key == key), None)


@dataclass(frozen=True, slots=True)
class IncidentRegistry:
    """Every known incident, by incident id; the member index is derived."""

    incidents: Mapping[str, Incident] = field(default_factory=dict)
    by_member: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, incidents: Iterable[Incident]) -> IncidentRegistry:
        table = {i.crisis_id: i for i in incidents}
        index = {m.key: i.crisis_id for i in table.values() for m in i.members}
        return cls(table, index)

    def incident_of(self, member_key: str) -> Incident | None:
        incident_id = self.by_member.get(member_key)
        return None if incident_id is None else self.incidents[incident_id]

    def with_incident(self, incident: Incident) -> IncidentRegistry:
        table = dict(self.incidents)
        table[incident.crisis_id] = incident
        index = dict(self.by_member)
        index.update((m.key, incident.crisis_id) for m in incident.members)
        return IncidentRegistry(table, index)

    def to_json(self) -> list[dict[str, Any]]:
        return [{"crisis_id": i.crisis_id, "version": i.version,
                 "members": [{"active": m.active, "event": m.event.to_dict()} for m in i.members],
                 "last_view": None if i.last_view is None else i.last_view.to_dict(),
                 "seen": None if i.seen is None else format_time(i.seen)}
                for i in self.incidents.values()]

    @classmethod
    def from_json(cls, data: Any) -> IncidentRegistry:
        """Rebuild from :meth:`to_json` output; raises ``ValueError`` naming what is wrong."""
        if not isinstance(data, list):
            raise ValueError("incident registry: expected a list")
        incidents = []
        for n, raw in enumerate(data):
            try:
                members = tuple(Member(Crisis.from_dict(m["event"]), bool(m["active"])) for m in raw["members"])
                view, seen = raw.get("last_view"), raw.get("seen")
                incidents.append(Incident(str(raw["crisis_id"]), int(raw["version"]), members,
                                          None if view is None else Crisis.from_dict(view),
                                          None if seen is None else parse_time(seen)))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"incident registry: entry {n}: {exc!r}") from None
        return cls.of(incidents)

    def prune(self, now: datetime, rule: MergeRule = MergeRule()) -> IncidentRegistry:
        """Forget incidents that ended (cancelled or expired) and that no feed mentioned for ``rule.retention``."""
        horizon = now - rule.retention
        kept = [i for i in self.incidents.values() if _last_seen(i) >= horizon]
        return self if len(kept) == len(self.incidents) else IncidentRegistry.of(kept)


@dataclass(frozen=True, slots=True)
class MergeOutcome:
    """What to publish (``None``: nothing new) and the registry to keep."""

    publish: Crisis | None
    registry: IncidentRegistry
    incident_id: str


def merge(registry: IncidentRegistry, event: Crisis, rule: MergeRule = MergeRule(),
          now: datetime | None = None) -> MergeOutcome:
    """Fold one source event into the registry; see the module docstring for the rule.

    ``now`` (when the event was read from its feed) keeps the incident from being pruned while
    its source still lists it.
    """
    incident = registry.incident_of(event.crisis_id)
    if incident is None:
        if event.op == "cancel":
            # Cancel of a report we never saw: pass it on unchanged (downstream may know it from
            # before this registry existed) and remember it so a repeat is not sent again.
            fresh = Incident(event.crisis_id, event.version, (Member(event, active=False),), event, now)
            return MergeOutcome(event, registry.with_incident(fresh), fresh.crisis_id)
        incident = _find_incident(registry, event, rule)
        if incident is None:
            fresh = Incident(event.crisis_id, 0, ())
            return _update(registry, fresh, event, now)
        return _update(registry, incident, event, now)
    known = incident.member(event.crisis_id)
    if known is not None and (event.version < known.event.version or fingerprint(event) == fingerprint(known.event)):
        if now is not None and (incident.seen is None or incident.seen < now):
            registry = registry.with_incident(replace(incident, seen=now))
        return MergeOutcome(None, registry, incident.crisis_id)
    return _update(registry, incident, event, now)


def fingerprint(event: Crisis) -> str:
    """Content identity of an event, the same before and after a JSON round trip (tuples vs lists)."""
    return json.dumps(event.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def merge_all(registry: IncidentRegistry, events: Sequence[Crisis], rule: MergeRule = MergeRule(),
              now: datetime | None = None) -> tuple[list[Crisis], IncidentRegistry]:
    """:func:`merge` each event in turn; returns what to publish, in order, and the final registry."""
    out: list[Crisis] = []
    for event in events:
        outcome = merge(registry, event, rule, now)
        registry = outcome.registry
        if outcome.publish is not None:
            out.append(outcome.publish)
    return out, registry


def _update(registry: IncidentRegistry, incident: Incident, event: Crisis, now: datetime | None) -> MergeOutcome:
    member = Member(event, active=event.op == "upsert")
    others = tuple(m for m in incident.members if m.key != member.key)
    members = (*others, member)
    version = max(incident.version + 1, event.version)
    view = _combined_view(incident.crisis_id, version, members, event, incident.last_view)
    seen = max((t for t in (incident.seen, now) if t is not None), default=None)
    updated = Incident(incident.crisis_id, version, members, view, seen)
    return MergeOutcome(view, registry.with_incident(updated), updated.crisis_id)


def _combined_view(incident_id: str, version: int, members: Sequence[Member], latest: Crisis,
                   previous: Crisis | None) -> Crisis:
    refs = _references(members)
    active = [m.event for m in members if m.active]
    if not active:
        last = previous or latest
        return replace(
            latest, crisis_id=incident_id, version=version, op="cancel", references=_without(refs, latest.source_ref),
            geometry=latest.geometry if latest.geometry is not None else last.geometry,
            title=latest.title or last.title, country_codes=latest.country_codes or last.country_codes)
    lead = _lead(active)
    if len(active) == 1 and len(members) == 1:
        return replace(lead, crisis_id=incident_id, version=version)
    geometries = [e.geometry for e in active if e.geometry is not None]
    expiries = [e.expires for e in active]
    return replace(
        lead, crisis_id=incident_id, version=version, op="upsert",
        severity=max((e.severity for e in active), key=lambda s: SEVERITY_RANK[s]),
        geometry=_union(geometries) if geometries else None,
        buffer_km=max(e.buffer_km for e in active),
        country_codes=tuple(sorted({c for e in active for c in e.country_codes})),
        effective=min(e.effective for e in active),
        expires=None if any(x is None for x in expiries) else max(x for x in expiries if x is not None),
        references=_without(refs, lead.source_ref))


def _lead(events: Sequence[Crisis]) -> Crisis:
    def rank(e: Crisis) -> tuple[int, int]:
        order = SOURCE_PRECEDENCE.index(e.source) if e.source in SOURCE_PRECEDENCE else len(SOURCE_PRECEDENCE)
        return order, -e.version

    return min(events, key=rank)


def _references(members: Sequence[Member]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for m in members:
        for ref in (*m.event.references, m.event.source_ref):
            if ref:
                seen.setdefault(ref, None)
    return tuple(seen)


def _without(refs: tuple[str, ...], own: str) -> tuple[str, ...]:
    return tuple(r for r in refs if r != own)


def _last_seen(incident: Incident) -> datetime:
    events = [m.event for m in incident.members]
    if incident.active and any(e.expires is None for e in events if e.op == "upsert"):
        return datetime.max.replace(tzinfo=events[0].effective.tzinfo)
    latest = max(max(e.effective, e.expires or e.effective) for e in events)
    return latest if incident.seen is None else max(latest, incident.seen)


# --- the join rule -----------------------------------------------------------------------------


def hazard_kind(event: Crisis) -> str | None:
    """The type of hazard when it can be told: GDACS event type, USGS, or a word in the title."""
    if event.source == "usgs":
        return "earthquake"
    if event.source == "gdacs":
        parts = event.crisis_id.split(":")
        if len(parts) >= 2 and parts[1].upper() in GDACS_TYPES:
            return GDACS_TYPES[parts[1].upper()]
    for kind, pattern in HAZARD_WORDS:
        if pattern.search(event.title):
            return kind
    return None


def origin(event: Crisis) -> str | None:
    """The authority behind a report (``cap:<sender>``, ``gdacs``, ``usgs``); ``None`` for news."""
    if event.source == "rss":
        return None
    if event.source == "cap":
        parts = event.crisis_id.split(":")
        return ":".join(parts[:2]) if len(parts) >= 3 else event.crisis_id
    return event.source


def _find_incident(registry: IncidentRegistry, event: Crisis, rule: MergeRule) -> Incident | None:
    if event.source not in MERGEABLE_SOURCES or event.geometry is None:
        return None
    area = _shape(event.geometry)
    if area is None:
        return None
    window = rule.window_for(event.category)
    kind = hazard_kind(event)
    source_origin = origin(event)
    best: tuple[float, float, Incident] | None = None
    for incident in registry.incidents.values():
        active = [m.event for m in incident.active]
        if not active or not _compatible(event, kind, source_origin, active):
            continue
        start, end = min(e.effective for e in active), max(e.effective for e in active)
        if not start - window <= event.effective <= end + window:
            continue
        if all(e.expires is not None and e.expires < event.effective - window for e in active):
            continue
        gaps = [(g, c) for e in active if e.geometry is not None and (other := _shape(e.geometry)) is not None
                for g, c in [_gap_and_centre_km(area, other)]]
        if not gaps or min(g for g, _ in gaps) > rule.max_gap_km:
            continue
        centre = min(c for _, c in gaps)
        dt = min(abs((event.effective - e.effective).total_seconds()) for e in active)
        if best is None or (centre, dt) < best[:2]:
            best = (centre, dt, incident)
    return None if best is None else best[2]


def _compatible(event: Crisis, kind: str | None, source_origin: str | None, active: Sequence[Crisis]) -> bool:
    for other in active:
        if other.source not in MERGEABLE_SOURCES or other.category != event.category or other.status != event.status:
            return False
        other_kind = hazard_kind(other)
        if kind is not None and other_kind is not None and kind != other_kind:
            return False
        if source_origin is not None and origin(other) == source_origin:
            return False
    return True


def _shape(geometry: Mapping[str, Any]) -> BaseGeometry | None:
    try:
        geom = shape(geometry)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, shapely.errors.GEOSException):
        return None
    return None if geom.is_empty else geom


def _gap_and_centre_km(a: BaseGeometry, b: BaseGeometry) -> tuple[float, float]:
    """Great-circle gap between two areas (0 when they touch) and between their representative points.

    Each is measured with ``b`` also shifted by ±360° so areas on both sides of the antimeridian
    are seen as the neighbours they are.
    """
    gap = centre = math.inf
    pa = a.representative_point()
    for shift in (0.0, 360.0, -360.0):
        other = translate(b, xoff=shift) if shift else b
        pb = other.representative_point()
        centre = min(centre, haversine_km(pa.y, pa.x, pb.y, pb.x))
        if a.intersects(other):
            gap = 0.0
        else:
            na, nb = nearest_points(a, other)
            gap = min(gap, haversine_km(na.y, na.x, nb.y, nb.x))
    return gap, centre


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


def _union(geometries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    if len(geometries) == 1:
        return dict(geometries[0])
    try:
        return geometry.union(geometries)
    except geometry.GeometryError:
        # Each part was accepted on its own (so, for instance, the union of many large areas may pass
        # the normaliser's share-of-the-globe limit): keep every area rather than drop a warning.
        return _plain_union(geometries)


def _plain_union(geometries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    shapes = [s for g in geometries if (s := _shape(g)) is not None]
    merged = shapely.make_valid(shapely.unary_union(shapes))
    polygons = [p for p in getattr(merged, "geoms", [merged]) if p.geom_type in ("Polygon", "MultiPolygon")]
    out = shapely.unary_union(polygons) if polygons else merged
    result: dict[str, Any] = mapping(out)
    return _lists(result)


def _lists(geojson: Mapping[str, Any]) -> dict[str, Any]:
    """shapely's ``mapping`` gives tuples; the wire wants JSON arrays (and equality with decoded events)."""

    def conv(value: Any) -> Any:
        return [conv(v) for v in value] if isinstance(value, list | tuple) else value

    return {"type": geojson["type"], "coordinates": conv(geojson["coordinates"])}
