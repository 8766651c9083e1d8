"""Accountability per crisis, without I/O: who is inside or near, who was warned, reached, who
answered safe or needing help, who could not be reached, who was escalated to the embassy.

After a disaster the crisis centre asks three questions — who is safe, who needs help, whom have we
not reached — and the answers must be numbers an operator can trust. So each citizen is counted
once per crisis, by their *latest* standing, which is a pure fold of what happened to them:

- a **warning** (``warnings``): ``warned`` from any kind but ``all_clear``; ``inside``/``near`` from
  the latest warning's kind (``inside``/``entered`` → inside, ``near`` → near; ``exited``,
  ``all_clear`` and ``pre_arrival`` → neither). "Latest" is by ``(emitted_at, warning_id)``, so a
  warning replayed or arriving late never moves a citizen back;
- a **delivery outcome** (``deliveries``): ``delivered`` once any of their warnings was delivered;
  ``gave_up`` once the dispatcher gave up on every channel of one;
- a **reply** (``acks``): the latest by ``received_at`` decides ``safe`` or ``need_help`` (a tie:
  ``need_help`` wins, the answer that must not be lost);
- an **escalation** (a ``case/1`` of kind ``escalation`` on ``cases``): ``escalated``.

``unreached``: warned, no warning ever delivered, the dispatcher gave up on every channel of one,
and no reply (a citizen who answers has been reached, whatever the channels said).

Every transition is idempotent and order-insensitive where the order can vary (a replayed event
changes nothing), which is what an at-least-once agent needs; the same definitions, written in SQL
over the tables, are :data:`COUNTS_SQL` — the check that the agent's numbers equal PostgreSQL's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Final, Literal

from schemas import Ack, CrisisStatus, Delivery, Warning

Zone = Literal["inside", "near"]

ZONE_OF_KIND: Final[Mapping[str, Zone | None]] = {
    "inside": "inside", "entered": "inside", "near": "near", "exited": None, "all_clear": None, "pre_arrival": None,
    "in_country": None}
COUNT_NAMES: Final = ("inside", "near", "warned", "delivered", "safe", "need_help", "unreached", "escalated")
_ACK_RANK: Final = {"safe": 0, "need_help": 1}


@dataclass(frozen=True, slots=True)
class Standing:
    """What is known of one citizen in one crisis. ``zone_key`` and ``ack_key`` order the latest
    warning and reply seen (ISO instant first, so plain string comparison is time order)."""

    zone: Zone | None = None
    zone_key: str = ""
    warned: bool = False
    delivered: bool = False
    gave_up: bool = False
    ack: str | None = None
    ack_key: str = ""
    escalated: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"zone": self.zone, "zone_key": self.zone_key, "warned": self.warned, "delivered": self.delivered,
                "gave_up": self.gave_up, "ack": self.ack, "ack_key": self.ack_key, "escalated": self.escalated}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Standing:
        return cls(data.get("zone"), str(data.get("zone_key", "")), bool(data.get("warned")),
                   bool(data.get("delivered")), bool(data.get("gave_up")), data.get("ack"),
                   str(data.get("ack_key", "")), bool(data.get("escalated")))

    @property
    def unreached(self) -> bool:
        return self.warned and self.gave_up and not self.delivered and self.ack is None


@dataclass(frozen=True, slots=True)
class Escalation:
    """A case of kind ``escalation`` was opened for this citizen in this crisis."""

    citizen_id: str
    crisis_id: str


Fact = Warning | Delivery | Ack | Escalation


def _key(at: datetime, tiebreak: str) -> str:
    return f"{at.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%S.%f')}|{tiebreak}"


def apply(standing: Standing, fact: Fact) -> Standing:
    """The citizen's standing after ``fact`` (about them and this crisis)."""
    if isinstance(fact, Warning):
        key = _key(fact.emitted_at, fact.warning_id)
        out = standing if standing.warned or fact.kind == "all_clear" else replace(standing, warned=True)
        if key > standing.zone_key:
            out = replace(out, zone=ZONE_OF_KIND.get(fact.kind), zone_key=key)
        return out
    if isinstance(fact, Delivery):
        if fact.outcome == "delivered" and not standing.delivered:
            return replace(standing, delivered=True)
        if fact.outcome == "gave_up" and not standing.gave_up:
            return replace(standing, gave_up=True)
        return standing
    if isinstance(fact, Ack):
        key = _key(fact.received_at, str(_ACK_RANK.get(fact.status, 0)))
        return replace(standing, ack=fact.status, ack_key=key) if key > standing.ack_key else standing
    if isinstance(fact, Escalation):
        return standing if standing.escalated else replace(standing, escalated=True)
    raise TypeError(f"not an accountability fact: {type(fact).__name__}")


def crisis_and_citizen(fact: Fact) -> tuple[str, str]:
    return fact.crisis_id, fact.citizen_id


@dataclass(frozen=True, slots=True)
class Counts:
    inside: int = 0
    near: int = 0
    warned: int = 0
    delivered: int = 0
    safe: int = 0
    need_help: int = 0
    unreached: int = 0
    escalated: int = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNT_NAMES}

    def status(self, crisis_id: str, as_of: datetime) -> CrisisStatus:
        return CrisisStatus(crisis_id, self.inside, self.near, self.warned, self.delivered, self.safe, self.need_help,
                            self.unreached, self.escalated, as_of)


def contribution(standing: Standing) -> Counts:
    """What one citizen adds to their crisis's counts."""
    return Counts(int(standing.zone == "inside"), int(standing.zone == "near"), int(standing.warned),
                  int(standing.delivered), int(standing.ack == "safe"), int(standing.ack == "need_help"),
                  int(standing.unreached), int(standing.escalated))


def count(standings: Iterable[Standing]) -> Counts:
    totals = dict.fromkeys(COUNT_NAMES, 0)
    for standing in standings:
        for name, value in contribution(standing).as_dict().items():
            totals[name] += value
    return Counts(**totals)


class RateLimit:
    """At most one status per crisis per ``interval_s`` (pure: the caller passes the time)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.last: dict[str, float] = {}

    def due(self, crisis_id: str, now: float) -> bool:
        last = self.last.get(crisis_id)
        return last is None or now - last >= self.interval_s

    def sent(self, crisis_id: str, now: float) -> None:
        self.last[crisis_id] = now


# The same definitions over PostgreSQL's tables, for one crisis (%(crisis_id)s). ``deliveries`` holds one
# row per (warning, channel, address): a warning gave up when every one of its rows did.
COUNTS_SQL: Final = """
WITH w AS (
    SELECT citizen_id, bool_or(kind <> 'all_clear') AS warned FROM warnings WHERE crisis_id = %(crisis_id)s
    GROUP BY citizen_id
), zone AS (
    SELECT DISTINCT ON (citizen_id) citizen_id, kind FROM warnings WHERE crisis_id = %(crisis_id)s
    ORDER BY citizen_id, emitted_at DESC, warning_id DESC
), per_warning AS (
    SELECT citizen_id, warning_id, bool_or(status = 'delivered') AS delivered, bool_and(status = 'gave_up') AS gave_up
    FROM deliveries WHERE crisis_id = %(crisis_id)s GROUP BY citizen_id, warning_id
), d AS (
    SELECT citizen_id, bool_or(delivered) AS delivered, bool_or(gave_up) AS gave_up FROM per_warning GROUP BY citizen_id
), a AS (
    SELECT DISTINCT ON (citizen_id) citizen_id, status FROM acks WHERE crisis_id = %(crisis_id)s
    ORDER BY citizen_id, received_at DESC, (status = 'need_help') DESC
), e AS (
    SELECT citizen_id, case_opened_at IS NOT NULL AS escalated FROM escalations WHERE crisis_id = %(crisis_id)s
), everyone AS (
    SELECT citizen_id FROM w UNION SELECT citizen_id FROM d UNION SELECT citizen_id FROM a UNION SELECT citizen_id FROM e
)
SELECT
    count(*) FILTER (WHERE zone.kind IN ('inside', 'entered')) AS inside,
    count(*) FILTER (WHERE zone.kind = 'near') AS near,
    count(*) FILTER (WHERE w.warned) AS warned,
    count(*) FILTER (WHERE d.delivered) AS delivered,
    count(*) FILTER (WHERE a.status = 'safe') AS safe,
    count(*) FILTER (WHERE a.status = 'need_help') AS need_help,
    count(*) FILTER (WHERE w.warned AND d.gave_up AND NOT d.delivered AND a.status IS NULL) AS unreached,
    count(*) FILTER (WHERE e.escalated) AS escalated
FROM everyone
LEFT JOIN w USING (citizen_id) LEFT JOIN zone USING (citizen_id) LEFT JOIN d USING (citizen_id)
LEFT JOIN a USING (citizen_id) LEFT JOIN e USING (citizen_id)
"""
