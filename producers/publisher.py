"""The one way producers hand events to Kafka (kafka-python), with outages made explicit.

``publish`` returns only after the broker acknowledged every message (acks=all), so a caller
that answers 2xx after it has really handed the input to Kafka. A broker that cannot be
reached raises :class:`BrokerUnavailable` — HTTP callers turn that into 503.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from kafka.partitioner.default import murmur2

from pipeline import dlq, topics
from pipeline.settings import Settings
from pipeline.stage import BrokerUnavailable as BrokerUnavailable  # re-exported: defined with the other outage types
from schemas import Checkin, Event, encode
from schemas.fast import MAX_BATCH_ITEMS, encode_checkin_batch

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Outgoing:
    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()
    partition: int | None = None  # None: Kafka's default partitioner (murmur2 of the key)
    tombstone: bool = False  # sent with no value at all (the key erased; ``value`` is ignored)


def key_of(event: Event) -> bytes | None:
    """Partition key per DESIGN: citizen for check-ins, warnings, acks and citizens; crisis for crisis events."""
    for attr in ("citizen_id", "crisis_id"):
        value = getattr(event, attr, None)
        if isinstance(value, str):
            return value.encode("utf-8")
    return None


TOPIC_OF_SCHEMA: dict[str, str] = {
    "checkin/1": topics.CHECKINS,
    "citizen/1": topics.CITIZENS,
    "crisis/1": topics.CRISIS_EVENTS,
    "ack/1": topics.ACKS,
    "warning/1": topics.WARNINGS,
    "crisis-status/1": topics.CRISIS_STATUS,
    "case/1": topics.CASES,
    "delivery/1": topics.DELIVERIES,
}


def outgoing(event: Event, topic: str | None = None) -> Outgoing:
    return Outgoing(topic or TOPIC_OF_SCHEMA[event.SCHEMA], key_of(event), encode(event))


MAX_BATCH_RECORD_BYTES: Final = 512 * 1024
"""Largest ``checkin-batch/1`` record the API writes (half the pipeline's message limit, within every
producer's and broker's default request size); a larger group of check-ins is split."""


def partition_of(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner gives a key among ``partitions`` (kafka-python's, murmur2)."""
    return int(murmur2(key) & 0x7FFFFFFF) % partitions


def checkin_batches(checkins: Sequence[Checkin], topic: str, partitions: int) -> list[Outgoing]:
    """Check-ins as ``checkin-batch/1`` records (:mod:`schemas.fast`), one per partition of ``topic``
    they key to (split beyond :data:`MAX_BATCH_RECORD_BYTES`), each written to that partition: every
    check-in lands on the partition it would have as a record of its own, so the worker that owns its
    citizen reads it, and its order among the request's check-ins of that citizen is kept. The
    records have no key (their partition is explicit): the key of each check-in is its citizen, inside."""
    groups: dict[int, list[bytes]] = {}
    for checkin in checkins:
        groups.setdefault(partition_of(checkin.citizen_id.encode("utf-8"), partitions), []).append(encode(checkin))
    out = []
    for partition, items in groups.items():
        start, size = 0, 0
        for end, item in enumerate(items):
            if end > start and (size + len(item) > MAX_BATCH_RECORD_BYTES or end - start == MAX_BATCH_ITEMS):
                out.append(Outgoing(topic, None, encode_checkin_batch(items[start:end]), partition=partition))
                start, size = end, 0
            size += len(item) + 1
        out.append(Outgoing(topic, None, encode_checkin_batch(items[start:]), partition=partition))
    return out


def dead_letter(raw: bytes | None, reason: str, source_topic: str, stage: str, key: bytes | None = None, *,
                error_type: str = "", partition: int | None = None, offset: int | None = None,
                max_payload_bytes: int = dlq.DEFAULT_MAX_PAYLOAD_BYTES) -> Outgoing:
    """A dead letter for ``dlq``, built by the one builder (:func:`pipeline.dlq.build`): it always fits."""
    record = dlq.build(raw, reason=reason, stage=stage, source_topic=source_topic, error_type=error_type,
                       partition=partition, offset=offset, key=key, max_payload_bytes=max_payload_bytes)
    return Outgoing(topics.DLQ, record.key, record.value, record.headers)


class Publisher:
    """A kafka-python producer with acks=all; one per process, closed on shutdown.

    How long :meth:`publish` waits (``timeout_s``: ``CRISISWATCH_KAFKA_PUBLISH_TIMEOUT_S``, 2 s by
    default) tells a broker that is away from one that is slow: it gives up once the producer has
    had no acknowledgement at all, for any caller, for ``timeout_s`` — a broker that is gone or hung
    acknowledges nothing — while a busy broker that keeps acknowledging is waited for, up to
    ``MAX_WAIT_FACTOR`` times as long: many clients posting 1,000-check-in batches at once to the
    embedded stack on a small machine can make one publish take longer than 2 s, and a fixed
    deadline answered those 503. The first connection, a metadata fetch and a full buffer are
    bounded by ``timeout_s`` too.

    A failure that is not about the records themselves discards the producer (what it still holds
    is dropped) and the next call makes a new one: kafka-python's producer can be left for good in
    a fatal state by a broker that lost its memory (InitProducerId fails after the embedded broker's
    restart), and a fresh producer is also the quickest way back to a broker that returned. A
    client's retry after a 503 may still make a duplicate (a record can have reached Kafka just
    before the answer), which at-least-once delivery and the idempotent sinks allow.
    """

    MAX_WAIT_FACTOR = 5
    # kafka-python backs off reconnecting to a lost broker for up to 30 s; a broker back on its port
    # should be used again within a second.
    RECONNECT_BACKOFF_MAX_MS = 1000

    def __init__(self, settings: Settings, bootstrap: str | None = None, timeout_s: float | None = None,
                 client_id: str = "crisiswatch-producer", max_batch_bytes: int | None = None) -> None:
        self.bootstrap = bootstrap or settings.kafka_bootstrap
        self.timeout_s = settings.kafka_publish_timeout_s if timeout_s is None else timeout_s
        self.max_wait_s = self.timeout_s * self.MAX_WAIT_FACTOR
        # CRISISWATCH_PRODUCER_MAX_BATCH_BYTES when set (restore); else kafka-python's own batch size.
        self._batch = {"batch_size": max_batch_bytes} if max_batch_bytes else {}
        self._options = settings.kafka_client_options()
        self._partitions = settings.partitions
        self._known_topics: set[str] = set()
        self._client_id = client_id
        self._producer: Any = None
        self._last_ack = 0.0  # monotonic time of the producer's latest acknowledgement, for any caller
        self._lock = threading.Lock()
        self._connect_failed_at = float("-inf")
        self._connect_error: Exception | None = None

    def _get(self, started: float) -> Any:
        """The producer, made if there is none. Callers arriving while another one connects wait for
        that attempt (within ``timeout_s``) and share its failure rather than each trying in turn."""
        if not self._lock.acquire(timeout=self.timeout_s):
            raise BrokerUnavailable(f"still connecting to Kafka at {self.bootstrap}")
        try:
            if self._producer is None and self._connect_failed_at >= started:
                raise BrokerUnavailable(f"cannot reach Kafka at {self.bootstrap}: {self._connect_error}")
            return self._producer or self._new_producer()
        finally:
            self._lock.release()

    def _new_producer(self) -> Any:
        from kafka import KafkaProducer
        from kafka.errors import KafkaError

        timeout_ms = max(1, int(self.timeout_s * 1000))
        max_wait_ms = max(1, int(self.max_wait_s * 1000))
        linger_ms = 5
        # kafka-python 3 waits bootstrap_timeout_ms (30 s by default) for an unreachable broker.
        bounded = {name: value for name, value in (("bootstrap_timeout_ms", timeout_ms),
                                                   ("delivery_timeout_ms", max_wait_ms + linger_ms))
                   if name in KafkaProducer.DEFAULT_CONFIG}
        try:
            self._producer = KafkaProducer(
                bootstrap_servers=self.bootstrap, client_id=self._client_id, acks="all", linger_ms=linger_ms,
                max_block_ms=timeout_ms, request_timeout_ms=max_wait_ms,
                reconnect_backoff_max_ms=self.RECONNECT_BACKOFF_MAX_MS,
                retries=3, max_in_flight_requests_per_connection=1, **bounded, **self._batch, **self._options)
        except KafkaError as exc:
            self._connect_failed_at, self._connect_error = time.monotonic(), exc
            raise BrokerUnavailable(f"cannot reach Kafka at {self.bootstrap}: {exc}") from exc
        return self._producer

    def _acknowledged(self, _metadata: Any) -> None:
        self._last_ack = time.monotonic()

    def _await(self, future: Any, started: float) -> None:
        """Wait for one acknowledgement while the producer makes progress (see the class)."""
        from kafka.errors import KafkaTimeoutError

        cap = started + self.max_wait_s
        while True:
            quiet_since = max(started, self._last_ack)
            try:
                future.get(timeout=max(0.0, min(cap, quiet_since + self.timeout_s) - time.monotonic()))
                return
            except KafkaTimeoutError:
                if future.is_done:  # the producer gave up on the record itself
                    raise
                now = time.monotonic()
                if now >= cap:
                    raise KafkaTimeoutError(f"not acknowledged within {self.max_wait_s:g}s") from None
                if now - max(started, self._last_ack) >= self.timeout_s:
                    raise KafkaTimeoutError(f"no acknowledgement from Kafka for {self.timeout_s:g}s") from None

    def publish(self, messages: Iterable[Outgoing]) -> int:
        """Send and wait for every acknowledgement (see the class for how long); return how many were written."""
        from kafka.errors import KafkaError

        started = time.monotonic()
        producer = self._get(started)
        try:
            futures = [producer.send(m.topic, key=m.key, value=None if m.tombstone else m.value, headers=list(m.headers),
                                     partition=m.partition) for m in messages]
            for future in futures:
                future.add_callback(self._acknowledged)
            for future in futures:
                self._await(future, started)
        except (KafkaError, TimeoutError) as exc:
            if not _about_the_records(exc):
                self._discard(producer)
            raise BrokerUnavailable(f"Kafka did not acknowledge: {exc}") from exc
        return len(futures)

    def _discard(self, producer: Any) -> None:
        """Drop ``producer`` (unless another caller already did) and what it still holds."""
        with self._lock:
            if self._producer is not producer:
                return
            self._producer = None
        log.warning("Kafka producer discarded after a failure; the next publish connects afresh",
                    extra={"client_id": self._client_id})

        def close() -> None:  # kafka-python's close first waits for what is pending: until delivered or expired
            with contextlib.suppress(Exception):
                producer.close(timeout=self.max_wait_s + 1)

        threading.Thread(target=close, name=f"{self._client_id}-discard", daemon=True).start()

    def ensure_topics(self, names: Iterable[str]) -> list[str]:
        """Create the topics among ``names`` this publisher has not seen yet (per-country topics are
        made on first use); return those created. An unreachable broker is :class:`BrokerUnavailable`."""
        from kafka.errors import KafkaError

        from pipeline.embedded import EmbeddedError, create_topics

        new = sorted(set(names) - self._known_topics)
        if not new:
            return []
        try:
            created = create_topics(self.bootstrap, new, self._partitions, self._options, timeout_s=self.timeout_s)
        except (EmbeddedError, KafkaError) as exc:
            raise BrokerUnavailable(f"cannot create topics {', '.join(new)}: {exc}") from exc
        if created:
            log.info("created topics", extra={"topics": created})
            self._await_metadata(created)
        self._known_topics.update(new)
        return created

    def _await_metadata(self, names: Sequence[str]) -> None:
        """Until the producer's metadata knows the partitions of topics just created: a record sent
        before that waits for the metadata inside ``send`` and its publish runs out of time, although
        the broker is fine (seen on the embedded broker under load)."""
        from kafka.errors import KafkaError

        started = time.monotonic()
        producer = self._get(started)
        deadline = started + self.max_wait_s
        for name in names:
            while True:
                try:
                    if producer.partitions_for(name):  # asks the broker when it does not know the topic
                        break
                except KafkaError:
                    pass
                if time.monotonic() > deadline:
                    raise BrokerUnavailable(f"topic {name} created, but Kafka names no partition of it after "
                                            f"{self.max_wait_s:g}s")
                time.sleep(0.05)

    def partition_count(self, topic: str) -> int:
        """How many partitions ``topic`` has, as the producer's metadata says (asked of Kafka the first
        time, within ``timeout_s``); :class:`BrokerUnavailable` if it cannot say."""
        from kafka.errors import KafkaError

        producer = self._get(time.monotonic())
        try:
            partitions = producer.partitions_for(topic)
        except KafkaError as exc:
            raise BrokerUnavailable(f"no metadata for topic {topic} from Kafka: {exc}") from exc
        if not partitions:
            raise BrokerUnavailable(f"Kafka names no partition of topic {topic}")
        return len(partitions)

    def publish_checkins(self, checkins: Sequence[Checkin], topic: str = topics.CHECKINS) -> int:
        """Check-ins as ``checkin-batch/1`` records, one per partition (:func:`checkin_batches`); return
        how many records were written."""
        return self.publish(checkin_batches(checkins, topic, self.partition_count(topic)))

    def publish_events(self, events: Sequence[Event]) -> int:
        return self.publish(outgoing(e) for e in events)

    def close(self) -> None:
        with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            producer.close(timeout=self.timeout_s)


def _about_the_records(exc: BaseException) -> bool:
    """Whether Kafka refused these records themselves (too large, invalid, not allowed), which says
    nothing about the producer or the broker."""
    from kafka import errors

    names = ("MessageSizeTooLargeError", "RecordListTooLargeError", "InvalidRecordError", "CorruptRecordError",
             "InvalidTopicError", "TopicAuthorizationFailedError")
    return isinstance(exc, tuple(getattr(errors, n) for n in names if hasattr(errors, n)))
