"""The per-country router on the real broker: a warning reaches warnings.<CC> of each of its
countries unchanged; one without a country is counted, not routed; a bad one is dead-lettered."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import CollectorRegistry

from consumers.kafka_io import Message, read_topic
from consumers.router import WarningRouter
from pipeline import topics
from pipeline.metrics import SinkMetrics
from pipeline.settings import Settings
from producers.publisher import Outgoing, Publisher, outgoing
from schemas import Warning, decode

pytestmark = pytest.mark.integration

T0 = datetime(2025, 3, 1, 8, 30, tzinfo=UTC)


def warning(crisis_id: str, country_codes: tuple[str, ...]) -> Warning:
    return Warning("w-" + uuid.uuid4().hex, "cit-" + uuid.uuid4().hex[:6], crisis_id, 1, "inside", "extreme",
                   "Earthquake M6.8", "Drop, cover, hold on", 0.0, -8.65, 115.2, T0, T0 + timedelta(seconds=1), country_codes)


def with_value(value: bytes) -> Callable[[list[Message]], bool]:
    return lambda seen: any(m.value == value for m in seen)


def test_router_copies_warnings_to_each_country_topic(kafka_bootstrap: str, fresh_topic: Callable[..., str]) -> None:
    source = fresh_topic("warnings")
    crisis_id = "quake-" + uuid.uuid4().hex[:8]
    two_countries = warning(crisis_id, ("ID", "TL"))
    no_country = warning(crisis_id, ())
    publisher = Publisher(Settings(), bootstrap=kafka_bootstrap)
    routed = outgoing(two_countries, source)
    # One key, so one partition: once the last message's dead letter is out, the others were handled.
    publisher.publish([Outgoing(source, routed.key, routed.value, (("trace-id", b"t-42"),)),
                       Outgoing(source, routed.key, outgoing(no_country).value),
                       Outgoing(source, routed.key, b'{"schema":"warning/1"}')])
    publisher.close()

    registry = CollectorRegistry()
    router = WarningRouter(Settings(kafka_bootstrap=kafka_bootstrap, partitions=2), SinkMetrics(registry),
                           source_topic=source, group_id="router-" + uuid.uuid4().hex[:8])
    stop = threading.Event()
    thread = threading.Thread(target=router.run, args=(stop,), daemon=True)
    thread.start()
    try:
        copies = {cc: [m for m in read_topic(kafka_bootstrap, topics.country_warning_topic(cc), with_value(routed.value),
                                             timeout_s=60) if m.value == routed.value] for cc in ("ID", "TL")}
        letters = read_topic(kafka_bootstrap, topics.DLQ,
                             lambda seen: any(dict(m.headers).get(topics.DLQ_SOURCE_TOPIC_HEADER) == source.encode()
                                              for m in seen))
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()

    for cc in ("ID", "TL"):
        assert len(copies[cc]) == 1, cc
        copy = copies[cc][0]
        assert copy.key == two_countries.citizen_id.encode()
        assert ("trace-id", b"t-42") in copy.headers
        assert decode(copy.value, Warning) == two_countries
    ours = [m for m in letters if dict(m.headers).get(topics.DLQ_SOURCE_TOPIC_HEADER) == source.encode()]
    assert [dict(m.headers)[topics.DLQ_STAGE_HEADER] for m in ours] == [b"router"]
    assert registry.get_sample_value("crisiswatch_router_messages_total", {"topic": "warnings.ID"}) == 1
    assert registry.get_sample_value("crisiswatch_router_messages_total", {"topic": "none"}) == 1
