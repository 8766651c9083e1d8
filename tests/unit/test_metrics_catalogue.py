"""docs/metrics.md is the code's catalogue, and the per-stage metrics measure what they say.

The catalogue table is generated from the metric classes (``python -m pipeline.metrics``); a metric
added in code and not in the catalogue, or left in the catalogue after the code dropped it, fails
here. The helpers behind the new stage latencies and the consumer-lag gauge are pure enough to drive
with fakes: what is observed, and what is not."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from consumers.dispatch import GROUP_ID
from pipeline import accountability_app, lag, metrics, topics
from pipeline.accountability import Topics as AccountabilityTopics

REPO = Path(__file__).resolve().parents[2]
CATALOGUE = REPO / "docs" / "metrics.md"
BEGIN, END = "<!-- catalogue:begin", "<!-- catalogue:end -->"


def documented_table() -> str:
    text = CATALOGUE.read_text("utf-8")
    start = text.index("\n", text.index(BEGIN)) + 1
    return text[start:text.index(END)]


def documented_names() -> set[str]:
    return set(re.findall(r"^\| `(crisiswatch_[a-z0-9_]+)` \|", documented_table(), re.M))


def test_the_catalogue_is_the_one_the_code_generates() -> None:
    assert documented_table() == metrics.catalogue_table(), "regenerate it: python -m pipeline.metrics"


def test_every_metric_in_code_is_in_the_catalogue_and_nothing_else() -> None:
    in_code = {e.name for e in metrics.catalogue()}
    assert in_code == set(metrics.METRIC_NAMES), "METRIC_NAMES and the registered metrics differ"
    assert documented_names() == in_code


def test_the_check_notices_a_metric_missing_from_the_catalogue() -> None:
    table = documented_table()
    shortened = "\n".join(line for line in table.splitlines() if "crisiswatch_consumer_lag`" not in line) + "\n"
    assert shortened != metrics.catalogue_table()
    assert "crisiswatch_consumer_lag" not in set(re.findall(r"^\| `(crisiswatch_[a-z0-9_]+)` \|", shortened, re.M))


def test_names_follow_prometheus_conventions() -> None:
    for entry in metrics.catalogue():
        assert re.fullmatch(r"crisiswatch_[a-z][a-z0-9_]*", entry.name), entry.name
        assert entry.name.endswith("_total") == (entry.type == "counter"), entry.name
        if entry.type == "histogram" and entry.name != "crisiswatch_batch_size":  # a size, not a time
            assert entry.name.endswith("_seconds"), entry.name
        if "timestamp" in entry.name:
            assert entry.name.endswith("_timestamp_seconds") and entry.type == "gauge", entry.name
        assert entry.meaning and entry.processes
        # Free text or an identifier as a label would make one series per message, citizen or crisis.
        assert not {"citizen_id", "crisis_id", "citizen", "crisis", "message", "error", "text"} & set(entry.labels)


def test_every_stage_has_its_latency_and_lag_and_dlq_have_bounded_labels() -> None:
    by_name = {e.name: e for e in metrics.catalogue()}
    for name, process in (("crisiswatch_api_publish_seconds", "api"),
                          ("crisiswatch_checkin_to_warning_latency_seconds", "worker"),
                          ("crisiswatch_crisis_to_first_warning_seconds", "worker"),
                          ("crisiswatch_warning_to_delivered_seconds", "dispatch")):
        assert by_name[name].type == "histogram" and by_name[name].processes == (process,), name
    assert by_name["crisiswatch_consumer_lag"].labels == ("group", "topic")
    assert by_name["crisiswatch_consumer_lag"].processes == ("sink",)
    assert by_name["crisiswatch_dlq_messages_total"].labels == ("stage", "reason")


# ---------------------------------------------------------------- crisis declared -> first warning

class Recorder:
    def __init__(self) -> None:
        self.values: list[float] = []

    def observe(self, amount: float) -> None:
        self.values.append(amount)


def test_first_warning_is_timed_once_per_crisis_event() -> None:
    recorder = Recorder()
    clock = metrics.FirstWarningClock(recorder)
    clock.seen("flood", "upsert", 100.0)
    clock.sent(["flood", "flood"], 100.4)
    clock.sent(["flood"], 101.0)  # later chunks of the same sweep are not "first"
    assert recorder.values == [pytest.approx(0.4)]
    clock.seen("flood", "upsert", 200.0)  # an update that moves the area: timed again
    clock.sent(["flood"], 203.0)
    assert recorder.values[1:] == [3.0]


def test_a_sweep_that_warns_nobody_leaves_no_observation() -> None:
    recorder = Recorder()
    clock = metrics.FirstWarningClock(recorder)
    clock.seen("quake", "upsert", 100.0)
    clock.settled("quake")
    clock.sent(["quake"], 5000.0)  # a citizen walking in much later: check-in latency, not this one
    clock.seen("gone", "cancel", 100.0)
    clock.sent(["gone"], 101.0)  # all-clears of a cancel are not a first warning
    clock.seen("no-ts", "upsert", None)
    clock.sent(["no-ts"], 101.0)
    assert recorder.values == []


def test_pending_crises_are_bounded() -> None:
    recorder = Recorder()
    clock = metrics.FirstWarningClock(recorder, max_pending=2)
    for n, crisis in enumerate(("a", "b", "c")):
        clock.seen(crisis, "upsert", float(n))
    clock.sent(["a", "b", "c"], 10.0)
    assert sorted(recorder.values) == [8.0, 9.0]


def test_worker_metrics_wire_the_first_warning_histogram() -> None:
    registry = CollectorRegistry()
    worker = metrics.WorkerMetrics(registry)
    worker.first_warning.seen("flood", "upsert", 10.0)
    worker.first_warning.sent(["flood"], 12.5)
    assert registry.get_sample_value("crisiswatch_crisis_to_first_warning_seconds_count") == 1
    assert registry.get_sample_value("crisiswatch_crisis_to_first_warning_seconds_sum") == 2.5


# ---------------------------------------------------------------- warning -> delivered

def test_only_delivered_warnings_are_timed_from_their_emission() -> None:
    registry = CollectorRegistry()
    dispatch = metrics.DispatchMetrics(registry)
    emitted = datetime(2026, 1, 1, tzinfo=UTC)
    dispatch.handled("delivered", emitted, emitted + timedelta(seconds=7))
    for outcome in ("gave_up", "skipped", "no_citizen", "no_channel"):
        dispatch.handled(outcome, emitted, emitted + timedelta(seconds=99))
    dispatch.handled("delivered", emitted, emitted - timedelta(seconds=1))  # clocks apart: never negative
    assert registry.get_sample_value("crisiswatch_warning_to_delivered_seconds_count") == 2
    assert registry.get_sample_value("crisiswatch_warning_to_delivered_seconds_sum") == 7.0


# ---------------------------------------------------------------- consumer lag

def test_lag_per_group_and_topic_sums_partitions_and_counts_uncommitted_from_zero() -> None:
    ends = {("checkins", 0): 10, ("checkins", 1): 5, ("warnings", 0): 7}
    committed: Mapping[str, Mapping[tuple[str, int], int]] = {
        "workers": {("checkins", 0): 10, ("checkins", 1): 2},
        "sink": {("checkins", 0): 12},  # ahead of a stale end offset: never negative
    }
    groups = {"workers": ("checkins",), "sink": ("checkins", "warnings"), "new": ("warnings",)}
    assert lag.lags_by_topic(ends, committed, groups) == {
        ("workers", "checkins"): 3, ("sink", "checkins"): 5, ("sink", "warnings"): 7, ("new", "warnings"): 7}


def test_lag_monitor_exports_the_gauges_and_keeps_them_through_an_outage() -> None:
    registry = CollectorRegistry()
    answers: list[Mapping[tuple[str, str], int] | Exception] = [{("crisiswatch", "checkins"): 4},
                                                                ConnectionError("broker away")]

    def read() -> Mapping[tuple[str, str], int]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monitor = lag.LagMonitor(read, metrics.LagMetrics(registry), clock=lambda: 1234.0)
    assert monitor.check_now() is True
    assert registry.get_sample_value("crisiswatch_consumer_lag", {"group": "crisiswatch", "topic": "checkins"}) == 4
    assert registry.get_sample_value("crisiswatch_consumer_lag_last_success_timestamp_seconds") == 1234.0
    monitor.clock = lambda: 9999.0
    assert monitor.check_now() is False
    assert registry.get_sample_value("crisiswatch_consumer_lag", {"group": "crisiswatch", "topic": "checkins"}) == 4
    assert registry.get_sample_value("crisiswatch_consumer_lag_last_success_timestamp_seconds") == 1234.0


def test_monitored_groups_are_the_stack_groups_the_dispatcher_and_accountability() -> None:
    assert lag.DISPATCH_GROUP == GROUP_ID
    assert lag.ACCOUNTABILITY_GROUP == accountability_app.APP_ID
    assert dict(lag.MONITORED_GROUPS) == {**lag.STACK_GROUPS, GROUP_ID: (topics.WARNINGS,),
                                          accountability_app.APP_ID: AccountabilityTopics().all()}
