"""One validation wherever an event enters: a crisis written straight to Kafka is repaired or refused exactly as
the API would, a check-in from the future never shadows later ones, and the worker dead-letters what it
cannot use and goes on (the issue's messages, one by one, through the runtime with its in-memory twins)."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from pipeline.domain.geometry import normalise_geometry
from pipeline.domain.tracking import GeofenceConfig
from pipeline.domain.validation import EventRules, admit, decode_event, prepare_outgoing
from pipeline.metrics import WorkerMetrics
from pipeline.runtime import GeofenceRuntime, MemoryEmitter, RawMessage
from pipeline.testing import T0, make_checkin, make_crisis, square
from producers.api import parse_crisis
from producers.publisher import Outgoing
from producers.replay import BadLine, read_events
from schemas import Ack, Checkin, Crisis, InvalidEvent, decode, encode

NOW = T0 + timedelta(minutes=10)
BOW_TIE = {"type": "Polygon", "coordinates": [[[106.7, -6.3], [106.9, -6.1], [106.9, -6.3], [106.7, -6.1], [106.7, -6.3]]]}
FOUR_IDENTICAL = {"type": "Polygon", "coordinates": [[[106.8, -6.2], [106.8, -6.2], [106.8, -6.2], [106.8, -6.2]]]}
# Every edge of a ring is the shorter way round (RFC 7946), so the whole globe takes a vertex on the way...
WHOLE_GLOBE = {"type": "Polygon", "coordinates": [[[-180, -89], [0, -89], [180, -89], [180, 89], [0, 89], [-180, 89],
                                                   [-180, -89]]]}
# ...and the plain box from -180 to 180 is an edge of no length: nothing inside.
GLOBE_BOX = {"type": "Polygon", "coordinates": [[[-180, -90], [180, -90], [180, 90], [-180, 90], [-180, -90]]]}
HEMISPHERE_BANDS = {"type": "MultiPolygon", "coordinates": [
    [[[-170.0, -80.0], [-10.0, -80.0], [-10.0, 80.0], [-170.0, 80.0], [-170.0, -80.0]]],
    [[[10.0, -80.0], [170.0, -80.0], [170.0, 80.0], [10.0, 80.0], [10.0, -80.0]]]]}
ACROSS_THE_ANTIMERIDIAN = {"type": "Polygon", "coordinates": [[[178.0, -17.0], [-178.0, -17.0], [-178.0, -19.0],
                                                               [178.0, -19.0], [178.0, -17.0]]]}


def crisis_bytes(geometry: Any, **fields: Any) -> bytes:
    obj = json.loads(encode(make_crisis("k-1", square(0, 0, 1))))
    return json.dumps({**obj, "geometry": geometry, **fields}).encode()


def api_outcome(geometry: Any) -> dict[str, Any] | str:
    """What the API makes of an operator's area: the published geometry, or its refusal."""
    try:
        return dict(parse_crisis({"crisis_id": "k-1", "geometry": geometry}, NOW, lambda: "k-1").geometry or {})
    except InvalidEvent as exc:
        return f"{exc.field}: {exc.reason}"


def stage_outcome(geometry: Any) -> dict[str, Any] | str:
    """What a stage reading crisis-events makes of the same area written there directly."""
    try:
        return dict(decode_event(crisis_bytes(geometry), Crisis, NOW).geometry or {})
    except InvalidEvent as exc:
        return f"{exc.field}: {exc.reason}"


@pytest.mark.parametrize("geometry", [BOW_TIE, FOUR_IDENTICAL, WHOLE_GLOBE, GLOBE_BOX, HEMISPHERE_BANDS,
                                      ACROSS_THE_ANTIMERIDIAN, square(106.8, -6.2, 0.1),
                                      {"type": "Polygon", "coordinates": [[[1, 95], [2, 95], [2, 96], [1, 95]]]}],
                         ids=["bow-tie", "four-identical-points", "whole-globe", "globe-box", "two-hemispheres",
                              "antimeridian", "square", "latitude-out-of-range"])
def test_a_stage_repairs_or_refuses_an_area_exactly_as_the_api_does(geometry: Any) -> None:
    assert stage_outcome(geometry) == api_outcome(geometry)


def test_on_the_wire_a_ring_must_be_geojson_the_api_closes_an_operators_open_ring_before_publishing() -> None:
    open_ring = {"type": "Polygon", "coordinates": [[[106.7, -6.3], [106.9, -6.3], [106.9, -6.1]]]}
    assert isinstance(api_outcome(open_ring), dict)
    assert str(stage_outcome(open_ring)).startswith("$.geometry: ")


def test_the_bow_tie_is_repaired_into_its_two_lobes_and_the_absurd_areas_are_refused_with_the_reason() -> None:
    repaired = stage_outcome(BOW_TIE)
    assert isinstance(repaired, dict) and repaired["type"] == "MultiPolygon" and len(repaired["coordinates"]) == 2
    assert stage_outcome(FOUR_IDENTICAL) == "$.geometry: empty geometry: no ring with an area"
    assert stage_outcome(WHOLE_GLOBE) == "$.geometry: area covers 100.0% of the globe (limit 20%)"
    assert stage_outcome(GLOBE_BOX) == "$.geometry: empty geometry: no ring with an area"
    assert "of the globe (limit 20%)" in str(stage_outcome(HEMISPHERE_BANDS))
    too_detailed = EventRules(max_vertices=4)
    with pytest.raises(InvalidEvent, match="too many vertices"):
        decode_event(crisis_bytes(BOW_TIE), Crisis, NOW, too_detailed)


def test_an_area_already_normalised_is_left_exactly_as_it_was() -> None:
    once = normalise_geometry(BOW_TIE)
    event = decode_event(crisis_bytes(once), Crisis, NOW)
    assert event.geometry == once
    seen, raw = prepare_outgoing(event, NOW)
    assert seen == event and raw == encode(event)


def test_a_cancel_without_an_area_needs_no_geometry() -> None:
    cancel = make_crisis("k-1", None, op="cancel", version=2)
    assert decode_event(encode(cancel), Crisis, NOW) == cancel


def test_replay_reports_what_the_stages_would_dead_letter_and_sends_the_rest_as_written() -> None:
    tomorrow = make_checkin("a", -6.2, 106.8, observed_at=datetime.now(UTC) + timedelta(days=1))
    lines = [crisis_bytes(BOW_TIE), crisis_bytes(WHOLE_GLOBE), encode(tomorrow),
             b'{"schema": "checkin/1", "x": ' + b"[" * 2000 + b"]" * 2000 + b"}"]
    out = list(read_events(lines))
    assert out[0] == Outgoing("crisis-events", b"k-1", lines[0])
    assert [(item.number, item.reason.split(":")[0]) for item in out[1:] if isinstance(item, BadLine)] == [
        (2, "$.geometry"), (3, "$.observed_at"), (4, "$")]


# --- the clock ------------------------------------------------------------------------------------------------


def test_a_checkin_more_than_the_skew_ahead_is_refused_with_the_reason() -> None:
    rules = EventRules(max_future_skew_s=300)
    on_the_edge = make_checkin("a", -6.2, 106.8, observed_at=NOW + timedelta(seconds=300))
    assert decode_event(encode(on_the_edge), Checkin, NOW, rules) == on_the_edge
    with pytest.raises(InvalidEvent) as caught:
        decode_event(encode(make_checkin("a", -6.2, 106.8, observed_at=NOW + timedelta(seconds=301))), Checkin, NOW, rules)
    assert caught.value.field == "$.observed_at"
    assert caught.value.reason.startswith("observed 301 s in the future") and "CRISISWATCH_MAX_FUTURE_SKEW_S" in caught.value.reason


def test_a_reply_from_the_future_is_refused_a_crisis_announced_ahead_is_not() -> None:
    with pytest.raises(InvalidEvent, match=r"\$\.received_at: received 3600 s in the future"):
        admit(Ack("a", "k-1", "safe", NOW + timedelta(hours=1), "app"), NOW)
    storm_next_year = make_crisis("k-2", effective=NOW + timedelta(days=365), expires=NOW + timedelta(days=3650))
    assert admit(storm_next_year, NOW) == storm_next_year


def test_an_event_built_in_process_with_text_that_is_not_unicode_is_refused_not_crashed_on() -> None:
    with pytest.raises(InvalidEvent) as caught:
        prepare_outgoing(make_crisis("k-1", title="Banjir \ud800"), NOW)
    assert caught.value.field == "$.title" and "lone surrogate" in caught.value.reason
    with pytest.raises(InvalidEvent, match=r"\$\.instruction: NUL"):
        prepare_outgoing(replace(make_crisis("k-1"), instruction="a\x00b"), NOW)


# --- the worker: every message of the issue is dead-lettered or repaired, and the worker goes on -----------------


def worker() -> tuple[GeofenceRuntime, MemoryEmitter]:
    emitter = MemoryEmitter()
    runtime = GeofenceRuntime(GeofenceConfig(), {}, emitter, WorkerMetrics(CollectorRegistry()), clock=lambda: NOW,
                              rules=EventRules(max_future_skew_s=300))
    return runtime, emitter


async def test_the_worker_geofences_the_repaired_bow_tie_like_the_api_area() -> None:
    runtime, emitter = worker()
    await runtime.apply_crisis_messages([RawMessage(crisis_bytes(BOW_TIE), b"k-1")])
    assert emitter.dead == []
    await runtime.process_checkins([RawMessage(encode(make_checkin("left", -6.2, 106.72, observed_at=T0)), b"left"),
                                    RawMessage(encode(make_checkin("right", -6.2, 106.88, observed_at=T0)), b"right"),
                                    RawMessage(encode(make_checkin("gap", -6.28, 106.8, observed_at=T0)), b"gap")])
    assert sorted((w.citizen_id, w.kind) for w in emitter.sent) == [("left", "entered"), ("right", "entered")]


@pytest.mark.parametrize(("value", "reason"), [
    (crisis_bytes(FOUR_IDENTICAL), "$.geometry: empty geometry"),
    (crisis_bytes(WHOLE_GLOBE), "$.geometry: area covers 100.0% of the globe"),
    (crisis_bytes(GLOBE_BOX), "$.geometry: empty geometry"),
    (crisis_bytes(square(106.8, -6.2, 0.1))[:-1] + b', "extra": ' + b"[" * 1000 + b"]" * 1000 + b"}", "levels deep"),
    (crisis_bytes(square(106.8, -6.2, 0.1), title="\ud800"), "$.title: lone surrogate"),
    (crisis_bytes(square(106.8, -6.2, 0.1), version=10**30), "$.version: integer"),
    (crisis_bytes(square(106.8, -6.2, 0.1), source_ref="a\u0000b"), "$.source_ref: NUL"),
], ids=["four-identical-points", "whole-globe", "globe-box", "deep-nesting", "lone-surrogate", "huge-version", "nul"])
async def test_a_poisonous_crisis_is_dead_lettered_and_the_next_one_still_warns(value: bytes, reason: str) -> None:
    runtime, emitter = worker()
    await runtime.process_checkins([RawMessage(encode(make_checkin("a", -6.2, 106.8, observed_at=T0)), b"a")])
    good = make_crisis("k-2", square(106.8, -6.2, 0.1), title="Banjir \U0001f30a")
    warnings = await runtime.apply_crisis_messages([RawMessage(value, b"k-1"), RawMessage(encode(good), b"k-2")])
    assert len(emitter.dead) == 1
    assert emitter.dead[0].reason.startswith("InvalidEvent: ") and reason in emitter.dead[0].reason
    assert [(w.citizen_id, w.crisis_id, w.kind) for w in warnings] == [("a", "k-2", "inside")]
    assert all(decode(encode(w), type(w)) == w for w in warnings)  # the warning itself encodes


async def test_a_checkin_dated_9999_is_dead_lettered_and_never_shadows_the_next_one() -> None:
    runtime, emitter = worker()
    runtime.remember([make_crisis("k-1", square(106.8, -6.2, 0.1))])
    issue = encode(make_checkin("a", -6.2, 106.8)).replace(b"2026-01-01T12:00:00Z", b"9999-12-31T00:00:00Z")
    ahead = encode(make_checkin("a", -6.2, 106.8, observed_at=T0.replace(year=9000)))
    await runtime.process_checkins([RawMessage(issue, b"a"), RawMessage(ahead, b"a")])
    assert [letter.reason.split(":")[0:2] for letter in emitter.dead] == [["InvalidEvent", " $.observed_at"]] * 2
    assert "out of range" in emitter.dead[0].reason and "in the future" in emitter.dead[1].reason
    assert emitter.sent == []

    await runtime.process_checkins([RawMessage(encode(make_checkin("a", -6.2, 106.8, observed_at=NOW)), b"a")])
    assert [(w.citizen_id, w.kind) for w in emitter.sent] == [("a", "entered")]
