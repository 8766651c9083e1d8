"""Escalation rules and the pre-arrival rule without I/O, on a fake clock: hours in microseconds."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from pipeline.domain.delivery import DeliveryRow, Step, plan_resend
from pipeline.domain.escalation import (
    DEFAULT_ESCALATION,
    Rule,
    due,
    parse_duration,
    parse_rules,
    pre_arrival_due,
    pre_arrival_id,
)

T0 = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)
RULES = parse_rules(DEFAULT_ESCALATION)


def test_the_default_rules() -> None:
    assert RULES["extreme"] == Rule(timedelta(minutes=15), timedelta(hours=1))
    assert RULES["severe"] == Rule(timedelta(hours=1), timedelta(hours=6))
    assert RULES["moderate"] == Rule(timedelta(hours=6), timedelta(hours=24))
    assert "minor" not in RULES
    assert parse_rules("") == {}
    assert parse_duration("90s") == timedelta(seconds=90) and parse_duration("2d") == timedelta(days=2)


@pytest.mark.parametrize("text", ["extreme:15m", "extreme 15m,1h", "awful:1m,2m", "extreme:1h,15m",
                                  "extreme:1x,2h", "severe:1h,2h;severe:1h,2h"])
def test_bad_rules_are_refused_with_a_reason(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rules(text)


def test_a_silent_citizen_is_resent_after_t1_and_escalated_after_t2_once_each() -> None:
    level, taken = 0, []
    now = T0
    while now < T0 + timedelta(hours=12):  # twelve hours, a minute at a time
        steps = due(RULES, "severe", T0, replied=False, level=level, now=now)
        for step in steps:
            taken.append((step, now - T0))
            level = {"resend": 1, "open_case": 2}[step]
        now += timedelta(minutes=1)
    assert taken == [("resend", timedelta(hours=1)), ("open_case", timedelta(hours=6))]


def test_a_reply_stops_escalation_and_unruled_severities_never_escalate() -> None:
    late = T0 + timedelta(days=3)
    assert due(RULES, "extreme", T0, replied=True, level=0, now=late) == ()
    assert due(RULES, "minor", T0, replied=False, level=0, now=late) == ()
    assert due(RULES, "extreme", T0, replied=False, level=0, now=T0 + timedelta(minutes=14)) == ()


def test_a_job_that_was_down_past_t2_does_both_steps_in_order() -> None:
    assert due(RULES, "extreme", T0, False, 0, T0 + timedelta(hours=2)) == ("resend", "open_case")
    assert due(RULES, "extreme", T0, False, 2, T0 + timedelta(hours=2)) == ()


CHANNELS = (("webhook", "https://example.org/h"), ("email", "a@example.org"), ("sms", "+62811"))


def test_a_resend_goes_to_the_channel_after_the_one_that_delivered() -> None:
    rows = [DeliveryRow("webhook", "https://example.org/h", "delivered", 1)]
    assert plan_resend(CHANNELS, rows, 3).steps == (Step("email", "a@example.org", 0, False),
                                                    Step("sms", "+62811", 0, False))
    rows.append(DeliveryRow("email", "a@example.org", "delivered", 1))
    assert plan_resend(CHANNELS, rows, 3).done == "delivered"  # re-sent already: once in effect


def test_a_resend_with_no_next_channel_or_never_delivered() -> None:
    last = [DeliveryRow("sms", "+62811", "delivered", 1)]
    assert plan_resend(CHANNELS, last, 3).done == "no_next_channel"
    gave_up = [DeliveryRow(c, a, "gave_up", 3) for c, a in CHANNELS]
    assert plan_resend(CHANNELS, gave_up, 3).done == "gave_up"


def test_pre_arrival_only_before_departure_on_a_trip_to_a_severe_crisis() -> None:
    today = date(2025, 3, 1)
    later = date(2025, 3, 5)
    assert pre_arrival_due("severe", ("ID",), "ID", later, date(2025, 3, 10), today)
    assert pre_arrival_due("extreme", ("MY", "ID"), "ID", later, None, today)
    assert not pre_arrival_due("moderate", ("ID",), "ID", later, None, today)
    assert not pre_arrival_due("extreme", ("MY",), "ID", later, None, today)
    assert not pre_arrival_due("extreme", ("ID",), "ID", date(2025, 2, 20), date(2025, 2, 28), today)  # over
    assert not pre_arrival_due("extreme", ("ID",), "ID", today, None, today)  # departed: warned where they are
    assert not pre_arrival_due("extreme", ("ID",), "ID", None, None, today)  # departure unknown
    assert not pre_arrival_due("extreme", ("ID",), None, later, None, today)


def test_one_pre_arrival_warning_per_citizen_and_crisis() -> None:
    assert pre_arrival_id("c1", "k1") == pre_arrival_id("c1", "k1") != pre_arrival_id("c2", "k1")
