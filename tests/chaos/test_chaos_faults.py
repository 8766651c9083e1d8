"""Faults inside a running stack, on one shared stack (each scenario with its own citizens and cities):
the worker killed outright twice, workers joining and leaving while check-ins flow, PostgreSQL gone for
20 seconds. Each counts what the offline engine says must be warned against what PostgreSQL holds."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from pipeline.stack import Child, Stack, running_stack
from tests.chaos.harness import (
    Scenario,
    Workload,
    Zone,
    assert_exact,
    chaos_settings,
    child,
    count_rows,
    extra_worker,
    geofence_config,
    health,
    kill_and_restart,
    postgres_handle,
    report,
    scaled,
    start_postgres,
    stop_postgres,
    wait_healthy,
    wait_until,
    worker_urls,
)

pytestmark = pytest.mark.chaos


@pytest.fixture(scope="module")
def stack(module_dir: Path) -> Iterator[Stack]:
    with running_stack(chaos_settings(module_dir)) as running:
        yield running


def scenario(name: str, prefix: str, stack: Stack, zones: list[Zone], per_zone: int, seed: int,
             extra: list[Child] | None = None) -> Scenario:
    workload = Workload(prefix, zones, per_zone, seed, geofence_config(stack.settings))
    return Scenario(name, stack.settings.kafka_bootstrap, stack.settings.database_url.get(), workload,
                    lambda: worker_urls(stack, extra or ()))


def test_worker_killed_twice_mid_stream(stack: Stack, scale: int, count_lines: list[str]) -> None:
    """SIGKILL, no goodbye, twice while check-ins flow: a restarted worker picks up from the committed
    offsets with the citizens' states recovered, so every warning comes out once."""
    zones = [Zone.of_city("Kuala Lumpur", "MY"), Zone.of_city("Tokyo", "JP")]
    s = scenario("worker_sigkill", "kill", stack, zones, scaled(60, scale), seed=11)
    try:
        s.prepare()
        stream = s.stream(rounds=6, duration_s=20.0 * scale)
        pids = [child(stack, "worker").process.pid]  # type: ignore[union-attr]
        for at in (0.2, 0.6):
            stream.reached(at)
            pids.append(kill_and_restart(stack, "worker", signal.SIGKILL))
        stream.finish()
        assert len(set(pids)) == 3  # two kills, two fresh workers
        s.cancel(zones[:1])
        tally = s.tally()
    finally:
        s.close()
    report(tally, count_lines)
    assert_exact(tally)


def owns_partitions(workers: list[Child]) -> bool:
    return all(health(w.health_url or "").get("checkin_partitions") for w in workers)


def test_rebalance_storm(stack: Stack, scale: int, count_lines: list[str]) -> None:
    """Workers join and leave (one politely, one killed) while check-ins flow: partitions move back
    and forth with the citizens' states, and nobody is warned twice or forgotten."""
    zones = [Zone.of_city("Manila", "PH"), Zone.of_city("Bangkok", "TH")]
    extra: list[Child] = []
    s = scenario("rebalance_storm", "storm", stack, zones, scaled(60, scale), seed=12, extra=extra)
    try:
        s.prepare()
        stream = s.stream(rounds=6, duration_s=25.0 * scale)
        for cycle in range(scale):
            stream.reached(0.1 + 0.8 * cycle / scale)
            joined = [extra_worker(stack, f"{cycle}{label}") for label in "ab"]
            extra.extend(joined)
            for worker in joined:
                wait_healthy(worker)
            # the group really rebalanced: each newcomer took check-in partitions over (4 partitions, 3 workers)
            wait_until(partial(owns_partitions, joined), 60, "the joined workers to own check-in partitions")
            joined[0].stop()  # leaves the group
            assert joined[1].process is not None
            os.killpg(joined[1].process.pid, signal.SIGKILL)  # vanishes: the group waits out its session
            joined[1].stop()
            extra.clear()
            wait_healthy(child(stack, "worker"))
        stream.finish()
        s.cancel(zones[:1])
        tally = s.tally()
    finally:
        for worker in extra:
            worker.stop()
        s.close()
    report(tally, count_lines)
    assert_exact(tally)


def test_postgres_stopped_for_20_seconds(stack: Stack, scale: int, count_lines: list[str]) -> None:
    """PostgreSQL stopped (pg_ctl stop) under load and started again 20 s later: the sink waits and
    retries, never skips; afterwards every warning, check-in and registration is in PostgreSQL."""
    zones = [Zone.of_city("Jakarta", "ID"), Zone.of_city("Singapore", "SG")]
    s = scenario("postgres_outage", "pgout", stack, zones, scaled(60, scale), seed=13)
    try:
        s.prepare()
        stream = s.stream(rounds=6, duration_s=25.0)
        stream.reached(0.15)
        pg = postgres_handle(stack)
        stop_postgres(pg)
        try:
            time.sleep(20.0)
        finally:
            start_postgres(pg)
        stream.finish()
        s.cancel(zones[:1])
        tally = s.tally()
        database_url = stack.settings.database_url.get()
        checkins_sent = len(s.workload.citizen_ids) * (1 + s.workload.rounds_played)
        assert count_rows(database_url, "checkins", s.workload.prefix) == checkins_sent
        assert count_rows(database_url, "citizens", s.workload.prefix) == len(s.workload.citizen_ids)
    finally:
        s.close()
    report(tally, count_lines)
    assert_exact(tally)
