"""``/health`` tells the truth on real servers: the sink, the ingest API and a worker turn 503,
naming what is down, when their broker or database goes away, and 200 again when it is back; the
API answers 503 in bounded time meanwhile. Each test has a broker (or database) of its own to kill."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from consumers.sink_cmd import run_sink
from pipeline.app import changelog_topic
from pipeline.embedded import EmbeddedBroker, EmbeddedPostgres, apply_migrations, ensure_topics, free_port
from pipeline.observability import read_metric
from pipeline.settings import Secret, Settings
from producers.api_cmd import ApiServer
from tests.stack_helpers import new_database

pytestmark = pytest.mark.integration

TOKEN = "health-ingest-token"


class Broker:
    """An embedded broker of this test's own, which it may kill and start again on the same port."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.server = EmbeddedBroker.start(log_path=log)
        ensure_topics(self.server.bootstrap, 4, extra=[changelog_topic()])

    @property
    def bootstrap(self) -> str:
        return self.server.bootstrap

    def kill(self) -> None:
        self.server.process.kill()
        self.server.process.wait()

    def start_again(self) -> None:
        self.server = EmbeddedBroker.start(port=self.server.port, log_path=self.log)
        ensure_topics(self.server.bootstrap, 4, extra=[changelog_topic()])


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path / "broker.log")
    yield b
    b.server.stop()


@pytest.fixture
def own_database(database_url: str) -> str:
    return new_database(database_url, "health")


def health(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read())
    except OSError as exc:
        return 0, {"unreachable": repr(exc)}


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 45.0) -> float:
    """Seconds it took ``condition`` to hold; fails after ``timeout_s``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.2)
    return time.monotonic() - started


def down(url: str, dependency: str) -> bool:
    status, body = health(url)
    return status == 503 and dependency in body.get("down", [])


def up(url: str) -> bool:
    return health(url)[0] == 200


def checkin() -> dict[str, Any]:
    return {"citizen_id": f"health-{uuid.uuid4().hex[:10]}", "lat": -6.2, "lon": 106.8,
            "observed_at": "2026-01-01T00:00:00Z", "source": "app"}


def post(api: str) -> tuple[int, float]:
    started = time.monotonic()
    response = httpx.post(f"{api}/v1/checkins", json=checkin(), headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    return response.status_code, time.monotonic() - started


@pytest.fixture
def sink_and_api(broker: Broker, own_database: str, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """The sink (with its router) and the ingest API in threads, as ``crisiswatch up`` runs them as
    processes; yields their base URLs."""
    settings = Settings(kafka_bootstrap=broker.bootstrap, database_url=Secret(own_database), data_dir=tmp_path,
                        api_port=free_port(), sink_metrics_port=free_port(), ingest_token=Secret(TOKEN))
    stop = threading.Event()
    sink = threading.Thread(target=run_sink, args=(settings, stop), kwargs={"registry": CollectorRegistry()}, daemon=True)
    sink.start()
    api = ApiServer(settings)
    api_thread = api.start_in_thread()
    try:
        yield f"http://127.0.0.1:{settings.sink_metrics_port}", f"http://127.0.0.1:{settings.api_port}"
    finally:
        api.stop()
        stop.set()
        api_thread.join(30)
        sink.join(30)
        assert not sink.is_alive() and not api_thread.is_alive()


def test_a_killed_broker_turns_the_sink_and_api_health_503_and_a_new_one_on_its_port_back_to_200(
        broker: Broker, sink_and_api: tuple[str, str]) -> None:
    sink, api = sink_and_api
    wait_for(lambda: up(f"{sink}/health") and up(f"{api}/health"), "sink and API healthy")
    assert post(api)[0] == 202
    assert read_metric(f"{sink}/metrics", "crisiswatch_dependency_up", 'dependency="kafka"') == 1.0

    broker.kill()
    status, took = post(api)  # most likely before the health probe noticed: the publish timeout answers
    assert status == 503
    assert took < 4.0, f"503 after {took:.1f}s; the publish timeout is 2 s"
    noticed = wait_for(lambda: down(f"{sink}/health", "kafka") and down(f"{api}/health", "kafka"),
                       "both /health 503 naming kafka", timeout_s=20)
    print(f"broker death noticed by both /health after {noticed:.1f}s")
    status, body = health(f"{sink}/health")
    assert body["dependencies"]["postgresql"] == "up" and body["dependencies"]["kafka"].startswith("down: ")
    assert read_metric(f"{sink}/metrics", "crisiswatch_dependency_up", 'dependency="kafka"') == 0.0
    status, took = post(api)
    assert status == 503 and took < 4.0

    broker.start_again()
    back = wait_for(lambda: up(f"{sink}/health") and up(f"{api}/health"), "both /health 200 again", timeout_s=30)
    print(f"broker back, both /health 200 after {back:.1f}s")
    assert post(api)[0] == 202


def test_the_api_answers_503_soon_when_the_broker_was_never_there(tmp_path: Path) -> None:
    settings = Settings(kafka_bootstrap=f"127.0.0.1:{free_port()}", api_port=free_port(), ingest_token=Secret(TOKEN))
    api = ApiServer(settings)
    thread = api.start_in_thread()
    try:
        base = f"http://127.0.0.1:{settings.api_port}"
        wait_for(lambda: health(f"{base}/health")[0] != 0, "the API listening")
        statuses = [post(base) for _ in range(3)]
        wait_for(lambda: down(f"{base}/health", "kafka"), "/health 503 naming kafka", timeout_s=20)
        statuses.append(post(base))
    finally:
        api.stop()
        thread.join(30)
    assert [s for s, _ in statuses] == [503] * 4
    assert max(took for _, took in statuses) < 4.0, statuses


@pytest.fixture
def own_postgres() -> Iterator[EmbeddedPostgres]:
    base = Path(tempfile.mkdtemp(prefix="crisiswatch-pg-"))
    base.chmod(0o755)  # the server runs as its own user when the tests run as root (see conftest)
    pg = EmbeddedPostgres.start(base)
    try:
        apply_migrations(pg.url)
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_a_killed_database_turns_the_sink_health_503_and_its_restart_back_to_200(
        broker: Broker, own_postgres: EmbeddedPostgres, tmp_path: Path) -> None:
    settings = Settings(kafka_bootstrap=broker.bootstrap, database_url=Secret(own_postgres.url), data_dir=tmp_path,
                        sink_metrics_port=free_port())
    stop = threading.Event()
    sink = threading.Thread(target=run_sink, args=(settings, stop), kwargs={"registry": CollectorRegistry()}, daemon=True)
    sink.start()
    url = f"http://127.0.0.1:{settings.sink_metrics_port}/health"
    try:
        wait_for(lambda: up(url), "sink healthy")
        postmaster = own_postgres.server.get_postmaster_info().pid
        os.kill(postmaster, signal.SIGKILL)
        wait_for(lambda: not own_postgres.alive(), "PostgreSQL seen dead", timeout_s=20)
        wait_for(lambda: down(url, "postgresql"), "/health 503 naming postgresql", timeout_s=20)
        assert health(url)[1]["dependencies"]["kafka"] == "up"
        before = own_postgres.url
        assert own_postgres.restart() == before  # same data directory, same socket: clients reconnect
        assert own_postgres.alive()
        wait_for(lambda: up(url), "/health 200 again", timeout_s=30)
    finally:
        stop.set()
        sink.join(30)


def test_a_worker_health_follows_its_broker(broker: Broker, tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, **Settings(kafka_bootstrap=broker.bootstrap, data_dir=tmp_path, worker_web_port=port).env()}
    log = tmp_path / "worker.log"
    with log.open("ab") as out:
        worker = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "worker"], env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/health"
    try:
        wait_for(lambda: up(url) or worker.poll() is not None, "the worker healthy", timeout_s=90)
        assert worker.poll() is None, log.read_text()[-3000:]
        broker.kill()
        wait_for(lambda: down(url, "kafka") or worker.poll() is not None, "worker /health 503 naming kafka", 20)
        assert worker.poll() is None, log.read_text()[-3000:]
        broker.start_again()
        wait_for(lambda: up(url) or worker.poll() is not None, "worker /health 200 again", timeout_s=60)
        assert worker.poll() is None, log.read_text()[-3000:]
        assert health(url)[1]["dependencies"] == {"kafka": "up"}
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()


def test_the_feed_pollers_health_follows_their_broker(broker: Broker, tmp_path: Path) -> None:
    config = tmp_path / "feeds.toml"
    empty = Path(__file__).resolve().parents[1] / "fixtures" / "feeds" / "poller" / "usgs_empty.geojson"
    config.write_text(f'[[feeds]]\nname = "quiet"\npath = "{empty}"\nformat = "usgs"\ninterval_s = 1\n', "utf-8")
    port = free_port()
    env = {**os.environ, **Settings(kafka_bootstrap=broker.bootstrap, data_dir=tmp_path / "data").env()}
    feeds = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "feeds", "--config", str(config), "--metrics-port",
                              str(port), "--metrics-host", "127.0.0.1"], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/health"
    try:
        wait_for(lambda: up(url), "the feed pollers healthy")
        broker.kill()
        wait_for(lambda: down(url, "kafka"), "feeds /health 503 naming kafka", timeout_s=20)
        broker.start_again()
        wait_for(lambda: up(url), "feeds /health 200 again", timeout_s=30)
        feeds.send_signal(signal.SIGTERM)
        assert feeds.wait(timeout=60) == 0
    finally:
        if feeds.poll() is None:
            feeds.kill()
            feeds.wait()
