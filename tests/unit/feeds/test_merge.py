"""One incident per real-world disaster: joins, near misses, updates and cancels."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from shapely.geometry import Point, shape

from pipeline.domain.feeds.merge import IncidentRegistry, MergeRule, hazard_kind, merge, merge_all
from schemas import Crisis

T0 = datetime(2024, 1, 1, 7, 10, tzinfo=UTC)


def square(lon: float, lat: float, half: float = 0.5) -> dict[str, Any]:
    return {"type": "Polygon", "coordinates": [[[lon - half, lat - half], [lon + half, lat - half], [lon + half, lat + half],
                                                [lon - half, lat + half], [lon - half, lat - half]]]}


def crisis(crisis_id: str, source: str, *, lon: float = 137.2, lat: float = 37.5, at: datetime = T0,
           category: str = "geo", title: str = "M7.5 earthquake, Noto Peninsula", severity: str = "severe",
           version: int | None = None, op: str = "upsert", half: float = 0.5, geometry: Any = "square",
           references: tuple[str, ...] = (), status: str = "actual", expires: datetime | None = None) -> Crisis:
    return Crisis(
        crisis_id=crisis_id, op=op, version=version or int(at.timestamp()), source=source,  # type: ignore[arg-type]
        source_ref=f"{crisis_id}@{version or int(at.timestamp())}", title=title, category=category,
        severity=severity, urgency="immediate", certainty="observed",  # type: ignore[arg-type]
        geometry=square(lon, lat, half) if geometry == "square" else geometry, buffer_km=10.0,
        country_codes=("JP",), effective=at, expires=expires, instruction=f"from {source}", url=f"https://{source}.example/",
        references=references, status=status)


GDACS = crisis("gdacs:EQ:1417367", "gdacs", half=1.5, severity="extreme", title="Red earthquake alert in Japan")
USGS = crisis("usgs:us6000m0xl", "usgs", lon=137.3, lat=37.6, at=T0 + timedelta(minutes=2), half=1.0)
CAP = crisis("cap:jma@example.jp:eq-20240101-1", "cap", lon=137.0, lat=37.3, at=T0 + timedelta(minutes=20), half=0.6,
             title="Gempa bumi / Earthquake: evacuate coastal areas")


def covers(geometry: Any, lon: float, lat: float) -> bool:
    return bool(shape(geometry).covers(Point(lon, lat)))


def test_a_lone_report_is_published_as_the_source_sent_it() -> None:
    out = merge(IncidentRegistry(), USGS)
    assert out.publish == USGS
    assert out.incident_id == USGS.crisis_id


def test_gdacs_usgs_and_cap_reports_of_one_earthquake_become_one_incident() -> None:
    published, registry = merge_all(IncidentRegistry(), [GDACS, USGS, CAP])
    assert [e.crisis_id for e in published] == [GDACS.crisis_id] * 3
    assert [e.version for e in published] == sorted({e.version for e in published})
    final = published[-1]
    assert set(final.references) >= {GDACS.source_ref, USGS.source_ref} and final.source_ref == CAP.source_ref
    # the official alert's text leads, the worst severity wins, every source's area is kept
    assert final.source == "cap" and final.instruction == "from cap"
    assert final.severity == "extreme"
    assert covers(final.geometry, 137.2 + 1.4, 37.5) and covers(final.geometry, 137.0, 37.3)
    assert final.effective == GDACS.effective
    assert len(registry.incidents) == 1


def test_a_later_update_of_one_source_keeps_the_incident_and_never_shrinks_another_source_area() -> None:
    published, registry = merge_all(IncidentRegistry(), [GDACS, USGS])
    update = replace(USGS, version=USGS.version + 600, title="M7.6 earthquake, Noto Peninsula", geometry=square(137.3, 37.6, 0.3))
    out = merge(registry, update)
    assert out.publish is not None
    assert out.publish.crisis_id == GDACS.crisis_id and out.publish.version > published[-1].version
    assert covers(out.publish.geometry, 137.2 + 1.4, 37.5)  # GDACS' wider area still warned


def test_version_is_monotonic_even_when_a_joining_source_has_an_older_clock() -> None:
    early = replace(USGS, crisis_id="usgs:early", version=GDACS.version - 100)
    published, _ = merge_all(IncidentRegistry(), [GDACS, early])
    assert published[1].version == GDACS.version + 1


def test_the_same_event_twice_or_an_older_version_publishes_nothing() -> None:
    _, registry = merge_all(IncidentRegistry(), [GDACS, USGS])
    assert merge(registry, USGS).publish is None
    assert merge(registry, replace(USGS, version=USGS.version - 60, title="stale")).publish is None


def test_a_registry_restored_from_json_still_recognises_what_was_published() -> None:
    _, registry = merge_all(IncidentRegistry(), [GDACS, USGS, CAP])
    restored = IncidentRegistry.from_json(json.loads(json.dumps(registry.to_json())))
    assert [merge(restored, e).publish for e in (GDACS, USGS, CAP)] == [None, None, None]


def test_reports_too_far_apart_in_time_stay_separate() -> None:
    late = replace(USGS, crisis_id="usgs:later", effective=T0 + timedelta(hours=7))
    published, registry = merge_all(IncidentRegistry(), [GDACS, late])
    assert [e.crisis_id for e in published] == [GDACS.crisis_id, "usgs:later"]
    assert len(registry.incidents) == 2


def test_storm_warnings_join_over_days_where_earthquakes_would_not() -> None:
    tc = crisis("gdacs:TC:1000", "gdacs", category="met", title="Tropical cyclone MAWAR", half=2.0)
    warning = crisis("cap:pagasa@example.ph:tc-1", "cap", category="met", title="Typhoon warning",
                     at=T0 + timedelta(hours=48))
    published, _ = merge_all(IncidentRegistry(), [tc, warning])
    assert published[1].crisis_id == tc.crisis_id


def test_reports_too_far_apart_in_space_stay_separate() -> None:
    far = replace(USGS, crisis_id="usgs:far", geometry=square(141.5, 37.5, 0.5))  # gap of ~200 km
    published, _ = merge_all(IncidentRegistry(), [GDACS, far])
    assert published[1].crisis_id == "usgs:far"


def test_other_category_other_hazard_or_other_status_stay_separate() -> None:
    flood = crisis("cap:bmkg@example.id:fl-1", "cap", category="met", title="Flood warning")
    tsunami = crisis("cap:jma@example.jp:ts-1", "cap", title="Tsunami warning")
    drill = replace(CAP, crisis_id="cap:drill@example.jp:x", status="exercise")
    for other in (flood, tsunami, drill):
        published, _ = merge_all(IncidentRegistry(), [GDACS, other])
        assert published[1].crisis_id == other.crisis_id, other.title


def test_two_events_of_the_same_source_are_distinct_incidents() -> None:
    aftershock = replace(USGS, crisis_id="usgs:aftershock", effective=T0 + timedelta(minutes=40))
    published, _ = merge_all(IncidentRegistry(), [USGS, aftershock])
    assert published[1].crisis_id == "usgs:aftershock"


def test_news_items_about_one_disaster_all_join_it() -> None:
    news = [crisis(f"rss:bbc:{n}", "rss", at=T0 + timedelta(hours=1), title="Powerful quake hits Japan", half=0.3)
            for n in range(2)]
    published, _ = merge_all(IncidentRegistry(), [GDACS, *news])
    assert {e.crisis_id for e in published} == {GDACS.crisis_id}


def test_arealess_reports_and_advisories_never_merge() -> None:
    arealess = replace(CAP, geometry=None)
    advisory = crisis("advisory:ca:JP", "advisory", category="safety", title="Avoid non-essential travel")
    for other in (arealess, advisory):
        published, _ = merge_all(IncidentRegistry(), [GDACS, other])
        assert published[1].crisis_id == other.crisis_id


def test_reports_either_side_of_the_antimeridian_merge() -> None:
    east = crisis("gdacs:EQ:9", "gdacs", lon=179.8, lat=-17.0, half=0.1, title="Earthquake Fiji")
    west = crisis("usgs:fiji", "usgs", lon=-179.8, lat=-17.0, half=0.1)
    published, _ = merge_all(IncidentRegistry(), [east, west])
    assert published[1].crisis_id == east.crisis_id


def test_cancelling_one_source_republishes_the_incident_without_its_area() -> None:
    published, registry = merge_all(IncidentRegistry(), [GDACS, USGS, CAP])
    cancel = crisis(CAP.crisis_id, "cap", op="cancel", geometry=None, title="", at=T0 + timedelta(hours=1),
                    references=(CAP.source_ref,))
    out = merge(registry, cancel)
    assert out.publish is not None
    assert out.publish.op == "upsert" and out.publish.crisis_id == GDACS.crisis_id
    assert out.publish.version > published[-1].version
    assert out.publish.source == "gdacs"  # the cancelled alert no longer leads
    assert cancel.source_ref in out.publish.references


def test_cancelling_every_source_cancels_the_incident() -> None:
    _, registry = merge_all(IncidentRegistry(), [GDACS, CAP])
    gdacs_end = replace(GDACS, op="cancel", version=GDACS.version + 3600)
    # a CAP Cancel carries no <info>: no area, no title
    cap_end = crisis(CAP.crisis_id, "cap", op="cancel", geometry=None, title="", at=T0 + timedelta(hours=2))
    published, registry = merge_all(registry, [gdacs_end, cap_end])
    assert [e.op for e in published] == ["upsert", "cancel"]
    assert published[1].crisis_id == GDACS.crisis_id and published[1].title
    assert published[1].geometry is not None
    assert merge(registry, cap_end).publish is None


def test_an_update_after_a_cancel_stays_on_the_same_incident() -> None:
    _, registry = merge_all(IncidentRegistry(), [USGS, replace(USGS, op="cancel", version=USGS.version + 10)])
    out = merge(registry, replace(USGS, version=USGS.version + 20))
    assert out.publish is not None and out.publish.op == "upsert" and out.publish.crisis_id == USGS.crisis_id


def test_a_cancel_of_an_unknown_report_is_passed_on_once() -> None:
    cancel = crisis("cap:nv@example.gov:old", "cap", op="cancel", geometry=None, title="")
    out = merge(IncidentRegistry(), cancel)
    assert out.publish == cancel
    assert merge(out.registry, cancel).publish is None


def test_pruning_forgets_ended_incidents_but_keeps_open_ones() -> None:
    ended = replace(CAP, crisis_id="cap:x@example:1", expires=T0 + timedelta(hours=3))
    _, registry = merge_all(IncidentRegistry(), [USGS, ended], MergeRule(window_by_category={}, window=timedelta(0)))
    pruned = registry.prune(T0 + timedelta(days=31))
    assert set(pruned.incidents) == {USGS.crisis_id}


def test_pruning_keeps_old_events_that_their_feed_still_lists() -> None:
    # a drought that began months ago and was cancelled today is still in the source's weekly feed
    old_cancel = crisis("gdacs:DR:1015559", "gdacs", category="env", title="Drought", op="cancel",
                        at=T0 - timedelta(days=300), version=int(T0.timestamp()))
    now = T0 + timedelta(hours=1)
    out = merge(IncidentRegistry(), old_cancel, now=now)
    registry = out.registry.prune(now)
    assert merge(registry, old_cancel, now=now + timedelta(days=20)).publish is None
    restored = IncidentRegistry.from_json(json.loads(json.dumps(registry.to_json())))
    assert set(restored.prune(now + timedelta(days=29)).incidents) == {old_cancel.crisis_id}
    assert restored.prune(now + timedelta(days=31)).incidents == {}


def test_hazard_kind_reads_gdacs_types_and_titles_in_several_languages() -> None:
    assert hazard_kind(GDACS) == "earthquake"
    assert hazard_kind(crisis("cap:a:b", "cap", title="Peringatan banjir bandang")) == "flood"
    assert hazard_kind(crisis("cap:a:b", "cap", title="Tsunami warning after earthquake")) == "tsunami"
    assert hazard_kind(crisis("cap:a:b", "cap", title="Heat advisory")) is None
