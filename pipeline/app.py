"""The Faust app: topics, the citizen-state table, the agents, and the worker's web pages.

- **locate agent** (``checkins``, partitioned by citizen): takes batches of check-ins and hands
  them to :class:`~pipeline.runtime.GeofenceRuntime`, which geofences the whole batch in one
  vectorised call and emits warnings. Each citizen's last location and what they were told
  live in the ``citizen-state`` table (in memory, in columns: :mod:`pipeline.citizens`; changelog in Kafka), co-partitioned with
  ``checkins`` (the changelog is partitioned by the same key hash as the check-ins), so a
  restarted or rebalanced worker recovers exactly the citizens it owns.
- **crisis agent** (``crisis-events``, one member of the group sees each event): admits every
  crisis event (decoded, then rehearsed: :mod:`pipeline.domain.admission`) and dead-letters the
  ones it refuses, once.
- **crisis reader** (on every worker, no consumer group, started with the app: :class:`StartsWithTheApp`):
  reads ``crisis-events`` from the beginning so every worker holds every active crisis, then follows it live; each upsert
  or cancel sweeps the citizens this worker owns (``inside``/``near`` at once, ``all_clear``
  on cancel). It admits each event the same way and skips (counts, never dead-letters) what is
  refused: admission depends on the event alone, so the crisis agent's verdict is every
  reader's, and the event is dead-lettered once across any number of workers (twice only if a
  worker dies between the dead letter and the commit of its offset: at-least-once, as everywhere).
- after every table recovery (start, rebalance) the worker reconciles: every owned citizen
  against every active crisis, sending only what the stored state says is missing.
- a timer ends expired crises (``all_clear``).
- ``/health`` is 200 once crises and citizens are loaded and, with a health probe
  (:mod:`pipeline.health`, given by ``crisiswatch worker``), while Kafka answers it; else 503, the
  body naming what is missing or down.

Bad data never stops an agent (:mod:`pipeline.stage`): a message that makes a step raise anything
but an infrastructure failure is isolated and dead-lettered, and the rest goes on.

At-least-once, nothing lost: a batch is finished only when its warnings and the citizens' new
state records are acknowledged by Kafka (:func:`send_all`, :class:`_TableView`); Faust commits a
batch's offsets only after that (the state records of a batch's chunks are acknowledged while the
next chunk is geofenced, and all of them before the batch is done: :meth:`GeofenceRuntime.settle`).
Records go out in batches built per partition (:func:`hand_all`). Work that cannot be finished ends the process before anything is
committed (:func:`finish_or_exit`), and partitions with no committed offset are read from their
beginning after every seek (:func:`_rewind_uncommitted`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Sequence
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import faust
from aiokafka import AIOKafkaConsumer, TopicPartition
from faust.web import Request, Response, View
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pipeline import dlq, topics
from pipeline.citizens import CitizenColumns
from pipeline.citizens import partition_of as partition_of  # the key's partition, as the table places it
from pipeline.consent import UNTRACKED_TABLE, ConsentGate, forget_states
from pipeline.domain.tracking import GeofenceConfig
from pipeline.end_offsets import end_offsets, exact_faust_highwaters
from pipeline.health import HealthProbe
from pipeline.metrics import WorkerMetrics
from pipeline.runtime import LOCATE, READER, ColumnarStates, DeadLetter, DurableStates, GeofenceRuntime, RawMessage
from pipeline.settings import Settings
from schemas import Crisis, InvalidEvent, Warning
from schemas.fast import citizen_of, encode_warnings, split_checkin_batch

log = logging.getLogger(__name__)

APP_ID = "crisiswatch"
STATE_TABLE = "citizen-state"


def changelog_topic(app_id: str = APP_ID) -> str:
    return f"{app_id}-{STATE_TABLE}-changelog"


def internal_topics(app_id: str = APP_ID) -> list[str]:
    """The worker's own topics, created with the core ones (``up``): its tables' changelogs."""
    return [changelog_topic(app_id), f"{app_id}-{UNTRACKED_TABLE}-changelog"]


def utc_now() -> datetime:
    return datetime.now(UTC)


def raw_message(event: Any) -> RawMessage:
    message = event.message
    return RawMessage(message.value, message.key, message.topic, message.partition, message.timestamp,
                      message.offset)


@lru_cache(maxsize=1 << 16)
def _partition_of_citizen(key: bytes, partitions: int) -> int:
    return partition_of(key, partitions)  # murmur2 in Python: some microseconds, and citizens check in again


def checkin_messages(events: Sequence[Any], partitions: int) -> tuple[list[RawMessage], list[DeadLetter]]:
    """The locate agent's decode step: every check-in of a batch of records as a message of its own.

    A ``checkin-batch/1`` record (:mod:`schemas.fast`, what the API publishes) is split into its
    check-ins, each keyed by its citizen, at the record's partition and offset: Faust's work per
    record is paid once for all of them, and the record's offset is committed once all of them are
    done. A check-in whose citizen keys to another partition is dead-lettered with the reason (its
    citizen's state lives in another partition's table); so is a record that says it is a batch and
    cannot be read. A single ``checkin/1`` record is passed on as it is.
    """
    messages: list[RawMessage] = []
    letters: list[DeadLetter] = []
    for event in events:
        record = raw_message(event)
        try:
            items = None if record.value is None else split_checkin_batch(record.value)
        except InvalidEvent as exc:
            letters.append(DeadLetter.of(record, exc, LOCATE))
            continue
        if items is None:
            messages.append(record)
            continue
        for item in items:
            citizen = citizen_of(item)
            key = None if citizen is None else citizen.encode("utf-8", "surrogatepass")
            message = RawMessage(item, key, record.topic, record.partition, record.timestamp, record.offset)
            home = record.partition if key is None else _partition_of_citizen(key, partitions)
            if home == record.partition:
                messages.append(message)  # (no citizen: decoding says what is wrong)
            else:
                letters.append(DeadLetter.of(message, InvalidEvent(
                    f"check-in of a citizen who keys to partition {home} in a checkin-batch/1 on partition "
                    f"{record.partition}: a batch holds one partition's check-ins", "$.citizen_id"), LOCATE))
    return messages, letters


Record = tuple[bytes | None, bytes | None, list[tuple[str, bytes]] | None]  # key, value, headers


def _transport_producer(app: faust.App) -> Any:
    """The aiokafka producer under the app's Faust producer, when it places keys as Kafka's default
    partitioner does (murmur2, what :func:`partition_of` computes); else None."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.partitioner import DefaultPartitioner

    try:
        producer = app.producer._ensure_producer()  # type: ignore[attr-defined]
    except Exception:  # not started, or another transport: the plain path says what is wrong
        return None
    if not isinstance(producer, AIOKafkaProducer) or not isinstance(producer._partitioner, DefaultPartitioner):
        return None
    return producer


async def hand_all(app: faust.App, topic: str, records: Sequence[Record],
                   partitions: Sequence[int] | None = None) -> list[Awaitable[Any]]:
    """Hand records to the app's producer, in order within each partition, and return the futures of
    their acknowledgements (nothing is awaited but room in the producer's buffer).

    Records with a key go in record batches built here, one partition at a time (aiokafka's
    ``create_batch``/``send_batch``): a record costs an append to a batch instead of a ``send`` call with
    its serializer, partitioner and future each (about 75 µs of a worker's CPU a record, the larger
    share of a sweep's). A record lands in the partition Kafka's default partitioner gives its key,
    or ``partitions[i]`` when the caller knows it (the citizen-state table knows each row's). A batch
    holds at most the producer's ``max_batch_size`` (``CRISISWATCH_PRODUCER_MAX_BATCH_BYTES``), a
    record alone if it is larger; a record larger than the producer's ``max_request_size`` raises
    ``MessageSizeTooLargeError`` as ``send`` would. Records without a key (a dead letter of a keyless
    message) go through ``send``."""
    if not records:
        return []
    producer = _transport_producer(app)
    if producer is None:
        return [await app.producer.send(topic, key, value, None, None, headers) for key, value, headers in records]
    from aiokafka.errors import MessageSizeTooLargeError
    from aiokafka.record.default_records import DefaultRecordBatchBuilder

    await producer.client._wait_on_metadata(topic)
    count = len(producer.client.cluster.partitions_for_topic(topic) or ())
    if partitions is not None and (len(partitions) != len(records) or not all(0 <= p < count for p in partitions)):
        partitions = None  # not the topic's partitions after all: place by key
    by_partition: dict[int, list[Record]] = {}
    futures: list[Awaitable[Any]] = []
    for i, record in enumerate(records):
        key, value, headers = record
        if key is None or not count:
            futures.append(await app.producer.send(topic, key, value, None, None, headers))
            continue
        rough = len(key) + len(value or b"") + sum(len(k) + len(v) for k, v in headers or ()) + 256
        if rough > producer._max_request_size and \
                DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers or []) > producer._max_request_size:
            raise MessageSizeTooLargeError(f"a record of {len(value or b'')} bytes for {topic} is larger than the "
                                           "producer's max_request_size")
        partition = partitions[i] if partitions is not None else _partition_of_citizen(key, count)
        by_partition.setdefault(partition, []).append(record)
    for partition, batch_records in by_partition.items():
        batch = producer.create_batch()
        for key, value, headers in batch_records:
            if batch.append(key=key, value=value, timestamp=None, headers=headers or []) is None:
                futures.append(await producer.send_batch(batch, topic, partition=partition))
                batch = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None, headers=headers or [])
        futures.append(await producer.send_batch(batch, topic, partition=partition))
    return futures


async def send_all(app: faust.App, topic: str, records: Sequence[Record], partitions: Sequence[int] | None = None) -> None:
    """Hand records to the app's producer (:func:`hand_all`) and return once Kafka acknowledged them all.

    This is the transport-level send, not ``Topic.send``: no per-message channel, serializer and
    future bookkeeping (a large share of a busy worker's time when every warning and state record
    went through it; ``python -m bench.worker`` shows the worker's rate), and nothing buffered or
    attached to the event being processed — Faust publishes a message sent that way only when the
    event is acknowledged, so a crash in between lost it."""
    futures = await hand_all(app, topic, records, partitions)
    if futures:
        await asyncio.gather(*futures)


class KafkaEmitter:
    """Warnings and dead letters out through the app's producer; returns once acknowledged."""

    def __init__(self, app: faust.App, max_dlq_payload_bytes: int = dlq.DEFAULT_MAX_PAYLOAD_BYTES) -> None:
        self.app = app
        self.max_dlq_payload_bytes = max_dlq_payload_bytes

    async def warnings(self, warnings: Sequence[Warning]) -> None:
        values = encode_warnings(warnings)
        await send_all(self.app, topics.WARNINGS, [(w.citizen_id.encode(), value, None)
                                                   for w, value in zip(warnings, values, strict=True)])

    async def dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        records = [dlq.build(letter.raw.value, reason=letter.reason, stage=letter.stage, error_type=letter.error_type,
                             source_topic=letter.raw.topic, partition=letter.raw.partition, offset=letter.raw.offset,
                             key=letter.raw.key, max_payload_bytes=self.max_dlq_payload_bytes)
                   for letter in letters]
        await send_all(self.app, topics.DLQ, [(r.key, r.value, list(r.headers)) for r in records])


FETCH_MAX_WAIT_MS = 100


def _bound_fetch_wait(max_wait_ms: int = FETCH_MAX_WAIT_MS) -> None:
    """Faust builds its aiokafka consumer with a fixed ``fetch_max_wait_ms=1500``. A broker that holds
    an empty fetch for the whole wait (the embedded one does) then adds up to 1.5 s to every
    check-in -> warning path. Lower it on the consumer Faust creates, before it starts."""
    from faust.transport.drivers import aiokafka as driver

    thread = driver.AIOKafkaConsumerThread
    if getattr(thread, "_crisiswatch_fetch_wait", None) == max_wait_ms:
        return
    original = thread._create_worker_consumer

    def create(self: Any, transport: Any) -> Any:
        consumer = original(self, transport)
        consumer._fetch_max_wait_ms = min(consumer._fetch_max_wait_ms, max_wait_ms)
        return consumer

    setattr(thread, "_create_worker_consumer", create)  # noqa: B010 - patching a method on purpose
    setattr(thread, "_crisiswatch_fetch_wait", max_wait_ms)  # noqa: B010


def _rewind_uncommitted() -> None:
    """Make Faust's seek back to the committed offsets (after every rebalance) lose nothing.

    While a restarted worker restores its table, aiokafka already fetches the check-in partitions
    and the position moves past what it fetched. Afterwards Faust seeks every partition back to its
    committed offset, but a partition with no committed offset (or offset 0: aiokafka's
    ``seek_to_committed`` skips both) is left where the fetch got to: check-ins published while no
    worker ran were skipped, their warnings never sent. ``auto_offset_reset`` is ``earliest``, so
    "no committed offset" means "from the beginning": seek there explicitly. And the flow must be
    stopped while positions move back (below)."""
    from faust.transport.consumer import Consumer

    if getattr(Consumer, "_crisiswatch_rewind", False):
        return
    original = Consumer.perform_seek

    async def perform_seek(self: Any) -> None:
        # Stop the flow first: Faust calls this with the flow running (it was resumed to read the
        # changelogs) and clears the channels' queues only afterwards, so check-ins fetched after the
        # seek but before that clear were dropped, their offsets already counted as read. Faust resumes
        # the flow itself right after.
        self.stop_flow()
        await original(self)
        changelogs = self.app.tables.changelog_topics
        uncommitted = {tp: 0 for tp in self.assignment()
                       if tp.topic not in changelogs and not self._committed_offset.get(tp)}
        if uncommitted:
            log.info("no committed offset, reading from the beginning: %s",
                     ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(uncommitted)))
            await self.seek_wait(uncommitted)

    setattr(Consumer, "perform_seek", perform_seek)  # noqa: B010 - patching a method on purpose
    setattr(Consumer, "_crisiswatch_rewind", True)  # noqa: B010


_TABLE_MANAGER_START = '''    async def on_start(self) -> None:
        """Call when table manager is starting."""
        await self.sleep(1.0)
        if not self.should_stop:
            await self._update_channels()
            await self.recovery.start()
'''


def _no_table_registration_wait() -> bool:
    """Start Faust's table manager without its one-second wait; ``True`` once patched.

    ``TableManager.on_start`` sleeps 1 s before it registers the tables' changelog channels, a grace
    period for tables declared while the app is already starting; the consumer joins the group only
    after that (the conductor waits for the tables), so every worker start paid the second. Every
    crisiswatch table is declared while the app is built, before it starts, and a table declared any
    later is refused loudly by Faust (``add``: "Too late to add tables at this point"), never lost:
    the wait buys nothing here. Patched only while Faust's method is the one read here (its source,
    compared whole); otherwise Faust is left as it is, and ``tests/unit/test_faust_start.py`` fails."""
    import inspect

    from faust.tables.manager import TableManager

    if getattr(TableManager, "_crisiswatch_no_wait", False):
        return True
    if inspect.getsource(TableManager.on_start) != _TABLE_MANAGER_START:
        log.warning("Faust's TableManager.on_start is not the one crisiswatch knows: its 1 s wait stays")
        return False

    async def on_start(self: Any) -> None:
        if not self.should_stop:
            await self._update_channels()
            await self.recovery.start()

    setattr(TableManager, "on_start", on_start)  # noqa: B010 - patching a method on purpose
    setattr(TableManager, "_crisiswatch_no_wait", True)  # noqa: B010
    return True


EXIT_UNFINISHED = 75  # EX_TEMPFAIL: the process manager should start the worker again


async def finish_or_exit(work: Awaitable[Any], what: str, exit_now: Callable[[int], Any] = os._exit) -> None:
    """Run one unit of agent work; if it fails, end the process before Faust can commit past it.

    Bad data never raises out of the runtime (:mod:`pipeline.stage` isolates it and it goes to the
    DLQ); what does is an infrastructure failure: Kafka refusing a warning, a dead letter or a state
    write after its own retries. Leaving the agent loop then
    would let Faust acknowledge the events anyway (``take_events`` acknowledges a batch however
    its body ended) and commit their offsets: the batch would be lost. Exiting at once, with
    nothing committed, makes a restarted worker process it again (at-least-once)."""
    try:
        await work
    except Exception:
        log.critical("could not finish %s; exiting without committing it, a restarted worker processes it again",
                     what, exc_info=True)
        logging.shutdown()
        exit_now(EXIT_UNFINISHED)


def broker_credentials(settings: Settings) -> Any:
    protocol = settings.kafka_security_protocol
    if protocol.startswith("SASL"):
        ssl_context = None
        if protocol == "SASL_SSL":
            import ssl

            ssl_context = ssl.create_default_context(cafile=settings.kafka_ssl_cafile or None)
        return faust.SASLCredentials(username=settings.kafka_sasl_username,
                                     password=settings.kafka_sasl_password.get(),
                                     mechanism=settings.kafka_sasl_mechanism or "PLAIN", ssl_context=ssl_context)
    if protocol == "SSL":
        return faust.SSLCredentials(cafile=settings.kafka_ssl_cafile or None)
    return None


async def read_crisis_log(settings: Settings, follow: asyncio.Event) -> AsyncIterator[list[RawMessage]]:
    """Every message of ``crisis-events`` from the beginning, in batches; an empty batch marks
    the moment the backlog was read (then it goes on following the topic live)."""
    opts = settings.kafka_client_options()
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None, enable_auto_commit=False,
                                fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
                                auto_offset_reset="earliest", client_id="crisiswatch-crisis-reader",
                                **{k: v for k, v in opts.items() if k != "ssl_cafile"})
    await consumer.start()
    try:
        parts: set[int] = set()
        while not parts:  # metadata may not name the topic's partitions yet on a busy broker
            await consumer.topics()
            parts = consumer.partitions_for_topic(topics.CRISIS_EVENTS) or set()
            if not parts:
                log.warning("waiting for the partitions of %s", topics.CRISIS_EVENTS)
                await asyncio.sleep(0.5)
        assigned = [TopicPartition(topics.CRISIS_EVENTS, p) for p in sorted(parts)]
        consumer.assign(assigned)
        await consumer.seek_to_beginning(*assigned)
        # Caught up = every partition read up to the end offset known at start (exact: pipeline.end_offsets)
        # AND a fetch came back empty (an empty fetch alone can just be a slow broker).
        ends = await end_offsets(consumer, assigned)
        caught_up = False
        while True:
            batches = await consumer.getmany(timeout_ms=200 if not caught_up else 500, max_records=1000)
            records = [RawMessage(r.value, r.key, r.topic, r.partition, r.timestamp / 1000.0)
                       for batch in batches.values() for r in batch]
            if records:
                yield records
            elif not caught_up and all([await consumer.position(tp) >= end for tp, end in ends.items()]):
                caught_up = True
                follow.set()
                yield []
    finally:
        await consumer.stop()


class StartsWithTheApp(faust.Service):
    """Runs a coroutine from the moment the app starts, for as long as it runs.

    A Faust ``app.task`` starts only after the consumer group is joined and the tables recovered;
    the crisis reader needs neither (it reads ``crisis-events`` without a group), and loading a
    thousand crises takes seconds. Started with the app, it loads them while the group join waits
    (on the embedded broker, three seconds for the first member), so a worker is ready when the
    join ends instead of seconds after. Stopping the app stops it (its future is cancelled)."""

    def __init__(self, work: Callable[[], Awaitable[None]]) -> None:
        super().__init__()
        self.work = work

    async def on_start(self) -> None:
        self.add_future(self.work())


def faust_app(settings: Settings, app_id: str, web_port: int, datadir: str,
              fetch_max_wait_ms: int = FETCH_MAX_WAIT_MS) -> faust.App:
    """A Faust app configured as every crisiswatch Faust process runs (the worker, the accountability
    process): raw keys and values, in-memory table stores (their changelogs are the durable copy) recovered
    up to their exact ends (:func:`pipeline.end_offsets.exact_faust_highwaters`), the broker's
    acknowledgement from every replica, short rebalances for the embedded broker, and the web port
    (``/metrics``, ``/health``) bound to the configured host only.

    The producer batches as aiokafka does by default: no linger (a batch goes out as soon as the
    connection is free, and whatever was sent meanwhile waits for the next request), batches of up to
    ``CRISISWATCH_PRODUCER_MAX_BATCH_BYTES`` (16 KiB unless set)."""
    _bound_fetch_wait(fetch_max_wait_ms)
    _rewind_uncommitted()
    _no_table_registration_wait()
    exact_faust_highwaters()
    timeout = settings.rebalance_timeout_s
    producer_options: dict[str, Any] = {}
    if settings.producer_max_batch_bytes:
        producer_options["producer_max_batch_size"] = settings.producer_max_batch_bytes
    return faust.App(
        app_id,
        broker=[f"kafka://{h.strip()}" for h in settings.kafka_bootstrap.split(",") if h.strip()],
        broker_credentials=broker_credentials(settings),
        store="memory://",
        key_serializer="raw",
        value_serializer="raw",
        topic_partitions=settings.partitions,
        topic_replication_factor=1,
        topic_disable_leader=True,
        table_standby_replicas=0,
        broker_rebalance_timeout=timeout,
        broker_session_timeout=max(timeout, settings.session_timeout_s),
        broker_heartbeat_interval=min(1.0, max(timeout, settings.session_timeout_s) / 3),
        broker_commit_interval=1.0,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        producer_linger=0.0,  # Faust's default, said here: see the docstring
        web_host=settings.api_host,
        web_bind=settings.api_host,  # Faust listens on web_bind (0.0.0.0 unless told); web_host only names it
        web_port=web_port,
        web_in_thread=False,
        datadir=str(settings.data_dir / datadir),
        **producer_options,
    )


def create_app(settings: Settings, *, registry: CollectorRegistry | None = None,
               clock: Callable[[], datetime] = utc_now, app_id: str = APP_ID,
               health: HealthProbe | None = None) -> tuple[faust.App, GeofenceRuntime]:
    registry = registry or CollectorRegistry()
    metrics = WorkerMetrics(registry)
    app = faust_app(settings, app_id, settings.worker_web_port, f"worker-{settings.worker_web_port}")
    checkins_topic = app.topic(topics.CHECKINS, key_serializer="raw", value_serializer="raw")
    crisis_topic = app.topic(topics.CRISIS_EVENTS, key_serializer="raw", value_serializer="raw")
    # key_type=bytes makes Faust write and read the changelog keys raw (the citizen id, hashed like the
    # check-ins' keys); values are raw too: pipeline.citizens's compact states, kept in columns by its
    # store (``citizens://memory``), which reads the JSON states of earlier versions as well.
    table = app.Table(STATE_TABLE, default=None, partitions=settings.partitions, use_partitioner=True,
                      key_type=bytes, value_type=bytes, store="citizens://memory")

    def owned_partitions() -> set[int]:
        return {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == topics.CHECKINS}

    def owns(citizen_id: str) -> bool:
        return partition_of(citizen_id.encode("utf-8"), settings.partitions) in owned_partitions()

    from faust.exceptions import ProducerSendError

    runtime = GeofenceRuntime(
        GeofenceConfig(settings.hysteresis_m, settings.dwell_seconds, settings.exercise_mode),
        _TableView(app, table, owned_partitions), KafkaEmitter(app, settings.dlq_max_payload_bytes), metrics, clock, owns,
        outages=(ProducerSendError,), rules=settings.event_rules())
    crises_loaded, table_recovered = runtime.crises_loaded, runtime.table_recovered
    consent = consent_gate(app, settings, runtime, metrics, clock)

    async def locate_batch(events: Sequence[Any]) -> None:
        """A batch of records: its check-ins (a ``checkin-batch/1`` split, :func:`checkin_messages`), those
        of citizens without location consent left out and erasures applied (:mod:`pipeline.consent`),
        geofenced in chunks of at most ``CRISISWATCH_BATCH_SIZE``."""
        messages, letters = checkin_messages(events, settings.partitions)
        if letters:
            await runtime.dead_letter(letters)
        admitted = await consent.admit(messages)
        for start in range(0, len(admitted), settings.batch_size):  # a record may hold many check-ins
            await runtime.process_checkins(admitted[start:start + settings.batch_size], settle=False)
        await runtime.settle()  # every state durable before Faust may commit these records' offsets

    @app.agent(checkins_topic, name="locate")
    async def locate(stream: Any) -> None:
        await crises_loaded.wait()
        async for events in stream.take_events(settings.batch_size, within=settings.batch_wait_s):
            await finish_or_exit(locate_batch(events), "a batch of check-ins")

    @app.agent(crisis_topic, name="crisis")
    async def crisis_agent(stream: Any) -> None:
        async for event in stream.events():
            admitted = runtime.admit_crisis(raw_message(event))
            if isinstance(admitted, DeadLetter):
                await finish_or_exit(runtime.dead_letter([admitted]), "a dead letter")

    async def follow_crises() -> None:
        follow = asyncio.Event()
        backlog: list[Crisis] = []
        async for batch in read_crisis_log(settings, follow):
            admitted: list[Crisis] = []
            for message in batch:
                await asyncio.sleep(0)  # a thousand admissions at start: let the web page and Faust's start go on between them
                verdict = runtime.admit_crisis(message, READER)
                if isinstance(verdict, Crisis):
                    admitted.append(verdict)
                    if follow.is_set() and crises_loaded.is_set():  # live, not the backlog: time its first warning
                        metrics.first_warning.seen(verdict.crisis_id, verdict.op, message.timestamp)
                else:  # the crisis agent dead-letters it: same verdict, one member of the group
                    runtime.skip(verdict)
            if not follow.is_set() or not crises_loaded.is_set():
                backlog += admitted
                if follow.is_set():
                    runtime.remember(backlog)
                    backlog.clear()
                    with contextlib.suppress(Exception):  # the first check-ins need every crisis indexed: index them
                        _ = runtime.tracker.index  # now, while the group join waits (one that cannot be raises again there)
                    crises_loaded.set()
                    log.info("crisis table loaded: %d active crises", len(runtime.tracker.crises))
                    if table_recovered.is_set():
                        await runtime.reconcile()
                continue
            for crisis in admitted:
                await runtime.apply_crisis(crisis)
                metrics.first_warning.settled(crisis.crisis_id)

    async def crisis_reader() -> None:
        await finish_or_exit(follow_crises(), "following crisis-events")

    app.add_dependency(StartsWithTheApp(crisis_reader))

    @table.on_recover
    async def on_recovered() -> None:
        table_recovered.set()
        if crises_loaded.is_set():
            await finish_or_exit(runtime.reconcile(), "the reconcile after a recovery")

    async def expire_crises() -> None:
        if crises_loaded.is_set():
            await finish_or_exit(runtime.expire(), "ending expired crises")

    app.timer(interval=5.0)(expire_crises)

    @app.page("/metrics")
    async def metrics_page(self: View, request: Request) -> Response:
        # aiohttp refuses a charset inside content_type; the exposition format is UTF-8 by definition
        return self.bytes(generate_latest(registry), content_type=CONTENT_TYPE_LATEST.split("; charset")[0])

    @app.page("/health")
    async def health_page(self: View, request: Request) -> Response:
        ready = crises_loaded.is_set() and table_recovered.is_set()
        details = {"crises_loaded": crises_loaded.is_set(), "table_recovered": table_recovered.is_set(),
                   "active_crises": len(runtime.tracker.crises), "checkin_partitions": sorted(owned_partitions())}
        if health is None:
            return self.json({"status": "ok" if ready else "starting", **details}, status=200 if ready else 503)
        status, body = health.report(ready, **details)
        if not ready and body["status"] == "unhealthy":
            body["status"] = "starting"
        return self.json(body, status=status)

    return app, runtime


def consent_gate(app: faust.App, settings: Settings, runtime: GeofenceRuntime, metrics: WorkerMetrics,
                 clock: Callable[[], datetime]) -> ConsentGate:
    """Consent and erasure (:mod:`pipeline.consent`): the ``untracked-citizens`` table (co-partitioned with
    ``checkins``, like the citizens topic it is built from) and the agent reading ``citizens``. The locate
    agent hands each batch to :meth:`ConsentGate.admit` before geofencing it."""
    table = app.Table(UNTRACKED_TABLE, default=None, partitions=settings.partitions, use_partitioner=True,
                      key_type=bytes)

    async def forget(citizen_ids: Sequence[str]) -> int:
        async with runtime.lock:
            return await forget_states(runtime.states, citizen_ids)

    gate = ConsentGate(_DurableTableView(app, table), forget, metrics, clock, settings.event_rules())
    citizens_topic = app.topic(topics.CITIZENS, key_serializer="raw", value_serializer="raw")

    @app.agent(citizens_topic, name="consent")
    async def consent(stream: Any) -> None:
        async for event in stream.events():
            await finish_or_exit(gate.on_citizen(raw_message(event)), "a citizen's consent")

    return gate


class _DurableTableView(DurableStates):
    """A Faust table seen as a mapping of citizen id to value; the table's keys are raw bytes.

    Writes go to the table's store at once and to its changelog in :meth:`persisted`, which returns
    once Kafka acknowledged them. ``table[key] = value`` would hand the changelog record to Faust's
    buffer, and the flush Faust runs before committing offsets gives up after 0.1 s without a send:
    offsets of check-ins whose new state never reached the changelog were committed, and a worker
    killed then forgot those citizens' states for good. Records are what the table's store reads
    back on recovery: the raw key, the value as :meth:`record` encodes it (JSON here), placed by the
    key's hash (like the citizen's check-ins); a deletion is a null value."""

    def __init__(self, app: faust.App, table: Any) -> None:
        self.app = app
        self.table = table
        self.topic: str = table.changelog_topic.get_topic_name()
        self.unsent: list[Record] = []

    def record(self, value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":")).encode("utf-8")

    def __getitem__(self, key: str) -> Any:
        return self.table[key.encode("utf-8")]

    def __setitem__(self, key: str, value: Any) -> None:
        raw = key.encode("utf-8")
        self.table.data[raw] = value
        self.unsent.append((raw, self.record(value), None))

    def __delitem__(self, key: str) -> None:
        raw = key.encode("utf-8")
        del self.table.data[raw]
        self.unsent.append((raw, None, None))

    async def persisted(self) -> None:
        await asyncio.gather(*await self.handed())

    async def handed(self) -> list[Awaitable[Any]]:
        """Hand every write made so far to the producer; the futures of their acknowledgements."""
        unsent, self.unsent = self.unsent, []
        return await hand_all(self.app, self.topic, unsent)

    def __iter__(self) -> Iterator[str]:
        return iter([k.decode("utf-8") if isinstance(k, bytes) else str(k) for k in list(self.table.keys())])

    def __len__(self) -> int:
        return len(self.table)


class _TableView(_DurableTableView, ColumnarStates):
    """The citizen-state table: values are :func:`pipeline.citizens.encode_state`'s bytes, stored as
    they are and kept in columns (:class:`pipeline.citizens.CitizenStore`) that know this worker's
    partitions. Reads and writes go to the columns directly (Faust's table and store add a lookup and
    two calls to each, for sensors this worker has none of), and each changelog record goes to the
    partition its row says (the key's, as the check-ins'), so no key is hashed again to send it."""

    def __init__(self, app: faust.App, table: Any, owned: Callable[[], Collection[int]]) -> None:
        super().__init__(app, table)
        self.owned = owned
        self.unsent_partitions: list[int] = []

    def record(self, value: Any) -> bytes:
        encoded: bytes = value
        return encoded

    def __getitem__(self, key: str) -> Any:
        return self.columns[key.encode("utf-8")]

    def __setitem__(self, key: str, value: Any) -> None:
        raw = key.encode("utf-8")
        columns = self.columns
        row = columns.put(raw, value)
        self.unsent.append((raw, value, None))
        self.unsent_partitions.append(int(columns.part[row]))

    def __delitem__(self, key: str) -> None:
        raw = key.encode("utf-8")
        columns = self.columns
        row = columns.row_of(raw)
        if row is None:
            raise KeyError(key)
        partition = int(columns.part[row])
        del columns[raw]
        self.unsent.append((raw, None, None))
        self.unsent_partitions.append(partition)

    async def handed(self) -> list[Awaitable[Any]]:
        unsent, self.unsent = self.unsent, []
        partitions, self.unsent_partitions = self.unsent_partitions, []
        known = len(partitions) == len(unsent) and all(p >= 0 for p in partitions)
        return await hand_all(self.app, self.topic, unsent, partitions if known else None)

    @property
    def columns(self) -> CitizenColumns:
        columns: CitizenColumns = self.table.data.data
        return columns

    def owned_partitions(self) -> Collection[int]:
        return self.owned()
