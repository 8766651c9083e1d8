"""A starting worker loads its crisis table while its consumer group is still being joined.

Loading a thousand active crises costs seconds of admission; joining the group costs seconds of
waiting (the embedded broker holds a first member's join for three). The crisis reader needs no
group, so it starts with the app (:class:`pipeline.app.StartsWithTheApp`) rather than as a Faust
task, which would wait for the join and the table recovery: the worker is then ready as soon as the
join ends. Here a real worker (``crisiswatch worker``) on a broker of its own says, in its log, that
its crisis table was loaded before it joined the group; and it then geofences a check-in at once.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.worker import preload
from pipeline import topics
from pipeline.app import StartsWithTheApp, internal_topics
from pipeline.embedded import EmbeddedBroker, ensure_topics, free_port
from pipeline.settings import Settings
from pipeline.testing import VerbProcess, make_checkin, make_crisis, records_for, square
from schemas import Warning, decode, encode

pytestmark = pytest.mark.integration

CRISES = [make_crisis(f"start-{i}", square(100.0 + i, 10.0, 0.2)) for i in range(20)]


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[VerbProcess, Settings]]:
    data_dir: Path = tmp_path_factory.mktemp("worker-start")
    broker = EmbeddedBroker.start(log_path=data_dir / "broker.log")
    port = free_port()
    settings = Settings.from_env({"CRISISWATCH_KAFKA_BOOTSTRAP": broker.bootstrap, "CRISISWATCH_DATA_DIR": str(data_dir),
                                  "CRISISWATCH_WORKER_WEB_PORT": str(port), "CRISISWATCH_BATCH_WAIT_S": "0.02",
                                  "CRISISWATCH_LOG_LEVEL": "INFO"})
    worker = VerbProcess("worker", {**os.environ, **settings.env()}, data_dir / "worker.log", port)
    try:
        ensure_topics(broker.bootstrap, 4, extra=internal_topics())
        asyncio.run(preload(broker.bootstrap, topics.CHECKINS, [], [encode(c) for c in CRISES]))
        worker.start()
        yield worker, settings
    finally:
        worker.stop()
        broker.stop()


def test_the_crisis_table_is_loaded_before_the_group_is_joined(started: tuple[VerbProcess, Settings]) -> None:
    worker, _ = started
    log = worker.tail(200_000)
    loaded = log.find(f"crisis table loaded: {len(CRISES)} active crises")
    joined = log.find("Joined group")
    assert loaded >= 0 and joined >= 0, log[-3000:]
    assert loaded < joined, log[-3000:]


def test_the_started_worker_geofences_against_the_loaded_crises(started: tuple[VerbProcess, Settings]) -> None:
    _, settings = started
    asyncio.run(preload(settings.kafka_bootstrap, topics.CHECKINS, [(b"start-a", encode(make_checkin("start-a", 10.0, 105.0)), None)]))
    records = records_for(settings.kafka_bootstrap, topics.WARNINGS, {"start-a"}, expected=1)
    warnings = [decode(r.value, Warning) for r in records]
    assert [(w.citizen_id, w.crisis_id, w.kind) for w in warnings] == [("start-a", "start-5", "entered")]


async def test_the_work_runs_from_its_parents_start_until_its_stop() -> None:
    import faust

    running, cancelled = asyncio.Event(), asyncio.Event()

    async def work() -> None:
        running.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    parent = faust.Service()
    parent.add_dependency(StartsWithTheApp(work))
    await parent.start()
    await asyncio.wait_for(running.wait(), timeout=30)
    await parent.stop()
    assert cancelled.is_set()
