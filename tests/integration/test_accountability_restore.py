"""The accountability counts survive a lost broker, on real servers: a broker of its own with the
sink, the accountability process (child processes) and the dispatcher (in this process, posting to a
receiver on loopback) builds up a crisis's counts — warnings, deliveries, a channel that fails,
replies, escalations by the sweep on a fake clock. Then the broker dies with everything it held,
``crisiswatch restore --if-needed`` fills a fresh one from PostgreSQL, and a restarted accountability
process publishes the status it published before — equal to the counts recomputed with SQL — never a
lower one, and counts the next reply on top of it.

The module has a database of its own: restore reads all of it, and the escalation sweep looks at every
active crisis."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import psycopg.conninfo
import pytest
from prometheus_client import CollectorRegistry
from psycopg import sql

from consumers.dispatch import Dispatcher
from consumers.escalate import Escalator
from consumers.kafka_io import read_topic
from pipeline import topics
from pipeline.accountability import SEPARATOR
from pipeline.accountability_app import table_changelog_topic
from pipeline.domain.accountability import COUNT_NAMES, COUNTS_SQL
from pipeline.domain.escalation import parse_rules
from pipeline.domain.ids import warning_id
from pipeline.embedded import EmbeddedBroker, apply_migrations, create_topics, ensure_topics, free_port
from pipeline.metrics import DispatchMetrics
from pipeline.settings import Settings
from pipeline.stack import internal_topics
from pipeline.testing import VerbProcess, make_crisis, records_for, square
from producers.publisher import Publisher, outgoing
from schemas import Ack, Channel, Citizen, Crisis, CrisisStatus, Warning, decode
from schemas.models import WarningKind

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture(scope="module")
def own_database(database_url: str) -> str:
    name = f"acctrestore_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = psycopg.conninfo.make_conninfo(database_url, dbname=name)
    apply_migrations(url)
    return url


class Receiver:
    """Answers every POST with 200, except on the paths in ``failing`` (500)."""

    def __init__(self, failing: set[str]) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                self.send_response(500 if self.path in failing else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Stage:
    """One broker with the sink and the accountability process, on the module's database."""

    def __init__(self, database_url: str, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.broker = EmbeddedBroker.start(log_path=data_dir / "broker.log")
        ensure_topics(self.broker.bootstrap, 4, extra=internal_topics())  # as `crisiswatch up` does
        create_topics(self.broker.bootstrap, ["cases.ID"], 4)
        accountability_port, sink_port = free_port(), free_port()
        self.settings = Settings.from_env({
            "CRISISWATCH_KAFKA_BOOTSTRAP": self.broker.bootstrap, "CRISISWATCH_DATABASE_URL": database_url,
            "CRISISWATCH_DATA_DIR": str(data_dir), "CRISISWATCH_ACCOUNTABILITY_WEB_PORT": str(accountability_port),
            "CRISISWATCH_SINK_METRICS_PORT": str(sink_port), "CRISISWATCH_STATUS_INTERVAL_S": "0.5",
            "CRISISWATCH_DISPATCH_MAX_ATTEMPTS": "2", "CRISISWATCH_DISPATCH_RETRY_INITIAL_S": "0.05",
            "CRISISWATCH_DISPATCH_RETRY_MAX_S": "0.1", "CRISISWATCH_WEBHOOK_SECRET": "test-secret"})
        self.env = {**os.environ, **self.settings.env()}
        self.accountability = VerbProcess("accountability", self.env, data_dir / "accountability.log",
                                          accountability_port)
        self.sink = VerbProcess("sink", self.env, data_dir / "sink.log", sink_port)
        self.publisher = Publisher(self.settings)

    def close(self) -> None:
        self.publisher.close()
        self.accountability.stop()
        self.sink.stop()
        self.broker.stop()

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=self.env, capture_output=True,
                              text=True, timeout=120, check=False)

    def statuses(self, crisis_id: str, until: Callable[[list[CrisisStatus]], bool],
                 timeout_s: float = 90) -> list[CrisisStatus]:
        """Every status of the crisis on ``crisis-status``, in the order published (one partition per key)."""
        def mine(messages: list[Any]) -> list[CrisisStatus]:
            return [s for s in (decode(m.value, CrisisStatus) for m in messages) if s.crisis_id == crisis_id]

        return mine(read_topic(self.settings.kafka_bootstrap, topics.CRISIS_STATUS, lambda seen: until(mine(seen)),
                               timeout_s))


@contextmanager
def dispatching(settings: Settings) -> Iterator[None]:
    dispatcher = Dispatcher(settings, DispatchMetrics(CollectorRegistry()), group_id="dispatch-" + uuid.uuid4().hex[:8])
    stop = threading.Event()
    thread = threading.Thread(target=dispatcher.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()


def wait_for(condition: Callable[[], Any], timeout_s: float = 120.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)
    return result


def counts_of(status: CrisisStatus) -> dict[str, int]:
    return {name: getattr(status, name) for name in COUNT_NAMES}


def sql_counts(database_url: str, crisis_id: str) -> dict[str, int]:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(COUNTS_SQL, {"crisis_id": crisis_id}).fetchone()
    assert row is not None
    return dict(zip(COUNT_NAMES, (int(v) for v in row), strict=True))


def stored_counts(database_url: str, crisis_id: str) -> dict[str, int] | None:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(f"SELECT {', '.join(COUNT_NAMES)} FROM crisis_status WHERE crisis_id = %s",
                           (crisis_id,)).fetchone()
    return None if row is None else dict(zip(COUNT_NAMES, (int(v) for v in row), strict=True))


def rows(database_url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url) as conn:
        return list(conn.execute(query, params).fetchall())


def warning_for(citizen_id: str, crisis: Crisis, kind: WarningKind, at: datetime, seq: int = 0) -> Warning:
    return Warning(warning_id(citizen_id, crisis.crisis_id, crisis.version, kind, seq), citizen_id, crisis.crisis_id,
                   crisis.version, kind, crisis.severity, crisis.title, "Move to high ground",
                   2.5 if kind == "near" else 0.0, -6.2, 106.8, at, at, crisis.country_codes)


def test_a_restarted_accountability_process_publishes_the_counts_it_published_before_the_broker_was_lost(
        own_database: str, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    crisis = make_crisis(f"ar-{tag}", square(106.8, -6.2, 0.2), severity="severe",
                         effective=NOW - timedelta(hours=1), country_codes=("ID",))
    receiver = Receiver(failing={"/c-3"})  # citizen 3's only channel always fails: unreached
    people = [Citizen(f"a{tag}-{n}", f"Citizen {n}", "ID", "en", (Channel("webhook", receiver.url(f"/c-{n}")),), (),
                      True, None) for n in range(6)]
    at = NOW - timedelta(minutes=30)
    kinds: list[WarningKind] = ["inside", "inside", "near", "entered", "inside", "near"]
    warnings = [warning_for(p.citizen_id, crisis, k, at) for p, k in zip(people, kinds, strict=True)]
    warnings.append(warning_for(people[5].citizen_id, crisis, "exited", at + timedelta(minutes=5), seq=1))
    # 0 safe, 1 needs help; 2, 3 and 4 stay silent and are escalated; 3 is unreached; 5 left the area.
    expected = {"inside": 4, "near": 1, "warned": 6, "delivered": 5, "safe": 1, "need_help": 1, "unreached": 1,
                "escalated": 3}

    first = Stage(own_database, tmp_path / "first")
    try:
        first.sink.start()
        first.accountability.start()
        first.publisher.publish_events([crisis, *people])
        wait_for(lambda: len(rows(own_database, "SELECT 1 FROM citizens WHERE citizen_id LIKE %s", f"a{tag}-%")) == 6
                 and rows(own_database, "SELECT 1 FROM crises WHERE crisis_id = %s", crisis.crisis_id),
                 what="the crisis and the citizens in PostgreSQL")
        with dispatching(first.settings):
            first.publisher.publish([outgoing(w) for w in warnings])
            first.publisher.publish_events([
                Ack(people[0].citizen_id, crisis.crisis_id, "safe", NOW - timedelta(minutes=5), "app"),
                Ack(people[1].citizen_id, crisis.crisis_id, "need_help", NOW - timedelta(minutes=4), "sms")])
            wait_for(lambda: len(rows(own_database, "SELECT 1 FROM acks WHERE crisis_id = %s", crisis.crisis_id)) == 2
                     and len(rows(own_database, "SELECT 1 FROM deliveries WHERE crisis_id = %s AND status IN "
                                  "('delivered', 'gave_up')", crisis.crisis_id)) == 7,
                     what="the replies and every warning's delivery outcome in PostgreSQL")
            # Seven hours later the silent are re-sent (to no other channel) and escalated to the embassy.
            sweep = Escalator(own_database, first.publisher, parse_rules("severe:1h,6h"),
                              lambda: NOW + timedelta(hours=7)).sweep()
            assert sweep.cases == 3, sweep
            wait_for(lambda: stored_counts(own_database, crisis.crisis_id) == expected, 150,
                     "the accountability process's status, stored by the sink")
        assert sql_counts(own_database, crisis.crisis_id) == expected
        before = first.statuses(crisis.crisis_id, lambda got: bool(got) and counts_of(got[-1]) == expected)[-1]
        assert counts_of(before) == expected
    finally:
        first.close()
        receiver.close()

    # The broker is gone with every topic; PostgreSQL keeps what the sink and the dispatcher recorded.
    second = Stage(own_database, tmp_path / "second")
    try:
        dry = second.cli("restore", "--dry-run")
        assert dry.returncode == 0 and dry.stdout.strip().endswith(", 6 accountability standings"), dry
        done = second.cli("restore", "--if-needed")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().endswith(", 6 accountability standings"), done.stdout
        changelog = table_changelog_topic()
        keys = {f"{crisis.crisis_id}{SEPARATOR}{p.citizen_id}" for p in people}
        assert len(records_for(second.settings.kafka_bootstrap, changelog, keys, expected=6)) == 6

        second.sink.start()
        second.accountability.start()  # recovers its table from the restored changelog
        refused = second.cli("restore")
        assert refused.returncode == 2 and "accountability process" in refused.stderr, (refused.stdout, refused.stderr)
        after = second.statuses(crisis.crisis_id, bool)
        assert after, "no status published by the restarted accountability process"
        assert counts_of(after[0]) == counts_of(before) == sql_counts(own_database, crisis.crisis_id)

        # The next reply counts on top of what was restored, and no status ever went below it.
        second.publisher.publish_events([Ack(people[4].citizen_id, crisis.crisis_id, "safe", NOW, "app")])
        now_expected = {**expected, "safe": 2}
        after = second.statuses(crisis.crisis_id, lambda got: bool(got) and counts_of(got[-1]) == now_expected)
        assert after and counts_of(after[-1]) == now_expected, [counts_of(s) for s in after]
        assert all(counts_of(s) in (expected, now_expected) for s in after), [counts_of(s) for s in after]
        wait_for(lambda: stored_counts(own_database, crisis.crisis_id) == now_expected, 90,
                 "the new status, stored by the sink")
        assert sql_counts(own_database, crisis.crisis_id) == now_expected
    finally:
        second.close()
