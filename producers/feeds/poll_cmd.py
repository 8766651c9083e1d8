"""``crisiswatch feeds --config FILE [--once] [--metrics-port N]``: poll feeds, publish crisis events.

Runs until SIGTERM/SIGINT (each feed on its own interval, /metrics and /health served), or
with ``--once`` polls every feed once and exits: 0 when every feed was polled, 2 otherwise
with one line per failed feed on stderr. State (validators, incidents, what was published)
lives in ``$CRISISWATCH_DATA_DIR/feeds-state.json``; run one poller per state file.
``/health`` is 503 while a feed's thread has stopped or the health probe cannot reach Kafka.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from prometheus_client import CollectorRegistry

from pipeline.health import probe_for
from pipeline.metrics import FeedMetrics
from pipeline.observability import serve_metrics, setup_logging
from pipeline.settings import Settings, SettingsError
from producers.feeds.config import ConfigError, load_config
from producers.feeds.poller import FeedPoller, failures
from producers.feeds.state import STATE_FILE_NAME, StateError
from producers.publisher import Publisher

log = logging.getLogger(__name__)

DEFAULT_METRICS_PORT = 9103


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, metavar="FILE",
                        help="TOML file listing the feeds (see deploy/feeds.example.toml)")
    parser.add_argument("--once", action="store_true", help="poll every feed once and exit (2 if any feed failed)")
    parser.add_argument("--metrics-port", type=int, default=None, metavar="N",
                        help=f"serve /metrics and /health on this port [default: {DEFAULT_METRICS_PORT}; "
                             "with --once, only when given]")
    parser.add_argument("--metrics-host", default=None,
                        help="listen address for /metrics [env CRISISWATCH_API_HOST, default 127.0.0.1]")


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    # --once reports failures as one plain line each; keep routine log lines out of its stderr.
    setup_logging("ERROR" if args.once and settings.log_level != "DEBUG" else settings.log_level, "crisiswatch-feeds")
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"crisiswatch feeds: {exc}", file=sys.stderr)
        return 2
    if settings.embedded_kafka:
        raise SettingsError("CRISISWATCH_KAFKA_BOOTSTRAP: required by `crisiswatch feeds` "
                            "(`crisiswatch up` runs the pollers against its embedded broker)")
    registry = CollectorRegistry()
    publisher = Publisher(settings, client_id="crisiswatch-feeds")
    try:
        poller = FeedPoller(config, settings, publisher, settings.data_dir / STATE_FILE_NAME, FeedMetrics(registry))
    except (StateError, ValueError) as exc:
        print(f"crisiswatch feeds: {exc}", file=sys.stderr)
        publisher.close()
        return 2
    port = args.metrics_port if args.metrics_port is not None or args.once else DEFAULT_METRICS_PORT
    probe = None if args.once else probe_for(settings, kafka=True, registry=registry).start()
    try:
        host = args.metrics_host or settings.api_host
        server = serve_metrics(registry, host, port, health=poller.healthy if not args.once else lambda: True,
                               probe=probe) if port is not None else None
    except OSError:
        if probe is not None:
            probe.stop()
        publisher.close()
        raise
    try:
        if args.once:
            lines = failures(poller.poll_once())
            for line in lines:
                print(f"crisiswatch feeds: {line}", file=sys.stderr)
            return 2 if lines else 0
        stop = threading.Event()

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("stopping feed pollers", extra={"signal": signal.Signals(signum).name})
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        log.info("feed pollers running", extra={"feeds": [f.name for f in config.feeds], "metrics_port": port})
        poller.run(stop)
        return 0
    finally:
        publisher.close()
        if server is not None:
            server.shutdown()
        if probe is not None:
            probe.stop()
