"""The accountability process's Faust app (``crisiswatch accountability``): facts in, per-crisis
``crisis-status/1`` out, in a process and consumer group of its own.

Why not in the worker, where it first ran: it re-keys every warning, delivery, reply and case by crisis
and writes a changelog record per changed standing. In the worker, that work shared one event loop and
one producer with the locate agent, and every check-in waited behind it: the demo's check-in ->
warning latency grew several times longer (README, "Known limits"). A process of its own takes nothing
from the geofencing; it has its own app id, hence its own consumer group and internal topics
(:func:`internal_topics`), its own ``/metrics`` and ``/health``, and ``up`` supervises it like the
worker. Several may run: the re-keyed stream's partitions, and so the crises, are shared among them.

The work itself is :mod:`pipeline.accountability`'s (no Faust there); the agents below only move bytes:

- **accountability-rekey** (``warnings``, ``deliveries``, ``acks``, ``cases``): each message as a fact
  keyed by its crisis, sent to ``<app id>-by-crisis-repartition``; what is no fact is skipped and
  counted, and a bad ``delivery/1`` (only this process reads deliveries) is dead-lettered.
- **accountability** (the re-keyed stream): folds the facts into the citizens' standings, kept in the
  ``accountability`` table (memory store, changelog in Kafka).
- a timer publishes the due statuses on ``crisis-status``, at most once per crisis per
  ``CRISISWATCH_STATUS_INTERVAL_S``, and none from a table that has not finished recovering (from the
  start of a rebalance until the table's recovery ends, a table holds only part of a crisis's
  standings); after a recovery, the standings of crises whose partition went elsewhere are dropped.

Both agents take their stream in batches (``take_events``: ``CRISISWATCH_BATCH_SIZE`` events, or what
came within ``CRISISWATCH_BATCH_WAIT_S``), as the worker's locate agent does: a batch's re-keyed facts,
and its changed standings (each once, however often it changed in the batch), are handed to the
producer together and awaited together, instead of one send and one round trip per record
(``python -m bench.accountability``).

At-least-once, as in the worker (:mod:`pipeline.app`): a standing's changelog record and a status are
acknowledged by Kafka before the event is; work that cannot be finished ends the process before
anything is committed (:func:`pipeline.app.finish_or_exit`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from datetime import datetime
from typing import Any, Final

import faust
from faust.web import Request, Response, View
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pipeline import topics
from pipeline.accountability import STAGE, AccountabilityRuntime, Rekeyed, Topics, rekey
from pipeline.app import (
    KafkaEmitter,
    Record,
    faust_app,
    finish_or_exit,
    partition_of,
    raw_message,
    send_all,
    utc_now,
)
from pipeline.health import HealthProbe
from pipeline.metrics import DlqMetrics
from pipeline.runtime import DeadLetter
from pipeline.settings import Settings
from pipeline.stage import describe, label
from schemas import encode

log = logging.getLogger(__name__)

APP_ID: Final = "crisiswatch-accountability"
TABLE: Final = "accountability"


def regrouped_topic(app_id: str = APP_ID) -> str:
    """The accountability facts re-keyed by crisis."""
    return f"{app_id}-by-crisis-repartition"


def table_changelog_topic(app_id: str = APP_ID) -> str:
    return f"{app_id}-{TABLE}-changelog"


def internal_topics(app_id: str = APP_ID) -> list[str]:
    """This app's own topics, created with the core ones (``up``, ``crisiswatch accountability``): the
    standings' changelog and the re-keyed stream."""
    return [table_changelog_topic(app_id), regrouped_topic(app_id)]


def create_accountability_app(settings: Settings, *, registry: CollectorRegistry | None = None,
                              clock: Callable[[], datetime] = utc_now, app_id: str = APP_ID,
                              health: HealthProbe | None = None, names: Topics | None = None,
                              status_topic: str = topics.CRISIS_STATUS) -> tuple[faust.App, AccountabilityRuntime]:
    registry = registry or CollectorRegistry()
    metrics = DlqMetrics(registry)
    app = faust_app(settings, app_id, settings.accountability_web_port,
                    f"accountability-{settings.accountability_web_port}")
    names = names or Topics()
    sources = app.topic(*names.all(), key_serializer="raw", value_serializer="raw")
    regrouped = app.topic(regrouped_topic(app_id), key_serializer="raw", value_serializer="raw",
                          partitions=settings.partitions, internal=True)
    table = app.Table(TABLE, default=None, partitions=settings.partitions, key_type=bytes)
    regrouped_name: str = regrouped.get_topic_name()

    def owned_partitions() -> set[int]:
        return {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == regrouped_name}

    def owns(crisis_id: str) -> bool:  # the re-keyed stream is keyed by crisis, placed by the default partitioner
        return partition_of(crisis_id.encode("utf-8"), settings.partitions) in owned_partitions()

    runtime = AccountabilityRuntime(_StandingsView(table), settings.status_interval_s, time.monotonic, owns,
                                    ready=False)
    changelog: str = table.changelog_topic.get_topic_name()
    emitter = KafkaEmitter(app, settings.dlq_max_payload_bytes)
    recovered = False

    @app.agent(sources, name="accountability-rekey")
    async def rekeying(stream: Any) -> None:
        async for events in stream.take_events(settings.batch_size, within=settings.batch_wait_s):
            now = clock()
            forward: list[Record] = []
            letters: list[DeadLetter] = []
            for event in events:
                fact = rekey(event.value, now)
                if isinstance(fact, Rekeyed):
                    forward.append((fact.key, fact.value, None))
                elif fact is not None:
                    metrics.stage_skipped.labels(stage=STAGE, reason=label(fact)).inc()
                    log.warning("not an accountability fact; skipped", extra={"topic": event.message.topic,
                                                                              "reason": describe(fact)})
                    if event.message.topic == names.deliveries:  # only this app reads deliveries: the dead letter is ours
                        letters.append(DeadLetter.of(raw_message(event), fact, STAGE))
            if forward:
                await finish_or_exit(send_all(app, regrouped_name, forward), "a batch of re-keyed accountability facts")
            if letters:
                await finish_or_exit(emitter.dead_letters(letters), "dead letters")

    @app.agent(regrouped, name="accountability")
    async def accountability(stream: Any) -> None:
        async for events in stream.take_events(settings.batch_size, within=settings.batch_wait_s):
            now = clock()
            changed: dict[str, tuple[bytes, int]] = {}  # a standing changed twice in a batch is written once
            for event in events:
                result = runtime.observe(event.value, now)
                if isinstance(result, Exception):  # cannot be: the re-keying agent forwards valid facts only
                    log.error("a re-keyed fact refused; skipped", extra={"reason": describe(result)})
                elif result is not None:
                    key, value = result
                    changed[key] = (json.dumps(value, separators=(",", ":")).encode("utf-8"), event.message.partition)
            if changed:
                records = [(key.encode("utf-8"), value, partition) for key, (value, partition) in changed.items()]
                await finish_or_exit(_send_placed(app, changelog, records), "a batch of accountability states")

    async def publish_statuses() -> None:
        statuses = runtime.due(clock())
        if statuses:
            await finish_or_exit(send_all(app, status_topic, [(s.crisis_id.encode("utf-8"), encode(s), None)
                                                              for s in statuses]), "crisis statuses")

    app.timer(interval=max(0.2, min(1.0, settings.status_interval_s)))(publish_statuses)

    @app.on_partitions_revoked.connect
    async def on_revoked(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        runtime.recovering()  # a rebalance began: no status until the table is recovered again

    @table.on_recover
    async def on_recovered() -> None:
        nonlocal recovered
        recovered = True
        runtime.recovered()

    @app.page("/metrics")
    async def metrics_page(self: View, request: Request) -> Response:
        # aiohttp refuses a charset inside content_type; the exposition format is UTF-8 by definition
        return self.bytes(generate_latest(registry), content_type=CONTENT_TYPE_LATEST.split("; charset")[0])

    @app.page("/health")
    async def health_page(self: View, request: Request) -> Response:
        owned = sorted(owned_partitions())
        details = {"table_recovered": recovered, "crisis_partitions": owned}
        if health is None:
            return self.json({"status": "ok" if recovered else "starting", **details}, status=200 if recovered else 503)
        status, body = health.report(recovered, **details)
        if not recovered and body["status"] == "unhealthy":
            body["status"] = "starting"
        return self.json(body, status=status)

    return app, runtime


async def _send_placed(app: faust.App, topic: str, records: Sequence[tuple[bytes, bytes, int]]) -> None:
    """Hand (key, value, partition) records to the producer in order; return once Kafka acknowledged
    them all (as :func:`pipeline.app.send_all`, each in the partition given)."""
    send = app.producer.send
    futures = [await send(topic, key, value, partition, None, None) for key, value, partition in records]
    if futures:
        await asyncio.gather(*futures)


class _StandingsView(MutableMapping[str, Any]):
    """The accountability table's store seen as a mapping of ``<crisis>\\x1f<citizen>`` to a standing's
    JSON; the changelog record is sent by the agent (see :func:`create_accountability_app`), and
    acknowledged before the event is: nothing Faust would commit is left unsaved. A deletion drops a
    standing from this process's memory only (a crisis owned elsewhere now), never from the changelog."""

    def __init__(self, table: Any) -> None:
        self.table = table

    def __getitem__(self, key: str) -> Any:
        return self.table.data[key.encode("utf-8")]

    def __setitem__(self, key: str, value: Any) -> None:
        self.table.data[key.encode("utf-8")] = value

    def __delitem__(self, key: str) -> None:
        del self.table.data[key.encode("utf-8")]

    def __iter__(self) -> Iterator[str]:
        return iter([k.decode("utf-8") if isinstance(k, bytes) else str(k) for k in list(self.table.data.keys())])

    def __len__(self) -> int:
        return len(self.table.data)
