"""``crisiswatch worker``: one Faust worker running the locate and crisis agents.

Run several (each with its own ``CRISISWATCH_WORKER_WEB_PORT`` on one host) to scale out, up to
the partition count of ``checkins``. Needs ``CRISISWATCH_KAFKA_BOOTSTRAP``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from pipeline.settings import Settings


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--web-port", type=int, default=None,
                        help="port of /metrics and /health [env: CRISISWATCH_WORKER_WEB_PORT]")
    parser.add_argument("--loglevel", default=None, help="log level [env: CRISISWATCH_LOG_LEVEL]")


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    if args.web_port is not None:
        settings = replace(settings, worker_web_port=args.web_port)
    if not settings.kafka_bootstrap:
        print("crisiswatch worker: CRISISWATCH_KAFKA_BOOTSTRAP is not set (or use `crisiswatch up`)", file=sys.stderr)
        return 2
    return run_worker(settings, (args.loglevel or settings.log_level).lower())


def run_worker(settings: Settings, loglevel: str = "info", app_id: str | None = None) -> int:
    from pipeline.app import APP_ID, create_app, internal_topics

    app_id = app_id or APP_ID
    return run_faust_app(settings, loglevel, internal_topics(app_id),
                         lambda registry, probe: create_app(settings, app_id=app_id, registry=registry, health=probe)[0])


def run_faust_app(settings: Settings, loglevel: str, own_topics: list[str],
                  build: Callable[[Any, Any], Any]) -> int:
    """Run a crisiswatch Faust app (the worker, the accountability process) as a service: its own topics
    created first with the configured partitions (a changelog must have as many as its table, a re-keyed
    stream as many as its keys are hashed over), a health probe behind its ``/health``, uvloop."""
    from prometheus_client import CollectorRegistry

    from pipeline.embedded import create_topics
    from pipeline.health import probe_for

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    create_topics(settings.kafka_bootstrap, own_topics, settings.partitions, settings.kafka_client_options())
    registry = CollectorRegistry()
    probe = probe_for(settings, kafka=True, registry=registry)
    app = build(registry, probe)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    probe.start()
    try:
        service_worker(app, loglevel).execute_from_commandline()
    finally:
        probe.stop()
    return 0


def service_worker(app: Any, loglevel: str) -> Any:
    """A Faust worker set up as a service: without the terminal spinner, and with repeated log lines
    rate-limited (:class:`~pipeline.observability.RepeatedLogFilter`: aiokafka logs every failed
    reconnect while the broker is away). At WARNING and above Faust installs the spinner's handler
    and sets the root logger to DEBUG, so every library's debug record is built and then dropped, on
    the hot path of a busy worker."""
    from faust.worker import Worker

    from pipeline.observability import limit_repeats

    class ServiceWorker(Worker):
        def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
            logger.setLevel(level)
            limit_repeats(logger)

    return ServiceWorker(app, loglevel=loglevel, quiet=True)
