"""Consent and erasure where citizens are tracked: the worker never geofences a citizen who did not
consent to location tracking, and forgets a citizen who is erased.

Where a citizen is matters only to protect them, and only if they agreed to be followed
(``citizen/1`` ``consent.location_tracking``). Three places hold to that, each on its own:

- the ingest API refuses (422) the check-ins of a citizen the registry knows to be without consent,
  reading the registry through :class:`ConsentCache` (a few seconds old at most);
- the PostgreSQL sink never stores them (a trigger of ``deploy/sql/005_privacy.sql`` refuses the row;
  the sink dead-letters it without its coordinates);
- the worker (this module) does not track them. The ``citizens`` topic is keyed by citizen and
  partitioned like ``checkins``, so the worker that owns a citizen's check-ins also reads their
  registrations: :class:`ConsentGate` keeps the citizens registered without consent in a small table
  (``untracked-citizens``, changelog in Kafka, co-partitioned with ``checkins``) and drops their
  check-ins before they are decoded, counting them. A registration that withdraws consent also makes
  the worker forget the citizen's state (their last location and what they were told).

Such citizens are still warned: by the country of their registered trip (see
:mod:`pipeline.domain.escalation`), not by where they are.

**Erasure.** ``DELETE /v1/citizens/{id}`` (:mod:`producers.erase`) publishes a tombstone (the
citizen's key, no value) on ``citizens`` and on ``checkins``. On ``checkins`` it comes after every
check-in of the citizen (same key, same partition), and the gate answers it by deleting the citizen's
state and its changelog record; on ``citizens`` it removes the citizen from the untracked table. A
tombstone is never a bad message: it is consumed, not dead-lettered.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from pipeline.domain.admission import admit_message
from pipeline.domain.validation import DEFAULT_RULES, EventRules
from pipeline.metrics import WorkerMetrics
from pipeline.runtime import LOCATE, DurableStates, RawMessage
from schemas import Citizen

log = logging.getLogger(__name__)

UNTRACKED_TABLE: Final = "untracked-citizens"
CONSENT_STAGE: Final = "consent"
NO_CONSENT: Final = "no_consent"  # the reason label of check-ins dropped for want of consent
ERASED: Final = "erased"  # the reason label of the erasure tombstones consumed on checkins

# How long the API trusts what the registry said about a citizen's consent. Short: a citizen who
# withdraws consent is refused within this time (and never stored or tracked meanwhile: the sink and
# the worker check for themselves).
CONSENT_CACHE_S: Final = 10.0
CONSENT_CACHE_MAX: Final = 100_000


def citizen_key(message: RawMessage) -> str | None:
    """The citizen a keyed message is about (``checkins`` and ``citizens`` are keyed by citizen id)."""
    if message.key is None:
        return None
    try:
        return message.key.decode("utf-8")
    except UnicodeDecodeError:
        return None


@dataclass(frozen=True, slots=True)
class Admitted:
    """A batch of check-ins once consent and erasure were applied: what goes on to be geofenced, the
    citizens whose check-ins were dropped for want of consent, and the citizens erased."""

    checkins: tuple[RawMessage, ...]
    untracked: tuple[str, ...]
    erased: tuple[str, ...]


def split_checkins(messages: Sequence[RawMessage], untracked: Callable[[str], bool]) -> Admitted:
    """Pure: keep the check-ins of citizens who may be tracked; a tombstone (no value) is an erasure.

    A check-in that comes after its citizen's erasure tombstone in the same batch is kept: it is a new
    check-in (the citizen may register again), and the tombstone is applied before it is geofenced. A
    message with neither key nor value erases nobody: it is kept, to be dead-lettered as empty."""
    kept: list[RawMessage] = []
    dropped: list[str] = []
    erased: list[str] = []
    for message in messages:
        citizen = citizen_key(message)
        if message.value is None and citizen is not None:
            erased.append(citizen)
            continue
        if citizen is not None and untracked(citizen):
            dropped.append(citizen)
            continue
        kept.append(message)
    return Admitted(tuple(kept), tuple(dropped), tuple(dict.fromkeys(erased)))


async def forget_states(states: MutableMapping[str, Any], citizen_ids: Iterable[str]) -> int:
    """Delete the citizens' states (and, for a Faust table, their changelog records: a deletion is a
    null record there); return how many there were. Returns once the deletions are durable."""
    forgotten = 0
    for citizen in citizen_ids:
        if states.get(citizen) is not None:
            del states[citizen]
            forgotten += 1
    if isinstance(states, DurableStates):
        await states.persisted()
    return forgotten


class ConsentGate:
    """The worker's side of consent and erasure (see the module docstring).

    ``untracked``: the table of citizens registered without consent (a Faust table seen as a mapping
    in a worker, a dict in tests); ``forget``: deletes citizens' tracking states, durably, under the
    lock the geofencing holds."""

    def __init__(self, untracked: MutableMapping[str, Any], forget: Callable[[Sequence[str]], Awaitable[int]],
                 metrics: WorkerMetrics, clock: Callable[[], datetime], rules: EventRules = DEFAULT_RULES) -> None:
        self.untracked = untracked
        self.forget = forget
        self.metrics = metrics
        self.clock = clock
        self.rules = rules

    def is_untracked(self, citizen_id: str) -> bool:
        return bool(self.untracked.get(citizen_id))

    async def admit(self, messages: Sequence[RawMessage]) -> list[RawMessage]:
        """The check-ins of a batch that may be geofenced; erasures applied first."""
        admitted = split_checkins(messages, self.is_untracked)
        if admitted.erased:
            forgotten = await self.forget(admitted.erased)
            self.metrics.stage_skipped.labels(stage=LOCATE, reason=ERASED).inc(len(admitted.erased))
            log.info("citizens erased from the worker's state", extra={"citizens": len(admitted.erased),
                                                                        "states_deleted": forgotten})
        if admitted.untracked:
            self.metrics.stage_skipped.labels(stage=LOCATE, reason=NO_CONSENT).inc(len(admitted.untracked))
            log.info("check-ins not tracked: no location_tracking consent",
                     extra={"checkins": len(admitted.untracked), "citizens": len(set(admitted.untracked))})
        return list(admitted.checkins)

    async def on_citizen(self, message: RawMessage) -> None:
        """A message of the ``citizens`` topic: registration (consent kept or withdrawn) or erasure."""
        citizen = citizen_key(message)
        if message.value is None:  # erased
            if citizen is not None and self.untracked.get(citizen) is not None:
                del self.untracked[citizen]
                await self._persisted()
            return
        try:
            registered = admit_message(message.value, Citizen, self.clock(), self.rules)
        except Exception as exc:  # the sink owns this topic and dead-letters it; here it only changes nothing
            self.metrics.stage_skipped.labels(stage=CONSENT_STAGE, reason=type(exc).__name__).inc()
            return
        was_untracked = self.is_untracked(registered.citizen_id)
        if registered.location_tracking and was_untracked:
            del self.untracked[registered.citizen_id]
            await self._persisted()
        elif not registered.location_tracking and not was_untracked:
            self.untracked[registered.citizen_id] = True
            await self._persisted()
            forgotten = await self.forget([registered.citizen_id])
            log.debug("citizen registered without location_tracking consent: not tracked",
                     extra={"citizen_id": registered.citizen_id, "state_deleted": bool(forgotten)})

    async def _persisted(self) -> None:
        if isinstance(self.untracked, DurableStates):
            await self.untracked.persisted()


class ConsentCache:
    """What the registry says about citizens' consent, for the ingest API: ``lookup`` answers, for a set
    of citizen ids, those the registry holds *without* location_tracking consent (one query for a whole
    batch); each answer is trusted for ``ttl_s``. Thread-safe (lookups run in the API's thread pool)."""

    def __init__(self, lookup: Callable[[Sequence[str]], set[str]], ttl_s: float = CONSENT_CACHE_S,
                 clock: Callable[[], float] = time.monotonic, max_entries: int = CONSENT_CACHE_MAX) -> None:
        self.lookup = lookup
        self.ttl_s = ttl_s
        self.clock = clock
        self.max_entries = max_entries
        self._known: dict[str, tuple[bool, float]] = {}  # citizen -> (untracked, when learnt)
        self._lock = threading.Lock()

    def untracked(self, citizen_ids: Iterable[str]) -> set[str]:
        """The citizens among ``citizen_ids`` registered without location_tracking consent."""
        wanted = list(dict.fromkeys(citizen_ids))
        now = self.clock()
        with self._lock:
            fresh = {c: entry[0] for c in wanted if (entry := self._known.get(c)) is not None and now - entry[1] < self.ttl_s}
        missing = [c for c in wanted if c not in fresh]
        if missing:
            found = self.lookup(missing)
            with self._lock:
                if len(self._known) + len(missing) > self.max_entries:
                    self._known.clear()
                for citizen in missing:
                    self._known[citizen] = (citizen in found, now)
                    fresh[citizen] = citizen in found
        return {c for c, untracked in fresh.items() if untracked}

    def note(self, citizen_id: str, location_tracking: bool) -> None:
        """What a registration the API itself just accepted says, before the registry has it."""
        with self._lock:
            self._known[citizen_id] = (not location_tracking, self.clock())

    def forget(self, citizen_id: str) -> None:
        with self._lock:
            self._known.pop(citizen_id, None)
