"""Consular cases: how one is opened and how an operator moves it, without I/O.

A case's id is derived from what it is about, so that the same reply, replayed or retried, is the
same case: ``need_help`` and ``escalation`` cases are one per citizen, crisis and kind; an SOS,
which may come outside any crisis and more than once, is one per citizen and moment it was sent.
Every change makes ``updated_at`` move forward (by a microsecond if the clock did not), because the
store keeps the newest version of a case and a change must never look older than what it changes.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Final, cast

from pipeline.domain.countries import countries_for
from schemas.models import Case, CaseKind, CaseState, format_time

STATES: Final = ("open", "assigned", "closed")
MAX_NOTE_CHARS: Final = 2000
_TICK: Final = timedelta(microseconds=1)


class CaseChangeError(ValueError):
    """A change an operator asked for that a case cannot take; the message says why."""

    def __init__(self, reason: str, field: str = "$") -> None:
        super().__init__(reason)
        self.reason, self.field = reason, field


def case_id_for(kind: CaseKind, citizen_id: str, crisis_id: str | None, opened_at: datetime) -> str:
    """The deterministic id of a case (see the module docstring)."""
    parts = [kind, citizen_id, crisis_id or ""]
    if kind == "sos":
        parts.append(format_time(opened_at))
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:24]
    return f"case-{kind.replace('_', '-')}-{digest}"


def country_at(lat: float | None, lon: float | None) -> str | None:
    """The country a point is in (ISO alpha-2), or None at sea, outside the shipped borders or unknown."""
    if lat is None or lon is None:
        return None
    found = countries_for({"type": "Point", "coordinates": [lon, lat]})
    return found[0] if found else None


def new_case(*, kind: CaseKind, citizen_id: str, crisis_id: str | None, country: str | None, lat: float | None,
             lon: float | None, note: str | None, now: datetime) -> Case:
    """An open case, as it is first published."""
    if now.tzinfo is None:
        raise ValueError("naive datetime")
    return Case(case_id_for(kind, citizen_id, crisis_id, now), citizen_id, crisis_id, kind, "open", country, lat, lon,
                (note or "")[:MAX_NOTE_CHARS], now, now)


def change(case: Case, *, state: str, assignee: str | None, note: str | None, now: datetime) -> Case:
    """``case`` moved to ``state`` by an operator. ``assigned`` needs someone (given now, or already
    there); ``open`` again clears the assignee unless one is given; a note replaces the old one."""
    if state not in STATES:
        raise CaseChangeError(f"state must be one of {', '.join(STATES)}, got {state!r}", "$.state")
    if assignee is not None and not assignee.strip():
        raise CaseChangeError("assignee must not be empty", "$.assignee")
    who = assignee.strip() if assignee is not None else (None if state == "open" else case.assignee)
    if state == "assigned" and who is None:
        raise CaseChangeError("an assigned case needs an assignee", "$.assignee")
    if note is not None and len(note) > MAX_NOTE_CHARS:
        raise CaseChangeError(f"note is longer than {MAX_NOTE_CHARS} characters", "$.note")
    return replace(case, state=cast(CaseState, state), assignee=who, note=case.note if note is None else note,
                   updated_at=max(now, case.updated_at + _TICK))
