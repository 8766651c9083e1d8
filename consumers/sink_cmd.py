"""``crisiswatch sink``: the PostgreSQL sink and the per-country warning router in one process,
with /metrics and /health. SIGTERM or Ctrl-C finishes the batch in hand, commits, and exits.

``/health`` is 503 while a part has stopped, while a part is waiting out an outage, or while the
health probe cannot reach Kafka or PostgreSQL (the consumers' own polls do not notice a broker
that went away); the body names what is down."""

from __future__ import annotations

import argparse
import logging
import threading
from collections.abc import Callable

from prometheus_client import CollectorRegistry

from consumers.router import WarningRouter
from consumers.service import serve_until_stopped
from consumers.sink import PostgresSink
from pipeline.health import probe_for
from pipeline.lag import LagMonitor
from pipeline.metrics import LagMetrics, SinkMetrics
from pipeline.observability import serve_metrics
from pipeline.settings import Settings

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-router", action="store_true",
                        help="only write to PostgreSQL; do not copy warnings to warnings.<CC> topics")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="port of /metrics and /health [env CRISISWATCH_SINK_METRICS_PORT]")


def run_sink(settings: Settings, stop_event: threading.Event, *, registry: CollectorRegistry | None = None,
             router: bool = True, serve_http: bool = True, metrics_port: int | None = None) -> int:
    """Run the sink (and the router) until ``stop_event`` is set; return 0, or 1 if a part failed.

    Needs ``settings.kafka_bootstrap`` and ``settings.database_url``; ``crisiswatch up`` calls this
    with the embedded servers' addresses filled in.
    """
    registry = registry if registry is not None else CollectorRegistry()
    metrics = SinkMetrics(registry)
    parts: list[tuple[str, Callable[[threading.Event], None], Callable[[], bool]]] = []
    sink = PostgresSink(settings, metrics)
    parts.append(("sink", sink.run, lambda: sink.healthy))
    if router:
        warning_router = WarningRouter(settings, metrics)
        parts.append(("router", warning_router.run, lambda: warning_router.healthy))

    failed: list[str] = []

    def guarded(name: str, body: Callable[[threading.Event], None]) -> Callable[[], None]:
        def target() -> None:
            try:
                body(stop_event)
            except Exception:
                log.exception("%s failed; stopping", name)
                failed.append(name)
                stop_event.set()
        return target

    threads = [threading.Thread(target=guarded(name, body), name=f"crisiswatch-{name}") for name, body, _ in parts]

    def healthy() -> bool:
        return all(t.is_alive() for t in threads) and all(ok() for _, _, ok in parts)

    server = None
    probe = None
    lag = None
    if serve_http:
        probe = probe_for(settings, kafka=True, postgresql=True, registry=registry).start()
        port = settings.sink_metrics_port if metrics_port is None else metrics_port
        try:
            server = serve_metrics(registry, settings.api_host, port, healthy, probe=probe)
        except OSError:
            probe.stop()
            raise
        log.info("sink metrics at http://%s:%d/metrics", settings.api_host, port)
        lag = LagMonitor.for_settings(settings.kafka_bootstrap, settings.kafka_client_options(), LagMetrics(registry)).start()
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    finally:
        stop_event.set()
        for thread in threads:
            thread.join()
        if server is not None:
            server.shutdown()
            server.server_close()
        if probe is not None:
            probe.stop()
        if lag is not None:
            lag.stop()
    return 1 if failed else 0


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    return serve_until_stopped(
        "sink", settings, lambda stop: run_sink(settings, stop, router=not args.no_router, metrics_port=args.metrics_port),
        part="the sink")
