"""The pipeline end to end on the real broker and real PostgreSQL: a Faust worker and the
Postgres sink run as processes (``crisiswatch worker`` / ``crisiswatch sink``), exactly as in
production; this module has a broker of its own so no other test's check-ins reach its worker."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from consumers.kafka_io import read_topic
from pipeline.app import changelog_topic
from pipeline.domain.timeline import Timeline
from pipeline.domain.tracking import GeofenceConfig
from pipeline.embedded import EmbeddedBroker, ensure_topics, free_port
from pipeline.observability import read_metric
from pipeline.settings import Settings
from pipeline.testing import VerbProcess, make_checkin, make_crisis, square
from producers.publisher import Publisher
from schemas import Checkin, Crisis, Warning, decode

pytestmark = pytest.mark.integration

DWELL_S = 1.0





class Pipeline:
    def __init__(self, bootstrap: str, database_url: str, data_dir: Path) -> None:
        worker_port, sink_port = free_port(), free_port()
        self.settings = Settings.from_env({
            "CRISISWATCH_KAFKA_BOOTSTRAP": bootstrap, "CRISISWATCH_DATABASE_URL": database_url,
            "CRISISWATCH_DATA_DIR": str(data_dir), "CRISISWATCH_WORKER_WEB_PORT": str(worker_port),
            "CRISISWATCH_SINK_METRICS_PORT": str(sink_port), "CRISISWATCH_DWELL_SECONDS": str(DWELL_S),
            "CRISISWATCH_BATCH_WAIT_S": "0.02"})
        env = {**os.environ, **self.settings.env()}
        self.worker = VerbProcess("worker", env, data_dir / "worker.log", worker_port)
        self.sink = VerbProcess("sink", env, data_dir / "sink.log", sink_port)
        self.publisher = Publisher(self.settings)
        self.config = GeofenceConfig(self.settings.hysteresis_m, DWELL_S)

    def warnings(self, prefix: str, until: Callable[[list[Warning]], bool], timeout_s: float = 40) -> list[Warning]:
        def mine(messages: list) -> list[Warning]:  # type: ignore[type-arg]
            decoded = (decode(m.value, Warning) for m in messages)
            return [w for w in decoded if w.citizen_id.startswith(prefix)]

        return mine(read_topic(self.settings.kafka_bootstrap, "warnings", lambda seen: until(mine(seen)), timeout_s))

    def active_crises(self) -> int:
        with urllib.request.urlopen(self.worker.health, timeout=5) as response:
            return int(json.loads(response.read())["active_crises"])

    def publish_crisis_and_wait(self, crisis: Crisis) -> None:
        """Publish a crisis and wait until the worker holds it: check-ins published after that are
        geofenced against it (before, a citizen already inside is warned 'inside' by the sweep, not
        'entered' — right, but not what these tests pin down)."""
        before = self.active_crises()
        self.publisher.publish_events([crisis])
        deadline = time.monotonic() + 30
        while self.active_crises() <= before:
            assert time.monotonic() < deadline, "the worker never saw the crisis"
            time.sleep(0.1)

    def rows(self, prefix: str) -> list[tuple[str, str, str, int]]:
        with psycopg.connect(self.settings.database_url.get()) as conn:
            return [(r[0], r[1], r[2], int(r[3])) for r in conn.execute(
                "SELECT warning_id, citizen_id, kind, crisis_version FROM warnings WHERE citizen_id LIKE %s",
                (prefix + "%",))]

    def wait_rows(self, prefix: str, count: int, timeout_s: float = 40) -> list[tuple[str, str, str, int]]:
        deadline = time.monotonic() + timeout_s
        rows = self.rows(prefix)
        while len(rows) < count and time.monotonic() < deadline:
            time.sleep(0.3)
            rows = self.rows(prefix)
        time.sleep(1.0)  # anything extra would arrive now
        return self.rows(prefix)


@pytest.fixture(scope="module")
def pipeline(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    data_dir = tmp_path_factory.mktemp("pipeline")
    broker = EmbeddedBroker.start(log_path=data_dir / "broker.log")
    ensure_topics(broker.bootstrap, 4, extra=[changelog_topic()])
    p = Pipeline(broker.bootstrap, database_url, data_dir)
    try:
        p.sink.start()
        p.worker.start()
        yield p
    finally:
        p.publisher.close()
        p.worker.stop()
        p.sink.stop()
        broker.stop()


def metrics_url(proc: VerbProcess) -> str:
    return proc.metrics


def kinds(warnings: list[Warning]) -> Counter[tuple[str, str, int]]:
    return Counter((w.citizen_id, w.kind, w.crisis_version) for w in warnings)


def test_declare_update_cancel_reach_kafka_and_postgres(pipeline: Pipeline) -> None:
    prefix = f"p{uuid.uuid4().hex[:6]}-"
    now = datetime.now(UTC)
    crisis_id = f"{prefix}flood"
    core, edge, far = prefix + "core", prefix + "edge", prefix + "far"
    pipeline.publisher.publish_events([
        make_checkin(core, -6.2, 106.8, observed_at=now),
        make_checkin(edge, -6.2, 107.0, observed_at=now),  # outside v1, inside v2
        make_checkin(far, -8.0, 110.0, observed_at=now)])
    time.sleep(2)  # the worker has them before the crisis: the crisis sweep must find them

    pipeline.publisher.publish_events([make_crisis(crisis_id, square(106.8, -6.2, 0.1), version=1, effective=now)])
    got = pipeline.warnings(prefix, lambda ws: len(ws) >= 1)
    assert kinds(got) == Counter({(core, "inside", 1): 1})

    pipeline.publisher.publish_events([make_crisis(crisis_id, square(106.8, -6.2, 0.3), version=2, effective=now)])
    got = pipeline.warnings(prefix, lambda ws: len(ws) >= 2)
    assert kinds(got) == Counter({(core, "inside", 1): 1, (edge, "inside", 2): 1})

    pipeline.publisher.publish_events([make_crisis(crisis_id, None, op="cancel", version=3, effective=now)])
    got = pipeline.warnings(prefix, lambda ws: len(ws) >= 4)
    time.sleep(1.5)
    got = pipeline.warnings(prefix, lambda ws: len(ws) >= 4)
    # the all-clear names the version that ended (2), for everyone warned under any version
    assert kinds(got) == Counter({(core, "inside", 1): 1, (edge, "inside", 2): 1,
                                  (core, "all_clear", 2): 1, (edge, "all_clear", 2): 1})
    rows = pipeline.wait_rows(prefix, 4)
    assert sorted((r[1], r[2]) for r in rows) == sorted([(core, "inside"), (edge, "inside"),
                                                         (core, "all_clear"), (edge, "all_clear")])
    assert {r[0] for r in rows} == {w.warning_id for w in got}


def test_invalid_checkin_goes_to_dlq_and_the_worker_carries_on(pipeline: Pipeline) -> None:
    prefix = f"d{uuid.uuid4().hex[:6]}-"
    now = datetime.now(UTC)
    from producers.publisher import Outgoing

    pipeline.publisher.publish([Outgoing("checkins", prefix.encode(), b'{"schema":"checkin/1","lat":500}')])
    pipeline.publish_crisis_and_wait(make_crisis(prefix + "c", square(20.0, 20.0, 0.5), effective=now))
    pipeline.publisher.publish_events([make_checkin(prefix + "a", 20.0, 20.0, observed_at=now)])
    got = pipeline.warnings(prefix, lambda ws: len(ws) >= 1)
    assert kinds(got) == Counter({(prefix + "a", "entered", 1): 1})
    def ours(messages: list) -> list:  # type: ignore[type-arg]
        return [m for m in messages if m.key == prefix.encode()]

    def skipped_by_sink() -> float:
        return read_metric(metrics_url(pipeline.sink), "crisiswatch_sink_skipped_total", 'topic="checkins"')

    read_topic(pipeline.settings.kafka_bootstrap, "dlq", lambda seen: bool(ours(seen)), 20)
    deadline = time.monotonic() + 20
    while skipped_by_sink() < 1:  # the sink has read it too: it counts it and adds no second dead letter
        assert time.monotonic() < deadline, "the sink never read the bad check-in"
        time.sleep(0.2)
    dead = ours(read_topic(pipeline.settings.kafka_bootstrap, "dlq", lambda seen: False, 2.0))
    assert len(dead) == 1
    assert dict(dead[0].headers)["crisiswatch-dlq-stage"] == b"locate"
    headers = dict(dead[0].headers)
    assert headers["crisiswatch-dlq-topic"] == b"checkins"
    assert headers["crisiswatch-dlq-reason"].decode().startswith("InvalidEvent: ")
    assert headers["crisiswatch-dlq-error-type"] == b"schemas.codec.InvalidEvent"
    assert "citizen_id" in headers["crisiswatch-dlq-reason"].decode()


def test_worker_restart_mid_stream_loses_and_duplicates_nothing(pipeline: Pipeline) -> None:
    """SIGKILL right after a batch, check-ins published while no worker runs, then a restart. Three
    ways this used to lose warnings: offsets committed before the citizens' new states reached the
    changelog (Faust's flush gives up after 0.1 s); a partition with no committed offset left
    wherever the fetch during table recovery got to; check-ins fetched between Faust's seek back to
    the committed offsets and its queue clear dropped (see ``pipeline.app._rewind_uncommitted``)."""
    prefix = f"r{uuid.uuid4().hex[:6]}-"
    t0 = datetime.now(UTC)
    area = square(30.0, 10.0, 0.5)
    crisis = make_crisis(prefix + "zone", area, effective=t0)
    citizens = [f"{prefix}{i:03d}" for i in range(200)]
    rounds: list[list[Checkin]] = [
        [make_checkin(c, 10.0, 31.0, observed_at=t0 + timedelta(seconds=1)) for c in citizens],   # outside
        [make_checkin(c, 10.0, 30.0, observed_at=t0 + timedelta(seconds=2)) for c in citizens],   # entered
        [make_checkin(c, 10.0, 32.0, observed_at=t0 + timedelta(seconds=3)) for c in citizens],   # leaving
        [make_checkin(c, 10.0, 32.0, observed_at=t0 + timedelta(seconds=6)) for c in citizens],   # exited
    ]
    mirror = Timeline(pipeline.config)
    expected = list(mirror.crisis(crisis, t0))
    for batch in rounds:
        expected += mirror.checkins(batch)
    assert Counter(w.kind for w in expected) == Counter({"entered": 200, "exited": 200})

    pipeline.publish_crisis_and_wait(crisis)
    pipeline.publisher.publish_events(rounds[0])
    pipeline.publisher.publish_events(rounds[1])
    time.sleep(0.3)
    pipeline.worker.stop(signal.SIGKILL)  # mid-stream, no goodbye
    pipeline.publisher.publish_events(rounds[2])
    pipeline.worker.start()
    pipeline.publisher.publish_events(rounds[3])

    wanted = {w.warning_id for w in expected}
    in_kafka = pipeline.warnings(prefix, lambda ws: {w.warning_id for w in ws} >= wanted, timeout_s=90)
    not_in_kafka = Counter(w.kind for w in expected if w.warning_id not in {k.warning_id for k in in_kafka})
    log = [line for line in pipeline.worker.log.read_text(errors="replace").splitlines()
           if "crisis table loaded" in line or "Worker ready" in line or "ERROR" in line]
    assert {w.warning_id for w in in_kafka} == wanted, (not_in_kafka, log[-4:])  # none lost
    rows = pipeline.wait_rows(prefix, len(expected), timeout_s=60)
    assert sorted(r[0] for r in rows) == sorted(wanted)  # none lost, none duplicated in PostgreSQL
    assert Counter(r[2] for r in rows) == Counter({"entered": 200, "exited": 200})



def health(proc: VerbProcess) -> dict:  # type: ignore[type-arg]
    with urllib.request.urlopen(proc.health, timeout=5) as response:
        return dict(json.loads(response.read()))


def test_two_workers_share_the_citizens_and_a_leaving_worker_hands_them_over(
        pipeline: Pipeline, tmp_path: Path) -> None:
    """Scale-out: a second worker joins the group; each sweeps and geofences only the citizens whose
    partitions it owns, so each warning is sent once. Then it leaves, and the first worker takes its
    partitions over with the citizens' recovered states: their exits are warned, once."""
    port = free_port()
    second = VerbProcess("worker", {**pipeline.worker.env, "CRISISWATCH_WORKER_WEB_PORT": str(port),
                             "CRISISWATCH_DATA_DIR": str(tmp_path)},
                  tmp_path / "worker-2.log", port)
    second.start()
    try:
        deadline = time.monotonic() + 60
        while not (health(second).get("checkin_partitions") and health(pipeline.worker).get("checkin_partitions")
                   and health(second)["status"] == health(pipeline.worker)["status"] == "ok"):
            assert time.monotonic() < deadline, (health(pipeline.worker), health(second))
            time.sleep(0.3)
        owned = [set(health(p)["checkin_partitions"]) for p in (pipeline.worker, second)]
        assert owned[0].isdisjoint(owned[1]) and owned[0] | owned[1] == set(range(pipeline.settings.partitions))

        prefix = f"s{uuid.uuid4().hex[:6]}-"
        t0 = datetime.now(UTC)
        crisis = make_crisis(prefix + "zone", square(50.0, 20.0, 0.5), effective=t0)
        early = [f"{prefix}in{i:02d}" for i in range(40)]    # inside before the crisis: the sweep warns them
        late = [f"{prefix}on{i:02d}" for i in range(40)]     # walk in afterwards: 'entered'
        rounds = [
            [make_checkin(c, 20.0, 50.0, observed_at=t0) for c in early],
            [make_checkin(c, 20.0, 50.0, observed_at=t0 + timedelta(seconds=1)) for c in late],
            [make_checkin(c, 20.0, 52.0, observed_at=t0 + timedelta(seconds=2)) for c in early + late],  # leaving
            [make_checkin(c, 20.0, 52.0, observed_at=t0 + timedelta(seconds=5)) for c in early + late],  # exited
        ]
        mirror = Timeline(pipeline.config)
        expected = list(mirror.checkins(rounds[0])) + list(mirror.crisis(crisis, t0 + timedelta(milliseconds=1)))
        for batch in rounds[1:]:
            expected += mirror.checkins(batch)
        assert Counter(w.kind for w in expected) == Counter({"inside": 40, "entered": 40, "exited": 80})

        pipeline.publisher.publish_events(rounds[0])
        time.sleep(1.0)  # both workers hold their citizens before the crisis arrives
        pipeline.publish_crisis_and_wait(crisis)
        pipeline.publisher.publish_events(rounds[1])
        pipeline.publisher.publish_events(rounds[2])
        first_half = pipeline.warnings(prefix, lambda ws: len(ws) >= 80, timeout_s=40)
        assert Counter(w.kind for w in first_half) == Counter({"inside": 40, "entered": 40})  # each once
        assert read_metric(metrics_url(second), "crisiswatch_warnings_emitted_total", "") > 0  # the second worker did its share

        second.stop()  # leaves the group: the first worker takes over its partitions and their states
        deadline = time.monotonic() + 60
        while set(health(pipeline.worker)["checkin_partitions"]) != set(range(pipeline.settings.partitions)):
            assert time.monotonic() < deadline, health(pipeline.worker)
            time.sleep(0.3)
        pipeline.publisher.publish_events(rounds[3])
        wanted = {w.warning_id for w in expected}
        got = pipeline.warnings(prefix, lambda ws: {w.warning_id for w in ws} >= wanted, timeout_s=60)
        time.sleep(1.0)
        got = pipeline.warnings(prefix, lambda ws: False, timeout_s=2)
        assert sorted(w.warning_id for w in got) == sorted(wanted)  # every one, none twice
    finally:
        second.stop()

