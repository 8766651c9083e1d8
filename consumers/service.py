"""The life of a consumer process (``crisiswatch sink``, ``crisiswatch dispatch``): refuse to start
without Kafka and PostgreSQL, log as one named process, and stop on SIGTERM or Ctrl-C by setting the
event the work watches — it finishes the batch in hand, commits, and returns its exit code."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

from pipeline.observability import setup_logging
from pipeline.settings import Settings

log = logging.getLogger(__name__)


def serve_until_stopped(verb: str, settings: Settings, work: Callable[[threading.Event], int], *, part: str) -> int:
    """Run ``work(stop)`` for ``crisiswatch <verb>``; 2 with one line on stderr when Kafka or PostgreSQL is
    not configured (``part`` names what ``crisiswatch up`` would start instead) or a port is taken."""
    missing = [name for name, value in (("CRISISWATCH_KAFKA_BOOTSTRAP", settings.kafka_bootstrap),
                                        ("CRISISWATCH_DATABASE_URL", settings.database_url.get())) if not value]
    if missing:
        print(f"crisiswatch {verb}: set {' and '.join(missing)} (or run `crisiswatch up`, which starts {part})",
              file=sys.stderr)
        return 2
    setup_logging(settings.log_level, f"crisiswatch-{verb}")
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("stopping on %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return work(stop)
    except OSError as exc:  # the metrics port is taken
        print(f"crisiswatch {verb}: {exc}", file=sys.stderr)
        return 2
