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

from datetime import datetime
from typing import TypeVar

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
    (anything) if it cannot be used."""
    if raw is None:
        raise InvalidEvent("empty message")
    event = decode_event(raw, model, now, rules)
    if isinstance(event, Crisis):
        rehearse(event)
    return event


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
