"""Thin kafka-python plumbing shared by the consumers: group consumers, the message envelope,
offsets to commit, retry-with-backoff for outages (never for bad data), and :func:`run_consumer`,
the one poll → handle → commit loop of the sink, the router and the dispatcher."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Message:
    """One Kafka record as the consumers see it; the envelope stays in the adapters."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()
    tombstone: bool = False  # the record had no value at all (``value`` is then b""): an erasure on some topics

    @classmethod
    def from_record(cls, record: Any) -> Message:
        headers = tuple((str(k), bytes(v) if v is not None else b"") for k, v in (record.headers or ()))
        return cls(record.topic, int(record.partition), int(record.offset), record.key,
                   record.value if record.value is not None else b"", headers, record.value is None)

    def where(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


@dataclass(frozen=True, slots=True)
class GroupTimeouts:
    """Consumer-group timings. Short by default: the embedded broker makes a join wait for the
    rebalance timeout (``max_poll_interval_ms``), and the consumers poll continuously anyway."""

    max_poll_interval_ms: int = 5000
    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 1000


DEFAULT_TIMEOUTS: Final = GroupTimeouts()


def group_consumer(bootstrap: str, topic_names: Sequence[str], group_id: str, client_options: Mapping[str, Any],
                   timeouts: GroupTimeouts = DEFAULT_TIMEOUTS, client_id: str | None = None) -> Any:
    """A kafka-python consumer in ``group_id`` with manual commits, reading new groups from the start."""
    from kafka import KafkaConsumer

    return KafkaConsumer(
        *topic_names, bootstrap_servers=bootstrap, group_id=group_id, client_id=client_id or group_id,
        enable_auto_commit=False, auto_offset_reset="earliest",
        max_poll_interval_ms=timeouts.max_poll_interval_ms, session_timeout_ms=timeouts.session_timeout_ms,
        heartbeat_interval_ms=timeouts.heartbeat_interval_ms, **client_options)


def poll_messages(consumer: Any, timeout_s: float, max_records: int) -> list[Message]:
    """One poll, flattened in partition order (order within a partition is kept)."""
    batches = consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
    return [Message.from_record(r) for records in batches.values() for r in records]


def next_offsets(messages: Iterable[Message]) -> dict[tuple[str, int], int]:
    """Per (topic, partition), the offset to commit: one past the last message handled."""
    out: dict[tuple[str, int], int] = {}
    for m in messages:
        tp = (m.topic, m.partition)
        out[tp] = max(out.get(tp, 0), m.offset + 1)
    return out


def commit(consumer: Any, messages: Sequence[Message], timeout_s: float = 10.0) -> bool:
    """Commit the offsets after ``messages``. A failed commit only means redelivery (the writers are
    idempotent), so it is logged and reported, never raised."""
    from kafka import TopicPartition
    from kafka.errors import KafkaError
    from kafka.structs import OffsetAndMetadata

    offsets = {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in next_offsets(messages).items()}
    if not offsets:
        return True
    try:
        consumer.commit(offsets, timeout_ms=int(timeout_s * 1000))
    except KafkaError as exc:
        log.warning("offset commit failed; the batch will be redelivered and rewritten idempotently",
                    extra={"error": repr(exc)})
        return False
    return True


def dlq_label(field: str) -> str:
    """A bounded metric label for a dead letter: the JSON path of the fault, array indices dropped."""
    from pipeline.stage import json_path_label

    return json_path_label(field)


class Stopped(Exception):
    """Raised by :func:`retry` when asked to stop before the action succeeded."""


@dataclass(frozen=True, slots=True)
class Backoff:
    initial_s: float = 0.5
    maximum_s: float = 30.0
    factor: float = 2.0

    def delays(self) -> Iterable[float]:
        delay = self.initial_s
        while True:
            yield delay
            delay = min(self.maximum_s, delay * self.factor)


DEFAULT_BACKOFF: Final = Backoff()


def retry(action: Callable[[], T], *, outage: tuple[type[BaseException], ...], stop: threading.Event, what: str,
          backoff: Backoff = DEFAULT_BACKOFF, on_outage: Callable[[BaseException], None] = lambda exc: None) -> T:
    """Run ``action`` until it succeeds, waiting with backoff after each outage error.

    Anything not listed in ``outage`` propagates at once. Raises :class:`Stopped` when ``stop``
    is set while waiting: the caller then leaves without committing, so nothing is lost.
    """
    for attempt, delay in enumerate(backoff.delays(), start=1):
        try:
            return action()
        except outage as exc:
            on_outage(exc)
            log.warning("%s failed, retrying in %.1fs", what, delay, extra={"attempt": attempt, "error": repr(exc)})
        if stop.wait(delay):
            raise Stopped(what)
    raise AssertionError("unreachable")


def run_consumer(stop: threading.Event, *, name: str, connect: Callable[[], Any],
                 handle: Callable[[Sequence[Message], threading.Event], None], poll_timeout_s: float, batch_size: int,
                 backoff: Backoff = DEFAULT_BACKOFF, on_outage: Callable[[BaseException], None] = lambda exc: None,
                 after_poll: Callable[[threading.Event], object] | None = None,
                 on_polled: Callable[[], None] = lambda: None,
                 log_extra: Mapping[str, Any] | None = None) -> None:
    """A consumer stage's loop, until ``stop`` is set: connect (``connect`` makes the kafka-python
    consumer; retried with ``backoff`` while Kafka is down), then poll a batch, ``handle`` it, and
    commit its offsets only once ``handle`` returned — so a batch is committed only after it was
    handled, and a process that dies in between gets it again (every stage is idempotent).

    A failed poll is an outage: reported through ``on_outage``, waited out (``backoff.initial_s``) and
    polled again. ``handle`` retries its own outages; when asked to stop meanwhile it raises
    :class:`Stopped`, and the loop ends without committing (the batch is redelivered). Anything else
    ``handle`` raises propagates (the process exits and is restarted on the same offsets).
    ``on_polled`` is told of each poll that succeeded (Kafka answers again: a stage that reported an
    outage is healthy again even if nothing arrives), ``after_poll`` runs after each poll, batch or none
    (the sink's retention sweep). The consumer is closed without committing, whatever ends the loop."""
    from kafka.errors import KafkaError

    consumer: Any = None
    try:
        consumer = retry(connect, outage=(KafkaError,), stop=stop, what="connect to Kafka", backoff=backoff,
                         on_outage=on_outage)
        log.info("%s consuming", name, extra=dict(log_extra or {}))
        while not stop.is_set():
            try:
                messages = poll_messages(consumer, poll_timeout_s, batch_size)
            except KafkaError as exc:
                on_outage(exc)
                log.warning("poll failed", extra={"error": repr(exc), "stage": name})
                stop.wait(backoff.initial_s)
                continue
            on_polled()
            if messages:
                handle(messages, stop)
                commit(consumer, messages)
            if after_poll is not None:
                after_poll(stop)
    except Stopped as exc:
        log.info("%s stopped while waiting; the uncommitted batch will be redelivered", name,
                 extra={"during": str(exc)})
    finally:
        if consumer is not None:
            consumer.close(autocommit=False)


def read_topic(bootstrap: str, topic: str, until: Callable[[list[Message]], bool], timeout_s: float = 30.0,
               client_options: Mapping[str, Any] | None = None) -> list[Message]:
    """Read ``topic`` from its beginning, without a consumer group, until ``until(messages_so_far)``
    holds or ``timeout_s`` passes; return what was read. For tests and operator tooling."""
    import time

    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                             allow_auto_create_topics=False, **(client_options or {}))
    seen: list[Message] = []
    try:
        deadline = time.monotonic() + timeout_s
        partitions = consumer.partitions_for_topic(topic)
        while not partitions and time.monotonic() < deadline:
            time.sleep(0.2)
            partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            return seen
        assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(assigned)
        consumer.seek_to_beginning(*assigned)
        while not until(seen) and time.monotonic() < deadline:
            seen += poll_messages(consumer, 0.5, 1000)
        return seen
    finally:
        consumer.close()
