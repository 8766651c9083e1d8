"""The warning router: every warning on ``warnings`` is copied, unchanged (same key, value and
headers), to ``warnings.<CC>`` for each country in its ``country_codes``, so the crisis managers
of one country subscribe to their topic only.

At least once: offsets are committed after every copy is acknowledged; a replay copies again and
readers deduplicate on ``warning_id``. Warnings without a country are not routed, only counted.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from consumers.kafka_io import (
    DEFAULT_BACKOFF,
    DEFAULT_TIMEOUTS,
    Backoff,
    GroupTimeouts,
    Message,
    Stopped,
    commit,
    dlq_label,
    group_consumer,
    poll_messages,
    retry,
)
from pipeline import topics
from pipeline.embedded import EmbeddedError, create_topics
from pipeline.metrics import SinkMetrics
from pipeline.settings import Settings
from producers.publisher import BrokerUnavailable, Outgoing, Publisher, dead_letter
from schemas import InvalidEvent, Warning, decode

log = logging.getLogger(__name__)

GROUP_ID: Final = "crisiswatch-router"
STAGE: Final = "router"
UNROUTED: Final = "none"
"""The ``topic`` label under which warnings without a country are counted."""


@dataclass(frozen=True, slots=True)
class Routed:
    copies: tuple[Outgoing, ...]
    dead: tuple[tuple[Outgoing, str], ...]
    unrouted: int


def route(messages: Iterable[Message], topic_for: Callable[[str], str] = topics.country_warning_topic) -> Routed:
    """The copies to publish for a batch of warnings, and the dead letters (with a metric label). Pure."""
    copies: list[Outgoing] = []
    dead: list[tuple[Outgoing, str]] = []
    unrouted = 0
    for message in messages:
        try:
            warning = decode(message.value, Warning)
            targets = [topic_for(cc) for cc in dict.fromkeys(warning.country_codes)]
        except InvalidEvent as exc:
            dead.append((dead_letter(message.value, str(exc), message.topic, STAGE, message.key), dlq_label(exc.field)))
            continue
        except ValueError as exc:
            dead.append((dead_letter(message.value, f"$.country_codes: {exc}", message.topic, STAGE, message.key),
                         "$.country_codes"))
            continue
        if not targets:
            unrouted += 1
        copies += [Outgoing(t, message.key, message.value, message.headers) for t in targets]
    return Routed(tuple(copies), tuple(dead), unrouted)


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

    def _outage(self, exc: BaseException) -> None:
        self.healthy = False

    def _ensure_topics(self, names: Iterable[str]) -> None:
        new = sorted(set(names) - self._known_topics)
        if new:
            created = create_topics(self.bootstrap, new, self.settings.partitions, self.settings.kafka_client_options())
            if created:
                log.info("created per-country warning topics", extra={"topics": created})
            self._known_topics.update(new)

    def handle(self, messages: Sequence[Message], stop: threading.Event) -> None:
        routed = route(messages, self.topic_for)
        letters = [letter for letter, _ in routed.dead]

        def publish() -> None:
            self._ensure_topics(c.topic for c in routed.copies)
            self.publisher.publish([*routed.copies, *letters])

        retry(publish, outage=(BrokerUnavailable, EmbeddedError), stop=stop, what="publish routed warnings",
              backoff=self.backoff, on_outage=self._outage)
        self.healthy = True
        for copy in routed.copies:
            self.metrics.routed.labels(topic=copy.topic).inc()
        if routed.unrouted:
            self.metrics.routed.labels(topic=UNROUTED).inc(routed.unrouted)
        for letter, label in routed.dead:
            self.metrics.dlq.labels(stage=STAGE, reason=label).inc()
            log.warning("dead-lettered", extra={"reason": dict(letter.headers)[topics.DLQ_REASON_HEADER].decode()})

    def run(self, stop: threading.Event) -> None:
        from kafka.errors import KafkaError

        consumer: Any = None
        try:
            consumer = retry(lambda: group_consumer(self.bootstrap, [self.source_topic], self.group_id,
                                                    self.settings.kafka_client_options(), self.timeouts),
                             outage=(KafkaError,), stop=stop, what="connect to Kafka", backoff=self.backoff,
                             on_outage=self._outage)
            log.info("router consuming", extra={"topic": self.source_topic, "group": self.group_id})
            while not stop.is_set():
                try:
                    messages = poll_messages(consumer, self.poll_timeout_s, self.batch_size)
                except KafkaError as exc:
                    self._outage(exc)
                    log.warning("poll failed", extra={"error": repr(exc)})
                    stop.wait(self.backoff.initial_s)
                    continue
                if messages:
                    self.handle(messages, stop)
                    commit(consumer, messages)
        except Stopped as exc:
            log.info("router stopped during an outage; the uncommitted batch will be redelivered",
                     extra={"during": str(exc)})
        finally:
            if consumer is not None:
                consumer.close(autocommit=False)
            if self._own_publisher:
                self.publisher.close()
