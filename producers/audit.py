"""The audit log: every operator action — declaring, updating, cancelling a crisis, looking up a citizen,
exporting who is inside a crisis, changing a case, erasing a citizen, reading this log — with who did
it (the API token's name and role) and when, in PostgreSQL (``audit_log``, ``deploy/sql/005_privacy.sql``,
append-only), readable by admins (``GET /v1/audit``).

An entry holds identifiers and counts, never what the action showed: no coordinates, names or contact
details (the log would otherwise become the copy of the registry that nobody erases).

Which actions must be recorded before they happen is the API's decision
(:func:`producers.api.create_app`): reading or erasing personal data is refused (503) when its entry
cannot be written; declaring or cancelling a crisis is not held up by an unreachable database, the
missing entry is logged at ERROR and counted instead — warning people comes first.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Protocol

from producers.crisis_store import PostgresReader
from schemas import format_time

MAX_LISTED_ENTRIES: Final = 1000


@dataclass(frozen=True, slots=True)
class AuditEntry:
    actor: str  # the token's name
    role: str
    action: str  # declare, update, cancel, view_citizen, export, case_change, list_cases, erase, read_audit
    subject: str | None = None  # the crisis, case or citizen acted on
    detail: Mapping[str, Any] = field(default_factory=dict)
    at: datetime | None = None  # set by the database when written

    def to_dict(self) -> dict[str, Any]:
        return {"at": None if self.at is None else format_time(self.at), "actor": self.actor, "role": self.role,
                "action": self.action, "subject": self.subject, "detail": dict(self.detail)}


class AuditLog(Protocol):
    def record(self, entry: AuditEntry) -> None:
        """Write one entry; raises :class:`~producers.crisis_store.StoreUnavailable` if it cannot."""
        ...

    def entries(self, *, since: datetime | None, action: str | None, subject: str | None,
                limit: int = MAX_LISTED_ENTRIES) -> list[AuditEntry]:
        """Entries, newest first, filtered by time, action and subject."""
        ...


class PostgresAuditLog(PostgresReader):
    def record(self, entry: AuditEntry) -> None:
        self._rows("INSERT INTO audit_log (actor, role, action, subject, detail) VALUES (%s, %s, %s, %s, %s::jsonb) "
                   "RETURNING audit_id",
                   (entry.actor, entry.role, entry.action, entry.subject, json.dumps(dict(entry.detail))))

    def entries(self, *, since: datetime | None, action: str | None, subject: str | None,
                limit: int = MAX_LISTED_ENTRIES) -> list[AuditEntry]:
        rows = self._rows("SELECT at, actor, role, action, subject, detail FROM audit_log "
                          "WHERE (%s::timestamptz IS NULL OR at >= %s) AND (%s::text IS NULL OR action = %s) "
                          "AND (%s::text IS NULL OR subject = %s) ORDER BY at DESC, audit_id DESC LIMIT %s",
                          (since, since, action, action, subject, subject, limit))
        return [AuditEntry(r["actor"], r["role"], r["action"], r["subject"], dict(r["detail"]), r["at"].astimezone(UTC))
                for r in rows]


@dataclass
class MemoryAuditLog:
    """The in-memory twin, for unit tests of the API."""

    kept: list[AuditEntry] = field(default_factory=list)
    available: bool = True

    def record(self, entry: AuditEntry) -> None:
        from producers.crisis_store import StoreUnavailable

        if not self.available:
            raise StoreUnavailable("PostgreSQL is unavailable: test")
        self.kept.append(AuditEntry(entry.actor, entry.role, entry.action, entry.subject, entry.detail,
                                    datetime.now(UTC)))

    def entries(self, *, since: datetime | None, action: str | None, subject: str | None,
                limit: int = MAX_LISTED_ENTRIES) -> list[AuditEntry]:
        found = [e for e in reversed(self.kept) if (since is None or (e.at is not None and e.at >= since))
                 and (action is None or e.action == action) and (subject is None or e.subject == subject)]
        return found[:limit]
