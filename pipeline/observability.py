"""Structured logs, rate-limited repeats, and the /metrics + /health HTTP endpoint for processes that
are not Faust workers."""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from pipeline.health import HealthProbe


class JsonLineFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any ``extra`` fields."""

    _skip = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
                               "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        out.update({k: v for k, v in vars(record).items() if k not in self._skip})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


@dataclass(slots=True)
class _Window:
    opened: float
    suppressed: int = 0


_NUMBERS: Final = re.compile(r"\d+(?:\.\d+)?")


class RepeatedLogFilter(logging.Filter):
    """Lets the first of a run of like log lines through, then at most one per ``interval_s``.

    While a broker is away its clients log the same failures many times a second, which buries the
    one line that says what happened. Lines are
    alike when logger, level and message template match (numbers in the template ignored: some
    libraries format backoff times into it); the one that passes after a quiet spell carries the
    count of those left out, in the ``suppressed`` field and at the end of its message. Only
    WARNING and above are limited: INFO lines are rare and each says something different.

    Installed on a handler, it sees every logger's records, the libraries' (aiokafka, kafka,
    faust, mode) included. Memory is bounded: past ``max_keys`` templates the oldest windows are
    forgotten, with their counts.
    """

    def __init__(self, interval_s: float = 10.0, *, min_level: int = logging.WARNING,
                 clock: Callable[[], float] = time.monotonic, max_keys: int = 1024) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.min_level = min_level
        self.clock = clock
        self.max_keys = max_keys
        self._windows: dict[tuple[str, int, str], _Window] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.min_level:
            return True
        key = (record.name, record.levelno, _NUMBERS.sub("#", str(record.msg)))
        now = self.clock()
        with self._lock:
            window = self._windows.get(key)
            if window is not None and now - window.opened < self.interval_s:
                window.suppressed += 1
                return False
            self._windows.pop(key, None)  # re-inserted last: the dict stays in order of opening
            self._windows[key] = _Window(now)
            if len(self._windows) > self.max_keys:
                del self._windows[next(iter(self._windows))]
        if window is not None and window.suppressed:
            record.suppressed = window.suppressed
            record.msg = f"{record.msg} [{window.suppressed} more like this in the last {now - window.opened:.0f}s not logged]"
        return True


def limit_repeats(logger: logging.Logger, interval_s: float = 10.0) -> None:
    """Put a :class:`RepeatedLogFilter` on each of ``logger``'s handlers that has none yet."""
    for handler in logger.handlers:
        if not any(isinstance(f, RepeatedLogFilter) for f in handler.filters):
            handler.addFilter(RepeatedLogFilter(interval_s))


# The libraries that deliver messages name every recipient in their lines — at INFO each request's URL (a
# citizen's webhook) or "sent to <phone number>" — and a citizen's contact details stay out of the logs: they
# log at WARNING and above only, and what they log then has phone numbers, e-mail addresses and URL paths
# blanked out (docs/privacy.md).
DELIVERY_LOGGERS: Final = ("httpx", "httpcore", "apprise")
_CONTACTS: Final = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+|\+?\d[\d ().-]{6,}\d|(?<=[\w\]])/[^\s\"'<>]+")


class ContactRedactionFilter(logging.Filter):
    """Blanks contact details out of the lines of :data:`DELIVERY_LOGGERS` (see there)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".", 1)[0] in DELIVERY_LOGGERS:
            record.msg, record.args = _CONTACTS.sub("[redacted]", record.getMessage()), None
        return True


def setup_logging(level: str = "INFO", process: str = "crisiswatch") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLineFormatter())
    handler.addFilter(ContactRedactionFilter())
    handler.addFilter(RepeatedLogFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("kafka").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, root.level))
    for name in DELIVERY_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    logging.LoggerAdapter(logging.getLogger(process), {}).debug("logging configured")


def serve_metrics(registry: CollectorRegistry, host: str, port: int, health: Callable[[], bool] = lambda: True,
                  probe: HealthProbe | None = None) -> ThreadingHTTPServer:
    """Serve ``/metrics`` (Prometheus text) and ``/health`` (200 or 503) on a daemon thread.

    ``/health`` is 200 when ``health()`` holds and, with a ``probe``, every dependency answers; the
    JSON body then names each dependency's state (:meth:`HealthProbe.report`)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] == "/metrics":
                body, status, ctype = generate_latest(registry), 200, CONTENT_TYPE_LATEST
            elif self.path.split("?")[0] == "/health":
                ok = health()
                if probe is not None:
                    status, report = probe.report(ok)
                    body, ctype = json.dumps(report).encode(), "application/json"
                else:
                    body, status, ctype = (b'{"status":"ok"}' if ok else b'{"status":"unhealthy"}'), \
                        (200 if ok else 503), "application/json"
            else:
                body, status, ctype = b"not found", 404, "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name=f"metrics-{port}", daemon=True).start()
    return server


def read_metric(url: str, name: str, label: str | None = None) -> float:
    """The sum of a metric's samples on a ``/metrics`` page; 0 when the page cannot be read.

    Without ``label`` the unlabelled samples; with it the labelled ones whose labels contain it
    (``""``: all of them, e.g. every ``kind`` of a counter)."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - a URL the caller built
            text = response.read().decode()
    except OSError:
        return 0.0
    if label is None:
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + "{") and label in line.split("}")[0])
