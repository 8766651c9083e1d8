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
   compact one (:mod:`pipeline.citizens`; JSON keeps these records readable by any tool). The worker's
   table recovery reads them up to the changelog's exact end (:mod:`pipeline.end_offsets`), however
   they were batched.

4. the accountability table's changelog (``crisiswatch-accountability-accountability-changelog``):
   each citizen's standing per crisis, folded again from the warnings, deliveries, replies and
   escalations PostgreSQL holds (:func:`restore_standings`; with ``--if-needed``, only into an empty
   changelog), so a restarted accountability process publishes the counts it published before.

A worker then starts as after any restart: it reads the crisis log, recovers its table, and
reconciles (the all-clears owed for ended crises, ``inside`` for anyone whose last location is in
an active crisis and who was never told).

Restore runs **before the workers start**. A running worker never reads its changelog again and
its next write would overwrite what was restored, so :func:`restore` refuses (:class:`WorkersActive`)
while the worker group has members, and so for the accountability process and its group.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from pipeline import topics
from pipeline.accountability import state_key
from pipeline.accountability_app import internal_topics as accountability_topics
from pipeline.accountability_app import table_changelog_topic as accountability_changelog_topic
from pipeline.app import APP_ID, changelog_topic, partition_of
from pipeline.domain.accountability import Escalation, Fact, Standing
from pipeline.domain.delivery import DeliveryRow
from pipeline.domain.recovery import (
    FUTURE_TOLERANCE,
    RecordedDelivery,
    RecoveryPlan,
    delivery_outcomes,
    plan_recovery,
    rebuild_standings,
)
from pipeline.domain.tracking import CitizenState
from pipeline.end_offsets import topic_end_offsets
from pipeline.settings import Settings
from producers.publisher import BrokerUnavailable, Outgoing, Publisher, outgoing
from schemas import Ack, Checkin, Citizen, Crisis, InvalidEvent, Warning, format_time, from_obj

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
    """Where restored records go: the topics, the worker app whose table changelog is rebuilt, and the
    accountability app whose standings are (by default ``<app id>-accountability``, which for the
    worker's ``crisiswatch`` is the accountability process's ``crisiswatch-accountability``)."""

    crisis_events: str = topics.CRISIS_EVENTS
    citizens: str = topics.CITIZENS
    app_id: str = APP_ID
    accountability_app_id: str | None = None

    @property
    def changelog(self) -> str:
        return changelog_topic(self.app_id)

    @property
    def accountability_id(self) -> str:
        return self.accountability_app_id or f"{self.app_id}-accountability"

    @property
    def accountability_changelog(self) -> str:
        return accountability_changelog_topic(self.accountability_id)


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
    standings: int = 0  # accountability standings written to the accountability table's changelog

    @classmethod
    def of(cls, plan: RecoveryPlan, skipped: int = 0) -> RestoreReport:
        return cls(len(plan.active), len(plan.ended), len(plan.citizens), len(plan.states), plan.warned, skipped)

    def line(self, verb: str = "restored") -> str:
        text = (f"{verb} from PostgreSQL: {self.crises} active crises, {self.citizens} citizens, "
                f"{self.states} citizen states ({self.warned} warned)")
        if self.ended:
            text += f", {self.ended} ended crises for their all-clears"
        if self.standings:
            text += f", {self.standings} accountability standings"
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
    """Each topic's end offset per partition (:mod:`pipeline.end_offsets`; 0 everywhere: empty; no
    partitions: no such topic, after waiting up to ``wait_s`` for the metadata of a topic just created)."""
    from aiokafka.errors import KafkaConnectionError, KafkaError

    options = {**settings.kafka_client_options(), "request_timeout_ms": int(timeout_s * 1000)}
    deadline = time.monotonic() + wait_s
    while True:
        try:
            found = topic_end_offsets(settings.kafka_bootstrap, names, options)
        except KafkaConnectionError as exc:
            raise RestoreError(f"cannot reach Kafka at {settings.kafka_bootstrap}: {exc}") from exc
        except (KafkaError, TimeoutError) as exc:
            raise RestoreError(f"Kafka did not answer for the end offsets: {exc!r}") from exc
        ends: dict[str, dict[int, int]] = {name: {} for name in names}
        for (name, partition), end in sorted(found.items()):
            ends[name][partition] = end
        if all(ends.values()) or time.monotonic() >= deadline:
            return ends
        time.sleep(0.2)


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
    publish_acknowledged(settings, records)


def publish_acknowledged(settings: Settings, records: Sequence[Outgoing]) -> None:
    """Publish in chunks, each acknowledged by Kafka (acks=all) before the next; RestoreError if it fails."""
    publisher = Publisher(settings, client_id="crisiswatch-restore", max_batch_bytes=settings.producer_max_batch_bytes)
    try:
        for start in range(0, len(records), PUBLISH_CHUNK):
            publisher.publish(list(records[start:start + PUBLISH_CHUNK]))
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
    _refuse_while_accountability_runs(settings, targets)
    plan, recorded = plan_from_postgres(settings, clock(), future_tolerance)
    report = _republish(settings, plan, recorded, targets)
    return replace(report, standings=restore_standings(settings, targets))


def _with_standings(report: RestoreReport | None, standings: int) -> RestoreReport | None:
    """The report with the accountability standings restored besides (None: nothing restored at all)."""
    if not standings:
        return report
    return replace(report or RestoreReport(0, 0, 0, 0, 0), standings=standings)


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
        return _with_standings(None, restore_standings(settings, targets, if_needed=True))
    plan, recorded = plan_from_postgres(settings, clock(), future_tolerance)
    if plan.empty:
        log.info("no restore: PostgreSQL holds no crisis, citizen or location")
        return _with_standings(None, restore_standings(settings, targets, if_needed=True))
    _refuse_while_workers_run(settings, targets)
    return _with_standings(_republish(settings, plan, recorded, targets),
                           restore_standings(settings, targets, if_needed=True))


# --- the accountability standings --------------------------------------------------------------
#
# The accountability process (``crisiswatch accountability``) keeps each citizen's standing per crisis
# in a table of its own; a broker that lost its data lost that table's changelog, and a process
# started on it would count only what happens from then on, publishing lower numbers over the right
# ones. PostgreSQL holds every fact it counted: the standings are folded again from those
# (:func:`pipeline.domain.recovery.rebuild_standings`) and written to its changelog as its agent writes
# them, so the restarted process recovers its table and publishes the same counts.


def read_accountability_facts(database_url: str, connect_timeout_s: int = 5) -> list[Fact]:
    """Every fact the accountability process counts, from PostgreSQL, in one repeatable-read snapshot:
    the warnings, each warning's delivery outcome (from its rows in ``deliveries``), the replies, and
    the escalations (a case of kind ``escalation`` in ``cases``, or one the sweep noted in
    ``escalations``: the sweep publishes the case before it notes it, the sink stores it after)."""
    import psycopg
    from psycopg.rows import dict_row

    try:
        with psycopg.connect(database_url, connect_timeout=connect_timeout_s, application_name="crisiswatch-restore",
                             row_factory=dict_row) as conn:
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            conn.read_only = True
            with conn.transaction():
                facts: list[Fact] = [
                    # Only the kind, the time and the id play a part in a standing.
                    Warning(r["warning_id"], r["citizen_id"], r["crisis_id"], r["crisis_version"], r["kind"],
                            "unknown", "", "", r["distance_km"], r["lat"], r["lon"], _utc(r["observed_at"]),
                            _utc(r["emitted_at"]))
                    for r in conn.execute(
                        "SELECT warning_id, citizen_id, crisis_id, crisis_version, kind, distance_km, lat, lon, "
                        "observed_at, emitted_at FROM warnings")]
                facts += delivery_outcomes(
                    RecordedDelivery(r["warning_id"], r["citizen_id"], r["crisis_id"],
                                     DeliveryRow(r["channel"], r["address"], r["status"], r["attempts"]), _utc(r["at"]))
                    for r in conn.execute(
                        "SELECT warning_id, citizen_id, crisis_id, channel, address, status, attempts, "
                        "coalesce(delivered_at, last_attempt_at, created_at) AS at FROM deliveries "
                        "ORDER BY warning_id, created_at, channel, address"))
                facts += [Ack(r["citizen_id"], r["crisis_id"], r["status"], _utc(r["received_at"]), r["channel"])
                          for r in conn.execute("SELECT citizen_id, crisis_id, status, received_at, channel FROM acks")]
                facts += [Escalation(r["citizen_id"], r["crisis_id"]) for r in conn.execute(
                    "SELECT citizen_id, crisis_id FROM cases WHERE kind = 'escalation' AND crisis_id IS NOT NULL "
                    "UNION SELECT citizen_id, crisis_id FROM escalations WHERE case_opened_at IS NOT NULL")]
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RestoreError(f"cannot read PostgreSQL: {reason}") from exc
    return facts


def standings_from_postgres(settings: Settings) -> dict[tuple[str, str], Standing]:
    """Every citizen's standing per crisis, keyed by (crisis id, citizen id), as PostgreSQL's facts give them."""
    return rebuild_standings(read_accountability_facts(settings.database_url.get()))


def standing_records(standings: Mapping[tuple[str, str], Standing], topic: str, partitions: int) -> list[Outgoing]:
    """Standings as the accountability agent writes them to its table's changelog: the key
    ``<crisis>\\x1f<citizen>``, the standing as JSON, in the partition of the crisis (the partition of
    the re-keyed stream the agent read the fact from, keyed by crisis)."""
    return [Outgoing(topic, state_key(crisis_id, citizen_id).encode("utf-8"),
                     json.dumps(standing.to_json(), separators=(",", ":")).encode("utf-8"),
                     partition=partition_of(crisis_id.encode("utf-8"), partitions))
            for (crisis_id, citizen_id), standing in standings.items()]


def accountability_changelog_holds_data(settings: Settings, targets: RestoreTargets) -> bool:
    ends = topic_ends(settings, [targets.accountability_changelog])
    return any(end > 0 for per_partition in ends.values() for end in per_partition.values())


def _refuse_while_accountability_runs(settings: Settings, targets: RestoreTargets) -> None:
    members = group_members(settings, targets.accountability_id)
    if members:
        raise WorkersActive(f"{members} accountability process(es) of group {targets.accountability_id!r} are "
                            "running; stop them first (restore writes the standings they would recover at start)")


def restore_standings(settings: Settings, targets: RestoreTargets | None = None, *, if_needed: bool = False) -> int:
    """Fold the accountability standings again from PostgreSQL and write them to the accountability
    table's changelog (acks=all); how many were written. With ``if_needed``, only into an empty
    changelog. Refuses (:class:`WorkersActive`) while accountability processes run: a running one never
    reads its changelog again and its next write of a standing would overwrite the restored one."""
    from pipeline.embedded import EmbeddedError, create_topics

    targets = targets or RestoreTargets()
    try:
        create_topics(settings.kafka_bootstrap, accountability_topics(targets.accountability_id), settings.partitions,
                      settings.kafka_client_options())
    except EmbeddedError as exc:
        raise RestoreError(str(exc)) from exc
    if if_needed and accountability_changelog_holds_data(settings, targets):
        log.info("no restore of the accountability standings: %s already holds records",
                 targets.accountability_changelog)
        return 0
    standings = standings_from_postgres(settings)
    if not standings:
        return 0
    _refuse_while_accountability_runs(settings, targets)
    records = standing_records(standings, targets.accountability_changelog,
                               _partitions(settings, targets.accountability_changelog))
    publish_acknowledged(settings, records)
    log.info("restored %d accountability standings into %s", len(records), targets.accountability_changelog)
    return len(records)
