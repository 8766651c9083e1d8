"""Check-ins processed without settling (the locate agent's chunks, :meth:`GeofenceRuntime.settle`):
the next chunk is geofenced while the state records of the one before are on their way, and still a
chunk's warnings are acknowledged before its state records are handed over, those before the next
chunk's, and nothing counts as done (offsets) before every one of them is durable."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import Any

import pytest
from kafka.errors import KafkaTimeoutError
from prometheus_client import CollectorRegistry

from pipeline.app import EXIT_UNFINISHED, finish_or_exit
from pipeline.domain.tracking import GeofenceConfig
from pipeline.metrics import WorkerMetrics
from pipeline.runtime import GeofenceRuntime, RawMessage
from pipeline.testing import T0, make_checkin, make_crisis, square
from schemas import Warning, encode
from tests.unit.test_runtime import SlowStates  # the same mapping; its writes are acknowledged on cue here

AREA = square(106.8, -6.2, 0.1)


class Journal:
    """What happened, in order: warnings acknowledged, state records handed, state records durable."""

    def __init__(self) -> None:
        self.events: list[tuple[str, tuple[str, ...]]] = []


class JournalEmitter:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    async def warnings(self, warnings: Sequence[Warning]) -> None:
        await asyncio.sleep(0)
        self.journal.events.append(("warned", tuple(w.citizen_id for w in warnings)))

    async def dead_letters(self, letters: Sequence[Any]) -> None:
        raise AssertionError("nothing here is bad")


class ChangelogStates(SlowStates):
    """Writes become durable when the test releases them (a changelog whose acks the test controls)."""

    def __init__(self, journal: Journal, fail: bool = False) -> None:
        super().__init__(fail)
        self.journal = journal
        self.unsent: list[str] = []
        self.acks: list[asyncio.Future[None]] = []

    def __setitem__(self, key: str, value: object) -> None:
        self.data[key] = value
        self.unsent.append(key)

    async def persisted(self) -> None:
        await asyncio.gather(*await self.handed())

    async def handed(self) -> Sequence[Awaitable[Any]]:
        keys, self.unsent = tuple(self.unsent), []
        self.journal.events.append(("handed", keys))
        values = {k: self.data[k] for k in keys}
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.acks.append(ack)

        async def durable() -> None:
            await ack
            if self.fail:
                raise KafkaTimeoutError("changelog write not acknowledged")
            self.durable.update(values)
            self.journal.events.append(("durable", keys))

        return [asyncio.ensure_future(durable())]

    def release(self) -> None:
        for ack in self.acks:
            if not ack.done():
                ack.set_result(None)


def chunk(*citizens: str) -> list[RawMessage]:
    return [RawMessage(encode(make_checkin(c, -6.2, 106.8)), c.encode()) for c in citizens]


def runtime_with(journal: Journal, fail: bool = False) -> tuple[GeofenceRuntime, ChangelogStates]:
    states = ChangelogStates(journal, fail)
    runtime = GeofenceRuntime(GeofenceConfig(), states, JournalEmitter(journal), WorkerMetrics(CollectorRegistry()),
                              clock=lambda: T0)
    runtime.remember([make_crisis("flood", AREA, effective=T0)])
    return runtime, states


async def test_the_next_chunk_is_geofenced_before_the_states_of_the_last_are_durable() -> None:
    journal = Journal()
    runtime, states = runtime_with(journal)
    first = await runtime.process_checkins(chunk("a", "b"), settle=False)
    second = await runtime.process_checkins(chunk("c", "a"), settle=False)  # "a" again: read from memory
    assert [w.citizen_id for w in first] == ["a", "b"] and [w.citizen_id for w in second] == ["c"]
    assert states.durable == {}  # nothing acknowledged yet, both chunks done
    settling = asyncio.ensure_future(runtime.settle())
    await asyncio.sleep(0.01)
    assert not settling.done()  # settle waits for every state record
    states.release()
    await settling
    assert set(states.durable) == {"a", "b", "c"} and states.durable == states.data
    order = [kind + ":" + ",".join(sorted(keys)) for kind, keys in journal.events]
    assert order.index("warned:a,b") < order.index("handed:a,b") < order.index("warned:c")
    assert order.index("warned:c") < order.index("handed:a,c")


async def test_settling_by_default_returns_only_when_durable() -> None:
    journal = Journal()
    runtime, states = runtime_with(journal)
    processing = asyncio.ensure_future(runtime.process_checkins(chunk("a")))
    await asyncio.sleep(0.01)
    assert not processing.done()
    states.release()
    await processing
    assert set(states.durable) == {"a"}


@pytest.mark.parametrize("chunks", [1, 3])
async def test_a_state_write_kafka_refuses_ends_the_worker_before_anything_is_committed(chunks: int) -> None:
    journal = Journal()
    runtime, states = runtime_with(journal, fail=True)
    exits: list[int] = []

    async def locate_batch() -> None:  # as the locate agent does
        for i in range(chunks):
            await runtime.process_checkins(chunk(f"c{i}"), settle=False)
        states.release()
        await runtime.settle()

    await finish_or_exit(locate_batch(), "a batch", exits.append)
    assert exits == [EXIT_UNFINISHED]
    assert [kind for kind, _ in journal.events].count("warned") == chunks  # sent first: a re-run repeats their ids
