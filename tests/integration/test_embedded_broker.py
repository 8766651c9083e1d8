"""What the embedded broker does that Kafka does not, pinned down so a Tansu upgrade that fixes
(or changes) it is noticed: the end offset ``ListOffsets`` reports after multi-record batches — and
that :mod:`pipeline.end_offsets`, which every end offset crisiswatch reads comes from, is exact anyway."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from pipeline.end_offsets import end_offsets, exact_faust_highwaters, topic_end_offsets
from pipeline.lag import end_offsets as lag_end_offsets

pytestmark = pytest.mark.integration


async def write_bursts(bootstrap: str, topic: str, max_batch_size: int, bursts: tuple[int, ...] = (10, 5),
                       partition: int = 0) -> None:
    """Each burst sent at once and awaited: with batching, one record batch per burst."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=50, max_batch_size=max_batch_size)
    await producer.start()
    try:
        for burst in bursts:
            futures = [await producer.send(topic, f"v{i}".encode(), key=b"k", partition=partition) for i in range(burst)]
            await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def ends_after(bootstrap: str, topic: str, max_batch_size: int) -> tuple[int, int, int]:
    """(what ListOffsets says, what :func:`end_offsets` says, how many records partition 0 holds); and
    the high watermark of a fetch response (aiokafka's ``highwater``, Faust's lag monitor) is exact."""
    await write_bursts(bootstrap, topic, max_batch_size)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        listed = (await consumer.end_offsets([tp]))[tp]
        exact = (await end_offsets(consumer, [tp]))[tp]
        await consumer.seek_to_beginning(tp)
        records = [r for batch in (await consumer.getmany(timeout_ms=2000)).values() for r in batch]
        assert consumer.highwater(tp) == len(records)
        return listed, exact, len(records)
    finally:
        await consumer.stop()


async def test_batched_writes_make_the_listed_end_offset_short_and_end_offsets_exact(
        kafka_bootstrap: str, fresh_topic: Callable[..., str]) -> None:
    listed, exact, stored = await ends_after(kafka_bootstrap, fresh_topic("eo", partitions=1), 16384)
    assert stored == 15
    assert listed < stored  # Kafka would say 15: Tansu says the last batch's base offset + 1
    assert exact == stored


async def test_one_record_per_batch_keeps_the_listed_end_offset_exact(
        kafka_bootstrap: str, fresh_topic: Callable[..., str]) -> None:
    assert await ends_after(kafka_bootstrap, fresh_topic("eo", partitions=1), 1) == (15, 15, 15)


async def test_end_offsets_leave_the_consumer_where_it_was(kafka_bootstrap: str, fresh_topic: Callable[..., str]) -> None:
    topic = fresh_topic("eo", partitions=1)
    await write_bursts(kafka_bootstrap, topic, 16384)
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek(tp, 3)
        assert (await end_offsets(consumer, [tp]))[tp] == 15
        records = (await consumer.getmany(tp, timeout_ms=2000))[tp]
        assert [r.offset for r in records] == list(range(3, 15))
    finally:
        await consumer.stop()


def test_every_partition_of_every_topic_named_from_synchronous_code(
        kafka_bootstrap: str, fresh_topic: Callable[..., str]) -> None:
    topic = fresh_topic("eo", partitions=3)
    asyncio.run(write_bursts(kafka_bootstrap, topic, 16384, bursts=(7, 6), partition=1))
    asyncio.run(write_bursts(kafka_bootstrap, topic, 16384, bursts=(1,), partition=2))
    expected = {(topic, 0): 0, (topic, 1): 13, (topic, 2): 1}
    assert topic_end_offsets(kafka_bootstrap, [topic, "no-such-topic"]) == expected
    assert lag_end_offsets(kafka_bootstrap, [topic]) == expected  # consumer lag reads the same ends


def test_faust_recovery_asks_the_method_this_patches() -> None:
    """Faust's table recovery asks ``AIOKafkaConsumerThread._highwaters`` (via ``highwaters``) where each
    changelog ends; if that method goes in a Faust upgrade, this fails instead of recovery going short."""
    import inspect

    from faust.tables.recovery import Recovery
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    assert "consumer.highwaters(" in inspect.getsource(Recovery._build_highwaters)
    assert "self._highwaters" in inspect.getsource(AIOKafkaConsumerThread.highwaters)
    exact_faust_highwaters()
    assert AIOKafkaConsumerThread._highwaters.__qualname__.endswith("exact_faust_highwaters.<locals>.highwaters")
    exact_faust_highwaters()  # idempotent
    assert AIOKafkaConsumerThread._highwaters.__qualname__.endswith("exact_faust_highwaters.<locals>.highwaters")
