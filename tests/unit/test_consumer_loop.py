"""The one poll → handle → commit loop of the sink, the router and the dispatcher
(:func:`consumers.kafka_io.run_consumer`), against an in-memory consumer: a batch is committed only
after it was handled; a failed poll or connect is waited out; a stop during an outage leaves the
batch uncommitted; the consumer is always closed without committing."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from kafka import TopicPartition
from kafka.errors import KafkaConnectionError

from consumers.kafka_io import Backoff, Message, Stopped, run_consumer

FAST = Backoff(initial_s=0.001, maximum_s=0.001)


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None = None
    value: bytes = b"{}"
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass
class FakeConsumer:
    """kafka-python's poll/commit/close, fed from a script of batches (an exception: a failed poll)."""

    script: list[list[Record] | Exception]
    stop: threading.Event
    committed: list[dict[tuple[str, int], int]] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    closed_with: list[bool] = field(default_factory=list)

    def poll(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Record]]:
        if not self.script:
            self.stop.set()
            return {}
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        self.events.append(f"poll {len(step)}")
        out: dict[TopicPartition, list[Record]] = {}
        for r in step:
            out.setdefault(TopicPartition(r.topic, r.partition), []).append(r)
        return out

    def commit(self, offsets: dict[Any, Any], timeout_ms: int) -> None:
        self.events.append("commit")
        self.committed.append({(tp.topic, tp.partition): meta.offset for tp, meta in offsets.items()})

    def close(self, autocommit: bool = True) -> None:
        self.closed_with.append(autocommit)


def records(topic: str, partition: int, *offsets: int) -> list[Record]:
    return [Record(topic, partition, o) for o in offsets]


def test_each_batch_is_committed_after_it_was_handled_one_past_its_last_offsets() -> None:
    stop = threading.Event()
    consumer = FakeConsumer([records("w", 0, 0, 1, 2) + records("w", 1, 7), records("w", 0, 3)], stop)
    handled: list[list[int]] = []

    def handle(messages: Sequence[Message], _: threading.Event) -> None:
        consumer.events.append("handle")
        handled.append([m.offset for m in messages])

    run_consumer(stop, name="test", connect=lambda: consumer, handle=handle, poll_timeout_s=0.01, batch_size=10,
                 backoff=FAST)
    assert handled == [[0, 1, 2, 7], [3]]
    assert consumer.events == ["poll 4", "handle", "commit", "poll 1", "handle", "commit"]
    assert consumer.committed == [{("w", 0): 3, ("w", 1): 8}, {("w", 0): 4}]
    assert consumer.closed_with == [False]


def test_a_failed_poll_is_an_outage_waited_out_and_the_next_poll_goes_on() -> None:
    stop = threading.Event()
    consumer = FakeConsumer([KafkaConnectionError("broker away"), records("w", 0, 5)], stop)
    outages: list[BaseException] = []
    handled: list[int] = []
    run_consumer(stop, name="test", connect=lambda: consumer, handle=lambda ms, _: handled.extend(m.offset for m in ms),
                 poll_timeout_s=0.01, batch_size=10, backoff=FAST, on_outage=outages.append)
    assert [type(e) for e in outages] == [KafkaConnectionError]
    assert handled == [5] and consumer.committed == [{("w", 0): 6}]


def test_a_poll_that_succeeds_after_an_outage_says_so_even_when_nothing_arrives() -> None:
    stop = threading.Event()
    consumer = FakeConsumer([[], KafkaConnectionError("broker away"), KafkaConnectionError("still away"), []], stop)
    said: list[str] = []
    run_consumer(stop, name="test", connect=lambda: consumer, handle=lambda ms, _: None, poll_timeout_s=0.01,
                 batch_size=10, backoff=FAST, on_outage=lambda exc: said.append("outage"),
                 on_polled=lambda: said.append("polled"))
    assert said == ["polled", "outage", "outage", "polled", "polled"]  # (the last: the script ran out, an empty poll)


def test_connect_is_retried_while_kafka_is_down() -> None:
    stop = threading.Event()
    consumer = FakeConsumer([records("w", 0, 0)], stop)
    attempts: list[int] = []

    def connect() -> FakeConsumer:
        attempts.append(1)
        if len(attempts) < 3:
            raise KafkaConnectionError("no broker yet")
        return consumer

    outages: list[BaseException] = []
    run_consumer(stop, name="test", connect=connect, handle=lambda ms, _: None, poll_timeout_s=0.01, batch_size=10,
                 backoff=FAST, on_outage=outages.append)
    assert len(attempts) == 3 and len(outages) == 2 and consumer.committed == [{("w", 0): 1}]


def test_a_stop_while_handling_leaves_the_batch_uncommitted_and_closes_the_consumer() -> None:
    stop = threading.Event()
    consumer = FakeConsumer([records("w", 0, 0, 1), records("w", 0, 2)], stop)

    def handle(messages: Sequence[Message], stop_event: threading.Event) -> None:
        stop_event.set()
        raise Stopped("waiting out an outage")

    run_consumer(stop, name="test", connect=lambda: consumer, handle=handle, poll_timeout_s=0.01, batch_size=10,
                 backoff=FAST)
    assert consumer.committed == [] and consumer.closed_with == [False]
    assert consumer.script == [records("w", 0, 2)]  # it polled no further


def test_anything_else_handle_raises_propagates_uncommitted() -> None:
    stop = threading.Event()
    consumer = FakeConsumer([records("w", 0, 0)], stop)

    def handle(messages: Sequence[Message], _: threading.Event) -> None:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        run_consumer(stop, name="test", connect=lambda: consumer, handle=handle, poll_timeout_s=0.01, batch_size=10,
                     backoff=FAST)
    assert consumer.committed == [] and consumer.closed_with == [False]


def test_after_poll_runs_after_every_poll_batch_or_none() -> None:
    stop = threading.Event()
    consumer = FakeConsumer([records("w", 0, 0), [], records("w", 0, 1)], stop)
    ran: list[str] = []
    run_consumer(stop, name="test", connect=lambda: consumer, handle=lambda ms, _: ran.append("handle"),
                 poll_timeout_s=0.01, batch_size=10, backoff=FAST, after_poll=lambda _: ran.append("after"))
    assert ran == ["handle", "after", "after", "handle", "after", "after"]
