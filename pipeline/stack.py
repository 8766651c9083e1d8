"""The whole stack on one machine: embedded servers where nothing is configured, then the
processes (worker, sink + router, ingest API, optionally feed pollers) as supervised children.

Used by ``crisiswatch up`` and ``crisiswatch demo``. Children get the settings through their
environment (``Settings.env()``), log to ``<data dir>/logs/<name>.log``, and are stopped with
SIGTERM (then SIGKILL after a grace period) when the stack stops, before the servers.
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from pipeline.app import changelog_topic
from pipeline.embedded import (
    EmbeddedBroker,
    EmbeddedPostgres,
    apply_migrations,
    die_with_parent,
    ensure_topics,
    free_port,
)
from pipeline.restore import RestoreError, RestoreReport, restore_if_needed
from pipeline.settings import Settings

# The embedded broker (Tansu, memory storage) answers ListOffsets(latest) with the base offset of a
# partition's last record batch + 1, not the true end, when that batch holds several records. Faust's
# table recovery reads a changelog only up to that offset, so a restarted worker would recover stale
# citizen state. One record per batch keeps the reported end offset exact (tests/integration/
# test_embedded_broker.py shows both behaviours).
EMBEDDED_PRODUCER_MAX_BATCH_BYTES = 1


class StackError(RuntimeError):
    """A part of the stack could not start; the message says which and where its log is."""


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
    process: subprocess.Popen[bytes] | None = None
    log_file: IO[bytes] | None = None

    def start(self, env: dict[str, str]) -> None:
        self.log_file = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", *self.argv], env=env, stdout=self.log_file,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def healthy(self) -> bool:
        if self.health_url is None:
            return self.alive()
        try:
            with urllib.request.urlopen(self.health_url, timeout=1.0) as response:  # noqa: S310 - loopback URL we built
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

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
        return self.process.returncode


@dataclass
class Stack:
    settings: Settings
    feeds_config: Path | None = None
    broker: EmbeddedBroker | None = None
    postgres: EmbeddedPostgres | None = None
    children: list[Child] = field(default_factory=list)
    generated_tokens: bool = False
    restored: RestoreReport | None = None  # what was republished from PostgreSQL into a broker that lacked it

    @property
    def logs(self) -> Path:
        return self.settings.data_dir / "logs"

    def _port(self, wanted: int) -> int:
        return wanted if port_free(self.settings.api_host, wanted) else free_port()

    def start_servers(self) -> None:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        s = self.settings
        if s.embedded_kafka:
            self.broker = EmbeddedBroker.start(log_path=self.logs / "broker.log")
            s = replace(s, kafka_bootstrap=self.broker.bootstrap,
                        producer_max_batch_bytes=s.producer_max_batch_bytes or EMBEDDED_PRODUCER_MAX_BATCH_BYTES)
        ensure_topics(s.kafka_bootstrap, s.partitions, s.kafka_client_options(), extra=[changelog_topic()])
        if s.embedded_database:
            from pipeline.settings import Secret

            self.postgres = EmbeddedPostgres.start(s.data_dir)
            s = replace(s, database_url=Secret(self.postgres.url))
        apply_migrations(s.database_url.get())
        try:  # a broker that lost everything (the embedded one keeps nothing) gets it back from PostgreSQL
            self.restored = restore_if_needed(s)
        except RestoreError as exc:
            raise StackError(f"recovery from PostgreSQL failed: {exc}") from exc
        if not (s.ingest_token and s.operator_token):
            s = s.with_generated_tokens()
            self.generated_tokens = True
        self.settings = replace(s, api_port=self._port(s.api_port), worker_web_port=self._port(s.worker_web_port),
                                sink_metrics_port=self._port(s.sink_metrics_port))

    def start_processes(self, timeout_s: float = 60.0) -> None:
        s = self.settings
        host = s.api_host
        self.children = [
            Child("worker", ["worker"], f"http://{host}:{s.worker_web_port}/health", self.logs / "worker.log"),
            Child("sink", ["sink"], f"http://{host}:{s.sink_metrics_port}/health", self.logs / "sink.log"),
            Child("api", ["api"], f"http://{host}:{s.api_port}/health", self.logs / "api.log"),
        ]
        if self.feeds_config is not None:
            feeds_port = self._port(9103)
            self.children.append(Child("feeds", ["feeds", "--config", str(self.feeds_config), "--metrics-port",
                                              str(feeds_port)], f"http://{host}:{feeds_port}/health",
                                       self.logs / "feeds.log"))
        env = {**os.environ, **s.env()}
        for child in self.children:
            child.start(env)
        deadline = time.monotonic() + timeout_s
        pending = list(self.children)
        while pending:
            for child in list(pending):
                if not child.alive():
                    raise StackError(f"{child.name} exited with code {child.process.returncode if child.process else '?'};"
                                     f" see {child.log_path}")
                if child.healthy():
                    pending.remove(child)
            if time.monotonic() > deadline:
                names = ", ".join(c.name for c in pending)
                raise StackError(f"not healthy after {timeout_s:.0f}s: {names}; see {self.logs}")
            time.sleep(0.2)

    def start(self) -> None:
        try:
            self.start_servers()
            self.start_processes()
        except BaseException:
            self.stop()
            raise

    def dead_children(self) -> list[Child]:
        return [c for c in self.children if not c.alive()]

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()
        if self.postgres is not None:
            self.postgres.stop()
            self.postgres = None
        if self.broker is not None:
            self.broker.stop()
            self.broker = None

    def banner(self) -> str:
        s = self.settings
        host = s.api_host
        lines = ["crisiswatch is running", ""]
        kafka = f"{s.kafka_bootstrap}" + (" (embedded Tansu broker, in memory)" if self.broker else "")
        db = _redact(s.database_url.get()) + (" (embedded PostgreSQL)" if self.postgres else "")
        lines += [f"  kafka        {kafka}", f"  postgresql   {db}",
                  f"  ingest API   http://{host}:{s.api_port}   (OpenAPI: /docs, metrics: /metrics)",
                  f"  worker       http://{host}:{s.worker_web_port}/metrics   /health",
                  f"  sink         http://{host}:{s.sink_metrics_port}/metrics   /health"]
        for child in self.children:
            if child.name == "feeds" and child.health_url:
                lines.append(f"  feeds        {child.health_url.removesuffix('/health')}/metrics")
        lines += [f"  logs         {self.logs}/"]
        if self.restored is not None:
            lines += ["", f"  {self.restored.line()}"]
        if self.generated_tokens:
            lines += ["", "  tokens (generated for this run):",
                      f"    ingest     {s.ingest_token.get()}", f"    operator   {s.operator_token.get()}"]
        lines += ["", "  try:  crisiswatch tail   |   curl -H 'Authorization: Bearer <ingest token>' "
                  f"-d '{_example_checkin()}' http://{host}:{s.api_port}/v1/checkins", "", "Ctrl-C stops everything."]
        return "\n".join(lines)


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in creds else url
    return url


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
