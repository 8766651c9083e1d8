"""Erasing a citizen everywhere (``DELETE /v1/citizens/{id}``, admin only, audited).

- **PostgreSQL**: one statement (so all or nothing) deletes the citizen's registration, check-in
  history, warnings, deliveries, replies, escalations and cases (with their history).
- **Kafka**: a tombstone (the citizen's key, no value) on ``citizens`` and on ``checkins``. Each comes
  after everything that key carried before on its partition, so the readers apply it in order: the
  sink deletes again what in-flight messages wrote meanwhile, and the worker deletes the citizen's
  tracking state and its changelog record, and forgets their consent (:mod:`pipeline.consent`).
  On a broker with log compaction (``cleanup.policy=compact``) the tombstones also remove the older
  records of the key; on the embedded broker, which has no compaction, and on delete-policy topics,
  the older records stay until the topic's retention removes them (docs/privacy.md).

The erasure is idempotent: erasing again deletes nothing more and publishes the tombstones again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Protocol

from producers.crisis_store import PostgresReader
from producers.publisher import Outgoing

# What is deleted, in the order of the statement (children before the registration).
ERASED_TABLES: Final = ("checkins", "warnings", "deliveries", "acks", "escalations", "cases", "citizens")

_ERASE: Final = ("WITH " + ", ".join(f"gone_{table} AS (DELETE FROM {table} WHERE citizen_id = %(citizen)s RETURNING 1)"
                                     for table in ERASED_TABLES)
                 + " SELECT " + ", ".join(f"(SELECT count(*) FROM gone_{table}) AS {table}" for table in ERASED_TABLES))


@dataclass(frozen=True, slots=True)
class Erased:
    citizen_id: str
    rows: Mapping[str, int]  # rows deleted per table
    tombstones: tuple[str, ...]  # the topics a tombstone was published on

    def to_dict(self) -> dict[str, object]:
        return {"citizen_id": self.citizen_id, "deleted": dict(self.rows), "tombstones": list(self.tombstones)}


class PostgresEraser(PostgresReader):
    def erase(self, citizen_id: str) -> dict[str, int]:
        """Delete every row about the citizen; return the rows deleted per table."""
        [row] = self._with_connection(lambda conn: list(conn.execute(_ERASE, {"citizen": citizen_id}).fetchall()))
        return {table: int(row[table]) for table in ERASED_TABLES}


def tombstones(citizen_id: str, topics: tuple[str, ...]) -> list[Outgoing]:
    """The citizen's key with no value, on each topic (keyed like everything else about them)."""
    return [Outgoing(topic, citizen_id.encode("utf-8"), b"", tombstone=True) for topic in topics]


class Eraser(Protocol):
    def erase(self, citizen_id: str) -> dict[str, int]:
        """Delete every row about the citizen in one transaction; the rows deleted per table."""
        ...
