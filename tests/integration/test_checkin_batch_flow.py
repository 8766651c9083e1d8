"""``checkin-batch/1`` end to end on the real broker and PostgreSQL: the API's publisher writes a request's check-ins
as one record per partition; ``crisiswatch worker`` warns every citizen of it once, as if each check-in had come
alone; ``crisiswatch sink`` stores every check-in; a check-in in a batch on the wrong partition is dead-lettered."""

from __future__ import annotations

import json
import os
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest

from consumers.kafka_io import read_topic
from pipeline.app import changelog_topic
from pipeline.embedded import EmbeddedBroker, ensure_topics, free_port
from pipeline.settings import Settings
from pipeline.testing import VerbProcess, make_checkin, make_crisis, square
from producers.publisher import Outgoing, Publisher, partition_of
from schemas import Warning, decode, encode
from schemas.fast import encode_checkin_batch

pytestmark = pytest.mark.integration

PARTITIONS = 4


class Stack:
    def __init__(self, bootstrap: str, database_url: str, data_dir: Path) -> None:
        worker_port, sink_port = free_port(), free_port()
        self.settings = Settings.from_env({
            "CRISISWATCH_KAFKA_BOOTSTRAP": bootstrap, "CRISISWATCH_DATABASE_URL": database_url,
            "CRISISWATCH_DATA_DIR": str(data_dir), "CRISISWATCH_WORKER_WEB_PORT": str(worker_port),
            "CRISISWATCH_SINK_METRICS_PORT": str(sink_port), "CRISISWATCH_BATCH_WAIT_S": "0.02",
            "CRISISWATCH_PARTITIONS": str(PARTITIONS)})
        env = {**os.environ, **self.settings.env()}
        self.worker = VerbProcess("worker", env, data_dir / "worker.log", worker_port)
        self.sink = VerbProcess("sink", env, data_dir / "sink.log", sink_port)
        self.publisher = Publisher(self.settings)

    def active_crises(self) -> int:
        with urllib.request.urlopen(self.worker.health, timeout=5) as response:
            return int(json.loads(response.read())["active_crises"])


@pytest.fixture(scope="module")
def stack(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("batch-flow")
    broker = EmbeddedBroker.start(log_path=data_dir / "broker.log")
    ensure_topics(broker.bootstrap, PARTITIONS, extra=[changelog_topic()])
    s = Stack(broker.bootstrap, database_url, data_dir)
    try:
        s.sink.start()
        s.worker.start()
        yield s
    finally:
        s.publisher.close()
        s.worker.stop()
        s.sink.stop()
        broker.stop()


def stored(stack: Stack, prefix: str) -> list[str]:
    with psycopg.connect(stack.settings.database_url.get()) as conn:
        return [r[0] for r in conn.execute("SELECT citizen_id FROM checkins WHERE citizen_id LIKE %s", (prefix + "%",))]


def test_every_checkin_of_a_batch_is_geofenced_once_and_stored(stack: Stack) -> None:
    prefix = f"cb{uuid.uuid4().hex[:6]}-"
    now = datetime.now(UTC)
    before = stack.active_crises()
    stack.publisher.publish_events([make_crisis(prefix + "flood", square(30.0, 10.0, 0.5), effective=now)])
    deadline = time.monotonic() + 30
    while stack.active_crises() <= before:
        assert time.monotonic() < deadline, "the worker never saw the crisis"
        time.sleep(0.1)

    inside = [make_checkin(f"{prefix}in-{i}", 10.0, 30.0 + i * 1e-3, observed_at=now) for i in range(30)]
    outside = [make_checkin(f"{prefix}out-{i}", -40.0, -60.0, observed_at=now) for i in range(30)]
    written = stack.publisher.publish_checkins([*inside, *outside])
    assert written <= PARTITIONS  # sixty check-ins, at most one record per partition

    stray = make_checkin(prefix + "stray", 10.0, 30.0, observed_at=now)  # inside, but in another partition's batch
    wrong = (partition_of(stray.citizen_id.encode(), PARTITIONS) + 1) % PARTITIONS
    stack.publisher.publish([Outgoing("checkins", None, encode_checkin_batch([encode(stray)]), partition=wrong)])

    def mine(messages: list) -> list[Warning]:  # type: ignore[type-arg]
        return [w for w in (decode(m.value, Warning) for m in messages) if w.citizen_id.startswith(prefix)]

    got = mine(read_topic(stack.settings.kafka_bootstrap, "warnings", lambda seen: len(mine(seen)) >= 30, 60))
    time.sleep(1.5)  # anything extra would arrive now
    got = mine(read_topic(stack.settings.kafka_bootstrap, "warnings", lambda seen: False, 3.0))
    assert Counter((w.citizen_id, w.kind) for w in got) == Counter({(c.citizen_id, "entered"): 1 for c in inside})

    def strays(messages: list) -> list:  # type: ignore[type-arg]
        return [m for m in messages if m.key == stray.citizen_id.encode()]

    [letter] = strays(read_topic(stack.settings.kafka_bootstrap, "dlq", lambda seen: bool(strays(seen)), 30))
    headers = dict(letter.headers)
    assert headers["crisiswatch-dlq-stage"] == b"locate" and b"keys to partition" in headers["crisiswatch-dlq-reason"]

    deadline = time.monotonic() + 40
    while len(stored(stack, prefix)) < 61 and time.monotonic() < deadline:
        time.sleep(0.3)
    # the sink stores what the check-ins say, the stray one too (the worker's partition rule is about its state)
    assert sorted(stored(stack, prefix)) == sorted(c.citizen_id for c in [*inside, *outside, stray])
