"""A restarted worker recovers every citizen's state although its producer wrote the states in
multi-record batches — on the embedded broker, whose ``ListOffsets`` answer stops at the base offset
of a changelog partition's last batch (:mod:`pipeline.end_offsets`). A citizen whose state was lost
is a stranger to the restarted worker: leaving the crisis area, they are never told they are out.

The worker runs as a process (``crisiswatch worker``) on a broker of this module's own."""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from consumers.kafka_io import read_topic
from pipeline.app import changelog_topic
from pipeline.domain.timeline import Timeline
from pipeline.domain.tracking import GeofenceConfig
from pipeline.embedded import EmbeddedBroker, ensure_topics, free_port
from pipeline.end_offsets import end_offsets
from pipeline.settings import Settings
from pipeline.testing import VerbProcess, make_checkin, make_crisis, square
from producers.publisher import Publisher
from schemas import Warning, decode

pytestmark = pytest.mark.integration

DWELL_S = 1.0
CITIZENS = 400


@pytest.fixture(scope="module")
def stage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, VerbProcess]]:
    data_dir = tmp_path_factory.mktemp("exact-recovery")
    broker = EmbeddedBroker.start(log_path=data_dir / "broker.log")
    ensure_topics(broker.bootstrap, 4, extra=[changelog_topic()])
    port = free_port()
    settings = Settings.from_env({
        "CRISISWATCH_KAFKA_BOOTSTRAP": broker.bootstrap, "CRISISWATCH_DATA_DIR": str(data_dir),
        "CRISISWATCH_WORKER_WEB_PORT": str(port), "CRISISWATCH_DWELL_SECONDS": str(DWELL_S),
        "CRISISWATCH_BATCH_WAIT_S": "0.02"})
    worker = VerbProcess("worker", {**os.environ, **settings.env()}, data_dir / "worker.log", port)
    try:
        yield settings, worker
    finally:
        worker.stop()
        broker.stop()


async def listed_and_exact_ends(bootstrap: str, topic: str) -> tuple[dict[int, int], dict[int, int]]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        listed = await consumer.end_offsets(tps)
        exact = await end_offsets(consumer, tps)
        return {tp.partition: o for tp, o in listed.items()}, {tp.partition: o for tp, o in exact.items()}
    finally:
        await consumer.stop()


def active_crises(worker: VerbProcess) -> int:
    with urllib.request.urlopen(worker.health, timeout=5) as response:
        return int(json.loads(response.read())["active_crises"])


def test_a_restarted_worker_recovers_every_state_written_in_multi_record_batches(
        stage: tuple[Settings, VerbProcess]) -> None:
    settings, worker = stage
    prefix = f"x{uuid.uuid4().hex[:6]}-"
    t0 = datetime.now(UTC)
    crisis = make_crisis(prefix + "zone", square(30.0, 10.0, 0.5), effective=t0)
    citizens = [f"{prefix}{i:03d}" for i in range(CITIZENS)]
    inside = [make_checkin(c, 10.0, 30.0, observed_at=t0 + timedelta(seconds=1)) for c in citizens]
    leaving = [make_checkin(c, 10.0, 32.0, observed_at=t0 + timedelta(seconds=2)) for c in citizens]
    gone = [make_checkin(c, 10.0, 32.0, observed_at=t0 + timedelta(seconds=5)) for c in citizens]
    mirror = Timeline(GeofenceConfig(settings.hysteresis_m, DWELL_S))
    entered = [*mirror.crisis(crisis, t0), *mirror.checkins(inside)]
    exited = [*mirror.checkins(leaving), *mirror.checkins(gone)]
    assert {w.kind for w in entered} == {"entered"} and {w.kind for w in exited} == {"exited"}
    assert len(entered) == len(exited) == CITIZENS

    def warned(wanted: set[str], timeout_s: float) -> set[str]:
        def mine(messages: list) -> set[str]:  # type: ignore[type-arg]
            return {w.warning_id for w in (decode(m.value, Warning) for m in messages) if w.citizen_id.startswith(prefix)}

        return mine(read_topic(settings.kafka_bootstrap, "warnings", lambda seen: mine(seen) >= wanted, timeout_s))

    publisher = Publisher(settings)
    try:
        worker.start()
        publisher.publish_events([crisis])
        deadline = time.monotonic() + 30
        while active_crises(worker) < 1:
            assert time.monotonic() < deadline, "the worker never saw the crisis"
            time.sleep(0.1)
        publisher.publish_events(inside)
        assert warned({w.warning_id for w in entered}, 60) >= {w.warning_id for w in entered}
        worker.stop()  # SIGTERM: an orderly stop, everything acknowledged and committed

        listed, exact = asyncio.run(listed_and_exact_ends(settings.kafka_bootstrap, changelog_topic()))
        assert sum(exact.values()) >= CITIZENS  # every citizen's state is in the changelog
        assert any(listed[p] < exact[p] for p in exact), (listed, exact)  # written in multi-record batches

        worker.start()
        publisher.publish_events(leaving)
        publisher.publish_events(gone)
        wanted = {w.warning_id for w in entered + exited}
        got = warned(wanted, 90)
        missing = {w.citizen_id for w in exited if w.warning_id not in got}
        assert not missing, f"{len(missing)} citizens' states not recovered, e.g. {sorted(missing)[:3]}"
        time.sleep(1.0)
        assert warned(wanted, 5) == wanted  # and nothing twice or extra (the reconcile found nothing owed)
    finally:
        publisher.close()
