"""The worker runtime without Faust: state in a dict, output through the in-memory emitter."""

from __future__ import annotations

from datetime import timedelta

from prometheus_client import CollectorRegistry

from pipeline.domain.tracking import GeofenceConfig
from pipeline.metrics import WorkerMetrics
from pipeline.runtime import GeofenceRuntime, MemoryEmitter, RawMessage
from pipeline.testing import T0, make_checkin, make_crisis, square
from schemas import encode

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
