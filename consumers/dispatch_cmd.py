"""``crisiswatch dispatch``: the dispatcher (consumer group ``crisiswatch-dispatch`` on ``warnings``)
with /metrics and /health. Several may run; SIGTERM or Ctrl-C finishes the round of attempts in hand
and exits without committing past an unsettled warning.

``/health`` is 503 while the dispatcher is waiting out an outage (PostgreSQL, Kafka, the mail relay),
while it has stopped, or while the probe cannot reach Kafka or PostgreSQL."""

from __future__ import annotations

import argparse
import logging
import threading

from prometheus_client import CollectorRegistry

from consumers.dispatch import GROUP_ID, Dispatcher
from consumers.dispatch import utc_now as datetime_now
from consumers.escalate import make_escalator, run_escalator
from consumers.service import serve_until_stopped
from pipeline import topics
from pipeline.health import probe_for
from pipeline.metrics import DispatchMetrics
from pipeline.observability import serve_metrics
from pipeline.settings import Settings

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="port of /metrics and /health [env CRISISWATCH_DISPATCH_METRICS_PORT]")
    parser.add_argument("--topic", default=topics.WARNINGS, help="topic of warning/1 events to deliver [default: warnings]")
    parser.add_argument("--group", default=GROUP_ID, help=f"consumer group [default: {GROUP_ID}]")


def run_dispatcher(settings: Settings, stop_event: threading.Event, *, registry: CollectorRegistry | None = None,
                   serve_http: bool = True, metrics_port: int | None = None, topic: str = topics.WARNINGS,
                   group_id: str = GROUP_ID) -> int:
    """Run the dispatcher until ``stop_event`` is set; return 0, or 1 if it failed."""
    registry = registry if registry is not None else CollectorRegistry()
    dispatcher = Dispatcher(settings, DispatchMetrics(registry), source_topic=topic, group_id=group_id)
    failed: list[BaseException] = []

    def target() -> None:
        try:
            dispatcher.run(stop_event)
        except Exception as exc:
            log.exception("dispatcher failed; stopping")
            failed.append(exc)
            stop_event.set()

    thread = threading.Thread(target=target, name="crisiswatch-dispatch")
    # The escalation and pre-arrival sweep (consumers.escalate), in this process: one sweep at a time
    # across all dispatchers (an advisory lock), on the dispatcher's own producer.
    escalator = make_escalator(settings.database_url.get(), dispatcher.publisher, settings.escalation, datetime_now)
    sweeper = threading.Thread(target=run_escalator, args=(escalator, settings.escalation_interval_s, stop_event),
                               name="crisiswatch-escalate", daemon=True)
    server = None
    probe = None
    if serve_http:
        probe = probe_for(settings, kafka=True, postgresql=True, registry=registry).start()
        port = settings.dispatch_metrics_port if metrics_port is None else metrics_port
        try:
            server = serve_metrics(registry, settings.api_host, port, lambda: thread.is_alive() and dispatcher.healthy,
                                   probe=probe)
        except OSError:
            probe.stop()
            raise
        log.info("dispatch metrics at http://%s:%d/metrics", settings.api_host, port)
    thread.start()
    sweeper.start()
    try:
        thread.join()
    finally:
        stop_event.set()
        thread.join()
        sweeper.join(timeout=10)
        if server is not None:
            server.shutdown()
            server.server_close()
        if probe is not None:
            probe.stop()
    return 1 if failed else 0


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    return serve_until_stopped(
        "dispatch", settings,
        lambda stop: run_dispatcher(settings, stop, metrics_port=args.metrics_port, topic=args.topic, group_id=args.group),
        part="the dispatcher")
