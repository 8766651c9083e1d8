"""Recovery from PostgreSQL: republish what a Kafka that lost its data needs (``crisiswatch restore``).

PostgreSQL is the system of record; the embedded broker (Tansu, memory storage) keeps nothing
across its restart, and a managed cluster can lose topics too. Without this, a restarted stack
has forgotten every crisis: a citizen walking into one is not warned, and nobody warned before
gets the all-clear when it is cancelled.

This module reads the rows (one consistent snapshot), hands them to the pure derivation in
:mod:`pipeline.domain.recovery`, and publishes the result with acks=all, in this order:

1. ``crisis-events`` (key: crisis id): the latest version of each active crisis, and for each
   ended crisis some citizen is still owed an all-clear for, its last upsert then its cancel;
2. ``citizens`` (key: citizen id): the registry (the sink writes it back unchanged);
3. the worker's table changelog (``<app id>-citizen-state-changelog``): each rebuilt citizen
   state keyed as :class:`pipeline.app._TableView` writes it: the raw citizen id as key, in the
   partition the key's murmur2 hash gives (the partition of the citizen's check-ins); the state as
   JSON, the format of earlier versions, which the worker's table store reads as well as its own
   compact one (:mod:`pipeline.citizens`; JSON keeps these records readable by any tool). On the
   embedded broker these go one record per batch (``producer_max_batch_bytes``, see
   ``pipeline.stack.EMBEDDED_PRODUCER_MAX_BATCH_BYTES``) or Faust's table recovery stops short.

A worker then starts as after any restart: it reads the crisis log, recovers its table, and
reconciles (the all-clears owed for ended crises, ``inside`` for anyone whose last location is in
an active crisis and who was never told).

Restore runs **before the workers start**. A running worker never reads its changelog again and
its next write would overwrite what was restored, so :func:`restore` refuses (:class:`WorkersActive`)
while the worker group has members.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pipeline import topics
from pipeline.app import APP_ID, changelog_topic, partition_of
from pipeline.domain.recovery import FUTURE_TOLERANCE, RecoveryPlan, plan_recovery
from pipeline.domain.tracking import CitizenState
from pipeline.settings import Settings
from producers.publisher import BrokerUnavailable, Outgoing, Publisher, outgoing
from schemas import Checkin, Citizen, Crisis, InvalidEvent, Warning, format_time, from_obj

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

PUBLISH_CHUNK = 5000  # records handed to the producer, then awaited, at a time


def utc_now() -> datetime:
    return datetime.now(UTC)


class RestoreError(RuntimeError):
    """PostgreSQL or Kafka could not be read or written; the message says which and why."""


class WorkersActive(RestoreError):
    """Workers are running: state written now would be overwritten by them, never read."""


@dataclass(frozen=True, slots=True)
class RestoreTargets:
    """Where restored records go: the topics and the worker app whose table changelog is rebuilt."""

    crisis_events: str = topics.CRISIS_EVENTS
    citizens: str = topics.CITIZENS
    app_id: str = APP_ID

    @property
    def changelog(self) -> str:
        return changelog_topic(self.app_id)


@dataclass(frozen=True, slots=True)
class Recorded:
    """What PostgreSQL holds, as events; rows that are no valid event any more are set aside with why."""

    crises: tuple[Crisis, ...]
    citizens: tuple[Citizen, ...]
    locations: tuple[Checkin, ...]
    warnings: tuple[Warning, ...]
    skipped: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RestoreReport:
    crises: int  # active crises republished
    ended: int  # ended crises republished so that the all-clears they still owe are sent
    citizens: int
    states: int  # citizen states written to the changelog
    warned: int  # of which holding a presence (warned, all-clear not yet sent)
    skipped: int = 0  # rows PostgreSQL holds that are no valid event: logged, not republished

    @classmethod
    def of(cls, plan: RecoveryPlan, skipped: int = 0) -> RestoreReport:
        return cls(len(plan.active), len(plan.ended), len(plan.citizens), len(plan.states), plan.warned, skipped)

    def line(self, verb: str = "restored") -> str:
        text = (f"{verb} from PostgreSQL: {self.crises} active crises, {self.citizens} citizens, "
                f"{self.states} citizen states ({self.warned} warned)")
        if self.ended:
            text += f", {self.ended} ended crises for their all-clears"
        if self.skipped:
            text += f"; {self.skipped} invalid rows skipped (logged)"
        return text


# --- PostgreSQL --------------------------------------------------------------------------------

_CRISIS_COLUMNS = ("crisis_id", "version", "op", "source", "source_ref", "title", "category", "severity", "urgency",
                   "certainty", "geometry", "buffer_km", "country_codes", "effective", "expires", "instruction", "url",
                   "references", "language", "status")
_CITIZEN_COLUMNS = ("citizen_id", "name", "nationality", "language", "channels", "emergency_contacts",
                    "location_tracking", "trip_country", "trip_from", "trip_until")


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


def _crisis(row: dict[str, Any]) -> Crisis:
    data: dict[str, Any] = {"schema": Crisis.SCHEMA, **row, "country_codes": list(row["country_codes"]),
                            "references": list(row["references"]), "effective": format_time(_utc(row["effective"])),
                            "expires": None if row["expires"] is None else format_time(_utc(row["expires"]))}
    if data["language"] is None:
        del data["language"]
    return from_obj(data, Crisis)


def _citizen(row: dict[str, Any]) -> Citizen:
    trip: dict[str, Any] | None = None
    if row["trip_country"] is not None:
        trip = {"country": row["trip_country"]}
        if row["trip_from"] is not None:
            trip["from"] = row["trip_from"].isoformat()
        if row["trip_until"] is not None:
            trip["until"] = row["trip_until"].isoformat()
    return from_obj({"schema": Citizen.SCHEMA, "citizen_id": row["citizen_id"], "name": row["name"],
                     "nationality": row["nationality"], "language": row["language"], "channels": row["channels"],
                     "emergency_contacts": row["emergency_contacts"], "trip": trip,
                     "consent": {"location_tracking": row["location_tracking"]}}, Citizen)


def read_recorded(database_url: str, now: datetime, future_tolerance: timedelta = FUTURE_TOLERANCE,
                  connect_timeout_s: int = 5) -> Recorded:
    """Every crisis version, the registry, each citizen's last check-in (none dated after
    ``now + future_tolerance``) and every warning sent, read in one repeatable-read snapshot."""
    import psycopg
    from psycopg import sql
    from psycopg.rows import dict_row

    skipped: list[str] = []

    def columns(names: Sequence[str]) -> sql.Composable:
        return sql.SQL(", ").join(map(sql.Identifier, names))

    try:
        with psycopg.connect(database_url, connect_timeout=connect_timeout_s, application_name="crisiswatch-restore",
                             row_factory=dict_row) as conn:
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            conn.read_only = True
            with conn.transaction():
                crises: list[Crisis] = []
                invalid_newest: dict[str, int] = {}
                for row in conn.execute(sql.SQL("SELECT {} FROM crises ORDER BY crisis_id, version").format(
                        columns(_CRISIS_COLUMNS))):
                    try:
                        crises.append(_crisis(row))
                    except InvalidEvent as exc:
                        skipped.append(f"crisis {row['crisis_id']!r} version {row['version']}: {exc}")
                        invalid_newest[row["crisis_id"]] = row["version"]
                citizens: list[Citizen] = []
                for row in conn.execute(sql.SQL("SELECT {} FROM citizens ORDER BY citizen_id").format(
                        columns(_CITIZEN_COLUMNS))):
                    try:
                        citizens.append(_citizen(row))
                    except InvalidEvent as exc:
                        skipped.append(f"citizen {row['citizen_id']!r}: {exc}")
                locations = tuple(
                    Checkin(r["citizen_id"], r["lat"], r["lon"], _utc(r["observed_at"]), r["source"], r["accuracy_m"])
                    for r in conn.execute(
                        "SELECT DISTINCT ON (citizen_id) citizen_id, lat, lon, observed_at, source, accuracy_m "
                        "FROM checkins WHERE observed_at <= %s ORDER BY citizen_id, observed_at DESC",
                        (now + future_tolerance,)))
                # Severity, title and instruction (most of a row) play no part in rebuilding a state.
                warnings = tuple(
                    Warning(r["warning_id"], r["citizen_id"], r["crisis_id"], r["crisis_version"], r["kind"], "unknown",
                            "", "", r["distance_km"], r["lat"], r["lon"], _utc(r["observed_at"]),
                            _utc(r["emitted_at"]))
                    for r in conn.execute(
                        "SELECT warning_id, citizen_id, crisis_id, crisis_version, kind, distance_km, lat, lon, "
                        "observed_at, emitted_at FROM warnings"))
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RestoreError(f"cannot read PostgreSQL: {reason}") from exc
    for reason in skipped:
        log.warning("not restored, not a valid event: %s", reason)
    return Recorded(_without_invalid_newest(crises, invalid_newest), tuple(citizens), locations, warnings,
                    tuple(skipped))


def _without_invalid_newest(crises: Sequence[Crisis], invalid_newest: dict[str, int]) -> tuple[Crisis, ...]:
    """Drop a crisis whose newest version is no valid event: an older version must not stand in for it
    (it could bring back a crisis that was cancelled)."""
    newest_valid: dict[str, int] = {}
    for crisis in crises:
        newest_valid[crisis.crisis_id] = max(crisis.version, newest_valid.get(crisis.crisis_id, 0))
    dropped = {cid for cid, version in invalid_newest.items() if version > newest_valid.get(cid, 0)}
    for crisis_id in sorted(dropped):
        log.warning("crisis %r not restored: its newest version is not a valid event", crisis_id)
    return tuple(c for c in crises if c.crisis_id not in dropped)


def plan_from_postgres(settings: Settings, now: datetime,
                       future_tolerance: timedelta | None = None) -> tuple[RecoveryPlan, Recorded]:
    """What to republish, as of ``now``. Locations dated further ahead than the stages accept
    (``CRISISWATCH_MAX_FUTURE_SKEW_S``) are not restored: they would shadow every true one."""
    if future_tolerance is None:
        future_tolerance = timedelta(seconds=settings.max_future_skew_s)
    recorded = read_recorded(settings.database_url.get(), now, future_tolerance)
    plan = plan_recovery(recorded.crises, recorded.citizens, recorded.locations, recorded.warnings, now,
                         future_tolerance)
    return plan, recorded


# --- Kafka -------------------------------------------------------------------------------------


def state_records(states: Iterable[CitizenState], topic: str, partitions: int) -> list[Outgoing]:
    """Citizen states as records of the worker's table changelog (see :class:`pipeline.app._TableView`), the
    values as JSON (:func:`pipeline.citizens.decode_state` reads it)."""
    records = []
    for state in states:
        key = state.citizen_id.encode("utf-8")
        value = json.dumps(state.to_dict(), separators=(",", ":")).encode("utf-8")
        records.append(Outgoing(topic, key, value, partition=partition_of(key, partitions)))
    return records


def _ensure_topics(settings: Settings, targets: RestoreTargets) -> None:
    from pipeline.embedded import EmbeddedError, create_topics

    try:
        create_topics(settings.kafka_bootstrap, [targets.crisis_events, targets.citizens, targets.changelog],
                      settings.partitions, settings.kafka_client_options())
    except EmbeddedError as exc:
        raise RestoreError(str(exc)) from exc


def topic_ends(settings: Settings, names: Sequence[str], wait_s: float = 0.0,
               timeout_s: float = 20.0) -> dict[str, dict[int, int]]:
    """Each topic's end offset per partition (0 everywhere: empty; no partitions: no such topic, after
    waiting up to ``wait_s`` for the metadata of a topic just created)."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.errors import KafkaError

    try:
        consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None, enable_auto_commit=False,
                                 client_id="crisiswatch-restore", request_timeout_ms=int(timeout_s * 1000),
                                 **settings.kafka_client_options())
    except KafkaError as exc:
        raise RestoreError(f"cannot reach Kafka at {settings.kafka_bootstrap}: {exc}") from exc
    try:
        ends: dict[str, dict[int, int]] = {}
        deadline = time.monotonic() + wait_s
        for name in names:
            parts = consumer.partitions_for_topic(name)
            while not parts and time.monotonic() < deadline:
                time.sleep(0.2)
                parts = consumer.partitions_for_topic(name)
            offsets = consumer.end_offsets([TopicPartition(name, p) for p in sorted(parts)]) if parts else {}
            ends[name] = {tp.partition: int(end) for tp, end in offsets.items()}
        return ends
    except KafkaError as exc:
        raise RestoreError(f"Kafka did not answer for the end offsets: {exc}") from exc
    finally:
        consumer.close()


def _partitions(settings: Settings, topic: str) -> int:
    partitions = len(topic_ends(settings, [topic], wait_s=20.0)[topic])
    if not partitions:
        raise RestoreError(f"Kafka names no partitions for topic {topic!r}")
    return partitions


def group_members(settings: Settings, group_id: str, timeout_s: float = 10.0) -> int:
    """How many members the consumer group has now (0: no worker of that app is running)."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.helpers import create_ssl_context

    options = {k: v for k, v in settings.kafka_client_options().items() if k != "ssl_cafile"}
    if settings.kafka_ssl_cafile:
        options["ssl_context"] = create_ssl_context(cafile=settings.kafka_ssl_cafile)

    async def describe() -> int:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id="crisiswatch-restore",
                                    request_timeout_ms=int(timeout_s * 1000), **options)
        await admin.start()
        try:
            responses = await admin.describe_consumer_groups([group_id])
        finally:
            await admin.close()
        members = 0
        for response in responses:
            for group in response.to_object()["groups"]:
                if group["group"] == group_id:
                    members += len(group["members"])
        return members

    try:
        return asyncio.run(asyncio.wait_for(describe(), timeout_s * 2))
    except Exception as exc:  # aiokafka's errors and the timeout share no narrower base class
        raise RestoreError(f"cannot describe consumer group {group_id!r} on Kafka: {exc!r}") from exc


def _refuse_while_workers_run(settings: Settings, targets: RestoreTargets) -> None:
    members = group_members(settings, targets.app_id)
    if members:
        raise WorkersActive(f"{members} worker(s) of group {targets.app_id!r} are running; stop them first "
                            "(restore writes the citizen states they would recover at start)")


def publish_plan(settings: Settings, plan: RecoveryPlan, targets: RestoreTargets, changelog_partitions: int) -> None:
    """Crisis events, citizens, then the states into the changelog, each acknowledged by Kafka (acks=all)."""
    records = [*(outgoing(c, targets.crisis_events) for c in plan.crisis_events),
               *(outgoing(c, targets.citizens) for c in plan.citizens),
               *state_records(plan.states, targets.changelog, changelog_partitions)]
    publisher = Publisher(settings, client_id="crisiswatch-restore", max_batch_bytes=settings.producer_max_batch_bytes)
    try:
        for start in range(0, len(records), PUBLISH_CHUNK):
            publisher.publish(records[start:start + PUBLISH_CHUNK])
    except BrokerUnavailable as exc:
        raise RestoreError(str(exc)) from exc
    finally:
        publisher.close()


# --- entry points ------------------------------------------------------------------------------


def _republish(settings: Settings, plan: RecoveryPlan, recorded: Recorded, targets: RestoreTargets) -> RestoreReport:
    publish_plan(settings, plan, targets, _partitions(settings, targets.changelog))
    report = RestoreReport.of(plan, len(recorded.skipped))
    log.info("%s", report.line())
    return report


def restore(settings: Settings, *, clock: Clock = utc_now, targets: RestoreTargets | None = None,
            future_tolerance: timedelta | None = None) -> RestoreReport:
    """Republish from PostgreSQL unconditionally (after data loss). Refuses while workers run."""
    targets = targets or RestoreTargets()
    _ensure_topics(settings, targets)
    _refuse_while_workers_run(settings, targets)
    plan, recorded = plan_from_postgres(settings, clock(), future_tolerance)
    return _republish(settings, plan, recorded, targets)


def broker_holds_data(settings: Settings, targets: RestoreTargets) -> bool:
    """Whether the crisis log or the worker's changelog holds anything: then the broker did not lose them
    (a topic that does not exist holds nothing)."""
    ends = topic_ends(settings, [targets.crisis_events, targets.changelog])
    return any(end > 0 for per_partition in ends.values() for end in per_partition.values())


def restore_if_needed(settings: Settings, *, clock: Clock = utc_now, targets: RestoreTargets | None = None,
                      future_tolerance: timedelta | None = None) -> RestoreReport | None:
    """Restore only on a broker that lacks the data (crisis log and changelog empty) while PostgreSQL
    holds something to restore; None otherwise. Call it before any worker starts."""
    targets = targets or RestoreTargets()
    _ensure_topics(settings, targets)
    if broker_holds_data(settings, targets):
        log.info("no restore: %s or %s already holds records", targets.crisis_events, targets.changelog)
        return None
    plan, recorded = plan_from_postgres(settings, clock(), future_tolerance)
    if plan.empty:
        log.info("no restore: PostgreSQL holds no crisis, citizen or location")
        return None
    _refuse_while_workers_run(settings, targets)
    return _republish(settings, plan, recorded, targets)
