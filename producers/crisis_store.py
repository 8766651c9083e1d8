"""Reading crises back from PostgreSQL for the API's public CAP feed (``/v1/crises/{id}.cap``, ``/v1/cap.atom``);
:class:`PostgresReader` is the connection the API's other lookups (:mod:`producers.reply_store`) share the pattern of.

The sink is the only writer; this reads. One connection, opened on first use (an API without a
reachable database still takes check-ins), with short timeouts so that a slow or absent database
makes a request fail fast (:class:`StoreUnavailable`, answered 503) instead of holding it. A
connection the server dropped is replaced once per call before giving up, so a PostgreSQL restart
costs no failed request. Calls come from the API's thread pool: a lock keeps them off the
connection one at a time (each is a single short query).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Final, Protocol, TypeVar

from pipeline.domain.cap_out import Published
from schemas import Crisis, format_time

T = TypeVar("T")

_COLUMNS: Final = ('crisis_id, version, op, source, source_ref, title, category, severity, urgency, certainty, geometry, '
                   'buffer_km, country_codes, effective, expires, instruction, url, "references", language, status, '
                   'recorded_at')
_COUNTS: Final = ("inside", "near", "warned", "delivered", "safe", "need_help", "unreached", "escalated")
_STATUS_COLUMNS: Final = ("crisis_id, c.title, c.severity, c.country_codes, c.op, c.expires, s.as_of, "
                          + ", ".join(f"s.{name}" for name in _COUNTS))
# The feed lists at most this many crises (the newest): an aggregator polls it, it must stay small.
MAX_FEED_ENTRIES: Final = 500


class StoreUnavailable(Exception):
    """PostgreSQL could not be reached or did not answer in time."""


class CrisisStore(Protocol):
    def versions(self, crisis_id: str) -> list[Published]:
        """Every stored version of one crisis, oldest first; empty when the crisis is unknown."""
        ...

    def active(self, now: datetime) -> list[Published]:
        """The latest version of each crisis neither cancelled nor expired at ``now``."""
        ...

    def statuses(self, now: datetime) -> list[dict[str, Any]]:
        """The active crises (as :meth:`active`) with their latest accountability counts."""
        ...

    def status(self, crisis_id: str) -> dict[str, Any] | None:
        """One crisis's latest accountability counts; None when the crisis is unknown."""
        ...


class PostgresReader:
    """One lazily opened, short-timeout, autocommit connection shared by the API's lookups (see the
    module docstring); subclasses add the queries."""

    def __init__(self, database_url: str, *, connect_timeout_s: int = 3, statement_timeout_ms: int = 5000) -> None:
        self._url = database_url
        self._connect_timeout_s = connect_timeout_s
        self._statement_timeout_ms = statement_timeout_ms
        self._conn: Any = None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _rows(self, query: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        return self._with_connection(lambda conn: list(conn.execute(query, params).fetchall()))

    def _with_connection(self, work: Callable[[Any], T]) -> T:
        import psycopg

        with self._lock:
            for attempt in (1, 2):
                fresh = self._conn is None or self._conn.closed
                try:
                    return work(self._connection())
                except psycopg.OperationalError as exc:
                    self._drop()
                    if fresh or attempt == 2:  # a new connection that fails: the database is away
                        raise StoreUnavailable(_reason(exc)) from None
                except psycopg.Error as exc:
                    self._drop()
                    raise StoreUnavailable(_reason(exc)) from None
        raise AssertionError("unreachable")

    def _connection(self) -> Any:
        import psycopg
        from psycopg.rows import dict_row

        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self._url, autocommit=True, connect_timeout=self._connect_timeout_s,
                                         application_name="crisiswatch-api", row_factory=dict_row,
                                         options=f"-c statement_timeout={self._statement_timeout_ms}")
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # closing a broken connection: nothing left to do
                self._conn.close()
            self._conn = None


class PostgresCrisisStore(PostgresReader):
    def versions(self, crisis_id: str) -> list[Published]:
        return self._query(f"SELECT {_COLUMNS} FROM crises WHERE crisis_id = %s ORDER BY version", (crisis_id,))

    def active(self, now: datetime) -> list[Published]:
        return self._query(f"SELECT {_COLUMNS} FROM crises_current WHERE op <> 'cancel' "
                           "AND (expires IS NULL OR expires > %s) ORDER BY recorded_at DESC, crisis_id LIMIT %s",
                           (now, MAX_FEED_ENTRIES))

    def statuses(self, now: datetime) -> list[dict[str, Any]]:
        return [_status(row) for row in self._rows(
            f"SELECT {_STATUS_COLUMNS} FROM crises_current c LEFT JOIN crisis_status s USING (crisis_id) "
            "WHERE c.op <> 'cancel' AND (c.expires IS NULL OR c.expires > %s) "
            "ORDER BY c.recorded_at DESC, c.crisis_id LIMIT %s", (now, MAX_FEED_ENTRIES))]

    def status(self, crisis_id: str) -> dict[str, Any] | None:
        found = self._rows(f"SELECT {_STATUS_COLUMNS} FROM (SELECT %s AS crisis_id) k "
                           "LEFT JOIN crises_current c USING (crisis_id) LEFT JOIN crisis_status s USING (crisis_id) "
                           "WHERE c.crisis_id IS NOT NULL OR s.crisis_id IS NOT NULL", (crisis_id,))
        return _status(found[0]) if found else None

    def _query(self, query: str, params: Sequence[Any]) -> list[Published]:
        return [_published(row) for row in self._rows(query, params)]


def _reason(exc: Exception) -> str:
    text = str(exc).strip()
    return f"PostgreSQL is unavailable: {text.splitlines()[0] if text else type(exc).__name__}"


def _published(row: dict[str, Any]) -> Published:
    crisis = Crisis(row["crisis_id"], row["op"], int(row["version"]), row["source"], row["source_ref"], row["title"],
                    row["category"], row["severity"], row["urgency"], row["certainty"], row["geometry"],
                    float(row["buffer_km"]), tuple(row["country_codes"]), row["effective"].astimezone(UTC),
                    None if row["expires"] is None else row["expires"].astimezone(UTC), row["instruction"], row["url"],
                    tuple(row["references"]), row["language"], row["status"])
    return Published(crisis, row["recorded_at"].astimezone(UTC))


def _status(row: dict[str, Any]) -> dict[str, Any]:
    """A crisis with its counts, as the API answers it: zeros and ``as_of`` null before the first status."""
    as_of = row["as_of"]
    return {"crisis_id": row["crisis_id"], "title": row["title"], "severity": row["severity"],
            "country_codes": list(row["country_codes"] or ()),
            "active": row["op"] is not None and row["op"] != "cancel",
            **{name: int(row[name] or 0) for name in _COUNTS},
            "as_of": None if as_of is None else format_time(as_of.astimezone(UTC))}
