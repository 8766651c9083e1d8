"""The accountability standings folded again from what PostgreSQL recorded, without I/O: the same
standings (hence the same counts) as the accountability process kept from the same facts, in any
order; a warning's delivery outcome read back from its per-channel rows by the dispatcher's rule; the
changelog records as the agent writes them; and no status counted from a table still recovering."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any

from pipeline.accountability import SEPARATOR, AccountabilityRuntime
from pipeline.app import partition_of
from pipeline.domain.accountability import Escalation, Fact, Standing, count
from pipeline.domain.delivery import DeliveryRow
from pipeline.domain.ids import warning_id
from pipeline.domain.recovery import RecordedDelivery, delivery_outcomes, rebuild_standings
from pipeline.restore import RestoreReport, RestoreTargets, standing_records
from schemas import Ack, Delivery, Warning, encode

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


def warning(citizen: str, crisis: str, kind: str, minutes: int, seq: int = 0) -> Warning:
    at = T0 + timedelta(minutes=minutes)
    return Warning(warning_id(citizen, crisis, 1, kind, seq), citizen, crisis, 1, kind, "severe", "Flood",  # type: ignore[arg-type]
                   "Go up", 0.0, -6.2, 106.8, at, at, ("ID",))


def escalation_case(fact: Escalation) -> bytes:
    return json.dumps({"schema": "case/1", "kind": "escalation", "citizen_id": fact.citizen_id,
                       "crisis_id": fact.crisis_id}).encode()


def facts() -> list[Fact]:
    out: list[Fact] = []
    for n in range(12):
        citizen, crisis = f"c{n}", f"k{n % 3}"
        first = warning(citizen, crisis, ("inside", "near", "entered")[n % 3], n)
        out.append(first)
        if n % 4 == 0:
            out.append(warning(citizen, crisis, "exited", 30 + n, seq=1))
        if n % 3 == 0:
            out.append(Delivery(first.warning_id, citizen, crisis, "webhook", "delivered", 1, T0))
        elif n % 3 == 1:
            out.append(Delivery(first.warning_id, citizen, crisis, "sms", "gave_up", 3, T0))
        if n % 5 == 0:
            out.append(Ack(citizen, crisis, "safe", T0 + timedelta(minutes=40), "app"))
        if n % 5 == 1:
            out.append(Ack(citizen, crisis, "need_help", T0 + timedelta(minutes=41), "sms"))
            out.append(Ack(citizen, crisis, "safe", T0 + timedelta(minutes=39), "app"))
        if n % 6 == 2:
            out.append(Escalation(citizen, crisis))
    out.append(warning("c99", "k0", "all_clear", 50, seq=2))  # an all-clear alone: a standing, not warned
    return out


def folded_by_the_process(facts: list[Fact]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    runtime = AccountabilityRuntime(table, 0.0, lambda: 0.0)
    for fact in facts:
        raw = escalation_case(fact) if isinstance(fact, Escalation) else encode(fact)
        assert not isinstance(runtime.observe(raw, T0 + timedelta(hours=1)), Exception)
    return table


def test_the_standings_rebuilt_in_any_order_are_those_the_process_kept() -> None:
    every = facts()
    kept = folded_by_the_process(every)
    for seed in range(5):
        shuffled = every[:]
        random.Random(seed).shuffle(shuffled)
        rebuilt = rebuild_standings(shuffled * 2)  # replayed facts change nothing
        assert {f"{crisis}{SEPARATOR}{citizen}": s.to_json() for (crisis, citizen), s in rebuilt.items()} == kept
    counts = {crisis: count(Standing.from_json(v) for k, v in kept.items() if k.startswith(crisis + SEPARATOR))
              for crisis in ("k0", "k1", "k2")}
    # k0: c0 (exited, safe), c3, c6 (need help), c9 inside, all delivered; c99 only an all-clear
    assert counts["k0"].as_dict() == {"inside": 3, "near": 0, "warned": 4, "delivered": 4, "safe": 1, "need_help": 1,
                                      "unreached": 0, "escalated": 0}
    assert sum(c.unreached for c in counts.values()) == 2  # c4 and c10: gave up, never delivered, no reply


def test_a_fact_that_changes_nothing_leaves_no_standing() -> None:
    assert rebuild_standings([]) == {}
    assert rebuild_standings([Delivery("w", "c", "k", None, "gave_up", 0, T0)]) != {}


def row(warning: str, channel: str, status: str, attempts: int = 1, minutes: int = 0) -> RecordedDelivery:
    return RecordedDelivery(warning, "c1", "k1", DeliveryRow(channel, f"{channel}-address", status, attempts),  # type: ignore[arg-type]
                            T0 + timedelta(minutes=minutes))


def test_a_warning_is_delivered_by_any_row_given_up_by_all_and_in_flight_otherwise() -> None:
    outcomes = delivery_outcomes([
        row("w-delivered", "sms", "failed", 3), row("w-delivered", "webhook", "delivered", 1, 5),
        row("w-gave-up", "sms", "gave_up", 3), row("w-gave-up", "email", "gave_up", 2, 9),
        row("w-in-flight", "sms", "gave_up", 3), row("w-in-flight", "email", "sending", 1),
    ])
    assert [(d.warning_id, d.outcome, d.channel, d.attempts) for d in outcomes] == [
        ("w-delivered", "delivered", "webhook", 4), ("w-gave-up", "gave_up", "email", 5)]
    assert all((d.citizen_id, d.crisis_id) == ("c1", "k1") for d in outcomes)


def test_the_records_are_what_the_agent_writes_in_the_partition_of_the_crisis() -> None:
    standings = rebuild_standings(facts())
    records = standing_records(standings, "changelog", 4)
    assert len(records) == len(standings)
    for record in records:
        crisis, citizen = record.key.decode().split(SEPARATOR)
        assert record.partition == partition_of(crisis.encode(), 4)
        assert json.loads(record.value) == standings[(crisis, citizen)].to_json()
    assert {r.partition for r in records} == {partition_of(f"k{n}".encode(), 4) for n in range(3)}


def test_the_targets_name_the_accountability_changelog_and_the_report_counts_the_standings() -> None:
    assert RestoreTargets().accountability_changelog == "crisiswatch-accountability-accountability-changelog"
    assert RestoreTargets(app_id="app-x").accountability_id == "app-x-accountability"
    report = RestoreReport(1, 0, 2, 2, 1, standings=3)
    assert report.line().endswith(", 3 accountability standings")
    assert "standings" not in RestoreReport(1, 0, 2, 2, 1).line()


def test_no_status_is_due_from_a_table_still_recovering_nor_for_a_crisis_owned_elsewhere() -> None:
    table: dict[str, Any] = {}
    owned = {"k0", "k1"}
    runtime = AccountabilityRuntime(table, 0.0, lambda: 0.0, lambda crisis: crisis in owned, ready=False)
    for fact in facts():
        if not isinstance(fact, Escalation):
            runtime.observe(encode(fact), T0 + timedelta(hours=1))
    assert runtime.due(T0) == []  # not recovered yet: nothing, however dirty
    runtime.recovered()
    assert sorted(s.crisis_id for s in runtime.due(T0)) == ["k0", "k1"]
    assert not any(k.startswith("k2" + SEPARATOR) for k in table)  # owned elsewhere now: dropped, never counted
    runtime.recovering()  # a rebalance began
    runtime.observe(encode(Ack("c0", "k0", "need_help", T0 + timedelta(hours=2), "app")), T0 + timedelta(hours=3))
    assert runtime.due(T0) == []
    owned.discard("k1")
    runtime.recovered()
    [status] = runtime.due(T0)
    assert (status.crisis_id, status.need_help) == ("k0", 2)  # c6 before, c0 now
