"""The health probe's state machine, driven by fake checks and a fake clock; and the real checks
against addresses where nothing listens (no broker or database needed)."""

from __future__ import annotations

import logging
import time

import pytest
from prometheus_client import CollectorRegistry

from pipeline.embedded import free_port
from pipeline.health import (
    Dependency,
    HealthProbe,
    after_check,
    as_seen,
    kafka_check,
    postgresql_check,
)
from pipeline.settings import Settings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Switch:
    """A check that answers or fails as the test says."""

    def __init__(self) -> None:
        self.error: str | None = None
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        if self.error is not None:
            raise ConnectionRefusedError(self.error)


def probe(**checks: Switch) -> tuple[HealthProbe, Clock, CollectorRegistry]:
    clock, registry = Clock(), CollectorRegistry()
    return HealthProbe(checks, clock=clock, registry=registry, failures_to_down=2, stale_after_s=15.0), clock, registry


def test_unknown_until_the_first_check_and_not_healthy_meanwhile() -> None:
    p, _, registry = probe(kafka=Switch())
    assert p.down() == {"kafka": "not checked yet"}
    assert registry.get_sample_value("crisiswatch_dependency_up", {"dependency": "kafka"}) == 0.0
    p.check_now()
    assert p.healthy()
    assert registry.get_sample_value("crisiswatch_dependency_up", {"dependency": "kafka"}) == 1.0


def test_down_after_two_failures_in_a_row_and_up_at_the_first_success() -> None:
    kafka = Switch()
    p, clock, registry = probe(kafka=kafka)
    p.check_now()
    kafka.error = "broker gone"
    p.check_now()
    assert p.healthy(), "one miss is not an outage"
    clock.now += 1
    p.check_now()
    assert p.down() == {"kafka": "ConnectionRefusedError: broker gone"}
    assert registry.get_sample_value("crisiswatch_dependency_up", {"dependency": "kafka"}) == 0.0
    kafka.error = None
    p.check_now()
    assert p.healthy()


def test_a_miss_between_successes_does_not_accumulate() -> None:
    kafka = Switch()
    p, _, _ = probe(kafka=kafka)
    for _ in range(5):
        kafka.error = "slow"
        p.check_now()
        kafka.error = None
        p.check_now()
    assert p.healthy()


def test_a_first_check_that_fails_is_down_at_once() -> None:
    kafka = Switch()
    kafka.error = "nothing listens"
    p, _, _ = probe(kafka=kafka)
    p.check_now()
    assert "kafka" in p.down()


def test_an_answer_older_than_the_stale_limit_counts_as_down() -> None:
    p, clock, registry = probe(kafka=Switch())
    p.check_now()
    clock.now += 14
    assert p.healthy()
    clock.now += 2
    assert p.down()["kafka"].startswith("no answer from the health probe for 16s")
    assert registry.get_sample_value("crisiswatch_dependency_up", {"dependency": "kafka"}) == 0.0


def test_report_names_what_is_down() -> None:
    kafka, postgresql = Switch(), Switch()
    p, _, _ = probe(kafka=kafka, postgresql=postgresql)
    p.check_now()
    assert p.report() == (200, {"status": "ok", "dependencies": {"kafka": "up", "postgresql": "up"}})
    postgresql.error = "connection refused"
    p.check_now()
    p.check_now()
    status, body = p.report(ready=True, extra=1)
    assert status == 503
    assert body == {"status": "unavailable", "extra": 1, "down": ["postgresql"],
                    "dependencies": {"kafka": "up", "postgresql": "down: ConnectionRefusedError: connection refused"}}
    postgresql.error = None
    p.check_now()
    assert p.report(ready=False)[0] == 503
    assert p.report(ready=False)[1]["status"] == "unhealthy"


def test_transitions_are_logged_once_each(caplog: pytest.LogCaptureFixture) -> None:
    kafka = Switch()
    p, clock, _ = probe(kafka=kafka)
    p.check_now()
    kafka.error = "gone"
    with caplog.at_level(logging.INFO, logger="pipeline.health"):
        for _ in range(5):
            p.check_now()
        clock.now += 30
        kafka.error = None
        p.check_now()
        p.check_now()
    assert [r.getMessage() for r in caplog.records] == ["kafka unreachable: ConnectionRefusedError: gone",
                                                        "kafka reachable again after 30s"]


def test_pure_transitions() -> None:
    start = Dependency("kafka")
    up = after_check(start, None, 1.0)
    assert (up.up, up.changed_at, up.failures) == (True, 1.0, 0)
    missed = after_check(up, "x", 2.0)
    assert (missed.up, missed.failures, missed.changed_at) == (True, 1, 1.0)
    down = after_check(missed, "y", 3.0)
    assert (down.up, down.reason, down.changed_at) == (False, "y", 3.0)
    still = after_check(down, "z", 4.0)
    assert (still.up, still.reason, still.changed_at) == (False, "z", 3.0)
    assert as_seen(down, 3.0 + 100).reason.startswith("no answer")


def test_the_thread_checks_until_stopped() -> None:
    kafka = Switch()
    p = HealthProbe({"kafka": kafka}, interval_s=0.01).start()
    deadline = time.monotonic() + 10
    while kafka.calls < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    p.stop()
    calls = kafka.calls
    time.sleep(0.1)
    assert calls >= 3 and kafka.calls == calls


def test_the_real_checks_fail_where_nothing_listens() -> None:
    port = free_port()
    with pytest.raises(Exception):  # noqa: B017 - any failure to answer is "down"
        kafka_check(Settings(kafka_bootstrap=f"127.0.0.1:{port}"), timeout_s=2)()
    with pytest.raises(Exception):  # noqa: B017
        postgresql_check(f"postgresql://nobody@127.0.0.1:{port}/none", timeout_s=2)()
