"""The worker runtime without Faust: state in a dict, output through the in-memory emitter."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

import pytest
from kafka.errors import KafkaTimeoutError
from prometheus_client import CollectorRegistry

from pipeline.app import EXIT_UNFINISHED, finish_or_exit
from pipeline.domain.tracking import GeofenceConfig
from pipeline.metrics import WorkerMetrics
from pipeline.runtime import DurableStates, GeofenceRuntime, MemoryEmitter, RawMessage
from pipeline.testing import T0, make_checkin, make_crisis, square
from schemas import Checkin, Crisis, encode

AREA = square(106.8, -6.2, 0.1)


def runtime_at(states: dict, now_offset: timedelta) -> tuple[GeofenceRuntime, MemoryEmitter]:  # type: ignore[type-arg]
    emitter = MemoryEmitter()
    runtime = GeofenceRuntime(GeofenceConfig(), states, emitter, WorkerMetrics(CollectorRegistry()),
                              clock=lambda: T0 + now_offset)
    return runtime, emitter


async def test_all_clear_for_a_crisis_that_ended_while_the_worker_was_away() -> None:
    states: dict = {}  # type: ignore[type-arg]
    before, first = runtime_at(states, timedelta(minutes=1))
    flood = make_crisis("flood", AREA, effective=T0, expires=T0 + timedelta(hours=1))
    before.remember([flood])
    await before.process_checkins([RawMessage(encode(make_checkin("a", -6.2, 106.8)), b"a")])
    assert [w.kind for w in first.sent] == ["entered"]

    # restarted two hours later: the table comes back, the crisis log says the flood has expired
    after, second = runtime_at(states, timedelta(hours=2))
    after.remember([flood])
    await after.reconcile()
    assert [(w.citizen_id, w.kind) for w in second.sent] == [("a", "all_clear")]
    await after.reconcile()
    assert len(second.sent) == 1  # said once


async def test_cancel_replayed_from_the_log_after_a_restart_still_clears() -> None:
    states: dict = {}  # type: ignore[type-arg]
    before, _ = runtime_at(states, timedelta(minutes=1))
    before.remember([make_crisis("flood", AREA, effective=T0)])
    await before.process_checkins([RawMessage(encode(make_checkin("a", -6.2, 106.8)), b"a")])
    after, emitter = runtime_at(states, timedelta(minutes=30))
    after.remember([make_crisis("flood", AREA, effective=T0),
                    make_crisis("flood", None, op="cancel", version=2, effective=T0)])
    await after.reconcile()
    assert [(w.citizen_id, w.kind) for w in emitter.sent] == [("a", "all_clear")]


class SlowStates(DurableStates):
    """A mapping whose writes become durable only when ``persisted`` runs (like a changelog)."""

    def __init__(self, fail: bool = False) -> None:
        self.data: dict[str, object] = {}
        self.durable: dict[str, object] = {}
        self.fail = fail

    def __getitem__(self, key: str) -> object:
        return self.data[key]

    def __setitem__(self, key: str, value: object) -> None:
        self.data[key] = value

    def __delitem__(self, key: str) -> None:
        del self.data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    async def persisted(self) -> None:
        if self.fail:
            raise KafkaTimeoutError("changelog write not acknowledged")
        self.durable = dict(self.data)


async def test_a_batch_returns_only_once_the_new_states_are_durable() -> None:
    states = SlowStates()
    runtime = GeofenceRuntime(GeofenceConfig(), states, MemoryEmitter(), WorkerMetrics(CollectorRegistry()),
                              clock=lambda: T0)
    runtime.remember([make_crisis("flood", AREA, effective=T0)])
    await runtime.process_checkins([RawMessage(encode(make_checkin(c, -6.2, 106.8)), c.encode()) for c in "ab"])
    assert set(states.durable) == {"a", "b"} and states.durable == states.data


async def test_a_state_write_kafka_refuses_fails_the_batch_and_the_worker_exits_uncommitted() -> None:
    emitter = MemoryEmitter()
    runtime = GeofenceRuntime(GeofenceConfig(), SlowStates(fail=True), emitter, WorkerMetrics(CollectorRegistry()),
                              clock=lambda: T0)
    runtime.remember([make_crisis("flood", AREA, effective=T0)])
    exits: list[int] = []
    await finish_or_exit(runtime.process_checkins([RawMessage(encode(make_checkin("a", -6.2, 106.8)), b"a")]),
                         "a batch", exits.append)
    assert exits == [EXIT_UNFINISHED]
    assert [w.kind for w in emitter.sent] == ["entered"]  # sent first: the re-run repeats the same warning id

    await finish_or_exit(asyncio.sleep(0), "nothing", exits.append)
    assert exits == [EXIT_UNFINISHED]  # work that finishes never exits


# --- bad data never stops the worker (pipeline.stage) --------------------------------------------------

# Unrepaired, as only a crisis object built in-process (never decoded) can hold it: decoding repairs it.
BOW_TIE = {"type": "Polygon", "coordinates": [[[106.7, -6.3], [106.9, -6.1], [106.9, -6.3], [106.7, -6.1], [106.7, -6.3]]]}
POINT_RING = {"type": "Polygon", "coordinates": [[[106.8, -6.2], [106.8, -6.2], [106.8, -6.2], [106.8, -6.2]]]}


def checkin_message(citizen_id: str, lat: float = -6.2, lon: float = 106.8, offset: int = 0) -> RawMessage:
    return RawMessage(encode(make_checkin(citizen_id, lat, lon)), citizen_id.encode(), "checkins", 0, None, offset)


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def isolated_runtime(states: dict | None = None) -> tuple[GeofenceRuntime, MemoryEmitter, CollectorRegistry]:  # type: ignore[type-arg]
    registry = CollectorRegistry()
    emitter = MemoryEmitter()
    runtime = GeofenceRuntime(GeofenceConfig(), {} if states is None else states, emitter, WorkerMetrics(registry),
                              clock=lambda: T0 + timedelta(minutes=1))
    return runtime, emitter, registry


async def test_a_checkin_the_tracker_raises_on_is_dead_lettered_and_the_rest_of_its_batch_warned(
        monkeypatch: pytest.MonkeyPatch) -> None:
    runtime, emitter, registry = isolated_runtime()
    runtime.remember([make_crisis("flood", AREA, effective=T0)])
    geofence = runtime.tracker.on_checkins

    def fails_for_one_citizen(checkins: Sequence[Checkin], *args: Any) -> Any:
        if any(c.citizen_id == "poison" for c in checkins):
            raise ZeroDivisionError("a fault no one foresaw")
        return geofence(checkins, *args)

    monkeypatch.setattr(runtime.tracker, "on_checkins", fails_for_one_citizen)
    names = [f"c{i}" for i in range(7)]
    batch = [checkin_message(c, offset=i) for i, c in enumerate([*names[:3], "poison", *names[3:]])]
    warnings = await runtime.process_checkins(batch)

    [letter] = emitter.dead
    assert letter.raw is batch[3] and letter.stage == "locate"
    assert letter.reason == "ZeroDivisionError: a fault no one foresaw" and letter.error_type == "ZeroDivisionError"
    assert sorted((w.citizen_id, w.kind) for w in emitter.sent) == [(c, "entered") for c in names]  # each once
    assert warnings == tuple(emitter.sent)
    assert set(runtime.states) == set(names)
    assert sample(registry, "crisiswatch_dlq_messages_total", stage="locate", reason="ZeroDivisionError") == 1
    assert sample(registry, "crisiswatch_stage_isolations_total", stage="locate") == 1
    assert sample(registry, "crisiswatch_checkins_processed_total") == 7


async def test_deeply_nested_json_is_dead_lettered_and_the_batch_goes_on() -> None:
    runtime, emitter, _ = isolated_runtime()
    runtime.remember([make_crisis("flood", AREA, effective=T0)])
    deep = RawMessage(b'{"schema":"checkin/1","lat":' + b"[" * 5000 + b"]" * 5000 + b"}", b"d", "checkins", 1, None, 9)
    await runtime.process_checkins([deep, checkin_message("a")])
    [letter] = emitter.dead
    assert letter.raw is deep and letter.error_type == "schemas.codec.InvalidEvent"
    assert letter.reason == "InvalidEvent: $: arrays and objects nested more than 64 levels deep"
    assert [(w.citizen_id, w.kind) for w in emitter.sent] == [("a", "entered")]


async def test_an_outage_raises_and_nothing_is_dead_lettered() -> None:
    runtime = GeofenceRuntime(GeofenceConfig(), SlowStates(fail=True), MemoryEmitter(), WorkerMetrics(CollectorRegistry()),
                              clock=lambda: T0)
    runtime.remember([make_crisis("flood", AREA, effective=T0)])
    with pytest.raises(KafkaTimeoutError):
        await runtime.process_checkins([checkin_message("a"), checkin_message("b")])
    assert runtime.emitter.dead == []  # type: ignore[attr-defined]


async def test_a_crisis_whose_geometry_cannot_be_used_is_dead_lettered_and_geofencing_goes_on() -> None:
    runtime, emitter, registry = isolated_runtime()
    await runtime.process_checkins([checkin_message("a")])  # inside the area before any crisis
    bad = RawMessage(encode(make_crisis("point", POINT_RING, effective=T0)), b"point", "crisis-events", 2, None, 5)
    await runtime.apply_crisis_messages([bad, RawMessage(encode(make_crisis("flood", AREA, effective=T0)), b"flood")])

    [letter] = emitter.dead
    assert letter.raw is bad and letter.stage == "crisis"
    assert letter.reason == "InvalidEvent: $.geometry: empty geometry: no ring with an area" and letter.label == "$.geometry"
    assert set(runtime.tracker.crises) == {"flood"}
    assert [(w.citizen_id, w.crisis_id, w.kind) for w in emitter.sent] == [("a", "flood", "inside")]
    await runtime.process_checkins([checkin_message("b")])
    assert [(w.citizen_id, w.kind) for w in emitter.sent][-1] == ("b", "entered")
    assert sample(registry, "crisiswatch_dlq_messages_total", stage="crisis", reason="$.geometry") == 1


async def test_a_crisis_title_no_warning_can_carry_is_dead_lettered_once_a_citizen_is_inside() -> None:
    runtime, emitter, _ = isolated_runtime()
    await runtime.process_checkins([checkin_message("a")])
    before = dict(runtime.states)
    surrogate = encode(make_crisis("lone", AREA, effective=T0)).replace(b'"title":"Flooding"', b'"title":"\\ud800"')
    await runtime.apply_crisis_messages([RawMessage(surrogate, b"lone", "crisis-events")])
    [letter] = emitter.dead
    assert letter.reason == "InvalidEvent: $.title: lone surrogate U+D800 is not valid Unicode in text"
    assert letter.error_type == "schemas.codec.InvalidEvent"
    assert runtime.tracker.crises == {} and runtime.states == before and emitter.sent == []


async def test_applying_a_crisis_that_raises_puts_the_crisis_table_back() -> None:
    """Admission rehearses what can break; should a crisis get past it and break the index, the table
    is put back as it was, so every later check-in is still geofenced against the others."""
    runtime, emitter, registry = isolated_runtime()
    await runtime.apply_crisis(make_crisis("flood", AREA, effective=T0))
    assert await runtime.apply_crisis(make_crisis("bowtie", BOW_TIE, effective=T0)) == ()
    assert set(runtime.tracker.crises) == {"flood"} and "bowtie" not in runtime.tracker.ended
    assert sample(registry, "crisiswatch_stage_skipped_total", stage="crisis-reader", reason="ValueError") == 1
    await runtime.process_checkins([checkin_message("a")])
    assert [(w.citizen_id, w.kind) for w in emitter.sent] == [("a", "entered")] and emitter.dead == []


async def test_a_crisis_that_breaks_a_sweep_is_skipped_and_the_other_crises_swept(monkeypatch: pytest.MonkeyPatch) -> None:
    states: dict = {}  # type: ignore[type-arg]
    runtime, emitter, registry = isolated_runtime(states)
    await runtime.process_checkins([checkin_message("a")])
    runtime.remember([make_crisis("flood", AREA, effective=T0), make_crisis("fire", AREA, effective=T0)])
    sweep = runtime.tracker.on_upsert

    def fails_for_flood(crisis: Crisis, *args: Any) -> Any:
        if crisis.crisis_id == "flood":
            raise KeyError("presence")
        return sweep(crisis, *args)

    monkeypatch.setattr(runtime.tracker, "on_upsert", fails_for_flood)
    await runtime.reconcile()
    assert [(w.crisis_id, w.kind) for w in emitter.sent] == [("fire", "inside")]
    assert sample(registry, "crisiswatch_stage_skipped_total", stage="sweep", reason="KeyError") == 1
    monkeypatch.setattr(runtime.tracker, "on_upsert", sweep)
    await runtime.reconcile()  # the next reconcile sends what was missed
    assert sorted((w.crisis_id, w.kind) for w in emitter.sent) == [("fire", "inside"), ("flood", "inside")]


async def test_a_citizen_that_breaks_a_sweep_is_skipped_and_the_others_told(monkeypatch: pytest.MonkeyPatch) -> None:
    runtime, emitter, registry = isolated_runtime()
    await runtime.process_checkins([checkin_message(c) for c in ("a", "poison", "b")])
    sweep = runtime.tracker.on_upsert

    def fails_for_one_citizen(crisis: Crisis, states: Sequence[Any], now: Any) -> Any:
        if any(s.citizen_id == "poison" for s in states):
            raise IndexError("a fault no one foresaw")
        return sweep(crisis, states, now)

    monkeypatch.setattr(runtime.tracker, "on_upsert", fails_for_one_citizen)
    await runtime.apply_crisis(make_crisis("flood", AREA, effective=T0))
    assert sorted((w.citizen_id, w.kind) for w in emitter.sent) == [("a", "inside"), ("b", "inside")]
    assert set(runtime.tracker.crises) == {"flood"}  # the crisis itself is fine: it stays active
    assert sample(registry, "crisiswatch_stage_skipped_total", stage="sweep", reason="IndexError") == 1
    assert emitter.dead == []  # no message is at fault


async def test_an_expiry_sweep_that_raises_does_not_stop_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    runtime, emitter, _ = isolated_runtime()
    runtime.remember([make_crisis("flood", AREA, effective=T0, expires=T0 + timedelta(minutes=2)),
                      make_crisis("fire", AREA, effective=T0, expires=T0 + timedelta(minutes=2))])
    await runtime.process_checkins([checkin_message("a")])
    end = runtime.tracker.on_end

    def fails_for_fire(crisis: Crisis, *args: Any) -> Any:
        if crisis.crisis_id == "fire":
            raise ValueError("broken")
        return end(crisis, *args)

    monkeypatch.setattr(runtime.tracker, "on_end", fails_for_fire)
    runtime.clock = lambda: T0 + timedelta(minutes=3)
    await runtime.expire()
    assert [(w.crisis_id, w.kind) for w in emitter.sent if w.kind == "all_clear"] == [("flood", "all_clear")]
