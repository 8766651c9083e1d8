"""Consumer lag of the stack's groups: how much of what was written has not been processed yet.

A stage commits an offset only once what it read up to there is finished (warnings acknowledged,
rows in PostgreSQL), so "committed = end offset" on every partition a group reads means that group
has nothing in hand. ``crisiswatch up`` uses it to drain the pipeline before it stops (what the API
acknowledged reaches PostgreSQL before the in-memory broker goes), the chaos tests to know when a
scenario has settled, the soak command to report lag over time.

End offsets come from :mod:`pipeline.end_offsets`: exact on the embedded broker too, whose
``ListOffsets`` answer stops at the base offset of a partition's last record batch.

:class:`LagMonitor` reads the same numbers every few seconds and exports them as the gauge
``crisiswatch_consumer_lag{group,topic}`` (the sink process runs it): a stage that falls behind,
or stops, shows as a growing lag before anyone misses a warning.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from pipeline import topics
from pipeline.end_offsets import topic_end_offsets
from pipeline.metrics import LagMetrics

log = logging.getLogger(__name__)

Position = tuple[str, int]

WORKER_GROUP: Final = "crisiswatch"  # Faust's consumer group is the app id (pipeline.app.APP_ID)
SINK_GROUP: Final = "crisiswatch-sink"
ROUTER_GROUP: Final = "crisiswatch-router"

STACK_GROUPS: Final[Mapping[str, tuple[str, ...]]] = {
    WORKER_GROUP: (topics.CHECKINS, topics.CRISIS_EVENTS),
    SINK_GROUP: (topics.CHECKINS, topics.CITIZENS, topics.CRISIS_EVENTS, topics.WARNINGS, topics.ACKS, topics.CASES,
                 topics.CRISIS_STATUS),
    ROUTER_GROUP: (topics.WARNINGS,),
}
"""The consumer groups of ``crisiswatch up`` and the topics each one reads."""

DISPATCH_GROUP: Final = "crisiswatch-dispatch"  # consumers.dispatch.GROUP_ID (a test keeps them equal)

ACCOUNTABILITY_GROUP: Final = "crisiswatch-accountability"  # pipeline.accountability_app.APP_ID (a test keeps them equal)

MONITORED_GROUPS: Final[Mapping[str, tuple[str, ...]]] = {
    **STACK_GROUPS, DISPATCH_GROUP: (topics.WARNINGS,),
    ACCOUNTABILITY_GROUP: (topics.WARNINGS, topics.DELIVERIES, topics.ACKS, topics.CASES),
}
"""The groups whose lag the sink process exports."""


def committed_offsets(bootstrap: str, group: str, client_options: Mapping[str, Any] | None = None) -> dict[Position, int]:
    """The offsets ``group`` committed, per topic and partition."""
    return groups_committed(bootstrap, [group], client_options)[group]


def groups_committed(bootstrap: str, groups: Iterable[str],
                     client_options: Mapping[str, Any] | None = None) -> dict[str, dict[Position, int]]:
    """The offsets each of ``groups`` committed, per topic and partition, through one admin client."""
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="crisiswatch-lag", request_timeout_ms=10_000,
                             **(client_options or {}))
    try:
        out: dict[str, dict[Position, int]] = {}
        for group in groups:
            offsets = admin.list_group_offsets({group: None}).get(group, {})
            out[group] = {(tp.topic, tp.partition): int(meta.offset) for tp, meta in offsets.items()
                          if meta.offset is not None and meta.offset >= 0}
        return out
    finally:
        admin.close()


def end_offsets(bootstrap: str, names: Iterable[str], client_options: Mapping[str, Any] | None = None) -> dict[Position, int]:
    """The end offset of every partition of ``names`` (topics that do not exist have none)."""
    return topic_end_offsets(bootstrap, set(names), client_options)


def lags_by_topic(ends: Mapping[Position, int], committed: Mapping[str, Mapping[Position, int]],
                  groups: Mapping[str, Iterable[str]]) -> dict[tuple[str, str], int]:
    """Messages not yet committed per (group, topic), summed over the topic's partitions. Pure.

    A partition the group never committed counts from offset 0: a group that has not started yet is
    behind by everything written."""
    out: dict[tuple[str, str], int] = {}
    for group, names in groups.items():
        done = committed.get(group, {})
        for name in names:
            out[(group, name)] = sum(max(0, end - done.get(tp, 0)) for tp, end in ends.items() if tp[0] == name)
    return out


def group_lags(bootstrap: str, groups: Mapping[str, Iterable[str]] = STACK_GROUPS,
               client_options: Mapping[str, Any] | None = None) -> dict[str, int]:
    """Messages not yet committed, per group, summed over the partitions of the topics it reads."""
    wanted = {group: tuple(names) for group, names in groups.items()}
    ends = end_offsets(bootstrap, {t for names in wanted.values() for t in names}, client_options)
    out: dict[str, int] = {}
    for group, names in wanted.items():
        done = committed_offsets(bootstrap, group, client_options)
        out[group] = sum(max(0, end - done.get(tp, 0)) for tp, end in ends.items() if tp[0] in names)
    return out


def topic_lags(bootstrap: str, groups: Mapping[str, Iterable[str]] = MONITORED_GROUPS,
               client_options: Mapping[str, Any] | None = None) -> dict[tuple[str, str], int]:
    """:func:`lags_by_topic` as the broker has it now. Topics that do not exist yet count 0."""
    wanted = {group: tuple(names) for group, names in groups.items()}
    ends = end_offsets(bootstrap, {t for names in wanted.values() for t in names}, client_options)
    committed = groups_committed(bootstrap, wanted, client_options)
    return lags_by_topic(ends, committed, wanted)


class LagMonitor:
    """Reads the groups' lag every ``interval_s`` on a daemon thread into :class:`~pipeline.metrics.LagMetrics`.

    A read that fails (the broker is away) leaves the last values and the last-success time as they
    were: ``crisiswatch_dependency_up`` says the broker is away, and the age of
    ``crisiswatch_consumer_lag_last_success_timestamp_seconds`` how old the lag figures are."""

    def __init__(self, read: Callable[[], Mapping[tuple[str, str], int]], metrics: LagMetrics, *,
                 interval_s: float = 15.0, clock: Callable[[], float] = time.time) -> None:
        self.read = read
        self.metrics = metrics
        self.interval_s = interval_s
        self.clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def for_settings(cls, bootstrap: str, client_options: Mapping[str, Any], metrics: LagMetrics,
                     groups: Mapping[str, Iterable[str]] = MONITORED_GROUPS, interval_s: float = 15.0) -> LagMonitor:
        return cls(lambda: topic_lags(bootstrap, groups, client_options), metrics, interval_s=interval_s)

    def check_now(self) -> bool:
        """Read the lags once into the gauges; False if the broker did not answer."""
        try:
            lags = self.read()
        except Exception as exc:  # an outage of the broker: the probe reports it, the figures stay as they were
            log.debug("consumer lag not read: %r", exc)
            return False
        for (group, topic), lag in lags.items():
            self.metrics.lag.labels(group=group, topic=topic).set(lag)
        self.metrics.last_success.set(self.clock())
        return True

    def start(self) -> LagMonitor:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="consumer-lag", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)  # a daemon: a read stuck on a broker that is away does not hold up the exit
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.check_now()
            self._stop.wait(self.interval_s)
