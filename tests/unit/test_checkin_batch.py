"""``checkin-batch/1``: the API's check-ins of one partition as one record. Each check-in lands on the partition it
would have had alone, in order; the worker's decode step and the sink take each of them as if it had come alone; a
check-in that keys to another partition, or a batch that cannot be read, is dead-lettered with the reason."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from importlib import resources
from types import SimpleNamespace
from typing import Any

import pytest
from kafka.partitioner.default import DefaultPartitioner

from consumers.sink import SinkTopics, prepare
from pipeline.app import checkin_messages
from pipeline.testing import make_checkin
from producers.publisher import MAX_BATCH_RECORD_BYTES, checkin_batches, partition_of
from schemas import Checkin, InvalidEvent, decode, encode
from schemas.codec import validator
from schemas.fast import BATCH_SCHEMA, MAX_BATCH_ITEMS, citizen_of, encode_checkin_batch, split_checkin_batch

T0 = datetime(2026, 3, 1, 12, tzinfo=UTC)


def checkins(n: int, prefix: str = "c") -> list[Checkin]:
    return [make_checkin(f"{prefix}-{i % 97}", -6.2 + i * 1e-4, 106.8, observed_at=T0 + timedelta(seconds=i))
            for i in range(n)]


def test_each_checkin_is_on_the_partition_kafkas_partitioner_gives_it_in_order() -> None:
    sent = checkins(1000)
    records = checkin_batches(sent, "checkins", 16)
    cluster = SimpleNamespace(topics=lambda: {"checkins"}, partitions_for_topic=lambda _: set(range(16)),
                              available_partitions_for_topic=lambda _: set(range(16)))

    def partitioner(key: bytes) -> int:  # what kafka-python's producer does with a keyed record
        return int(DefaultPartitioner().partition("checkins", None, key, None, None, cluster))

    assert len(records) == len({r.partition for r in records}) <= 16
    seen: list[Checkin] = []
    for record in records:
        assert record.topic == "checkins" and record.key is None
        items = split_checkin_batch(record.value)
        assert items is not None
        for item in items:
            event = decode(item, Checkin)
            key = event.citizen_id.encode()
            assert record.partition == partitioner(key) == partition_of(key, 16)
            seen.append(event)
    assert sorted(seen, key=lambda c: c.observed_at) == sent  # every one, once
    for citizen in {c.citizen_id for c in sent}:  # a citizen's check-ins keep their order
        assert [c for c in seen if c.citizen_id == citizen] == [c for c in sent if c.citizen_id == citizen]


def test_a_large_group_is_split_below_the_record_limit() -> None:
    sent = [make_checkin("one-citizen-" + "x" * 100, 1.0, 2.0, observed_at=T0 + timedelta(seconds=i)) for i in range(8000)]
    records = checkin_batches(sent, "checkins", 4)
    assert len(records) > 1 and len({r.partition for r in records}) == 1
    assert all(len(r.value) <= MAX_BATCH_RECORD_BYTES + 1024 for r in records)
    assert [decode(i, Checkin) for r in records for i in split_checkin_batch(r.value) or []] == sent


def test_the_envelope_is_what_its_json_schema_describes() -> None:
    raw = encode_checkin_batch([encode(c) for c in checkins(3)])
    obj = json.loads(raw)
    assert obj["schema"] == BATCH_SCHEMA and [i["schema"] for i in obj["checkins"]] == ["checkin/1"] * 3
    batch_schema = json.loads(resources.files("schemas").joinpath("json", "checkin-batch-1.schema.json").read_text("utf-8"))
    # every item is a checkin/1, by the check-in schema's $id
    assert batch_schema["properties"]["checkins"]["items"]["$ref"] == validator("checkin/1").schema["$id"]
    assert batch_schema["properties"]["checkins"]["maxItems"] == MAX_BATCH_ITEMS
    with pytest.raises(ValueError, match="1 to"):
        encode_checkin_batch([])


@pytest.mark.parametrize(("raw", "reason"), [
    (b'{"schema":"checkin-batch/1"}', "missing required field `checkins`"),
    (b'{"schema":"checkin-batch/1","checkins":[]}', "length >= 1"),
    (b'{"schema":"checkin-batch/1","checkins":{}}', "Expected `array`"),
    (b'{"schema":"checkin-batch/1","checkins":[{}],"more":1}', "unknown field `more`"),
])
def test_a_batch_that_cannot_be_read_says_why(raw: bytes, reason: str) -> None:
    with pytest.raises(InvalidEvent, match=reason):
        split_checkin_batch(raw)


def test_what_is_not_a_batch_is_left_to_its_own_decoding() -> None:
    single = encode(make_checkin("checkin-batch/1", 1.0, 2.0))  # a citizen may be called so
    assert split_checkin_batch(single) is None and decode(single, Checkin).citizen_id == "checkin-batch/1"
    assert split_checkin_batch(b'{"schema":"checkin-batch/1","x":' + b"[" * 5000 + b"]" * 5000 + b"}") is None
    assert split_checkin_batch(b"\xff checkin-batch/1") is None
    cut = b'{"schema":"checkin-batch/1","checkins":[{}]'
    assert split_checkin_batch(cut) is None
    with pytest.raises(InvalidEvent, match="not JSON"):
        decode(cut, Checkin)
    assert citizen_of(b'{"citizen_id": 5}') is None and citizen_of(b"[") is None


def event(value: bytes | None, partition: int, offset: int = 7, key: bytes | None = None) -> Any:
    return SimpleNamespace(message=SimpleNamespace(value=value, key=key, topic="checkins", partition=partition,
                                                   timestamp=1.0, offset=offset))


def test_the_locate_step_takes_each_checkin_of_a_batch_as_if_it_came_alone() -> None:
    sent = checkins(200)
    records = checkin_batches(sent, "checkins", 4)
    single = encode(make_checkin("alone", 1.0, 2.0))
    events = [event(r.value, r.partition or 0, offset=i) for i, r in enumerate(records)]
    events.append(event(single, partition_of(b"alone", 4), key=b"alone"))
    messages, letters = checkin_messages(events, 4)
    assert letters == []
    assert sorted((decode(m.value, Checkin) for m in messages if m.key != b"alone"), key=lambda c: c.observed_at) == sent
    for m in messages:
        assert m.key == decode(m.value, Checkin).citizen_id.encode() and m.partition == partition_of(m.key, 4)
    assert messages[-1].value == single


def test_a_checkin_on_the_wrong_partition_and_an_unreadable_batch_are_dead_lettered_with_the_reason() -> None:
    home = partition_of(b"c-1", 4)
    items = [encode(make_checkin("c-1", 1.0, 2.0)), b'{"schema":"checkin/1","lat":500}']
    wrong = encode_checkin_batch([encode(make_checkin("c-1", 3.0, 4.0))])
    events = [event(encode_checkin_batch(items), home), event(wrong, (home + 1) % 4, offset=8),
              event(b'{"schema":"checkin-batch/1","checkins":[]}', home, offset=9)]
    messages, letters = checkin_messages(events, 4)
    assert [decode(m.value, Checkin).lat for m in messages[:1]] == [1.0]
    assert messages[1].value == items[1] and messages[1].key is None  # no citizen: its decoding says what is wrong
    assert len(letters) == 2
    assert letters[0].raw.offset == 8 and letters[0].raw.key == b"c-1" and "keys to partition" in letters[0].reason
    assert letters[0].label == "$.citizen_id"
    assert letters[1].raw.offset == 9 and "not a valid checkin-batch/1" in letters[1].reason


def test_the_sink_stores_every_checkin_of_a_batch_and_refuses_only_the_bad_one() -> None:
    from consumers.kafka_io import Message

    good = [make_checkin(f"s-{i}", 1.0, 2.0, observed_at=T0) for i in range(3)]
    value = encode_checkin_batch([encode(good[0]), b'{"schema":"checkin/1","lat":500}', encode(good[1]), encode(good[2])])
    topics = SinkTopics()
    messages = [Message(topics.checkins, 0, 41, None, value),
                Message(topics.checkins, 0, 42, None, b'{"schema":"checkin-batch/1","checkins":[]}')]
    prepared = prepare(messages, topics.models(), T0)
    assert [r.values[0] for r in prepared.rows] == ["s-0", "s-1", "s-2"]
    assert all(r.source.offset == 41 for r in prepared.rows)
    bad, unreadable = prepared.rejected
    assert (bad.message.offset, bad.message.value) == (41, b'{"schema":"checkin/1","lat":500}')
    assert "citizen_id" in bad.reason
    assert unreadable.message.offset == 42 and "not a valid checkin-batch/1" in unreadable.reason
