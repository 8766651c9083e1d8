"""Feed pollers against a real broker and a local HTTP server that honours ETags.

A crisis centre must be able to trust that: each crisis is announced once (not again on every
poll, not again after a restart), an update is announced as a higher version of the same
crisis, reports of one disaster from several sources become one crisis, garbage ends up in
the dead-letter topic with a reason, and nothing is marked as sent until Kafka has it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, TopicPartition
from prometheus_client import CollectorRegistry
from shapely.geometry import Point, shape

from pipeline import topics
from pipeline.metrics import FeedMetrics
from pipeline.settings import Settings
from producers.feeds.config import PollerConfig, parse_config
from producers.feeds.poller import FeedPoller, FeedTopics
from producers.feeds.state import STATE_FILE_NAME
from producers.publisher import Publisher
from schemas import Crisis, decode

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "feeds" / "poller"
NOW = datetime(2024, 1, 1, 8, 0, tzinfo=UTC)
NOTO = Point(137.2705, 37.4874)
COQUIMBO = Point(-71.8, -29.95)


@dataclass
class FeedServer:
    """Serves documents by path with an ETag; answers 304 to a matching If-None-Match."""

    docs: dict[str, tuple[int, bytes, str | None]] = field(default_factory=dict)
    seen_validators: list[tuple[str, str | None]] = field(default_factory=list)
    delay_s: float = 0.0
    port: int = 0

    def put(self, path: str, body: bytes, etag: str | None = None, status: int = 200) -> None:
        self.docs[path] = (status, body, etag)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
def feed_server() -> Iterator[FeedServer]:
    state = FeedServer()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if state.delay_s:
                time.sleep(state.delay_s)
            status, body, etag = state.docs.get(self.path, (404, b"not found", None))
            state.seen_validators.append((self.path, self.headers.get("If-None-Match")))
            if etag is not None and self.headers.get("If-None-Match") == etag:
                self.send_response(304)
                self.send_header("ETag", etag)
                self.end_headers()
                return
            self.send_response(status)
            if etag is not None:
                self.send_header("ETag", etag)
            if not self.path.startswith("/unsized"):
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the poller hung up on purpose
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def read_all(bootstrap: str, topic: str) -> list[Any]:
    """Every record of a topic, from the beginning up to its current end."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    try:
        consumer.topics()
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        end = consumer.end_offsets(parts)
        records: list[Any] = []
        deadline = time.monotonic() + 30
        while any(consumer.position(tp) < end[tp] for tp in parts) and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


def crises(bootstrap: str, topic: str) -> list[Crisis]:
    return sorted((decode(r.value, Crisis) for r in read_all(bootstrap, topic)), key=lambda c: (c.crisis_id, c.version))


def located_at(events: list[Crisis], point: Point) -> list[Crisis]:
    return [e for e in events if e.geometry is not None and shape(e.geometry).covers(point)]


def usgs_document(generated_ms: int = 1704094800000, noto_updated_ms: int | None = None, noto_mag: float = 7.5) -> bytes:
    doc = json.loads((FIXTURES / "usgs_quakes.geojson").read_bytes())
    doc["metadata"]["generated"] = generated_ms
    noto = doc["features"][0]["properties"]
    noto["mag"] = noto_mag
    noto["title"] = f"M {noto_mag} - Noto Peninsula, Japan"
    if noto_updated_ms is not None:
        noto["updated"] = noto_updated_ms
    return json.dumps(doc).encode("utf-8")


@pytest.fixture
def feed_topics(fresh_topic: Callable[..., str]) -> FeedTopics:
    return FeedTopics(crisis=fresh_topic("feed-crisis"), review=fresh_topic("feed-review"), dlq=fresh_topic("feed-dlq"))


def make_poller(config: PollerConfig, bootstrap: str, state_dir: Path, feed_topics: FeedTopics,
                registry: CollectorRegistry | None = None, now: datetime = NOW) -> FeedPoller:
    settings = Settings(kafka_bootstrap=bootstrap, data_dir=state_dir)
    return FeedPoller(config, settings, Publisher(settings, timeout_s=10.0), state_dir / STATE_FILE_NAME,
                      FeedMetrics(registry or CollectorRegistry()), feed_topics, clock=lambda: now, jitter=lambda: 0.0)


def feeds_config(server: FeedServer, *feeds: tuple[str, str, str]) -> PollerConfig:
    text = "".join(f'[[feeds]]\nname = "{name}"\nurl = "{server.url(path)}"\nformat = "{fmt}"\ninterval_s = 60\ntimeout_s = 5\n'
                   'language = "en"\n' for name, path, fmt in feeds)
    return parse_config(text)


def test_polls_publish_each_crisis_once_across_304s_restarts_and_updates(
        kafka_bootstrap: str, feed_topics: FeedTopics, feed_server: FeedServer, tmp_path: Path) -> None:
    feed_server.put("/usgs.geojson", usgs_document(), '"usgs-1"')
    feed_server.put("/cap.xml", (FIXTURES / "cap_quake_alert.xml").read_bytes(), '"cap-1"')
    feed_server.put("/status.xml", (FIXTURES / "garbage.xml").read_bytes(), '"bad-1"')
    config = feeds_config(feed_server, ("usgs", "/usgs.geojson", "usgs"), ("jma", "/cap.xml", "cap"),
                          ("broken", "/status.xml", "cap"))
    metrics = CollectorRegistry()
    poller = make_poller(config, kafka_bootstrap, tmp_path, feed_topics, metrics)

    # first poll: the Chile quake, the Noto quake, and the agency's alert folded into the Noto crisis
    results = {r.feed: r for r in poller.poll_once()}
    assert results["usgs"].ok and results["jma"].ok
    assert not results["broken"].ok and results["broken"].error_kind == "parse"
    first = crises(kafka_bootstrap, feed_topics.crisis)
    noto, chile = located_at(first, NOTO), located_at(first, COQUIMBO)
    assert len(first) == 3 and len(chile) == 1 and len(noto) == 2
    assert len({e.crisis_id for e in noto}) == 1 and noto[0].crisis_id != chile[0].crisis_id
    assert noto[0].version < noto[1].version
    merged = noto[1]
    assert merged.source == "cap" and "higher ground" in merged.instruction
    assert noto[0].source_ref in merged.references
    assert metrics.get_sample_value("crisiswatch_feed_items_total", {"feed": "usgs", "outcome": "published"}) == 2
    assert metrics.get_sample_value("crisiswatch_feed_last_success_timestamp_seconds", {"feed": "usgs"}) == NOW.timestamp()
    assert metrics.get_sample_value("crisiswatch_feed_errors_total", {"feed": "broken", "kind": "parse"}) == 1

    dead = read_all(kafka_bootstrap, feed_topics.dlq)
    assert len(dead) == 1
    headers = dict(dead[0].headers)
    assert headers[topics.DLQ_SOURCE_TOPIC_HEADER] == b"feed:broken"
    assert b"broken" in headers[topics.DLQ_REASON_HEADER] and dead[0].value.startswith(b"<?xml")

    # second poll: every server answers 304 to the ETag it gave; nothing is published again
    feed_server.seen_validators.clear()
    assert all(r.ok and r.not_modified for r in poller.poll_once())
    assert ("/usgs.geojson", '"usgs-1"') in feed_server.seen_validators
    assert len(read_all(kafka_bootstrap, feed_topics.crisis)) == 3
    assert len(read_all(kafka_bootstrap, feed_topics.dlq)) == 1

    # restart: a new poller on the same state; USGS regenerated its feed (new bytes, new ETag, same events)
    feed_server.put("/usgs.geojson", usgs_document(generated_ms=1704095400000), '"usgs-2"')
    restarted = make_poller(config, kafka_bootstrap, tmp_path, feed_topics)
    results = {r.feed: r for r in restarted.poll_once()}
    assert results["usgs"].ok and results["usgs"].published == 0 and results["usgs"].unchanged == 2
    assert len(read_all(kafka_bootstrap, feed_topics.crisis)) == 3

    # an update of the Noto quake: only that crisis, with a higher version
    feed_server.put("/usgs.geojson", usgs_document(generated_ms=1704096000000, noto_updated_ms=1704095900000,
                                                   noto_mag=7.6), '"usgs-3"')
    assert all(r.ok for r in restarted.poll_once() if r.feed != "broken")
    after = crises(kafka_bootstrap, feed_topics.crisis)
    new = [e for e in after if e not in first]
    assert len(new) == 1
    assert new[0].crisis_id == merged.crisis_id and new[0].version > merged.version
    assert "higher ground" in new[0].instruction  # still led by the agency's alert


def test_an_item_the_stages_would_refuse_is_dead_lettered_with_its_reason_and_the_rest_published(
        kafka_bootstrap: str, feed_topics: FeedTopics, feed_server: FeedServer, tmp_path: Path) -> None:
    # JSON escapes let a feed write what no stage could store or encode again: a lone surrogate, a NUL.
    doc = json.loads(usgs_document())
    doc["features"][0]["properties"]["title"] = "M 7.5 - Noto \ud800 Peninsula"
    body = json.dumps(doc, ensure_ascii=True).encode()
    feed_server.put("/usgs.geojson", body, '"usgs-1"')
    config = feeds_config(feed_server, ("usgs", "/usgs.geojson", "usgs"))
    metrics = CollectorRegistry()
    poller = make_poller(config, kafka_bootstrap, tmp_path, feed_topics, metrics)

    [result] = poller.poll_once()
    assert result.ok and (result.published, result.rejected) == (1, 1)
    assert [e.geometry is not None and shape(e.geometry).covers(COQUIMBO) for e in crises(kafka_bootstrap, feed_topics.crisis)] \
        == [True]
    [letter] = read_all(kafka_bootstrap, feed_topics.dlq)
    reason = dict(letter.headers)[topics.DLQ_REASON_HEADER].decode()
    assert reason.startswith("the parser produced an invalid crisis/1 event ($.title: lone surrogate U+D800")
    assert json.loads(letter.value)["item_ref"] == doc["features"][0]["id"]
    assert metrics.get_sample_value("crisiswatch_feed_items_total", {"feed": "usgs", "outcome": "rejected"}) == 1

    # the same item in a new document, read by a restarted poller: dead-lettered once, not on every poll
    feed_server.put("/usgs.geojson", body + b" ", '"usgs-2"')
    restarted = make_poller(config, kafka_bootstrap, tmp_path, feed_topics)
    assert all(r.ok for r in restarted.poll_once())
    assert len(read_all(kafka_bootstrap, feed_topics.dlq)) == 1
    assert len(read_all(kafka_bootstrap, feed_topics.crisis)) == 1


def test_events_kafka_did_not_acknowledge_are_published_on_a_later_poll(
        kafka_bootstrap: str, feed_topics: FeedTopics, feed_server: FeedServer, tmp_path: Path) -> None:
    feed_server.put("/usgs.geojson", usgs_document(), '"usgs-1"')
    config = feeds_config(feed_server, ("usgs", "/usgs.geojson", "usgs"))
    poller = make_poller(config, kafka_bootstrap, tmp_path, feed_topics)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{s.getsockname()[1]}"
    poller.sink = Publisher(Settings(kafka_bootstrap=nobody), timeout_s=1.0)

    [down] = poller.poll_once()
    assert not down.ok and down.error_kind == "broker"
    assert poller.next_delay(config.feeds[0]) < config.feeds[0].interval_s  # retried soon, not in a full interval

    poller.sink = Publisher(Settings(kafka_bootstrap=kafka_bootstrap), timeout_s=10.0)
    [up] = poller.poll_once()  # same ETag on the server: the poller must not have kept it
    assert up.ok and up.published == 2
    assert len(read_all(kafka_bootstrap, feed_topics.crisis)) == 2


def test_fetch_failures_back_off_exponentially_and_recover(
        kafka_bootstrap: str, feed_topics: FeedTopics, feed_server: FeedServer, tmp_path: Path) -> None:
    feed_server.put("/feed.geojson", b"upstream error", status=500)
    config = feeds_config(feed_server, ("flaky", "/feed.geojson", "usgs"))
    poller = make_poller(config, kafka_bootstrap, tmp_path, feed_topics)
    feed = config.feeds[0]
    delays = []
    for _ in range(4):
        [result] = poller.poll_once()
        assert not result.ok and result.error_kind == "http" and "500" in (result.error or "")
        delays.append(poller.next_delay(feed))
    assert delays == [5.0, 10.0, 20.0, 40.0]  # equal jitter at its low end: half of 10, 20, 40, 80 s
    feed_server.put("/feed.geojson", (FIXTURES / "usgs_empty.geojson").read_bytes())
    [result] = poller.poll_once()
    assert result.ok and poller.next_delay(feed) == feed.interval_s


def test_oversized_and_slow_responses_are_refused(
        kafka_bootstrap: str, feed_topics: FeedTopics, feed_server: FeedServer, tmp_path: Path) -> None:
    document = b"<rss>" + b" " * 500_000 + b"</rss>"
    feed_server.put("/huge.xml", document)
    feed_server.put("/unsized.xml", document)  # no Content-Length: the cap must apply while reading
    config = parse_config(f'[[feeds]]\nname = "huge"\nurl = "{feed_server.url("/huge.xml")}"\nmax_bytes = 1000\n'
                          f'[[feeds]]\nname = "unsized"\nurl = "{feed_server.url("/unsized.xml")}"\nmax_bytes = 1000\n'
                          f'[[feeds]]\nname = "slow"\nurl = "{feed_server.url("/huge.xml")}"\ntimeout_s = 0.2\n')
    poller = make_poller(config, kafka_bootstrap, tmp_path, feed_topics)
    for name in ("huge", "unsized"):
        result = poller.poll(config.feed(name))
        assert result.error_kind == "too_large" and "max_bytes=1000" in (result.error or "")
    feed_server.delay_s = 1.0
    slow = poller.poll(config.feed("slow"))
    assert slow.error_kind == "timeout"
    assert len(read_all(kafka_bootstrap, feed_topics.dlq)) == 0


def cli(args: list[str], env: dict[str, str], **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "feeds", *args], env={**os.environ, **env}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_cli_once_exits_2_with_one_line_per_failed_feed(kafka_bootstrap: str, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    config = tmp_path / "feeds.toml"
    config.write_text(f'[[feeds]]\nname = "quiet"\npath = "{FIXTURES / "usgs_empty.geojson"}"\nformat = "usgs"\n'
                      f'[[feeds]]\nname = "down"\nurl = "http://127.0.0.1:{closed}/feed.xml"\ntimeout_s = 2\n', "utf-8")
    proc = cli(["--config", str(config), "--once"],
               {"CRISISWATCH_KAFKA_BOOTSTRAP": kafka_bootstrap, "CRISISWATCH_DATA_DIR": str(tmp_path / "data")})
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert err.strip().splitlines() == [err.strip()] and err.startswith("crisiswatch feeds: down: network: ")

    config.write_text('[[feeds]]\nname = "quiet"\nurl = "ftp://example.org/x"\n', "utf-8")
    proc = cli(["--config", str(config), "--once"], {"CRISISWATCH_KAFKA_BOOTSTRAP": kafka_bootstrap})
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "feed 'quiet' (#1): url:" in err


def test_cli_serves_metrics_and_stops_cleanly_on_sigterm(kafka_bootstrap: str, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "feeds.toml"
    config.write_text(f'[[feeds]]\nname = "quiet"\npath = "{FIXTURES / "usgs_empty.geojson"}"\nformat = "usgs"\n'
                      'interval_s = 1\n', "utf-8")
    proc = cli(["--config", str(config), "--metrics-port", str(port), "--metrics-host", "127.0.0.1"],
               {"CRISISWATCH_KAFKA_BOOTSTRAP": kafka_bootstrap, "CRISISWATCH_DATA_DIR": str(tmp_path / "data")})
    try:
        # The histogram of fetch times is observed just before the success time is set: wait for the latter.
        wanted = 'crisiswatch_feed_last_success_timestamp_seconds{feed="quiet"}'
        body = ""
        deadline = time.monotonic() + 60
        while wanted not in body and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
                    body = resp.read().decode()
            except OSError:
                pass
            time.sleep(0.2)
        assert wanted in body
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
            assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


SAMPLES = Path(__file__).resolve().parents[2].parent / "shared" / "samples"


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="../shared/samples not present")
@pytest.mark.parametrize(("sample", "published_at"), [
    ("gdacs/gdacs_rss_7d_2022-11-26_whatisc-up25.xml", datetime(2022, 11, 26, 21, 30, tzinfo=UTC)),
    ("usgs/usgs_4.5_week_2020-10-10_josem279.geojson", datetime(2020, 10, 10, 16, 45, tzinfo=UTC)),
])
def test_real_feeds_are_announced_once(sample: str, published_at: datetime,
                                       kafka_bootstrap: str, feed_topics: FeedTopics, feed_server: FeedServer,
                                       tmp_path: Path) -> None:
    # served without validators, as some publishers do: only the poller's own memory prevents repeats
    feed_server.put("/feed", (SAMPLES / sample).read_bytes())
    config = feeds_config(feed_server, ("real", "/feed", "auto"))
    results = make_poller(config, kafka_bootstrap, tmp_path, feed_topics, now=published_at).poll_once()
    assert all(r.ok for r in results), results
    published = read_all(kafka_bootstrap, feed_topics.crisis)
    assert len(published) == sum(r.published for r in results) > 0
    assert len({(e.crisis_id, e.version) for e in crises(kafka_bootstrap, feed_topics.crisis)}) == len(published)

    state = tmp_path / STATE_FILE_NAME
    saved = json.loads(state.read_text("utf-8"))
    for feed in saved["feeds"].values():
        feed["sha256"] = None  # as if the publisher re-rendered its document
    state.write_text(json.dumps(saved), "utf-8")
    again = make_poller(config, kafka_bootstrap, tmp_path, feed_topics, now=published_at).poll_once()
    assert all(r.ok and r.published == 0 for r in again), again
    assert len(read_all(kafka_bootstrap, feed_topics.crisis)) == len(published)


def test_a_damaged_state_file_is_set_aside_and_polling_goes_on(
        kafka_bootstrap: str, feed_topics: FeedTopics, feed_server: FeedServer, tmp_path: Path) -> None:
    (tmp_path / STATE_FILE_NAME).write_bytes(b'{"format": 1, "feeds": {"usgs": ')
    feed_server.put("/usgs.geojson", usgs_document(), '"usgs-1"')
    config = feeds_config(feed_server, ("usgs", "/usgs.geojson", "usgs"))
    [result] = make_poller(config, kafka_bootstrap, tmp_path, feed_topics).poll_once()
    assert result.ok and result.published == 2
    assert [p.name for p in tmp_path.glob(f"{STATE_FILE_NAME}.corrupt-*")] == [f"{STATE_FILE_NAME}.corrupt-20240101T080000Z"]
    assert json.loads((tmp_path / STATE_FILE_NAME).read_text("utf-8"))["feeds"]["usgs"]["etag"] == '"usgs-1"'


def test_low_confidence_news_goes_to_review_once_and_confident_news_to_citizens(
        kafka_bootstrap: str, feed_topics: FeedTopics, feed_server: FeedServer, tmp_path: Path) -> None:
    document = (FIXTURES / "news.rss").read_bytes()
    feed_server.put("/news.rss", document)
    config = feeds_config(feed_server, ("wire", "/news.rss", "rss"))
    [result] = make_poller(config, kafka_bootstrap, tmp_path, feed_topics).poll_once()
    assert result.ok and (result.published, result.review) == (1, 1)
    [event] = crises(kafka_bootstrap, feed_topics.crisis)
    assert "Palu" in event.title and event.language == "en"  # the feed's language where the item has none
    [held] = crises(kafka_bootstrap, feed_topics.review)
    assert "could" in held.title

    # the wire re-renders its feed (new build date, same items) and the poller restarts: nothing is repeated
    feed_server.put("/news.rss", document.replace(b"07:55:00 GMT</lastBuildDate>", b"07:58:00 GMT</lastBuildDate>"))
    [again] = make_poller(config, kafka_bootstrap, tmp_path, feed_topics).poll_once()
    assert again.ok and (again.published, again.review) == (0, 0)
    assert len(read_all(kafka_bootstrap, feed_topics.review)) == 1
