"""A partition's end offset, exact on every broker — the one place crisiswatch asks for it.

Why: the embedded broker (Tansu 0.6, memory storage) answers ``ListOffsets(latest)`` with the base
offset of a partition's last record batch + 1, not the offset after its last record, when that batch
holds several records (``tests/integration/test_embedded_broker.py`` pins it down). Whoever reads "up
to the end" then stops short: Faust's table recovery would recover stale citizen states, a lag would
read as zero with a batch still unprocessed. Until now the stack avoided multi-record batches (one
record per produced batch, a round trip per state record and warning); with exact ends the producers
batch as they do on Kafka.

How: ``ListOffsets`` gives ``H``. A fetch from ``H - 1`` returns the batch holding that record whole,
and the response's high watermark; the end is the largest of ``H``, that high watermark and the
offset after the last record returned (Tansu's fetch high watermark is exact; Kafka answers ``H``
three times). That is one fetch request per broker, made only where an end matters (table recovery,
the crisis reader's catch-up, consumer lag, restore), never per message. The fetch goes through the
consumer's own client, so the consumer's positions and its running fetches are left as they are.

- :func:`end_offsets`: for a started :class:`aiokafka.AIOKafkaConsumer` (the crisis reader, Faust's).
- :func:`topic_end_offsets`: from synchronous code (lag, restore), on a consumer of its own.
- :func:`exact_faust_highwaters`: Faust's recovery asks its aiokafka driver for ``highwaters``; this
  makes that answer exact (a patch of a private method, written against faust-streaming 0.15.3;
  ``tests/integration/test_embedded_broker.py`` fails if the method it replaces goes away).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping
from typing import Any, Final

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka import errors as kafka_errors
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.record.memory_records import MemoryRecords

PROBE_MAX_BYTES: Final = 1 << 20  # per partition: the last batch whole, whatever the producer's batch size
# How long the broker may hold the probe. There is a record at H - 1, so the answer comes at once; not
# 0, which Tansu answers with no partitions at all.
PROBE_MAX_WAIT_MS: Final = 500
READ_UNCOMMITTED: Final = 0


def true_end(listed: int, highwater: int | None, next_offsets: Iterable[int]) -> int:
    """The end offset from what ``ListOffsets`` said (``listed``), a fetch response's high watermark
    and the offset after each batch that fetch returned. Pure."""
    return max(listed, highwater if highwater is not None else listed, *next_offsets)


async def end_offsets(consumer: AIOKafkaConsumer, partitions: Collection[TopicPartition]) -> dict[TopicPartition, int]:
    """The offset after the last record of each partition (0: empty), one fetch per broker beyond
    ``ListOffsets``. Raises aiokafka's errors as ``consumer.end_offsets`` does."""
    listed: dict[TopicPartition, int] = dict(await consumer.end_offsets(list(partitions))) if partitions else {}
    client = consumer._client  # its connections: the consumer's positions and fetches stay untouched
    by_leader: dict[int, list[TopicPartition]] = defaultdict(list)
    for tp, end in listed.items():
        if end > 0:
            leader = client.cluster.leader_for_partition(tp)
            if leader is None or leader < 0:
                raise kafka_errors.LeaderNotAvailableError(f"no leader known for {tp}")
            by_leader[leader].append(tp)
    exact = {tp: end for tp, end in listed.items() if end <= 0}
    for response in await asyncio.gather(*(client.send(node, _probe(tps, listed)) for node, tps in by_leader.items())):
        exact.update(_ends(response, listed))
    if missing := [tp for tps in by_leader.values() for tp in tps if tp not in exact]:
        raise kafka_errors.KafkaError(f"no answer to the fetch of the last batch of {missing}")
    return {tp: exact[tp] for tp in listed}  # keyed and ordered as asked (Faust's TPs stay Faust's)


def _probe(partitions: Iterable[TopicPartition], listed: Mapping[TopicPartition, int]) -> FetchRequest:
    by_topic: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for tp in partitions:
        by_topic[tp.topic].append((tp.partition, listed[tp] - 1, PROBE_MAX_BYTES))
    return FetchRequest(PROBE_MAX_WAIT_MS, 1, PROBE_MAX_BYTES * 4, READ_UNCOMMITTED, list(by_topic.items()))


def _ends(response: Any, listed: Mapping[TopicPartition, int]) -> dict[TopicPartition, int]:
    out: dict[TopicPartition, int] = {}
    for topic, parts in response.topics:
        for partition, error_code, highwater, *data in parts:
            tp = TopicPartition(topic, partition)
            error = kafka_errors.for_code(error_code)
            if error is kafka_errors.OffsetOutOfRangeError:
                out[tp] = listed[tp]  # the records before the listed end are gone: the listed end stands
                continue
            if error is not kafka_errors.NoError:
                raise error(f"fetching the last batch of {tp}")
            records = MemoryRecords(data[-1])
            next_offsets = []
            while (batch := records.next_batch()) is not None:
                next_offsets.append(batch.next_offset)
            out[tp] = true_end(listed[tp], highwater, next_offsets)
    return out


async def _topic_end_offsets(bootstrap: str, names: Collection[str],
                             client_options: Mapping[str, Any]) -> dict[tuple[str, int], int]:
    options = {k: v for k, v in client_options.items() if k != "ssl_cafile"}
    if client_options.get("ssl_cafile"):
        from aiokafka.helpers import create_ssl_context

        options["ssl_context"] = create_ssl_context(cafile=client_options["ssl_cafile"])
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                client_id="crisiswatch-end-offsets", **options)
    await consumer.start()
    try:
        await consumer.topics()  # metadata of every topic
        tps = [TopicPartition(t, p) for t in sorted(set(names)) for p in sorted(consumer.partitions_for_topic(t) or ())]
        return {(tp.topic, tp.partition): end for tp, end in (await end_offsets(consumer, tps)).items()}
    finally:
        await consumer.stop()


def topic_end_offsets(bootstrap: str, names: Collection[str],
                      client_options: Mapping[str, Any] | None = None) -> dict[tuple[str, int], int]:
    """:func:`end_offsets` of every partition of ``names`` (a topic that does not exist has none),
    for synchronous callers; a thread of its own if this one runs an event loop."""
    work = _topic_end_offsets(bootstrap, names, client_options or {})
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(work)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, work).result()


def exact_faust_highwaters() -> None:
    """Make Faust's aiokafka driver answer ``highwaters`` (the end of each changelog partition a table
    recovers up to) with :func:`end_offsets`. Idempotent."""
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    if getattr(AIOKafkaConsumerThread, "_crisiswatch_exact_ends", False):
        return
    if not callable(getattr(AIOKafkaConsumerThread, "_highwaters", None)):
        raise RuntimeError("faust.transport.drivers.aiokafka.AIOKafkaConsumerThread._highwaters is gone: "
                           "pipeline.end_offsets was written against faust-streaming 0.15.3")
    original = AIOKafkaConsumerThread._highwaters

    async def highwaters(self: Any, partitions: list[TopicPartition]) -> Mapping[TopicPartition, int]:
        if self.consumer.in_transaction:  # the last stable offsets, as Faust reads them
            return await original(self, partitions)
        return await end_offsets(self._ensure_consumer(), partitions)

    setattr(AIOKafkaConsumerThread, "_highwaters", highwaters)  # noqa: B010 - patching a method on purpose
    setattr(AIOKafkaConsumerThread, "_crisiswatch_exact_ends", True)  # noqa: B010
