"""Repeated log lines are rate-limited with a count, for every logger, libraries' included."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from pipeline.observability import JsonLineFormatter, RepeatedLogFilter, setup_logging


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def record(msg: str, *args: object, name: str = "aiokafka", level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_the_first_passes_then_one_per_interval_with_the_count_of_those_left_out() -> None:
    clock = Clock()
    limit = RepeatedLogFilter(10.0, clock=clock)
    passed = []
    for tick in range(250):  # 25 s of a line every 0.1 s
        clock.now = tick / 10
        r = record('Unable connect to "%s": %s', "127.0.0.1:9092", "refused")
        if limit.filter(r):
            passed.append((clock.now, getattr(r, "suppressed", 0), r.getMessage()))
    assert [(t, n) for t, n, _ in passed] == [(0.0, 0), (10.0, 99), (20.0, 99)]
    assert passed[1][2] == 'Unable connect to "127.0.0.1:9092": refused [99 more like this in the last 10s not logged]'


def test_lines_are_alike_by_logger_level_and_template_numbers_ignored() -> None:
    clock = Clock()
    limit = RepeatedLogFilter(10.0, clock=clock)
    assert limit.filter(record("backoff %.2f secs", 0.1))
    assert not limit.filter(record("backoff %.2f secs", 0.4))
    assert limit.filter(record("Bootstrap failed (backoff 1.40 secs)"))
    assert not limit.filter(record("Bootstrap failed (backoff 7.47 secs)"))  # formatted in: numbers ignored
    assert limit.filter(record("Bootstrap failed (backoff 1.40 secs)", name="kafka.net.manager"))
    assert limit.filter(record("backoff %.2f secs", 0.1, level=logging.WARNING))
    assert limit.filter(record("another message"))


def test_info_and_below_are_never_limited() -> None:
    limit = RepeatedLogFilter(10.0, clock=Clock())
    assert all(limit.filter(record("crisis published", level=logging.INFO)) for _ in range(10))


def test_memory_is_bounded() -> None:
    limit = RepeatedLogFilter(10.0, clock=Clock(), max_keys=3)
    for i in range(10):
        limit.filter(record(f"line {chr(65 + i)}"))
    assert len(limit._windows) == 3


@pytest.fixture
def captured_root() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    setup_logging("INFO", "test")
    stream = io.StringIO()
    root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
    try:
        yield stream
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def test_setup_logging_limits_every_logger_including_the_libraries(captured_root: io.StringIO) -> None:
    for name in ("aiokafka", "kafka.net.manager", "faust.transport", "mode.services", "consumers.sink"):
        for _ in range(50):
            logging.getLogger(name).error("Connection failed: %s", "ECONNREFUSED")
    lines = [json.loads(line) for line in captured_root.getvalue().splitlines()]
    assert sorted(line["logger"] for line in lines) == sorted(
        ["aiokafka", "kafka.net.manager", "faust.transport", "mode.services", "consumers.sink"])


def test_the_count_is_a_field_of_the_json_line() -> None:
    clock = Clock()
    limit = RepeatedLogFilter(10.0, clock=clock)
    limit.filter(record("poll failed"))
    limit.filter(record("poll failed"))
    clock.now = 11
    r = record("poll failed")
    assert limit.filter(r)
    assert json.loads(JsonLineFormatter().format(r))["suppressed"] == 1


def test_delivery_libraries_log_warnings_only_and_without_contact_details(captured_root: io.StringIO) -> None:
    logging.getLogger("httpx").info("HTTP Request: POST https://hooks.example.org/travel-desk/c-1 \"HTTP/1.1 204\"")
    logging.getLogger("apprise").warning("Dropped invalid phone # (%s) specified.", "+62 812-0000-0001")
    logging.getLogger("apprise.plugins").warning("Failed to send to sari@example.org via https://x.example/p/q")
    logging.getLogger("consumers.dispatch").warning("kept as it is: +62 812 0000 0001")
    lines = [json.loads(line)["msg"] for line in captured_root.getvalue().splitlines()]
    assert lines == ["Dropped invalid phone # ([redacted]) specified.",
                     "Failed to send to [redacted] via https://x.example[redacted]",
                     "kept as it is: +62 812 0000 0001"]
