"""The dispatcher: consumer group ``crisiswatch-dispatch`` on ``warnings``, delivering each warning to
its citizen through the citizen's channels, in the citizen's order, once per channel in effect.

**Delivered once, in effect.** Before an attempt the ``deliveries`` row of (warning, channel,
address) is claimed — status ``sending``, ``attempts + 1`` — and after it the outcome is written
(``delivered`` with the receipt, ``failed`` with the error and the time of the next attempt, or
``gave_up``). The decision what to send is :func:`pipeline.domain.delivery.plan` over those rows: a
warning with a ``delivered`` row, or whose every channel gave up, is skipped; a row left ``sending``
by a process that died is sent again with the same idempotency key (the ``warning_id``), which the
webhook receiver gets as ``Idempotency-Key`` and the mail server as a ``Message-ID`` derived from it.
Several dispatchers may run: while one works on a warning it holds a PostgreSQL advisory lock on
it (released with its session when it dies), so two never send one warning at the same time, even
when a rebalance hands a partition over mid-batch. (Apprise carries no idempotency key: a re-send
after a crash through SMS or push may reach the person twice; see :mod:`consumers.channels`.)

**Order.** A citizen's warnings are on one partition, in order, and are handled one after the other,
so an all-clear comes after the warnings it clears. Within a polled batch, different citizens are
served at once by a bounded pool (``CRISISWATCH_DISPATCH_CONCURRENCY`` threads, each with its own
PostgreSQL session): most of a delivery is waiting for PostgreSQL and the receiver, and one citizen's
warnings still go one after the other on one thread. The batch is committed when all are settled.
As a second guard an all-clear waits while the table shows another warning of the same citizen and
crisis neither delivered nor given up.

**Retries and fallback.** A transient failure is retried with exponential backoff and jitter, up to
``CRISISWATCH_DISPATCH_MAX_ATTEMPTS`` per channel; then (or at once on a permanent failure) the next
channel of the citizen is tried; when the last one gives up, the warning is ``gave_up`` — the
citizen counts as unreached. Each channel type has a token bucket; an empty bucket makes the
dispatcher wait (backpressure), it never drops a message.

**Failure policy** (:mod:`pipeline.stage`, DESIGN.md §6). An outage — Kafka, PostgreSQL, or the
deployment's own mail relay (:class:`consumers.channels.ChannelUnavailable`) — is waited out with
backoff, the process reports unhealthy, and no offset is committed past the warning in hand: nothing
is lost, and the warning's rows tell the next attempt where it was. A warning the dispatcher cannot
handle for any other reason (rendering it raises, say) is dead-lettered with its reason and the
dispatcher goes on. A message that is not a valid warning is only counted and logged: the router,
which reads the same topic, dead-letters it, so one bad message is one dead letter. A warning for a
citizen missing from the registry is counted and logged, not an error.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Final, Literal

from consumers.channels import (
    AppriseChannel,
    Channel,
    ChannelUnavailable,
    EmailChannel,
    Outbound,
    PermanentError,
    Receipt,
    SmtpConfig,
    TransientError,
    WebhookChannel,
)
from consumers.kafka_io import (
    DEFAULT_BACKOFF,
    DEFAULT_TIMEOUTS,
    Backoff,
    GroupTimeouts,
    Message,
    Stopped,
    commit,
    group_consumer,
    poll_messages,
    retry,
)
from pipeline import topics
from pipeline.domain.delivery import (
    DeliveryRow,
    RetryPolicy,
    Step,
    TokenBucket,
    final_outcome,
    plan,
    plan_resend,
    unsettled_earlier,
)
from pipeline.messages import EmbassyDirectory, Recipient, RenderedMessage, render
from pipeline.metrics import DispatchMetrics
from pipeline.reply_links import make_reply_url
from pipeline.settings import Settings
from pipeline.stage import BrokerUnavailable, Failure, describe, map_isolated
from producers.publisher import Outgoing, Publisher, dead_letter, outgoing
from schemas import InvalidEvent, Warning, decode

log = logging.getLogger(__name__)

GROUP_ID: Final = "crisiswatch-dispatch"
STAGE: Final = "dispatch"
MAX_ERROR_CHARS: Final = 500

Outcome = Literal["delivered", "gave_up", "skipped", "no_citizen", "no_channel"]


def utc_now() -> datetime:
    return datetime.now(UTC)


def _db_outages() -> tuple[type[BaseException], ...]:
    """PostgreSQL not usable now (unreachable, or the table missing until migrations run): waited out."""
    import psycopg

    return (psycopg.OperationalError, psycopg.InterfaceError, psycopg.ProgrammingError, psycopg.InternalError)


# --- the registry and the deliveries table ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CitizenContact:
    citizen_id: str
    name: str
    language: str
    channels: tuple[tuple[str, str], ...]  # (type, address), in the citizen's order


def contact_from_row(citizen_id: str, name: str, language: str, channels: Any) -> CitizenContact:
    pairs = tuple((str(c["type"]), str(c["address"])) for c in (channels or ())
                  if isinstance(c, Mapping) and c.get("type") and c.get("address"))
    return CitizenContact(citizen_id, name, language, pairs)


class DeliveryStore:
    """The registry lookups and the ``deliveries`` rows, on one autocommit connection (the advisory
    locks are this session's)."""

    def __init__(self, database_url: str, connect_timeout_s: int = 5) -> None:
        self._url = database_url
        self._connect_timeout_s = connect_timeout_s
        self._conn: Any = None

    def _connection(self) -> Any:
        import psycopg

        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self._url, autocommit=True, connect_timeout=self._connect_timeout_s,
                                         application_name="crisiswatch-dispatch")
        return self._conn

    def _execute(self, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            with self._connection().cursor() as cur:
                cur.execute(query, params)
                return list(cur.fetchall()) if cur.description else []
        except _db_outages():
            self.close()
            raise

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def citizen(self, citizen_id: str) -> CitizenContact | None:
        rows = self._execute("SELECT citizen_id, name, language, channels FROM citizens WHERE citizen_id = %s", (citizen_id,))
        return contact_from_row(*rows[0]) if rows else None

    def rows(self, warning_id: str) -> list[DeliveryRow]:
        found = self._execute("SELECT channel, address, status, attempts FROM deliveries WHERE warning_id = %s", (warning_id,))
        return [DeliveryRow(*r) for r in found]

    def rows_of(self, citizen_id: str, crisis_id: str) -> dict[str, list[DeliveryRow]]:
        """Every warning's rows for one citizen and crisis, by warning_id."""
        out: dict[str, list[DeliveryRow]] = {}
        for warning_id, *row in self._execute(
                "SELECT warning_id, channel, address, status, attempts FROM deliveries "
                "WHERE citizen_id = %s AND crisis_id = %s", (citizen_id, crisis_id)):
            out.setdefault(warning_id, []).append(DeliveryRow(*row))
        return out

    def try_lock(self, warning_id: str) -> bool:
        rows = self._execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 7))", (warning_id,))
        return bool(rows[0][0])

    def unlock(self, warning_id: str) -> None:
        self._execute("SELECT pg_advisory_unlock(hashtextextended(%s, 7))", (warning_id,))

    def begin(self, warning: Warning, channel: str, address: str, now: datetime) -> int | None:
        """Claim an attempt before it is made: status ``sending``, attempts + 1. Returns the attempt's
        number, or None when the row is settled already (delivered or given up)."""
        found = self._execute(
            "INSERT INTO deliveries (warning_id, channel, address, citizen_id, crisis_id, status, attempts, last_attempt_at) "
            "VALUES (%s, %s, %s, %s, %s, 'sending', 1, %s) "
            "ON CONFLICT (warning_id, channel, address) DO UPDATE SET status = 'sending', "
            "attempts = deliveries.attempts + 1, last_attempt_at = EXCLUDED.last_attempt_at, next_attempt_at = NULL "
            "WHERE deliveries.status NOT IN ('delivered', 'gave_up') RETURNING attempts",
            (warning.warning_id, channel, address, warning.citizen_id, warning.crisis_id, now))
        return int(found[0][0]) if found else None

    def finish(self, warning_id: str, channel: str, address: str, status: str, now: datetime, *,
               error: str | None = None, receipt: Receipt | None = None, next_attempt_at: datetime | None = None,
               uncount: bool = False) -> None:
        """The outcome of an attempt. ``uncount``: it never reached the provider (the relay was down),
        so it does not count against the recipient's attempts."""
        from psycopg.types.json import Jsonb

        self._execute(
            "UPDATE deliveries SET status = %s, last_error = COALESCE(%s, last_error), receipt = COALESCE(%s, receipt), "
            "next_attempt_at = %s, delivered_at = CASE WHEN %s = 'delivered' THEN %s ELSE delivered_at END, "
            "attempts = GREATEST(0, attempts - %s) "
            "WHERE warning_id = %s AND channel = %s AND address = %s",
            (status, None if error is None else error[:MAX_ERROR_CHARS],
             None if receipt is None else Jsonb(receipt.to_json()), next_attempt_at, status, now, 1 if uncount else 0,
             warning_id, channel, address))

    def abandon(self, warning_id: str, reason: str) -> None:
        """A warning that was dead-lettered: its unsettled rows are given up, so that nothing (an
        all-clear) waits for it."""
        self._execute("UPDATE deliveries SET status = 'gave_up', last_error = %s "
                      "WHERE warning_id = %s AND status NOT IN ('delivered', 'gave_up')", (reason[:MAX_ERROR_CHARS], warning_id))

    def give_up(self, warning: Warning, channel: str, address: str, error: str) -> None:
        """Record a channel given up on without an attempt (not configured in this deployment)."""
        self._execute(
            "INSERT INTO deliveries (warning_id, channel, address, citizen_id, crisis_id, status, last_error) "
            "VALUES (%s, %s, %s, %s, %s, 'gave_up', %s) ON CONFLICT (warning_id, channel, address) DO UPDATE "
            "SET status = 'gave_up', last_error = EXCLUDED.last_error WHERE deliveries.status NOT IN ('delivered', 'gave_up')",
            (warning.warning_id, channel, address, warning.citizen_id, warning.crisis_id, error[:MAX_ERROR_CHARS]))


# --- channels and messages ------------------------------------------------------------------------------


def build_channels(settings: Settings) -> dict[str, Channel]:
    """The channels this deployment has: webhook always; email with an SMTP URL; sms and push with an
    Apprise URL each. A citizen's channel of a type not configured here is given up on (next channel)."""
    channels: dict[str, Channel] = {"webhook": WebhookChannel(settings.webhook_secret.get(), settings.webhook_timeout_s)}
    if settings.smtp_url:
        channels["email"] = EmailChannel(SmtpConfig.from_url(settings.smtp_url.get()), settings.mail_from)
    for name, url in (("sms", settings.apprise_sms_url), ("push", settings.apprise_push_url)):
        if url:
            channels[name] = AppriseChannel(name, url.get())
    return channels


def compose(warning: Warning, citizen: CitizenContact, embassies: EmbassyDirectory,
            reply_url: Callable[[str, str], str] | None = None) -> RenderedMessage:
    """The one place the dispatcher renders a message: the citizen's language, the embassy responsible
    for the first of the warning's countries that has one, and the citizen's own reply link for the
    crisis (``reply_url(citizen_id, crisis_id)``; none where reply links are not configured)."""
    embassy = next((e for cc in warning.country_codes if (e := embassies.for_country(cc)) is not None), None)
    link = None if reply_url is None else reply_url(warning.citizen_id, warning.crisis_id)
    return render(warning, Recipient(citizen.citizen_id, citizen.name, citizen.language), embassy=embassy, reply_url=link)


def decode_warning(message: Message) -> Warning:
    if not message.value:
        raise InvalidEvent("empty message")
    return decode(message.value, Warning)


# --- the dispatcher --------------------------------------------------------------------------------------


class Dispatcher:
    """Consumer group ``crisiswatch-dispatch`` on the warnings topic."""

    def __init__(self, settings: Settings, metrics: DispatchMetrics, *, bootstrap: str | None = None,
                 database_url: str | None = None, source_topic: str = topics.WARNINGS, group_id: str = GROUP_ID,
                 deliveries_topic: str = topics.DELIVERIES,
                 channels: Mapping[str, Channel] | None = None, embassies: EmbassyDirectory | None = None,
                 publisher: Publisher | None = None, clock: Callable[[], datetime] = utc_now,
                 monotonic: Callable[[], float] = time.monotonic, unit_random: Callable[[], float] = random.random,
                 timeouts: GroupTimeouts = DEFAULT_TIMEOUTS, backoff: Backoff = DEFAULT_BACKOFF,
                 poll_timeout_s: float = 0.5, batch_size: int = 100) -> None:
        self.settings = settings
        self.metrics = metrics
        self.bootstrap = bootstrap or settings.kafka_bootstrap
        self.database_url = database_url or settings.database_url.get()
        self._local = threading.local()  # each thread's DeliveryStore: its own session and advisory locks
        self._stores: list[DeliveryStore] = []
        self._lock = threading.Lock()
        self.concurrency = settings.dispatch_concurrency
        self.source_topic = source_topic
        self.deliveries_topic = deliveries_topic
        self.group_id = group_id
        self._own_channels = channels is None
        self.channels: Mapping[str, Channel] = build_channels(settings) if channels is None else channels
        self.embassies = embassies if embassies is not None else EmbassyDirectory.load(settings.embassy_directory)
        self.reply_url = partial(make_reply_url, settings, clock=clock) if settings.reply_secret else None
        self._own_publisher = publisher is None
        self._publisher = publisher
        self.clock = clock
        self.unit_random = unit_random
        self.policy = RetryPolicy(settings.dispatch_max_attempts, settings.dispatch_retry_initial_s,
                                  settings.dispatch_retry_max_s)
        self.buckets = {name: TokenBucket(settings.rate_limit_per_s(name), clock=monotonic)
                        for name in ("webhook", "email", "sms", "push")}
        self.timeouts = timeouts
        self.backoff = backoff
        self.poll_timeout_s = poll_timeout_s
        self.batch_size = batch_size
        self.outages: tuple[type[BaseException], ...] = (*_db_outages(), BrokerUnavailable)
        self.healthy = True

    @property
    def store(self) -> DeliveryStore:
        """This thread's store (a connection per thread: advisory locks belong to a session)."""
        store: DeliveryStore | None = getattr(self._local, "store", None)
        if store is None:
            store = self._local.store = DeliveryStore(self.database_url)
            with self._lock:
                self._stores.append(store)
        return store

    @property
    def publisher(self) -> Publisher:
        with self._lock:
            if self._publisher is None:  # made on first use: delivery outcomes and dead letters
                self._publisher = Publisher(self.settings, bootstrap=self.bootstrap, client_id="crisiswatch-dispatch-dlq")
            return self._publisher

    def _outage(self, exc: BaseException, dependency: str = "postgresql") -> None:
        self.healthy = False
        self.metrics.outages.labels(dependency=dependency).inc()

    def _wait(self, seconds: float, stop: threading.Event, what: str) -> None:
        if seconds > 0 and stop.wait(seconds):
            raise Stopped(what)

    # one warning ----------------------------------------------------------------------------------

    def dispatch(self, warning: Warning, stop: threading.Event, resend: bool = False) -> Outcome:
        """Deliver one warning as far as its rows allow; returns what became of it. Raises an outage
        error (the caller retries it: the rows say where it was) or :class:`Stopped`. ``resend``: the
        warning came back from escalation; it goes through the channels after the one that delivered it
        (:func:`pipeline.domain.delivery.plan_resend`).

        A final outcome (delivered, or given up on every channel) is published as ``delivery/1`` on
        ``deliveries`` — also when the rows show it was reached before (a replay, or a process that died
        between the row and the event), so the event is out at least once."""
        citizen = self.store.citizen(warning.citizen_id)
        if citizen is None:
            log.warning("warning for a citizen not in the registry; not delivered",
                        extra={"warning_id": warning.warning_id, "citizen_id": warning.citizen_id})
            return "no_citizen"
        if warning.kind == "all_clear":
            self._await_earlier(warning, stop)
        with self._locked(warning.warning_id, stop):
            rows = self.store.rows(warning.warning_id)
            steps = (plan_resend if resend else plan)(citizen.channels, rows, self.policy.max_attempts)
            if steps.done is not None:
                if steps.done in ("delivered", "gave_up"):
                    self._announce(warning)
                    return "skipped"
                return "skipped" if steps.done == "no_next_channel" else "no_channel"
            outbound = Outbound(warning, compose(warning, citizen, self.embassies, self.reply_url))
            for step in steps.steps:
                if self._deliver(outbound, step, stop):
                    self._announce(warning)
                    return "delivered"
            log.warning("every channel gave up; the citizen is unreached",
                        extra={"warning_id": warning.warning_id, "citizen_id": warning.citizen_id})
            self._announce(warning)
            return "gave_up"

    def _announce(self, warning: Warning) -> None:
        """Publish the warning's final outcome, as its rows tell it (raises BrokerUnavailable: retried)."""
        event = final_outcome(warning, self.store.rows(warning.warning_id), self.clock())
        if event is not None:
            self.publisher.publish([outgoing(event, self.deliveries_topic)])

    def _await_earlier(self, warning: Warning, stop: threading.Event) -> None:
        """An all-clear waits until the citizen's other warnings of the crisis are delivered or given up."""
        for delay in self.backoff.delays():
            waiting = unsettled_earlier(self.store.rows_of(warning.citizen_id, warning.crisis_id), warning.warning_id)
            if not waiting:
                return
            log.info("all-clear waits for earlier warnings", extra={"warning_id": warning.warning_id, "waiting": waiting})
            self._wait(delay, stop, "all-clear waiting for earlier warnings")

    @contextmanager
    def _locked(self, warning_id: str, stop: threading.Event) -> Iterator[None]:
        while not self.store.try_lock(warning_id):  # another dispatcher is on it (a rebalance overlap)
            self._wait(0.2, stop, "waiting for another dispatcher's attempt")
        try:
            yield
        finally:
            try:
                self.store.unlock(warning_id)
            except _db_outages():
                pass  # the session is gone, and its lock with it

    def _deliver(self, outbound: Outbound, step: Step, stop: threading.Event) -> bool:
        """Try one channel until it delivers (True) or gives up (False)."""
        warning = outbound.warning
        key = (warning.warning_id, step.channel, step.address)
        channel = self.channels.get(step.channel)
        if channel is None:
            self.store.give_up(warning, step.channel, step.address, f"no {step.channel} channel configured")
            self.metrics.attempts.labels(channel=step.channel, outcome="not_configured").inc()
            return False
        attempts, resend = step.attempts_done, step.resend
        while resend or attempts < self.policy.max_attempts:
            resend = False
            bucket = self.buckets.get(step.channel)
            with self._lock:
                wait = bucket.reserve() if bucket is not None else 0.0
            if wait > 0:
                self.metrics.rate_limited.labels(channel=step.channel).inc(wait)
                self._wait(wait, stop, f"{step.channel} rate limit")
            claimed = self.store.begin(warning, step.channel, step.address, self.clock())
            if claimed is None:  # settled meanwhile
                return any(r.status == "delivered" for r in self.store.rows(warning.warning_id))
            attempts = claimed
            started = time.perf_counter()
            try:
                receipt = channel.send(outbound, step.address, warning.warning_id)
            except ChannelUnavailable as exc:
                self._observe(step.channel, "unavailable", started)
                self.store.finish(*key, "failed", self.clock(), error=str(exc), uncount=True)
                attempts -= 1
                self._outage(exc, step.channel)
                log.warning("channel unavailable; waiting", extra={"channel": step.channel, "error": str(exc)})
                self._wait(self.policy.delay(1, self.unit_random()) + self.backoff.initial_s, stop, f"{step.channel} relay")
                continue
            except TransientError as exc:
                self._observe(step.channel, "transient", started)
                if attempts >= self.policy.max_attempts:
                    self.store.finish(*key, "gave_up", self.clock(), error=str(exc))
                    return False
                delay = self.policy.delay(attempts, self.unit_random(), exc.retry_after_s)
                self.store.finish(*key, "failed", self.clock(), error=str(exc),
                                  next_attempt_at=self.clock() + timedelta(seconds=delay))
                self._wait(delay, stop, f"{step.channel} retry")
                continue
            except PermanentError as exc:
                self._observe(step.channel, "permanent", started)
                self.store.finish(*key, "gave_up", self.clock(), error=str(exc))
                return False
            except Exception as exc:
                if isinstance(exc, self.outages):
                    raise
                # A channel that fails in a way nobody foresaw must not keep the citizen from the next one.
                self._observe(step.channel, "error", started)
                log.exception("channel raised unexpectedly; giving it up for this warning", extra={"channel": step.channel})
                self.store.finish(*key, "gave_up", self.clock(), error=describe(exc))
                return False
            self._observe(step.channel, "delivered", started)
            self.healthy = True
            self.store.finish(*key, "delivered", self.clock(), receipt=receipt)
            return True
        self.store.give_up(warning, step.channel, step.address, "attempts used up")
        return False

    def _observe(self, channel: str, outcome: str, started: float) -> None:
        self.metrics.attempts.labels(channel=channel, outcome=outcome).inc()
        self.metrics.seconds.labels(channel=channel).observe(time.perf_counter() - started)

    # a batch --------------------------------------------------------------------------------------

    def handle(self, messages: Sequence[Message], stop: threading.Event, pool: ThreadPoolExecutor | None = None) -> None:
        """Dispatch a polled batch: each citizen's warnings in order, different citizens at once on
        ``pool`` (one by one without it); returns when every warning in it is settled (delivered,
        given up, skipped or dead-lettered). Raises :class:`Stopped` if asked to stop first."""
        decoded = map_isolated(messages, lambda m: (m, decode_warning(m)))
        for failure in decoded.failures:
            self.metrics.stage_skipped.labels(stage=STAGE, reason=failure.label).inc()
            log.warning("not a valid warning; skipped (the router dead-letters it)",
                        extra={"where": failure.item.where(), "reason": failure.reason})
        by_citizen: dict[str, list[tuple[Message, Warning]]] = {}
        for message, warning in decoded.results:
            by_citizen.setdefault(warning.citizen_id, []).append((message, warning))
        if pool is None or len(by_citizen) < 2:
            for items in by_citizen.values():
                self._handle_citizen(items, stop)
            return
        futures = [pool.submit(self._handle_citizen, items, stop) for items in by_citizen.values()]
        errors: list[BaseException] = []
        for future in futures:  # every citizen settles (or stops) before the batch is committed
            if (exc := future.exception()) is not None:
                errors.append(exc)
        if errors:
            raise next((e for e in errors if not isinstance(e, Stopped)), errors[0])

    def _handle_citizen(self, items: Sequence[tuple[Message, Warning]], stop: threading.Event) -> None:
        """One citizen's warnings of a batch, one after the other."""
        outages = (*self.outages, Stopped)
        for message, warning in items:
            resend = (topics.RESEND_HEADER, topics.RESEND_NEXT_CHANNEL) in message.headers
            run = retry(lambda w=warning, r=resend: map_isolated([w], lambda x: self.dispatch(x, stop, r),  # type: ignore[misc]
                                                                  outages=outages),
                        outage=self.outages, stop=stop, what=f"dispatch {warning.warning_id}", backoff=self.backoff,
                        on_outage=self._outage)
            self.healthy = True
            for outcome in run.results:
                self.metrics.warnings.labels(outcome=outcome).inc()
                self.metrics.handled(outcome, warning.emitted_at, self.clock())
            if run.failures:
                self._dead_letter(message, run.failures[0], stop)

    def _dead_letter(self, message: Message, failure: Failure[Warning], stop: threading.Event) -> None:
        letter: Outgoing = dead_letter(message.value, failure.reason, message.topic, STAGE, message.key,
                                       error_type=failure.error_type, partition=message.partition, offset=message.offset,
                                       max_payload_bytes=self.settings.dlq_max_payload_bytes)
        retry(lambda: self.publisher.publish([letter]), outage=(BrokerUnavailable,), stop=stop, what="publish to dlq",
              backoff=self.backoff, on_outage=lambda exc: self._outage(exc, "kafka"))
        retry(lambda: self.store.abandon(failure.item.warning_id, f"dead-lettered: {failure.reason}"), outage=self.outages,
              stop=stop, what="record a dead-lettered warning", backoff=self.backoff, on_outage=self._outage)
        self.metrics.dlq.labels(stage=STAGE, reason=failure.label).inc()
        self.metrics.warnings.labels(outcome="dead_lettered").inc()
        log.warning("dead-lettered", extra={"where": message.where(), "reason": failure.reason})

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set; the warning in hand is finished (or left uncommitted) first."""
        from kafka.errors import KafkaError

        consumer: Any = None
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="dispatch") if self.concurrency > 1 else None
        try:
            consumer = retry(lambda: group_consumer(self.bootstrap, [self.source_topic], self.group_id,
                                                    self.settings.kafka_client_options(), self.timeouts),
                             outage=(KafkaError,), stop=stop, what="connect to Kafka", backoff=self.backoff,
                             on_outage=lambda exc: self._outage(exc, "kafka"))
            log.info("dispatcher consuming", extra={"topic": self.source_topic, "group": self.group_id,
                                                    "channels": sorted(self.channels)})
            while not stop.is_set():
                try:
                    messages = poll_messages(consumer, self.poll_timeout_s, self.batch_size)
                except KafkaError as exc:
                    self._outage(exc, "kafka")
                    log.warning("poll failed", extra={"error": repr(exc)})
                    stop.wait(self.backoff.initial_s)
                    continue
                if messages:
                    self.handle(messages, stop, pool)
                    commit(consumer, messages)
        except Stopped as exc:
            log.info("dispatcher stopped during a wait; the uncommitted warnings will be redelivered",
                     extra={"during": str(exc)})
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
            if consumer is not None:
                consumer.close(autocommit=False)
            with self._lock:
                stores, self._stores = self._stores, []
            for store in stores:
                store.close()
            if self._own_channels:
                for channel in self.channels.values():
                    channel.close()
            if self._own_publisher and self._publisher is not None:
                self._publisher.close()
