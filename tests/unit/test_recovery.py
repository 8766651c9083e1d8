"""Rebuilding the worker's memory from PostgreSQL's rows: the same states, and afterwards the same
warnings, with the same ids, as if the broker had never lost anything."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from datetime import datetime, timedelta

from prometheus_client import CollectorRegistry

from pipeline.domain.ids import warning_id
from pipeline.domain.recovery import FUTURE_TOLERANCE, crisis_events, plan_recovery, presence_from, seq_of
from pipeline.domain.tracking import CitizenState, GeofenceConfig, Presence, make_warning
from pipeline.metrics import WorkerMetrics
from pipeline.runtime import GeofenceRuntime, MemoryEmitter, RawMessage
from pipeline.testing import T0, make_checkin, make_crisis, square
from schemas import Channel, Checkin, Citizen, Crisis, Warning, encode

FLOOD_AREA = square(106.8, -6.2, 0.1)  # about 22 km across, centred on Jakarta
INSIDE = (-6.2, 106.8)
NEAR = (-6.2, 106.93)  # about 3.3 km east of the edge
FAR = (-7.5, 106.8)
STORM_AREA = square(20.0, 20.0, 0.5)
QUAKE_AREA = square(30.0, 10.0, 0.5)
SLIDE_AREA = square(50.0, 20.0, 0.5)


def minutes(n: float) -> datetime:
    return T0 + timedelta(minutes=n)


class World:
    """A worker runtime (state in a dict, output in memory) and what PostgreSQL would have recorded."""

    def __init__(self, now: datetime, states: dict[str, dict] | None = None) -> None:  # type: ignore[type-arg]
        self.now = now
        self.states: dict[str, dict] = states if states is not None else {}  # type: ignore[type-arg]
        self.emitter = MemoryEmitter()
        self.runtime = GeofenceRuntime(GeofenceConfig(), self.states, self.emitter,
                                       WorkerMetrics(CollectorRegistry()), clock=lambda: self.now)
        self.crises: list[Crisis] = []
        self.checkins: list[Checkin] = []

    async def crisis(self, crisis: Crisis, at: datetime) -> None:
        self.now = at
        self.crises.append(crisis)
        await self.runtime.apply_crisis(crisis)

    async def checkin(self, citizen_id: str, where: tuple[float, float], at: datetime) -> None:
        self.now = at
        checkin = make_checkin(citizen_id, *where, observed_at=at)
        self.checkins.append(checkin)
        await self.runtime.process_checkins([RawMessage(encode(checkin), citizen_id.encode())])

    def state(self, citizen_id: str) -> CitizenState:
        return CitizenState.from_dict(citizen_id, self.states[citizen_id])


FLOOD = make_crisis("flood", FLOOD_AREA, buffer_km=5.0, effective=T0)
FLOOD_CANCEL = make_crisis("flood", None, op="cancel", version=3, effective=T0)
SLIDE_CANCEL = make_crisis("slide", None, op="cancel", version=2, effective=T0)


async def history_before_the_restart() -> World:
    """Ten minutes of a worker's life. The broker dies at 10 min: the landslide's cancel reached
    PostgreSQL (the sink) but no worker acted on it, and the quake expired unnoticed (9 min)."""
    w = World(T0)
    for citizen in "bcefh":
        await w.checkin(citizen, FAR, T0)
    await w.checkin("a", INSIDE, T0)
    await w.checkin("d", NEAR, T0)
    await w.checkin("g", (20.0, 20.0), T0)
    await w.checkin("k", (10.0, 30.0), T0)
    await w.checkin("m", (20.0, 50.0), T0)
    await w.crisis(FLOOD, minutes(1))                                               # a inside, d near
    await w.crisis(make_crisis("storm", STORM_AREA, effective=T0), minutes(1))       # g inside
    await w.crisis(make_crisis("quake", QUAKE_AREA, effective=T0, expires=minutes(9)), minutes(1))  # k inside
    await w.crisis(make_crisis("slide", SLIDE_AREA, effective=T0), minutes(1))       # m inside
    for citizen in "bcef":
        await w.checkin(citizen, INSIDE, minutes(2))                                 # entered
    for citizen, where in (("c", FAR), ("e", NEAR), ("f", FAR)):
        await w.checkin(citizen, where, minutes(3))                                  # leaving...
    await w.crisis(make_crisis("storm", None, op="cancel", version=2, effective=T0), minutes(4))  # g all-clear
    await w.checkin("d", FAR, minutes(5))                                            # d: near -> out, silently
    for citizen, where in (("c", FAR), ("e", NEAR), ("f", FAR)):
        await w.checkin(citizen, where, minutes(6))                                  # ...exited (dwell 120 s)
    await w.crisis(replace(FLOOD, version=2, buffer_km=6.0), minutes(7))             # an update: nobody new
    await w.checkin("f", INSIDE, minutes(8))                                         # f: entered again
    w.crises.append(SLIDE_CANCEL)  # recorded by the sink, never applied by the dead worker
    return w


def test_seq_is_read_back_from_the_warning_id() -> None:
    state = CitizenState("a", -6.2, 106.8, None, T0)
    warning = make_warning(state, FLOOD, "entered", 0.0, 3, T0)
    assert seq_of(warning, 10) == 3
    assert seq_of(warning, 3) is None  # only seqs below the limit are tried
    assert seq_of(replace(warning, warning_id="w-not-made-by-the-tracker"), 10) is None


async def test_rebuilt_states_are_the_workers_own() -> None:
    w = await history_before_the_restart()
    sent = w.emitter.sent
    assert Counter((x.citizen_id, x.kind) for x in sent) == Counter({
        ("a", "inside"): 1, ("d", "near"): 1, ("g", "inside"): 1, ("g", "all_clear"): 1, ("k", "inside"): 1,
        ("m", "inside"): 1, ("b", "entered"): 1, ("c", "entered"): 1, ("e", "entered"): 1, ("f", "entered"): 2,
        ("c", "exited"): 1, ("e", "exited"): 1, ("f", "exited"): 1})

    plan = plan_recovery(w.crises, [], w.checkins, sent, minutes(10))

    rebuilt = {s.citizen_id: s for s in plan.states}
    assert set(rebuilt) == set(w.states)
    for citizen_id, state in rebuilt.items():
        kept = w.state(citizen_id)
        assert (state.lat, state.lon, state.accuracy_m, state.observed_at) == \
            (kept.lat, kept.lon, kept.accuracy_m, kept.observed_at), citizen_id
        expected = dict(kept.presence)
        if citizen_id == "d":  # left the band without a warning: the worker's reconcile makes it "out" again
            assert expected["flood"].status == "out"
            expected["flood"] = replace(expected["flood"], status="near")
        assert state.presence == expected, citizen_id
    assert rebuilt["f"].presence["flood"] == Presence("in", version=2, seq=3, warned=True)
    assert rebuilt["e"].presence["flood"].status == "near" and rebuilt["c"].presence["flood"].status == "out"
    assert rebuilt["g"].presence == {} and rebuilt["h"].presence == {}  # all-cleared / never warned
    assert plan.active == ("flood",) and plan.ended == ("quake", "slide")
    assert [(c.crisis_id, c.op, c.version) for c in plan.crisis_events] == [
        ("flood", "upsert", 2), ("quake", "upsert", 1), ("slide", "upsert", 1), ("slide", "cancel", 2)]


async def after_the_restart(w: World) -> list[Warning]:
    """What a worker does from 10 min on: learn the crises, reconcile, then live events."""
    await w.runtime.reconcile()
    await w.checkin("h", INSIDE, minutes(11))   # walks into a crisis declared before the restart
    await w.crisis(FLOOD_CANCEL, minutes(12))   # all-clear to everyone warned about the flood
    return w.emitter.sent


async def test_after_recovery_the_worker_sends_what_it_would_have_sent_without_the_restart() -> None:
    original = await history_before_the_restart()
    before = list(original.emitter.sent)
    crises, checkins = list(original.crises), list(original.checkins)  # what PostgreSQL holds at the restart

    # no restart: the worker applies the landslide's cancel and notices the quake's expiry
    original.emitter.sent.clear()
    await original.crisis(SLIDE_CANCEL, minutes(10))
    uninterrupted = await after_the_restart(original)

    # the broker lost everything: a new worker gets only what the plan republishes
    plan = plan_recovery(crises, [], checkins, before, minutes(10))
    recovered = World(minutes(10), {s.citizen_id: s.to_dict() for s in plan.states})
    recovered.runtime.remember(plan.crisis_events)
    restored = await after_the_restart(recovered)

    assert Counter((x.citizen_id, x.kind) for x in restored) == Counter(
        {("h", "entered"): 1, ("k", "all_clear"): 1, ("m", "all_clear"): 1,
         **{(c, "all_clear"): 1 for c in "abcdefh"}})
    assert sorted(x.warning_id for x in restored) == sorted(x.warning_id for x in uninterrupted)
    assert not {x.warning_id for x in restored} & {x.warning_id for x in before}  # no id sent twice
    assert recovered.states == original.states


def test_an_ended_crisis_is_republished_only_for_those_still_owed_an_all_clear() -> None:
    old = make_crisis("old", STORM_AREA, effective=T0)
    history = [old, replace(old, op="cancel", version=2, geometry=None),
               make_crisis("gone", STORM_AREA, effective=T0, expires=minutes(5)),
               make_crisis("live", FLOOD_AREA, effective=T0, expires=minutes(60)),
               make_crisis("live", FLOOD_AREA, version=2, effective=T0, expires=minutes(60)),
               make_crisis("only-cancel", None, op="cancel", effective=T0)]
    events, active, ended = crisis_events(history, held=set(), now=minutes(10))
    assert [(c.crisis_id, c.version) for c in events] == [("live", 2)] and active == ["live"] and ended == []
    events, active, ended = crisis_events(history, held={"old", "gone", "only-cancel"}, now=minutes(10))
    assert [(c.crisis_id, c.op, c.version) for c in events] == [
        ("gone", "upsert", 1), ("live", "upsert", 2), ("old", "upsert", 1), ("old", "cancel", 2)]
    assert ended == ["gone", "old"]  # a crisis never seen active cannot be ended by a worker


def warned(kind: str, seq: int, version: int = 1, distance_km: float = 0.0,
           at: datetime = T0) -> Warning:
    state = CitizenState("a", -6.2, 106.8, None, at)
    crisis = replace(FLOOD, version=version)
    return replace(make_warning(state, crisis, kind, distance_km, seq, at), distance_km=distance_km)  # type: ignore[arg-type]


def test_presence_order_comes_from_versions_and_seqs_not_clocks() -> None:
    # a second worker with a clock running behind sent the later warnings
    history = [warned("entered", 0, at=minutes(5)), warned("exited", 1, distance_km=9.0, at=minutes(1)),
               warned("entered", 2, version=2, at=minutes(0))]
    assert presence_from(history, {}) == Presence("in", version=2, seq=3, warned=True)
    cleared = [*history, warned("all_clear", 3, version=2, at=minutes(2))]
    assert presence_from(cleared, {}) is None
    again = [*cleared, warned("near", 0, version=4, distance_km=2.0, at=minutes(1))]  # declared again, later
    assert presence_from(again, {}) == Presence("near", version=4, seq=1, warned=True)


def test_exited_is_near_or_out_by_the_band_of_the_version_warned() -> None:
    history = [warned("entered", 0), warned("exited", 1, distance_km=3.0)]
    assert presence_from(history, {("flood", 1): 5.0}).status == "near"  # type: ignore[union-attr]
    assert presence_from(history, {("flood", 1): 2.0}).status == "out"  # type: ignore[union-attr]
    assert presence_from(history, {}).status == "near"  # type: ignore[union-attr]


def test_seq_goes_past_every_warning_found_even_with_gaps_and_foreign_ids() -> None:
    gap = [warned("entered", 0), warned("entered", 5)]  # 1-4 never reached PostgreSQL
    assert presence_from(gap, {}).seq == 6  # type: ignore[union-attr]
    foreign = [replace(warned("entered", 0), warning_id=f"w-foreign-{i}") for i in range(3)]
    got = presence_from(foreign, {})
    assert got is not None and got.seq == 3
    taken = {warning_id("a", "flood", 1, kind, s) for kind in ("all_clear", "entered", "exited") for s in range(3)}
    assert warning_id("a", "flood", 1, "all_clear", got.seq) not in taken


def test_location_is_the_latest_known_and_never_from_the_future() -> None:
    now = minutes(60)
    checkins = [make_checkin("a", 1.0, 1.0, observed_at=minutes(10)),
                make_checkin("a", 2.0, 2.0, observed_at=now + FUTURE_TOLERANCE + timedelta(seconds=1)),  # phone clock
                make_checkin("b", 3.0, 3.0, observed_at=minutes(10), accuracy_m=25.0)]
    later = replace(warned("entered", 0, at=minutes(20)), citizen_id="b", lat=4.0, lon=4.0,
                    observed_at=minutes(20))  # check-in history deleted, the warning kept where b was
    plan = plan_recovery([FLOOD], [], checkins, [later], now)
    where = {s.citizen_id: (s.lat, s.lon, s.accuracy_m, s.observed_at) for s in plan.states}
    assert where == {"a": (1.0, 1.0, 10.0, minutes(10)), "b": (4.0, 4.0, None, minutes(20))}


def test_a_citizen_never_located_gets_no_state_and_citizens_are_republished() -> None:
    citizens = [Citizen(c, "N", "ID", "id", (Channel("sms", "+62"),), (), True) for c in ("z", "y")]
    plan = plan_recovery([], citizens, [], [], T0)
    assert [c.citizen_id for c in plan.citizens] == ["y", "z"] and plan.states == () and not plan.empty
    assert plan_recovery([], [], [], [], T0).empty
