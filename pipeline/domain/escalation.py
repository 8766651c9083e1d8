"""Escalation of the silent, and the pre-arrival warning, without I/O.

Nobody who stays silent may be forgotten. For each severity the operator sets two delays
(``CRISISWATCH_ESCALATION``, e.g. ``extreme:15m,1h;severe:1h,6h;moderate:6h,24h``), counted from the
citizen's first warning of the crisis:

- no reply after **T1** → the warning is sent again through the citizen's *next* channel (the one
  after the channel that delivered it: an SMS a person did not see may be an email they read);
- still no reply after **T2** → the embassy is asked to act: a consular case of kind ``escalation``.

Each step happens once per (crisis, citizen): the level reached is stored, and :func:`due` only ever
moves it up. A job that was down past T2 does both steps on its next run, in order. Severities
without a rule (minor, unknown) are not escalated. Time is a parameter, so a test runs hours of
escalation in milliseconds.

The **pre-arrival warning**: a citizen whose registered trip (``citizen/1`` ``trip``) goes to a
country with an active *severe* or *extreme* crisis, and has not begun yet, is warned before departure —
a warning of kind ``pre_arrival`` with a deterministic id per (citizen, crisis), so it is sent once
in effect however often the sweep finds it.

The **in-country warning**: a citizen without location_tracking consent is never geofenced (their
check-ins are refused: :mod:`pipeline.consent`), so they are warned by the country of their registered
trip instead — while the trip lasts, of every active severe or extreme crisis in that country: a
warning of kind ``in_country``, once per (citizen, crisis). Where they are is not known and not guessed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Final, Literal

from pipeline.domain.ids import warning_id
from schemas.models import SEVERITY_RANK

Step = Literal["resend", "open_case"]
LEVEL_OF_STEP: Final[Mapping[Step, int]] = {"resend": 1, "open_case": 2}

DEFAULT_ESCALATION: Final = "extreme:15m,1h;severe:1h,6h;moderate:6h,24h"
PRE_ARRIVAL_MIN_SEVERITY: Final = "severe"
# Kinds that say a citizen is (still) where the danger is: only they are escalated.
ESCALATED_KINDS: Final = frozenset({"inside", "entered", "near"})

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNIT_S: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True, slots=True)
class Rule:
    resend_after: timedelta
    case_after: timedelta


def parse_duration(text: str) -> timedelta:
    """``90s``, ``15m``, ``1.5h``, ``2d``."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"not a duration (like 15m, 1h, 2d): {text!r}")
    return timedelta(seconds=float(match.group(1)) * _UNIT_S[match.group(2)])


def parse_rules(text: str) -> dict[str, Rule]:
    """``severity:T1,T2;...`` → rules by severity. T2 must not be before T1; an empty text means no escalation."""
    rules: dict[str, Rule] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        severity, sep, delays = part.partition(":")
        severity = severity.strip().lower()
        if not sep or severity not in SEVERITY_RANK:
            raise ValueError(f"expected <severity>:<T1>,<T2> with a severity of {sorted(SEVERITY_RANK)}: {part!r}")
        first, comma, second = delays.partition(",")
        if not comma:
            raise ValueError(f"expected two delays, T1,T2: {part!r}")
        rule = Rule(parse_duration(first), parse_duration(second))
        if rule.case_after < rule.resend_after:
            raise ValueError(f"T2 before T1 in {part!r}")
        if severity in rules:
            raise ValueError(f"severity {severity!r} given twice")
        rules[severity] = rule
    return rules


def due(rules: Mapping[str, Rule], severity: str, warned_at: datetime, replied: bool, level: int,
        now: datetime) -> tuple[Step, ...]:
    """The steps due now for one silent citizen, in order; ``level`` is the step already taken (0 none,
    1 re-sent, 2 case opened)."""
    rule = rules.get(severity)
    if replied or rule is None:
        return ()
    waited = now - warned_at
    steps: list[Step] = []
    if level < 1 and waited >= rule.resend_after:
        steps.append("resend")
    if level < 2 and waited >= rule.case_after:
        steps.append("open_case")
    return tuple(steps)


# --- pre-arrival ----------------------------------------------------------------------------------------


def pre_arrival_due(severity: str, crisis_countries: tuple[str, ...], trip_country: str | None,
                    trip_from: date | None, trip_until: date | None, today: date) -> bool:
    """Whether a citizen's trip calls for a pre-arrival warning about this (active) crisis: the trip
    goes to one of its countries, has not begun yet (the warning is for before departure; a citizen
    already there is warned by where they check in), and the crisis is severe or worse."""
    return (trip_country is not None and trip_country in crisis_countries
            and trip_from is not None and trip_from > today
            and (trip_until is None or trip_until >= today)
            and SEVERITY_RANK.get(severity, 0) >= SEVERITY_RANK[PRE_ARRIVAL_MIN_SEVERITY])


def in_country_due(severity: str, crisis_countries: tuple[str, ...], trip_country: str | None,
                   trip_from: date | None, trip_until: date | None, today: date, location_tracking: bool) -> bool:
    """Whether a citizen who is *not tracked* (no location_tracking consent: the pipeline does not know
    where they are) is warned of this (active) crisis by the country of their current trip: the trip has
    begun and not ended, goes to one of the crisis's countries, and the crisis is severe or worse (as for
    the pre-arrival warning: a whole country is told, so only what may be worth it)."""
    return (not location_tracking and trip_country is not None and trip_country in crisis_countries
            and (trip_from is None or trip_from <= today) and (trip_until is None or trip_until >= today)
            and SEVERITY_RANK.get(severity, 0) >= SEVERITY_RANK[PRE_ARRIVAL_MIN_SEVERITY])


def in_country_id(citizen_id: str, crisis_id: str) -> str:
    """One in-country warning per (citizen, crisis), whatever versions the crisis goes through."""
    return warning_id(citizen_id, crisis_id, 1, "in_country")


def pre_arrival_id(citizen_id: str, crisis_id: str) -> str:
    """One pre-arrival warning per (citizen, crisis), whatever versions the crisis goes through."""
    return warning_id(citizen_id, crisis_id, 1, "pre_arrival")
