"""The warning router: every warning on ``warnings`` is copied, unchanged (same key, value and
headers), to ``warnings.<CC>`` for each country in its ``country_codes``, so the crisis managers
of one country subscribe to their topic only.

At least once: offsets are committed after every copy is acknowledged; a replay copies again and
readers deduplicate on ``warning_id``. Warnings without a country are not routed, only counted.

Failure policy (:mod:`pipeline.stage`): a warning that cannot be decoded or routed, or whose copies
make publishing raise anything but an outage (the batch is split until it is alone), is
dead-lettered with its reason; the rest is routed. An unreachable broker is retried with backoff.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from consumers.kafka_io import (
    DEFAULT_BACKOFF,
    DEFAULT_TIMEOUTS,
    Backoff,
    GroupTimeouts,
    Message,
    group_consumer,
    retry,
    run_consumer,
)
from pipeline import dlq, topics
from pipeline.embedded import EmbeddedError, create_topics
from pipeline.metrics import SinkMetrics
from pipeline.settings import Settings
from pipeline.stage import Failure, isolate, map_isolated, record
from producers.publisher import BrokerUnavailable, Outgoing, Publisher, dead_letter
from schemas import InvalidEvent, Warning, decode

log = logging.getLogger(__name__)

GROUP_ID: Final = "crisiswatch-router"
STAGE: Final = "router"
UNROUTED: Final = "none"
"""The ``topic`` label under which warnings without a country are counted."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One warning and its copies, one per country (none for a warning without a country)."""

    message: Message
    copies: tuple[Outgoing, ...]


@dataclass(frozen=True, slots=True)
class Routed:
    deliveries: tuple[Delivery, ...]
    dead: tuple[tuple[Outgoing, str], ...]  # dead letter, bounded metric label

    @property
    def copies(self) -> tuple[Outgoing, ...]:
        return tuple(c for d in self.deliveries for c in d.copies)

    @property
    def unrouted(self) -> int:
        return sum(1 for d in self.deliveries if not d.copies)


def letter_for(failure: Failure[Message], max_payload_bytes: int = dlq.DEFAULT_MAX_PAYLOAD_BYTES) -> Outgoing:
    message = failure.item
    return dead_letter(message.value, failure.reason, message.topic, STAGE, message.key, error_type=failure.error_type,
                       partition=message.partition, offset=message.offset, max_payload_bytes=max_payload_bytes)


def route(messages: Iterable[Message], topic_for: Callable[[str], str] = topics.country_warning_topic,
          max_payload_bytes: int = dlq.DEFAULT_MAX_PAYLOAD_BYTES) -> Routed:
    """The copies to publish for a batch of warnings, and the dead letters (with a metric label). Pure."""
    def deliver(message: Message) -> Delivery:
        if not message.value:
            raise InvalidEvent("empty message")
        warning = decode(message.value, Warning)  # no domain rule applies to warnings: the codec is the whole check
        try:
            targets = [topic_for(cc) for cc in dict.fromkeys(warning.country_codes)]
        except ValueError as exc:
            raise InvalidEvent(str(exc), "$.country_codes") from None
        return Delivery(message, tuple(Outgoing(t, message.key, message.value, message.headers) for t in targets))

    routed = map_isolated(messages, deliver)
    return Routed(routed.results, tuple((letter_for(f, max_payload_bytes), f.label) for f in routed.failures))


class WarningRouter:
    """Consumer group ``crisiswatch-router`` on the warnings topic."""

    def __init__(self, settings: Settings, metrics: SinkMetrics, *, bootstrap: str | None = None,
                 source_topic: str = topics.WARNINGS, group_id: str = GROUP_ID, publisher: Publisher | None = None,
                 topic_for: Callable[[str], str] = topics.country_warning_topic, timeouts: GroupTimeouts = DEFAULT_TIMEOUTS,
                 backoff: Backoff = DEFAULT_BACKOFF, poll_timeout_s: float = 0.5, batch_size: int = 500) -> None:
        self.settings = settings
        self.metrics = metrics
        self.bootstrap = bootstrap or settings.kafka_bootstrap
        self.source_topic = source_topic
        self.group_id = group_id
        self._own_publisher = publisher is None
        self.publisher = publisher or Publisher(settings, bootstrap=self.bootstrap, client_id="crisiswatch-router")
        self.topic_for = topic_for
        self.timeouts = timeouts
        self.backoff = backoff
        self.poll_timeout_s = poll_timeout_s
        self.batch_size = batch_size
        self._known_topics: set[str] = set()
        self.healthy = True

    def _polled(self) -> None:
        """Kafka answered a poll: an outage reported while it was away is over."""
        self.healthy = True

    def _outage(self, exc: BaseException) -> None:
        self.healthy = False

    def _ensure_topics(self, names: Iterable[str]) -> None:
        new = sorted(set(names) - self._known_topics)
        if new:
            created = create_topics(self.bootstrap, new, self.settings.partitions, self.settings.kafka_client_options())
            if created:
                log.info("created per-country warning topics", extra={"topics": created})
            self._known_topics.update(new)

    def _publish(self, deliveries: Sequence[Delivery]) -> tuple[Delivery, ...]:
        """The isolated step: publish the copies of some warnings (creating new country topics first)."""
        copies = [c for d in deliveries for c in d.copies]
        self._ensure_topics(c.topic for c in copies)
        self.publisher.publish(copies)
        return tuple(deliveries)

    def handle(self, messages: Sequence[Message], stop: threading.Event) -> None:
        max_payload = self.settings.dlq_max_payload_bytes
        routed = route(messages, self.topic_for, max_payload)
        outages = (BrokerUnavailable, EmbeddedError)
        run = retry(lambda: isolate(routed.deliveries, self._publish, outages=outages), outage=outages, stop=stop,
                    what="publish routed warnings", backoff=self.backoff, on_outage=self._outage)
        record(self.metrics, STAGE, run)
        dead = [*routed.dead, *((letter_for(Failure(f.item.message, f.error), max_payload), f.label) for f in run.failures)]
        if dead:
            retry(lambda: self.publisher.publish([letter for letter, _ in dead]), outage=outages, stop=stop,
                  what="publish to dlq", backoff=self.backoff, on_outage=self._outage)
        self.healthy = True
        delivered = [d for part in run.results for d in part]
        for copy in (c for d in delivered for c in d.copies):
            self.metrics.routed.labels(topic=copy.topic).inc()
        if unrouted := sum(1 for d in delivered if not d.copies):
            self.metrics.routed.labels(topic=UNROUTED).inc(unrouted)
        for letter, label in dead:
            self.metrics.dlq.labels(stage=STAGE, reason=label).inc()
            headers = dict(letter.headers)
            log.warning("dead-lettered", extra={"reason": headers[topics.DLQ_REASON_HEADER].decode(),
                                                "where": f"{headers[topics.DLQ_SOURCE_TOPIC_HEADER].decode()}"
                                                         f"[{headers.get(topics.DLQ_SOURCE_PARTITION_HEADER, b'?').decode()}]"
                                                         f"@{headers.get(topics.DLQ_SOURCE_OFFSET_HEADER, b'?').decode()}"})

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set (:func:`consumers.kafka_io.run_consumer`)."""
        try:
            run_consumer(stop, name="router", handle=self.handle, poll_timeout_s=self.poll_timeout_s,
                         batch_size=self.batch_size, backoff=self.backoff, on_outage=self._outage, on_polled=self._polled,
                         connect=lambda: group_consumer(self.bootstrap, [self.source_topic], self.group_id,
                                                        self.settings.kafka_client_options(), self.timeouts),
                         log_extra={"topic": self.source_topic, "group": self.group_id})
        finally:
            if self._own_publisher:
                self.publisher.close()
