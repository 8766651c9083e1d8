"""Escalation of the silent and pre-arrival warnings: a periodic sweep over PostgreSQL, run in the
dispatcher's process (``crisiswatch dispatch``, which ``up`` starts) every
``CRISISWATCH_ESCALATION_INTERVAL_S``.

Why a sweep over the tables and not another consumer: both rules are about *time passing* (no reply
for an hour) and about *the registry* (a trip registered weeks before a crisis), not about a message
arriving; the tables the sink writes — warnings, acks, crises, citizens — hold exactly what they
need. The decisions are :mod:`pipeline.domain.escalation`'s; the clock is injected.

- **Escalation.** For each citizen whose latest warning of an active crisis says they are inside or
  near and who has not replied: after T1 the latest warning is published again on ``warnings`` with
  the header ``crisiswatch-resend: next-channel`` — the dispatcher sends it through the channel after
  the one that delivered it (:func:`pipeline.domain.delivery.plan_resend`), once in effect; after T2 a
  case of kind ``escalation`` is opened (:func:`producers.cases.open_case`). The level reached is
  stored in ``escalations`` *after* the step was acknowledged by Kafka: a crash in between repeats the
  step (the re-send is idempotent; the case may be opened twice — at least once, never lost).
- **Pre-arrival.** For each citizen whose registered trip goes to a country of an active severe or
  extreme crisis and has not begun yet (departure after today), and who has no warning of that crisis yet: a ``pre_arrival``
  warning, with the deterministic id of (citizen, crisis) — found again by the next sweep until the
  sink has stored it, it is still one warning, delivered once.
- **In country.** Likewise, a citizen without location_tracking consent (never geofenced) whose trip
  is under way in a country of an active severe or extreme crisis: an ``in_country`` warning, once.

Several dispatchers may run: one sweep at a time, whoever holds the PostgreSQL advisory lock.
An outage (PostgreSQL, Kafka) ends the sweep; the next one starts over from the tables.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from pipeline import topics
from pipeline.domain.escalation import (
    ESCALATED_KINDS,
    Rule,
    due,
    in_country_due,
    in_country_id,
    parse_rules,
    pre_arrival_due,
    pre_arrival_id,
)
from pipeline.domain.messages import instruction_for
from producers.cases import open_case
from producers.publisher import Outgoing, Publisher
from schemas import Crisis, Warning, encode

log = logging.getLogger(__name__)

SWEEP_LOCK: Final = 7_731_020  # the advisory lock one sweep holds

_WARNING_COLUMNS: Final = ("warning_id, citizen_id, crisis_id, crisis_version, kind, severity, title, instruction, "
                           "distance_km, lat, lon, observed_at, emitted_at, country_codes")

SILENT_SQL: Final = f"""
WITH active AS (
    SELECT crisis_id, severity FROM crises_current WHERE op <> 'cancel' AND (expires IS NULL OR expires > %(now)s)
), latest AS (
    SELECT DISTINCT ON (w.crisis_id, w.citizen_id) w.* FROM warnings w JOIN active USING (crisis_id)
    ORDER BY w.crisis_id, w.citizen_id, w.emitted_at DESC, w.warning_id DESC
), first AS (
    SELECT w.crisis_id, w.citizen_id, min(w.emitted_at) AS warned_at FROM warnings w JOIN active USING (crisis_id)
    WHERE w.kind <> 'all_clear' GROUP BY w.crisis_id, w.citizen_id
)
SELECT {", ".join("latest." + c.strip() for c in _WARNING_COLUMNS.split(","))},
       active.severity AS crisis_severity, first.warned_at, COALESCE(e.level, 0) AS level
FROM latest JOIN active USING (crisis_id) JOIN first USING (crisis_id, citizen_id)
LEFT JOIN escalations e USING (crisis_id, citizen_id)
WHERE latest.kind = ANY(%(kinds)s) AND COALESCE(e.level, 0) < 2
  AND NOT EXISTS (SELECT 1 FROM acks a WHERE a.crisis_id = latest.crisis_id AND a.citizen_id = latest.citizen_id)
ORDER BY latest.crisis_id, latest.citizen_id
"""

TRAVELLERS_SQL: Final = """
SELECT ci.citizen_id, ci.trip_country, ci.trip_from, ci.trip_until, ci.location_tracking,
       k.crisis_id, k.version, k.op, k.source, k.source_ref, k.title,
       k.category, k.severity, k.urgency, k.certainty, k.geometry, k.buffer_km, k.country_codes, k.effective, k.expires,
       k.instruction, k.url
FROM crises_current k JOIN citizens ci ON ci.trip_country = ANY(k.country_codes)
WHERE k.op <> 'cancel' AND (k.expires IS NULL OR k.expires > %(now)s) AND k.severity IN ('severe', 'extreme')
  AND (ci.trip_from > %(today)s OR NOT ci.location_tracking) AND (ci.trip_until IS NULL OR ci.trip_until >= %(today)s)
  AND NOT EXISTS (SELECT 1 FROM warnings w WHERE w.crisis_id = k.crisis_id AND w.citizen_id = ci.citizen_id)
ORDER BY k.crisis_id, ci.citizen_id
"""


@dataclass(frozen=True, slots=True)
class Sweep:
    """What one sweep did (``ran`` False: another process held the sweep)."""

    ran: bool
    resent: int = 0
    cases: int = 0
    pre_arrival: int = 0
    in_country: int = 0


class Escalator:
    def __init__(self, database_url: str, publisher: Publisher, rules: dict[str, Rule], clock: Callable[[], datetime],
                 *, warnings_topic: str = topics.WARNINGS, connect_timeout_s: int = 5) -> None:
        self.database_url = database_url
        self.publisher = publisher
        self.rules = rules
        self.clock = clock
        self.warnings_topic = warnings_topic
        self.connect_timeout_s = connect_timeout_s
        self._conn: Any = None

    def _connection(self) -> Any:
        import psycopg
        from psycopg.rows import dict_row

        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.database_url, autocommit=True, connect_timeout=self.connect_timeout_s,
                                         application_name="crisiswatch-escalate", row_factory=dict_row)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def sweep(self) -> Sweep:
        """One pass of both rules at the clock's time. Raises an outage error (the caller waits and
        sweeps again); the connection is dropped then."""
        try:
            conn = self._connection()
            if not conn.execute("SELECT pg_try_advisory_lock(%s)", (SWEEP_LOCK,)).fetchone()["pg_try_advisory_lock"]:
                return Sweep(False)
            try:
                now = self.clock()
                resent, cases = self._escalate(conn, now)
                return Sweep(True, resent, cases, *self._by_trip(conn, now))
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (SWEEP_LOCK,))
        except Exception:
            self.close()
            raise

    def _escalate(self, conn: Any, now: datetime) -> tuple[int, int]:
        resent = cases = 0
        rows = conn.execute(SILENT_SQL, {"now": now, "kinds": sorted(ESCALATED_KINDS)}).fetchall()
        for row in rows:
            for step in due(self.rules, row["crisis_severity"], row["warned_at"], False, int(row["level"]), now):
                warning = _warning(row)
                if step == "resend":
                    self.publisher.publish([Outgoing(self.warnings_topic, warning.citizen_id.encode("utf-8"),
                                                     encode(warning),
                                                     ((topics.RESEND_HEADER, topics.RESEND_NEXT_CHANNEL),))])
                    conn.execute("INSERT INTO escalations (crisis_id, citizen_id, level, resent_at) "
                                 "VALUES (%s, %s, 1, %s) ON CONFLICT (crisis_id, citizen_id) DO UPDATE "
                                 "SET level = GREATEST(escalations.level, 1), resent_at = EXCLUDED.resent_at "
                                 "WHERE escalations.level < 1", (warning.crisis_id, warning.citizen_id, now))
                    resent += 1
                    log.info("no reply: warning re-sent through the next channel",
                             extra={"crisis_id": warning.crisis_id, "citizen_id": warning.citizen_id})
                else:
                    case = open_case(self.publisher, kind="escalation", citizen_id=warning.citizen_id,
                                     crisis_id=warning.crisis_id, country=next(iter(warning.country_codes), ""),
                                     lat=warning.lat, lon=warning.lon,
                                     note=f"No reply since the warning of {row['warned_at'].isoformat()}", now=now)
                    conn.execute("INSERT INTO escalations (crisis_id, citizen_id, level, case_opened_at, case_id) "
                                 "VALUES (%s, %s, 2, %s, %s) ON CONFLICT (crisis_id, citizen_id) DO UPDATE "
                                 "SET level = 2, case_opened_at = EXCLUDED.case_opened_at, case_id = EXCLUDED.case_id "
                                 "WHERE escalations.level < 2", (warning.crisis_id, warning.citizen_id, now, case.case_id))
                    cases += 1
                    log.info("no reply: escalated to the embassy", extra={
                        "crisis_id": warning.crisis_id, "citizen_id": warning.citizen_id, "case_id": case.case_id})
        return resent, cases

    def _by_trip(self, conn: Any, now: datetime) -> tuple[int, int]:
        """The warnings due by registered trips: pre-arrival, and in-country for citizens not tracked."""
        today = now.date()
        pre_arrival = in_country = 0
        for row in conn.execute(TRAVELLERS_SQL, {"now": now, "today": today}).fetchall():
            countries = tuple(row["country_codes"] or ())
            trip = (row["trip_country"], row["trip_from"], row["trip_until"], today)
            if pre_arrival_due(row["severity"], countries, *trip):
                warning = pre_arrival_warning(row["citizen_id"], _crisis(row), now)
                pre_arrival += 1
            elif in_country_due(row["severity"], countries, *trip, bool(row["location_tracking"])):
                warning = in_country_warning(row["citizen_id"], _crisis(row), now)
                in_country += 1
            else:
                continue
            self.publisher.publish([Outgoing(self.warnings_topic, warning.citizen_id.encode("utf-8"), encode(warning))])
        return pre_arrival, in_country


def pre_arrival_warning(citizen_id: str, crisis: Crisis, now: datetime) -> Warning:
    """The pre-arrival warning: the citizen is not there yet, so ``lat``/``lon`` are a point of the
    crisis's area (0, 0 for a crisis without one) and ``distance_km`` 0; ``observed_at`` is now."""
    lat = lon = 0.0
    if crisis.geometry is not None:
        from shapely.geometry import shape

        point = shape(crisis.geometry).representative_point()
        lat, lon = float(point.y), float(point.x)
    return Warning(pre_arrival_id(citizen_id, crisis.crisis_id), citizen_id, crisis.crisis_id, crisis.version,
                   "pre_arrival", crisis.severity, crisis.title, instruction_for(crisis, "pre_arrival", 0.0), 0.0,
                   lat, lon, now, now, crisis.country_codes)


def in_country_warning(citizen_id: str, crisis: Crisis, now: datetime) -> Warning:
    """The in-country warning of a citizen not tracked: like the pre-arrival one, no location of theirs
    (a point of the crisis's area, distance 0), since none is known."""
    area = pre_arrival_warning(citizen_id, crisis, now)
    return Warning(in_country_id(citizen_id, crisis.crisis_id), citizen_id, crisis.crisis_id, crisis.version,
                   "in_country", crisis.severity, crisis.title, instruction_for(crisis, "in_country", 0.0), 0.0,
                   area.lat, area.lon, now, now, crisis.country_codes)


def _warning(row: dict[str, Any]) -> Warning:
    return Warning(row["warning_id"], row["citizen_id"], row["crisis_id"], int(row["crisis_version"]), row["kind"],
                   row["severity"], row["title"], row["instruction"], float(row["distance_km"]), float(row["lat"]),
                   float(row["lon"]), row["observed_at"], row["emitted_at"], tuple(row["country_codes"] or ()))


def _crisis(row: dict[str, Any]) -> Crisis:
    return Crisis(row["crisis_id"], row["op"], int(row["version"]), row["source"], row["source_ref"], row["title"],
                  row["category"], row["severity"], row["urgency"], row["certainty"], row["geometry"],
                  float(row["buffer_km"]), tuple(row["country_codes"] or ()), row["effective"], row["expires"],
                  row["instruction"], row["url"])


def run_escalator(escalator: Escalator, interval_s: float, stop: threading.Event,
                  on_outage: Callable[[BaseException], None] = lambda exc: None) -> None:
    """Sweep every ``interval_s`` until ``stop``; an outage is logged and the next sweep tries again."""
    from pipeline.stage import is_infrastructure

    while not stop.wait(interval_s):
        try:
            done = escalator.sweep()
        except Exception as exc:
            if not is_infrastructure(exc):
                log.exception("escalation sweep failed; the next one starts over")
            else:
                on_outage(exc)
                log.warning("escalation sweep interrupted by an outage", extra={"error": repr(exc)})
            continue
        if done.resent or done.cases or done.pre_arrival or done.in_country:
            log.info("escalation sweep", extra={"resent": done.resent, "cases": done.cases,
                                                "pre_arrival": done.pre_arrival, "in_country": done.in_country})
    escalator.close()


def make_escalator(database_url: str, publisher: Publisher, escalation: str, clock: Callable[[], datetime]) -> Escalator:
    return Escalator(database_url, publisher, parse_rules(escalation), clock)
