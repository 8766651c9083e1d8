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
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from consumers.escalate import Escalator
from consumers.kafka_io import read_topic
from consumers.sink import CITIZENS_TABLE, CRISES_TABLE, WARNINGS_TABLE, citizen_row, crisis_row, warning_row
from pipeline import topics
from pipeline.domain.accountability import COUNT_NAMES
from pipeline.domain.escalation import parse_rules
from pipeline.embedded import create_topics
from pipeline.observability import read_metric
from pipeline.settings import Secret
from pipeline.stack import internal_topics
from pipeline.testing import make_crisis, square
from producers.api import create_app
from producers.crisis_store import PostgresCrisisStore
from producers.publisher import Outgoing, outgoing
from schemas import Ack, Channel, Citizen
from schemas.models import WarningKind
from tests.stack_helpers import (
    ACCOUNTABILITY_ENV,
    ProcessStack,
    WebhookReceiver,
    dispatching,
    insert,
    new_database,
    rows,
    sql_counts,
    started,
    stored_counts,
    waiter,
    warning_for,
)

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC).replace(microsecond=0)
OPERATOR = "operator-token-for-tests"


@pytest.fixture(scope="module")
def stack(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessStack]:
    yield from started(ProcessStack.on_own_broker(
        database_url, tmp_path_factory.mktemp("accountability"), extra_topics=internal_topics(),
        verbs=("sink", "accountability"), env={**ACCOUNTABILITY_ENV, "CRISISWATCH_OPERATOR_TOKEN": OPERATOR}))


wait_for = waiter(120.0, every_s=0.3)


def citizen(prefix: str, n: int, channels: list[tuple[str, str]], trip: dict[str, Any] | None = None) -> Citizen:
    return Citizen(f"{prefix}-{n}", f"Citizen {n}", "ID", "id" if n % 2 else "en",
                   tuple(Channel(t, a) for t, a in channels), (), True, trip)  # type: ignore[arg-type]


def test_warnings_deliveries_and_replies_become_the_status_the_endpoint_serves(stack: ProcessStack, webhook: WebhookReceiver,
                                                                              fresh_topic: Callable[..., str]) -> None:
    tag = uuid.uuid4().hex[:8]
    crisis = make_crisis(f"acc-{tag}", square(106.8, -6.2, 0.2), severity="extreme", effective=NOW - timedelta(hours=1))
    webhook.failing.add("/c-4")  # citizen 4's only channel always fails: unreached
    people = [citizen(f"p{tag}", n, [("webhook", webhook.url(f"/c-{n}"))]) for n in range(6)]
    stack.publisher.publish_events([crisis, *people])
    wait_for(lambda: len(rows(stack.database_url, "SELECT citizen_id FROM citizens WHERE citizen_id LIKE %s",
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


@pytest.fixture
def own_database(database_url: str) -> str:
    """A database of this test's own on the session's server: the sweep looks at every active crisis,
    and the other tests' silent citizens are not this test's."""
    return new_database(database_url, "esc")


def test_the_silent_are_resent_then_escalated_and_travellers_warned_once(
        stack: ProcessStack, webhook: WebhookReceiver, fresh_topic: Callable[..., str], own_database: str) -> None:
    settings = replace(stack.settings, database_url=Secret(own_database))
    tag = uuid.uuid4().hex[:8]
    t0 = NOW - timedelta(minutes=1)
    crisis = make_crisis(f"esc-{tag}", square(106.8, -6.2, 0.2), severity="severe", effective=t0 - timedelta(hours=1),
                         country_codes=("ID",))
    silent = citizen(f"s{tag}", 0, [("webhook", webhook.url("/first")), ("webhook", webhook.url("/second"))])
    answered = citizen(f"s{tag}", 1, [("webhook", webhook.url("/a1")), ("webhook", webhook.url("/a2"))])
    traveller = citizen(f"s{tag}", 2, [("webhook", webhook.url("/trip"))],
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
        wait_for(lambda: webhook.keys("/first") and webhook.keys("/a1"), what="the first deliveries")
        # Twelve hours of escalation, ten minutes at a time, in a few seconds.
        sweeps = []
        while clock[0] < t0 + timedelta(hours=12):
            sweeps.append((clock[0] - t0, escalator.sweep()))
            clock[0] += timedelta(minutes=10)
        wait_for(lambda: webhook.keys("/second"), what="the re-send through the next channel")
        wait_for(lambda: webhook.keys("/trip"), what="the pre-arrival warning")
        time.sleep(2.0)  # anything sent twice would arrive now
    resent = [at for at, s in sweeps if s.resent]
    opened = [at for at, s in sweeps if s.cases]
    assert resent == [timedelta(hours=1)] and opened == [timedelta(hours=6)]
    assert all(s.resent <= 1 and s.cases <= 1 for _, s in sweeps)
    assert webhook.keys("/first") == webhook.keys("/second") == [warned[0].warning_id]  # same key, next channel
    assert webhook.keys("/a2") == []  # who answered is left alone
    # The pre-arrival warning was found by every sweep (the sink is not told here), delivered once.
    assert sum(s.pre_arrival for _, s in sweeps) == len(sweeps)
    assert len(webhook.keys("/trip")) == 1
    level = rows(own_database, "SELECT level, case_id FROM escalations WHERE crisis_id = %s",
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


def test_a_bad_delivery_is_dead_lettered_by_the_accountability_process_which_goes_on(stack: ProcessStack) -> None:
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
