"""Accountability counts without I/O: each citizen once per crisis, by their latest standing; replays
and late events change nothing; the rate limit on a fake clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import permutations

from pipeline.domain.accountability import (
    Counts,
    Escalation,
    Fact,
    RateLimit,
    Standing,
    apply,
    count,
)
from pipeline.domain.ids import warning_id
from schemas import Ack, Delivery, Warning
from schemas.models import WarningKind

T0 = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)


def warning(kind: WarningKind, minutes: int, citizen: str = "c1", version: int = 1) -> Warning:
    return Warning(warning_id(citizen, "k1", version, kind, minutes), citizen, "k1", version, kind, "severe", "Flood",
                   "Go up", 0.0, -6.2, 106.8, T0, T0 + timedelta(minutes=minutes), ("ID",))


def delivery(w: Warning, outcome: str) -> Delivery:
    return Delivery(w.warning_id, w.citizen_id, w.crisis_id, "webhook", outcome, 1, T0)  # type: ignore[arg-type]


def ack(status: str, minutes: int, citizen: str = "c1") -> Ack:
    return Ack(citizen, "k1", status, T0 + timedelta(minutes=minutes), "app")  # type: ignore[arg-type]


def fold(facts: list[Fact]) -> Standing:
    standing = Standing()
    for fact in facts:
        standing = apply(standing, fact)
    return standing


def test_a_warned_citizen_inside_then_delivered_then_safe() -> None:
    w = warning("inside", 0)
    s = fold([w])
    assert (s.zone, s.warned, s.delivered, s.ack) == ("inside", True, False, None)
    s = fold([w, delivery(w, "delivered"), ack("safe", 5)])
    assert count([s]) == Counts(inside=1, warned=1, delivered=1, safe=1)


def test_the_latest_warning_kind_decides_inside_or_near_whatever_the_order_of_arrival() -> None:
    facts: list[Fact] = [warning("near", 0), warning("entered", 10), warning("exited", 20)]
    for order in permutations(facts):
        s = fold(list(order))
        assert s.zone is None and s.warned
    assert fold([warning("near", 0), warning("entered", 10)]).zone == "inside"
    assert fold([warning("entered", 10), warning("near", 0)]).zone == "inside"
    assert fold([warning("inside", 0), warning("all_clear", 30)]).zone is None


def test_an_all_clear_alone_does_not_make_a_citizen_warned() -> None:
    assert count([fold([warning("all_clear", 0)])]) == Counts()


def test_a_pre_arrival_warning_warns_but_places_nobody_in_the_area() -> None:
    assert count([fold([warning("pre_arrival", 0)])]) == Counts(warned=1)


def test_the_latest_reply_wins_and_a_tie_goes_to_need_help() -> None:
    assert fold([ack("need_help", 1), ack("safe", 9)]).ack == "safe"
    assert fold([ack("safe", 9), ack("need_help", 1)]).ack == "safe"
    assert fold([ack("safe", 3), ack("need_help", 3)]).ack == "need_help"
    assert fold([ack("need_help", 3), ack("safe", 3)]).ack == "need_help"


def test_unreached_is_warned_given_up_never_delivered_and_silent() -> None:
    w1, w2 = warning("inside", 0), warning("exited", 10)
    gave_up = fold([w1, delivery(w1, "gave_up")])
    assert gave_up.unreached and count([gave_up]).unreached == 1
    assert not fold([w1, delivery(w1, "gave_up"), w2, delivery(w2, "delivered")]).unreached
    assert not fold([w1, delivery(w1, "gave_up"), ack("need_help", 20)]).unreached
    assert not fold([w1]).unreached  # still in flight: not yet unreached


def test_replayed_facts_change_nothing() -> None:
    w = warning("inside", 0)
    facts: list[Fact] = [w, delivery(w, "delivered"), ack("safe", 5), Escalation("c1", "k1")]
    once = fold(facts)
    assert fold(facts + facts) == once
    assert fold(facts[::-1] + facts) == once


def test_counts_over_a_crowd() -> None:
    standings = []
    for i in range(10):
        w = warning("inside" if i % 2 else "near", 0, f"c{i}")
        facts: list[Fact] = [w, delivery(w, "delivered" if i < 7 else "gave_up")]
        if i < 3:
            facts.append(ack("safe", 5, f"c{i}"))
        elif i == 3:
            facts.append(ack("need_help", 5, f"c{i}"))
        if i == 9:
            facts.append(Escalation(f"c{i}", "k1"))
        standings.append(fold(facts))
    assert count(standings) == Counts(inside=5, near=5, warned=10, delivered=7, safe=3, need_help=1, unreached=3,
                                      escalated=1)


def test_a_standing_survives_its_json_form() -> None:
    w = warning("near", 0)
    s = fold([w, delivery(w, "gave_up"), ack("need_help", 2), Escalation("c1", "k1")])
    assert Standing.from_json(s.to_json()) == s


def test_the_status_carries_the_counts() -> None:
    status = Counts(1, 2, 3, 4, 5, 6, 7, 8).status("k1", T0)
    assert status.to_dict()["unreached"] == 7 and status.crisis_id == "k1"


def test_at_most_one_status_per_crisis_per_interval() -> None:
    limit = RateLimit(5.0)
    assert limit.due("k1", 100.0)
    limit.sent("k1", 100.0)
    assert not limit.due("k1", 104.9)
    assert limit.due("k2", 104.9)
    assert limit.due("k1", 105.0)
