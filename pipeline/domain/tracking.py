"""Who must be told what: the transition rules between a citizen and each active crisis.

Per citizen we keep the last known location and, per crisis, a :class:`Presence`: what the
citizen was last told (``in`` after inside/entered, ``near`` after near, ``out`` otherwise),
how many warnings they got about it (``seq``, part of the deterministic warning id), whether
they were ever warned (so they get the all-clear) and, while they seem to be leaving, since
when (the dwell rule).

Kinds (DESIGN.md §3):
- ``inside``: the citizen was already inside when the crisis was declared or its area grew;
- ``entered``: a check-in moved the citizen in;
- ``near``: within the crisis's ``buffer_km`` but outside;
- ``exited``: left the area. Hysteresis: a check-in outside the area counts as leaving only
  when it is farther from the edge than ``max(hysteresis_m, accuracy_m)``; and the citizen must
  still be outside after ``dwell_seconds`` (two check-ins at least that far apart) before
  ``exited`` is sent. A citizen standing on the boundary therefore never flaps. When the area
  itself shrinks away from a citizen (a crisis update), ``exited`` is sent at once: the area
  moved, not the GPS fix.
- ``all_clear``: the crisis was cancelled or expired; sent to everyone ever warned about it.

Every function here is pure: states in, warnings and new states out. Nobody is warned twice
about the same thing: an update of a crisis warns only citizens whose situation it changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Final, Literal

import numpy as np

from pipeline.domain.geofence import CrisisIndex, IndexedCrisis, search_box
from pipeline.domain.ids import warning_id
from pipeline.domain.messages import instruction_for
from schemas import Checkin, Crisis, Warning, format_time, parse_time
from schemas.models import WarningKind

Status = Literal["in", "near", "out"]


@dataclass(frozen=True, slots=True)
class GeofenceConfig:
    hysteresis_m: float = 50.0
    dwell_seconds: float = 120.0
    exercise_mode: bool = False


@dataclass(frozen=True, slots=True)
class Presence:
    status: Status = "out"
    version: int = 0
    seq: int = 0
    warned: bool = False
    leaving_since: datetime | None = None

    def to_list(self) -> list[Any]:
        return [self.status, self.version, self.seq, self.warned,
                None if self.leaving_since is None else format_time(self.leaving_since)]

    @classmethod
    def from_list(cls, raw: Sequence[Any]) -> Presence:
        return cls(raw[0], int(raw[1]), int(raw[2]), bool(raw[3]), None if raw[4] is None else parse_time(raw[4]))


@dataclass(frozen=True, slots=True)
class CitizenState:
    citizen_id: str
    lat: float
    lon: float
    accuracy_m: float | None
    observed_at: datetime
    presence: Mapping[str, Presence] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"lat": self.lat, "lon": self.lon, "acc": self.accuracy_m, "t": format_time(self.observed_at),
                "p": {cid: p.to_list() for cid, p in self.presence.items()}}

    @classmethod
    def from_dict(cls, citizen_id: str, raw: Mapping[str, Any]) -> CitizenState:
        return cls(citizen_id, float(raw["lat"]), float(raw["lon"]), raw.get("acc"), parse_time(raw["t"]),
                   {cid: Presence.from_list(p) for cid, p in raw.get("p", {}).items()})

    def with_presence(self, crisis_id: str, presence: Presence | None) -> CitizenState:
        updated = dict(self.presence)
        if presence is None:
            updated.pop(crisis_id, None)
        else:
            updated[crisis_id] = presence
        # the constructor, not dataclasses.replace: a sweep makes 100,000 of these at once
        return CitizenState(self.citizen_id, self.lat, self.lon, self.accuracy_m, self.observed_at, updated)


@dataclass(frozen=True, slots=True)
class Outcome:
    warnings: tuple[Warning, ...] = ()
    states: Mapping[str, CitizenState] = field(default_factory=dict)  # only the citizens that changed
    stale: int = 0  # check-ins older than the citizen's last known location, ignored


def make_warning(state: CitizenState, crisis: Crisis, kind: WarningKind, distance_km: float, seq: int,
                 emitted_at: datetime) -> Warning:
    return Warning(
        warning_id=warning_id(state.citizen_id, crisis.crisis_id, crisis.version, kind, seq),
        citizen_id=state.citizen_id, crisis_id=crisis.crisis_id, crisis_version=crisis.version, kind=kind,
        severity=crisis.severity, title=crisis.title, instruction=instruction_for(crisis, kind, distance_km),
        distance_km=round(distance_km, 3), lat=state.lat, lon=state.lon, observed_at=state.observed_at,
        emitted_at=emitted_at, country_codes=crisis.country_codes)


@dataclass(frozen=True, slots=True)
class TrackerSnapshot:
    """The crisis table at one moment (crises are immutable, so shallow copies suffice)."""

    crises: Mapping[str, Crisis]
    ended: Mapping[str, int]
    finished: Mapping[str, Crisis]


_OUT: Final = Presence()  # what a citizen holds about a crisis they were never told of


class Tracker:
    """The active crises and the rules; citizen states are passed in and handed back."""

    def __init__(self, config: GeofenceConfig | None = None) -> None:
        self.config = config or GeofenceConfig()
        self.crises: dict[str, Crisis] = {}
        self.ended: dict[str, int] = {}  # crisis_id -> version that ended it (cancels are final for older versions)
        self.finished: dict[str, Crisis] = {}  # the last active form of each ended crisis, for late all-clears
        self._index: CrisisIndex | None = None
        self._alone: dict[str, CrisisIndex] = {}  # crisis id -> an index of that crisis alone, until the full one

    # -- the crisis table ------------------------------------------------------------------------
    @property
    def index(self) -> CrisisIndex:
        if self._index is None:
            self._index = CrisisIndex(self.crises.values())
        return self._index

    def sweep_index(self, crisis_id: str) -> CrisisIndex:
        """An index to sweep one crisis with: the full one once built, else one of that crisis alone.
        Indexing a thousand crises takes longer than sending a sweep's first warnings; the check-ins
        build the full index when they need it. The crisis is indexed the same way in both, so the
        sweep is the same; and a crisis that cannot be indexed raises here, before any sweep."""
        if self._index is not None:
            return self._index
        index = self._alone.get(crisis_id)
        crisis = self.crises.get(crisis_id)
        if index is None or crisis is None or index.by_id[crisis_id].crisis is not crisis:
            index = CrisisIndex([crisis] if crisis is not None else [])
            self._alone = {crisis_id: index}
        return index

    def snapshot(self) -> TrackerSnapshot:
        return TrackerSnapshot(dict(self.crises), dict(self.ended), dict(self.finished))

    def restore(self, snapshot: TrackerSnapshot) -> None:
        """Put the crisis table back as it was (a crisis event whose application failed half way)."""
        self.crises, self.ended, self.finished = dict(snapshot.crises), dict(snapshot.ended), dict(snapshot.finished)
        self._index = None

    def search_bounds(self, crisis_id: str) -> tuple[float, float, float, float] | None:
        """Bounds (min lat, max lat, min lon, max lon) that hold every point a sweep of this crisis may
        find inside or near it (:func:`pipeline.domain.geofence.search_box`, the index's own candidate
        bounds), to select the citizens worth sweeping from columns before the exact test. None when
        the crisis is not indexed."""
        item = self.sweep_index(crisis_id).by_id.get(crisis_id)
        if item is None:
            return None
        minx, miny, maxx, maxy = search_box(item)
        return (miny, maxy, minx, maxx)

    def reaches_citizens(self, crisis: Crisis) -> bool:
        return crisis.status == "actual" or self.config.exercise_mode

    def accept(self, crisis: Crisis, now: datetime | None = None) -> bool:
        """Record an upsert if it is newer than what we know; False for stale or ignored events.
        A crisis already expired at ``now`` warns nobody: it ends what an earlier version started."""
        if not self.reaches_citizens(crisis) or crisis.geometry is None:
            return False
        known = self.crises.get(crisis.crisis_id)
        if known is not None and known.version >= crisis.version:
            return False
        if self.ended.get(crisis.crisis_id, 0) >= crisis.version:
            return False
        if now is not None and crisis.expires is not None and crisis.expires <= now:
            self.end(crisis.crisis_id, crisis.version)
            self.finished.setdefault(crisis.crisis_id, crisis)
            return False
        self.crises[crisis.crisis_id] = crisis
        self._index = None
        return True

    def end(self, crisis_id: str, version: int) -> Crisis | None:
        """Remove an active crisis (cancel); returns it if it was active."""
        self.ended[crisis_id] = max(version, self.ended.get(crisis_id, 0))
        ended = self.crises.pop(crisis_id, None)
        if ended is not None:
            self._index = None
            self.finished[crisis_id] = ended
        return ended

    def leftovers(self, states: Iterable[CitizenState]) -> list[Crisis]:
        """Ended crises some of these citizens still hold a presence for (their all-clear is due)."""
        return self.due_all_clears({cid for s in states for cid in s.presence})

    def due_all_clears(self, held: Iterable[str]) -> list[Crisis]:
        """Of the crises some citizens hold a presence for, the ended ones (their all-clear is due)."""
        return [self.finished[cid] for cid in sorted(set(held)) if cid in self.finished and cid not in self.crises]

    def expired(self, now: datetime) -> list[Crisis]:
        """Remove and return the crises whose ``expires`` has passed."""
        gone = [c for c in self.crises.values() if c.expires is not None and c.expires <= now]
        for crisis in gone:
            self.end(crisis.crisis_id, crisis.version)
        return gone

    # -- check-ins -------------------------------------------------------------------------------
    def on_checkins(self, checkins: Sequence[Checkin], states: Mapping[str, CitizenState],
                    now: datetime | None) -> Outcome:
        """Geofence a batch of check-ins (one vectorised index call) and apply the transitions in order.

        ``now`` is the warnings' ``emitted_at``; ``None`` stamps each with its check-in's ``observed_at``
        (the offline engine, where time is the events' own)."""
        index = self.index
        lats = np.fromiter((c.lat for c in checkins), dtype=float, count=len(checkins))
        lons = np.fromiter((c.lon for c in checkins), dtype=float, count=len(checkins))
        found = index.match_columns(lats, lons)
        matches: list[dict[str, float]] = [{} for _ in checkins]
        ids = index.ids
        for p, c, d in zip(found.point.tolist(), found.crisis.tolist(), found.distance_km.tolist(), strict=True):
            matches[p][ids[c]] = d
        self._distances_to_known_crises(checkins, states, matches, lats, lons)
        changed: dict[str, CitizenState] = {}
        warnings: list[Warning] = []
        stale = 0
        for i, checkin in enumerate(checkins):
            prev = changed.get(checkin.citizen_id) or states.get(checkin.citizen_id)
            if prev is not None and checkin.observed_at < prev.observed_at:
                stale += 1
                continue
            state = CitizenState(checkin.citizen_id, checkin.lat, checkin.lon, checkin.accuracy_m, checkin.observed_at,
                                 prev.presence if prev is not None else {})
            reached = matches[i]
            if not reached and not state.presence:  # near no crisis, told of none: only the location changes
                changed[checkin.citizen_id] = state
                continue
            relevant = {cid for cid, d in reached.items() if d <= index.by_id[cid].crisis.buffer_km} \
                | {cid for cid, p in state.presence.items() if p.status != "out"}
            for crisis_id in sorted(relevant):
                item = index.by_id.get(crisis_id)
                if item is None:
                    if crisis_id in self.ended:  # ended while this citizen's state still mentioned it
                        state = state.with_presence(crisis_id, None)
                    continue  # otherwise not known here yet: keep what the citizen was told
                distance = reached[crisis_id] if crisis_id in reached else item.distance_km(state.lat, state.lon)
                state, warning = self._move(state, item, distance, now or checkin.observed_at)
                if warning is not None:
                    warnings.append(warning)
            changed[checkin.citizen_id] = state
        return Outcome(tuple(warnings), changed, stale)

    def _distances_to_known_crises(self, checkins: Sequence[Checkin], states: Mapping[str, CitizenState],
                                   matches: list[dict[str, float]], lats: np.ndarray, lons: np.ndarray) -> None:
        """Add to ``matches`` the distance of each check-in to the crises its citizen may be in or near
        (from the stored state, or from another check-in of the batch): the exit rules need them. One
        vectorised call for the whole batch, whatever crises it touches."""
        index = self.index
        of_citizen: dict[str, set[str]] = {}
        for i, checkin in enumerate(checkins):
            known = of_citizen.get(checkin.citizen_id)
            if known is None:
                state = states.get(checkin.citizen_id)
                known = of_citizen[checkin.citizen_id] = {cid for cid, p in state.presence.items()
                                                          if p.status != "out"} if state else set()
            known.update(matches[i])
        point: list[int] = []
        crisis: list[int] = []
        position = index.position
        for i, checkin in enumerate(checkins):
            for cid in of_citizen[checkin.citizen_id]:
                if cid not in matches[i] and cid in position:
                    point.append(i)
                    crisis.append(position[cid])
        if not point:
            return
        distances = index.pair_distances_km(np.asarray(point, dtype=np.int64), np.asarray(crisis, dtype=np.int64),
                                            lats, lons)
        ids = index.ids
        for i, k, distance in zip(point, crisis, distances.tolist(), strict=True):
            matches[i][ids[k]] = distance

    def _margin_km(self, state: CitizenState) -> float:
        return max(self.config.hysteresis_m, state.accuracy_m or 0.0) / 1000.0

    def _move(self, state: CitizenState, item: IndexedCrisis, distance: float,
              now: datetime) -> tuple[CitizenState, Warning | None]:
        crisis = item.crisis
        presence = state.presence.get(crisis.crisis_id, _OUT)
        status = presence.status
        # Most check-ins change nothing (still inside, still near): they return at once, with no new
        # Presence or CitizenState built (``_emit`` would find the new presence equal and keep the state).
        if distance == 0.0:
            if status == "in":
                if presence.leaving_since is None:
                    return state, None
                return self._emit(state, crisis, presence, Presence("in", presence.version, presence.seq,
                                                                    presence.warned, None), None, distance, now)
            return self._emit(state, crisis, presence, Presence("in", presence.version, presence.seq, presence.warned,
                                                                None), "entered", distance, now)
        band = crisis.buffer_km
        if status == "in":
            if distance <= self._margin_km(state):
                if presence.leaving_since is None:
                    return state, None
                return self._emit(state, crisis, presence, Presence("in", presence.version, presence.seq,
                                                                    presence.warned, None), None, distance, now)
            since = presence.leaving_since or state.observed_at
            if (state.observed_at - since).total_seconds() >= self.config.dwell_seconds:
                return self._emit(state, crisis, presence,
                                  Presence("near" if distance <= band else "out", presence.version, presence.seq,
                                           presence.warned, None), "exited", distance, now)
            if since is presence.leaving_since:
                return state, None
            return self._emit(state, crisis, presence, Presence("in", presence.version, presence.seq, presence.warned,
                                                                since), None, distance, now)
        if distance <= band:
            if status == "out":
                return self._emit(state, crisis, presence, Presence("near", presence.version, presence.seq,
                                                                    presence.warned, presence.leaving_since),
                                  "near", distance, now)
            return state, None
        if status == "near" and distance > band + self._margin_km(state):
            return self._emit(state, crisis, presence, Presence("out", presence.version, presence.seq, presence.warned,
                                                                presence.leaving_since), None, distance, now)
        return state, None

    def _emit(self, state: CitizenState, crisis: Crisis, old: Presence, new: Presence, kind: WarningKind | None,
              distance: float, now: datetime) -> tuple[CitizenState, Warning | None]:
        warning = None
        if kind is not None:
            warning = make_warning(state, crisis, kind, distance, old.seq, now)
            new = Presence(new.status, crisis.version, old.seq + 1, True, new.leaving_since)
        if new == old and crisis.crisis_id in state.presence:
            return state, warning
        if new == Presence():
            if crisis.crisis_id not in state.presence:
                return state, warning  # nothing held, nothing to hold: the state did not change
            return state.with_presence(crisis.crisis_id, None), warning
        return state.with_presence(crisis.crisis_id, new), warning

    # -- crisis events ---------------------------------------------------------------------------
    def on_upsert(self, crisis: Crisis, states: Iterable[CitizenState], now: datetime) -> Outcome:
        """Sweep the given citizens against a crisis just accepted: warn the newly covered, no one twice."""
        index = self.sweep_index(crisis.crisis_id)
        item = index.by_id.get(crisis.crisis_id)
        if item is None:
            return Outcome()
        pool = list(states)
        if not pool:
            return Outcome()
        lats = np.fromiter((s.lat for s in pool), dtype=float, count=len(pool))
        lons = np.fromiter((s.lon for s in pool), dtype=float, count=len(pool))
        inside = index.inside_mask(crisis.crisis_id, lats, lons)
        candidates = inside | index.candidate_mask(crisis.crisis_id, lats, lons)
        held = np.fromiter(((p := s.presence.get(crisis.crisis_id)) is not None and p.status != "out" for s in pool),
                           dtype=bool, count=len(pool))
        swept = candidates | held
        measure = swept & ~inside
        distances = np.zeros(len(pool), dtype=float)  # one vectorised call, not one per citizen
        if measure.any():
            distances[measure] = item.distances_km(lats[measure], lons[measure])
        changed: dict[str, CitizenState] = {}
        warnings: list[Warning] = []
        for i in np.flatnonzero(swept).tolist():
            state = pool[i]
            new_state, warning = self._sweep_one(state, item, float(distances[i]), now)
            if new_state is not state:
                changed[state.citizen_id] = new_state
            if warning is not None:
                warnings.append(warning)
        return Outcome(tuple(warnings), changed)

    def _sweep_one(self, state: CitizenState, item: IndexedCrisis, distance: float,
                   now: datetime) -> tuple[CitizenState, Warning | None]:
        crisis = item.crisis
        presence = state.presence.get(crisis.crisis_id, Presence())
        kind: WarningKind | None = None
        new = presence
        if distance == 0.0:
            if presence.status != "in":
                kind, new = "inside", Presence("in", presence.version, presence.seq, presence.warned, None)
        elif presence.status == "in":
            # The area moved away from a citizen who stood still: "exited" at once, no dwell. A citizen
            # already walking out (a check-in beyond the margin started the dwell clock) is left to the
            # dwell rule: a sweep that merely re-reads the crisis (the reconcile after a restart or a
            # rebalance) must not cut their dwell short, or they would be told twice as they leave.
            if distance > self._margin_km(state) and presence.leaving_since is None:
                kind, new = "exited", replace(presence, status="near" if distance <= crisis.buffer_km else "out",
                                              leaving_since=None)
        elif distance <= crisis.buffer_km:
            if presence.status == "out":
                kind, new = "near", replace(presence, status="near")
        elif presence.status == "near":
            new = replace(presence, status="out")
        return self._emit(state, crisis, presence, new, kind, distance, now)

    def on_end(self, crisis: Crisis, states: Iterable[CitizenState], now: datetime) -> Outcome:
        """A crisis was cancelled or expired: all-clear to everyone ever warned, and forget it."""
        changed: dict[str, CitizenState] = {}
        warnings: list[Warning] = []
        for state in states:
            presence = state.presence.get(crisis.crisis_id)
            if presence is None:
                continue
            if presence.warned:
                ended = replace(crisis, version=max(crisis.version, presence.version))
                warnings.append(make_warning(state, ended, "all_clear", 0.0, presence.seq, now))
            changed[state.citizen_id] = state.with_presence(crisis.crisis_id, None)
        return Outcome(tuple(warnings), changed)
