"""The accountability agent's work, without Faust: facts in, per-crisis ``crisis-status/1`` out.

The agent (two Faust agents in :mod:`pipeline.accountability_app`, run by ``crisiswatch
accountability``, a process of its own) reads ``warnings``, ``deliveries``, ``acks`` and ``cases``, all
keyed by citizen, and re-keys them by crisis so that one partition — one accountability process — owns
each crisis. The re-keying is explicit (:func:`rekey`, then a send to
``crisiswatch-accountability-by-crisis-repartition``) rather than Faust's ``group_by``, whose key
function runs where bad data has no path but a crash: here a message is decoded once, a bad one is
skipped or dead-lettered before it goes anywhere, and what is forwarded is the fact's own compact
encoding. The second agent folds the re-keyed facts: its citizens' standings (:class:`pipeline.domain.accountability.Standing`)
live in the ``accountability`` table under ``<crisis>\\x1f<citizen>``, next to each other, and the
crisis's counts are derived from them. Why not in the worker, where it first ran: see
:mod:`pipeline.accountability_app` (it slowed every check-in down).

Counts are *derived*, never kept as running totals: when a crisis is due (changed, and not published
for ``CRISISWATCH_STATUS_INTERVAL_S``), its standings are counted from the table. A restarted or
rebalanced accountability process recovers the table and counts the same numbers; nothing else needs recovering
(every crisis it owns is marked due after a recovery, so the stored status catches up). A broker that lost
its data lost the table's changelog too: ``crisiswatch restore`` writes it again from PostgreSQL
(:func:`pipeline.restore.restore_standings`) before the process starts.

Which fact a message is comes from the ``schema`` it names (every event names one; ``cases`` carries
only ``case/1``). Failure policy (:mod:`pipeline.stage`): a message that is not a valid fact is
skipped and counted (the router dead-letters bad warnings, the sink bad acks, the cases' owner bad
cases) — except a bad ``delivery/1``, which only this agent reads: it is dead-lettered here. Replays are harmless:
every transition is idempotent.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from pipeline import topics
from pipeline.domain.accountability import Escalation, Fact, RateLimit, Standing, apply, count
from pipeline.domain.validation import DEFAULT_RULES, EventRules, decode_event
from pipeline.stage import map_isolated
from schemas import Ack, CrisisStatus, Delivery, InvalidEvent, Warning, encode

log = logging.getLogger(__name__)

SEPARATOR: Final = "\x1f"
STAGE: Final = "accountability"


@dataclass(frozen=True, slots=True)
class Topics:
    warnings: str = topics.WARNINGS
    deliveries: str = topics.DELIVERIES
    acks: str = topics.ACKS
    cases: str = topics.CASES

    def all(self) -> tuple[str, ...]:
        return (self.warnings, self.deliveries, self.acks, self.cases)


CASE_SCHEMA: Final = "case/1"
_MODELS: Final[dict[str, type[Warning | Delivery | Ack]]] = {
    Warning.SCHEMA: Warning, Delivery.SCHEMA: Delivery, Ack.SCHEMA: Ack}


def schema_of(raw: bytes | None) -> str:
    """The ``schema`` a message names ("" when it names none or is not JSON): the re-keyed stream no
    longer says which topic a message came from, its schema does."""
    try:
        obj = json.loads(raw or b"")
    except (ValueError, RecursionError):
        return ""
    name = obj.get("schema") if isinstance(obj, dict) else None
    return name if isinstance(name, str) else ""


def decode_fact(raw: bytes | None, now: datetime, rules: EventRules = DEFAULT_RULES) -> Fact | None:
    """A message as an accountability fact, by the schema it names; None for a case that is not an
    escalation of a crisis. Raises (:class:`InvalidEvent`, or anything the decoding raises) when it
    is not a valid fact."""
    if not raw:
        raise InvalidEvent("empty message")
    name = schema_of(raw)
    if name == CASE_SCHEMA:  # case/1 is the cases' owner's contract: only the fields read here are checked
        case = json.loads(raw)
        if case.get("kind") != "escalation" or not isinstance(case.get("crisis_id"), str):
            return None
        if not isinstance(case.get("citizen_id"), str):
            raise InvalidEvent("missing citizen_id", "$.citizen_id")
        return Escalation(case["citizen_id"], case["crisis_id"])
    model = _MODELS.get(name)
    if model is None:
        raise InvalidEvent(f"not a fact the accountability agent reads: schema {name!r}", "$.schema")
    return decode_event(raw, model, now, rules)


@dataclass(frozen=True, slots=True)
class Rekeyed:
    """A fact ready for the re-keyed topic: the crisis as key, and the fact's own compact encoding (so
    what travels on is bounded and valid, whatever the source message carried besides)."""

    key: bytes
    value: bytes


def rekey(raw: bytes | None, now: datetime) -> Rekeyed | Exception | None:
    """The first half of the agent: a source message as a re-keyed fact, None when it is no fact this
    agent counts (a case that is not an escalation), or the exception that makes it invalid."""
    decoded = map_isolated([raw], lambda r: decode_fact(r, now))
    if decoded.failures:
        return decoded.failures[0].error
    fact = decoded.results[0]
    if fact is None:
        return None
    if isinstance(fact, Escalation):
        value = json.dumps({"schema": CASE_SCHEMA, "kind": "escalation", "citizen_id": fact.citizen_id,
                            "crisis_id": fact.crisis_id}, separators=(",", ":")).encode("utf-8")
    else:
        value = encode(fact)
    return Rekeyed(fact.crisis_id.encode("utf-8"), value)


def state_key(crisis_id: str, citizen_id: str) -> str:
    return f"{crisis_id}{SEPARATOR}{citizen_id}"


class AccountabilityRuntime:
    """Folds facts into standings (``states``: the table, seen as a mapping of key to JSON) and says
    which crises' statuses are due. ``monotonic`` drives the rate limit; ``owns`` says whether a crisis
    is this process's (its partition of the re-keyed stream is assigned here).

    A status is counted only from a table that has finished recovering: none is due from the moment a
    rebalance begins (:meth:`recovering`) until the table is recovered (:meth:`recovered`), since a
    table still reading its changelog holds only part of a crisis's standings and would publish lower
    counts over the right ones."""

    def __init__(self, states: MutableMapping[str, Any], interval_s: float, monotonic: Callable[[], float],
                 owns: Callable[[str], bool] = lambda crisis_id: True, *, ready: bool = True) -> None:
        self.states = states
        self.limit = RateLimit(interval_s)
        self.monotonic = monotonic
        self.owns = owns
        self.ready = ready
        self.dirty: set[str] = set()
        self.skipped = 0

    def observe(self, raw: bytes | None, now: datetime) -> tuple[str, Any] | Exception | None:
        """Apply one message; returns the changed ``(key, state JSON)`` to persist, None when nothing
        changed, or the exception that makes it no fact (the caller skips or dead-letters it)."""
        decoded = map_isolated([raw], lambda r: decode_fact(r, now))
        if decoded.failures:
            self.skipped += 1
            return decoded.failures[0].error
        fact = decoded.results[0]
        if fact is None:
            return None
        key = state_key(fact.crisis_id, fact.citizen_id)
        stored = self.states.get(key)
        before = Standing() if stored is None else Standing.from_json(stored)
        after = apply(before, fact)
        if after == before:
            return None
        value = after.to_json()
        self.states[key] = value
        self.dirty.add(fact.crisis_id)
        return key, value

    def crises(self) -> Iterator[str]:
        return iter({key.split(SEPARATOR, 1)[0] for key in list(self.states)})

    def mark_all(self) -> None:
        """After a recovery: every crisis this process holds is published again (once due)."""
        self.dirty.update(self.crises())

    def recovering(self) -> None:
        """A rebalance began: the table may be about to read changelog partitions; nothing is due until
        :meth:`recovered`."""
        self.ready = False

    def recovered(self) -> None:
        """The table finished recovering: the standings of crises this process no longer owns are
        dropped (their new owner publishes them; kept here they would be counted stale), and every crisis
        it owns is published again, once due."""
        prefixes = {crisis_id for crisis_id in self.crises() if not self.owns(crisis_id)}
        if prefixes:
            for key in [k for k in list(self.states) if k.split(SEPARATOR, 1)[0] in prefixes]:
                del self.states[key]
            self.dirty -= prefixes
        self.mark_all()
        self.ready = True

    def status(self, crisis_id: str, as_of: datetime) -> CrisisStatus:
        prefix = crisis_id + SEPARATOR
        return count(Standing.from_json(value) for key, value in list(self.states.items())
                     if key.startswith(prefix)).status(crisis_id, as_of)

    def due(self, as_of: datetime) -> list[CrisisStatus]:
        """The statuses to publish now: crises changed since their last status and not rate-limited.
        They count as sent at once (a fact arriving while they are sent makes the crisis due again);
        a status that cannot be sent ends the process (:func:`pipeline.app.finish_or_exit`), and the
        recovery marks every crisis due again."""
        if not self.ready:
            return []
        now = self.monotonic()
        ready = [c for c in sorted(self.dirty) if self.owns(c) and self.limit.due(c, now)]
        for crisis_id in ready:
            self.dirty.discard(crisis_id)
            self.limit.sent(crisis_id, now)
        return [self.status(c, as_of) for c in ready]
