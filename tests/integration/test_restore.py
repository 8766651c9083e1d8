"""Recovery from PostgreSQL on the real broker and the real PostgreSQL: a worker and the sink live
on one broker, which then dies with everything it held; ``crisiswatch restore`` fills a fresh broker
from what the sink recorded, and a real worker started on it carries on: a citizen walking into a
crisis declared before is warned, the warned get their all-clears, and no warning id is sent twice.

Each stage runs on a broker of its own (the worker reads the fixed topic names), and the module
has a database of its own (restore reads all of it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import psycopg.conninfo
import pytest
from psycopg import sql

from consumers.kafka_io import read_topic
from pipeline.app import changelog_topic, partition_of
from pipeline.domain.tracking import CitizenState
from pipeline.embedded import EmbeddedBroker, apply_migrations, ensure_topics, free_port
from pipeline.restore import (
    RestoreError,
    RestoreTargets,
    WorkersActive,
    broker_holds_data,
    read_recorded,
    restore,
    restore_if_needed,
)
from pipeline.settings import Settings
from pipeline.testing import VerbProcess, make_checkin, make_crisis, records_for, square
from producers.publisher import Publisher
from schemas import Channel, Citizen, Crisis, Warning, decode

pytestmark = pytest.mark.integration


def new_database(database_url: str) -> str:
    """A database of its own on the session's server, with the migrations applied."""
    name = f"restore_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = psycopg.conninfo.make_conninfo(database_url, dbname=name)
    apply_migrations(url)
    return url


@pytest.fixture(scope="module")
def own_database(database_url: str) -> str:
    return new_database(database_url)





class Stage:
    """One broker with its worker and sink, on the module's database."""

    def __init__(self, database_url: str, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.broker = EmbeddedBroker.start(log_path=data_dir / "broker.log")
        ensure_topics(self.broker.bootstrap, 4, extra=[changelog_topic()])  # as `crisiswatch up` does
        worker_port, sink_port = free_port(), free_port()
        self.settings = Settings.from_env({
            "CRISISWATCH_KAFKA_BOOTSTRAP": self.broker.bootstrap, "CRISISWATCH_DATABASE_URL": database_url,
            "CRISISWATCH_DATA_DIR": str(data_dir), "CRISISWATCH_WORKER_WEB_PORT": str(worker_port),
            "CRISISWATCH_SINK_METRICS_PORT": str(sink_port), "CRISISWATCH_BATCH_WAIT_S": "0.02"})
        self.env = {**os.environ, **self.settings.env()}
        self.worker = VerbProcess("worker", self.env, data_dir / "worker.log", worker_port)
        self.sink = VerbProcess("sink", self.env, data_dir / "sink.log", sink_port)
        self.publisher = Publisher(self.settings)

    def close(self) -> None:
        self.publisher.close()
        self.worker.stop()
        self.sink.stop()
        self.broker.stop()

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=self.env, capture_output=True,
                              text=True, timeout=120, check=False)

    def warnings(self, prefix: str, until: Callable[[list[Warning]], bool], timeout_s: float = 60) -> list[Warning]:
        def mine(messages: list) -> list[Warning]:  # type: ignore[type-arg]
            return [w for w in (decode(m.value, Warning) for m in messages) if w.citizen_id.startswith(prefix)]

        return mine(read_topic(self.settings.kafka_bootstrap, "warnings", lambda seen: until(mine(seen)), timeout_s))

    def active_crises(self) -> int:
        with urllib.request.urlopen(self.worker.health, timeout=5) as response:
            return int(json.loads(response.read())["active_crises"])

    def publish_crisis_and_wait(self, crisis: Crisis) -> None:
        before = self.active_crises()
        self.publisher.publish_events([crisis])
        deadline = time.monotonic() + 30
        while self.active_crises() <= before:
            assert time.monotonic() < deadline, "the worker never saw the crisis"
            time.sleep(0.1)


def count(database_url: str, query: str, prefix: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(query, (prefix + "%",)).fetchone()
        return int(row[0]) if row else 0


def wait_count(database_url: str, query: str, prefix: str, expected: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while (got := count(database_url, query, prefix)) < expected:
        assert time.monotonic() < deadline, f"{query}: {got} of {expected}"
        time.sleep(0.3)


def warning_rows(database_url: str, prefix: str) -> list[tuple[str, str, str]]:
    with psycopg.connect(database_url) as conn:
        return [(r[0], r[1], r[2]) for r in conn.execute(
            "SELECT warning_id, citizen_id, kind FROM warnings WHERE citizen_id LIKE %s", (prefix + "%",))]


def citizen(citizen_id: str) -> Citizen:
    return Citizen(citizen_id, "Test Citizen", "ID", "id", (Channel("sms", "+6281234567"),), (), True,
                   {"country": "KZ", "from": "2026-01-01"})


ZONE, GONE = square(60.0, 30.0, 0.5), square(70.0, 30.0, 0.5)
IN_ZONE, IN_GONE, OUTSIDE = (30.0, 60.0), (30.0, 70.0), (30.0, 63.0)


def test_after_the_broker_lost_everything_the_restored_worker_warns_and_all_clears(
        own_database: str, tmp_path: Path) -> None:
    prefix = f"r{uuid.uuid4().hex[:6]}-"
    inside, owed, walker = prefix + "inside", prefix + "owed", prefix + "walker"
    t0 = datetime.now(UTC)
    zone = make_crisis(prefix + "zone", ZONE, effective=t0, country_codes=("KZ",))
    gone = make_crisis(prefix + "gone", GONE, effective=t0, country_codes=("KZ",))

    # Life before: a worker warns two citizens; then it stops, the "gone" crisis is cancelled (the
    # sink records it, no worker sends the all-clear), and the broker dies with everything it held.
    first = Stage(own_database, tmp_path / "first")
    try:
        first.sink.start()
        first.worker.start()
        first.publisher.publish_events([citizen(c) for c in (inside, owed, walker)])
        first.publish_crisis_and_wait(zone)
        first.publish_crisis_and_wait(gone)
        first.publisher.publish_events([make_checkin(inside, *IN_ZONE, observed_at=t0),
                                        make_checkin(owed, *IN_GONE, observed_at=t0),
                                        make_checkin(walker, *OUTSIDE, observed_at=t0)])
        sent_before = first.warnings(prefix, lambda ws: len(ws) >= 2)
        assert Counter((w.citizen_id, w.kind) for w in sent_before) == Counter({(inside, "entered"): 1,
                                                                               (owed, "entered"): 1})
        first.worker.stop()
        first.publisher.publish_events([make_crisis(gone.crisis_id, None, op="cancel", version=2, effective=t0)])
        wait_count(own_database, "SELECT count(*) FROM crises WHERE crisis_id LIKE %s", prefix, 3)
        wait_count(own_database, "SELECT count(*) FROM warnings WHERE citizen_id LIKE %s", prefix, 2)
        wait_count(own_database, "SELECT count(*) FROM checkins WHERE citizen_id LIKE %s", prefix, 3)
        wait_count(own_database, "SELECT count(*) FROM citizens WHERE citizen_id LIKE %s", prefix, 3)
    finally:
        first.close()
    ids_before = {w.warning_id for w in sent_before}

    second = Stage(own_database, tmp_path / "second")
    try:
        done = second.cli("restore", "--if-needed")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == ("restored from PostgreSQL: 1 active crises, 3 citizens, 3 citizen states "
                                       "(2 warned), 1 ended crises for their all-clears, "
                                       "2 accountability standings"), done.stdout
        again = second.cli("restore", "--if-needed")
        assert again.returncode == 0 and again.stdout.startswith("nothing restored"), (again.stdout, again.stderr)

        # the states are in the changelog as the worker's table writes them
        changelog = changelog_topic()
        records = records_for(second.settings.kafka_bootstrap, changelog, {inside, owed, walker}, expected=3)
        assert len(records) == 3
        states = {}
        for record in records:
            assert record.partition == partition_of(record.key, second.settings.partitions)
            states[record.key.decode()] = CitizenState.from_dict(record.key.decode(), json.loads(record.value))
        assert {c: {k: (p.status, p.seq, p.warned) for k, p in s.presence.items()} for c, s in states.items()} == {
            inside: {zone.crisis_id: ("in", 1, True)}, owed: {gone.crisis_id: ("in", 1, True)}, walker: {}}

        second.sink.start()
        second.worker.start()
        refused = second.cli("restore")
        assert refused.returncode == 2 and "refused" in refused.stderr, (refused.stdout, refused.stderr)

        # the all-clear owed for the crisis cancelled while the worker was down, at the worker's first reconcile
        got = second.warnings(prefix, lambda ws: len(ws) >= 1)
        assert [(w.citizen_id, w.kind, w.crisis_id) for w in got] == [(owed, "all_clear", gone.crisis_id)]

        t1 = t0 + timedelta(seconds=30)
        second.publisher.publish_events([make_checkin(walker, *IN_ZONE, observed_at=t1),   # walks in
                                         make_checkin(inside, *IN_ZONE, observed_at=t1)])  # still inside: nothing
        got = second.warnings(prefix, lambda ws: len(ws) >= 2)
        assert Counter((w.citizen_id, w.kind) for w in got) == Counter({(owed, "all_clear"): 1, (walker, "entered"): 1})

        second.publisher.publish_events([make_crisis(zone.crisis_id, None, op="cancel", version=2, effective=t0)])
        got = second.warnings(prefix, lambda ws: len(ws) >= 4)
        time.sleep(2.0)  # anything extra would arrive now
        got = second.warnings(prefix, lambda ws: False, timeout_s=3)
        assert Counter((w.citizen_id, w.kind) for w in got) == Counter(
            {(owed, "all_clear"): 1, (walker, "entered"): 1, (inside, "all_clear"): 1, (walker, "all_clear"): 1})
        assert not {w.warning_id for w in got} & ids_before  # no id sent twice, across the restart

        wait_count(own_database, "SELECT count(*) FROM warnings WHERE citizen_id LIKE %s", prefix, 6)
        rows = warning_rows(own_database, prefix)
        assert Counter((r[1], r[2]) for r in rows) == Counter(
            {(inside, "entered"): 1, (owed, "entered"): 1, (owed, "all_clear"): 1, (walker, "entered"): 1,
             (inside, "all_clear"): 1, (walker, "all_clear"): 1})
    finally:
        second.close()


def test_restore_if_needed_leaves_a_broker_that_holds_its_data_alone(
        kafka_bootstrap: str, own_database: str, fresh_topic: Callable[..., str]) -> None:
    settings = Settings.from_env({"CRISISWATCH_KAFKA_BOOTSTRAP": kafka_bootstrap,
                                  "CRISISWATCH_DATABASE_URL": own_database,
                                  "CRISISWATCH_PRODUCER_MAX_BATCH_BYTES": "1"})
    targets = RestoreTargets(fresh_topic("crises"), fresh_topic("citizens"), f"app-{uuid.uuid4().hex[:8]}")
    prefix = f"n{uuid.uuid4().hex[:6]}-"
    with psycopg.connect(own_database) as conn:  # a realistic row, as the sink writes it
        conn.execute("INSERT INTO checkins (citizen_id, observed_at, source, lat, lon, accuracy_m) "
                     "VALUES (%s, now(), 'app', 1.5, 2.5, 12.0)", (prefix + "a",))
    assert not broker_holds_data(settings, targets)
    report = restore_if_needed(settings, targets=targets)
    assert report is not None and report.states >= 1
    assert broker_holds_data(settings, targets)
    assert restore_if_needed(settings, targets=targets) is None
    records = records_for(kafka_bootstrap, targets.changelog, {prefix + "a"}, expected=1)
    assert [json.loads(r.value)["lat"] for r in records] == [1.5]


def test_restore_refuses_while_the_worker_group_has_members(kafka_bootstrap: str, own_database: str,
                                                            fresh_topic: Callable[..., str]) -> None:
    from kafka import KafkaConsumer

    settings = Settings.from_env({"CRISISWATCH_KAFKA_BOOTSTRAP": kafka_bootstrap,
                                  "CRISISWATCH_DATABASE_URL": own_database})
    targets = RestoreTargets(fresh_topic("crises"), fresh_topic("citizens"), f"app-{uuid.uuid4().hex[:8]}")
    member = KafkaConsumer(targets.crisis_events, bootstrap_servers=kafka_bootstrap, group_id=targets.app_id,
                           session_timeout_ms=6000, heartbeat_interval_ms=1000)
    try:
        deadline = time.monotonic() + 60
        while not member.assignment():
            assert time.monotonic() < deadline, "the stand-in worker never joined its group"
            member.poll(timeout_ms=300)
        with pytest.raises(WorkersActive, match="1 worker"):
            restore(settings, targets=targets)
    finally:
        member.close()
    assert not broker_holds_data(settings, targets)  # nothing was written


def test_an_unreachable_database_is_a_clear_error(kafka_bootstrap: str, fresh_topic: Callable[..., str]) -> None:
    settings = Settings.from_env({"CRISISWATCH_KAFKA_BOOTSTRAP": kafka_bootstrap,
                                  "CRISISWATCH_DATABASE_URL": f"postgresql://nobody@127.0.0.1:{free_port()}/none"})
    targets = RestoreTargets(fresh_topic("crises"), fresh_topic("citizens"), f"app-{uuid.uuid4().hex[:8]}")
    with pytest.raises(RestoreError, match="cannot read PostgreSQL"):
        restore_if_needed(settings, targets=targets)


def test_rows_that_are_no_valid_event_are_skipped_and_never_stand_in_for_a_newer_version(database_url: str) -> None:
    url = new_database(database_url)
    insert = ("INSERT INTO crises (crisis_id, version, op, source, source_ref, title, category, severity, urgency, "
              "certainty, geometry, buffer_km, effective, instruction, url) VALUES "
              "(%s, %s, %s, 'operator', 'ref', 'Flooding', 'met', %s, 'immediate', 'observed', %s, 0, now(), '', '')")
    area = json.dumps(square(10.0, 10.0, 0.1))
    with psycopg.connect(url) as conn:
        conn.execute(insert, ("cancelled", 1, "upsert", "severe", area))
        conn.execute(insert, ("cancelled", 2, "cancel", "apocalyptic", None))  # refused by crisis/1 today
        conn.execute(insert, ("mended", 1, "upsert", "apocalyptic", area))
        conn.execute(insert, ("mended", 2, "upsert", "severe", area))
    recorded = read_recorded(url, datetime.now(UTC))
    assert [(c.crisis_id, c.version) for c in recorded.crises] == [("mended", 2)]
    assert len(recorded.skipped) == 2 and all("severity" in reason for reason in recorded.skipped)
