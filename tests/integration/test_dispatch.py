"""The dispatcher on real servers: the embedded broker and PostgreSQL, an SMTP server (aiosmtpd) in
this process and an HTTP receiver on loopback that fails on demand.

What a citizen (or the ministry's receiver) would notice: a signed webhook with its Idempotency-Key;
an email with text and HTML parts; a failing webhook falling back to email; an all-clear never before
its warning; a rate limit that slows delivery down without dropping anything; and a dispatcher killed
mid-stream whose successor delivers every warning exactly once per channel (counted by the keys the
receivers see), every row ``delivered``."""

from __future__ import annotations

import email
import email.policy
import json
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiosmtpd.controller import Controller
from prometheus_client import CollectorRegistry
from psycopg.types.json import Jsonb

from consumers.dispatch import Dispatcher
from pipeline.domain.delivery import IDEMPOTENCY_HEADER, SIGNATURE_HEADER, verify
from pipeline.embedded import free_port
from pipeline.metrics import DispatchMetrics
from pipeline.settings import Secret, Settings
from pipeline.testing import VerbProcess
from producers.publisher import Publisher, outgoing
from schemas import Warning
from schemas.models import WarningKind
from tests.stack_helpers import WebhookReceiver

pytestmark = pytest.mark.integration

SECRET = "test-webhook-secret"
T0 = datetime(2025, 3, 1, 8, 30, tzinfo=UTC)


# --- receivers ---------------------------------------------------------------------------------------------


# The webhook: the ``webhook`` fixture (tests/integration/conftest.py), a WebhookReceiver.


@dataclass
class Mailbox:
    port: int
    messages: list[tuple[str, EmailMessage]] = field(default_factory=list)  # (recipient, message)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        with self.lock:
            self.messages += [(rcpt, message) for rcpt in envelope.rcpt_tos]
        return "250 OK"

    def to(self, address: str) -> list[EmailMessage]:
        with self.lock:
            return [m for rcpt, m in self.messages if rcpt == address]


@pytest.fixture
def mailbox() -> Iterator[Mailbox]:
    box = Mailbox(free_port())
    controller = Controller(box, hostname="127.0.0.1", port=box.port)
    controller.start()
    try:
        yield box
    finally:
        controller.stop()


# --- helpers ---------------------------------------------------------------------------------------------


def add_citizen(database_url: str, channels: list[tuple[str, str]], name: str = "Siti Rahma") -> str:
    citizen_id = "cit-" + uuid.uuid4().hex[:10]
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO citizens (citizen_id, name, nationality, language, channels, location_tracking) "
                     "VALUES (%s, %s, 'ID', 'en', %s, true)",
                     (citizen_id, name, Jsonb([{"type": t, "address": a} for t, a in channels])))
    return citizen_id


def make_warning(citizen_id: str, crisis_id: str, kind: WarningKind = "inside", seq: int = 0) -> Warning:
    return Warning(f"w-{uuid.uuid4().hex}", citizen_id, crisis_id, 1, kind, "extreme", "Earthquake M6.8",
                   "Drop, cover, hold on", 0.0, -8.65, 115.2, T0, T0 + timedelta(seconds=1 + seq), ("ID",))


def publish(bootstrap: str, topic: str, warnings: list[Warning]) -> None:
    publisher = Publisher(Settings(), bootstrap=bootstrap)
    try:
        publisher.publish([outgoing(w, topic) for w in warnings])
    finally:
        publisher.close()


def deliveries(database_url: str, warning_ids: list[str]) -> dict[tuple[str, str], tuple[str, int, Any]]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute("SELECT warning_id, channel, status, attempts, receipt FROM deliveries "
                            "WHERE warning_id = ANY(%s)", (warning_ids,)).fetchall()
    return {(r[0], r[1]): (r[2], r[3], r[4]) for r in rows}


def wait_for(condition: Callable[[], bool], timeout_s: float = 90.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def settings_for(kafka_bootstrap: str, database_url: str, mailbox: Mailbox, **overrides: Any) -> Settings:
    base = Settings(kafka_bootstrap=kafka_bootstrap, database_url=Secret(database_url),
                    webhook_secret=Secret(SECRET), smtp_url=Secret(f"smtp://127.0.0.1:{mailbox.port}"),
                    mail_from="alerts@crisiswatch.test", dispatch_max_attempts=3, dispatch_retry_initial_s=0.05,
                    dispatch_retry_max_s=0.2)
    return replace(base, **overrides)


@pytest.fixture
def run_dispatcher(kafka_bootstrap: str, database_url: str) -> Iterator[Callable[[Settings, str], CollectorRegistry]]:
    running: list[tuple[threading.Event, threading.Thread]] = []

    def start(settings: Settings, topic: str) -> CollectorRegistry:
        registry = CollectorRegistry()
        dispatcher = Dispatcher(settings, DispatchMetrics(registry), source_topic=topic,
                                group_id="dispatch-" + uuid.uuid4().hex[:8])
        stop = threading.Event()
        thread = threading.Thread(target=dispatcher.run, args=(stop,), daemon=True)
        thread.start()
        running.append((stop, thread))
        return registry

    yield start
    for stop, thread in running:
        stop.set()
        thread.join(30)
        assert not thread.is_alive()


# --- tests -----------------------------------------------------------------------------------------------


def test_webhook_is_signed_with_its_key_and_email_has_text_and_html(
        kafka_bootstrap: str, database_url: str, fresh_topic: Callable[..., str], webhook: WebhookReceiver,
        mailbox: Mailbox, run_dispatcher: Callable[[Settings, str], CollectorRegistry]) -> None:
    topic = fresh_topic("warnings")
    crisis = "quake-" + uuid.uuid4().hex[:6]
    by_hook = add_citizen(database_url, [("webhook", webhook.url("/hook/a"))])
    address = f"{uuid.uuid4().hex[:8]}@example.org"
    by_mail = add_citizen(database_url, [("email", address)], name="Budi Santoso")
    w_hook, w_mail = make_warning(by_hook, crisis), make_warning(by_mail, crisis)
    stranger = make_warning("cit-not-registered", crisis)
    publish(kafka_bootstrap, topic, [stranger, w_hook, w_mail])
    registry = run_dispatcher(settings_for(kafka_bootstrap, database_url, mailbox), topic)

    wait_for(lambda: webhook.for_path("/hook/a") and mailbox.to(address), what="both deliveries")
    wait_for(lambda: registry.get_sample_value("crisiswatch_dispatch_warnings_total", {"outcome": "no_citizen"}) == 1,
             what="the unknown citizen to be counted")

    [hook] = webhook.for_path("/hook/a")
    assert hook.headers[IDEMPOTENCY_HEADER] == w_hook.warning_id
    assert verify(SECRET.encode(), hook.headers[SIGNATURE_HEADER], hook.body, now=int(time.time()))
    assert not verify(b"wrong secret", hook.headers[SIGNATURE_HEADER], hook.body, now=int(time.time()))
    body = json.loads(hook.body)
    assert body["warning"]["warning_id"] == w_hook.warning_id
    assert "Drop, cover, hold on" in body["message"]["text"]

    [mail] = mailbox.to(address)
    assert w_mail.warning_id in mail["Message-ID"]
    assert mail["From"] == "alerts@crisiswatch.test"
    assert mail["Content-Language"] == "en"
    assert mail.get_body(("plain",)) is not None and mail.get_body(("html",)) is not None
    plain, html = mail.get_body(("plain",)), mail.get_body(("html",))
    assert plain is not None and html is not None
    assert "Budi Santoso" in plain.get_content() and "<p>" in html.get_content()

    rows = deliveries(database_url, [w_hook.warning_id, w_mail.warning_id])
    assert rows[(w_hook.warning_id, "webhook")][:2] == ("delivered", 1)
    assert rows[(w_mail.warning_id, "email")][:2] == ("delivered", 1)
    assert rows[(w_mail.warning_id, "email")][2]["reference"] == mail["Message-ID"]
    assert registry.get_sample_value("crisiswatch_dispatch_attempts_total", {"channel": "webhook", "outcome": "delivered"}) == 1


def test_a_failing_webhook_falls_back_to_email_and_the_all_clear_comes_after_its_warning(
        kafka_bootstrap: str, database_url: str, fresh_topic: Callable[..., str], webhook: WebhookReceiver,
        mailbox: Mailbox, run_dispatcher: Callable[[Settings, str], CollectorRegistry]) -> None:
    topic = fresh_topic("warnings")
    crisis = "flood-" + uuid.uuid4().hex[:6]
    address = f"{uuid.uuid4().hex[:8]}@example.org"
    webhook.failing.add("/down")
    falls_back = add_citizen(database_url, [("webhook", webhook.url("/down")), ("email", address)])
    webhook.failures["/flaky"] = [503, 429]  # transient twice, then delivered (3 attempts allowed)
    flaky = add_citizen(database_url, [("webhook", webhook.url("/flaky"))])
    warning, cleared = make_warning(falls_back, crisis), make_warning(flaky, crisis)
    all_clear = make_warning(flaky, crisis, "all_clear", seq=1)
    publish(kafka_bootstrap, topic, [warning, cleared, all_clear])
    run_dispatcher(settings_for(kafka_bootstrap, database_url, mailbox), topic)

    wait_for(lambda: mailbox.to(address) and len(webhook.for_path("/flaky")) == 4, what="fallback and the all-clear")

    down = webhook.for_path("/down")
    assert len(down) == 3 and {r.headers[IDEMPOTENCY_HEADER] for r in down} == {warning.warning_id}
    assert len(mailbox.to(address)) == 1
    rows = deliveries(database_url, [warning.warning_id, cleared.warning_id, all_clear.warning_id])
    assert rows[(warning.warning_id, "webhook")][:2] == ("gave_up", 3)
    assert rows[(warning.warning_id, "email")][:2] == ("delivered", 1)
    assert rows[(cleared.warning_id, "webhook")][:2] == ("delivered", 3)
    assert rows[(all_clear.warning_id, "webhook")][:2] == ("delivered", 1)
    keys = [r.headers[IDEMPOTENCY_HEADER] for r in webhook.for_path("/flaky")]
    assert keys == [cleared.warning_id] * 3 + [all_clear.warning_id]  # the all-clear only after its warning


def test_the_rate_limit_slows_delivery_down_and_drops_nothing(
        kafka_bootstrap: str, database_url: str, fresh_topic: Callable[..., str], webhook: WebhookReceiver,
        mailbox: Mailbox, run_dispatcher: Callable[[Settings, str], CollectorRegistry]) -> None:
    topic = fresh_topic("warnings")
    crisis = "storm-" + uuid.uuid4().hex[:6]
    warnings = [make_warning(add_citizen(database_url, [("webhook", webhook.url(f"/rl/{i}"))]), crisis) for i in range(8)]
    publish(kafka_bootstrap, topic, warnings)
    registry = run_dispatcher(settings_for(kafka_bootstrap, database_url, mailbox, rate_limit_webhook_per_s=2.0), topic)

    wait_for(lambda: len([r for r in webhook.received if r.path.startswith("/rl/")]) == 8, what="all eight")
    times = sorted(r.at for r in webhook.received if r.path.startswith("/rl/"))
    # A burst of 2, then 2 a second: the last of 8 comes at least 3 s after the first (2.5 s asserted).
    assert times[-1] - times[0] >= 2.5
    assert sorted(webhook.keys()) == sorted(w.warning_id for w in warnings)
    waited = registry.get_sample_value("crisiswatch_dispatch_rate_limited_seconds_total", {"channel": "webhook"})
    assert waited is not None and waited > 2.0


def test_citizens_served_at_once_each_get_their_warnings_in_order_and_once(
        kafka_bootstrap: str, database_url: str, fresh_topic: Callable[..., str], webhook: WebhookReceiver,
        mailbox: Mailbox, run_dispatcher: Callable[[Settings, str], CollectorRegistry]) -> None:
    topic = fresh_topic("warnings")
    webhook.delay_s = 0.02  # each send takes a while, so the pool's threads overlap
    citizens = [add_citizen(database_url, [("webhook", webhook.url(f"/order/{i}"))]) for i in range(12)]
    crises = ["flood-" + uuid.uuid4().hex[:6] for _ in range(5)]
    # Interleaved as they would come: every citizen's first warning, then every citizen's second ...
    warnings = [make_warning(c, crisis, seq=n) for n, crisis in enumerate(crises) for c in citizens]
    publish(kafka_bootstrap, topic, warnings)
    run_dispatcher(settings_for(kafka_bootstrap, database_url, mailbox, dispatch_concurrency=6), topic)

    wait_for(lambda: len(webhook.keys()) >= len(warnings), what="every warning")
    time.sleep(0.5)  # a second copy of anything would have arrived by now
    for i, citizen in enumerate(citizens):
        got = [r.headers[IDEMPOTENCY_HEADER] for r in sorted(webhook.for_path(f"/order/{i}"), key=lambda r: r.at)]
        assert got == [w.warning_id for w in warnings if w.citizen_id == citizen], f"citizen {i}"
    assert sorted(webhook.keys()) == sorted(w.warning_id for w in warnings)
    rows = deliveries(database_url, [w.warning_id for w in warnings])
    assert {v[:2] for v in rows.values()} == {("delivered", 1)} and len(rows) == len(warnings)


def test_a_dispatcher_killed_mid_stream_and_restarted_delivers_each_warning_once_per_channel(
        kafka_bootstrap: str, database_url: str, fresh_topic: Callable[..., str], webhook: WebhookReceiver,
        mailbox: Mailbox, tmp_path: Path) -> None:
    topic = fresh_topic("warnings")
    crisis = "eruption-" + uuid.uuid4().hex[:6]
    webhook.delay_s = 0.1  # slow enough to kill it mid-stream
    warnings: list[Warning] = []
    addresses: dict[str, str] = {}
    for i in range(30):
        if i % 3 == 0:
            addresses[f"{i}"] = address = f"kill-{uuid.uuid4().hex[:8]}@example.org"
            citizen = add_citizen(database_url, [("email", address)])
        else:
            citizen = add_citizen(database_url, [("webhook", webhook.url(f"/kill/{i}"))])
        warnings.append(make_warning(citizen, crisis))
    publish(kafka_bootstrap, topic, warnings)
    settings = settings_for(kafka_bootstrap, database_url, mailbox, api_host="127.0.0.1", dispatch_concurrency=4)
    port = free_port()
    env = {**settings.env(), "CRISISWATCH_DISPATCH_METRICS_PORT": str(port), "CRISISWATCH_LOG_LEVEL": "INFO"}
    group = "dispatch-" + uuid.uuid4().hex[:8]

    def process() -> VerbProcess:
        return VerbProcess("dispatch", env, tmp_path / "dispatch.log", port, args=["--topic", topic, "--group", group])

    first = process()
    first.start()
    try:
        wait_for(lambda: len(webhook.received) >= 6, what="some deliveries before the kill")
    finally:
        first.stop(signal.SIGKILL)
    second = process()
    second.start()
    try:
        def keys() -> set[str]:
            return set(webhook.keys()) | {m["X-Crisiswatch-Warning-Id"] for _, m in mailbox.messages}

        wait_for(lambda: keys() >= {w.warning_id for w in warnings}, timeout_s=120, what="every warning")
        time.sleep(1.0)  # anything sent twice would arrive now
    finally:
        second.stop()

    webhook_keys = webhook.keys()
    mail_ids = [m["Message-ID"] for _, m in mailbox.messages if m["X-Crisiswatch-Warning-Id"] in {w.warning_id for w in warnings}]
    # Once per channel in effect: a copy re-sent after the kill carries the same key, so it is the same
    # message to its receiver; only the attempts in flight at the kill (one per thread of the pool, 4)
    # may have reached it twice, and none more than twice.
    extra = (len(webhook_keys) - len(set(webhook_keys))) + (len(mail_ids) - len(set(mail_ids)))
    assert extra <= settings.dispatch_concurrency, (webhook_keys, mail_ids)
    assert max(Counter([*webhook_keys, *mail_ids]).values()) <= 2
    assert len(set(webhook_keys)) == 20 and len(set(mail_ids)) == 10
    rows = deliveries(database_url, [w.warning_id for w in warnings])
    assert len(rows) == 30 and {status for status, _, _ in rows.values()} == {"delivered"}


def test_two_dispatchers_sharing_the_group_and_a_replay_deliver_each_warning_exactly_once(
        kafka_bootstrap: str, database_url: str, fresh_topic: Callable[..., str], webhook: WebhookReceiver,
        mailbox: Mailbox) -> None:
    """A second dispatcher joining mid-stream takes partitions over while the first is still on their
    warnings (a rebalance overlap), and every warning is then published again (a replay): nobody was
    killed, so every receiver sees each key exactly once, and every row is delivered after one attempt."""
    topic = fresh_topic("warnings")
    crisis = "cyclone-" + uuid.uuid4().hex[:6]
    webhook.delay_s = 0.01
    warnings = [make_warning(add_citizen(database_url, [("webhook", webhook.url(f"/pair/{i}"))]), crisis, seq=i)
                for i in range(120)]
    publish(kafka_bootstrap, topic, warnings)
    settings = settings_for(kafka_bootstrap, database_url, mailbox, dispatch_concurrency=8)
    group = "dispatch-" + uuid.uuid4().hex[:8]
    running: list[tuple[threading.Event, threading.Thread]] = []
    registries: list[CollectorRegistry] = []

    def start() -> None:
        registries.append(registry := CollectorRegistry())
        dispatcher = Dispatcher(settings, DispatchMetrics(registry), source_topic=topic, group_id=group, batch_size=20)
        stop = threading.Event()
        thread = threading.Thread(target=dispatcher.run, args=(stop,), daemon=True)
        thread.start()
        running.append((stop, thread))

    try:
        start()
        wait_for(lambda: len(webhook.keys()) >= 10, what="the first dispatcher under way")
        start()
        wait_for(lambda: set(webhook.keys()) >= {w.warning_id for w in warnings}, timeout_s=120, what="every warning")

        def skipped() -> float:
            return sum(r.get_sample_value("crisiswatch_dispatch_warnings_total", {"outcome": "skipped"}) or 0.0
                       for r in registries)

        def settled() -> bool:
            rows_now = deliveries(database_url, [w.warning_id for w in warnings])
            return len(rows_now) == len(warnings) and {v[0] for v in rows_now.values()} == {"delivered"}

        wait_for(settled, what="every row delivered")
        time.sleep(1.0)  # the first dispatcher's batches read again after the rebalance are done with
        before = skipped()  # warnings read again after the rebalance, if any
        publish(kafka_bootstrap, topic, warnings)  # the replay
        wait_for(lambda: skipped() >= before + len(warnings), timeout_s=120, what="the replay to be read and skipped")
        time.sleep(0.5)  # anything sent twice would have arrived by now
    finally:
        for stop, _ in running:
            stop.set()
        for _, thread in running:
            thread.join(30)
            assert not thread.is_alive()
    counts = Counter(webhook.keys())
    assert set(counts) == {w.warning_id for w in warnings} and set(counts.values()) == {1}
    rows = deliveries(database_url, [w.warning_id for w in warnings])
    assert {v[:2] for v in rows.values()} == {("delivered", 1)}
