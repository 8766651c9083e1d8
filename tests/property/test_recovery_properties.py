"""Recovery from PostgreSQL, for any history: the states rebuilt from the recorded rows are the
tracker's own (but for what it does silently), and a worker carrying on from them sends exactly
what the uninterrupted one sends: the same warnings under the same ids, none sent before."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.domain.recovery import plan_recovery
from pipeline.domain.tracking import CitizenState, Outcome, Tracker
from pipeline.testing import T0, make_checkin, make_crisis, square
from schemas import Checkin, Crisis, Warning

AREAS = {"a": (square(0.0, 0.0, 0.1), square(0.0, 0.0, 0.2)), "b": (square(0.35, 0.0, 0.1), square(0.4, 0.0, 0.1))}
BANDS = (0.0, 3.0, 8.0)
POINTS = ((0.0, 0.0), (0.0, 0.1005), (0.0, 0.13), (0.0, 0.16), (0.0, 0.25), (0.0, 0.35), (0.0, 1.0), (0.1, 0.3))
CITIZENS = ("c0", "c1", "c2")

checkin_op = st.tuples(st.just("checkin"), st.sampled_from(CITIZENS), st.integers(0, len(POINTS) - 1),
                       st.integers(1, 200))
upsert_op = st.tuples(st.just("upsert"), st.sampled_from(sorted(AREAS)), st.integers(0, 1),
                      st.integers(0, len(BANDS) - 1))
cancel_op = st.tuples(st.just("cancel"), st.sampled_from(sorted(AREAS)), st.just(0), st.just(0))
histories = st.lists(st.one_of(checkin_op, checkin_op, upsert_op, cancel_op), min_size=1, max_size=40)


class Worker:
    """The worker's rules (pipeline.runtime.GeofenceRuntime) on a tracker and a dict of states, in sync."""

    def __init__(self, states: dict[str, CitizenState] | None = None) -> None:
        self.tracker = Tracker()
        self.states: dict[str, CitizenState] = dict(states or {})
        self.sent: list[Warning] = []

    def _apply(self, outcome: Outcome) -> None:
        self.sent += outcome.warnings
        self.states.update(outcome.states)

    def _clear_ended(self, now: datetime) -> None:
        for ended in self.tracker.leftovers(self.states.values()):
            self._apply(self.tracker.on_end(ended, list(self.states.values()), now))

    def crisis(self, crisis: Crisis, now: datetime) -> None:
        if crisis.op == "cancel":
            self.tracker.end(crisis.crisis_id, crisis.version)
        elif self.tracker.accept(crisis, now):
            self._apply(self.tracker.on_upsert(crisis, list(self.states.values()), now))
        self._clear_ended(now)

    def checkin(self, checkin: Checkin, now: datetime) -> None:
        self._apply(self.tracker.on_checkins([checkin], self.states, now))

    def remember(self, crises: Iterable[Crisis], now: datetime) -> None:
        for crisis in crises:
            if crisis.op == "cancel":
                self.tracker.end(crisis.crisis_id, crisis.version)
            else:
                self.tracker.accept(crisis, now)

    def reconcile(self, now: datetime) -> None:
        self.tracker.expired(now)
        for crisis in sorted(self.tracker.crises.values(), key=lambda c: c.crisis_id):
            self._apply(self.tracker.on_upsert(crisis, list(self.states.values()), now))
        self._clear_ended(now)


def live(history: list[tuple[str, str, int, int]]) -> tuple[Worker, list[Crisis], list[Checkin], datetime]:
    worker, crises, checkins = Worker(), [], []
    versions = dict.fromkeys(AREAS, 0)
    now = T0
    for kind, who, what, extra in history:
        now += timedelta(seconds=extra if kind == "checkin" else 1)
        if kind == "checkin":
            checkin = make_checkin(who, *POINTS[what], observed_at=now, accuracy_m=20.0)
            checkins.append(checkin)
            worker.checkin(checkin, now)
            continue
        versions[who] += 1
        crisis = make_crisis(who, AREAS[who][what] if kind == "upsert" else None, op=kind, version=versions[who],
                             buffer_km=BANDS[extra], effective=T0)
        crises.append(crisis)
        worker.crisis(crisis, now)
    return worker, crises, checkins, now


def carry_on(worker: Worker, now: datetime) -> list[Warning]:
    """After the restart: reconcile, then every crisis still active is cancelled."""
    worker.sent = []
    worker.reconcile(now)
    for crisis in sorted(worker.tracker.crises.values(), key=lambda c: c.crisis_id):
        worker.crisis(replace(crisis, op="cancel", version=crisis.version + 100, geometry=None), now)
    return worker.sent


@settings(max_examples=300, deadline=None)
@given(history=histories)
def test_rebuilt_states_are_the_trackers_and_the_worker_carries_on_identically(
        history: list[tuple[str, str, int, int]]) -> None:
    original, crises, checkins, now = live(history)
    before = list(original.sent)
    restart = now + timedelta(seconds=1)

    plan = plan_recovery(crises, [], checkins, before, restart)
    rebuilt = {s.citizen_id: s for s in plan.states}
    assert set(rebuilt) == set(original.states)
    for citizen_id, state in rebuilt.items():
        kept = original.states[citizen_id]
        assert (state.lat, state.lon, state.accuracy_m, state.observed_at) == \
            (kept.lat, kept.lon, kept.accuracy_m, kept.observed_at)
        assert set(state.presence) == set(kept.presence)
        for crisis_id, presence in state.presence.items():
            truth = kept.presence[crisis_id]
            assert (presence.version, presence.seq, presence.warned) == (truth.version, truth.seq, truth.warned)
            # the only status the worker changes without a warning: near -> out, when the citizen went far
            assert presence.status == truth.status or (presence.status, truth.status) == ("near", "out")

    recovered = Worker(rebuilt)
    recovered.remember(plan.crisis_events, restart)
    after = carry_on(recovered, restart)
    uninterrupted = carry_on(original, restart)
    assert sorted(w.warning_id for w in after) == sorted(w.warning_id for w in uninterrupted)
    assert not {w.warning_id for w in after} & {w.warning_id for w in before}
    assert recovered.states == original.states
    assert all(not s.presence for s in recovered.states.values())  # every warned citizen was all-cleared
