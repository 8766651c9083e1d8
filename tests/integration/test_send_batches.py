"""The worker's send path on the real broker: records handed in batches built per partition
(:func:`pipeline.app.hand_all`) land where Kafka's default partitioner puts their keys, in order within
each partition, headers and all; a partition the caller gives is used; a record too large for the
producer is refused before anything is sent, as a data error; the citizen-state table's records go
to the partitions of their rows, which the check-ins of the same citizens use."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka.errors import MessageSizeTooLargeError
from kafka import KafkaConsumer, TopicPartition
from prometheus_client import CollectorRegistry

from pipeline.app import create_app, hand_all, internal_topics, send_all
from pipeline.citizens import encode_state, partition_of
from pipeline.domain.tracking import CitizenState, Presence
from pipeline.embedded import ensure_topics
from pipeline.settings import Settings
from pipeline.stage import is_infrastructure
from pipeline.testing import T0

pytestmark = pytest.mark.integration

PARTITIONS = 4


def read_all(bootstrap: str, topic: str, expected: int) -> dict[int, list[tuple[bytes | None, bytes | None, list]]]:  # type: ignore[type-arg]
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=3000)
    try:
        parts = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(parts)
        consumer.seek_to_beginning()
        found: dict[int, list[tuple[bytes | None, bytes | None, list]]] = {}  # type: ignore[type-arg]
        total = 0
        for _ in range(30):
            for tp, records in consumer.poll(timeout_ms=1000).items():
                for r in records:
                    found.setdefault(tp.partition, []).append((r.key, r.value, list(r.headers)))
                    total += 1
            if total >= expected:
                break
        return found
    finally:
        consumer.close()


def run_app(bootstrap: str, tmp_path: Path, batch_bytes: int | None,
            body: Callable[..., object]) -> None:
    app_id = f"send-batches-{tmp_path.name}"[:60]
    ensure_topics(bootstrap, PARTITIONS, extra=internal_topics(app_id))
    settings = Settings(kafka_bootstrap=bootstrap, partitions=PARTITIONS, data_dir=tmp_path,
                        producer_max_batch_bytes=batch_bytes)
    app, runtime = create_app(settings, registry=CollectorRegistry(), app_id=app_id)

    async def go() -> None:
        await app.producer.start()
        try:
            await body(app, runtime, app_id)  # type: ignore[misc]
        finally:
            await app.producer.stop()

    asyncio.run(go())


@pytest.mark.parametrize("batch_bytes", [None, 1])  # the producer's own batching; one record per batch
def test_records_land_by_key_in_order_with_their_headers(kafka_bootstrap: str, fresh_topic: Callable[..., str],
                                                         tmp_path: Path, batch_bytes: int | None) -> None:
    topic = fresh_topic("send-batches")
    records = [(f"citizen-{i % 37}".encode(), f"value-{i}".encode() * (1 + i % 50),
                [("n", str(i).encode())] if i % 3 == 0 else None) for i in range(3000)]

    async def body(app, runtime, app_id) -> None:  # type: ignore[no-untyped-def]
        await send_all(app, topic, records)

    run_app(kafka_bootstrap, tmp_path, batch_bytes, body)
    found = read_all(kafka_bootstrap, topic, len(records))
    assert sum(len(v) for v in found.values()) == len(records)
    for partition, got in found.items():
        want = [(k, v, h or []) for k, v, h in records if partition_of(k, PARTITIONS) == partition]
        assert got == want  # every record of the partition, in the order handed, nothing twice


def test_a_given_partition_is_used_and_a_record_too_large_is_a_data_error(
        kafka_bootstrap: str, fresh_topic: Callable[..., str], tmp_path: Path) -> None:
    topic = fresh_topic("send-given")
    outcome: list[BaseException] = []

    async def body(app, runtime, app_id) -> None:  # type: ignore[no-untyped-def]
        futures = await hand_all(app, topic, [(b"k", b"to-3", None), (b"k", b"to-1", None)], partitions=[3, 1])
        await asyncio.gather(*futures)
        try:
            await send_all(app, topic, [(b"big", b"x" * (8 << 20), None)])
        except Exception as exc:
            outcome.append(exc)

    run_app(kafka_bootstrap, tmp_path, None, body)
    found = read_all(kafka_bootstrap, topic, 2)
    assert {p: [v for _, v, _ in rs] for p, rs in found.items()} == {3: [b"to-3"], 1: [b"to-1"]}
    assert len(outcome) == 1 and isinstance(outcome[0], MessageSizeTooLargeError)
    assert not is_infrastructure(outcome[0])  # too large every time: dead-lettered, never retried for ever


def test_state_records_go_to_their_rows_partition(kafka_bootstrap: str, tmp_path: Path) -> None:
    states = [CitizenState(f"c-{i}", 1.0 + i / 100, 2.0, 5.0, T0, {"flood": Presence("in", 1, 1, True)} if i % 2 else {})
              for i in range(200)]
    topics_seen: list[str] = []

    async def body(app, runtime, app_id) -> None:  # type: ignore[no-untyped-def]
        for state in states:
            runtime.states[state.citizen_id] = encode_state(state)
        del runtime.states["c-0"]
        await runtime.states.persisted()
        topics_seen.append(runtime.states.topic)

    run_app(kafka_bootstrap, tmp_path, None, body)
    found = read_all(kafka_bootstrap, topics_seen[0], len(states) + 1)
    assert sum(len(v) for v in found.values()) == len(states) + 1
    for partition, got in found.items():
        assert all(partition_of(key, PARTITIONS) == partition for key, _, _ in got)
    by_key = {key: value for got in found.values() for key, value, _ in got}
    assert by_key[b"c-0"] is None  # the deletion, after the write, in the same partition
    assert by_key[b"c-7"] == encode_state(states[7])
