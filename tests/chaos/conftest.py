"""Chaos tests: the real embedded broker and PostgreSQL, broken on purpose, and everything counted.

Run by default at small sizes; ``pytest tests/chaos --scale 10`` multiplies them. Each scenario's
count line is repeated in a "chaos counts" section at the end of the run.
"""

from __future__ import annotations

import pytest

_LINES: list[str] = []


@pytest.fixture(scope="session")
def scale(pytestconfig: pytest.Config) -> int:
    value = int(pytestconfig.getoption("--scale"))
    if value < 1:
        raise pytest.UsageError("--scale must be >= 1")
    return value


@pytest.fixture(scope="session")
def count_lines() -> list[str]:
    return _LINES


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _LINES:
        terminalreporter.section("chaos counts")
        for line in _LINES:
            terminalreporter.write_line(line)
