"""Consular cases on Kafka: ``case/1`` on ``cases`` and ``cases.<CC>`` (DESIGN.md §3).

A minimal version, enough for escalation to open a case; the full one (SOS, need-help replies, the
case states an operator changes, PostgreSQL) replaces it with the same :func:`open_case` signature.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pipeline import topics
from producers.publisher import Outgoing, Publisher
from schemas import format_time


@dataclass(frozen=True, slots=True)
class Case:
    case_id: str
    kind: str
    citizen_id: str
    crisis_id: str | None
    country: str
    lat: float | None
    lon: float | None
    note: str
    opened_at: datetime
    state: str = "open"

    def to_dict(self) -> dict[str, Any]:
        at = format_time(self.opened_at)
        return {"schema": "case/1", "case_id": self.case_id, "citizen_id": self.citizen_id, "crisis_id": self.crisis_id,
                "kind": self.kind, "state": self.state, "country": self.country, "lat": self.lat, "lon": self.lon,
                "note": self.note, "opened_at": at, "updated_at": at}


def open_case(publisher: Publisher, *, kind: str, citizen_id: str, crisis_id: str | None, country: str,
              lat: float | None, lon: float | None, note: str, now: datetime) -> Case:
    """Publish a new open case on ``cases`` and ``cases.<country>``; returns it once Kafka acknowledged."""
    material = "\x1f".join((kind, citizen_id, crisis_id or "", format_time(now)))
    case = Case("case-" + hashlib.blake2b(material.encode("utf-8"), digest_size=16).hexdigest(), kind, citizen_id,
                crisis_id, country, lat, lon, note, now)
    value = json.dumps(case.to_dict(), separators=(",", ":")).encode("utf-8")
    key = citizen_id.encode("utf-8")
    messages = [Outgoing(topics.CASES, key, value)]
    if len(country) == 2 and country.isascii() and country.isalpha():
        messages.append(Outgoing(f"{topics.CASES}.{country.upper()}", key, value))
    publisher.publish(messages)
    return case
