"""The failure policy of every consumer stage (DESIGN.md §6), as one mechanism.

A stage reads messages and runs a *step* on a batch of them (geofence check-ins, sweep citizens
against a crisis, write rows, copy warnings). When the step raises, one question decides what
happens next — is the world broken, or is the data?

* **Infrastructure** (:func:`is_infrastructure`): Kafka or PostgreSQL unreachable or refusing
  after the clients' own retries — ``kafka.errors.KafkaError``, ``aiokafka.errors.KafkaError``,
  the publisher's ``BrokerUnavailable``, ``psycopg.OperationalError``/``InterfaceError``,
  ``EmbeddedError``, ``ConnectionError``, ``TimeoutError`` (``asyncio.TimeoutError`` is the same
  class), ``MemoryError`` — or anything raised *from* one of them (Faust wraps aiokafka's errors).
  A stage adds its own outage types (the sink: a missing table). These propagate unchanged: the
  caller backs off and retries, or exits 75 without committing (``pipeline.app.finish_or_exit``).
  A message can never be blamed for an outage, so nothing is dead-lettered for one.
* **Data**: anything else, foreseen or not — ``InvalidEvent``, but just as well a
  ``RecursionError`` from JSON nested 5,000 deep, a ``UnicodeEncodeError`` from a lone surrogate,
  a ``ValueError`` from a geometry shapely refuses. One exception is data although Kafka raised it:
  a record too large for the producer or broker (``MessageSizeTooLargeError``) is too large every
  time, so retrying it would be a crash loop.

**Isolation is structural** (:func:`isolate`, :func:`isolate_async`; getsentry/arroyo's
``RunTask`` with an ``InvalidMessage`` DLQ policy, Kafka Connect's ``errors.tolerance``, are the
model): the step runs on the whole batch; if it raises a data error, the batch is split in halves
and each half is run again, recursively, until each culprit is alone. The culprits come back as
:class:`Failure` values (item, exception) for the stage to dead-letter with :func:`describe` as the
reason; every other item was processed by a run that succeeded. No list of known bad inputs is
involved, so a new kind of bad message cannot stop a stage. Halves run left before right, so the
items that succeed are processed in their original order (a citizen's check-ins stay in order).
Where the step is naturally one item at a time (decoding), :func:`map_isolated` applies the same
policy without splitting.

**Why re-running a step on a sub-batch is safe here.** A run that raised may have done part of its
effects before raising; its items are then run again in the halves. That repeats nothing visible:

- warnings carry deterministic ids (citizen, crisis, version, kind, sequence number from the stored
  state), so a warning sent by the failed run and again by the re-run is the same warning, which
  every sink and the dispatcher drop (``ON CONFLICT DO NOTHING``, ``warning_id`` dedupe);
- a citizen's state is written only after that citizen's warnings were acknowledged
  (``pipeline.runtime``), so a run that failed before writing states is re-run against the old
  states and yields the same warnings; one that failed after writing some yields nothing new for
  those citizens — their warnings are out already;
- the PostgreSQL sink writes a batch in one transaction that a raising step rolls back, and every
  table is idempotent (deterministic keys, ``ON CONFLICT``), so a sub-batch writes what it would have;
- the router's copies are at-least-once by contract (readers dedupe on ``warning_id``).

**Cost is bounded, whatever the step does.** A batch of N with k culprits costs about 2·k·log2(N)
runs. A step that fails for every message (all poison, or a bug) would cost N·log2(N) items handed
to the step by plain halving; instead, once the items handed to the step reach ``work_factor``·N
(4 by default), the remaining suspects run one at a time. So isolating costs at most
(``work_factor`` + 1)·N items and 2·N runs, never more. Per-item work with no shared effect
(decoding) uses :func:`map_isolated` and costs exactly N.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Final, Generic, TypeVar

from pipeline.metrics import DlqMetrics
from schemas import InvalidEvent

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

OutageTypes = tuple[type[BaseException], ...]

MAX_REASON_CHARS: Final = 500
MAX_LABEL_CHARS: Final = 60
DEFAULT_WORK_FACTOR: Final = 4.0


# --- classification ---------------------------------------------------------------------------------


class BrokerUnavailable(RuntimeError):
    """Kafka did not acknowledge the messages in time; nothing can be promised about them.

    Raised by ``producers.publisher.Publisher`` (which re-exports it); defined here, with the other
    outage types, so that the pipeline can classify it without importing the producers."""


@cache
def library_outages() -> OutageTypes:
    """The outage types of the libraries this project talks to the world with, imported lazily (a
    process that never loads psycopg or aiokafka does not import them here either)."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError, MemoryError]
    try:
        from kafka.errors import KafkaError

        found.append(KafkaError)
    except ImportError:  # pragma: no cover - a dependency
        pass
    try:
        from aiokafka.errors import KafkaError as AIOKafkaError

        found.append(AIOKafkaError)
    except ImportError:  # pragma: no cover - a dependency
        pass
    try:
        import psycopg

        found += [psycopg.OperationalError, psycopg.InterfaceError]
    except ImportError:  # pragma: no cover - a dependency
        pass
    from pipeline.embedded import EmbeddedError

    found += [EmbeddedError, BrokerUnavailable]
    return tuple(found)


@cache
def _too_large() -> OutageTypes:
    """Kafka errors that say the record itself is too large: raised again for the same record every
    time, so they are data errors, not outages."""
    found: list[type[BaseException]] = []
    try:
        from kafka.errors import MessageSizeTooLargeError

        found.append(MessageSizeTooLargeError)
    except ImportError:  # pragma: no cover - a dependency
        pass
    try:
        from aiokafka.errors import MessageSizeTooLargeError as AIOTooLarge
        from aiokafka.errors import RecordTooLargeError

        found += [AIOTooLarge, RecordTooLargeError]
    except ImportError:  # pragma: no cover - a dependency
        pass
    return tuple(found)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it was explicitly raised from (``raise ... from``), bounded against cycles."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 16:
        seen.add(id(current))
        yield current
        current = current.__cause__


def is_infrastructure(exc: BaseException, extra: OutageTypes = ()) -> bool:
    """True when ``exc`` (or what it was raised from) means the world is broken, not the data:
    back off and retry, or exit without committing. ``extra``: a stage's own outage types."""
    chain = list(_causes(exc))
    if any(isinstance(e, _too_large()) for e in chain):
        return False
    outages = library_outages() + extra
    return any(isinstance(e, outages) for e in chain)


# --- describing a failure -----------------------------------------------------------------------------


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # an exception whose __str__ raises still gets a reason
        return f"<{type(exc).__name__} without a printable message>"


def describe(exc: BaseException, context: str = "", limit: int = MAX_REASON_CHARS) -> str:
    """The reason of a dead letter: ``"<ExcType>: <message>"`` (``"<ExcType>: <context>: <message>"``
    when the stage says where it happened), at most ``limit`` characters."""
    text = f"{type(exc).__name__}: {context + ': ' if context else ''}{_message(exc)}"
    return text if len(text) <= limit else text[:limit - 1] + "…"


def error_type(exc: BaseException) -> str:
    """The exception's type, module-qualified unless built in (``schemas.codec.InvalidEvent``, ``RecursionError``)."""
    cls = type(exc)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def json_path_label(field: str) -> str:
    """A bounded metric label for a JSON path: array indices dropped (``$.channels[3].address`` →
    ``$.channels.address``)."""
    out, depth = [], 0
    for ch in field:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return ("".join(out) or "$")[:MAX_LABEL_CHARS]


def label(exc: BaseException) -> str:
    """The bounded ``reason`` label of the DLQ metrics: the JSON path of a schema violation, else the
    exception's type name. Never the message (free text would make a new time series per message)."""
    if isinstance(exc, InvalidEvent):
        return json_path_label(exc.field)
    return type(exc).__name__[:MAX_LABEL_CHARS]


@dataclass(frozen=True, slots=True)
class Failure(Generic[T]):
    """An item the step raised a data error on, alone."""

    item: T
    error: Exception

    @property
    def reason(self) -> str:
        return describe(self.error)

    @property
    def error_type(self) -> str:
        return error_type(self.error)

    @property
    def label(self) -> str:
        return label(self.error)


@dataclass(frozen=True, slots=True)
class Isolated(Generic[T, R]):
    """What came of running a step over a batch with isolation."""

    results: tuple[R, ...]  # one per successful run, in order
    failures: tuple[Failure[T], ...]  # the culprits, in batch order
    runs: int = 0  # how many times the step ran
    work: int = 0  # how many items were handed to the step in all

    @property
    def split(self) -> bool:
        """Whether the batch had to be split (a data error was isolated)."""
        return self.runs > 1


# --- isolation ----------------------------------------------------------------------------------------


class _Bisection:
    """The plan of runs over ``range(size)``: spans to run next, and what a failed run leads to."""

    def __init__(self, size: int, work_factor: float) -> None:
        self.pending: list[tuple[int, int]] = [(0, size)] if size else []
        self.budget = max(size, int(work_factor * size))
        self.scheduled = size  # items handed, or promised, to the step while halving
        self.culprits: list[tuple[int, Exception]] = []
        self.runs = 0
        self.work = 0

    def next(self) -> tuple[int, int] | None:
        return self.pending.pop() if self.pending else None

    def done(self, span: tuple[int, int], error: Exception | None) -> None:
        start, end = span
        self.runs += 1
        self.work += end - start
        if error is None:
            return
        if end - start == 1:
            self.culprits.append((start, error))
        elif self.scheduled + (end - start) > self.budget:
            # Halving would cost more than it saves: poison is dense (or the step fails for everything).
            self.pending += [(i, i + 1) for i in reversed(range(start, end))]
        else:
            self.scheduled += end - start
            mid = (start + end) // 2
            self.pending += [(mid, end), (start, mid)]  # a stack: the left half runs first

    def outcome(self, items: Sequence[T], results: list[R]) -> Isolated[T, R]:
        failures = tuple(Failure(items[i], error) for i, error in sorted(self.culprits, key=lambda c: c[0]))
        return Isolated(tuple(results), failures, self.runs, self.work)


def isolate(items: Sequence[T], step: Callable[[Sequence[T]], R], *, outages: OutageTypes = (),
            work_factor: float = DEFAULT_WORK_FACTOR) -> Isolated[T, R]:
    """Run ``step`` over ``items``, isolating the items it raises a data error on (see the module doc).
    Infrastructure errors propagate unchanged; the step may then have run on part of the batch."""
    plan = _Bisection(len(items), work_factor)
    results: list[R] = []
    while (span := plan.next()) is not None:
        try:
            result = step(items[span[0]:span[1]])
        except Exception as exc:
            if is_infrastructure(exc, outages):
                raise
            plan.done(span, exc)
        else:
            results.append(result)
            plan.done(span, None)
    return plan.outcome(items, results)


async def isolate_async(items: Sequence[T], step: Callable[[Sequence[T]], Awaitable[R]], *,
                        outages: OutageTypes = (), work_factor: float = DEFAULT_WORK_FACTOR) -> Isolated[T, R]:
    """:func:`isolate` for a coroutine step (the Faust worker)."""
    plan = _Bisection(len(items), work_factor)
    results: list[R] = []
    while (span := plan.next()) is not None:
        try:
            result = await step(items[span[0]:span[1]])
        except Exception as exc:
            if is_infrastructure(exc, outages):
                raise
            plan.done(span, exc)
        else:
            results.append(result)
            plan.done(span, None)
    return plan.outcome(items, results)


def map_isolated(items: Iterable[T], fn: Callable[[T], R], *, outages: OutageTypes = ()) -> Isolated[T, R]:
    """``fn`` on each item alone (a step with no shared effect, such as decoding), with the same policy:
    data errors become :class:`Failure` values, infrastructure errors propagate."""
    results: list[R] = []
    failures: list[Failure[T]] = []
    runs = 0
    for item in items:
        runs += 1
        try:
            results.append(fn(item))
        except Exception as exc:
            if is_infrastructure(exc, outages):
                raise
            failures.append(Failure(item, exc))
    return Isolated(tuple(results), tuple(failures), runs, runs)


async def map_isolated_async(items: Iterable[T], fn: Callable[[T], Awaitable[R]], *,
                             outages: OutageTypes = ()) -> Isolated[T, R]:
    """:func:`map_isolated` for a coroutine (one crisis at a time in a sweep of all crises)."""
    results: list[R] = []
    failures: list[Failure[T]] = []
    runs = 0
    for item in items:
        runs += 1
        try:
            results.append(await fn(item))
        except Exception as exc:
            if is_infrastructure(exc, outages):
                raise
            failures.append(Failure(item, exc))
    return Isolated(tuple(results), tuple(failures), runs, runs)


def record(metrics: DlqMetrics, stage: str, isolated: Isolated[T, R]) -> None:
    """Count a split batch (``crisiswatch_stage_isolations_total``) and log what was isolated."""
    if isolated.failures and isolated.split:
        metrics.isolations.labels(stage=stage).inc()
        log.warning("isolated %d of a batch after %d runs", len(isolated.failures), isolated.runs,
                    extra={"stage": stage, "errors": sorted({f.label for f in isolated.failures})})
