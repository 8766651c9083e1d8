"""Chaos tests: the real embedded broker and PostgreSQL, broken on purpose, and everything counted.

Run by default at small sizes; ``pytest tests/chaos --scale 10`` multiplies them. Each scenario's
count line is repeated in a "chaos counts" section at the end of the run.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.harness import make_data_dir

_LINES: list[str] = []
_KEPT: list[Path] = []


def _scratch(request: pytest.FixtureRequest, name: str) -> Iterator[Path]:
    """A data directory for a stack; kept (logs and all) when a test using it failed."""
    path = make_data_dir(name)
    failed = request.session.testsfailed
    yield path
    if request.session.testsfailed > failed:
        _KEPT.append(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def module_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    yield from _scratch(request, request.module.__name__.rsplit(".", 1)[-1])


@pytest.fixture
def test_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    yield from _scratch(request, request.node.name)


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
    if _LINES or _KEPT:
        terminalreporter.section("chaos counts")
        for line in _LINES:
            terminalreporter.write_line(line)
        for path in _KEPT:
            terminalreporter.write_line(f"kept for a failed test: {path} (logs under logs/)")
