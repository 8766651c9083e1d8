"""The PostgreSQL sink: check-ins, citizens, crisis events, warnings, acks, cases and crisis statuses
from Kafka into the tables of deploy/sql, idempotently and at least once.

The failure policy is :mod:`pipeline.stage`'s, in three paths:

* a message the sink cannot admit — not a valid event of its topic's schema, or anything else its
  decoding or admission raises (:func:`pipeline.domain.admission.admit_message`, the worker's own check, so
  the sink stores no crisis the worker refused) → ``dlq`` with the reason, for the topics the sink
  owns (citizens, acks, cases, crisis statuses; the accountability agent only skips bad acks); on the
  others the stage that owns the topic dead-letters it (the worker: check-ins, crisis events; the
  router: warnings) and the sink only counts and logs it, so one bad message is one dead letter;
* a row that cannot be written — PostgreSQL refuses it (a value it cannot store), or writing it
  raises anything else that is not an outage (a string the driver cannot encode) → that row alone
  goes to ``dlq``: the batch is split until it is alone, the rest is written;
* PostgreSQL or Kafka unreachable → retry with backoff, never dead-letter, never skip.

Offsets are committed only after the database transaction (and any dead-lettering) succeeded,
so a crash replays the batch, and the deterministic keys make the replay a no-op.

Privacy (docs/privacy.md): a check-in of a citizen registered without location_tracking consent is
refused by PostgreSQL itself (``deploy/sql/005_privacy.sql``) and dead-lettered *without its
coordinates* (:func:`redacted_checkin`); a refusal's reason names the constraint and the column, never
the failing row PostgreSQL would quote (a citizen's name, phone, position: :func:`refusal_reason`). An
erasure tombstone (a citizen's key with no value) on ``citizens`` or ``checkins`` deletes what is stored
of them in that table: it comes after everything the citizen's key carried before it on that
partition, so nothing in flight is written back after it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final

from prometheus_client import CollectorRegistry

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
from pipeline import topics
from pipeline.domain.admission import admit_message
from pipeline.domain.validation import DEFAULT_RULES, EventRules
from pipeline.metrics import SinkMetrics
from pipeline.settings import Settings
from pipeline.stage import MAX_REASON_CHARS, OutageTypes, error_type, isolate, label, map_isolated, record
from producers.publisher import BrokerUnavailable, Outgoing, Publisher, dead_letter
from schemas import Ack, Case, Checkin, Citizen, Crisis, CrisisStatus, InvalidEvent, Warning
from schemas.fast import split_checkin_batch
from schemas.models import Event

log = logging.getLogger(__name__)

GROUP_ID: Final = "crisiswatch-sink"
STAGE: Final = "sink"

Row = tuple[Any, ...]
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


# --- tables and pure row building -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TableSpec:
    """How one event type lands in one table. ``upsert``: the latest event wins (the registry);
    otherwise the first row with a key is kept and later ones are no-ops (history, audit). An upsert
    sets ``touched`` to the time of writing; with ``newest``, the event whose value of that column is
    the greatest wins instead of the last one read, so a replayed older version never overwrites."""

    name: str
    columns: tuple[str, ...]
    key: tuple[str, ...]
    upsert: bool = False
    jsonb: frozenset[str] = frozenset()
    touched: str = "updated_at"
    newest: str | None = None
    erases: bool = False  # rows are citizen ids whose rows of ``name`` are deleted (erasure tombstones)

    def key_of(self, row: Row) -> Row:
        return tuple(row[self.columns.index(c)] for c in self.key)


CHECKINS_TABLE: Final = TableSpec("checkins", ("citizen_id", "observed_at", "source", "lat", "lon", "accuracy_m"),
                                  key=("citizen_id", "observed_at", "source"))
CITIZENS_TABLE: Final = TableSpec(
    "citizens", ("citizen_id", "name", "nationality", "language", "channels", "emergency_contacts",
                 "location_tracking", "trip_country", "trip_from", "trip_until"),
    key=("citizen_id",), upsert=True, jsonb=frozenset({"channels", "emergency_contacts"}))
CRISES_TABLE: Final = TableSpec(
    "crises", ("crisis_id", "version", "op", "source", "source_ref", "title", "category", "severity", "urgency",
               "certainty", "geometry", "buffer_km", "country_codes", "effective", "expires", "instruction", "url",
               "references", "language", "status"),
    key=("crisis_id", "version"), jsonb=frozenset({"geometry"}))
WARNINGS_TABLE: Final = TableSpec(
    "warnings", ("warning_id", "citizen_id", "crisis_id", "crisis_version", "kind", "severity", "title", "instruction",
                 "distance_km", "lat", "lon", "observed_at", "emitted_at", "country_codes"),
    key=("warning_id",))
ACKS_TABLE: Final = TableSpec("acks", ("citizen_id", "crisis_id", "received_at", "status", "channel", "note"),
                              key=("citizen_id", "crisis_id", "received_at", "status", "channel"))

CASES_TABLE: Final = TableSpec(
    "cases", ("case_id", "citizen_id", "crisis_id", "kind", "state", "assignee", "country", "lat", "lon", "note",
              "opened_at", "updated_at"),
    key=("case_id",), upsert=True, touched="recorded_at", newest="updated_at")

CRISIS_STATUS_TABLE: Final = TableSpec(
    "crisis_status", ("crisis_id", "inside", "near", "warned", "delivered", "safe", "need_help", "unreached", "escalated",
                      "as_of"),
    key=("crisis_id",), upsert=True, touched="recorded_at", newest="as_of")

# Erasure tombstones: the citizen's rows of the table are deleted (see the module docstring).
ERASE_CITIZENS: Final = TableSpec("citizens", ("citizen_id",), key=("citizen_id",), erases=True)
ERASE_CHECKINS: Final = TableSpec("checkins", ("citizen_id",), key=("citizen_id",), erases=True)
ERASURES: Final[Mapping[type[Event], TableSpec]] = {Citizen: ERASE_CITIZENS, Checkin: ERASE_CHECKINS}
CONSENT_CONSTRAINT: Final = "checkins_location_tracking_consent"

TABLES: Final = (CITIZENS_TABLE, CRISES_TABLE, WARNINGS_TABLE, ACKS_TABLE, CHECKINS_TABLE, CASES_TABLE, CRISIS_STATUS_TABLE)


def checkin_row(event: Checkin) -> Row:
    return (event.citizen_id, event.observed_at, event.source, event.lat, event.lon, event.accuracy_m)


def _opt_date(value: Any) -> date | None:
    return None if value is None else date.fromisoformat(str(value))


def citizen_row(event: Citizen) -> Row:
    trip = event.trip or {}
    return (event.citizen_id, event.name, event.nationality, event.language,
            [{"type": c.type, "address": c.address} for c in event.channels],
            [dict(c) for c in event.emergency_contacts], event.location_tracking,
            trip.get("country"), _opt_date(trip.get("from")), _opt_date(trip.get("until")))


def crisis_row(event: Crisis) -> Row:
    return (event.crisis_id, event.version, event.op, event.source, event.source_ref, event.title, event.category,
            event.severity, event.urgency, event.certainty,
            None if event.geometry is None else dict(event.geometry), event.buffer_km, list(event.country_codes),
            event.effective, event.expires, event.instruction, event.url, list(event.references), event.language,
            event.status)


def warning_row(event: Warning) -> Row:
    return (event.warning_id, event.citizen_id, event.crisis_id, event.crisis_version, event.kind, event.severity,
            event.title, event.instruction, event.distance_km, event.lat, event.lon, event.observed_at,
            event.emitted_at, list(event.country_codes))


def ack_row(event: Ack) -> Row:
    return (event.citizen_id, event.crisis_id, event.received_at, event.status, event.channel, event.note)


def case_row(event: Case) -> Row:
    return (event.case_id, event.citizen_id, event.crisis_id, event.kind, event.state, event.assignee, event.country,
            event.lat, event.lon, event.note, event.opened_at, event.updated_at)


def crisis_status_row(event: CrisisStatus) -> Row:
    return (event.crisis_id, event.inside, event.near, event.warned, event.delivered, event.safe, event.need_help,
            event.unreached, event.escalated, event.as_of)


def row_for(event: Event) -> tuple[TableSpec, Row]:
    """The table an event belongs in and its row."""
    if isinstance(event, Checkin):
        return CHECKINS_TABLE, checkin_row(event)
    if isinstance(event, Citizen):
        return CITIZENS_TABLE, citizen_row(event)
    if isinstance(event, Crisis):
        return CRISES_TABLE, crisis_row(event)
    if isinstance(event, Warning):
        return WARNINGS_TABLE, warning_row(event)
    if isinstance(event, Ack):
        return ACKS_TABLE, ack_row(event)
    if isinstance(event, Case):
        return CASES_TABLE, case_row(event)
    if isinstance(event, CrisisStatus):
        return CRISIS_STATUS_TABLE, crisis_status_row(event)
    raise InvalidEvent(f"the sink stores no {event.SCHEMA} events", "$.schema")


@dataclass(frozen=True, slots=True)
class SinkTopics:
    """The topics the sink reads, each carrying exactly one event type."""

    checkins: str = topics.CHECKINS
    citizens: str = topics.CITIZENS
    crisis_events: str = topics.CRISIS_EVENTS
    warnings: str = topics.WARNINGS
    acks: str = topics.ACKS
    cases: str = topics.CASES
    crisis_status: str = topics.CRISIS_STATUS

    def models(self) -> dict[str, type[Event]]:
        pairs: list[tuple[str, type[Event]]] = [
            (self.checkins, Checkin), (self.citizens, Citizen), (self.crisis_events, Crisis),
            (self.warnings, Warning), (self.acks, Ack), (self.cases, Case),
            (self.crisis_status, CrisisStatus)]
        if len({t for t, _ in pairs}) != len(pairs):
            raise ValueError("each sink topic must carry one event type; got a topic twice")
        return dict(pairs)

    def dead_lettered_here(self) -> frozenset[str]:
        """The topics whose invalid messages the sink dead-letters: those no other stage reads."""
        return frozenset({self.citizens, self.acks, self.cases, self.crisis_status})


@dataclass(frozen=True, slots=True)
class SinkRow:
    table: TableSpec
    values: Row
    source: Message


@dataclass(frozen=True, slots=True)
class Rejected:
    """A message that will not be written, with the reason that goes into the dlq header and the
    bounded metric label."""

    message: Message
    reason: str
    label: str
    error_type: str = ""


@dataclass(frozen=True, slots=True)
class Prepared:
    rows: tuple[SinkRow, ...]
    rejected: tuple[Rejected, ...]


class UnknownTopic(ValueError):
    """A message from a topic the sink was not configured to read."""


def prepare(messages: Iterable[Message], models: Mapping[str, type[Event]], now: datetime,
            rules: EventRules = DEFAULT_RULES, outages: OutageTypes = ()) -> Prepared:
    """Admit a polled batch as rows, each message on its own; those that raise (anything but an
    outage) are set aside with their reasons. Pure. Admission is the stages' own
    (:func:`pipeline.domain.admission.admit_message`), so a row is what the worker used and never
    holds a value PostgreSQL cannot store."""
    def row(message: Message) -> SinkRow:
        model = models.get(message.topic)
        if model is None:
            raise UnknownTopic(f"the sink does not read topic {message.topic!r}")
        erasure = erasure_row(message, model)
        if erasure is not None:
            return erasure
        if model is Checkin:
            split_checkin_batch(message.value)  # a batch left whole here cannot be read: raise why
        spec, values = row_for(admit_message(message.value, model, now, rules))
        return SinkRow(spec, values, message)

    admitted = map_isolated(_each_checkin(messages, models), row, outages=outages)
    return Prepared(admitted.results,
                    tuple(Rejected(f.item, f.reason, f.label, f.error_type) for f in admitted.failures))


def erasure_row(message: Message, model: type[Event]) -> SinkRow | None:
    """An erasure tombstone (a citizen's key, no value) on a topic the sink erases from, as a row."""
    spec = ERASURES.get(model)
    if spec is None or not message.tombstone or not message.key:
        return None
    try:
        citizen_id = message.key.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return SinkRow(spec, (citizen_id,), message)


def refusal_reason(exc: BaseException, table: str) -> str:
    """Why PostgreSQL refused a row, without the row's values: the error's name, its primary message when
    that names only the schema (integrity violations: the constraint), the constraint and the column.
    (``str()`` of the error ends with ``DETAIL: Failing row contains (...)``: a citizen's name, phone
    numbers and position, which must reach neither a dead letter's headers nor a log line; the primary
    message of a data exception may quote the value.)"""
    diag = getattr(exc, "diag", None)
    sqlstate = str(getattr(exc, "sqlstate", None) or "")
    primary = getattr(diag, "message_primary", None) if sqlstate.startswith("23") else None
    named = (("constraint", getattr(diag, "constraint_name", None)), ("column", getattr(diag, "column_name", None)))
    where = ", ".join(f"{name} {value}" for name, value in named if value and value not in (primary or ""))
    text = f"{type(exc).__name__}: postgresql refused the row for {table}"
    text += f": {primary}" if primary else (f" (SQLSTATE {sqlstate})" if sqlstate else "")
    text += f" ({where})" if where else ""
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS - 1] + "…"


def refused_for_consent(exc: BaseException) -> bool:
    return getattr(getattr(exc, "diag", None), "constraint_name", None) == CONSENT_CONSTRAINT


def redacted_checkin(raw: bytes) -> bytes:
    """A check-in refused for want of consent, as its dead letter keeps it: who, when and from where it
    came, never the coordinates (which must not be stored anywhere, the dlq included)."""
    try:
        event = json.loads(raw)
    except ValueError:
        return b'{"redacted": "check-in without location_tracking consent"}'
    kept = {k: event[k] for k in ("schema", "citizen_id", "observed_at", "source") if isinstance(event, dict) and k in event}
    return json.dumps({**kept, "redacted": ["lat", "lon", "accuracy_m"]}).encode("utf-8")


def refused_rows(refused: Iterable[tuple[SinkRow, Exception]]) -> list[Rejected]:
    """The rows PostgreSQL refused, as dead letters: reasons without the rows' values, and a check-in
    refused for want of consent without its coordinates."""
    out = []
    for row, exc in refused:
        source = row.source
        if refused_for_consent(exc):
            source = replace(source, value=redacted_checkin(source.value))
        out.append(Rejected(source, refusal_reason(exc, row.table.name), label(exc), error_type(exc)))
    return out


def _each_checkin(messages: Iterable[Message], models: Mapping[str, type[Event]]) -> Iterator[Message]:
    """Messages as the sink stores them: a ``checkin-batch/1`` record as its check-ins, each on its own
    (one that cannot be stored does not hold back the others), at the record's offset."""
    for message in messages:
        if models.get(message.topic) is Checkin:
            with contextlib.suppress(InvalidEvent):  # refused by row(), with the reason
                items = split_checkin_batch(message.value)
                if items is not None:
                    yield from (replace(message, value=item) for item in items)
                    continue
        yield message


def dedupe(rows: Iterable[SinkRow]) -> dict[str, list[SinkRow]]:
    """Rows grouped by table, one per key: the last for upsert tables (latest wins; with ``newest``,
    the greatest of that column, the last of equals), the first for the others (what is already
    there stays). A statement may not touch one key twice."""
    by_table: dict[str, dict[Row, SinkRow]] = {}
    for row in rows:
        keyed = by_table.setdefault(_group(row.table), {})
        key = row.table.key_of(row.values)
        if row.table.upsert:
            kept = keyed.pop(key, None)
            newest = row.table.newest
            if kept is not None and newest is not None:
                at = row.table.columns.index(newest)
                if kept.values[at] > row.values[at]:
                    row = kept
            keyed[key] = row
        else:
            keyed.setdefault(key, row)
    return {table: list(keyed.values()) for table, keyed in by_table.items()}


def _group(spec: TableSpec) -> str:
    return f"erase:{spec.name}" if spec.erases else spec.name


def retention_cutoff(now: datetime, retention_days: int) -> datetime:
    if now.tzinfo is None:
        raise ValueError("naive datetime")
    return now - timedelta(days=retention_days)


# --- PostgreSQL -------------------------------------------------------------------------------


def _outage_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "PostgreSQL is not usable now": retried, never blamed on the data.
    A missing table (migrations not applied) is one of them: the operator fixes it, nothing is lost."""
    import psycopg

    return (psycopg.OperationalError, psycopg.InterfaceError, psycopg.ProgrammingError, psycopg.InternalError)


def _bad_data_errors() -> tuple[type[Exception], ...]:
    import psycopg

    return (psycopg.DataError, psycopg.IntegrityError)


@dataclass
class WriteOutcome:
    written: dict[str, int] = field(default_factory=dict)
    refused: list[tuple[SinkRow, Exception]] = field(default_factory=list)

    def add(self, other: WriteOutcome) -> None:
        for table, count in other.written.items():
            self.written[table] = self.written.get(table, 0) + count
        self.refused += other.refused


class PostgresStore:
    """Batched, idempotent writes: COPY into a temporary table, then one INSERT ... ON CONFLICT."""

    def __init__(self, database_url: str, connect_timeout_s: int = 5) -> None:
        self._url = database_url
        self._connect_timeout_s = connect_timeout_s
        self._conn: Any = None

    def _connection(self) -> Any:
        import psycopg

        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self._url, autocommit=True, connect_timeout=self._connect_timeout_s,
                                         application_name="crisiswatch-sink")
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def _adapt(self, spec: TableSpec, values: Row) -> Row:
        from psycopg.types.json import Jsonb

        return tuple(Jsonb(v) if c in spec.jsonb and v is not None else v for c, v in zip(spec.columns, values, strict=True))

    @staticmethod
    def _conflict_clause(spec: TableSpec) -> Any:
        from psycopg import sql

        key = sql.SQL(", ").join(map(sql.Identifier, spec.key))
        if not spec.upsert:
            return sql.SQL("ON CONFLICT ({}) DO NOTHING").format(key)
        rest = [c for c in spec.columns if c not in spec.key]
        table = sql.Identifier(spec.name)
        newer = sql.SQL("") if spec.newest is None else sql.SQL(" AND {}.{} <= EXCLUDED.{}").format(
            table, sql.Identifier(spec.newest), sql.Identifier(spec.newest))
        return sql.SQL("ON CONFLICT ({key}) DO UPDATE SET {sets}, {touched} = now() "
                       "WHERE ({old}) IS DISTINCT FROM ({new}){newer}").format(
            key=key, touched=sql.Identifier(spec.touched), newer=newer,
            sets=sql.SQL(", ").join(sql.SQL("{} = EXCLUDED.{}").format(sql.Identifier(c), sql.Identifier(c)) for c in rest),
            old=sql.SQL(", ").join(sql.SQL("{}.{}").format(table, sql.Identifier(c)) for c in rest),
            new=sql.SQL(", ").join(sql.SQL("EXCLUDED.{}").format(sql.Identifier(c)) for c in rest))

    def _copy_insert(self, conn: Any, spec: TableSpec, rows: Sequence[SinkRow]) -> int:
        from psycopg import sql

        table, staging = sql.Identifier(spec.name), sql.Identifier(f"incoming_{spec.name}")
        columns = sql.SQL(", ").join(map(sql.Identifier, spec.columns))
        with conn.cursor() as cur:
            cur.execute(sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} (LIKE {} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
                        .format(staging, table))
            cur.execute(sql.SQL("TRUNCATE {}").format(staging))
            with cur.copy(sql.SQL("COPY {} ({}) FROM STDIN").format(staging, columns)) as copy:
                for row in rows:
                    copy.write_row(self._adapt(spec, row.values))
            cur.execute(sql.SQL("INSERT INTO {table} ({columns}) SELECT {columns} FROM {staging} {conflict}").format(
                table=table, columns=columns, staging=staging, conflict=self._conflict_clause(spec)))
            return int(cur.rowcount)

    def _insert_one(self, conn: Any, spec: TableSpec, row: SinkRow) -> int:
        from psycopg import sql

        query = sql.SQL("INSERT INTO {} ({}) VALUES ({}) {}").format(
            sql.Identifier(spec.name), sql.SQL(", ").join(map(sql.Identifier, spec.columns)),
            sql.SQL(", ").join(sql.Placeholder() * len(spec.columns)), self._conflict_clause(spec))
        with conn.cursor() as cur:
            cur.execute(query, self._adapt(spec, row.values))
            return int(cur.rowcount)

    def _erase(self, conn: Any, spec: TableSpec, rows: Sequence[SinkRow]) -> int:
        from psycopg import sql

        with conn.cursor() as cur:
            cur.execute(sql.SQL("DELETE FROM {} WHERE citizen_id = ANY(%s)").format(sql.Identifier(spec.name)),
                        ([row.values[0] for row in rows],))
            return int(cur.rowcount)

    def write(self, rows: Iterable[SinkRow]) -> WriteOutcome:
        """Write a batch in one transaction; return rows written per table and the rows PostgreSQL
        refused (each with the reason). Raises an outage error, after which the batch is retried whole."""
        bad_data = _bad_data_errors()
        outcome = WriteOutcome()
        try:
            conn = self._connection()
            with conn.transaction():
                for table_name, table_rows in dedupe(rows).items():
                    spec = table_rows[0].table
                    if spec.erases:
                        outcome.written[table_name] = self._erase(conn, spec, table_rows)
                        continue
                    try:
                        with conn.transaction():
                            outcome.written[table_name] = self._copy_insert(conn, spec, table_rows)
                        continue
                    except bad_data:
                        pass  # find the rows PostgreSQL refuses, one savepoint each
                    written = 0
                    for row in table_rows:
                        try:
                            with conn.transaction():
                                written += self._insert_one(conn, spec, row)
                        except bad_data as exc:
                            outcome.refused.append((row, exc))
                    outcome.written[table_name] = written
        except _outage_errors():
            self.close()
            raise
        return outcome

    def purge_checkins(self, cutoff: datetime) -> int:
        """Delete check-in history observed before ``cutoff``; return how many rows went."""
        try:
            with self._connection().cursor() as cur:
                cur.execute("DELETE FROM checkins WHERE observed_at < %s", (cutoff,))
                return int(cur.rowcount)
        except _outage_errors():
            self.close()
            raise


def purge_checkin_history(database_url: str, retention_days: int, now: datetime) -> int:
    """One retention sweep: delete check-ins older than ``retention_days`` before ``now``."""
    store = PostgresStore(database_url)
    try:
        return store.purge_checkins(retention_cutoff(now, retention_days))
    finally:
        store.close()


# --- the consumer loop ------------------------------------------------------------------------


class PostgresSink:
    """Consumer group ``crisiswatch-sink`` over the six event topics, into PostgreSQL."""

    def __init__(self, settings: Settings, metrics: SinkMetrics, *, bootstrap: str | None = None,
                 database_url: str | None = None, sink_topics: SinkTopics = SinkTopics(), group_id: str = GROUP_ID,
                 publisher: Publisher | None = None, clock: Clock = utc_now,
                 timeouts: GroupTimeouts = DEFAULT_TIMEOUTS, backoff: Backoff = DEFAULT_BACKOFF,
                 retention_interval_s: float = 3600.0, poll_timeout_s: float = 0.5, batch_size: int | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.bootstrap = bootstrap or settings.kafka_bootstrap
        self.models = sink_topics.models()
        self.dead_lettered_here = sink_topics.dead_lettered_here()
        self.group_id = group_id
        self.store = PostgresStore(database_url or settings.database_url.get())
        self._own_publisher = publisher is None
        self.publisher = publisher or Publisher(settings, bootstrap=self.bootstrap, client_id="crisiswatch-sink-dlq")
        self.clock = clock
        self.rules = settings.event_rules()
        self.timeouts = timeouts
        self.backoff = backoff
        self.retention_interval_s = retention_interval_s
        self.poll_timeout_s = poll_timeout_s
        self.batch_size = batch_size or settings.batch_size
        self._next_purge = 0.0
        self.healthy = True

    def _polled(self) -> None:
        """Kafka answered a poll: an outage reported while it was away is over."""
        self.healthy = True

    def _outage(self, exc: BaseException) -> None:
        self.healthy = False
        self.metrics.errors.inc()

    def _connect(self) -> Any:
        return group_consumer(self.bootstrap, list(self.models), self.group_id, self.settings.kafka_client_options(),
                              self.timeouts)

    def handle(self, messages: Sequence[Message], stop: threading.Event) -> None:
        """Write one polled batch and dead-letter what cannot be written. Returns once both are
        durable; raises :class:`Stopped` if asked to stop during an outage (nothing committed)."""
        outages = _outage_errors()
        prepared = prepare(messages, self.models, self.clock(), self.rules, outages)

        def write() -> tuple[WriteOutcome, list[Rejected]]:
            started = time.perf_counter()
            # Rows PostgreSQL refuses come back in the outcome; a row whose writing raises anything else
            # that is not an outage is isolated by splitting the batch (the transaction rolls back).
            run = isolate(prepared.rows, self.store.write, outages=outages)
            self.metrics.batch_seconds.observe(time.perf_counter() - started)
            record(self.metrics, STAGE, run)
            outcome = WriteOutcome()
            for part in run.results:
                outcome.add(part)
            return outcome, [Rejected(f.item.source, f.reason, f.label, f.error_type) for f in run.failures]

        outcome, unwritable = retry(write, outage=outages, stop=stop, what="write to PostgreSQL", backoff=self.backoff,
                                    on_outage=self._outage)
        self.healthy = True
        for table, count in outcome.written.items():
            self.metrics.rows.labels(table=table).inc(count)
        rejected: list[Rejected] = []
        for r in prepared.rejected:
            if r.message.topic in self.dead_lettered_here:
                rejected.append(r)
            else:
                self.metrics.skipped.labels(topic=r.message.topic, reason=r.label).inc()
                log.warning("invalid, not written (its owner dead-letters it)",
                            extra={"where": r.message.where(), "reason": r.reason})
        rejected += refused_rows(outcome.refused)
        rejected += unwritable
        if rejected:
            letters: list[Outgoing] = [
                dead_letter(r.message.value, r.reason, r.message.topic, STAGE, r.message.key, error_type=r.error_type,
                            partition=r.message.partition, offset=r.message.offset,
                            max_payload_bytes=self.settings.dlq_max_payload_bytes)
                for r in rejected]
            retry(lambda: self.publisher.publish(letters), outage=(BrokerUnavailable,), stop=stop,
                  what="publish to dlq", backoff=self.backoff, on_outage=self._outage)
            for r in rejected:
                self.metrics.dlq.labels(stage=STAGE, reason=r.label).inc()
                log.warning("dead-lettered", extra={"where": r.message.where(), "reason": r.reason})

    def purge_due(self, stop: threading.Event) -> int | None:
        """Run the check-in retention sweep when its interval has passed; return rows deleted."""
        if time.monotonic() < self._next_purge:
            return None
        cutoff = retention_cutoff(self.clock(), self.settings.checkin_retention_days)
        deleted = retry(lambda: self.store.purge_checkins(cutoff), outage=_outage_errors(), stop=stop,
                        what="purge check-in history", backoff=self.backoff, on_outage=self._outage)
        self.healthy = True  # the outage waited out here may be the only one: no batch may come to say so
        self._next_purge = time.monotonic() + self.retention_interval_s
        if deleted:
            log.info("check-in history purged", extra={"deleted": deleted, "before": cutoff.isoformat()})
        return deleted

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set; the batch in hand is finished and committed first
        (:func:`consumers.kafka_io.run_consumer`)."""
        try:
            run_consumer(stop, name="sink", connect=self._connect, handle=self.handle, poll_timeout_s=self.poll_timeout_s,
                         batch_size=self.batch_size, backoff=self.backoff, on_outage=self._outage,
                         after_poll=self.purge_due, on_polled=self._polled,
                         log_extra={"topics": sorted(self.models), "group": self.group_id})
        finally:
            self.store.close()
            if self._own_publisher:
                self.publisher.close()


def make_sink(settings: Settings, registry: CollectorRegistry | None = None, **kwargs: Any) -> PostgresSink:
    """A sink with its own :class:`SinkMetrics` on ``registry`` (a fresh one if none is given)."""
    return PostgresSink(settings, SinkMetrics(registry or CollectorRegistry()), **kwargs)
