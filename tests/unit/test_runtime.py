"""The worker runtime without Faust: state in a dict, output through the in-memory emitter."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta

from kafka.errors import KafkaTimeoutError
from prometheus_client import CollectorRegistry

from pipeline.app import EXIT_UNFINISHED, finish_or_exit
from pipeline.domain.tracking import GeofenceConfig
from pipeline.metrics import WorkerMetrics
from pipeline.runtime import DurableStates, GeofenceRuntime, MemoryEmitter, RawMessage
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
