"""What a stage admits from a topic: the one decoder, and for a crisis, a rehearsal of its use.

A crisis event is read by several stages that must agree on it: the crisis agent (one member of
the worker group sees each event, and dead-letters what it refuses), the crisis reader on every
worker (which applies it to the crisis table), and the PostgreSQL sink (the system of record that
recovery republishes from). If the reader found out only while *applying* a crisis that it breaks
something — a geometry shapely refuses to index, a title no warning can be encoded with — each
worker would find out on its own, some (those with a citizen inside) and not others; and a crisis
accepted into the table would break every later check-in geofenced against it.

So every stage admits a crisis by decoding it through the one validation
(:mod:`pipeline.domain.validation`), then by :func:`rehearse`: the same code the worker runs on it
— index it, sweep a probe citizen inside it, move that citizen in by a check-in, build every kind
of warning it can cause and encode it, end it — on a scratch tracker. The verdict depends on the
crisis alone (not on where this worker's citizens are, nor on the clock), so every stage reaches
the same one: the crisis agent dead-letters a refused crisis, once; readers and the sink skip it. Whatever
raises in the rehearsal refuses the crisis, foreseen or not; ``pipeline.stage`` turns the
exception into the dead letter's reason.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Final, TypeVar, cast

from pipeline.domain.tracking import CitizenState, GeofenceConfig, Tracker, make_warning
from pipeline.domain.validation import DEFAULT_RULES, EventRules, decode_event
from schemas import Checkin, Crisis, InvalidEvent, encode
from schemas.models import Event, WarningKind

E = TypeVar("E", bound=Event)

PROBE_CITIZEN = "rehearsal-probe"
KINDS: tuple[WarningKind, ...] = ("inside", "entered", "near", "exited", "all_clear")


def admit_message(raw: bytes | None, model: type[E], now: datetime, rules: EventRules = DEFAULT_RULES) -> E:
    """Bytes from a topic to an event a stage can use: the one validation
    (:func:`pipeline.domain.validation.decode_event`), then for a crisis its rehearsal; raises
    (anything) if it cannot be used. A crisis admitted once is not admitted again in this process
    (:class:`AdmittedCrises`)."""
    if raw is None:
        raise InvalidEvent("empty message")
    if model is Crisis:
        return cast(E, ADMITTED_CRISES.admit(raw, rules))
    return decode_event(raw, model, now, rules)


class AdmittedCrises:
    """The crises this process has admitted, by a digest of their bytes and the rules they met.

    A worker admits every crisis event twice — its crisis agent dead-letters what is refused, its
    crisis reader loads the table — and every one again after a restart of the reader; each
    admission (schema, area normalised, rehearsal) costs milliseconds for a detailed area, so a
    thousand active crises kept a starting worker busy for seconds, twice. The verdict depends on
    the bytes and the rules alone (not on the clock: a crisis has no future-skew rule), so the
    second admission of the same bytes returns the first one's crisis. Only admitted crises are
    kept (a refusal is rare, and its exception is not shared between stages); at most
    ``capacity``, the oldest forgotten first, each a 16-byte digest next to a crisis the worker's
    table holds anyway. The crisis is immutable; its area, a mapping, is never modified by a stage.
    """

    def __init__(self, capacity: int = 20_000) -> None:
        self.capacity = capacity
        self._admitted: OrderedDict[tuple[bytes, EventRules], Crisis] = OrderedDict()
        self._lock = threading.Lock()  # the API admits in a thread pool
        self.hits = 0

    def admit(self, raw: bytes, rules: EventRules = DEFAULT_RULES) -> Crisis:
        key = (hashlib.blake2b(raw, digest_size=16).digest(), rules)
        with self._lock:
            known = self._admitted.get(key)
            if known is not None:
                self._admitted.move_to_end(key)
                self.hits += 1
                return known
        crisis = decode_event(raw, Crisis, _NO_CLOCK, rules)
        rehearse(crisis)
        with self._lock:
            self._admitted[key] = crisis
            while len(self._admitted) > self.capacity:
                self._admitted.popitem(last=False)
        return crisis


# A crisis's admission does not read the clock (see validation.admit): any instant will do.
_NO_CLOCK: Final = datetime(2000, 1, 1, tzinfo=UTC)
ADMITTED_CRISES: Final = AdmittedCrises()


def rehearse(crisis: Crisis) -> None:
    """Run an upsert through what the worker does with it, on a scratch tracker; raise what that raises.
    A cancel, or a crisis without an area, is not geofenced: there is nothing to rehearse."""
    if crisis.op == "cancel" or crisis.geometry is None:
        return
    tracker = Tracker(GeofenceConfig(exercise_mode=True))  # rehearse exercises too: the verdict must not depend on settings
    now = crisis.effective
    if not tracker.accept(crisis):
        return
    item = tracker.index.by_id[crisis.crisis_id]  # indexes the area and its proximity search area
    point = item.area.representative_point()
    probe = CitizenState(PROBE_CITIZEN, float(point.y), float(point.x), None, now)
    swept = tracker.on_upsert(crisis, [probe], now)
    moved = tracker.on_checkins([Checkin(PROBE_CITIZEN + "-2", probe.lat, probe.lon, now, "app", None)], {}, now)
    ended = tracker.on_end(crisis, [*swept.states.values(), *moved.states.values()], now)
    for warning in (*swept.warnings, *moved.warnings, *ended.warnings):
        encode(warning)
    for kind in KINDS:
        encode(make_warning(probe, crisis, kind, crisis.buffer_km, 0, now))
