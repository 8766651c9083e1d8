"""The one way producers hand events to Kafka (kafka-python), with outages made explicit.

``publish`` returns only after the broker acknowledged every message (acks=all), so a caller
that answers 2xx after it has really handed the input to Kafka. A broker that cannot be
reached raises :class:`BrokerUnavailable` — HTTP callers turn that into 503.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline import dlq, topics
from pipeline.settings import Settings
from pipeline.stage import BrokerUnavailable as BrokerUnavailable  # re-exported: defined with the other outage types
from schemas import Event, encode

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Outgoing:
    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()
    partition: int | None = None  # None: Kafka's default partitioner (murmur2 of the key)


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
}


def outgoing(event: Event, topic: str | None = None) -> Outgoing:
    return Outgoing(topic or TOPIC_OF_SCHEMA[event.SCHEMA], key_of(event), encode(event))


def dead_letter(raw: bytes | None, reason: str, source_topic: str, stage: str, key: bytes | None = None, *,
                error_type: str = "", partition: int | None = None, offset: int | None = None,
                max_payload_bytes: int = dlq.DEFAULT_MAX_PAYLOAD_BYTES) -> Outgoing:
    """A dead letter for ``dlq``, built by the one builder (:func:`pipeline.dlq.build`): it always fits."""
    record = dlq.build(raw, reason=reason, stage=stage, source_topic=source_topic, error_type=error_type,
                       partition=partition, offset=offset, key=key, max_payload_bytes=max_payload_bytes)
    return Outgoing(topics.DLQ, record.key, record.value, record.headers)


class Publisher:
    """A kafka-python producer with acks=all; one per process, closed on shutdown."""

    def __init__(self, settings: Settings, bootstrap: str | None = None, timeout_s: float = 10.0,
                 client_id: str = "crisiswatch-producer", max_batch_bytes: int | None = None) -> None:
        self.bootstrap = bootstrap or settings.kafka_bootstrap
        self.timeout_s = timeout_s
        # 1 on the embedded broker for topics a Faust table recovers from (see pipeline.stack's
        # EMBEDDED_PRODUCER_MAX_BATCH_BYTES): one record per batch keeps the end offset it reports exact.
        self._batch = {"batch_size": max_batch_bytes} if max_batch_bytes else {}
        self._options = settings.kafka_client_options()
        self._client_id = client_id
        self._producer: Any = None

    def _get(self) -> Any:
        if self._producer is None:
            from kafka import KafkaProducer
            from kafka.errors import KafkaError

            timeout_ms = int(self.timeout_s * 1000)
            # kafka-python 3 waits bootstrap_timeout_ms (30 s by default) for an unreachable broker.
            bootstrap = {"bootstrap_timeout_ms": timeout_ms} if "bootstrap_timeout_ms" in KafkaProducer.DEFAULT_CONFIG else {}
            try:
                self._producer = KafkaProducer(
                    bootstrap_servers=self.bootstrap, client_id=self._client_id, acks="all", linger_ms=5,
                    max_block_ms=timeout_ms, request_timeout_ms=timeout_ms,
                    retries=3, max_in_flight_requests_per_connection=1, **bootstrap, **self._batch, **self._options)
            except KafkaError as exc:
                raise BrokerUnavailable(f"cannot reach Kafka at {self.bootstrap}: {exc}") from exc
        return self._producer

    def publish(self, messages: Iterable[Outgoing]) -> int:
        """Send and wait for every acknowledgement; return how many were written."""
        from kafka.errors import KafkaError

        producer = self._get()
        try:
            futures = [producer.send(m.topic, key=m.key, value=m.value, headers=list(m.headers), partition=m.partition)
                       for m in messages]
            for future in futures:
                future.get(timeout=self.timeout_s)
        except (KafkaError, TimeoutError) as exc:
            raise BrokerUnavailable(f"Kafka did not acknowledge: {exc}") from exc
        return len(futures)

    def publish_events(self, events: Sequence[Event]) -> int:
        return self.publish(outgoing(e) for e in events)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=self.timeout_s)
            self._producer = None
