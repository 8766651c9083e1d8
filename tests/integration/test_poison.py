"""Poison written straight into Kafka, on the real broker and real PostgreSQL, with the worker and the
sink (and its router) running as processes, exactly as in production. Each of these used to make a
stage exit 75 on every restart (a crash loop): JSON nested 5,000 deep, a message over 1 MB (its copy
to ``dlq`` was too large), a crisis whose title holds a lone surrogate or whose polygon cannot be
indexed, once a citizen is inside. Now each lands in ``dlq`` exactly once, with a reason and its
exception type, no process restarts, and good traffic sent afterwards is still warned and stored.

This module has a broker of its own, so the ``dlq`` it reads holds only its own dead letters."""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from consumers.kafka_io import Message, read_topic
from pipeline import topics
from pipeline.app import changelog_topic
from pipeline.dlq import DEFAULT_MAX_PAYLOAD_BYTES
from pipeline.embedded import EmbeddedBroker, ensure_topics, free_port
from pipeline.observability import read_metric
from pipeline.settings import Settings
from pipeline.testing import VerbProcess, make_checkin, make_crisis, square
from producers.publisher import Publisher
from schemas import Warning, decode, encode

pytestmark = pytest.mark.integration

DEEP = 5000
OVER_1_MB = 1_100_000





def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


class Stack:
    def __init__(self, bootstrap: str, database_url: str, data_dir: Path) -> None:
        worker_port, sink_port = free_port(), free_port()
        self.settings = Settings.from_env({
            "CRISISWATCH_KAFKA_BOOTSTRAP": bootstrap, "CRISISWATCH_DATABASE_URL": database_url,
            "CRISISWATCH_DATA_DIR": str(data_dir), "CRISISWATCH_WORKER_WEB_PORT": str(worker_port),
            "CRISISWATCH_SINK_METRICS_PORT": str(sink_port), "CRISISWATCH_BATCH_WAIT_S": "0.02"})
        env = {**os.environ, **self.settings.env()}
        self.worker = VerbProcess("worker", env, data_dir / "worker.log", worker_port)
        self.sink = VerbProcess("sink", env, data_dir / "sink.log", sink_port)
        self.publisher = Publisher(self.settings)
        from kafka import KafkaProducer

        # Written straight into Kafka, as anyone with access to the topics could: no API, no size limit of ours.
        self.raw = KafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=4_000_000)

    def write(self, topic: str, key: bytes, value: bytes) -> None:
        self.raw.send(topic, key=key, value=value).get(timeout=30)

    def dead_letters(self, keys: set[bytes], settle_s: float = 3.0) -> dict[bytes, list[Message]]:
        """Every dead letter of ``keys``, read once all are there and a while later again (a second
        copy of any would show then)."""
        def mine(seen: list[Message]) -> list[Message]:
            return [m for m in seen if m.key in keys]

        read_topic(self.settings.kafka_bootstrap, topics.DLQ, lambda seen: {m.key for m in mine(seen)} >= keys, 90)
        time.sleep(settle_s)
        found: dict[bytes, list[Message]] = {k: [] for k in keys}
        for m in mine(read_topic(self.settings.kafka_bootstrap, topics.DLQ, lambda seen: False, 5)):
            found[m.key].append(m)  # type: ignore[index]
        return found

    def warnings(self, prefix: str, count: int) -> list[Warning]:
        def mine(seen: list[Message]) -> list[Warning]:
            ours = [m for m in seen if m.key is not None and m.key.startswith(prefix.encode())]  # not the poison
            return [w for w in (decode(m.value, Warning) for m in ours) if w.citizen_id.startswith(prefix)]

        return mine(read_topic(self.settings.kafka_bootstrap, topics.WARNINGS, lambda seen: len(mine(seen)) >= count, 60))

    def rows(self, query: str, *params: Any) -> int:
        with psycopg.connect(self.settings.database_url.get()) as conn:
            row = conn.execute(query.encode(), params).fetchone()
            return int(row[0]) if row else 0

    def still_running(self) -> None:
        for proc in (self.worker, self.sink):
            assert proc.healthy(), f"{proc.verb} unhealthy"
            assert "could not finish" not in proc.log.read_text(errors="replace"), proc.verb


@pytest.fixture(scope="module")
def stack(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("poison")
    broker = EmbeddedBroker.start(log_path=data_dir / "broker.log")
    ensure_topics(broker.bootstrap, 4, extra=[changelog_topic()])
    s = Stack(broker.bootstrap, database_url, data_dir)
    try:
        s.sink.start()
        s.worker.start()
        yield s
    finally:
        s.raw.close()
        s.publisher.close()
        s.worker.stop()
        s.sink.stop()
        broker.stop()


def nested(schema: str, depth: int = DEEP) -> bytes:
    return b'{"schema":"' + schema.encode() + b'","x":' + b"[" * depth + b"]" * depth + b"}"


def oversized(schema: str, size: int = OVER_1_MB) -> bytes:
    head = b'{"schema":"' + schema.encode() + b'","pad":"'
    return head + b"x" * (size - len(head) - 2) + b'"}'


def header(message: Message, name: str) -> bytes:
    return dict(message.headers)[name]


def test_deep_and_oversized_messages_on_every_topic_are_dead_lettered_once_and_traffic_flows_on(stack: Stack) -> None:
    prefix = f"p{uuid.uuid4().hex[:6]}-"
    owner = {topics.CHECKINS: "locate", topics.CRISIS_EVENTS: "crisis", topics.ACKS: "sink", topics.WARNINGS: "router"}
    schema = {topics.CHECKINS: "checkin/1", topics.CRISIS_EVENTS: "crisis/1", topics.ACKS: "ack/1",
              topics.WARNINGS: "warning/1"}
    sent: dict[bytes, tuple[str, bytes]] = {}
    for topic in owner:
        for kind, value in (("deep", nested(schema[topic])), ("big", oversized(schema[topic]))):
            key = f"poison-{prefix}{kind}-{topic}".encode()  # not a citizen: the warnings read below skip it
            stack.write(topic, key, value)
            sent[key] = (topic, value)

    letters = stack.dead_letters(set(sent))
    for key, (topic, value) in sent.items():
        assert len(letters[key]) == 1, (key, [header(m, topics.DLQ_STAGE_HEADER) for m in letters[key]])
        [letter] = letters[key]
        assert header(letter, topics.DLQ_SOURCE_TOPIC_HEADER) == topic.encode()
        assert header(letter, topics.DLQ_STAGE_HEADER) == owner[topic].encode()
        assert header(letter, topics.DLQ_REASON_HEADER) and header(letter, topics.DLQ_ERROR_TYPE_HEADER)
        assert header(letter, topics.DLQ_ORIGINAL_SIZE_HEADER) == str(len(value)).encode()
        assert header(letter, topics.DLQ_ORIGINAL_SHA256_HEADER) == hashlib.sha256(value).hexdigest().encode()
        assert int(header(letter, topics.DLQ_SOURCE_OFFSET_HEADER)) >= 0
        if len(value) > DEFAULT_MAX_PAYLOAD_BYTES:
            assert header(letter, topics.DLQ_TRUNCATED_HEADER) == b"value"
            assert letter.value == value[:DEFAULT_MAX_PAYLOAD_BYTES]
        else:
            assert letter.value == value
    stack.still_running()

    # Good traffic afterwards: a crisis, a citizen walking into it, warned and stored.
    now = datetime.now(UTC)
    crisis = make_crisis(prefix + "flood", square(40.0, 5.0, 0.5), effective=now)
    before = read_metric(stack.worker.metrics, "crisiswatch_active_crises")
    stack.publisher.publish_events([crisis])
    wait_until(lambda: read_metric(stack.worker.metrics, "crisiswatch_active_crises") > before, 30, "the good crisis")
    stack.publisher.publish_events([make_checkin(prefix + "a", 5.0, 40.0, observed_at=now)])
    [warning] = stack.warnings(prefix, 1)
    assert (warning.citizen_id, warning.kind) == (prefix + "a", "entered")
    wait_until(lambda: stack.rows("SELECT count(*) FROM warnings WHERE warning_id = %s", warning.warning_id) == 1, 40,
               "the warning in PostgreSQL")
    stack.still_running()


def test_crises_that_break_geofencing_once_a_citizen_is_inside_are_dead_lettered_once(stack: Stack) -> None:
    prefix = f"c{uuid.uuid4().hex[:6]}-"
    now = datetime.now(UTC)
    area = square(60.0, -10.0, 0.5)
    processed = read_metric(stack.worker.metrics, "crisiswatch_checkins_processed_total")
    stack.publisher.publish_events([make_checkin(prefix + "in", -10.0, 60.0, observed_at=now)])
    wait_until(lambda: read_metric(stack.worker.metrics, "crisiswatch_checkins_processed_total") > processed, 30,
               "the citizen inside")

    lone = json.dumps(make_crisis(prefix + "lone", area, effective=now, title="@TITLE@").to_dict())
    surrogate = lone.replace("@TITLE@", "\\ud800").encode()  # JSON's escape of a lone surrogate: valid JSON text
    point = {"type": "Polygon", "coordinates": [[[60.0, -10.0]] * 4]}  # a ring of four identical points
    poison = {f"{prefix}lone".encode(): surrogate,
              f"{prefix}point".encode(): encode(make_crisis(prefix + "point", point, effective=now))}
    for key, value in poison.items():
        stack.write(topics.CRISIS_EVENTS, key, value)

    letters = stack.dead_letters(set(poison))
    for key in poison:
        assert [header(m, topics.DLQ_STAGE_HEADER) for m in letters[key]] == [b"crisis"], key
        assert header(letters[key][0], topics.DLQ_REASON_HEADER) and header(letters[key][0], topics.DLQ_ERROR_TYPE_HEADER)
    stack.still_running()
    # The sink admits crises the way the worker does: the system of record holds neither.
    assert stack.rows("SELECT count(*) FROM crises WHERE crisis_id IN (%s, %s)", prefix + "lone", prefix + "point") == 0

    good = make_crisis(prefix + "flood", area, effective=now)
    stack.publisher.publish_events([good])
    [warning] = stack.warnings(prefix, 1)
    assert (warning.citizen_id, warning.crisis_id, warning.kind) == (prefix + "in", good.crisis_id, "inside")
    wait_until(lambda: stack.rows("SELECT count(*) FROM crises WHERE crisis_id = %s", good.crisis_id) == 1, 40,
               "the good crisis in PostgreSQL")
    stack.still_running()


def test_with_two_workers_a_refused_crisis_is_dead_lettered_once_and_both_go_on(stack: Stack, tmp_path: Path) -> None:
    """Every worker's crisis reader sees every crisis event; only the crisis agent (one member of the
    group per event) dead-letters, and the readers reach its verdict by the same admission."""
    port = free_port()
    second = VerbProcess("worker", {**stack.worker.env, "CRISISWATCH_WORKER_WEB_PORT": str(port),
                             "CRISISWATCH_DATA_DIR": str(tmp_path)}, tmp_path / "worker-2.log", port)
    second.start()
    try:
        def partitions(proc: VerbProcess) -> set[int]:
            with urllib.request.urlopen(proc.health, timeout=5) as response:
                return set(json.loads(response.read())["checkin_partitions"])

        wait_until(lambda: bool(partitions(second)) and bool(partitions(stack.worker)) and stack.worker.healthy()
                   and second.healthy(), 90, "both workers sharing the partitions")
        prefix = f"w{uuid.uuid4().hex[:6]}-"
        now = datetime.now(UTC)
        area = square(80.0, 15.0, 0.5)
        citizens = [f"{prefix}{i:02d}" for i in range(16)]  # spread over both workers' partitions
        processed = sum(read_metric(p.metrics, "crisiswatch_checkins_processed_total") for p in (stack.worker, second))
        stack.publisher.publish_events([make_checkin(c, 15.0, 80.0, observed_at=now) for c in citizens])
        wait_until(lambda: sum(read_metric(p.metrics, "crisiswatch_checkins_processed_total")
                               for p in (stack.worker, second)) >= processed + len(citizens), 40, "the citizens inside")

        def skipped() -> list[float]:
            return [read_metric(p.metrics, "crisiswatch_stage_skipped_total", 'stage="crisis-reader"')
                    for p in (stack.worker, second)]

        before = skipped()  # both have read the log's backlog (healthy), earlier poison included
        key = f"poison-{prefix}lone".encode()
        lone = json.dumps(make_crisis(prefix + "lone", area, effective=now, title="@TITLE@").to_dict())
        stack.write(topics.CRISIS_EVENTS, key, lone.replace("@TITLE@", "\\ud800").encode())
        letters = stack.dead_letters({key}, settle_s=5.0)
        assert [header(m, topics.DLQ_STAGE_HEADER) for m in letters[key]] == [b"crisis"]
        wait_until(lambda: all(after > was for after, was in zip(skipped(), before, strict=True)), 30,
                   "both readers skipping it")  # each saw it; neither dead-lettered it

        stack.publisher.publish_events([make_crisis(prefix + "flood", area, effective=now)])
        got = stack.warnings(prefix, len(citizens))
        assert sorted((w.citizen_id, w.kind) for w in got) == [(c, "inside") for c in citizens]  # each once
        assert second.healthy()
        stack.still_running()
    finally:
        second.stop()
