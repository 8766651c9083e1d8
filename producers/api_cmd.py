"""``crisiswatch api``: the ingest API as a process (uvicorn), publishing to the configured Kafka.

Running it from another process or thread (``crisiswatch up`` does one of these):

- child process: ``subprocess.Popen([sys.executable, "-m", "pipeline.cli", "api"], env={**os.environ,
  **settings.env()})``, stopped with SIGTERM (in-flight requests finish, the producer flushes,
  exit code 0); or ``multiprocessing.Process(target=serve, args=(settings,))``;
- thread: ``server = ApiServer(settings); thread = server.start_in_thread()``, then
  ``server.stop(); thread.join()``. ``server.started`` turns true once the socket listens.

Either way the server listens on ``settings.api_host:settings.api_port``, serves ``/metrics`` and
``/health`` itself (503, naming Kafka, while its health probe cannot reach the broker), and closes
the Kafka producer it created and stops the probe when it stops.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from types import FrameType

import uvicorn
from prometheus_client import CollectorRegistry

from pipeline.health import HealthProbe, probe_for
from pipeline.observability import setup_logging
from pipeline.settings import Settings
from producers.api import create_app
from producers.audit import PostgresAuditLog
from producers.citizen_store import PostgresCitizenStore
from producers.crisis_store import PostgresCrisisStore
from producers.erase import PostgresEraser
from producers.operator_page import PostgresOperatorStore
from producers.publisher import Publisher
from producers.reply_store import PostgresReplyStore

log = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 30


def utc_now() -> datetime:
    return datetime.now(UTC)


class ApiServer:
    """The ingest API on a uvicorn server; owns the Publisher it creates (a given one stays the caller's)."""

    def __init__(self, settings: Settings, *, publisher: Publisher | None = None,
                 registry: CollectorRegistry | None = None, clock: Callable[[], datetime] = utc_now,
                 probe: HealthProbe | None = None) -> None:
        self.settings = settings
        self._owns_publisher = publisher is None
        self.publisher = publisher or Publisher(settings, client_id="crisiswatch-api")
        self.registry = registry or CollectorRegistry()
        self.probe = probe or probe_for(replace(settings, kafka_bootstrap=self.publisher.bootstrap), registry=self.registry)
        # The public CAP feed reads the crises the sink stored; the connection opens on the first CAP request.
        self.crisis_store = PostgresCrisisStore(settings.database_url.get()) if settings.database_url else None
        # Replies, SOS and cases are checked against the registry on a connection of their own, opened likewise.
        self.reply_store = PostgresReplyStore(settings.database_url.get()) if settings.database_url else None
        # The operator's page reads the map, counts, latest warnings and cases on a third one.
        self.operator_store = PostgresOperatorStore(settings.database_url.get()) if settings.database_url else None
        # Privacy: the audit log, the registry's consent and minimised views, erasure (each its own connection).
        url = settings.database_url.get()
        self.audit_log = PostgresAuditLog(url) if url else None
        self.citizen_store = PostgresCitizenStore(url) if url else None
        self.eraser = PostgresEraser(url) if url else None
        app = create_app(settings, self.publisher, self.registry, clock, health=self.probe, crisis_store=self.crisis_store,
                         reply_store=self.reply_store, operator_store=self.operator_store, audit_log=self.audit_log,
                         citizen_store=self.citizen_store, eraser=self.eraser)
        config = uvicorn.Config(app, host=settings.api_host, port=settings.api_port, log_config=None, access_log=False,
                                server_header=False, lifespan="off", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
        self.server = uvicorn.Server(config)

    @property
    def started(self) -> bool:
        return bool(self.server.started)

    def run(self) -> None:
        """Serve until stopped (SIGINT/SIGTERM in the main thread, or :meth:`stop`); then close the producer."""
        _warn_about_tokens(self.settings)
        log.info("ingest API starting", extra={"host": self.settings.api_host, "port": self.settings.api_port,
                                               "kafka": self.publisher.bootstrap})
        self.probe.start()
        try:
            self.server.run()
        finally:
            self.probe.stop()
            if self._owns_publisher:
                self.publisher.close()
            for store in (self.crisis_store, self.reply_store, self.operator_store, self.audit_log, self.citizen_store,
                          self.eraser):
                if store is not None:
                    store.close()
            log.info("ingest API stopped")

    def start_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="ingest-api", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to GRACEFUL_SHUTDOWN_S), then return from :meth:`run`."""
        self.server.should_exit = True


def serve(settings: Settings) -> None:
    """Run the ingest API until SIGINT/SIGTERM (a convenient ``multiprocessing`` target)."""
    ApiServer(settings).run()


def _warn_about_tokens(settings: Settings) -> None:
    if not settings.admin_token:
        log.warning("CRISISWATCH_ADMIN_TOKEN is not set: the audit log (GET /v1/audit) and erasure "
                    "(DELETE /v1/citizens/{id}) refuse every request")
    if not settings.operator_token:
        log.warning("CRISISWATCH_OPERATOR_TOKEN is not set: POST /v1/crises refuses every request")
    if not settings.ingest_token and not settings.operator_token:
        log.warning("CRISISWATCH_INGEST_TOKEN is not set: the ingest endpoints refuse every request")
    elif not settings.ingest_token:
        log.warning("CRISISWATCH_INGEST_TOKEN is not set: the ingest endpoints accept only the operator token")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None, help="listen address [env CRISISWATCH_API_HOST, default 127.0.0.1]")
    parser.add_argument("--port", type=int, default=None, help="listen port [env CRISISWATCH_API_PORT, default 8080]")


class _Terminated(Exception):
    pass


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise _Terminated


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    if not settings.kafka_bootstrap:
        print("crisiswatch api: CRISISWATCH_KAFKA_BOOTSTRAP is not set; set it to your Kafka bootstrap servers, "
              "or run `crisiswatch up` to start everything embedded", file=sys.stderr)
        return 2
    settings = replace(settings, api_host=args.host or settings.api_host,
                       api_port=settings.api_port if args.port is None else args.port)
    setup_logging(settings.log_level, "api")
    # uvicorn handles SIGTERM while it serves (graceful shutdown), then re-raises it to the handler
    # that was there before: this one, so a stop by SIGTERM ends with exit code 0, not a kill.
    signal.signal(signal.SIGTERM, _terminate)
    with contextlib.suppress(_Terminated):
        serve(settings)
    return 0
