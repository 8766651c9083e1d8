"""Accountability and escalation on real servers: an embedded broker of this module's own, the
session's PostgreSQL, the accountability process (``crisiswatch accountability``) and the sink as
child processes, the dispatcher in this process
with an HTTP receiver on loopback.

What an operator would notice: warnings delivered (or not), replies, and the crisis's counts on
``GET /v1/crises/{id}/status`` — equal to the same counts recomputed with SQL from the warnings,
deliveries and acks PostgreSQL holds; the CAP route of the same crisis still answers beside it.
And the silent: re-sent through their next channel after T1 and escalated to the embassy (a case on
``cases``) after T2, on a fake clock; a traveller warned once before departure."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from psycopg.types.json import Jsonb

from consumers.dispatch import Dispatcher
from consumers.escalate import Escalator
from consumers.kafka_io import read_topic
from consumers.sink import CITIZENS_TABLE, CRISES_TABLE, WARNINGS_TABLE, citizen_row, crisis_row, warning_row
from pipeline import topics
from pipeline.domain.accountability import COUNT_NAMES, COUNTS_SQL
from pipeline.domain.delivery import IDEMPOTENCY_HEADER
from pipeline.domain.escalation import parse_rules
from pipeline.domain.ids import warning_id
from pipeline.embedded import EmbeddedBroker, apply_migrations, create_topics, ensure_topics, free_port
from pipeline.metrics import DispatchMetrics
from pipeline.observability import read_metric
from pipeline.settings import Secret, Settings
from pipeline.stack import internal_topics
from pipeline.testing import VerbProcess, make_crisis, square
from producers.api import create_app
from producers.crisis_store import PostgresCrisisStore
from producers.publisher import Outgoing, Publisher, outgoing
from schemas import Ack, Channel, Citizen, Crisis, Warning
from schemas.models import WarningKind

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC).replace(microsecond=0)
OPERATOR = "operator-token-for-tests"


class Receiver:
    """Records every POST (path, Idempotency-Key); paths in ``failing`` answer 500."""

    def __init__(self) -> None:
        self.received: list[tuple[str, str]] = []
        self.failing: set[str] = set()
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver.lock:
                    receiver.received.append((self.path, self.headers.get(IDEMPOTENCY_HEADER, "")))
                    status = 500 if self.path in receiver.failing else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}{path}"

    def keys(self, path: str) -> list[str]:
        with self.lock:
            return [k for p, k in self.received if p == path]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


class Stack:
    def __init__(self, bootstrap: str, database_url: str, data_dir: Path) -> None:
        accountability_port, sink_port = free_port(), free_port()
        self.settings = Settings.from_env({
            "CRISISWATCH_KAFKA_BOOTSTRAP": bootstrap, "CRISISWATCH_DATABASE_URL": database_url,
            "CRISISWATCH_DATA_DIR": str(data_dir), "CRISISWATCH_ACCOUNTABILITY_WEB_PORT": str(accountability_port),
            "CRISISWATCH_SINK_METRICS_PORT": str(sink_port), "CRISISWATCH_STATUS_INTERVAL_S": "0.5",
            "CRISISWATCH_OPERATOR_TOKEN": OPERATOR, "CRISISWATCH_DISPATCH_MAX_ATTEMPTS": "2",
            "CRISISWATCH_DISPATCH_RETRY_INITIAL_S": "0.05", "CRISISWATCH_DISPATCH_RETRY_MAX_S": "0.1",
            "CRISISWATCH_WEBHOOK_SECRET": "test-secret"})
        env = {**os.environ, **self.settings.env()}
        self.accountability = VerbProcess("accountability", env, data_dir / "accountability.log", accountability_port)
        self.sink = VerbProcess("sink", env, data_dir / "sink.log", sink_port)
        self.publisher = Publisher(self.settings)
        self.database_url = database_url


@pytest.fixture(scope="module")
def stack(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("accountability")
    broker = EmbeddedBroker.start(log_path=data_dir / "broker.log")
    ensure_topics(broker.bootstrap, 4, extra=internal_topics())
    s = Stack(broker.bootstrap, database_url, data_dir)
    try:
        s.sink.start()
        s.accountability.start()
        yield s
    finally:
        s.publisher.close()
        s.accountability.stop()
        s.sink.stop()
        broker.stop()


@contextmanager
def dispatching(settings: Settings, topic: str) -> Iterator[None]:
    dispatcher = Dispatcher(settings, DispatchMetrics(CollectorRegistry()), source_topic=topic,
                            group_id="dispatch-" + uuid.uuid4().hex[:8])
    stop = threading.Event()
    thread = threading.Thread(target=dispatcher.run, args=(stop,), daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(30)
    assert not thread.is_alive()


def wait_for(condition: Callable[[], Any], timeout_s: float = 120.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def citizen(prefix: str, n: int, channels: list[tuple[str, str]], trip: dict[str, Any] | None = None) -> Citizen:
    return Citizen(f"{prefix}-{n}", f"Citizen {n}", "ID", "id" if n % 2 else "en",
                   tuple(Channel(t, a) for t, a in channels), (), True, trip)  # type: ignore[arg-type]


def warning_for(citizen_id: str, crisis: Crisis, kind: WarningKind, at: datetime, seq: int = 0) -> Warning:
    return Warning(warning_id(citizen_id, crisis.crisis_id, crisis.version, kind, seq), citizen_id, crisis.crisis_id,
                   crisis.version, kind, crisis.severity, crisis.title, "Move to high ground", 0.0 if kind != "near" else 2.5,
                   -6.2, 106.8, at, at, crisis.country_codes)


def sql_counts(database_url: str, crisis_id: str) -> dict[str, int]:
    with psycopg.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute(COUNTS_SQL, {"crisis_id": crisis_id})
        row = cur.fetchone()
        assert row is not None
        return dict(zip(COUNT_NAMES, (int(v) for v in row), strict=True))


def stored_counts(database_url: str, crisis_id: str) -> dict[str, int] | None:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(f"SELECT {', '.join(COUNT_NAMES)} FROM crisis_status WHERE crisis_id = %s",
                           (crisis_id,)).fetchone()
    return None if row is None else dict(zip(COUNT_NAMES, (int(v) for v in row), strict=True))


def test_warnings_deliveries_and_replies_become_the_status_the_endpoint_serves(stack: Stack, receiver: Receiver,
                                                                              fresh_topic: Callable[..., str]) -> None:
    tag = uuid.uuid4().hex[:8]
    crisis = make_crisis(f"acc-{tag}", square(106.8, -6.2, 0.2), severity="extreme", effective=NOW - timedelta(hours=1))
    receiver.failing.add("/c-4")  # citizen 4's only channel always fails: unreached
    people = [citizen(f"p{tag}", n, [("webhook", receiver.url(f"/c-{n}"))]) for n in range(6)]
    stack.publisher.publish_events([crisis, *people])
    wait_for(lambda: len(stored_rows(stack.database_url, "SELECT citizen_id FROM citizens WHERE citizen_id LIKE %s",
                                     f"p{tag}-%")) == 6, what="the citizens in the registry")
    kinds: list[WarningKind] = ["inside", "inside", "near", "entered", "near", "inside"]
    warnings = [warning_for(p.citizen_id, crisis, k, NOW - timedelta(minutes=30)) for p, k in zip(people, kinds, strict=True)]
    # citizen 5 then left the area
    warnings.append(warning_for(people[5].citizen_id, crisis, "exited", NOW - timedelta(minutes=10)))
    dispatch_topic = fresh_topic("acc-warnings")
    stack.publisher.publish([outgoing(w) for w in warnings])  # the accountability process and the sink
    stack.publisher.publish([outgoing(w, dispatch_topic) for w in warnings])  # the dispatcher under test
    replies = [Ack(people[0].citizen_id, crisis.crisis_id, "safe", NOW - timedelta(minutes=5), "app"),
               Ack(people[1].citizen_id, crisis.crisis_id, "safe", NOW - timedelta(minutes=6), "app"),
               Ack(people[1].citizen_id, crisis.crisis_id, "need_help", NOW - timedelta(minutes=4), "sms")]
    stack.publisher.publish_events(replies)
    expected = {"inside": 3, "near": 2, "warned": 6, "delivered": 5, "safe": 1, "need_help": 1, "unreached": 1,
                "escalated": 0}
    with dispatching(stack.settings, dispatch_topic):
        wait_for(lambda: stored_counts(stack.database_url, crisis.crisis_id) == expected, 150,
                 "the agent's status, stored by the sink")
    assert sql_counts(stack.database_url, crisis.crisis_id) == expected
    # The accountability process serves its own /metrics (and /health, awaited at its start).
    assert read_metric(stack.accountability.metrics, "crisiswatch_dependency_up", 'dependency="kafka"') == 1.0

    store = PostgresCrisisStore(stack.database_url)
    client = TestClient(create_app(stack.settings, stack.publisher, CollectorRegistry(), lambda: NOW,
                                   crisis_store=store))
    auth = {"Authorization": f"Bearer {OPERATOR}"}
    answer = client.get(f"/v1/crises/{crisis.crisis_id}/status", headers=auth)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert {k: body[k] for k in COUNT_NAMES} == sql_counts(stack.database_url, crisis.crisis_id)
    assert body["as_of"] is not None and body["active"] is True
    listed = client.get("/v1/crises", headers=auth).json()["crises"]
    mine = [c for c in listed if c["crisis_id"] == crisis.crisis_id]
    assert len(mine) == 1 and {k: mine[0][k] for k in COUNT_NAMES} == expected
    # The CAP route of the same crisis beside it, and the refusals.
    cap = client.get(f"/v1/crises/{crisis.crisis_id}.cap")
    assert cap.status_code == 200 and b"<alert" in cap.content
    assert client.get(f"/v1/crises/{crisis.crisis_id}/status").status_code == 401
    assert client.get("/v1/crises/no-such-crisis/status", headers=auth).status_code == 404
    store.close()


def stored_rows(database_url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url) as conn:
        return list(conn.execute(query, params).fetchall())


def insert(database_url: str, spec: Any, row: tuple[Any, ...]) -> None:
    """A row as the sink writes it (this test's database has no sink)."""
    from psycopg import sql

    values = tuple(Jsonb(v) if c in spec.jsonb and v is not None else v for c, v in zip(spec.columns, row, strict=True))
    query = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
        sql.Identifier(spec.name), sql.SQL(", ").join(map(sql.Identifier, spec.columns)),
        sql.SQL(", ").join(sql.Placeholder() * len(spec.columns)))
    with psycopg.connect(database_url) as conn:
        conn.execute(query, values)


@pytest.fixture
def own_database(database_url: str) -> str:
    """A database of this test's own on the session's server: the sweep looks at every active crisis,
    and the other tests' silent citizens are not this test's."""
    name = "esc_" + uuid.uuid4().hex[:10]
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = psycopg.conninfo.make_conninfo(database_url, dbname=name)
    apply_migrations(url)
    return url


def test_the_silent_are_resent_then_escalated_and_travellers_warned_once(
        stack: Stack, receiver: Receiver, fresh_topic: Callable[..., str], own_database: str) -> None:
    settings = replace(stack.settings, database_url=Secret(own_database))
    tag = uuid.uuid4().hex[:8]
    t0 = NOW - timedelta(minutes=1)
    crisis = make_crisis(f"esc-{tag}", square(106.8, -6.2, 0.2), severity="severe", effective=t0 - timedelta(hours=1),
                         country_codes=("ID",))
    silent = citizen(f"s{tag}", 0, [("webhook", receiver.url("/first")), ("webhook", receiver.url("/second"))])
    answered = citizen(f"s{tag}", 1, [("webhook", receiver.url("/a1")), ("webhook", receiver.url("/a2"))])
    traveller = citizen(f"s{tag}", 2, [("webhook", receiver.url("/trip"))],
                        {"country": "ID", "from": (t0 + timedelta(days=3)).date().isoformat(), "until": None})
    insert(own_database, CRISES_TABLE, crisis_row(crisis))
    for person in (silent, answered, traveller):
        insert(own_database, CITIZENS_TABLE, citizen_row(person))
    warned = [warning_for(p.citizen_id, crisis, "inside", t0) for p in (silent, answered)]
    for w in warned:
        insert(own_database, WARNINGS_TABLE, warning_row(w))
    with psycopg.connect(own_database) as conn:
        conn.execute("INSERT INTO acks (citizen_id, crisis_id, received_at, status, channel) VALUES (%s, %s, %s, 'safe', 'app')",
                     (answered.citizen_id, crisis.crisis_id, t0 + timedelta(minutes=5)))
    create_topics(stack.settings.kafka_bootstrap, ["cases.ID"], 4)
    dispatch_topic = fresh_topic("esc-warnings")
    clock = [t0]
    escalator = Escalator(own_database, stack.publisher, parse_rules("severe:1h,6h"), lambda: clock[0],
                          warnings_topic=dispatch_topic)
    with dispatching(settings, dispatch_topic):
        stack.publisher.publish([outgoing(w, dispatch_topic) for w in warned])
        wait_for(lambda: receiver.keys("/first") and receiver.keys("/a1"), what="the first deliveries")
        # Twelve hours of escalation, ten minutes at a time, in a few seconds.
        sweeps = []
        while clock[0] < t0 + timedelta(hours=12):
            sweeps.append((clock[0] - t0, escalator.sweep()))
            clock[0] += timedelta(minutes=10)
        wait_for(lambda: receiver.keys("/second"), what="the re-send through the next channel")
        wait_for(lambda: receiver.keys("/trip"), what="the pre-arrival warning")
        time.sleep(2.0)  # anything sent twice would arrive now
    resent = [at for at, s in sweeps if s.resent]
    opened = [at for at, s in sweeps if s.cases]
    assert resent == [timedelta(hours=1)] and opened == [timedelta(hours=6)]
    assert all(s.resent <= 1 and s.cases <= 1 for _, s in sweeps)
    assert receiver.keys("/first") == receiver.keys("/second") == [warned[0].warning_id]  # same key, next channel
    assert receiver.keys("/a2") == []  # who answered is left alone
    # The pre-arrival warning was found by every sweep (the sink is not told here), delivered once.
    assert sum(s.pre_arrival for _, s in sweeps) == len(sweeps)
    assert len(receiver.keys("/trip")) == 1
    level = stored_rows(own_database, "SELECT level, case_id FROM escalations WHERE crisis_id = %s",
                        crisis.crisis_id)
    assert len(level) == 1 and level[0][0] == 2
    case_id = level[0][1]
    def our_case(messages: list[Any]) -> list[dict[str, Any]]:
        found = [json.loads(m.value) for m in messages]
        return [c for c in found if c.get("case_id") == case_id]

    for topic in (topics.CASES, "cases.ID"):
        cases = our_case(read_topic(stack.settings.kafka_bootstrap, topic, lambda seen: bool(our_case(seen)), 30))
        assert [(c["kind"], c["citizen_id"], c["crisis_id"], c["state"]) for c in cases] == [
            ("escalation", silent.citizen_id, crisis.crisis_id, "open")]


def test_a_bad_delivery_is_dead_lettered_by_the_accountability_process_which_goes_on(stack: Stack) -> None:
    # Only the accountability process reads deliveries: a delivery/1 it cannot read is its dead letter.
    tag = uuid.uuid4().hex[:8]
    bad = json.dumps({"schema": "delivery/1", "warning_id": f"w-{tag}", "citizen_id": f"d{tag}"}).encode()
    stack.publisher.publish([Outgoing(topics.DELIVERIES, f"d{tag}".encode(), bad)])

    def ours(messages: list[Any]) -> list[Any]:
        return [m for m in messages if m.value == bad]

    [letter] = ours(read_topic(stack.settings.kafka_bootstrap, topics.DLQ, lambda seen: bool(ours(seen)), 60))
    headers = dict(letter.headers)
    assert headers[topics.DLQ_STAGE_HEADER] == b"accountability"
    assert headers[topics.DLQ_SOURCE_TOPIC_HEADER] == topics.DELIVERIES.encode()
    assert stack.accountability.healthy()  # raises if the process died of it
