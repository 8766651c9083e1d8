"""The accountability agent's work without Faust (a dict for its table, a fake monotonic clock): bytes
in, standings persisted, statuses due at most once per crisis per interval; bad facts set aside; the
delivery outcome a dispatcher publishes; the pre-arrival warning readable in both languages."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from consumers.escalate import pre_arrival_warning
from pipeline.accountability import AccountabilityRuntime, Rekeyed, rekey
from pipeline.domain.delivery import DeliveryRow, final_outcome
from pipeline.domain.ids import warning_id
from pipeline.messages import Recipient, render
from pipeline.testing import make_crisis, square
from schemas import Ack, Delivery, InvalidEvent, Warning, encode

T0 = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)


def warning(citizen: str, kind: str = "inside", crisis: str = "k1") -> Warning:
    return Warning(warning_id(citizen, crisis, 1, kind), citizen, crisis, 1, kind, "severe", "Flood",  # type: ignore[arg-type]
                   "Go up", 0.0, -6.2, 106.8, T0, T0, ("ID",))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_facts_become_standings_and_statuses_rate_limited() -> None:
    table: dict[str, Any] = {}
    clock = Clock()
    runtime = AccountabilityRuntime(table, interval_s=5.0, monotonic=clock)
    w = warning("c1")
    assert runtime.observe(encode(w), T0) is not None
    assert runtime.observe(encode(w), T0) is None  # a replay changes nothing
    [status] = runtime.due(T0)
    assert (status.crisis_id, status.inside, status.warned, status.delivered) == ("k1", 1, 1, 0)
    delivered = Delivery(w.warning_id, "c1", "k1", "webhook", "delivered", 1, T0)
    assert isinstance(runtime.observe(encode(delivered), T0), tuple)
    assert isinstance(runtime.observe(encode(Ack("c1", "k1", "safe", T0 + timedelta(minutes=1), "app")), T0 + timedelta(hours=1)), tuple)
    assert runtime.due(T0) == []  # within the interval: held back, not lost
    clock.now = 5.0
    [status] = runtime.due(T0)
    assert (status.delivered, status.safe) == (1, 1)
    assert runtime.due(T0) == []  # nothing changed since


def test_a_rebuilt_runtime_counts_the_same_and_publishes_every_crisis_again() -> None:
    table: dict[str, Any] = {}
    first = AccountabilityRuntime(table, 5.0, Clock())
    for citizen, crisis in (("c1", "k1"), ("c2", "k1"), ("c3", "k2")):
        first.observe(encode(warning(citizen, crisis=crisis)), T0)
    counted = {s.crisis_id: s.warned for s in first.due(T0)}
    again = AccountabilityRuntime(json.loads(json.dumps(table)), 5.0, Clock())
    again.mark_all()
    assert {s.crisis_id: s.warned for s in again.due(T0)} == counted == {"k1": 2, "k2": 1}


def test_escalation_cases_count_and_other_cases_are_ignored() -> None:
    runtime = AccountabilityRuntime({}, 0.0, Clock())
    case = {"schema": "case/1", "kind": "escalation", "citizen_id": "c1", "crisis_id": "k1"}
    assert runtime.observe(json.dumps(case).encode(), T0) is not None
    assert runtime.observe(json.dumps({**case, "kind": "sos", "crisis_id": None}).encode(), T0) is None
    assert runtime.due(T0)[0].escalated == 1


def test_bad_facts_are_set_aside_with_a_reason_and_good_ones_rekeyed_compact() -> None:
    runtime = AccountabilityRuntime({}, 0.0, Clock())
    for raw in (b"", b"{", b'{"schema": "delivery/1", "warning_id": "nope"}', b'{"schema": "checkin/1"}',
                b'{"schema": "case/1", "kind": "escalation", "crisis_id": "k1"}'):
        assert isinstance(runtime.observe(raw, T0), InvalidEvent | ValueError), raw
        assert isinstance(rekey(raw, T0), InvalidEvent | ValueError), raw
    assert runtime.skipped == 5 and runtime.due(T0) == []
    forwarded = rekey(encode(warning("c1")) [:-1] + b', "extra": "' + b"x" * 10_000 + b'"}', T0)
    assert isinstance(forwarded, Rekeyed) and forwarded.key == b"k1" and len(forwarded.value) < 1000
    assert rekey(b'{"schema": "case/1", "kind": "sos", "citizen_id": "c1", "crisis_id": null}', T0) is None


def test_the_final_outcome_of_a_warning() -> None:
    w = warning("c1")
    assert final_outcome(w, [], T0) is None
    assert final_outcome(w, [DeliveryRow("webhook", "u", "sending", 1)], T0) is None
    done = final_outcome(w, [DeliveryRow("webhook", "u", "gave_up", 3), DeliveryRow("email", "e", "delivered", 1)], T0)
    assert done is not None and (done.outcome, done.channel, done.attempts) == ("delivered", "email", 4)
    gave_up = final_outcome(w, [DeliveryRow("webhook", "u", "gave_up", 3)], T0)
    assert gave_up is not None and gave_up.outcome == "gave_up"


def test_a_pre_arrival_warning_reads_right_in_both_languages() -> None:
    crisis = make_crisis("k9", square(106.8, -6.2, 0.1), severity="extreme", title="Banjir Jakarta")
    w = pre_arrival_warning("c1", crisis, T0)
    assert w.kind == "pre_arrival" and w.distance_km == 0.0 and w.warning_id == pre_arrival_warning("c1", crisis, T0).warning_id
    english = render(w, Recipient("c1", "Ana", "en"), embassy=None, reply_url=None)
    indonesian = render(w, Recipient("c1", "Ana", "id"), embassy=None, reply_url=None)
    assert "Before you travel" in english.subject and "registered trip" in english.text
    assert "Sebelum Anda berangkat" in indonesian.subject and "lifted" not in english.text
