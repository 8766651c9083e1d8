"""The PostgreSQL sink on the real broker and real PostgreSQL: every event type lands exactly once,
bad input is dead-lettered with its reason, a replay adds nothing, an unavailable database is
waited out, old check-ins are purged, and the ``sink``/``migrate`` verbs behave."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from prometheus_client import CollectorRegistry
from psycopg import sql
from psycopg.conninfo import make_conninfo

from consumers.kafka_io import Backoff, read_topic
from consumers.sink import SinkTopics, purge_checkin_history
from pipeline import topics
from pipeline.embedded import apply_migrations, free_port
from pipeline.settings import Secret, Settings
from producers.publisher import Outgoing, Publisher, outgoing
from schemas import Ack, Channel, Checkin, Citizen, Crisis, Warning, encode
from tests.stack_helpers import count, dead_letters, make_sink, new_database, running, uid, waiter

pytestmark = pytest.mark.integration

T0 = datetime(2025, 3, 1, 8, 30, tzinfo=UTC)
SQUARE = {"type": "Polygon", "coordinates": [[[106.7, -6.3], [106.9, -6.3], [106.9, -6.1], [106.7, -6.1], [106.7, -6.3]]]}


def citizen(citizen_id: str, name: str = "Sari Wulandari") -> Citizen:
    return Citizen(citizen_id, name, "ID", "id", (Channel("sms", "+6281200000001"),),
                   ({"name": "Budi", "relation": "brother", "phone": "+6281200000002"},), True,
                   {"country": "JP", "from": "2025-02-20", "until": "2025-03-20"})


def crisis(crisis_id: str, version: int, op: str = "upsert") -> Crisis:
    return Crisis(crisis_id, op, version, "operator", f"op-{version}", "Flooding in Jakarta", "met",  # type: ignore[arg-type]
                  "severe", "immediate", "observed", SQUARE, 5.0, ("ID",), T0, None, "Move to higher ground",
                  "https://example.org/flood", ())


def warning(citizen_id: str, crisis_id: str, kind: str = "entered") -> Warning:
    return Warning("w-" + uuid.uuid4().hex, citizen_id, crisis_id, 1, kind, "severe", "Flooding in Jakarta",  # type: ignore[arg-type]
                   "Move to higher ground", 0.0, -6.2, 106.8, T0, T0 + timedelta(seconds=2), ("ID",))


def checkin(citizen_id: str, at: datetime = T0) -> Checkin:
    return Checkin(citizen_id, -6.2, 106.8, at, "app", 15.0)


wait_until = waiter(45.0)


@pytest.fixture
def sink_db(database_url: str) -> str:
    """A database of its own, migrated: the retention sweep of one test never touches another's rows."""
    return new_database(database_url, "sink")


@pytest.fixture
def publisher(kafka_bootstrap: str) -> Iterator[Publisher]:
    pub = Publisher(Settings(), bootstrap=kafka_bootstrap)
    yield pub
    pub.close()


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def dlq_samples(registry: CollectorRegistry) -> list[Any]:
    return [s for metric in registry.collect() if metric.name == "crisiswatch_dlq_messages"
            for s in metric.samples if s.name.endswith("_total")]


def test_every_event_type_lands_once_and_bad_input_is_dead_lettered_once(
        kafka_bootstrap: str, sink_db: str, sink_topics: SinkTopics, publisher: Publisher) -> None:
    who, what = uid("cit"), uid("crisis")
    w1, w2 = warning(who, what), warning(who, what, "near")
    events: list[Outgoing] = [
        outgoing(citizen(who), sink_topics.citizens),
        outgoing(crisis(what, 1), sink_topics.crisis_events), outgoing(crisis(what, 2), sink_topics.crisis_events),
        outgoing(w1, sink_topics.warnings), outgoing(w2, sink_topics.warnings),
        outgoing(Ack(who, what, "safe", T0 + timedelta(minutes=5), "app"), sink_topics.acks),
        outgoing(checkin(who), sink_topics.checkins), outgoing(checkin(who, T0 + timedelta(minutes=1)), sink_topics.checkins),
    ]
    bad_lat = encode(checkin(who)).replace(b'"lat":-6.2', b'"lat":123.0')
    publisher.publish([*events, Outgoing(sink_topics.checkins, who.encode(), bad_lat),
                       Outgoing(sink_topics.acks, who.encode(), b"not json at all")])

    registry = CollectorRegistry()
    with running(make_sink(kafka_bootstrap, sink_db, sink_topics, registry)):
        wait_until(lambda: count(sink_db, "SELECT count(*) FROM checkins") == 2, what="check-ins in PostgreSQL")
        wait_until(lambda: count(sink_db, "SELECT count(*) FROM acks") == 1, what="the ack in PostgreSQL")
        letters = dead_letters(kafka_bootstrap, sink_topics.acks, 1)
        wait_until(lambda: sample(registry, "crisiswatch_sink_skipped_total", topic=sink_topics.checkins,
                                  reason="$.lat") == 1, what="the bad check-in counted")

    assert count(sink_db, "SELECT count(*) FROM citizens WHERE citizen_id = %s AND trip_country = 'JP'", who) == 1
    assert count(sink_db, "SELECT count(*) FROM crises WHERE crisis_id = %s", what) == 2
    assert count(sink_db, "SELECT count(*) FROM crises_current WHERE crisis_id = %s AND version = 2", what) == 1
    assert count(sink_db, "SELECT count(*) FROM warnings WHERE crisis_id = %s", what) == 2
    assert count(sink_db, "SELECT count(*) FROM warnings WHERE warning_id = %s AND kind = 'near'", w2.warning_id) == 1
    with psycopg.connect(sink_db) as conn:
        row = conn.execute("SELECT geometry FROM crises WHERE crisis_id = %s AND version = 1", (what,)).fetchone()
    assert row is not None and row[0] == SQUARE

    reasons = {m.value: dict(m.headers)[topics.DLQ_REASON_HEADER].decode() for m in letters}
    assert reasons == {b"not json at all": reasons[b"not json at all"]}
    assert reasons[b"not json at all"].startswith("InvalidEvent: $: not JSON")
    assert dict(letters[0].headers)[topics.DLQ_ERROR_TYPE_HEADER] == b"schemas.codec.InvalidEvent"
    assert sample(registry, "crisiswatch_sink_rows_written_total", table="checkins") == 2
    # a bad check-in is the worker's to dead-letter (it reads the same topic): the sink counts it, once
    assert sample(registry, "crisiswatch_dlq_messages_total", stage="sink", reason="$") == 1
    assert sample(registry, "crisiswatch_dlq_messages_total", stage="sink", reason="$.lat") == 0
    assert [m for m in read_topic(kafka_bootstrap, topics.DLQ, lambda seen: False, 1.0)
            if dict(m.headers).get(topics.DLQ_SOURCE_TOPIC_HEADER) == sink_topics.checkins.encode()] == []


def test_a_replay_adds_no_rows_and_the_latest_registration_wins(
        kafka_bootstrap: str, sink_db: str, sink_topics: SinkTopics, publisher: Publisher) -> None:
    who, what = uid("cit"), uid("crisis")
    warnings = [warning(who, what, kind) for kind in ("inside", "near", "exited")]
    publisher.publish([outgoing(w, sink_topics.warnings) for w in warnings])
    publisher.publish([outgoing(w, sink_topics.warnings) for w in warnings])  # the producer retried
    publisher.publish([outgoing(citizen(who, "Old Name"), sink_topics.citizens),
                       outgoing(citizen(who, "New Name"), sink_topics.citizens)])

    with running(make_sink(kafka_bootstrap, sink_db, sink_topics, CollectorRegistry())):
        wait_until(lambda: count(sink_db, "SELECT count(*) FROM citizens WHERE name = 'New Name'") == 1,
                   what="the citizen")
        wait_until(lambda: count(sink_db, "SELECT count(*) FROM warnings") == 3, what="the warnings")

    # A second consumer group replays both topics from the start. Everything about this citizen
    # shares one partition, so once the new messages after the replayed ones are in, the replay is done.
    registry = CollectorRegistry()
    with running(make_sink(kafka_bootstrap, sink_db, sink_topics, registry)):
        last = warning(who, what, "all_clear")
        publisher.publish([outgoing(last, sink_topics.warnings), outgoing(citizen(who, "Newest Name"), sink_topics.citizens)])
        wait_until(lambda: count(sink_db, "SELECT count(*) FROM warnings WHERE warning_id = %s", last.warning_id) == 1
                   and count(sink_db, "SELECT count(*) FROM citizens WHERE name = 'Newest Name'") == 1, what="the replay")

    assert count(sink_db, "SELECT count(*) FROM warnings WHERE crisis_id = %s", what) == 4
    assert count(sink_db, "SELECT count(*) FROM citizens WHERE citizen_id = %s", who) == 1
    assert sample(registry, "crisiswatch_sink_rows_written_total", table="warnings") == 1


def test_a_row_postgresql_refuses_is_dead_lettered_and_the_rest_of_the_batch_is_written(
        kafka_bootstrap: str, sink_db: str, sink_topics: SinkTopics, publisher: Publisher) -> None:
    # The decoder refuses what PostgreSQL cannot store (a NUL in a name); a refusal nobody foresaw is played
    # here by a constraint this test's own database adds.
    with psycopg.connect(sink_db, autocommit=True) as conn:
        conn.execute("ALTER TABLE citizens ADD CONSTRAINT no_test_names CHECK (name <> 'Refused By Postgres')")
    good, nul, refused = uid("cit"), uid("cit"), uid("cit")
    publisher.publish([outgoing(citizen(good), sink_topics.citizens),
                       outgoing(citizen(nul, "Nul\u0000Byte"), sink_topics.citizens),
                       outgoing(citizen(refused, "Refused By Postgres"), sink_topics.citizens)])
    with running(make_sink(kafka_bootstrap, sink_db, sink_topics, CollectorRegistry())):
        letters = dead_letters(kafka_bootstrap, sink_topics.citizens, 2)
        wait_until(lambda: count(sink_db, "SELECT count(*) FROM citizens") == 1, what="the good citizen")
    assert count(sink_db, "SELECT count(*) FROM citizens WHERE citizen_id = %s", good) == 1
    reasons = {next(who for who in (nul, refused) if who.encode() in m.value): dict(m.headers)[topics.DLQ_REASON_HEADER].decode()
               for m in letters}
    assert reasons[nul] == "InvalidEvent: $.name: NUL (U+0000) is not allowed in text"
    assert reasons[refused].startswith("CheckViolation: postgresql refused the row for citizens") and "no_test_names" in reasons[refused]


def test_a_row_that_cannot_be_written_is_isolated_and_dead_lettered_once_and_the_rest_written(
        kafka_bootstrap: str, sink_db: str, sink_topics: SinkTopics, publisher: Publisher) -> None:
    """A name with a lone surrogate is valid JSON but no driver could encode it. Admission refuses it (the
    decoder checks text); had it got past, writing its row would raise and the batch would be split until
    that row is alone (tests/unit/test_stage.py). Either way: dead-lettered once, the rest written."""
    first, bad, last = uid("cit"), uid("cit"), uid("cit")
    surrogate = encode(citizen(bad, "@NAME@")).replace(b"@NAME@", b"\\ud800")
    publisher.publish([outgoing(citizen(first), sink_topics.citizens), Outgoing(sink_topics.citizens, bad.encode(), surrogate),
                       outgoing(citizen(last), sink_topics.citizens)])
    registry = CollectorRegistry()
    with running(make_sink(kafka_bootstrap, sink_db, sink_topics, registry)):
        letters = dead_letters(kafka_bootstrap, sink_topics.citizens, 1)
        wait_until(lambda: count(sink_db, "SELECT count(*) FROM citizens") == 2, what="the two good citizens")
        time.sleep(1.0)
    assert count(sink_db, "SELECT count(*) FROM citizens WHERE citizen_id IN (%s, %s)", first, last) == 2
    assert [m.value for m in dead_letters(kafka_bootstrap, sink_topics.citizens, 1)] == [surrogate]  # once
    headers = dict(letters[0].headers)
    assert headers[topics.DLQ_REASON_HEADER] and headers[topics.DLQ_ERROR_TYPE_HEADER]
    assert headers[topics.DLQ_STAGE_HEADER] == b"sink"


def test_an_unavailable_database_is_waited_out_not_dead_lettered(
        kafka_bootstrap: str, database_url: str, sink_topics: SinkTopics, publisher: Publisher) -> None:
    name = f"later_{uuid.uuid4().hex[:10]}"
    url = make_conninfo(database_url, dbname=name)  # does not exist yet
    who = uid("cit")
    publisher.publish([outgoing(checkin(who), sink_topics.checkins)])
    registry = CollectorRegistry()
    sink = make_sink(kafka_bootstrap, url, sink_topics, registry, backoff=Backoff(initial_s=0.2, maximum_s=0.5))

    def failures() -> float:
        return sample(registry, "crisiswatch_sink_errors_total")

    with running(sink):
        wait_until(lambda: failures() >= 2, what="failed attempts")
        assert not sink.healthy
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        seen = failures()
        wait_until(lambda: failures() >= seen + 2, what="attempts on a database without tables")
        apply_migrations(url)
        wait_until(lambda: count(url, "SELECT count(*) FROM checkins WHERE citizen_id = %s", who) == 1,
                   what="the check-in after the outage")
        assert sink.healthy
    assert dlq_samples(registry) == []


def test_checkin_history_older_than_the_retention_is_purged(
        kafka_bootstrap: str, sink_db: str, sink_topics: SinkTopics, publisher: Publisher) -> None:
    who = uid("cit")
    now = T0 + timedelta(days=40)
    publisher.publish([outgoing(checkin(who, T0), sink_topics.checkins),
                       outgoing(checkin(who, now - timedelta(days=29)), sink_topics.checkins)])
    settings = Settings(kafka_bootstrap=kafka_bootstrap, database_url=Secret(sink_db), checkin_retention_days=30)
    registry = CollectorRegistry()
    with running(make_sink(kafka_bootstrap, sink_db, sink_topics, registry, settings=settings, clock=lambda: now,
                           retention_interval_s=0.0)):
        wait_until(lambda: sample(registry, "crisiswatch_sink_rows_written_total", table="checkins") == 2
                   and count(sink_db, "SELECT count(*) FROM checkins WHERE citizen_id = %s", who) == 1, what="the purge")
    assert count(sink_db, "SELECT count(*) FROM checkins WHERE observed_at > %s", now - timedelta(days=30)) == 1
    # The same sweep as a function, for a scheduled job: nothing older than 10 days is left.
    assert purge_checkin_history(sink_db, 10, now) == 1
    assert count(sink_db, "SELECT count(*) FROM checkins") == 0


def crisiswatch(*args: str, env: dict[str, str], **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], env={**os.environ, **env}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_sink_verb_serves_health_and_metrics_and_stops_on_sigterm(kafka_bootstrap: str, sink_db: str) -> None:
    port = free_port()
    proc = crisiswatch("sink", env={"CRISISWATCH_KAFKA_BOOTSTRAP": kafka_bootstrap, "CRISISWATCH_DATABASE_URL": sink_db,
                                    "CRISISWATCH_SINK_METRICS_PORT": str(port)})
    try:
        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    return bool(response.status == 200)
            except OSError:
                return False

        wait_until(healthy, what="/health")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            assert "crisiswatch_sink_batch_seconds" in response.read().decode()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_sink_verb_without_configuration_exits_2_with_one_line() -> None:
    proc = crisiswatch("sink", env={"CRISISWATCH_KAFKA_BOOTSTRAP": "", "CRISISWATCH_DATABASE_URL": ""})
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert len(err.strip().splitlines()) == 1 and "CRISISWATCH_KAFKA_BOOTSTRAP" in err


def test_migrate_verb(database_url: str) -> None:
    url = new_database(database_url, "sink", migrate=False)
    first = crisiswatch("migrate", env={"CRISISWATCH_DATABASE_URL": url})
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert "001_init.sql" in out
    assert count(url, "SELECT count(*) FROM information_schema.tables WHERE table_name = 'warnings'") == 1
    again = crisiswatch("migrate", env={"CRISISWATCH_DATABASE_URL": url})
    out, _ = again.communicate(timeout=60)
    assert again.returncode == 0 and "up to date" in out

    for env in ({"CRISISWATCH_DATABASE_URL": ""},
                {"CRISISWATCH_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/postgres?connect_timeout=2"}):
        proc = crisiswatch("migrate", env=env)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 2
        assert len(err.strip().splitlines()) == 1 and err.startswith("crisiswatch migrate:")
