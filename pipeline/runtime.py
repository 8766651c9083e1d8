"""What a worker does with messages, without Faust: decode, geofence, emit, remember.

The Faust app (:mod:`pipeline.app`) only moves bytes into these methods. Citizen state lives in
a ``MutableMapping[str, dict]`` (a Faust table in a worker, a dict in tests); output goes
through an :class:`Emitter` (Kafka in a worker, a list in tests). Bad messages go to the DLQ
with a reason; nothing raises out of here for bad data.

Order of effects for at-least-once without duplicates: warnings are handed to Kafka and
acknowledged first, citizen state is written after, and a batch is done only once that state
is durable too (:class:`DurableStates`: the table's changelog records acknowledged). Only then
may the check-ins' offsets be committed. A crash anywhere before re-processes the check-ins
against the old state, which yields the same warnings with the same deterministic ids, which
every sink drops.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import abstractmethod
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from pipeline.domain.tracking import CitizenState, GeofenceConfig, Outcome, Tracker
from pipeline.domain.validation import DEFAULT_RULES, EventRules, decode_event
from pipeline.metrics import WorkerMetrics
from schemas import Checkin, Crisis, InvalidEvent, Warning

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


@dataclass(frozen=True, slots=True)
class RawMessage:
    """A message as read from Kafka: bytes and where they came from, nothing framework-specific."""

    value: bytes | None
    key: bytes | None = None
    topic: str = ""
    partition: int = 0
    timestamp: float | None = None  # broker/producer time, seconds since the epoch


@dataclass(frozen=True, slots=True)
class DeadLetter:
    raw: RawMessage
    reason: str
    stage: str


class DurableStates(MutableMapping[str, Any]):
    """A state mapping whose writes reach durable storage asynchronously (a Faust table's changelog)."""

    @abstractmethod
    async def persisted(self) -> None:
        """Return once every write made so far is durable; raise if one failed."""


class Emitter(Protocol):
    async def warnings(self, warnings: Sequence[Warning]) -> None:
        """Hand warnings to the output and return once they are acknowledged."""

    async def dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        """Hand bad messages to the dead-letter topic with their reasons."""


@dataclass
class MemoryEmitter:
    """The in-memory twin of the Kafka emitter, for tests."""

    sent: list[Warning] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)

    async def warnings(self, warnings: Sequence[Warning]) -> None:
        self.sent.extend(warnings)

    async def dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        self.dead.extend(letters)


class GeofenceRuntime:
    def __init__(self, config: GeofenceConfig, states: MutableMapping[str, Any], emitter: Emitter,
                 metrics: WorkerMetrics, clock: Clock, owns: Callable[[str], bool] = lambda _: True,
                 rules: EventRules = DEFAULT_RULES) -> None:
        self.tracker = Tracker(config)
        self.rules = rules  # what a message must satisfy to be used (pipeline.domain.validation)
        self.states = states
        self.emitter = emitter
        self.metrics = metrics
        self.clock = clock
        self.owns = owns  # whether a citizen's partition is currently assigned to this worker
        self.lock = asyncio.Lock()
        # A worker geofences nothing before it knows every active crisis and has recovered its citizens.
        self.crises_loaded = asyncio.Event()
        self.table_recovered = asyncio.Event()

    # -- helpers ---------------------------------------------------------------------------------
    def _state(self, citizen_id: str) -> CitizenState | None:
        raw = self.states.get(citizen_id)
        return None if raw is None else CitizenState.from_dict(citizen_id, raw)

    def _owned_states(self) -> list[CitizenState]:
        return [CitizenState.from_dict(cid, raw) for cid, raw in list(self.states.items())
                if raw is not None and self.owns(cid)]

    async def _commit(self, outcome: Outcome) -> None:
        if outcome.warnings:
            await self.emitter.warnings(outcome.warnings)
            for warning in outcome.warnings:
                self.metrics.warnings.labels(kind=warning.kind).inc()
        for citizen_id, state in outcome.states.items():
            self.states[citizen_id] = state.to_dict()
        if isinstance(self.states, DurableStates):
            await self.states.persisted()

    async def dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        """Bad messages to the DLQ with their reasons, counted by stage and reason."""
        if letters:
            await self.emitter.dead_letters(letters)
            for letter in letters:
                self.metrics.dlq.labels(stage=letter.stage, reason=letter.reason.split(":")[0][:60]).inc()

    # -- check-ins -------------------------------------------------------------------------------
    async def process_checkins(self, messages: Sequence[RawMessage]) -> tuple[Warning, ...]:
        started = time.perf_counter()
        self.metrics.checkins_received.inc(len(messages))
        checkins: list[Checkin] = []
        arrived: dict[str, float] = {}
        letters: list[DeadLetter] = []
        for message in messages:
            try:
                if message.value is None:
                    raise InvalidEvent("empty message")
                checkin = decode_event(message.value, Checkin, self.clock(), self.rules)
            except InvalidEvent as exc:
                letters.append(DeadLetter(message, f"invalid checkin/1: {exc}", "locate"))
                continue
            checkins.append(checkin)
            if message.timestamp is not None:
                arrived[checkin.citizen_id] = message.timestamp
        await self.dead_letter(letters)
        if not checkins:
            return ()
        async with self.lock:
            await self._expire_locked()
            states = {c.citizen_id: s for c in checkins if (s := self._state(c.citizen_id)) is not None}
            outcome = self.tracker.on_checkins(checkins, states, self.clock())
            await self._commit(outcome)
        done = time.time()
        for warning in outcome.warnings:
            if warning.citizen_id in arrived:
                self.metrics.latency.observe(max(0.0, done - arrived[warning.citizen_id]))
        self.metrics.checkins_processed.inc(len(checkins) - outcome.stale)
        self.metrics.batch_size.observe(len(checkins))
        self.metrics.batch_seconds.observe(time.perf_counter() - started)
        self.metrics.citizens.set(len(self.states))
        return outcome.warnings

    # -- crises ----------------------------------------------------------------------------------
    def decode_crisis(self, message: RawMessage) -> Crisis | DeadLetter:
        try:
            if message.value is None:
                raise InvalidEvent("empty message")
            return decode_event(message.value, Crisis, self.clock(), self.rules)
        except InvalidEvent as exc:
            return DeadLetter(message, f"invalid crisis/1: {exc}", "crisis")

    def remember(self, crises: Iterable[Crisis]) -> None:
        """Load crises into the table without sweeping (start-up, before citizens are known)."""
        now = self.clock()
        for crisis in crises:
            if crisis.op == "cancel":
                self.tracker.end(crisis.crisis_id, crisis.version)
            else:
                self.tracker.accept(crisis, now)
        self.metrics.active_crises.set(len(self.tracker.crises))

    async def apply_crisis(self, crisis: Crisis) -> tuple[Warning, ...]:
        """An upsert or cancel seen live: update the crisis table and sweep this worker's citizens."""
        async with self.lock:
            now = self.clock()
            warnings: list[Warning] = []
            if crisis.op == "cancel":
                self.tracker.end(crisis.crisis_id, crisis.version)
            elif self.tracker.accept(crisis, now):
                warnings += await self._apply(self.tracker.on_upsert(crisis, self._owned_states(), now))
            warnings += await self._clear_ended_locked(now)
        self.metrics.active_crises.set(len(self.tracker.crises))
        return tuple(warnings)

    async def apply_crisis_messages(self, messages: Sequence[RawMessage]) -> tuple[Warning, ...]:
        warnings: list[Warning] = []
        letters: list[DeadLetter] = []
        for message in messages:
            decoded = self.decode_crisis(message)
            if isinstance(decoded, DeadLetter):
                letters.append(decoded)
            else:
                warnings.extend(await self.apply_crisis(decoded))
        await self.dead_letter(letters)
        return tuple(warnings)

    async def reconcile(self) -> tuple[Warning, ...]:
        """Sweep every owned citizen against every active crisis (after recovery or a rebalance), and
        send the all-clears of crises that ended meanwhile. Only what is missing is sent: the states
        remember what each citizen was told."""
        warnings: list[Warning] = []
        async with self.lock:
            now = self.clock()
            self.tracker.expired(now)
            for crisis in sorted(self.tracker.crises.values(), key=lambda c: c.crisis_id):
                warnings += await self._apply(self.tracker.on_upsert(crisis, self._owned_states(), now))
            warnings += await self._clear_ended_locked(now)
        self.metrics.active_crises.set(len(self.tracker.crises))
        return tuple(warnings)

    async def expire(self) -> tuple[Warning, ...]:
        async with self.lock:
            return await self._expire_locked()

    async def _expire_locked(self) -> tuple[Warning, ...]:
        now = self.clock()
        if not self.tracker.expired(now):
            return ()
        self.metrics.active_crises.set(len(self.tracker.crises))
        return await self._clear_ended_locked(now)

    async def _clear_ended_locked(self, now: datetime) -> tuple[Warning, ...]:
        """All-clear, once, to every owned citizen still holding a presence for an ended crisis."""
        warnings: list[Warning] = []
        for ended in self.tracker.leftovers(self._owned_states()):
            warnings += await self._apply(self.tracker.on_end(ended, self._owned_states(), now))
        return tuple(warnings)

    async def _apply(self, outcome: Outcome) -> tuple[Warning, ...]:
        await self._commit(outcome)
        return outcome.warnings
