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

**Order and rounds.** A citizen's warnings are on one partition, in order, and are handled one after
the other (a *lane* per citizen), so an all-clear comes after the warnings it clears. The lanes of a
polled batch move together in *rounds* of up to ``CRISISWATCH_DISPATCH_CONCURRENCY`` warnings, and
a round costs the PostgreSQL round trips of one warning: the citizens of the batch are looked up at
once; the round's new warnings are locked and their rows read in one pipelined exchange; every
attempt of the round is claimed in one ``INSERT … SELECT FROM unnest(…) ON CONFLICT … RETURNING``;
the attempts are sent together (:meth:`consumers.channels.Channel.send_many`: one keep-alive
connection pool for webhooks); their outcomes are written in one ``UPDATE … FROM unnest(…)``. The
advisory locks are released, and the final outcomes published, once per batch; then the batch is
committed. A warning waiting (a retry's backoff, a rate limit, another dispatcher's lock) holds up
only its own citizen's lane. As a second guard an all-clear waits while the table shows another
warning of the same citizen and crisis neither delivered nor given up.

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
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Final, Literal

from consumers.channels import (
    AppriseChannel,
    Attempt,
    Channel,
    ChannelUnavailable,
    EmailChannel,
    Outbound,
    PermanentError,
    Receipt,
    Sent,
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
    group_consumer,
    retry,
    run_consumer,
)
from pipeline import topics
from pipeline.domain.delivery import (
    DeliveryRow,
    DeliveryStatus,
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
from pipeline.stage import BrokerUnavailable, Failure, describe, isolate, map_isolated
from producers.publisher import Outgoing, Publisher, dead_letter, outgoing
from schemas import Delivery, InvalidEvent, Warning, decode

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


RowKey = tuple[str, str, str]  # (warning_id, channel, address)


@dataclass(frozen=True, slots=True)
class RowOutcome:
    """The outcome of one attempt, for :meth:`DeliveryStore.finish`. ``uncount``: it never reached
    the provider (the relay was down), so it does not count against the recipient's attempts."""

    key: RowKey
    status: str
    error: str | None = None
    receipt: Receipt | None = None
    next_attempt_at: datetime | None = None
    uncount: bool = False


class DeliveryStore:
    """The registry lookups and the ``deliveries`` rows, on one autocommit connection (the advisory
    locks are this session's). Every method takes a whole round of warnings: one statement each, the
    rows passed as arrays (``unnest``), so a round of many warnings costs the round trips of one."""

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
        return self._pipeline([(query, params)])[0]

    def _pipeline(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> list[list[tuple[Any, ...]]]:
        """Run statements one after the other (each its own snapshot and commit) in one round trip."""
        try:
            conn = self._connection()
            if len(statements) == 1:
                with conn.cursor() as cur:
                    cur.execute(*statements[0])
                    return [list(cur.fetchall()) if cur.description else []]
            cursors = []
            with conn.pipeline():
                for query, params in statements:
                    cur = conn.cursor()
                    cur.execute(query, params)
                    cursors.append(cur)
            out = [list(cur.fetchall()) if cur.description else [] for cur in cursors]
            for cur in cursors:
                cur.close()
            return out
        except _db_outages():
            self.close()
            raise

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def citizens(self, citizen_ids: Sequence[str]) -> dict[str, CitizenContact]:
        rows = self._execute("SELECT citizen_id, name, language, channels FROM citizens WHERE citizen_id = ANY(%s)",
                             (list(citizen_ids),))
        return {r[0]: contact_from_row(*r) for r in rows}

    def rows(self, warning_ids: Sequence[str]) -> dict[str, list[DeliveryRow]]:
        found = self._execute("SELECT warning_id, channel, address, status, attempts FROM deliveries "
                              "WHERE warning_id = ANY(%s)", (list(warning_ids),))
        return _by_warning(found)

    def lock_and_read(self, warning_ids: Sequence[str]) -> tuple[list[str], dict[str, list[DeliveryRow]]]:
        """Take the advisory lock of each warning that no other session holds, then read the rows of
        those (a statement after the locks, so it sees what their last holder wrote). Returns the
        warnings locked, and their rows."""
        locked, found = self._pipeline([
            ("SELECT w FROM unnest(%s::text[]) WITH ORDINALITY AS t(w, n) "
             "WHERE pg_try_advisory_lock(hashtextextended(w, 7)) ORDER BY n", (list(warning_ids),)),
            ("SELECT warning_id, channel, address, status, attempts FROM deliveries WHERE warning_id = ANY(%s)",
             (list(warning_ids),)),
        ])
        ids = [str(r[0]) for r in locked]
        held = set(ids)
        return ids, {w: rows for w, rows in _by_warning(found).items() if w in held}

    def unlock(self, warning_ids: Sequence[str]) -> None:
        """Release one hold of each lock named (a warning named twice was locked twice)."""
        if warning_ids:
            self._execute("SELECT pg_advisory_unlock(hashtextextended(w, 7)) FROM unnest(%s::text[]) AS w",
                          (list(warning_ids),))

    def rows_of(self, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], dict[str, list[DeliveryRow]]]:
        """Every warning's rows for each (citizen, crisis), by warning_id."""
        out: dict[tuple[str, str], dict[str, list[DeliveryRow]]] = {pair: {} for pair in pairs}
        for citizen_id, crisis_id, warning_id, *row in self._execute(
                "SELECT d.citizen_id, d.crisis_id, d.warning_id, d.channel, d.address, d.status, d.attempts "
                "FROM deliveries d JOIN unnest(%s::text[], %s::text[]) AS p(citizen_id, crisis_id) "
                "ON d.citizen_id = p.citizen_id AND d.crisis_id = p.crisis_id",
                ([c for c, _ in pairs], [k for _, k in pairs])):
            out.setdefault((citizen_id, crisis_id), {}).setdefault(warning_id, []).append(DeliveryRow(*row))
        return out

    def begin(self, claims: Sequence[tuple[Warning, str, str]], now: datetime) -> dict[RowKey, int]:
        """Claim attempts before they are made: status ``sending``, attempts + 1. Returns each claimed
        row's attempt number; a row settled already (delivered or given up) is left out."""
        if not claims:
            return {}
        found = self._execute(
            "INSERT INTO deliveries (warning_id, channel, address, citizen_id, crisis_id, status, attempts, last_attempt_at) "
            "SELECT w, ch, a, c, k, 'sending', 1, %s FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[]) "
            "AS t(w, ch, a, c, k) "
            "ON CONFLICT (warning_id, channel, address) DO UPDATE SET status = 'sending', "
            "attempts = deliveries.attempts + 1, last_attempt_at = EXCLUDED.last_attempt_at, next_attempt_at = NULL "
            "WHERE deliveries.status NOT IN ('delivered', 'gave_up') RETURNING warning_id, channel, address, attempts",
            (now, [w.warning_id for w, _, _ in claims], [ch for _, ch, _ in claims], [a for _, _, a in claims],
             [w.citizen_id for w, _, _ in claims], [w.crisis_id for w, _, _ in claims]))
        return {(r[0], r[1], r[2]): int(r[3]) for r in found}

    def finish(self, outcomes: Sequence[RowOutcome], now: datetime) -> None:
        """The outcomes of attempts, in one statement."""
        from psycopg.types.json import Jsonb

        if not outcomes:
            return
        self._execute(
            "UPDATE deliveries AS d SET status = o.status, last_error = COALESCE(o.error, d.last_error), "
            "receipt = COALESCE(o.receipt, d.receipt), next_attempt_at = o.next_at, "
            "delivered_at = CASE WHEN o.status = 'delivered' THEN %s ELSE d.delivered_at END, "
            "attempts = GREATEST(0, d.attempts - o.uncount) "
            "FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::jsonb[], %s::timestamptz[], "
            "%s::int[]) AS o(warning_id, channel, address, status, error, receipt, next_at, uncount) "
            "WHERE d.warning_id = o.warning_id AND d.channel = o.channel AND d.address = o.address",
            (now, [o.key[0] for o in outcomes], [o.key[1] for o in outcomes], [o.key[2] for o in outcomes],
             [o.status for o in outcomes], [None if o.error is None else o.error[:MAX_ERROR_CHARS] for o in outcomes],
             [None if o.receipt is None else Jsonb(o.receipt.to_json()) for o in outcomes],
             [o.next_attempt_at for o in outcomes], [1 if o.uncount else 0 for o in outcomes]))

    def abandon(self, warning_id: str, reason: str) -> None:
        """A warning that was dead-lettered: its unsettled rows are given up, so that nothing (an
        all-clear) waits for it."""
        self._execute("UPDATE deliveries SET status = 'gave_up', last_error = %s "
                      "WHERE warning_id = %s AND status NOT IN ('delivered', 'gave_up')", (reason[:MAX_ERROR_CHARS], warning_id))

    def give_up(self, items: Sequence[tuple[Warning, str, str, str]]) -> None:
        """Record channels given up on without an attempt: ``(warning, channel, address, why)`` (not
        configured in this deployment, or its attempts used up)."""
        if not items:
            return
        self._execute(
            "INSERT INTO deliveries (warning_id, channel, address, citizen_id, crisis_id, status, last_error) "
            "SELECT w, ch, a, c, k, 'gave_up', e FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], "
            "%s::text[]) AS t(w, ch, a, c, k, e) ON CONFLICT (warning_id, channel, address) DO UPDATE "
            "SET status = 'gave_up', last_error = EXCLUDED.last_error WHERE deliveries.status NOT IN ('delivered', 'gave_up')",
            ([w.warning_id for w, *_ in items], [i[1] for i in items], [i[2] for i in items],
             [w.citizen_id for w, *_ in items], [w.crisis_id for w, *_ in items], [i[3][:MAX_ERROR_CHARS] for i in items]))


def _by_warning(found: Sequence[tuple[Any, ...]]) -> dict[str, list[DeliveryRow]]:
    out: dict[str, list[DeliveryRow]] = {}
    for warning_id, *row in found:
        out.setdefault(warning_id, []).append(DeliveryRow(*row))
    return out


# --- channels and messages ------------------------------------------------------------------------------


def build_channels(settings: Settings) -> dict[str, Channel]:
    """The channels this deployment has: webhook always; email with an SMTP URL; sms and push with an
    Apprise URL each. A citizen's channel of a type not configured here is given up on (next channel)."""
    concurrency = settings.dispatch_concurrency
    channels: dict[str, Channel] = {"webhook": WebhookChannel(settings.webhook_secret.get(), settings.webhook_timeout_s,
                                                              concurrency=concurrency)}
    if settings.smtp_url:
        channels["email"] = EmailChannel(SmtpConfig.from_url(settings.smtp_url.get()), settings.mail_from, concurrency)
    for name, url in (("sms", settings.apprise_sms_url), ("push", settings.apprise_push_url)):
        if url:
            channels[name] = AppriseChannel(name, url.get(), concurrency)
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


# --- the dispatcher ----


@dataclass(slots=True)
class _Job:
    """One warning in hand and where its delivery stands: the dispatcher's working state for it,
    rebuilt from its rows after an outage (:meth:`reset`)."""

    message: Message
    warning: Warning
    resend: bool
    phase: Literal["start", "steps", "done"] = "start"
    ready_at: float = 0.0  # monotonic time before which it waits (a retry, a rate limit, another's lock)
    rows: dict[tuple[str, str], DeliveryRow] = field(default_factory=dict)  # (channel, address) -> row, as written
    steps: deque[Step] = field(default_factory=deque)  # the channels still to try; the first is in hand
    attempts: int = 0  # attempts of the channel in hand
    again: bool = False  # the channel in hand has an attempt left in flight: send it again, same key
    paid: bool = False  # the rate-limit token of the next attempt is taken
    outbound: Outbound | None = None
    earlier: Iterator[float] | None = None  # an all-clear's waits for the warnings it clears
    outcome: Outcome | None = None
    failure: Exception | None = None  # a data error: the warning is dead-lettered
    announce: bool = False  # a final outcome to publish on the deliveries topic

    @property
    def key(self) -> RowKey:
        step = self.steps[0]
        return self.warning.warning_id, step.channel, step.address

    def take(self, steps: Iterable[Step]) -> None:
        self.steps = deque(steps)
        self._head()

    def next_channel(self) -> None:
        self.steps.popleft()
        self._head()

    def _head(self) -> None:
        if self.steps:
            self.attempts, self.again = self.steps[0].attempts_done, self.steps[0].resend
        self.paid = False

    def settle(self, outcome: Outcome, announce: bool = False) -> None:
        self.phase, self.outcome, self.announce = "done", outcome, announce

    def fail(self, exc: Exception) -> None:
        self.phase, self.failure = "done", exc

    def reset(self) -> None:
        """Back to the start after an outage: its lock is gone with the session, and its rows are read
        again — also when it had settled in the round that failed, whose outcomes may not be written."""
        self.phase, self.ready_at, self.steps, self.rows, self.paid = "start", 0.0, deque(), {}, False
        self.outcome, self.failure, self.announce = None, None, False


class Dispatcher:
    """Consumer group ``crisiswatch-dispatch`` on the warnings topic."""

    def __init__(self, settings: Settings, metrics: DispatchMetrics, *, bootstrap: str | None = None,
                 database_url: str | None = None, source_topic: str = topics.WARNINGS, group_id: str = GROUP_ID,
                 deliveries_topic: str = topics.DELIVERIES,
                 channels: Mapping[str, Channel] | None = None, embassies: EmbassyDirectory | None = None,
                 publisher: Publisher | None = None, clock: Callable[[], datetime] = utc_now,
                 monotonic: Callable[[], float] = time.monotonic, unit_random: Callable[[], float] = random.random,
                 timeouts: GroupTimeouts = DEFAULT_TIMEOUTS, backoff: Backoff = DEFAULT_BACKOFF,
                 poll_timeout_s: float = 0.5, batch_size: int = 200) -> None:
        self.settings = settings
        self.metrics = metrics
        self.bootstrap = bootstrap or settings.kafka_bootstrap
        self.database_url = database_url or settings.database_url.get()
        self.store = DeliveryStore(self.database_url)
        self._held: list[str] = []  # advisory locks this session holds, one entry per hold
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
        self.monotonic = monotonic
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
    def publisher(self) -> Publisher:
        with self._lock:
            if self._publisher is None:  # made on first use: delivery outcomes and dead letters
                self._publisher = Publisher(self.settings, bootstrap=self.bootstrap, client_id="crisiswatch-dispatch-dlq")
            return self._publisher

    def _polled(self) -> None:
        """Kafka answered a poll: an outage reported while it was away is over."""
        self.healthy = True

    def _outage(self, exc: BaseException, dependency: str = "postgresql") -> None:
        self.healthy = False
        self.metrics.outages.labels(dependency=dependency).inc()

    # a batch --------------------------------------------------------------------------------------

    def handle(self, messages: Sequence[Message], stop: threading.Event) -> None:
        """Dispatch a polled batch; returns when every warning in it is settled (delivered, given up,
        skipped or dead-lettered) and its final outcomes are published. Raises :class:`Stopped` if
        asked to stop first (nothing is committed then; the rows say where each warning was).

        Each citizen's warnings form a lane, handled one after the other; the lanes move together in
        *rounds* of up to ``concurrency`` warnings: lock and read the rows of those starting, claim
        every attempt of the round in one statement, send them all at once, record every outcome in one
        statement. A round claims no more than ``concurrency`` attempts, so a process killed mid-round
        leaves at most that many attempts that may have reached their receiver unrecorded (re-sent
        with the same key)."""
        decoded = map_isolated(messages, lambda m: (m, decode_warning(m)))
        for failure in decoded.failures:
            self.metrics.stage_skipped.labels(stage=STAGE, reason=failure.label).inc()
            log.warning("not a valid warning; skipped (the router dead-letters it)",
                        extra={"where": failure.item.where(), "reason": failure.reason})
        lanes: dict[str, deque[_Job]] = {}
        for message, warning in decoded.results:
            resend = (topics.RESEND_HEADER, topics.RESEND_NEXT_CHANNEL) in message.headers
            lanes.setdefault(warning.citizen_id, deque()).append(_Job(message, warning, resend))
        if not lanes:
            return
        try:
            citizens = retry(lambda: self.store.citizens(list(lanes)), outage=self.outages, stop=stop,
                             what="look up citizens", backoff=self.backoff, on_outage=self._outage)
            announced = self._run_lanes(lanes, citizens, stop)
            if announced:
                retry(lambda: self.publisher.publish([outgoing(e, self.deliveries_topic) for e in announced]),
                      outage=(BrokerUnavailable,), stop=stop, what="publish delivery outcomes", backoff=self.backoff,
                      on_outage=lambda exc: self._outage(exc, "kafka"))
            self.healthy = True
        finally:
            self._release()

    def _run_lanes(self, lanes: dict[str, deque[_Job]], citizens: Mapping[str, CitizenContact],
                   stop: threading.Event) -> list[Delivery]:
        announced: list[Delivery] = []
        outage_delays: Iterator[float] | None = None
        while lanes:
            if stop.is_set():
                raise Stopped("dispatching a batch")
            now = self.monotonic()
            heads = [lane[0] for lane in lanes.values()]
            ready = [job for job in heads if job.ready_at <= now][:max(1, self.concurrency)]
            if not ready:
                if stop.wait(min(job.ready_at for job in heads) - now):
                    raise Stopped("waiting to retry, for a rate limit or for another dispatcher")
                continue
            try:
                self._round(ready, citizens, stop)
                outage_delays = None
            except self.outages as exc:
                self._outage(exc, "kafka" if isinstance(exc, BrokerUnavailable) else "postgresql")
                self.store.close()  # the session's advisory locks go with it
                self._held.clear()
                for lane in lanes.values():
                    lane[0].reset()  # the others have not started
                outage_delays = outage_delays or iter(self.backoff.delays())
                delay = next(outage_delays)
                log.warning("dispatch round failed, retrying in %.1fs", delay, extra={"error": repr(exc)})
                if stop.wait(delay):
                    raise Stopped("dispatch waiting out an outage") from None
                continue
            for citizen_id in [c for c, lane in lanes.items() if lane[0].phase == "done"]:
                job = lanes[citizen_id].popleft()
                if not lanes[citizen_id]:
                    del lanes[citizen_id]
                if job.failure is not None:
                    self._dead_letter(job, stop)
                    continue
                assert job.outcome is not None
                self.metrics.warnings.labels(outcome=job.outcome).inc()
                self.metrics.handled(job.outcome, job.warning.emitted_at, self.clock())
                if job.announce and (event := final_outcome(job.warning, job.rows.values(), self.clock())) is not None:
                    announced.append(event)
        return announced

    def _release(self) -> None:
        held, self._held = self._held, []
        try:
            self.store.unlock(held)
        except _db_outages():
            pass  # the session is gone, and its locks with it

    # a round --------------------------------------------------------------------------------------

    def _round(self, jobs: Sequence[_Job], citizens: Mapping[str, CitizenContact], stop: threading.Event) -> None:
        starting = [job for job in jobs if job.phase == "start"]
        if starting:
            self._start(starting, citizens)
        due = [job for job in jobs if job.phase == "steps" and self._isolated(job, self._next_attempt)]
        if due:
            self._attempt(due)

    def _isolated(self, job: _Job, step: Callable[[_Job], bool]) -> bool:
        """``step`` on one job; a data error fails that job alone (it is dead-lettered)."""
        try:
            return step(job)
        except Exception as exc:
            if isinstance(exc, self.outages):
                raise
            job.fail(exc)
            return False

    def _start(self, jobs: Sequence[_Job], citizens: Mapping[str, CitizenContact]) -> None:
        """Lock the warnings, read their rows and plan them; an all-clear first waits for the warnings
        it clears to settle; a warning another dispatcher holds waits for it."""
        now = self.monotonic()
        todo: list[_Job] = []
        for job in jobs:
            if job.warning.citizen_id not in citizens:
                log.warning("warning for a citizen not in the registry; not delivered",
                            extra={"warning_id": job.warning.warning_id, "citizen_id": job.warning.citizen_id})
                job.settle("no_citizen")
            else:
                todo.append(job)
        clears = [job for job in todo if job.warning.kind == "all_clear"]
        if clears:
            rows_of = self.store.rows_of(list(dict.fromkeys((j.warning.citizen_id, j.warning.crisis_id) for j in clears)))
            for job in clears:
                waiting = unsettled_earlier(rows_of.get((job.warning.citizen_id, job.warning.crisis_id), {}),
                                            job.warning.warning_id)
                if waiting:
                    log.info("all-clear waits for earlier warnings",
                             extra={"warning_id": job.warning.warning_id, "waiting": waiting})
                    job.earlier = job.earlier or iter(self.backoff.delays())
                    job.ready_at = now + next(job.earlier)
                    todo.remove(job)
        if not todo:
            return
        locked, rows = self.store.lock_and_read([job.warning.warning_id for job in todo])
        self._held += locked
        held = set(locked)
        for job in todo:
            if job.warning.warning_id not in held:  # another dispatcher is on it (a rebalance overlap)
                job.ready_at = now + 0.2
                continue
            try:
                self._plan(job, rows.get(job.warning.warning_id, []), citizens[job.warning.citizen_id])
            except Exception as exc:
                if isinstance(exc, self.outages):
                    raise
                job.fail(exc)

    def _plan(self, job: _Job, rows: Sequence[DeliveryRow], citizen: CitizenContact) -> None:
        job.rows = {(r.channel, r.address): r for r in rows}
        steps = (plan_resend if job.resend else plan)(citizen.channels, rows, self.policy.max_attempts)
        if steps.done is not None:
            if steps.done in ("delivered", "gave_up"):
                job.settle("skipped", announce=True)
            else:
                job.settle("skipped" if steps.done == "no_next_channel" else "no_channel")
            return
        if job.outbound is None:
            job.outbound = Outbound(job.warning, compose(job.warning, citizen, self.embassies, self.reply_url))
        job.take(steps.steps)
        job.phase = "steps"

    def _next_attempt(self, job: _Job) -> bool:
        """Move ``job`` to the next attempt it can make now (True), past the channels that cannot be
        tried; or make it wait for its channel's rate limit, or settle it when no channel is left."""
        gave_up: list[tuple[Warning, str, str, str]] = []
        try:
            while job.steps:
                step = job.steps[0]
                if step.channel not in self.channels:
                    gave_up.append((job.warning, step.channel, step.address, f"no {step.channel} channel configured"))
                    self.metrics.attempts.labels(channel=step.channel, outcome="not_configured").inc()
                elif not job.again and job.attempts >= self.policy.max_attempts:
                    gave_up.append((job.warning, step.channel, step.address, "attempts used up"))
                else:
                    break
                job.rows[(step.channel, step.address)] = DeliveryRow(step.channel, step.address, "gave_up",
                                                                    job.attempts)
                job.next_channel()
        finally:
            if gave_up:
                self.store.give_up(gave_up)
        if not job.steps:
            log.warning("every channel gave up; the citizen is unreached",
                        extra={"warning_id": job.warning.warning_id, "citizen_id": job.warning.citizen_id})
            job.settle("gave_up", announce=True)
            return False
        if not job.paid:
            channel = job.steps[0].channel
            bucket = self.buckets.get(channel)
            wait = bucket.reserve() if bucket is not None else 0.0
            job.paid = True
            if wait > 0:
                self.metrics.rate_limited.labels(channel=channel).inc(wait)
                job.ready_at = self.monotonic() + wait
                return False
        return True

    def _attempt(self, jobs: Sequence[_Job]) -> None:
        """Claim, send and record one attempt of each job, each step one statement or one round of sends."""
        now = self.clock()
        claims = isolate(jobs, lambda part: self.store.begin([(j.warning, *j.key[1:]) for j in part], now),
                         outages=self.outages)
        claimed = {key: n for part in claims.results for key, n in part.items()}
        for failure in claims.failures:
            failure.item.fail(failure.error)
        sending: list[_Job] = []
        for job in jobs:
            if job.phase == "done":
                continue
            attempts = claimed.get(job.key)
            job.paid = False
            if attempts is None:  # settled meanwhile
                rows = self.store.rows([job.warning.warning_id]).get(job.warning.warning_id, [])
                job.rows = {(r.channel, r.address): r for r in rows}
                if any(r.status == "delivered" for r in rows):
                    job.settle("delivered", announce=True)
                else:
                    job.next_channel()
                continue
            job.attempts, job.again = attempts, False
            step = job.steps[0]
            job.rows[(step.channel, step.address)] = DeliveryRow(step.channel, step.address, "sending", attempts)
            sending.append(job)
        by_channel: dict[str, list[_Job]] = {}
        for job in sending:
            by_channel.setdefault(job.steps[0].channel, []).append(job)
        outcomes: list[tuple[_Job, RowOutcome]] = []
        for name, group in by_channel.items():
            results = self.channels[name].send_many([self._attempt_of(job) for job in group])
            for job, sent in zip(group, results, strict=True):
                outcomes.append((job, self._outcome(job, name, sent)))
        now = self.clock()
        recorded = isolate(outcomes, lambda part: self.store.finish([o for _, o in part], now), outages=self.outages)
        for unrecorded in recorded.failures:
            unrecorded.item[0].fail(unrecorded.error)

    @staticmethod
    def _attempt_of(job: _Job) -> Attempt:
        assert job.outbound is not None
        return Attempt(job.outbound, job.steps[0].address, job.warning.warning_id)

    def _outcome(self, job: _Job, channel: str, sent: Sent) -> RowOutcome:
        """What one attempt's result means for the job, and the row's new state."""
        self.metrics.seconds.labels(channel=channel).observe(sent.seconds)
        key, step, now = job.key, job.steps[0], self.monotonic()
        exc = sent.error
        if exc is None:
            self.metrics.attempts.labels(channel=channel, outcome="delivered").inc()
            self.healthy = True
            self._row(job, "delivered")
            job.settle("delivered", announce=True)
            return RowOutcome(key, "delivered", receipt=sent.receipt)
        if isinstance(exc, ChannelUnavailable):
            self.metrics.attempts.labels(channel=channel, outcome="unavailable").inc()
            job.attempts -= 1
            self._row(job, "failed")
            self._outage(exc, channel)
            log.warning("channel unavailable; waiting", extra={"channel": channel, "error": str(exc)})
            job.ready_at = now + self.policy.delay(1, self.unit_random()) + self.backoff.initial_s
            return RowOutcome(key, "failed", error=str(exc), uncount=True)
        if isinstance(exc, TransientError):
            self.metrics.attempts.labels(channel=channel, outcome="transient").inc()
            if job.attempts >= self.policy.max_attempts:
                self._row(job, "gave_up")
                job.next_channel()
                return RowOutcome(key, "gave_up", error=str(exc))
            delay = self.policy.delay(job.attempts, self.unit_random(), exc.retry_after_s)
            self._row(job, "failed")
            job.ready_at = now + delay
            return RowOutcome(key, "failed", error=str(exc), next_attempt_at=self.clock() + timedelta(seconds=delay))
        if isinstance(exc, self.outages):
            raise exc
        if isinstance(exc, PermanentError):
            self.metrics.attempts.labels(channel=channel, outcome="permanent").inc()
            reason = str(exc)
        else:  # a channel that fails in a way nobody foresaw must not keep the citizen from the next one
            self.metrics.attempts.labels(channel=channel, outcome="error").inc()
            log.error("channel raised unexpectedly; giving it up for this warning", exc_info=exc,
                      extra={"channel": step.channel})
            reason = describe(exc)
        self._row(job, "gave_up")
        job.next_channel()
        return RowOutcome(key, "gave_up", error=reason)

    @staticmethod
    def _row(job: _Job, status: DeliveryStatus) -> None:
        step = job.steps[0]
        job.rows[(step.channel, step.address)] = DeliveryRow(step.channel, step.address, status, job.attempts)

    def _dead_letter(self, job: _Job, stop: threading.Event) -> None:
        assert job.failure is not None
        failure: Failure[Message] = Failure(job.message, job.failure)
        message = job.message
        letter: Outgoing = dead_letter(message.value, failure.reason, message.topic, STAGE, message.key,
                                       error_type=failure.error_type, partition=message.partition, offset=message.offset,
                                       max_payload_bytes=self.settings.dlq_max_payload_bytes)
        retry(lambda: self.publisher.publish([letter]), outage=(BrokerUnavailable,), stop=stop, what="publish to dlq",
              backoff=self.backoff, on_outage=lambda exc: self._outage(exc, "kafka"))
        retry(lambda: self.store.abandon(job.warning.warning_id, f"dead-lettered: {failure.reason}"), outage=self.outages,
              stop=stop, what="record a dead-lettered warning", backoff=self.backoff, on_outage=self._outage)
        self.metrics.dlq.labels(stage=STAGE, reason=failure.label).inc()
        self.metrics.warnings.labels(outcome="dead_lettered").inc()
        log.warning("dead-lettered", extra={"where": message.where(), "reason": failure.reason})

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set (:func:`consumers.kafka_io.run_consumer`); the round in hand
        is finished first, and nothing past an unsettled warning is committed."""
        try:
            run_consumer(stop, name="dispatcher", handle=self.handle, poll_timeout_s=self.poll_timeout_s,
                         batch_size=self.batch_size, backoff=self.backoff, on_polled=self._polled,
                         on_outage=lambda exc: self._outage(exc, "kafka"),
                         connect=lambda: group_consumer(self.bootstrap, [self.source_topic], self.group_id,
                                                        self.settings.kafka_client_options(), self.timeouts),
                         log_extra={"topic": self.source_topic, "group": self.group_id, "channels": sorted(self.channels)})
        finally:
            self.store.close()
            if self._own_channels:
                for channel in self.channels.values():
                    channel.close()
            if self._own_publisher and self._publisher is not None:
                self._publisher.close()
