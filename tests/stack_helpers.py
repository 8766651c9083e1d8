"""The set-up the integration and e2e tests share: a database of a test's own, ``crisiswatch <verb>``
processes on a broker, a service run in a thread, a webhook on loopback, ``crisiswatch up`` read until
its banner, and the waits and counts around them.

One place, so that every test starts a stack the way production does (the same settings, the same
order of starting and stopping) and a change to how a stack starts is made once, not in every module.
What a test asserts stays in the test; nothing here asserts on what the system did, only that the
set-up itself came up (a process healthy, a thread stopped, a banner printed) in generous time."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol, TypeVar

import psycopg
from prometheus_client import CollectorRegistry
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.types.json import Jsonb

from consumers.dispatch import Dispatcher
from consumers.kafka_io import Message, read_topic
from consumers.sink import PostgresSink, SinkTopics, TableSpec
from pipeline import topics
from pipeline.domain.accountability import COUNT_NAMES, COUNTS_SQL
from pipeline.domain.delivery import IDEMPOTENCY_HEADER
from pipeline.domain.ids import warning_id
from pipeline.embedded import EmbeddedBroker, apply_migrations, ensure_topics, free_port
from pipeline.metrics import DispatchMetrics, SinkMetrics
from pipeline.settings import Secret, Settings
from pipeline.testing import VerbProcess
from producers.publisher import Publisher
from schemas import Crisis, Warning, decode
from schemas.models import WarningKind

# --- ids, waits, counts ---------------------------------------------------------------------------------


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def wait_until(condition: Callable[[], Any], timeout_s: float = 60.0, what: str = "condition", every_s: float = 0.2) -> Any:
    """Poll ``condition`` until it returns something true, and return that; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every_s)
    return result


def waiter(default_timeout_s: float, every_s: float = 0.2) -> Callable[..., Any]:
    """:func:`wait_until` with another default deadline: a module keeps the patience its tests were written with."""

    def wait(condition: Callable[[], Any], timeout_s: float = default_timeout_s, what: str = "condition") -> Any:
        return wait_until(condition, timeout_s, what, every_s)

    return wait


def count(url: str, query: str, *params: Any) -> int:
    """The single number ``query`` selects (``SELECT count(*) ...``)."""
    with psycopg.connect(url) as conn:
        row = conn.execute(query.encode(), params).fetchone()
        return int(row[0]) if row else 0


def rows(url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return list(conn.execute(query, params).fetchall())


# --- PostgreSQL -----------------------------------------------------------------------------------------


def new_database(database_url: str, prefix: str, migrate: bool = True) -> str:
    """A database of its own on the session's server (migrated unless ``migrate`` is false); its URL.
    For what reads a whole database (restore, the sweeps, the overview, the retention purge), so that no
    other test's rows are in it."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = make_conninfo(database_url, dbname=name)
    if migrate:
        apply_migrations(url)
    return url


def insert(url: str, spec: TableSpec, row: tuple[Any, ...]) -> None:
    """A row as the sink writes it (``spec``: its table, e.g. ``consumers.sink.WARNINGS_TABLE``), for a test
    whose database has no sink."""
    values = tuple(Jsonb(v) if c in spec.jsonb and v is not None else v for c, v in zip(spec.columns, row, strict=True))
    query = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
        sql.Identifier(spec.name), sql.SQL(", ").join(map(sql.Identifier, spec.columns)),
        sql.SQL(", ").join(sql.Placeholder() * len(spec.columns)))
    with psycopg.connect(url) as conn:
        conn.execute(query, values)


# --- services in a thread of the test process -------------------------------------------------------------


class Service(Protocol):
    def run(self, stop: threading.Event) -> Any: ...


@contextmanager
def running(service: Service) -> Iterator[threading.Event]:
    """``service.run(stop)`` in a daemon thread for the ``with`` block; stopped after it, and it must stop."""
    stop = threading.Event()
    thread = threading.Thread(target=service.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive(), f"{type(service).__name__} did not stop"


def make_sink(kafka_bootstrap: str, url: str, sink_topics: SinkTopics, registry: CollectorRegistry,
              **kwargs: Any) -> PostgresSink:
    """The sink on ``sink_topics``, in a consumer group of its own (a replay starts from the beginning)."""
    settings = kwargs.pop("settings", Settings(kafka_bootstrap=kafka_bootstrap, database_url=Secret(url)))
    return PostgresSink(settings, SinkMetrics(registry), sink_topics=sink_topics, group_id=uid("sink-test"), **kwargs)


def dispatching(settings: Settings, source_topic: str | None = None) -> Any:
    """The dispatcher running in a thread (``with dispatching(...):``), in a consumer group of its own."""
    metrics, group_id = DispatchMetrics(CollectorRegistry()), uid("dispatch")
    if source_topic is None:
        return running(Dispatcher(settings, metrics, group_id=group_id))
    return running(Dispatcher(settings, metrics, source_topic=source_topic, group_id=group_id))


def dead_letters(kafka_bootstrap: str, source_topic: str, expected: int) -> list[Message]:
    """The dead letters from ``source_topic``, once there are ``expected`` of them."""

    def ours(seen: list[Message]) -> list[Message]:
        return [m for m in seen if dict(m.headers).get(topics.DLQ_SOURCE_TOPIC_HEADER) == source_topic.encode()]

    return ours(read_topic(kafka_bootstrap, topics.DLQ, lambda seen: len(ours(seen)) >= expected))


# --- accountability --------------------------------------------------------------------------------------


def warning_for(citizen_id: str, crisis: Crisis, kind: WarningKind, at: datetime, seq: int = 0) -> Warning:
    """The warning the worker would send ``citizen_id`` about ``crisis`` (its id as the worker derives it)."""
    return Warning(warning_id(citizen_id, crisis.crisis_id, crisis.version, kind, seq), citizen_id, crisis.crisis_id,
                   crisis.version, kind, crisis.severity, crisis.title, "Move to high ground",
                   2.5 if kind == "near" else 0.0, -6.2, 106.8, at, at, crisis.country_codes)


def sql_counts(database_url: str, crisis_id: str) -> dict[str, int]:
    """A crisis's accountability counts recomputed with SQL from the warnings, deliveries and acks stored."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(COUNTS_SQL, {"crisis_id": crisis_id}).fetchone()
    assert row is not None
    return dict(zip(COUNT_NAMES, (int(v) for v in row), strict=True))


def stored_counts(database_url: str, crisis_id: str) -> dict[str, int] | None:
    """The crisis's status as the sink stored it from ``crisis-status`` (None before the first)."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(f"SELECT {', '.join(COUNT_NAMES)} FROM crisis_status WHERE crisis_id = %s",
                           (crisis_id,)).fetchone()
    return None if row is None else dict(zip(COUNT_NAMES, (int(v) for v in row), strict=True))


# --- a webhook on loopback ------------------------------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


class WebhookReceiver:
    """Records every POST. Answers 500 on the paths in ``failing``; else ``failures[path]`` (a list of
    statuses, consumed in order) first; else 200, after ``delay_s``."""

    def __init__(self, failing: Iterable[str] = ()) -> None:
        self.received: list[Received] = []
        self.failures: dict[str, list[int]] = {}
        self.failing = set(failing)
        self.delay_s = 0.0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if receiver.delay_s:
                    time.sleep(receiver.delay_s)
                with receiver.lock:
                    receiver.received.append(Received(self.path, dict(self.headers.items()), body, time.monotonic()))
                    pending = receiver.failures.get(self.path)
                    status = 500 if self.path in receiver.failing else (pending.pop(0) if pending else 200)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}{path}"

    def for_path(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.path == path]

    def keys(self, path: str | None = None) -> list[str]:
        """The Idempotency-Keys received (on ``path`` only, if given), in order."""
        with self.lock:
            return [r.headers.get(IDEMPOTENCY_HEADER, "") for r in self.received if path is None or r.path == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- crisiswatch processes on a broker ------------------------------------------------------------------

PORT_SETTINGS = {"worker": "CRISISWATCH_WORKER_WEB_PORT", "sink": "CRISISWATCH_SINK_METRICS_PORT",
                 "accountability": "CRISISWATCH_ACCOUNTABILITY_WEB_PORT"}
# A worker's batches wait 20 ms, not the production default: the tests' check-ins come a few at a time.
WORKER_ENV = {"CRISISWATCH_BATCH_WAIT_S": "0.02"}
# The accountability process publishes its statuses often; the dispatcher gives up and retries fast.
ACCOUNTABILITY_ENV = {"CRISISWATCH_STATUS_INTERVAL_S": "0.5", "CRISISWATCH_DISPATCH_MAX_ATTEMPTS": "2",
                      "CRISISWATCH_DISPATCH_RETRY_INITIAL_S": "0.05", "CRISISWATCH_DISPATCH_RETRY_MAX_S": "0.1",
                      "CRISISWATCH_WEBHOOK_SECRET": "test-secret"}

S = TypeVar("S", bound="ProcessStack")


class ProcessStack:
    """``crisiswatch <verb>`` child processes (``worker``, ``accountability``, ``sink``) on one broker and
    one database (none for a worker alone), exactly as production runs them, with a publisher. :meth:`start` starts them in the
    order of ``verbs`` (the sink first, so that nothing published is missed by it) and :meth:`close`
    stops them in the reverse order, then the broker if the stack owns one (:meth:`on_own_broker`)."""

    warnings_timeout_s = 60.0

    def __init__(self, bootstrap: str, database_url: str | None, data_dir: Path, verbs: Sequence[str] = ("sink", "worker"),
                 env: Mapping[str, str] | None = None, broker: EmbeddedBroker | None = None) -> None:
        ports = {verb: free_port() for verb in verbs}
        database = {} if database_url is None else {"CRISISWATCH_DATABASE_URL": database_url}
        self.settings = Settings.from_env({
            "CRISISWATCH_KAFKA_BOOTSTRAP": bootstrap, **database, "CRISISWATCH_DATA_DIR": str(data_dir),
            **{PORT_SETTINGS[verb]: str(port) for verb, port in ports.items()}, **(env or {})})
        self.env = {**os.environ, **self.settings.env()}
        self.processes = {verb: VerbProcess(verb, self.env, data_dir / f"{verb}.log", port) for verb, port in ports.items()}
        self.publisher = Publisher(self.settings)
        self.database_url = database_url
        self.broker = broker

    @classmethod
    def on_own_broker(cls: type[S], database_url: str | None, data_dir: Path, extra_topics: Iterable[str] = (),
                      partitions: int = 4, **kwargs: Any) -> S:
        """A stack on an embedded broker of its own, its topics created as ``crisiswatch up`` does."""
        data_dir.mkdir(parents=True, exist_ok=True)
        broker = EmbeddedBroker.start(log_path=data_dir / "broker.log")
        try:
            ensure_topics(broker.bootstrap, partitions, extra=extra_topics)
            return cls(broker.bootstrap, database_url, data_dir, broker=broker, **kwargs)
        except BaseException:
            broker.stop()
            raise

    @property
    def worker(self) -> VerbProcess:
        return self.processes["worker"]

    @property
    def sink(self) -> VerbProcess:
        return self.processes["sink"]

    @property
    def accountability(self) -> VerbProcess:
        return self.processes["accountability"]

    def start(self) -> None:
        for process in self.processes.values():
            process.start()

    def close(self) -> None:
        self.publisher.close()
        for process in reversed(self.processes.values()):
            process.stop()
        if self.broker is not None:
            self.broker.stop()

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``crisiswatch <args>`` with this stack's settings, run to its end."""
        return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=self.env, capture_output=True,
                              text=True, timeout=120, check=False)

    def another_worker(self, data_dir: Path) -> VerbProcess:
        """A second worker in the same consumer group, with a port and a data directory of its own (not started)."""
        port = free_port()
        return VerbProcess("worker", {**self.worker.env, "CRISISWATCH_WORKER_WEB_PORT": str(port),
                                      "CRISISWATCH_DATA_DIR": str(data_dir)}, data_dir / "worker-2.log", port)

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

    def warnings(self, prefix: str, until: Callable[[list[Warning]], bool], timeout_s: float | None = None) -> list[Warning]:
        """The warnings on ``warnings`` to citizens whose id starts with ``prefix``, read until ``until`` holds
        (or ``timeout_s``, by default :attr:`warnings_timeout_s`, has passed)."""

        def mine(messages: list[Message]) -> list[Warning]:
            return [w for w in (decode(m.value, Warning) for m in messages) if w.citizen_id.startswith(prefix)]

        wait_s = self.warnings_timeout_s if timeout_s is None else timeout_s
        return mine(read_topic(self.settings.kafka_bootstrap, "warnings", lambda seen: until(mine(seen)), wait_s))


def started(stack: S) -> Iterator[S]:
    """For a fixture, ``yield from started(stack)``: its processes started, and the stack closed after
    (also when one of them did not start)."""
    try:
        stack.start()
        yield stack
    finally:
        stack.close()


# --- `crisiswatch up` as a user runs it -------------------------------------------------------------------


def bare_env(**settings: str) -> dict[str, str]:
    """This process's environment without any ``CRISISWATCH_`` setting, plus ``settings``."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("CRISISWATCH_")}, **settings}


def start_up(args: Sequence[str], env: Mapping[str, str], timeout_s: float, cwd: Path | None = None
             ) -> tuple[subprocess.Popen[str], str]:
    """``crisiswatch up <args>`` started, and its output read until the banner is complete."""
    process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "up", *args], cwd=cwd, env=dict(env), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    banner, deadline = "", time.monotonic() + timeout_s
    assert process.stdout is not None
    while "Ctrl-C stops everything." not in banner:
        line = process.stdout.readline()
        assert line or process.poll() is None, f"up exited: {banner}"
        banner += line
        assert time.monotonic() < deadline, banner
    return process, banner


def banner_token(banner: str, role: str) -> str:
    """The token the banner prints for ``role`` (``ingest``, ``operator``)."""
    found = re.search(rf"{role}\s+(\S+)$", banner, re.M)
    assert found is not None, banner
    return found.group(1)
