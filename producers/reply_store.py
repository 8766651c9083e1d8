"""What the API looks up in PostgreSQL before it accepts a reply, an SOS or a change to a case.

A reply is stored only for a citizen and a crisis the registry knows, an SMS is matched to the
citizen who registered its number and to the latest active crisis they were warned about, and an
operator changes the case as it is stored. The sink is the only writer; these are reads, on the
lazy, short-timeout connection of :class:`producers.crisis_store.PostgresReader` (an unreachable
database is :class:`~producers.crisis_store.StoreUnavailable`, answered 503).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Protocol

from producers.crisis_store import PostgresReader
from schemas import Case

MAX_LISTED_CASES: Final = 500
_CASE_COLUMNS: Final = ("case_id, citizen_id, crisis_id, kind, state, assignee, country, lat, lon, note, opened_at, "
                        "updated_at")


@dataclass(frozen=True, slots=True)
class Known:
    citizen: bool
    crisis: bool


class ReplyStore(Protocol):
    def known(self, citizen_id: str, crisis_id: str | None) -> Known:
        """Whether the registry holds the citizen and the crisis (a None crisis counts as known)."""
        ...

    def citizen_by_sms(self, number: str) -> str | None:
        """The citizen with an sms channel whose number, in E.164, is ``number``."""
        ...

    def latest_warned_crisis(self, citizen_id: str, now: datetime) -> str | None:
        """The crisis, still active at ``now``, the citizen was most recently warned about."""
        ...

    def last_location(self, citizen_id: str, crisis_id: str | None) -> tuple[float, float] | None:
        """Where the citizen was last known to be: the location their latest warning about the crisis
        used, else their latest check-in."""
        ...

    def case(self, case_id: str) -> Case | None: ...

    def cases(self, state: str | None, limit: int = MAX_LISTED_CASES) -> list[Case]:
        """Cases, most recently changed first, in one state or all."""
        ...


class PostgresReplyStore(PostgresReader):
    def known(self, citizen_id: str, crisis_id: str | None) -> Known:
        [row] = self._rows("SELECT EXISTS (SELECT 1 FROM citizens WHERE citizen_id = %s) AS citizen, "
                           "(%s::text IS NULL OR EXISTS (SELECT 1 FROM crises WHERE crisis_id = %s)) AS crisis",
                           (citizen_id, crisis_id, crisis_id))
        return Known(bool(row["citizen"]), bool(row["crisis"]))

    def citizen_by_sms(self, number: str) -> str | None:
        rows = self._rows("SELECT citizen_id FROM citizens WHERE crisiswatch_sms_numbers(channels) @> ARRAY[%s]::text[] "
                          "ORDER BY updated_at DESC, citizen_id LIMIT 1", (number,))
        return str(rows[0]["citizen_id"]) if rows else None

    def latest_warned_crisis(self, citizen_id: str, now: datetime) -> str | None:
        rows = self._rows("SELECT w.crisis_id FROM warnings w JOIN crises_current c ON c.crisis_id = w.crisis_id "
                          "WHERE w.citizen_id = %s AND w.kind <> 'all_clear' AND c.op <> 'cancel' "
                          "AND (c.expires IS NULL OR c.expires > %s) ORDER BY w.emitted_at DESC LIMIT 1",
                          (citizen_id, now))
        return str(rows[0]["crisis_id"]) if rows else None

    def last_location(self, citizen_id: str, crisis_id: str | None) -> tuple[float, float] | None:
        rows = self._rows("(SELECT lat, lon, 0 AS rank, emitted_at AS at FROM warnings "
                          " WHERE citizen_id = %s AND crisis_id = %s ORDER BY emitted_at DESC LIMIT 1) "
                          "UNION ALL (SELECT lat, lon, 1, observed_at FROM checkins WHERE citizen_id = %s "
                          " ORDER BY observed_at DESC LIMIT 1) ORDER BY rank LIMIT 1",
                          (citizen_id, crisis_id, citizen_id))
        return (float(rows[0]["lat"]), float(rows[0]["lon"])) if rows else None

    def case(self, case_id: str) -> Case | None:
        rows = self._rows(f"SELECT {_CASE_COLUMNS} FROM cases WHERE case_id = %s", (case_id,))
        return _case(rows[0]) if rows else None

    def cases(self, state: str | None, limit: int = MAX_LISTED_CASES) -> list[Case]:
        rows = self._rows(f"SELECT {_CASE_COLUMNS} FROM cases WHERE (%s::text IS NULL OR state = %s) "
                          "ORDER BY updated_at DESC, case_id LIMIT %s", (state, state, limit))
        return [_case(row) for row in rows]


def _case(row: dict[str, Any]) -> Case:
    return Case(row["case_id"], row["citizen_id"], row["crisis_id"], row["kind"], row["state"], row["country"],
                row["lat"], row["lon"], row["note"], row["opened_at"].astimezone(UTC),
                row["updated_at"].astimezone(UTC), row["assignee"])
