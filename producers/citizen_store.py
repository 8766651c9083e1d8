"""What the API reads of the registry about citizens: consent, and — minimised — where a citizen is.

Data minimisation: an operator sees a citizen's individual location only while that citizen is inside
or near an active crisis (their latest warning about it is ``inside``, ``entered`` or ``near``): that is
what the location is for. Otherwise the answer says the location is withheld, and the accountability
views give counts (:mod:`producers.crisis_store`). A citizen without location_tracking consent has no
location stored at all (``deploy/sql/005_privacy.sql``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime
from typing import Any, Final, Protocol

from producers.crisis_store import PostgresReader
from schemas import format_time

PRESENT_KINDS: Final = ("inside", "entered", "near")
_ACTIVE: Final = "c.op <> 'cancel' AND (c.expires IS NULL OR c.expires > %s)"


class CitizenStore(Protocol):
    def untracked(self, citizen_ids: Sequence[str]) -> set[str]:
        """The citizens among ``citizen_ids`` registered without location_tracking consent."""
        ...

    def citizen(self, citizen_id: str, now: datetime) -> dict[str, Any] | None:
        """The registration and, only where they are inside or near an active crisis, the location."""
        ...



class PostgresCitizenStore(PostgresReader):
    def untracked(self, citizen_ids: Sequence[str]) -> set[str]:
        rows = self._rows("SELECT citizen_id FROM citizens WHERE citizen_id = ANY(%s) AND NOT location_tracking",
                          (list(citizen_ids),))
        return {str(r["citizen_id"]) for r in rows}

    def citizen(self, citizen_id: str, now: datetime) -> dict[str, Any] | None:
        found = self._rows("SELECT citizen_id, name, nationality, language, channels, emergency_contacts, "
                           "location_tracking, trip_country, trip_from, trip_until, updated_at FROM citizens "
                           "WHERE citizen_id = %s", (citizen_id,))
        if not found:
            return None
        row = found[0]
        presence = self._rows(
            "SELECT * FROM (SELECT DISTINCT ON (w.crisis_id) w.crisis_id, c.title, w.kind, w.distance_km, w.lat, "
            "w.lon, w.observed_at FROM warnings w JOIN crises_current c USING (crisis_id) "
            f"WHERE w.citizen_id = %s AND w.kind <> 'pre_arrival' AND {_ACTIVE} "
            "ORDER BY w.crisis_id, w.emitted_at DESC) latest WHERE kind = ANY(%s) ORDER BY observed_at DESC",
            (citizen_id, now, list(PRESENT_KINDS)))
        trip = None if row["trip_country"] is None else {
            "country": row["trip_country"], "from": _day(row["trip_from"]), "until": _day(row["trip_until"])}
        return {"citizen_id": row["citizen_id"], "name": row["name"], "nationality": row["nationality"],
                "language": row["language"], "channels": row["channels"], "emergency_contacts": row["emergency_contacts"],
                "consent": {"location_tracking": bool(row["location_tracking"])}, "trip": trip,
                "updated_at": format_time(row["updated_at"].astimezone(UTC)),
                "crises": [_presence(p) for p in presence],
                "location": _location(presence[0]) if presence else None,
                **({} if presence else {"location_withheld": "not inside or near an active crisis"})}


def _day(value: date | None) -> str | None:
    return None if value is None else value.isoformat()


def _location(row: dict[str, Any]) -> dict[str, Any]:
    return {"lat": float(row["lat"]), "lon": float(row["lon"]),
            "observed_at": format_time(row["observed_at"].astimezone(UTC))}


def _presence(row: dict[str, Any]) -> dict[str, Any]:
    return {"crisis_id": row["crisis_id"], "title": row["title"], "kind": row["kind"],
            "distance_km": float(row["distance_km"]), **_location(row)}
