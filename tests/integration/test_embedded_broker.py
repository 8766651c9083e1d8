"""What the embedded broker does that Kafka does not, pinned down so a Tansu upgrade that fixes
(or changes) it is noticed: the end offset it reports after multi-record batches."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from pipeline.stack import EMBEDDED_PRODUCER_MAX_BATCH_BYTES

pytestmark = pytest.mark.integration


async def end_offset_after(bootstrap: str, topic: str, max_batch_size: int) -> tuple[int, int]:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=50, max_batch_size=max_batch_size)
    await producer.start()
    try:
        for burst in (10, 5):
            futures = [await producer.send(topic, f"v{i}".encode(), key=b"k", partition=0) for i in range(burst)]
            await asyncio.gather(*futures)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        await consumer.seek_to_beginning(tp)
        records = [r for batch in (await consumer.getmany(timeout_ms=2000)).values() for r in batch]
        return end, len(records)
    finally:
        await consumer.stop()


async def test_batched_writes_make_the_reported_end_offset_short(kafka_bootstrap: str, fresh_topic: Callable[..., str]) -> None:
    end, stored = await end_offset_after(kafka_bootstrap, fresh_topic("eo", partitions=1), 16384)
    assert stored == 15
    assert end < stored  # Kafka would say 15; see pipeline.stack.EMBEDDED_PRODUCER_MAX_BATCH_BYTES


async def test_one_record_per_batch_keeps_the_end_offset_exact(kafka_bootstrap: str, fresh_topic: Callable[..., str]) -> None:
    end, stored = await end_offset_after(kafka_bootstrap, fresh_topic("eo", partitions=1),
                                         EMBEDDED_PRODUCER_MAX_BATCH_BYTES)
    assert (end, stored) == (15, 15)
