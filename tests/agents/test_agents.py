"""The Faust agents in Faust's own test harness (``agent.test_context()``): messages go in
through the agent, the runtime's Kafka emitter is swapped for its in-memory twin."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from pipeline.app import create_app
from pipeline.runtime import DeadLetter, GeofenceRuntime, MemoryEmitter
from pipeline.settings import Settings
from pipeline.testing import T0, make_checkin, make_crisis, square
from schemas import encode


@pytest.fixture
def worker() -> Iterator[tuple[Any, GeofenceRuntime, MemoryEmitter]]:
    settings = Settings.from_env({"CRISISWATCH_KAFKA_BOOTSTRAP": "127.0.0.1:1", "CRISISWATCH_BATCH_WAIT_S": "0.01"})
    app, runtime = create_app(settings, clock=lambda: T0 + timedelta(minutes=5))
    app.finalize()
    app.conf.store = "memory://"
    app.flow_control.resume()
    emitter = MemoryEmitter()
    runtime.emitter = emitter
    runtime.states = {}  # the table's in-memory twin
    runtime.crises_loaded.set()
    yield app, runtime, emitter


async def test_locate_agent_warns_a_citizen_who_checks_in_inside(worker: tuple[Any, GeofenceRuntime, MemoryEmitter]) -> None:
    app, runtime, emitter = worker
    runtime.remember([make_crisis("flood", square(106.8, -6.2, 0.1))])
    async with app.agents["locate"].test_context() as agent:
        await agent.put(encode(make_checkin("a", -6.2, 106.8)), key=b"a")
        await agent.put(encode(make_checkin("b", -7.5, 106.8)), key=b"b")
        await agent.put(encode(make_checkin("a", -6.21, 106.8, observed_at=T0 + timedelta(minutes=1))), key=b"a")
    assert [(w.citizen_id, w.kind) for w in emitter.sent] == [("a", "entered")]
    assert set(runtime.states) == {"a", "b"}


async def test_locate_agent_dead_letters_bad_checkins_and_keeps_going(
        worker: tuple[Any, GeofenceRuntime, MemoryEmitter]) -> None:
    app, runtime, emitter = worker
    runtime.remember([make_crisis("flood", square(106.8, -6.2, 0.1))])
    async with app.agents["locate"].test_context() as agent:
        await agent.put(b"\xff\xfe not json", key=b"x")
        await agent.put(encode(make_checkin("a", -6.2, 106.8))[:-1] + b',"lat":91}', key=b"a")
        await agent.put(encode(make_checkin("c", -6.2, 106.8)), key=b"c")
    assert [letter.stage for letter in emitter.dead] == ["locate", "locate"]
    assert "not JSON" in emitter.dead[0].reason and "$.lat" in emitter.dead[1].reason
    assert [(w.citizen_id, w.kind) for w in emitter.sent] == [("c", "entered")]


async def test_crisis_agent_dead_letters_invalid_crisis_events(worker: tuple[Any, GeofenceRuntime, MemoryEmitter]) -> None:
    app, _, emitter = worker
    async with app.agents["crisis"].test_context() as agent:
        await agent.put(b'{"schema":"crisis/1","crisis_id":"x"}', key=b"x")
        await agent.put(encode(make_crisis("ok")), key=b"ok")
    assert len(emitter.dead) == 1
    assert emitter.dead[0].stage == "crisis" and "required" in emitter.dead[0].reason


async def test_crisis_agent_dead_letters_a_crisis_it_cannot_apply(worker: tuple[Any, GeofenceRuntime, MemoryEmitter]) -> None:
    """Admission rehearses the crisis: a geometry the index refuses is dead-lettered by the agent, with
    the same verdict every worker's crisis reader reaches (so they skip it, and it is dead-lettered once)."""
    app, runtime, emitter = worker
    ring = {"type": "Polygon", "coordinates": [[[106.8, -6.2], [106.8, -6.2], [106.8, -6.2], [106.8, -6.2]]]}
    async with app.agents["crisis"].test_context() as agent:
        await agent.put(encode(make_crisis("point", ring)), key=b"point")
        await agent.put(b'{"schema":"crisis/1","x":' + b"[" * 5000 + b"]" * 5000 + b"}", key=b"deep")
    assert [(d.raw.key, d.stage, d.error_type) for d in emitter.dead] == [
        (b"point", "crisis", "schemas.codec.InvalidEvent"), (b"deep", "crisis", "schemas.codec.InvalidEvent")]
    assert isinstance(runtime.admit_crisis(emitter.dead[0].raw, "crisis-reader"), DeadLetter)
