"""Rebuild what a worker remembers from what PostgreSQL recorded, after the broker lost it.

The embedded broker is not durable: when it restarts, the crisis log (``crisis-events``) and the
worker's memory (the citizen-state table's changelog) are gone, while PostgreSQL still holds every
crisis version, every registered citizen, their check-ins and every warning sent, each under its
deterministic id. From those this module derives, without I/O, what to publish again so that the
worker carries on as if nothing had happened:

- the crisis events: the latest version of every active crisis (the worker's crisis table); and,
  for each ended crisis some citizen still holds a presence for, its last active form followed by
  its cancel. A worker learns of an ended crisis only by seeing it active and then ended
  (:meth:`Tracker.end` records it in ``finished``); only then does its reconcile send the
  all-clear those citizens are owed (:meth:`Tracker.leftovers`);
- each citizen's state exactly as :mod:`pipeline.domain.tracking` keeps it: the last known
  location and, per crisis, a :class:`Presence` replayed from the warnings the citizen got.

How a presence is read back from the warnings about one crisis:

- the warnings are put in the order they were sent: by crisis version, then by ``seq``. Both
  only grow while a citizen holds a presence, and a crisis can warn again after its all-clear
  only under a newer version, so this order needs no clock. ``seq`` is not stored, but the
  warning id hashes it in (:func:`pipeline.domain.ids.warning_id`): it is found by recomputing
  the id for each candidate;
- the presence is what the warnings since the last ``all_clear`` made of it. None at all (the
  all-clear was sent, or no warning) means no presence, as in the worker;
- ``status``: ``in`` after ``inside``/``entered``, ``near`` after ``near``; after ``exited``,
  ``near`` if the citizen was then within the crisis's band, else ``out`` (as
  :meth:`Tracker._move` decides, from the distance the warning records and the band of the
  version it names). Transitions the worker makes silently (``near`` -> ``out`` far away) leave no
  warning behind; the worker's reconcile after its recovery makes them again;
- ``version``: the crisis version of the last warning; ``warned``: true;
- ``seq``: one past the highest already used, so the next warning about the crisis, the
  all-clear included, gets an id never sent before;
- ``leaving_since`` (the dwell clock of a citizen seemingly walking out) is not recorded
  anywhere: for a citizen told ``in`` whose last location lies outside the area, the clock starts
  again at that location's time. The citizen is then told ``exited`` once the dwell rule holds
  again (at the earliest one dwell after their last check-in), never twice, and the reconcile
  sweep after the recovery leaves them to that rule as it does for a worker that never stopped.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from pipeline.domain.accountability import Fact, Standing, apply
from pipeline.domain.delivery import DeliveryRow, final_outcome
from pipeline.domain.geofence import CrisisIndex
from pipeline.domain.ids import warning_id
from pipeline.domain.tracking import CitizenState, Presence, Status
from schemas import Checkin, Citizen, Crisis, Delivery, Warning

# A check-in dated further ahead than this (a wrong clock on a phone) is not a location to restore:
# it would make every later, true check-in of that citizen look stale.
FUTURE_TOLERANCE = timedelta(minutes=5)

# Ids are tried for this many seqs past the number of warnings found, in case some never reached
# PostgreSQL.
SEQ_SEARCH_MARGIN = 64

_STATUS_AFTER: Mapping[str, Status] = {"inside": "in", "entered": "in", "near": "near"}


@dataclass(frozen=True, slots=True)
class RecoveryPlan:
    """What to publish again, in order: crisis events (keyed by crisis), citizens, citizen states."""

    crisis_events: tuple[Crisis, ...] = ()
    active: tuple[str, ...] = ()  # crises active at the time of the plan
    ended: tuple[str, ...] = ()  # ended crises republished so the all-clears they still owe are sent
    citizens: tuple[Citizen, ...] = ()
    states: tuple[CitizenState, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.crisis_events or self.citizens or self.states)

    @property
    def warned(self) -> int:
        """Citizens holding a presence (warned about a crisis not yet all-cleared for them)."""
        return sum(1 for s in self.states if s.presence)


def seq_of(warning: Warning, limit: int) -> int | None:
    """The ``seq`` hashed into a warning's id (how many warnings about the crisis came before it),
    or None when no seq below ``limit`` gives that id."""
    for seq in range(limit):
        if warning_id(warning.citizen_id, warning.crisis_id, warning.crisis_version, warning.kind, seq) \
                == warning.warning_id:
            return seq
    return None


def presence_from(warnings: Sequence[Warning], bands: Mapping[tuple[str, int], float]) -> Presence | None:
    """The presence a citizen holds for one crisis after receiving these warnings about it (any order).

    ``bands`` gives ``buffer_km`` per (crisis id, version) to tell ``near`` from ``out`` after an
    ``exited``; when the version is unknown, ``near`` (the worker's reconcile turns it into ``out``
    when the citizen is farther away, silently)."""
    if not warnings:
        return None
    limit = len(warnings) + SEQ_SEARCH_MARGIN
    found = [(w, seq_of(w, limit)) for w in warnings]
    # In sending order: version, then seq; a warning whose id hides no seq (not made by the tracker)
    # after the others of its version; then by time, then id, so ties are stable.
    found.sort(key=lambda f: (f[0].crisis_version, limit if f[1] is None else f[1], f[0].emitted_at,
                              f[0].warning_id))
    last_clear = max((i for i, (w, _) in enumerate(found) if w.kind == "all_clear"), default=-1)
    episode = found[last_clear + 1:]
    if not episode:
        return None
    last = episode[-1][0]
    known = [seq for _, seq in episode if seq is not None]
    # Ids whose seq is unknown collide with none the tracker makes; still, never count fewer warnings
    # than were found.
    used = max(known) if len(known) == len(episode) else max([*known, len(episode) - 1])
    return Presence(status=_status_after(last, bands), version=last.crisis_version, seq=used + 1, warned=True)


def _status_after(warning: Warning, bands: Mapping[tuple[str, int], float]) -> Status:
    if warning.kind in _STATUS_AFTER:
        return _STATUS_AFTER[warning.kind]
    band = bands.get((warning.crisis_id, warning.crisis_version))  # "exited"
    return "near" if band is None or warning.distance_km <= band else "out"


def rebuild_states(locations: Iterable[Checkin], warnings: Iterable[Warning], bands: Mapping[tuple[str, int], float],
                   now: datetime, future_tolerance: timedelta = FUTURE_TOLERANCE) -> list[CitizenState]:
    """Every citizen's state from their last check-in and the warnings they got, in citizen-id order.

    The last known location is the latest of the last check-in and the locations the warnings were
    based on (check-in history is deleted after its retention period; a warning keeps where the
    citizen was). Locations dated after ``now + future_tolerance`` are ignored. A citizen with no
    usable location gets no state: the worker keeps none without one."""
    latest_allowed = now + future_tolerance
    where: dict[str, tuple[datetime, float, float, float | None]] = {}

    def seen(citizen_id: str, at: datetime, lat: float, lon: float, accuracy_m: float | None) -> None:
        if at > latest_allowed:
            return
        known = where.get(citizen_id)
        if known is None or at > known[0]:
            where[citizen_id] = (at, lat, lon, accuracy_m)

    for checkin in locations:
        seen(checkin.citizen_id, checkin.observed_at, checkin.lat, checkin.lon, checkin.accuracy_m)
    history: dict[str, dict[str, list[Warning]]] = defaultdict(lambda: defaultdict(list))
    for warning in warnings:
        history[warning.citizen_id][warning.crisis_id].append(warning)
        seen(warning.citizen_id, warning.observed_at, warning.lat, warning.lon, None)
    states: list[CitizenState] = []
    for citizen_id in sorted(where):
        at, lat, lon, accuracy_m = where[citizen_id]
        presence = {crisis_id: p for crisis_id, got in sorted(history.get(citizen_id, {}).items())
                    if (p := presence_from(got, bands)) is not None}
        states.append(CitizenState(citizen_id, lat, lon, accuracy_m, at, presence))
    return states


def is_active(crisis: Crisis, now: datetime) -> bool:
    """The latest version of a crisis still in force: not a cancel, not expired."""
    return crisis.op == "upsert" and (crisis.expires is None or crisis.expires > now)


def crisis_events(history: Iterable[Crisis], held: Collection[str],
                  now: datetime) -> tuple[list[Crisis], list[str], list[str]]:
    """The crisis events to publish again, the active crisis ids and the ended ones republished.

    ``history`` holds every recorded version of every crisis (any order); ``held`` the crises some
    restored citizen holds a presence for. Active crises: their latest version. Ended crises in
    ``held``: their last upsert (already expired, the worker ends it on sight) and, when they were
    cancelled, the latest cancel after it. Ended crises nobody holds are left out."""
    versions: dict[str, list[Crisis]] = defaultdict(list)
    for crisis in history:
        versions[crisis.crisis_id].append(crisis)
    events: list[Crisis] = []
    active: list[str] = []
    ended: list[str] = []
    for crisis_id in sorted(versions):
        ordered = sorted(versions[crisis_id], key=lambda c: c.version)
        latest = ordered[-1]
        if is_active(latest, now):
            events.append(latest)
            active.append(crisis_id)
            continue
        if crisis_id not in held:
            continue
        upserts = [c for c in ordered if c.op == "upsert"]
        if not upserts:
            continue  # never active as far as PostgreSQL knows: nothing a worker could end
        events.append(upserts[-1])
        if latest.op == "cancel":
            events.append(latest)
        ended.append(crisis_id)
    return events, active, ended


def plan_recovery(crises: Iterable[Crisis], citizens: Iterable[Citizen], locations: Iterable[Checkin],
                  warnings: Iterable[Warning], now: datetime,
                  future_tolerance: timedelta = FUTURE_TOLERANCE) -> RecoveryPlan:
    """Everything to republish, from the rows PostgreSQL holds, as of ``now``."""
    history = list(crises)
    bands = {(c.crisis_id, c.version): c.buffer_km for c in history}
    states = rebuild_states(locations, warnings, bands, now, future_tolerance)
    held = {crisis_id for s in states for crisis_id in s.presence}
    events, active, ended = crisis_events(history, held, now)
    states = restart_dwell_clocks(states, [e for e in events if e.op == "upsert"])
    return RecoveryPlan(tuple(events), tuple(active), tuple(ended),
                        tuple(sorted(citizens, key=lambda c: c.citizen_id)), tuple(states))


def restart_dwell_clocks(states: Sequence[CitizenState], areas: Iterable[Crisis]) -> list[CitizenState]:
    """Start the dwell clock, at the last location's time, of every citizen told ``in`` whose last
    location lies outside that crisis's area (the last upsert republished for it)."""
    index = CrisisIndex(areas)
    out: list[CitizenState] = []
    for state in states:
        for crisis_id, presence in list(state.presence.items()):
            item = index.by_id.get(crisis_id)
            if (item is not None and presence.status == "in" and presence.leaving_since is None
                    and item.distance_km(state.lat, state.lon) > 0.0):
                state = state.with_presence(crisis_id, replace(presence, leaving_since=state.observed_at))
        out.append(state)
    return out


# --- accountability standings ------------------------------------------------------------------
#
# The accountability process (:mod:`pipeline.accountability_app`) keeps each citizen's standing per
# crisis in a table whose changelog the broker loses with everything else. Every fact it folds is
# recorded in PostgreSQL too: the warnings (the sink), the deliveries (the dispatcher, one row per
# warning, channel and address), the replies (the sink) and the escalation cases (the sink's
# ``cases``, and ``escalations`` where the sweep notes the case it opened). Folded with the very
# :func:`pipeline.domain.accountability.apply` the process uses, they give back the standings it held,
# and so the counts it published: every transition is idempotent and order-insensitive, so the order
# the rows come in does not matter.


@dataclass(frozen=True, slots=True)
class RecordedDelivery:
    """One row of ``deliveries``: how far one warning got through one channel and address, and when."""

    warning_id: str
    citizen_id: str
    crisis_id: str
    row: DeliveryRow
    at: datetime  # the row's latest time (delivered, last attempt, or created)


def delivery_outcomes(recorded: Iterable[RecordedDelivery]) -> list[Delivery]:
    """The ``delivery/1`` outcome each warning had, from its rows, by the rule the dispatcher publishes
    it by (:func:`pipeline.domain.delivery.final_outcome`): ``delivered`` when a row was delivered,
    ``gave_up`` when every row gave up, none while one is still in flight. In warning-id order."""
    per_warning: dict[str, list[RecordedDelivery]] = defaultdict(list)
    for item in recorded:
        per_warning[item.warning_id].append(item)
    outcomes: list[Delivery] = []
    for key in sorted(per_warning):
        got = per_warning[key]
        at = max(item.at for item in got)
        # final_outcome reads only the warning's ids: the rest of this stand-in plays no part
        warning = Warning(key, got[0].citizen_id, got[0].crisis_id, 1, "inside", "unknown", "", "", 0.0, 0.0, 0.0,
                          at, at)
        outcome = final_outcome(warning, [item.row for item in got], at)
        if outcome is not None:
            outcomes.append(outcome)
    return outcomes


def rebuild_standings(facts: Iterable[Fact]) -> dict[tuple[str, str], Standing]:
    """Each citizen's standing per crisis, keyed by (crisis id, citizen id), folded from the facts in
    any order as the accountability process folds them. A fact that changes nothing leaves no standing
    behind (the process stores none for it either)."""
    standings: dict[tuple[str, str], Standing] = {}
    for fact in facts:
        key = (fact.crisis_id, fact.citizen_id)
        standings[key] = apply(standings.get(key, Standing()), fact)
    return {key: standing for key, standing in sorted(standings.items()) if standing != Standing()}
