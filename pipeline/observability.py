"""Structured logs and the /metrics + /health HTTP endpoint for processes that are not Faust workers."""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


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


def setup_logging(level: str = "INFO", process: str = "crisiswatch") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLineFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("kafka").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, root.level))
    logging.LoggerAdapter(logging.getLogger(process), {}).debug("logging configured")


def serve_metrics(registry: CollectorRegistry, host: str, port: int,
                  health: Callable[[], bool] = lambda: True) -> ThreadingHTTPServer:
    """Serve ``/metrics`` (Prometheus text) and ``/health`` (200 or 503) on a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] == "/metrics":
                body, status, ctype = generate_latest(registry), 200, CONTENT_TYPE_LATEST
            elif self.path.split("?")[0] == "/health":
                ok = health()
                body, status, ctype = (b'{"status":"ok"}' if ok else b'{"status":"unhealthy"}'), (200 if ok else 503), \
                    "application/json"
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
