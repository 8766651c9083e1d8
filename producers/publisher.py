"""The one way producers hand events to Kafka (kafka-python), with outages made explicit.

``publish`` returns only after the broker acknowledged every message (acks=all), so a caller
that answers 2xx after it has really handed the input to Kafka. A broker that cannot be
reached raises :class:`BrokerUnavailable` — HTTP callers turn that into 503.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline import topics
from pipeline.settings import Settings
from schemas import Event, encode

log = logging.getLogger(__name__)


class BrokerUnavailable(RuntimeError):
    """Kafka did not acknowledge the messages in time; nothing can be promised about them."""


@dataclass(frozen=True, slots=True)
class Outgoing:
    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


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


def dead_letter(raw: bytes, reason: str, source_topic: str, stage: str, key: bytes | None = None) -> Outgoing:
    headers = ((topics.DLQ_REASON_HEADER, reason.encode("utf-8")[:1000]),
               (topics.DLQ_SOURCE_TOPIC_HEADER, source_topic.encode("utf-8")),
               (topics.DLQ_STAGE_HEADER, stage.encode("utf-8")))
    return Outgoing(topics.DLQ, key, raw, headers)


class Publisher:
    """A kafka-python producer with acks=all; one per process, closed on shutdown.

    Every wait is bounded by ``timeout_s`` (``CRISISWATCH_KAFKA_PUBLISH_TIMEOUT_S``, 2 s by default):
    the first connection, a metadata fetch, a full buffer, and the acknowledgement of a whole call of
    :meth:`publish`, which shares one deadline. A batch of 1,000 check-ins is acknowledged by the
    embedded broker in tens of milliseconds, so only a broker that is away reaches the deadline.
    A record that missed it is given up by the producer too (``delivery_timeout_ms``), so an answered
    503 is rarely followed by a late delivery; a client that retries may still produce a duplicate,
    which at-least-once delivery and the idempotent sinks allow.
    """

    # kafka-python backs off reconnecting to a lost broker for up to 30 s; a broker back on its port
    # should be used again within a second.
    RECONNECT_BACKOFF_MAX_MS = 1000

    def __init__(self, settings: Settings, bootstrap: str | None = None, timeout_s: float | None = None,
                 client_id: str = "crisiswatch-producer") -> None:
        self.bootstrap = bootstrap or settings.kafka_bootstrap
        self.timeout_s = settings.kafka_publish_timeout_s if timeout_s is None else timeout_s
        self._options = settings.kafka_client_options()
        self._client_id = client_id
        self._producer: Any = None

    def _get(self) -> Any:
        if self._producer is None:
            from kafka import KafkaProducer
            from kafka.errors import KafkaError

            timeout_ms = max(1, int(self.timeout_s * 1000))
            linger_ms = 5
            # kafka-python 3 waits bootstrap_timeout_ms (30 s by default) for an unreachable broker.
            bounded = {name: value for name, value in (("bootstrap_timeout_ms", timeout_ms),
                                                       ("delivery_timeout_ms", timeout_ms + linger_ms))
                       if name in KafkaProducer.DEFAULT_CONFIG}
            try:
                self._producer = KafkaProducer(
                    bootstrap_servers=self.bootstrap, client_id=self._client_id, acks="all", linger_ms=linger_ms,
                    max_block_ms=timeout_ms, request_timeout_ms=timeout_ms,
                    reconnect_backoff_max_ms=self.RECONNECT_BACKOFF_MAX_MS,
                    retries=3, max_in_flight_requests_per_connection=1, **bounded, **self._options)
            except KafkaError as exc:
                raise BrokerUnavailable(f"cannot reach Kafka at {self.bootstrap}: {exc}") from exc
        return self._producer

    def publish(self, messages: Iterable[Outgoing]) -> int:
        """Send and wait for every acknowledgement, all within ``timeout_s``; return how many were written."""
        from kafka.errors import KafkaError

        deadline = time.monotonic() + self.timeout_s
        producer = self._get()
        try:
            futures = [producer.send(m.topic, key=m.key, value=m.value, headers=list(m.headers)) for m in messages]
            for future in futures:
                future.get(timeout=max(0.0, deadline - time.monotonic()))
        except (KafkaError, TimeoutError) as exc:
            raise BrokerUnavailable(f"Kafka did not acknowledge within {self.timeout_s:g}s: {exc!r}") from exc
        return len(futures)

    def publish_events(self, events: Sequence[Event]) -> int:
        return self.publish(outgoing(e) for e in events)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=self.timeout_s)
            self._producer = None
