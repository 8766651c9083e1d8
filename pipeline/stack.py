"""The whole stack on one machine: embedded servers where nothing is configured, then the
processes (worker, accountability, sink + router, dispatcher, ingest API, optionally feed pollers) as supervised children.

Used by ``crisiswatch up`` and ``crisiswatch demo``. Children get the settings through their
environment (``Settings.env()``), log to ``<data dir>/logs/<name>.log``, and are stopped with
SIGTERM (then SIGKILL after a grace period) when the stack stops, before the servers.

Supervision (:meth:`Stack.supervise`, called by ``up`` twice a second): every part that dies is
started again, with one line saying so, and the stack stops with one line naming the part and its
log when a restart fails or a part dies :class:`RestartLimit` times within its window, so the
stack is never silently half-running and never hangs.

- The embedded broker keeps everything in memory: it is started again on the same port (so the
  clients reconnect by themselves), its topics are created, :meth:`Stack._restore_broker` refills
  it from PostgreSQL, and the worker and the sink are restarted: their consumer groups' offsets and
  the worker's state changelog went with the old broker. The ingest API and the feed pollers only
  produce; their producers reconnect.
- Embedded PostgreSQL is started again on the same data directory; the clients reconnect (the sink
  waits out the outage and retries). Should its address change, the children using it restart.
- A child that dies is started again and awaited until its ``/health`` is 200.

Ports: a port the user set (its variable is in the environment) is used or, when busy, is an error
naming it and the variable, so a documented address never silently reaches another program; an unset
port whose default is busy is chosen by the kernel, and the banner says so. Everything listens on
``CRISISWATCH_API_HOST``.

The generated API tokens are kept in the data directory (:mod:`pipeline.tokens`), and what runs
where in its state file (:mod:`pipeline.state_file`), which the client verbs read.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Final

from pipeline import state_file
from pipeline.accountability_app import internal_topics as accountability_topics
from pipeline.app import internal_topics as worker_topics
from pipeline.embedded import (
    EmbeddedBroker,
    EmbeddedError,
    EmbeddedPostgres,
    apply_migrations,
    die_with_parent,
    ensure_topics,
    free_port,
)
from pipeline.lag import STACK_GROUPS, group_lags
from pipeline.restore import RestoreError, RestoreReport, restore_if_needed
from pipeline.settings import Secret, Settings
from pipeline.tokens import TokenFileError, with_kept_tokens

START_TIMEOUT_S: Final = 60.0
DRAIN_TIMEOUT_S: Final = 30.0  # how long a stop waits for the pipeline to finish what was acknowledged
INPUT_CHILDREN: Final = frozenset({"api", "feeds"})  # stopped first: nothing new comes in while the rest drains
FEEDS_METRICS_PORT: Final = 9103


def internal_topics() -> list[str]:
    """The Faust apps' own topics (changelogs, the re-keyed stream), created with the core ones."""
    return [*worker_topics(), *accountability_topics()]


class StackError(RuntimeError):
    """A part of the stack could not be started or kept running; the message (one line) says which
    and where its log is."""


@dataclass(frozen=True, slots=True)
class RestartLimit:
    """A part that dies ``times`` times within ``window_s`` seconds is not started again."""

    times: int = 3
    window_s: float = 60.0


class RestartBudget:
    """Counts each part's deaths over a sliding window (:class:`RestartLimit`), on an injected clock."""

    def __init__(self, limit: RestartLimit = RestartLimit(), clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.clock = clock
        self._deaths: dict[str, list[float]] = defaultdict(list)

    def died(self, part: str) -> bool:
        """Record a death of ``part``; whether it may be started again."""
        now = self.clock()
        recent = [t for t in self._deaths[part] if now - t < self.limit.window_s]
        recent.append(now)
        self._deaths[part] = recent
        return len(recent) < self.limit.times

    def deaths(self, part: str) -> int:
        now = self.clock()
        return sum(1 for t in self._deaths[part] if now - t < self.limit.window_s)


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # servers set it too: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


@dataclass
class Child:
    name: str
    argv: list[str]
    health_url: str | None
    log_path: Path
    restart_with_broker: bool = False  # reads Kafka in a consumer group: its place is lost with an in-memory broker
    uses_database: bool = False
    process: subprocess.Popen[bytes] | None = None
    log_file: IO[bytes] | None = None

    def start(self, env: dict[str, str]) -> None:
        self.log_file = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", *self.argv], env=env, stdout=self.log_file,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def healthy(self) -> bool:
        if self.health_url is None:
            return self.alive()
        try:
            with urllib.request.urlopen(self.health_url, timeout=1.0) as response:  # noqa: S310 - loopback URL we built
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def terminate(self) -> None:
        """Ask it to stop (SIGTERM) without waiting; :meth:`stop` waits."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, grace_s: float = 15.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None
        return self.process.returncode


def _reason(exc: BaseException) -> str:
    """One line: our own errors say it all; anything else also needs its type."""
    text = str(exc) if isinstance(exc, EmbeddedError | RestoreError) else repr(exc)
    return " ".join(text.split())


def _say_on_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class Stack:
    settings: Settings
    feeds_config: Path | None = None
    broker: EmbeddedBroker | None = None
    postgres: EmbeddedPostgres | None = None
    children: list[Child] = field(default_factory=list)
    tokens_file: Path | None = None  # where the generated tokens are kept; None when both are configured
    restored: RestoreReport | None = None  # what was republished from PostgreSQL into a broker that lacked it
    restart_limit: RestartLimit = RestartLimit()
    say: Callable[[str], None] = _say_on_stderr  # one line per restart
    clock: Callable[[], float] = time.monotonic
    budget: RestartBudget = field(init=False)
    chosen_ports: dict[str, tuple[int, int]] = field(default_factory=dict)  # variable -> (busy default, chosen)
    _configured_tokens: tuple[bool, bool, bool] = field(init=False)

    def __post_init__(self) -> None:
        self.budget = RestartBudget(self.restart_limit, self.clock)
        self._configured_tokens = (bool(self.settings.ingest_token), bool(self.settings.operator_token),
                                   bool(self.settings.admin_token))

    @property
    def logs(self) -> Path:
        return self.settings.data_dir / "logs"

    @property
    def broker_log(self) -> Path:
        return self.logs / "broker.log"

    def _port(self, variable: str, wanted: int) -> int:
        """``wanted`` when it is free; an error when the user set it; else a port the kernel chooses."""
        host = self.settings.api_host
        if port_free(host, wanted):
            return wanted
        if variable in self.settings.configured:
            raise StackError(f"port {wanted} on {host} ({variable}) is in use by another program; stop it, "
                             f"or set {variable} to a free port (unset, a free one is chosen)")
        chosen = free_port(host)
        self.chosen_ports[variable] = (wanted, chosen)
        return chosen

    def _env(self) -> dict[str, str]:
        return {**os.environ, **self.settings.env()}

    def _ensure_topics(self) -> None:
        s = self.settings
        ensure_topics(s.kafka_bootstrap, s.partitions, s.kafka_client_options(), extra=internal_topics())

    def start_servers(self) -> None:
        s = self.settings  # ports first: a busy port the user set stops `up` before anything starts
        s = replace(s, api_port=self._port("CRISISWATCH_API_PORT", s.api_port),
                    worker_web_port=self._port("CRISISWATCH_WORKER_WEB_PORT", s.worker_web_port),
                    accountability_web_port=self._port("CRISISWATCH_ACCOUNTABILITY_WEB_PORT", s.accountability_web_port),
                    sink_metrics_port=self._port("CRISISWATCH_SINK_METRICS_PORT", s.sink_metrics_port),
                    dispatch_metrics_port=self._port("CRISISWATCH_DISPATCH_METRICS_PORT", s.dispatch_metrics_port))
        s.data_dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        if s.embedded_kafka:
            self.broker = EmbeddedBroker.start(log_path=self.broker_log)
            s = replace(s, kafka_bootstrap=self.broker.bootstrap)
        ensure_topics(s.kafka_bootstrap, s.partitions, s.kafka_client_options(), extra=internal_topics())
        if s.embedded_database:
            self.postgres = EmbeddedPostgres.start(s.data_dir)
            s = replace(s, database_url=Secret(self.postgres.url))
        apply_migrations(s.database_url.get())
        try:
            s, self.tokens_file = with_kept_tokens(s)
        except TokenFileError as exc:
            raise StackError(str(exc)) from None
        self.settings = s
        try:
            self.restored = self._restore_broker()
        except RestoreError as exc:
            raise StackError(f"recovery from PostgreSQL failed: {exc}") from exc

    def _restore_broker(self) -> RestoreReport | None:
        """PostgreSQL, the system of record, refills a broker that lacks the active crises, the
        citizens and the citizens' last known states (the embedded broker starts empty, also after its
        restart); called once the topics exist and before any worker runs. What was republished, or
        None when the broker held the data already or there was nothing to restore."""
        return restore_if_needed(self.settings)

    def _make_children(self) -> list[Child]:
        s = self.settings
        host = s.api_host
        children = [
            Child("worker", ["worker"], f"http://{host}:{s.worker_web_port}/health", self.logs / "worker.log",
                  restart_with_broker=True),
            Child("accountability", ["accountability"], f"http://{host}:{s.accountability_web_port}/health",
                  self.logs / "accountability.log", restart_with_broker=True),
            Child("sink", ["sink"], f"http://{host}:{s.sink_metrics_port}/health", self.logs / "sink.log",
                  restart_with_broker=True, uses_database=True),
            Child("dispatch", ["dispatch"], f"http://{host}:{s.dispatch_metrics_port}/health", self.logs / "dispatch.log",
                  restart_with_broker=True, uses_database=True),
            Child("api", ["api"], f"http://{host}:{s.api_port}/health", self.logs / "api.log"),
        ]
        if self.feeds_config is not None:
            feeds_port = self._port("feeds --metrics-port", FEEDS_METRICS_PORT)
            children.append(Child("feeds", ["feeds", "--config", str(self.feeds_config), "--metrics-port",
                                           str(feeds_port), "--metrics-host", host], f"http://{host}:{feeds_port}/health",
                                  self.logs / "feeds.log"))
        return children

    def start_processes(self, timeout_s: float = START_TIMEOUT_S) -> None:
        self.children = self._make_children()
        env = self._env()
        for child in self.children:
            child.start(env)
        self._await_healthy(self.children, timeout_s, restart_dead=False)
        self.write_state()

    def state(self) -> state_file.StackState:
        """What runs where, for :mod:`pipeline.state_file`."""
        s = self.settings
        servers = [state_file.Part("kafka", s.kafka_bootstrap, None, self.broker.process.pid if self.broker else None,
                                   str(self.broker_log) if self.broker else ""),
                   state_file.Part("postgresql", _redact(s.database_url.get()), None, None,
                                   str(self.postgres.log_path) if self.postgres else "")]
        children = [state_file.Part(c.name, c.health_url.removesuffix("/health") if c.health_url else "", c.health_url,
                                    c.process.pid if c.process else None, str(c.log_path)) for c in self.children]
        return state_file.describe(s, [*servers, *children], kafka_embedded=self.broker is not None,
                                   database_embedded=self.postgres is not None, tokens_file=self.tokens_file,
                                   chosen_ports=self.chosen_ports)

    def write_state(self) -> None:
        """Record what runs where; a stack that cannot write it runs on (the client verbs then need
        the environment), with one line saying so."""
        try:
            state_file.write(self.state(), self.settings.data_dir)
        except OSError as exc:
            self.say(f"crisiswatch up: could not write {state_file.state_path(self.settings.data_dir)}: "
                     f"{exc.strerror or exc}; other verbs will not find this stack by themselves")

    def _await_healthy(self, children: Sequence[Child], timeout_s: float, *, restart_dead: bool) -> None:
        """Wait until every one of ``children`` answers ``/health`` with 200. One that dies meanwhile
        ends the wait with a :class:`StackError` or, with ``restart_dead``, is restarted within the
        restart budget. A server dying meanwhile ends the wait early: :meth:`supervise` sees to it."""
        deadline = self.clock() + timeout_s
        pending = list(children)
        while pending:
            for child in list(pending):
                if not child.alive():
                    if not restart_dead:
                        raise StackError(f"{child.name} exited with code {child.exit_code}; see {child.log_path}")
                    self._count_death(child.name, f"{child.name} exited with code {child.exit_code}", child.log_path)
                    self.say(f"crisiswatch up: {child.name} exited with code {child.exit_code} while starting; "
                             f"starting it again (see {child.log_path})")
                    child.stop()
                    child.start(self._env())
                elif child.healthy():
                    pending.remove(child)
            if not pending:
                return
            if (server := self._dead_server()) is not None:
                if not restart_dead:
                    log_path = self.broker_log if server == "broker" else self.postgres.log_path if self.postgres else self.logs
                    raise StackError(f"the embedded {server} exited while the stack was starting; see {log_path}")
                return
            if self.clock() > deadline:
                names = ", ".join(f"{c.name} (see {c.log_path})" for c in pending)
                raise StackError(f"not healthy {timeout_s:.0f}s after a start: {names}")
            time.sleep(0.2)

    def start(self) -> None:
        try:
            self.start_servers()
            self.start_processes()
        except BaseException:
            self.stop()
            raise

    # -- supervision -------------------------------------------------------------------------------

    def supervise(self) -> None:
        """Look at every part once and start again what died. Raises :class:`StackError` (one line,
        naming the part and its log) when a part cannot be kept running."""
        while (dead := self._dead_server()) is not None:
            if dead == "broker":
                self._recover_broker()
            else:
                self._recover_postgres()
        for child in self.children:
            if not child.alive():
                self._recover_child(child)

    def _dead_server(self) -> str | None:
        if self.broker is not None and not self.broker.alive():
            return "broker"
        if self.postgres is not None and not self.postgres.alive():
            return "postgresql"
        return None

    def _count_death(self, part: str, what: str, log_path: Path) -> None:
        if not self.budget.died(part):
            limit = self.restart_limit
            raise StackError(f"stopped: {what}, {limit.times} times within {limit.window_s:.0f}s; see {log_path}")

    def _recover_broker(self) -> None:
        assert self.broker is not None
        dead, log_path = self.broker, self.broker_log
        what = f"the embedded broker exited with code {dead.process.returncode}"
        self._count_death("broker", what, log_path)
        started = self.clock()
        affected = [c for c in self.children if c.restart_with_broker]
        self.say(f"crisiswatch up: {what}; restarting it on {dead.bootstrap} with its topics, then "
                 f"{' and '.join(c.name for c in affected) or 'nothing else'} (see {log_path})")
        for child in affected:
            child.terminate()
        for child in affected:
            child.stop(grace_s=5.0)  # their consumer groups and the worker's changelog are gone anyway
        try:
            self.broker = EmbeddedBroker.start(port=dead.port, log_path=log_path)
            self._ensure_topics()
            restored = self._restore_broker()
        except Exception as exc:  # anything: the broker cannot be kept running
            raise StackError(f"stopped: {what} and could not be restarted on port {dead.port}: {_reason(exc)}; "
                             f"see {log_path}") from exc
        self._start_again(affected)
        self.say(f"crisiswatch up: the embedded broker is running again on {dead.bootstrap} "
                 f"({self.clock() - started:.0f}s); {restored.line() if restored else 'nothing to restore from PostgreSQL'}")

    def _recover_postgres(self) -> None:
        assert self.postgres is not None
        pg, log_path = self.postgres, self.postgres.log_path
        what = "embedded PostgreSQL exited"
        self._count_death("postgresql", what, log_path)
        started, before = self.clock(), pg.url
        self.say(f"crisiswatch up: {what}; restarting it on {self.settings.data_dir / 'postgres'} (see {log_path})")
        try:
            url = pg.restart()
        except Exception as exc:
            raise StackError(f"stopped: {what} and could not be restarted: {_reason(exc)}; see {log_path}") from exc
        moved = [c for c in self.children if c.uses_database] if url != before else []
        if moved:
            self.settings = replace(self.settings, database_url=Secret(url))
            for child in moved:
                child.stop()
            self._start_again(moved)
        self.say(f"crisiswatch up: embedded PostgreSQL is running again ({self.clock() - started:.0f}s"
                 + (f"; restarted {' and '.join(c.name for c in moved)} for its new address)" if moved else ")"))

    def _recover_child(self, child: Child) -> None:
        what = f"{child.name} exited with code {child.exit_code}"
        self._count_death(child.name, what, child.log_path)
        self.say(f"crisiswatch up: {what}; restarting it (see {child.log_path})")
        child.stop()
        self._start_again([child])

    def _start_again(self, children: Sequence[Child]) -> None:
        env = self._env()
        for child in children:
            child.start(env)
        self._await_healthy(children, START_TIMEOUT_S, restart_dead=True)
        self.write_state()  # new pids

    def stop(self, drain_s: float = DRAIN_TIMEOUT_S) -> None:
        """Stop the parts that take input (API, feed pollers), let the pipeline finish what they
        acknowledged (:meth:`drain`, at most ``drain_s``), then stop the rest and the servers."""
        state_file.remove(self.settings.data_dir)  # clients stop finding it as soon as it stops
        inputs = [c for c in self.children if c.name in INPUT_CHILDREN]
        for child in reversed(inputs):
            child.stop()
        if drain_s > 0:
            self.drain(drain_s)
        for child in reversed(self.children):
            if child not in inputs:
                child.stop()
        if self.postgres is not None:
            self.postgres.stop()
            self.postgres = None
        if self.broker is not None:
            self.broker.stop()
            self.broker = None

    def drain(self, timeout_s: float) -> bool:
        """Wait until every consumer group of the stack has committed up to the end of what it reads:
        every check-in the API answered 202 for is geofenced and in PostgreSQL, and so is every warning.
        With the embedded broker, which keeps nothing once stopped, this is what makes an orderly stop
        lose nothing acknowledged. Returns whether it drained; says in one line if it could not."""
        if not self.children or (self.broker is not None and not self.broker.alive()):
            return False  # nothing started that could have taken anything in, or the broker is gone
        if not all(c.alive() for c in self.children if c.name not in INPUT_CHILDREN):
            return False  # a part that would drain is down: waiting would change nothing
        deadline = self.clock() + timeout_s
        lags: dict[str, int] = {}
        while True:
            try:
                lags = group_lags(self.settings.kafka_bootstrap, STACK_GROUPS, self.settings.kafka_client_options())
            except Exception as exc:  # Kafka away: nothing to wait for
                self.say(f"crisiswatch up: could not drain the pipeline before stopping: {_reason(exc)}")
                return False
            if not any(lags.values()):
                return True
            if self.clock() > deadline:
                behind = ", ".join(f"{group} {lag}" for group, lag in sorted(lags.items()) if lag)
                self.say(f"crisiswatch up: stopping with messages not yet processed after {timeout_s:.0f}s: {behind}")
                return False
            time.sleep(0.5)

    def banner(self) -> str:
        s = self.settings
        host = s.api_host
        lines = ["crisiswatch is running", ""]
        kafka = f"{s.kafka_bootstrap}" + (" (embedded Tansu broker, in memory)" if self.broker else "")
        db = _redact(s.database_url.get()) + (" (embedded PostgreSQL)" if self.postgres else "")
        lines += [f"  kafka        {kafka}", f"  postgresql   {db}",
                  f"  ingest API   http://{host}:{s.api_port}   (OpenAPI: /docs, metrics: /metrics)",
                  f"  worker       http://{host}:{s.worker_web_port}/metrics   /health",
                  f"  accountability http://{host}:{s.accountability_web_port}/metrics   /health",
                  f"  sink         http://{host}:{s.sink_metrics_port}/metrics   /health",
                  f"  dispatch     http://{host}:{s.dispatch_metrics_port}/metrics   /health"]
        for child in self.children:
            if child.name == "feeds" and child.health_url:
                lines.append(f"  feeds        {child.health_url.removesuffix('/health')}/metrics")
        lines += [f"  logs         {self.logs}/"]
        for variable, (wanted, chosen) in self.chosen_ports.items():
            lines.append(f"  port {chosen} chosen for {variable}: {wanted} was busy (set it to choose one)")
        lines += [f"  state        {state_file.state_path(self.settings.data_dir)}   (`crisiswatch status` reads it)"]
        if self.restored is not None:
            lines += ["", f"  {self.restored.line()}"]
        if self.tokens_file is not None:
            ingest_set, operator_set, admin_set = self._configured_tokens
            lines += ["", f"  tokens (kept in {self.tokens_file}, reused by the next `crisiswatch up`):",
                      f"    ingest     {'(from CRISISWATCH_INGEST_TOKEN)' if ingest_set else s.ingest_token.get()}",
                      f"    operator   {'(from CRISISWATCH_OPERATOR_TOKEN)' if operator_set else s.operator_token.get()}",
                      f"    admin      {'(from CRISISWATCH_ADMIN_TOKEN)' if admin_set else s.admin_token.get()}"]
        lines += ["", "  try:  crisiswatch status   |   crisiswatch tail   |   crisiswatch simulate --duration 60",
                  "        curl -H \"Authorization: Bearer $(crisiswatch token ingest)\" "
                  f"-d '{_example_checkin()}' http://{host}:{s.api_port}/v1/checkins", "", "Ctrl-C stops everything."]
        return "\n".join(lines)


_redact = state_file.redact_url


def _example_checkin() -> str:
    body: dict[str, Any] = {"citizen_id": "c-1", "lat": -6.2, "lon": 106.8, "observed_at": "2026-01-01T00:00:00Z",
                            "source": "app"}
    return json.dumps(body, separators=(",", ":"))


@contextlib.contextmanager
def running_stack(settings: Settings, feeds_config: Path | None = None) -> Any:
    stack = Stack(settings, feeds_config)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()
