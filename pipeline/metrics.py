"""Prometheus metrics, one class per kind of process, each on an injected ``CollectorRegistry``.

Metric names are listed once in :data:`METRIC_NAMES`; deploy/ (alerts, dashboards) refers to
these names and a test checks that every name used there exists here. :data:`PROCESSES` says
which process exports which classes, and :func:`catalogue` turns both into the table of
docs/metrics.md (``python -m pipeline.metrics`` prints it; a test keeps the two equal), so the
catalogue an operator reads is the code's own.

Naming follows Prometheus conventions: ``_total`` counters, base units in the name
(``_seconds``, ``_timestamp_seconds``), and only bounded label values (a stage, a topic, an
exception type), never free text or an identifier of a citizen or a crisis.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

MetricName = Literal[
    "crisiswatch_checkins_received_total",
    "crisiswatch_checkins_processed_total",
    "crisiswatch_warnings_emitted_total",
    "crisiswatch_active_crises",
    "crisiswatch_dlq_messages_total",
    "crisiswatch_stage_isolations_total",
    "crisiswatch_stage_skipped_total",
    "crisiswatch_checkin_to_warning_latency_seconds",
    "crisiswatch_batch_processing_seconds",
    "crisiswatch_batch_size",
    "crisiswatch_citizens_tracked",
    "crisiswatch_api_requests_total",
    "crisiswatch_api_events_published_total",
    "crisiswatch_api_unexpected_errors_total",
    "crisiswatch_sink_rows_written_total",
    "crisiswatch_sink_batch_seconds",
    "crisiswatch_sink_errors_total",
    "crisiswatch_sink_skipped_total",
    "crisiswatch_router_messages_total",
    "crisiswatch_feed_last_success_timestamp_seconds",
    "crisiswatch_feed_items_total",
    "crisiswatch_feed_errors_total",
    "crisiswatch_feed_fetch_seconds",
    "crisiswatch_dependency_up",
    "crisiswatch_dispatch_attempts_total",
    "crisiswatch_dispatch_warnings_total",
    "crisiswatch_dispatch_seconds",
    "crisiswatch_dispatch_rate_limited_seconds_total",
    "crisiswatch_dispatch_outages_total",
    "crisiswatch_api_publish_seconds",
    "crisiswatch_crisis_to_first_warning_seconds",
    "crisiswatch_warning_to_delivered_seconds",
    "crisiswatch_consumer_lag",
    "crisiswatch_consumer_lag_last_success_timestamp_seconds",
]
METRIC_NAMES: Final = frozenset(MetricName.__args__)  # type: ignore[attr-defined]

LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Delivery includes providers, retries and rate limits: minutes, not milliseconds.
DELIVERY_BUCKETS: Final = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


def _name(name: MetricName) -> str:
    """Counters are declared without ``_total``; prometheus-client appends it."""
    return name.removesuffix("_total")


class DlqMetrics:
    """What every consumer stage counts under the failure policy (:mod:`pipeline.stage`). ``reason`` is
    a bounded label: the exception type, or the JSON path of a schema violation — never free text."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.dlq = Counter(_name("crisiswatch_dlq_messages_total"), "Messages sent to the dead-letter topic",
                           ["stage", "reason"], registry=registry)
        self.isolations = Counter(_name("crisiswatch_stage_isolations_total"),
                                  "Batches that raised a data error and were split to isolate the culprits", ["stage"],
                                  registry=registry)
        self.stage_skipped = Counter(_name("crisiswatch_stage_skipped_total"),
                                     "Items a stage could not process and did not dead-letter itself (another stage "
                                     "dead-letters the message, or no message is at fault)", ["stage", "reason"],
                                     registry=registry)


class WorkerMetrics(DlqMetrics):
    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry)
        self.checkins_received = Counter(_name("crisiswatch_checkins_received_total"), "Check-in messages read", registry=registry)
        self.checkins_processed = Counter(_name("crisiswatch_checkins_processed_total"), "Valid check-ins geofenced",
                                          registry=registry)
        self.warnings = Counter(_name("crisiswatch_warnings_emitted_total"), "Warnings emitted", ["kind"], registry=registry)
        self.active_crises = Gauge("crisiswatch_active_crises", "Crises active on this worker", registry=registry)
        self.citizens = Gauge("crisiswatch_citizens_tracked", "Citizens whose last location this worker holds",
                              registry=registry)
        self.latency = Histogram("crisiswatch_checkin_to_warning_latency_seconds",
                                 "From a check-in's arrival in Kafka to its warning being sent", buckets=LATENCY_BUCKETS,
                                 registry=registry)
        self.batch_seconds = Histogram("crisiswatch_batch_processing_seconds", "Time to geofence one batch",
                                       buckets=LATENCY_BUCKETS, registry=registry)
        self.batch_size = Histogram("crisiswatch_batch_size", "Check-ins per geofenced batch",
                                    buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000), registry=registry)
        self.first_warning = FirstWarningClock(Histogram(
            "crisiswatch_crisis_to_first_warning_seconds",
            "From a crisis declaration or update reaching Kafka to the first warning it causes being sent, per worker",
            buckets=LATENCY_BUCKETS, registry=registry))


class ApiMetrics(DlqMetrics):
    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry)
        self.requests = Counter(_name("crisiswatch_api_requests_total"), "Ingest API requests", ["endpoint", "status"],
                                registry=registry)
        self.published = Counter(_name("crisiswatch_api_events_published_total"), "Events handed to Kafka", ["topic"],
                                 registry=registry)
        self.unexpected_errors = Counter(
            _name("crisiswatch_api_unexpected_errors_total"),
            "Exceptions nobody foresaw, answered 422 (step=validate: caused by the input) or 503 (step=request)",
            ["step"], registry=registry)
        self.publish_seconds = Histogram("crisiswatch_api_publish_seconds",
                                         "Ingest -> Kafka: time to hand one request's events to Kafka until acknowledged",
                                         buckets=LATENCY_BUCKETS, registry=registry)


class SinkMetrics(DlqMetrics):
    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry)
        self.rows = Counter(_name("crisiswatch_sink_rows_written_total"), "Rows inserted (new rows only)", ["table"],
                            registry=registry)
        self.batch_seconds = Histogram("crisiswatch_sink_batch_seconds", "Time to write one batch to PostgreSQL",
                                       buckets=LATENCY_BUCKETS, registry=registry)
        self.errors = Counter(_name("crisiswatch_sink_errors_total"), "PostgreSQL errors (retried)", registry=registry)
        self.skipped = Counter(_name("crisiswatch_sink_skipped_total"),
                               "Invalid messages not written, dead-lettered by the stage that owns their topic",
                               ["topic", "reason"], registry=registry)
        self.routed = Counter(_name("crisiswatch_router_messages_total"), "Warnings routed to per-country topics",
                              ["topic"], registry=registry)


class DispatchMetrics(DlqMetrics):
    """The dispatcher: every attempt by channel and outcome (``delivered``, ``transient``, ``permanent``,
    ``unavailable``), every warning by outcome (``delivered``, ``gave_up``, ``skipped``, ``no_citizen``,
    ``no_channel``), time per attempt, time spent waiting for a rate limit, and outages waited out."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry)
        self.attempts = Counter(_name("crisiswatch_dispatch_attempts_total"), "Delivery attempts by channel and outcome",
                                ["channel", "outcome"], registry=registry)
        self.warnings = Counter(_name("crisiswatch_dispatch_warnings_total"), "Warnings handled by outcome", ["outcome"],
                                registry=registry)
        self.seconds = Histogram("crisiswatch_dispatch_seconds", "Time of one delivery attempt", ["channel"],
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.rate_limited = Counter(_name("crisiswatch_dispatch_rate_limited_seconds_total"),
                                    "Seconds spent waiting for a channel's rate limit", ["channel"], registry=registry)
        self.outages = Counter(_name("crisiswatch_dispatch_outages_total"),
                               "Outages waited out (Kafka, PostgreSQL, a channel's relay), retried with backoff",
                               ["dependency"], registry=registry)
        self.to_delivered = Histogram("crisiswatch_warning_to_delivered_seconds",
                                      "From a warning being emitted to its first delivery to the citizen (outcome "
                                      "delivered)", buckets=DELIVERY_BUCKETS, registry=registry)

    def handled(self, outcome: str, emitted_at: datetime, now: datetime) -> None:
        """A warning settled with ``outcome``; a delivered one is timed from its ``emitted_at``."""
        if outcome == "delivered":
            self.to_delivered.observe(max(0.0, (now - emitted_at).total_seconds()))


class FeedMetrics(DlqMetrics):
    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry)
        self.last_success = Gauge("crisiswatch_feed_last_success_timestamp_seconds", "Last successful poll, Unix time",
                                  ["feed"], registry=registry)
        self.items = Counter(_name("crisiswatch_feed_items_total"), "Feed items by outcome", ["feed", "outcome"],
                             registry=registry)
        self.errors = Counter(_name("crisiswatch_feed_errors_total"), "Failed polls", ["feed", "kind"], registry=registry)
        self.fetch_seconds = Histogram("crisiswatch_feed_fetch_seconds", "Time to fetch and parse one feed", ["feed"],
                                       buckets=LATENCY_BUCKETS, registry=registry)


class DependencyMetrics:
    """What every long-running process reports of its broker and database (pipeline/health.py)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.up = Gauge("crisiswatch_dependency_up", "1 while the dependency answers this process's health probe, else 0",
                        ["dependency"], registry=registry)


class LagMetrics:
    """Consumer lag of the stack's groups (:mod:`pipeline.lag`), exported by the sink process: one
    process asks the broker, so the numbers do not depend on how many workers run."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.lag = Gauge("crisiswatch_consumer_lag",
                         "Messages written to a topic and not yet committed by a consumer group (summed over partitions)",
                         ["group", "topic"], registry=registry)
        self.last_success = Gauge("crisiswatch_consumer_lag_last_success_timestamp_seconds",
                                  "Last time the consumer lag was read from the broker, Unix time", registry=registry)


class _Observer(Protocol):
    def observe(self, amount: float) -> None: ...


class FirstWarningClock:
    """Times a crisis declaration (or update) to the first warning it causes on this worker.

    :meth:`seen` when the worker reads the crisis event live (with the event's Kafka timestamp),
    :meth:`sent` with every batch of warnings handed to Kafka, :meth:`settled` once the crisis's
    sweep is over: a sweep that warned nobody leaves no observation, and a citizen who walks in
    hours later is the check-in latency's business, not this one's. At most ``max_pending`` crises
    wait at once (the oldest are dropped), so nothing grows without bound."""

    def __init__(self, histogram: _Observer, max_pending: int = 1000) -> None:
        self.histogram = histogram
        self.max_pending = max_pending
        self._pending: dict[str, float] = {}
        self._lock = threading.Lock()

    def seen(self, crisis_id: str, op: str, kafka_timestamp: float | None) -> None:
        if kafka_timestamp is None or op == "cancel":
            return
        with self._lock:
            self._pending.pop(crisis_id, None)
            self._pending[crisis_id] = kafka_timestamp
            while len(self._pending) > self.max_pending:
                del self._pending[next(iter(self._pending))]

    def sent(self, crisis_ids: Iterable[str], now: float) -> None:
        with self._lock:
            if not self._pending:
                return
            started = [at for crisis_id in set(crisis_ids) if (at := self._pending.pop(crisis_id, None)) is not None]
        for at in started:
            self.histogram.observe(max(0.0, now - at))

    def settled(self, crisis_id: str) -> None:
        with self._lock:
            self._pending.pop(crisis_id, None)


PROCESSES: Final[Mapping[str, tuple[Callable[[CollectorRegistry], object], ...]]] = {
    "worker": (WorkerMetrics, DependencyMetrics),
    "api": (ApiMetrics, DependencyMetrics),
    "sink": (SinkMetrics, LagMetrics, DependencyMetrics),
    "dispatch": (DispatchMetrics, DependencyMetrics),
    "feeds": (FeedMetrics, DependencyMetrics),
    "accountability": (DlqMetrics, DependencyMetrics),
}
"""Which metric classes each long-running process registers (the ``crisiswatch <verb>`` it runs)."""


@dataclass(frozen=True, slots=True)
class CatalogueEntry:
    name: str  # as exposed: counters with ``_total``; a histogram's ``_bucket``/``_sum``/``_count`` follow from it
    type: str  # counter, gauge, histogram
    labels: tuple[str, ...]
    processes: tuple[str, ...]
    meaning: str


def catalogue() -> list[CatalogueEntry]:
    """Every metric, as the processes register them, sorted by name."""
    found: dict[str, CatalogueEntry] = {}
    for process, classes in PROCESSES.items():
        registry = CollectorRegistry()
        for cls in classes:
            cls(registry)
        for family in registry.collect():
            name = family.name + "_total" if family.type == "counter" else family.name
            # prometheus-client publishes no label names for a family without samples (every labelled
            # metric before its first use); the collector keeps them in ``_labelnames`` (read here, written against 0.26;
            # test_metrics_catalogue fails if it moves).
            labels = tuple(getattr(registry._names_to_collectors[name], "_labelnames", ()))
            entry = found.get(name)
            processes = (*entry.processes, process) if entry else (process,)
            found[name] = CatalogueEntry(name, family.type, labels, processes, family.documentation)
    return [found[name] for name in sorted(found)]


def catalogue_table() -> str:
    """:func:`catalogue` as the Markdown table of docs/metrics.md."""
    lines = ["| metric | type | labels | exported by | meaning |", "|---|---|---|---|---|"]
    for e in catalogue():
        labels = ", ".join(f"`{label}`" for label in e.labels) or "—"
        meaning = e.meaning.replace("|", "\\|")
        lines.append(f"| `{e.name}` | {e.type} | {labels} | {', '.join(e.processes)} | {meaning} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(catalogue_table(), end="")
