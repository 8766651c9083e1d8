"""``crisiswatch accountability``: the accountability agents in a Faust app of their own
(:mod:`pipeline.accountability_app`): per-crisis counts from warnings, deliveries, replies and cases,
published on ``crisis-status``.

``crisiswatch up`` and the demo start one; run more (each with its own
``CRISISWATCH_ACCOUNTABILITY_WEB_PORT`` on one host) to share the crises, up to the partition count.
Needs ``CRISISWATCH_KAFKA_BOOTSTRAP``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from pipeline.settings import Settings


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--web-port", type=int, default=None,
                        help="port of /metrics and /health [env: CRISISWATCH_ACCOUNTABILITY_WEB_PORT]")
    parser.add_argument("--loglevel", default=None, help="log level [env: CRISISWATCH_LOG_LEVEL]")


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    if args.web_port is not None:
        settings = replace(settings, accountability_web_port=args.web_port)
    if not settings.kafka_bootstrap:
        print("crisiswatch accountability: CRISISWATCH_KAFKA_BOOTSTRAP is not set (or use `crisiswatch up`)",
              file=sys.stderr)
        return 2
    return run_accountability(settings, (args.loglevel or settings.log_level).lower())


def run_accountability(settings: Settings, loglevel: str = "info", app_id: str | None = None) -> int:
    from pipeline.accountability_app import APP_ID, create_accountability_app, internal_topics
    from pipeline.worker_cmd import run_faust_app

    app_id = app_id or APP_ID
    return run_faust_app(settings, loglevel, internal_topics(app_id), lambda registry, probe: create_accountability_app(
        settings, app_id=app_id, registry=registry, health=probe)[0])
