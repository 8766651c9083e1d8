"""Fixtures several integration modules use; the helpers they call are in ``tests/stack_helpers.py``."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from consumers.sink import SinkTopics
from tests.stack_helpers import WebhookReceiver


@pytest.fixture
def sink_topics(fresh_topic: Callable[..., str]) -> SinkTopics:
    """Every topic the sink reads, fresh: a test's sink sees only what the test published."""
    return SinkTopics(checkins=fresh_topic("checkins"), citizens=fresh_topic("citizens"),
                      crisis_events=fresh_topic("crisis-events"), warnings=fresh_topic("warnings"),
                      acks=fresh_topic("acks"), cases=fresh_topic("cases"))


@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    """A webhook on loopback for the test, closed after it."""
    receiver = WebhookReceiver()
    try:
        yield receiver
    finally:
        receiver.close()
