"""Transition rules: who is told what, once, with hysteresis and dwell."""

from __future__ import annotations

from datetime import timedelta

from pipeline.domain.ids import warning_id
from pipeline.domain.timeline import Timeline, run_timeline
from pipeline.domain.tracking import CitizenState, GeofenceConfig
from pipeline.testing import T0, make_checkin, make_crisis, square
from schemas import Warning, check

AREA = square(106.8, -6.2, 0.1)  # about 22 km across, centred on Jakarta
INSIDE = (-6.2, 106.8)
OUTSIDE_FAR = (-7.5, 106.8)
CONFIG = GeofenceConfig(hysteresis_m=50.0, dwell_seconds=120.0)


def kinds(warnings: list[Warning] | tuple[Warning, ...]) -> list[tuple[str, str]]:
    return [(w.citizen_id, w.kind) for w in warnings]


def test_declare_warns_those_already_inside_and_near() -> None:
    events = [
        make_checkin("in", *INSIDE, observed_at=T0),
        make_checkin("near", -6.2, 106.95, observed_at=T0),  # ~5.5 km east of the edge
        make_checkin("far", *OUTSIDE_FAR, observed_at=T0),
        make_crisis("flood", AREA, buffer_km=10.0, effective=T0 + timedelta(minutes=1)),
    ]
    warnings = run_timeline(events, CONFIG)
    assert sorted(kinds(warnings)) == [("in", "inside"), ("near", "near")]
    near = next(w for w in warnings if w.kind == "near")
    assert 5.0 < near.distance_km < 6.0
    assert all(check(w.to_dict()) == "warning/1" for w in warnings)
    inside = next(w for w in warnings if w.kind == "inside")
    assert inside.emitted_at == T0 + timedelta(minutes=1)
    assert inside.observed_at == T0 and inside.distance_km == 0.0


def test_checkin_moving_in_is_entered_and_repeats_are_silent() -> None:
    events = [
        make_crisis("flood", AREA, effective=T0),
        make_checkin("a", *OUTSIDE_FAR, observed_at=T0 + timedelta(minutes=1)),
        make_checkin("a", *INSIDE, observed_at=T0 + timedelta(minutes=2)),
        make_checkin("a", -6.21, 106.81, observed_at=T0 + timedelta(minutes=3)),
    ]
    warnings = run_timeline(events, CONFIG)
    assert kinds(warnings) == [("a", "entered")]
    assert warnings[0].emitted_at == T0 + timedelta(minutes=2)


def test_boundary_walker_does_not_flap() -> None:
    edge_lon = 106.9  # the east edge of AREA
    events: list = [make_crisis("flood", AREA, effective=T0)]
    for minute in range(1, 30):
        # alternately 10 m inside and 20 m outside the edge, GPS accuracy 30 m
        offset = -0.00009 if minute % 2 else 0.00018
        events.append(make_checkin("walker", -6.2, edge_lon + offset, observed_at=T0 + timedelta(minutes=minute),
                                   accuracy_m=30.0))
    assert kinds(run_timeline(events, CONFIG)) == [("walker", "entered")]


def test_exit_needs_the_dwell_time() -> None:
    events = [
        make_crisis("flood", AREA, effective=T0),
        make_checkin("a", *INSIDE, observed_at=T0 + timedelta(seconds=10)),
        make_checkin("a", *OUTSIDE_FAR, observed_at=T0 + timedelta(seconds=20)),   # leaving starts
        make_checkin("a", *OUTSIDE_FAR, observed_at=T0 + timedelta(seconds=60)),   # 40 s out: not yet
        make_checkin("a", *OUTSIDE_FAR, observed_at=T0 + timedelta(seconds=150)),  # 130 s out: exited
        make_checkin("a", *OUTSIDE_FAR, observed_at=T0 + timedelta(seconds=400)),
    ]
    warnings = run_timeline(events, CONFIG)
    assert kinds(warnings) == [("a", "entered"), ("a", "exited")]
    assert warnings[1].emitted_at == T0 + timedelta(seconds=150)


def test_going_back_in_before_the_dwell_cancels_the_exit() -> None:
    events = [
        make_crisis("flood", AREA, effective=T0),
        make_checkin("a", *INSIDE, observed_at=T0 + timedelta(seconds=10)),
        make_checkin("a", *OUTSIDE_FAR, observed_at=T0 + timedelta(seconds=20)),
        make_checkin("a", *INSIDE, observed_at=T0 + timedelta(seconds=60)),
        make_checkin("a", *OUTSIDE_FAR, observed_at=T0 + timedelta(seconds=100)),
        make_checkin("a", *OUTSIDE_FAR, observed_at=T0 + timedelta(seconds=200)),  # only 100 s since it left again
    ]
    assert kinds(run_timeline(events, CONFIG)) == [("a", "entered")]


def test_poor_accuracy_widens_the_margin() -> None:
    just_out = (-6.2, 106.9 + 0.0027)  # ~300 m east of the edge
    events = [
        make_crisis("flood", AREA, effective=T0),
        make_checkin("a", *INSIDE, observed_at=T0),
        make_checkin("a", *just_out, observed_at=T0 + timedelta(minutes=1), accuracy_m=500.0),
        make_checkin("a", *just_out, observed_at=T0 + timedelta(minutes=10), accuracy_m=500.0),
    ]
    assert kinds(run_timeline(events, CONFIG)) == [("a", "entered")]


def test_update_warns_only_newly_covered_citizens() -> None:
    bigger = square(106.8, -6.2, 0.3)
    events = [
        make_checkin("core", *INSIDE, observed_at=T0),
        make_checkin("edge", -6.2, 107.0, observed_at=T0),  # outside v1, inside v2
        make_crisis("flood", AREA, version=1, effective=T0 + timedelta(minutes=1)),
        make_crisis("flood", bigger, version=2, effective=T0 + timedelta(minutes=2)),
        make_crisis("flood", bigger, version=3, effective=T0 + timedelta(minutes=3)),  # same area again
    ]
    warnings = run_timeline(events, CONFIG)
    assert kinds(warnings) == [("core", "inside"), ("edge", "inside")]
    assert [w.crisis_version for w in warnings] == [1, 2]


def test_stale_update_and_replayed_version_change_nothing() -> None:
    timeline = Timeline(CONFIG)
    timeline.checkins([make_checkin("a", *INSIDE)])
    first = timeline.crisis(make_crisis("flood", AREA, version=5), T0)
    again = timeline.crisis(make_crisis("flood", square(0, 0, 1), version=4), T0)
    assert kinds(first) == [("a", "inside")] and again == ()
    assert timeline.tracker.crises["flood"].version == 5


def test_cancel_sends_all_clear_to_everyone_warned_once() -> None:
    events = [
        make_checkin("in", *INSIDE, observed_at=T0),
        make_checkin("never", *OUTSIDE_FAR, observed_at=T0),
        make_crisis("flood", AREA, version=1, effective=T0 + timedelta(minutes=1)),
        make_checkin("left", *INSIDE, observed_at=T0 + timedelta(minutes=2)),
        make_checkin("left", *OUTSIDE_FAR, observed_at=T0 + timedelta(minutes=3)),
        make_checkin("left", *OUTSIDE_FAR, observed_at=T0 + timedelta(minutes=9)),
        make_crisis("flood", None, op="cancel", version=2, effective=T0 + timedelta(minutes=10)),
        make_crisis("flood", None, op="cancel", version=3, effective=T0 + timedelta(minutes=11)),
    ]
    warnings = run_timeline(events, CONFIG)
    assert kinds(warnings) == [("in", "inside"), ("left", "entered"), ("left", "exited"),
                               ("in", "all_clear"), ("left", "all_clear")]


def test_expiry_ends_the_crisis_at_its_expiry_time() -> None:
    expires = T0 + timedelta(hours=1)
    events = [
        make_crisis("flood", AREA, effective=T0, expires=expires),
        make_checkin("a", *INSIDE, observed_at=T0 + timedelta(minutes=5)),
        make_checkin("b", *INSIDE, observed_at=T0 + timedelta(hours=2)),
    ]
    warnings = run_timeline(events, CONFIG)
    assert kinds(warnings) == [("a", "entered"), ("a", "all_clear")]
    assert warnings[1].emitted_at == expires


def test_exercise_crises_reach_citizens_only_in_exercise_mode() -> None:
    events = [make_checkin("a", *INSIDE, observed_at=T0),
              make_crisis("drill", AREA, effective=T0 + timedelta(minutes=1), status="exercise")]
    assert run_timeline(events, CONFIG) == []
    assert kinds(run_timeline(events, GeofenceConfig(exercise_mode=True))) == [("a", "inside")]


def test_out_of_order_checkin_is_ignored() -> None:
    timeline = Timeline(CONFIG)
    timeline.crisis(make_crisis("flood", AREA), T0)
    timeline.checkins([make_checkin("a", *OUTSIDE_FAR, observed_at=T0 + timedelta(minutes=5))])
    late = timeline.tracker.on_checkins([make_checkin("a", *INSIDE, observed_at=T0 + timedelta(minutes=1))],
                                        timeline.states, None)
    assert late.warnings == () and late.stale == 1


def test_warning_ids_are_deterministic_and_distinct() -> None:
    events = [make_crisis("flood", AREA, effective=T0),
              make_checkin("a", *INSIDE, observed_at=T0 + timedelta(minutes=1)),
              make_checkin("a", *OUTSIDE_FAR, observed_at=T0 + timedelta(minutes=2)),
              make_checkin("a", *OUTSIDE_FAR, observed_at=T0 + timedelta(minutes=10)),
              make_checkin("a", *INSIDE, observed_at=T0 + timedelta(minutes=11))]
    first = run_timeline(events, CONFIG)
    second = run_timeline(events, CONFIG)
    assert kinds(first) == [("a", "entered"), ("a", "exited"), ("a", "entered")]
    assert [w.warning_id for w in first] == [w.warning_id for w in second]
    assert len({w.warning_id for w in first}) == 3
    assert first[0].warning_id == warning_id("a", "flood", 1, "entered", 0)


def test_state_survives_serialisation() -> None:
    timeline = Timeline(CONFIG)
    timeline.crisis(make_crisis("flood", AREA), T0)
    timeline.checkins([make_checkin("a", *INSIDE)])
    state = timeline.states["a"]
    assert CitizenState.from_dict("a", state.to_dict()) == state


def test_a_crisis_not_known_yet_does_not_erase_what_the_citizen_was_told() -> None:
    # a restarted worker may see a citizen's check-in before it has re-read the crisis log
    timeline = Timeline(CONFIG)
    timeline.crisis(make_crisis("flood", AREA), T0)
    timeline.checkins([make_checkin("a", *INSIDE, observed_at=T0)])
    restarted = Timeline(CONFIG)
    restarted.states = dict(timeline.states)
    restarted.checkins([make_checkin("a", *OUTSIDE_FAR, observed_at=T0 + timedelta(seconds=10))])
    assert restarted.states["a"].presence["flood"].status == "in"
    swept = restarted.crisis(make_crisis("flood", AREA), T0 + timedelta(seconds=20))
    later = restarted.checkins([make_checkin("a", *OUTSIDE_FAR, observed_at=T0 + timedelta(minutes=10))])
    assert kinds([*swept, *later]) == [("a", "exited")]


def test_a_crisis_that_arrives_already_expired_warns_nobody() -> None:
    tracker = Timeline(CONFIG).tracker
    stale = make_crisis("old", AREA, effective=T0, expires=T0 + timedelta(hours=1))
    assert tracker.accept(stale, now=T0 + timedelta(hours=2)) is False
    assert "old" not in tracker.crises and tracker.ended["old"] == 1
