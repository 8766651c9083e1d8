"""USGS earthquake GeoJSON summary feeds (``earthquake.usgs.gov/earthquakes/feed/v1.0/summary/*.geojson``).

Identity. ``crisis_id`` is ``usgs:<id>`` with the feature's ``id``, the event's *preferred* id.
Every id the event is known by (``properties.ids``, e.g. ``,at00q7qai7,pt20085000,us70008fi4,``)
goes to ``references`` as ``usgs:<id>``, so a consumer can link the crisis to one announced under
another network's id. ``version`` is ``properties.updated`` in whole epoch seconds.

Area. The crisis area is where shaking of Modified Mercalli intensity V or more ("felt by nearly
everyone; some dishes and windows broken") is expected, from the hypocentral intensity
prediction equation of

    Allen, T. I., Wald, D. J. and Worden, C. B. (2012). Intensity attenuation for active crustal
    regions. Journal of Seismology 16, 409-433. doi:10.1007/s10950-012-9278-7

    MMI = c0 + c1·M + c2·ln(√(R² + Rm²)) [+ c4·ln(R/50) when R > 50 km],  Rm = m1 + m2·e^(M-5)

with R the hypocentral distance in km and c0 = 2.085, c1 = 1.428, c2 = -1.402, c4 = 0.078, m1 =
-0.209, m2 = 2.042 (their Table 3, no site term). The equation is calibrated on shallow crustal
events and under-predicts the shaking of intermediate-depth (in-slab) earthquakes, so the depth
used is capped at 70 km, the conventional lower limit of shallow-focus earthquakes: an M6.3 at
100 km under Papua New Guinea keeps an area, an M6.0 at 630 km under Fiji (not felt strongly
anywhere) still does not. The epicentral radius is √(R² - depth²), drawn as a geodesic circle by
:func:`pipeline.domain.geometry.circle`. The proximity band ``buffer_km`` reaches out to
intensity IV ("light": felt indoors by many). Deep earthquakes thus get smaller areas than
shallow ones of the same magnitude. An event whose predicted intensity stays below V even at the
epicentre, or that is not an earthquake (quarry blast, explosion), is no crisis: it is emitted
as ``op: cancel`` so that an event revised downwards ends a crisis announced earlier (a cancel
of a never-announced crisis is a no-op).

Severity is the higher of
- the PAGER alert (estimated losses): green -> minor, yellow -> moderate, orange -> severe,
  red -> extreme;
- the USGS magnitude class: below 5 (light/minor) -> minor, 5-5.9 (moderate) -> moderate,
  6-6.9 (strong) -> severe, 7 or more (major/great) -> extreme;
and when ``tsunami`` is 1 (the event is in a region where the tsunami warning centres issue
messages) at least severe, urgency immediate and a tsunami instruction.

Lifecycle. ``effective`` is the origin time; ``expires`` is 72 hours after it (the period in which
aftershocks are most frequent and consular staff check on citizens). An event already expired at
``ctx.now`` yields nothing (a note says so): the summary feeds list a whole week.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from pipeline.domain import countries, geometry
from pipeline.domain.feeds.base import FeedError, ParseContext, ParseResult, Rejection, Skipped
from schemas import Crisis
from schemas.models import Severity

EXPIRES_AFTER = timedelta(hours=72)
AREA_INTENSITY = 5.0  # MMI V
BUFFER_INTENSITY = 4.0  # MMI IV
MAX_BUFFER_KM = 1000.0
MAX_EFFECTIVE_DEPTH_KM = 70.0

# Allen, Wald & Worden (2012), hypocentral-distance model, Table 3.
_C0, _C1, _C2, _C4, _M1, _M2 = 2.085, 1.428, -1.402, 0.078, -0.209, 2.042

_PAGER_SEVERITY: dict[str, Severity] = {"green": "minor", "yellow": "moderate", "orange": "severe", "red": "extreme"}
_RANK: dict[Severity, int] = {"unknown": 0, "minor": 1, "moderate": 2, "severe": 3, "extreme": 4}


def intensity(magnitude: float, hypocentral_km: float) -> float:
    """Predicted Modified Mercalli intensity at a hypocentral distance (Allen et al. 2012)."""
    rm = _M1 + _M2 * math.exp(magnitude - 5.0)
    mmi = _C0 + _C1 * magnitude + _C2 * math.log(math.sqrt(hypocentral_km**2 + rm**2))
    if hypocentral_km > 50.0:
        mmi += _C4 * math.log(hypocentral_km / 50.0)
    return mmi


def felt_radius_km(magnitude: float, depth_km: float, mmi: float) -> float | None:
    """Epicentral distance (km) out to which intensity ``mmi`` is expected; ``None`` if not even at the epicentre."""
    depth = min(max(depth_km, 0.0), MAX_EFFECTIVE_DEPTH_KM)
    if intensity(magnitude, depth) < mmi:
        return None
    low, high = depth, 5000.0
    if intensity(magnitude, high) >= mmi:
        return math.sqrt(high**2 - depth**2)
    for _ in range(60):  # bisection: intensity falls monotonically with distance
        mid = (low + high) / 2
        if intensity(magnitude, mid) >= mmi:
            low = mid
        else:
            high = mid
    return math.sqrt(max(low**2 - depth**2, 0.0))


def magnitude_severity(magnitude: float) -> Severity:
    if magnitude >= 7.0:
        return "extreme"
    if magnitude >= 6.0:
        return "severe"
    if magnitude >= 5.0:
        return "moderate"
    return "minor"


def severity_for(magnitude: float, pager_alert: str | None, tsunami: bool) -> Severity:
    candidates: list[Severity] = [magnitude_severity(magnitude)]
    if pager_alert:
        candidates.append(_PAGER_SEVERITY.get(pager_alert.lower(), "unknown"))
    if tsunami:
        candidates.append("severe")
    return max(candidates, key=lambda s: _RANK[s])


def sniff(data: bytes) -> bool:
    """Whether a document looks like a USGS earthquake GeoJSON feed."""
    head = data[:4096]
    return b"FeatureCollection" in head and (b"earthquake.usgs.gov" in head or b'"mag"' in head)


def parse(data: bytes, ctx: ParseContext) -> ParseResult:
    if len(data) > ctx.max_bytes:
        raise FeedError(f"document of {len(data)} bytes exceeds the {ctx.max_bytes}-byte limit")
    try:
        document = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FeedError(f"not a USGS GeoJSON feed: invalid JSON ({exc})") from None
    if not isinstance(document, dict) or document.get("type") != "FeatureCollection" or not isinstance(document.get("features"), list):
        raise FeedError("not a USGS GeoJSON feed: no FeatureCollection with a features list")
    events: list[Crisis] = []
    rejected: list[Rejection] = []
    notes: list[str] = []
    skipped: list[Skipped] = []
    for index, feature in enumerate(document["features"]):
        ref = str(feature["id"]) if isinstance(feature, dict) and isinstance(feature.get("id"), str) else f"feature[{index}]"
        try:
            crisis = _crisis(feature, ctx)
        except (ValueError, TypeError, KeyError) as exc:
            rejected.append(Rejection(ref, f"{type(exc).__name__}: {exc}" if isinstance(exc, KeyError) else str(exc)))
            continue
        if crisis is None:
            skipped.append(Skipped(f"usgs:{ref}", "expired"))
            continue
        events.append(crisis)
    return ParseResult(events=tuple(events), rejected=tuple(rejected), notes=tuple(notes), skipped=tuple(skipped))


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{what} is not a number: {value!r}")
    return float(value)


def _epoch_ms(value: Any, what: str) -> datetime:
    ms = _number(value, what)
    try:
        return datetime.fromtimestamp(ms / 1000.0, tz=UTC)
    except (OverflowError, OSError, ValueError):
        raise ValueError(f"{what} out of range: {value!r}") from None


def _crisis(feature: Any, ctx: ParseContext) -> Crisis | None:
    if not isinstance(feature, dict) or not isinstance(feature.get("properties"), Mapping):
        raise ValueError("feature without properties")
    event_id = feature.get("id")
    if not isinstance(event_id, str) or not event_id.strip():
        raise ValueError("feature without an id")
    props: Mapping[str, Any] = feature["properties"]
    point = feature.get("geometry")
    if not isinstance(point, Mapping) or point.get("type") != "Point":
        raise ValueError("no Point geometry")
    coordinates = point.get("coordinates")
    if not isinstance(coordinates, list) or len(coordinates) < 2:
        raise ValueError("Point without coordinates")
    lon, lat = _number(coordinates[0], "longitude"), _number(coordinates[1], "latitude")
    depth = _number(coordinates[2], "depth") if len(coordinates) > 2 and coordinates[2] is not None else 10.0
    magnitude = _number(props.get("mag"), "magnitude")
    origin = _epoch_ms(props.get("time"), "time")
    updated = _epoch_ms(props.get("updated") if props.get("updated") is not None else props.get("time"), "updated")
    version = max(int(updated.timestamp()), 1)
    expires = origin + EXPIRES_AFTER
    if expires <= ctx.now and not ctx.keep_expired:
        return None
    tsunami = props.get("tsunami") in (1, "1", True)
    alert = props.get("alert") if isinstance(props.get("alert"), str) else None
    place = str(props.get("place") or "").strip()
    title = str(props.get("title") or f"M {magnitude:g} - {place}").strip()[:500]
    ids = [i for i in str(props.get("ids") or "").split(",") if i.strip()]
    references = tuple(f"usgs:{i.strip()}" for i in ids if i.strip() != event_id)
    url = str(props.get("url") or f"https://earthquake.usgs.gov/earthquakes/eventpage/{event_id}")[:2048]
    crisis_id = f"usgs:{event_id}"

    radius = felt_radius_km(magnitude, depth, AREA_INTENSITY)
    event_type = str(props.get("type") or "earthquake")
    if radius is None or event_type != "earthquake":
        return Crisis(crisis_id, "cancel", version, "usgs", event_id, title, "geo", "minor", "past", "observed", None, 0.0,
                      (), origin, None, "", url, references)
    area = geometry.circle(lat, lon, radius)
    outer = felt_radius_km(magnitude, depth, BUFFER_INTENSITY) or radius
    severity = severity_for(magnitude, alert, tsunami)
    where = f" {place}" if place else ""
    instruction = (f"A magnitude {magnitude:g} earthquake struck{where} at a depth of {depth:.0f} km. "
                   "Expect aftershocks: stay out of damaged buildings and follow the local authorities.")
    if tsunami:
        instruction += " A tsunami may follow: if you are near the coast, move to high ground and follow tsunami warnings."
    return Crisis(
        crisis_id=crisis_id, op="upsert", version=version, source="usgs", source_ref=event_id, title=title, category="geo",
        severity=severity, urgency="immediate" if tsunami else "past", certainty="observed", geometry=area,
        buffer_km=round(min(max(outer - radius, 0.0), MAX_BUFFER_KM), 1), country_codes=countries.countries_for(area),
        effective=origin, expires=expires, instruction=instruction, url=url, references=references,
    )
