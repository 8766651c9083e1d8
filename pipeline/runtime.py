"""What a worker does with messages, without Faust: decode, geofence, emit, remember.

The Faust app (:mod:`pipeline.app`) only moves bytes into these methods. Citizen state lives in
a ``MutableMapping[str, ...]``: in a worker the Faust table, kept in columns
(:class:`ColumnarStates`, :mod:`pipeline.citizens`), so that a sweep selects the citizens a crisis
can concern with one vectorised query and sends their warnings in chunks; in tests a dict of the
JSON-shaped states. Output goes through an :class:`Emitter` (Kafka in a worker, a list in tests).

Failures follow :mod:`pipeline.stage`: nothing raises out of here for bad data, foreseen or not.
A check-in that cannot be decoded, or that makes the geofencing of its batch raise, goes to the
DLQ with its reason (the batch is split until it is alone; the rest of the batch is processed). A
crisis is admitted only if the rehearsal of :mod:`pipeline.domain.admission` passes, so the crisis
table holds no crisis that would break the index or the warnings of every later check-in; should
applying one raise all the same, the table is put back as it was. Sweeps (a crisis against every
citizen, reconcile, expiry) are isolated per crisis and per citizen: one that raises is skipped,
logged and counted, and the others go on. Only infrastructure failures (Kafka refusing a warning,
a dead letter or a state write) raise, and the worker exits without committing.

Order of effects for at-least-once without duplicates: warnings are handed to Kafka and
acknowledged first, citizen state is written after, and a batch is done only once that state
is durable too (:class:`DurableStates`: the table's changelog records acknowledged). Only then
may the check-ins' offsets be committed. A crash anywhere before re-processes the check-ins
against the old state, which yields the same warnings with the same deterministic ids, which
every sink drops. The locate agent overlaps the wait for a chunk's state records with the
geofencing of the next chunk of the same records (``process_checkins(..., settle=False)``, then
:meth:`GeofenceRuntime.settle` before their offsets can be committed): the next chunk reads the
states from memory, where they already are, and its own state records follow its own warnings'
acknowledgement, so every state record still follows every warning it accounts for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import abstractmethod
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Protocol

import numpy as np

from pipeline.citizens import CitizenColumns, decode_state, encode_state
from pipeline.domain.admission import admit_message
from pipeline.domain.tracking import CitizenState, GeofenceConfig, Outcome, Tracker
from pipeline.domain.validation import DEFAULT_RULES, EventRules
from pipeline.metrics import WorkerMetrics
from pipeline.stage import (
    Failure,
    OutageTypes,
    describe,
    error_type,
    is_infrastructure,
    isolate_async,
    label,
    map_isolated,
    map_isolated_async,
    record,
)
from schemas import Checkin, Crisis, Warning

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

# Stage names: the ``stage`` header of a dead letter and the ``stage`` label of the metrics.
LOCATE: Final = "locate"  # the check-in agent
CRISIS: Final = "crisis"  # the crisis agent: dead-letters the crisis events admission refuses
READER: Final = "crisis-reader"  # every worker's reader of crisis-events: skips what admission refuses
SWEEP: Final = "sweep"  # a crisis against this worker's citizens (upsert, reconcile, expiry, cancel)

# A sweep handles the citizens it selected in chunks, each one's warnings handed to Kafka while the
# next is computed: the first chunk is small, so the first warnings leave at once.
SWEEP_FIRST_CHUNK: Final = 1_000
SWEEP_CHUNK: Final = 5_000


@dataclass(frozen=True, slots=True)
class RawMessage:
    """A message as read from Kafka: bytes and where they came from, nothing framework-specific."""

    value: bytes | None
    key: bytes | None = None
    topic: str = ""
    partition: int = 0
    timestamp: float | None = None  # broker/producer time, seconds since the epoch
    offset: int | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message for the DLQ: ``reason`` is ``"<ExcType>: <message>"``, ``label`` the bounded metric label."""

    raw: RawMessage
    reason: str
    stage: str
    error_type: str = ""
    label: str = "$"

    @classmethod
    def of(cls, raw: RawMessage, error: BaseException, stage: str) -> DeadLetter:
        return cls(raw, describe(error), stage, error_type(error), label(error))


class DurableStates(MutableMapping[str, Any]):
    """A state mapping whose writes reach durable storage asynchronously (a Faust table's changelog)."""

    @abstractmethod
    async def persisted(self) -> None:
        """Return once every write made so far is durable; raise if one failed."""

    async def handed(self) -> Sequence[Awaitable[Any]]:
        """Hand every write made so far to durable storage without waiting: what to await for it."""
        await self.persisted()
        return ()


class ColumnarStates(DurableStates):
    """Durable states kept in :class:`~pipeline.citizens.CitizenColumns` (values: :func:`encode_state`),
    which know the partitions this worker owns: a sweep selects its citizens with one vectorised query."""

    @property
    @abstractmethod
    def columns(self) -> CitizenColumns:
        """The citizens, the partitions this worker no longer owns possibly included."""

    @abstractmethod
    def owned_partitions(self) -> Collection[int]:
        """The partitions of the citizens this worker owns now."""


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
                 outages: OutageTypes = (), rules: EventRules = DEFAULT_RULES) -> None:
        self.tracker = Tracker(config)
        self.rules = rules  # what a message must satisfy to be used (pipeline.domain.validation)
        self.states = states
        self.emitter = emitter
        self.metrics = metrics
        self.clock = clock
        self.owns = owns  # whether a citizen's partition is currently assigned to this worker
        self.outages = outages  # outage types of this worker beyond pipeline.stage's
        self.lock = asyncio.Lock()
        self._unsettled: list[Awaitable[Any]] = []  # state writes handed over, not yet known durable
        # A worker geofences nothing before it knows every active crisis and has recovered its citizens.
        self.crises_loaded = asyncio.Event()
        self.table_recovered = asyncio.Event()

    # -- helpers ---------------------------------------------------------------------------------
    def _state(self, citizen_id: str) -> CitizenState | None:
        if isinstance(self.states, ColumnarStates):  # read from the columns, not packed into bytes and read back
            columns = self.states.columns
            row = columns.row_of(citizen_id.encode("utf-8"))
            return None if row is None else columns.state(row)
        raw = self.states.get(citizen_id)
        return None if raw is None else decode_state(citizen_id, raw)

    def _states_of(self, citizen_ids: Sequence[str]) -> dict[str, CitizenState]:
        """The known states of these citizens; from the columns in one vectorised read where there are."""
        if isinstance(self.states, ColumnarStates):
            return self.states.columns.states_of(citizen_ids)
        return {citizen_id: state for citizen_id in citizen_ids if (state := self._state(citizen_id)) is not None}

    def _owned(self) -> tuple[CitizenColumns, Collection[int] | None]:
        """This worker's citizens in columns, and the partitions to keep of them (None: all)."""
        if isinstance(self.states, ColumnarStates):
            return self.states.columns, self.states.owned_partitions()
        owned = [(cid, raw) for cid, raw in list(self.states.items()) if raw is not None and self.owns(cid)]
        return CitizenColumns.of(owned, self._unreadable), None

    def _unreadable(self, citizen_id: str, error: Exception) -> None:
        self._skipped(SWEEP, Failure(citizen_id, error), f"the stored state of citizen {citizen_id!r}")

    def _skipped(self, stage: str, failure: Failure[Any], what: str) -> None:
        """Something no message is at fault for (or that another stage dead-letters) could not be processed."""
        self.metrics.stage_skipped.labels(stage=stage, reason=failure.label).inc()
        log.error("skipped %s (stage %s): %s", what, stage, failure.reason)

    async def _commit(self, outcome: Outcome, settle: bool = True) -> None:
        """Warnings handed to Kafka and acknowledged, then the citizens' states written; with ``settle``
        return once those are durable too, else leave their acknowledgement to :meth:`settle`."""
        if outcome.warnings:
            await self.emitter.warnings(outcome.warnings)
            for kind, count in Counter(w.kind for w in outcome.warnings).items():
                self.metrics.warnings.labels(kind=kind).inc(count)
            self.metrics.first_warning.sent((w.crisis_id for w in outcome.warnings), time.time())
        states, encoded = self.states, isinstance(self.states, ColumnarStates)
        for citizen_id, state in outcome.states.items():
            states[citizen_id] = encode_state(state) if encoded else state.to_dict()
        if isinstance(self.states, DurableStates):
            if settle:
                await self.states.persisted()
            else:
                self._unsettled += await self.states.handed()

    async def settle(self) -> None:
        """Return once every state write of the check-ins processed with ``settle=False`` is durable;
        raise (an outage: the worker exits without committing) if one failed."""
        unsettled, self._unsettled = self._unsettled, []
        if unsettled:
            await asyncio.gather(*unsettled)

    async def dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        """Bad messages to the DLQ with their reasons, counted by stage and (bounded) reason label."""
        if letters:
            await self.emitter.dead_letters(letters)
            for letter in letters:
                self.metrics.dlq.labels(stage=letter.stage, reason=letter.label).inc()
                log.warning("dead-lettered %s[%s]@%s (stage %s): %s", letter.raw.topic, letter.raw.partition,
                            letter.raw.offset, letter.stage, letter.reason)

    # -- check-ins -------------------------------------------------------------------------------
    async def process_checkins(self, messages: Sequence[RawMessage], settle: bool = True) -> tuple[Warning, ...]:
        """Geofence a batch of check-ins. One that cannot be decoded, or that makes the geofencing raise
        (the batch is split until it is alone), is dead-lettered; the others are processed.

        With ``settle`` it returns once the new states are durable. Without, their records are on their
        way to Kafka when it returns, and the caller awaits :meth:`settle` before it lets the check-ins'
        offsets be committed: the next batch is geofenced meanwhile (its states are read from memory,
        where this batch's already are). The order of effects is the same per citizen: a batch's
        warnings are acknowledged before its state records are handed over, and those before the next
        batch's; a crash before :meth:`settle` returned re-processes every unsettled batch."""
        started = time.perf_counter()
        self.metrics.checkins_received.inc(len(messages))
        now = self.clock()
        decoded = map_isolated(messages, lambda m: (m, admit_message(m.value, Checkin, now, self.rules)), outages=self.outages)
        letters = [DeadLetter.of(f.item, f.error, LOCATE) for f in decoded.failures]
        outcomes: tuple[Outcome, ...] = ()
        geofenced = 0
        if decoded.results:
            async with self.lock:
                await self._expire_locked()
                run = await isolate_async(decoded.results, self._geofence_locked, outages=self.outages)
            record(self.metrics, LOCATE, run)
            letters += [DeadLetter.of(f.item[0], f.error, LOCATE) for f in run.failures]
            outcomes = run.results
            geofenced = len(decoded.results) - len(run.failures)
        await self.dead_letter(letters)
        warnings = tuple(w for outcome in outcomes for w in outcome.warnings)
        if outcomes:
            arrived = {c.citizen_id: m.timestamp for m, c in decoded.results if m.timestamp is not None}
            done = time.time()
            for warning in warnings:
                if warning.citizen_id in arrived:
                    self.metrics.latency.observe(max(0.0, done - arrived[warning.citizen_id]))
            self.metrics.checkins_processed.inc(geofenced - sum(outcome.stale for outcome in outcomes))
            self.metrics.batch_size.observe(geofenced)
            self.metrics.batch_seconds.observe(time.perf_counter() - started)
            self.metrics.citizens.set(len(self.states))
        if settle:
            await self.settle()
        return warnings

    async def _geofence_locked(self, batch: Sequence[tuple[RawMessage, Checkin]]) -> Outcome:
        """The isolated step: geofence, send the warnings, then store the new states. Safe to re-run on
        part of a batch (see :mod:`pipeline.stage`): warnings first, states after, deterministic ids."""
        checkins = [checkin for _, checkin in batch]
        states = self._states_of([c.citizen_id for c in checkins])
        outcome = self.tracker.on_checkins(checkins, states, self.clock())
        await self._commit(outcome, settle=False)
        return outcome

    # -- crises ----------------------------------------------------------------------------------
    def admit_crisis(self, message: RawMessage, stage: str = CRISIS) -> Crisis | DeadLetter:
        """A crisis event decoded and rehearsed (:mod:`pipeline.domain.admission`), or its dead letter.
        The verdict depends on the message alone: every worker, and the sink, reach the same one."""
        admitted = map_isolated([message], lambda m: admit_message(m.value, Crisis, self.clock(), self.rules), outages=self.outages)
        if admitted.failures:
            return DeadLetter.of(message, admitted.failures[0].error, stage)
        return admitted.results[0]

    def skip(self, letter: DeadLetter) -> None:
        """A message this stage leaves out because another stage dead-letters it: counted and logged."""
        self.metrics.stage_skipped.labels(stage=letter.stage, reason=letter.label).inc()
        log.info("skipped %s[%s]@%s (stage %s; the stage that owns it dead-letters it): %s", letter.raw.topic,
                 letter.raw.partition, letter.raw.offset, letter.stage, letter.reason)

    def remember(self, crises: Iterable[Crisis]) -> None:
        """Load admitted crises into the table without sweeping (start-up, before citizens are known)."""
        now = self.clock()
        for crisis in crises:
            if crisis.op == "cancel":
                self.tracker.end(crisis.crisis_id, crisis.version)
            else:
                self.tracker.accept(crisis, now)
        self.metrics.active_crises.set(len(self.tracker.crises))

    async def apply_crisis(self, crisis: Crisis) -> tuple[Warning, ...]:
        """An upsert or cancel seen live: update the crisis table and sweep this worker's citizens.

        Should applying it raise a data error all the same (admission rehearses what can break), the
        crisis table is put back as it was before this event, and the event is skipped and counted."""
        async with self.lock:
            now = self.clock()
            before = self.tracker.snapshot()
            try:
                warnings = await self._apply_crisis_locked(crisis, now)
            except Exception as exc:
                if is_infrastructure(exc, self.outages):
                    raise
                self.tracker.restore(before)
                self._skipped(READER, Failure(crisis, exc), f"crisis {crisis.crisis_id!r} version {crisis.version}")
                warnings = ()
        self.metrics.active_crises.set(len(self.tracker.crises))
        return warnings

    async def _apply_crisis_locked(self, crisis: Crisis, now: datetime) -> tuple[Warning, ...]:
        warnings: list[Warning] = []
        if crisis.op == "cancel":
            self.tracker.end(crisis.crisis_id, crisis.version)
        elif self.tracker.accept(crisis, now):
            _ = self.tracker.sweep_index(crisis.crisis_id)  # a crisis that cannot be indexed fails before any sweep
            warnings += await self._sweep_upsert_locked(crisis, now)
        warnings += await self._clear_ended_locked(now)
        return tuple(warnings)

    async def apply_crisis_messages(self, messages: Sequence[RawMessage]) -> tuple[Warning, ...]:
        """Admit and apply crisis events, dead-lettering the refused ones (one worker, tests, benchmarks)."""
        warnings: list[Warning] = []
        letters: list[DeadLetter] = []
        for message in messages:
            admitted = self.admit_crisis(message)
            if isinstance(admitted, DeadLetter):
                letters.append(admitted)
            else:
                warnings.extend(await self.apply_crisis(admitted))
        await self.dead_letter(letters)
        return tuple(warnings)

    async def reconcile(self) -> tuple[Warning, ...]:
        """Sweep every owned citizen against every active crisis (after recovery or a rebalance), and
        send the all-clears of crises that ended meanwhile. Only what is missing is sent: the states
        remember what each citizen was told. A crisis whose sweep raises is skipped; the others go on."""
        async with self.lock:
            now = self.clock()
            self.tracker.expired(now)
            with contextlib.suppress(Exception):  # every crisis is swept: index them all at once (one
                _ = self.tracker.index  # that cannot be indexed raises again in its own sweep, skipped)
            crises = sorted(self.tracker.crises.values(), key=lambda c: c.crisis_id)
            warnings = await self._per_crisis_locked(crises, lambda c: self._sweep_upsert_locked(c, now))
            warnings += await self._clear_ended_locked(now)
        self.metrics.active_crises.set(len(self.tracker.crises))
        return warnings

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
        columns, partitions = self._owned()
        ended = self.tracker.due_all_clears(columns.held(partitions))
        return await self._per_crisis_locked(ended, lambda c: self._sweep_locked(
            c, lambda states: self.tracker.on_end(c, states, now), lambda cols, parts: cols.holders(c.crisis_id, parts)))

    async def _sweep_upsert_locked(self, crisis: Crisis, now: datetime) -> tuple[Warning, ...]:
        """A crisis just accepted against the citizens it can concern: those within its search bounds
        (one vectorised query over the columns) and those holding a presence for it. The tracker skips
        every other citizen anyway (:meth:`Tracker.on_upsert`)."""
        bounds = self.tracker.search_bounds(crisis.crisis_id)
        return await self._sweep_locked(crisis, lambda states: self.tracker.on_upsert(crisis, states, now),
                                        lambda cols, parts: cols.within(bounds, parts, holding=crisis.crisis_id))

    async def _per_crisis_locked(self, crises: Sequence[Crisis],
                                 sweep: Callable[[Crisis], Awaitable[tuple[Warning, ...]]]) -> tuple[Warning, ...]:
        """One sweep per crisis, each isolated: a crisis whose sweep raises is skipped, logged and counted."""
        run = await map_isolated_async(crises, sweep, outages=self.outages)
        for failure in run.failures:
            self._skipped(SWEEP, failure, f"the sweep of crisis {failure.item.crisis_id!r}")
        return tuple(w for warnings in run.results for w in warnings)

    async def _sweep_locked(self, crisis: Crisis, sweep: Callable[[Sequence[CitizenState]], Outcome],
                            select: Callable[[CitizenColumns, Collection[int] | None], np.ndarray]
                            ) -> tuple[Warning, ...]:
        """One crisis against the owned citizens ``select`` picks, isolated per citizen: a citizen whose
        state makes the sweep raise is skipped (no message is at fault, so nothing is dead-lettered),
        the others are told. Sweeps treat each citizen on its own, so a sweep of part of them is the
        same sweep: the citizens go in chunks, and a chunk's warnings and states are handed to Kafka
        while the next chunk is computed (one chunk in flight; the sweep returns once all are durable)."""
        async def step(states: Sequence[CitizenState]) -> Outcome:
            return sweep(states)

        columns, partitions = self._owned()
        warnings: list[Warning] = []
        pending: asyncio.Future[None] | None = None
        try:
            for rows in _chunks(select(columns, partitions)):
                loaded = map_isolated(rows, columns.state, outages=self.outages)
                for fault in loaded.failures:
                    self._unreadable(columns.key(fault.item).decode("utf-8", "replace"), fault.error)
                run = await isolate_async(loaded.results, step, outages=self.outages)
                record(self.metrics, SWEEP, run)
                for failure in run.failures:
                    self._skipped(SWEEP, failure,
                                  f"citizen {failure.item.citizen_id!r} in the sweep of crisis {crisis.crisis_id!r}")
                outcome = _merged(run.results)
                if pending is not None:
                    await pending
                pending = asyncio.ensure_future(self._commit(outcome))
                await asyncio.sleep(0)  # let the commit hand its records to the producer before the next chunk
                warnings += outcome.warnings
            if pending is not None:
                await pending
        finally:
            if pending is not None and not pending.done():
                pending.cancel()
        return tuple(warnings)


def _chunks(rows: np.ndarray) -> Iterator[list[int]]:
    at, size = 0, SWEEP_FIRST_CHUNK
    while at < len(rows):
        yield rows[at:at + size].tolist()
        at += size
        size = SWEEP_CHUNK


def _merged(outcomes: Sequence[Outcome]) -> Outcome:
    if len(outcomes) == 1:
        return outcomes[0]
    return Outcome(tuple(w for o in outcomes for w in o.warnings), {k: v for o in outcomes for k, v in o.states.items()})
