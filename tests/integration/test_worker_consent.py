"""The worker (``crisiswatch worker``, a real process on a broker of its own) does not track a citizen
registered without location_tracking consent, and forgets an erased citizen: their state is deleted,
with a null record on the state's changelog."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from consumers.kafka_io import read_topic
from pipeline import topics
from pipeline.app import changelog_topic, internal_topics
from pipeline.consent import UNTRACKED_TABLE
from pipeline.embedded import EmbeddedBroker, ensure_topics, free_port
from pipeline.observability import read_metric
from pipeline.settings import Settings
from pipeline.testing import VerbProcess, make_checkin, make_crisis, records_for, square
from producers.erase import tombstones
from producers.publisher import Publisher, outgoing
from schemas import Channel, Citizen, Warning, decode

pytestmark = pytest.mark.integration


class Worker:
    def __init__(self, bootstrap: str, data_dir: Path) -> None:
        port = free_port()
        self.settings = Settings.from_env({
            "CRISISWATCH_KAFKA_BOOTSTRAP": bootstrap, "CRISISWATCH_DATA_DIR": str(data_dir),
            "CRISISWATCH_WORKER_WEB_PORT": str(port), "CRISISWATCH_BATCH_WAIT_S": "0.02"})
        self.process = VerbProcess("worker", {**os.environ, **self.settings.env()}, data_dir / "worker.log", port)
        self.publisher = Publisher(self.settings)

    def warnings(self, prefix: str, expected: int, timeout_s: float = 40) -> list[Warning]:
        def mine(messages: list) -> list[Warning]:  # type: ignore[type-arg]
            return [w for w in (decode(m.value, Warning) for m in messages) if w.citizen_id.startswith(prefix)]

        return mine(read_topic(self.settings.kafka_bootstrap, topics.WARNINGS, lambda seen: len(mine(seen)) >= expected,
                               timeout_s))


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    data_dir = tmp_path_factory.mktemp("consent")
    broker = EmbeddedBroker.start(log_path=data_dir / "broker.log")
    ensure_topics(broker.bootstrap, 4, extra=internal_topics())
    w = Worker(broker.bootstrap, data_dir)
    try:
        w.process.start()
        yield w
    finally:
        w.publisher.close()
        w.process.stop()
        broker.stop()


def citizen(citizen_id: str, tracking: bool) -> Citizen:
    return Citizen(citizen_id, "Sari Wulandari", "ID", "id", (Channel("sms", "+6281200000001"),), (), tracking)


def wait_for(condition: object, what: str, timeout_s: float = 40.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_an_untracked_citizen_is_not_geofenced_and_an_erased_one_is_forgotten(worker: Worker) -> None:
    prefix = f"u{uuid.uuid4().hex[:6]}-"
    untracked, tracked = prefix + "untracked", prefix + "tracked"
    bootstrap = worker.settings.kafka_bootstrap
    untracked_changelog = f"crisiswatch-{UNTRACKED_TABLE}-changelog"
    worker.publisher.publish([outgoing(citizen(untracked, False), topics.CITIZENS),
                              outgoing(citizen(tracked, True), topics.CITIZENS)])
    wait_for(lambda: bool(records_for(bootstrap, untracked_changelog, {untracked}, 1)), "the worker to note the consent")

    now = datetime.now(UTC)
    worker.publisher.publish_events([make_crisis(prefix + "c", square(20.0, 20.0, 0.5), effective=now)])
    wait_for(lambda: read_metric(worker.process.metrics, "crisiswatch_active_crises") >= 1, "the crisis")
    worker.publisher.publish_events([make_checkin(untracked, 20.0, 20.0, observed_at=now),
                                     make_checkin(tracked, 20.0, 20.0, observed_at=now)])
    warned = worker.warnings(prefix, 1)
    assert [(w.citizen_id, w.kind) for w in warned] == [(tracked, "entered")]
    wait_for(lambda: read_metric(worker.process.metrics, "crisiswatch_stage_skipped_total",
                                 'reason="no_consent"') >= 1, "the untracked check-in counted")
    assert records_for(bootstrap, changelog_topic(), {untracked}, None) == []  # no state kept for them

    # Erasure: the tombstone on checkins deletes the state and writes a null record on the changelog.
    assert [r.value for r in records_for(bootstrap, changelog_topic(), {tracked}, 1)][-1] is not None
    worker.publisher.publish(tombstones(tracked, (topics.CITIZENS, topics.CHECKINS)))
    wait_for(lambda: records_for(bootstrap, changelog_topic(), {tracked}, None)[-1].value is None, "the null record")
    wait_for(lambda: read_metric(worker.process.metrics, "crisiswatch_stage_skipped_total", 'reason="erased"') >= 1,
             "the erasure counted")
    dead = [m for m in read_topic(bootstrap, topics.DLQ, lambda seen: False, 2.0) if (m.key or b"").startswith(prefix.encode())]
    assert dead == []  # tombstones and untracked check-ins are not bad data


def test_the_worker_listens_on_the_configured_host_only(worker: Worker) -> None:
    import psutil

    assert worker.process.process is not None
    process = psutil.Process(worker.process.process.pid)
    listening = {(c.laddr.ip, c.laddr.port) for p in (process, *process.children(recursive=True))
                 for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    assert (worker.settings.api_host, worker.settings.worker_web_port) in listening
    assert {ip for ip, _ in listening} == {"127.0.0.1"}, listening
