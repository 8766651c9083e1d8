"""The consumer-stage failure policy with in-memory twins: which failures are outages, how a batch
is split until each culprit is alone, what it costs, and dead letters that always fit the broker."""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Sequence

import psycopg
import pytest
from aiokafka.errors import KafkaConnectionError
from aiokafka.errors import MessageSizeTooLargeError as AIOMessageSizeTooLarge
from faust.exceptions import ProducerSendError
from kafka.errors import KafkaTimeoutError, MessageSizeTooLargeError

from pipeline import dlq, topics
from pipeline.embedded import EmbeddedError
from pipeline.settings import Settings, SettingsError
from pipeline.stage import (
    BrokerUnavailable,
    Isolated,
    describe,
    error_type,
    is_infrastructure,
    isolate,
    isolate_async,
    label,
    map_isolated,
)
from producers.publisher import BrokerUnavailable as PublisherBrokerUnavailable
from producers.publisher import dead_letter
from schemas import InvalidEvent


class Poison(ValueError):
    pass


class Store:
    """An idempotent sink twin: effects keyed by item, in the order they first happened."""

    def __init__(self, poison: set[int]) -> None:
        self.poison = poison
        self.effects: dict[int, int] = {}  # item -> times written
        self.runs: list[int] = []  # sizes of the batches the step was handed

    def step(self, batch: Sequence[int]) -> int:
        """Writes item by item and raises on a poison item: a failed run leaves part of its effects."""
        self.runs.append(len(batch))
        for item in batch:
            if item in self.poison:
                raise Poison(f"item {item} is poison")
            self.effects[item] = self.effects.get(item, 0) + 1
        return len(batch)

    async def astep(self, batch: Sequence[int]) -> int:
        await asyncio.sleep(0)
        return self.step(batch)


def check_isolated(result: Isolated[int, int], store: Store, items: list[int]) -> None:
    good = [i for i in items if i not in store.poison]
    assert [f.item for f in result.failures] == sorted(store.poison)
    assert all(isinstance(f.error, Poison) for f in result.failures)
    assert [f.reason for f in result.failures] == [f"Poison: item {i} is poison" for i in sorted(store.poison)]
    assert {f.error_type for f in result.failures} <= {f"{Poison.__module__}.Poison"}
    assert list(store.effects) == good  # every good item processed, in batch order, no poison
    assert sum(result.results) == len(good)  # the runs that succeeded covered every good item once


def test_one_poison_in_a_batch_is_isolated_and_the_rest_processed() -> None:
    items = list(range(100))
    store = Store({37})
    result = isolate(items, store.step)
    check_isolated(result, store, items)
    assert result.split and result.runs <= 2 * math.ceil(math.log2(100)) + 1


def test_two_poisons() -> None:
    items = list(range(64))
    store = Store({3, 50})
    check_isolated(isolate(items, store.step), store, items)


def test_a_batch_that_is_all_poison_costs_at_most_five_times_its_size() -> None:
    items = list(range(256))
    store = Store(set(items))
    result = isolate(items, store.step)
    check_isolated(result, store, items)
    assert result.work == sum(store.runs) <= 5 * len(items)  # plain halving would hand over 256 * 9 items
    assert result.runs <= 2 * len(items)


def test_a_clean_batch_runs_once() -> None:
    store = Store(set())
    result = isolate(list(range(10)), store.step)
    assert (result.runs, result.failures, result.split, store.runs) == (1, (), False, [10])
    assert isolate([], store.step).runs == 0


async def test_async_steps_are_isolated_the_same_way() -> None:
    items = list(range(50))
    store = Store({0, 49})
    check_isolated(await isolate_async(items, store.astep), store, items)


@pytest.mark.parametrize("outage", [
    KafkaTimeoutError("no ack"), KafkaConnectionError("refused"), psycopg.OperationalError("server closed"),
    psycopg.InterfaceError("connection closed"), ConnectionRefusedError(111, "refused"), TimeoutError(),
    BrokerUnavailable("down"), EmbeddedError("no broker"),
])
def test_an_outage_propagates_and_nothing_is_isolated(outage: Exception) -> None:
    runs: list[int] = []

    def step(batch: Sequence[int]) -> None:
        runs.append(len(batch))
        raise outage

    with pytest.raises(type(outage)):
        isolate(list(range(8)), step)
    assert runs == [8]  # not split: the messages are not to blame
    assert is_infrastructure(outage)


async def test_an_outage_propagates_from_an_async_step_too() -> None:
    async def step(batch: Sequence[int]) -> None:
        raise KafkaTimeoutError("changelog write not acknowledged")

    with pytest.raises(KafkaTimeoutError):
        await isolate_async([1, 2, 3], step)


def test_outages_wrapped_by_a_library_are_outages_and_records_too_large_are_data() -> None:
    def wrapped(cause: Exception) -> Exception:
        try:
            raise ProducerSendError("Error while sending") from cause
        except ProducerSendError as exc:
            return exc

    assert is_infrastructure(wrapped(KafkaTimeoutError()))
    assert not is_infrastructure(wrapped(AIOMessageSizeTooLarge()))
    assert not is_infrastructure(MessageSizeTooLargeError("1100000 bytes"))
    assert PublisherBrokerUnavailable is BrokerUnavailable
    for data in (ValueError("bad geometry"), RecursionError(), UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates"),
                 InvalidEvent("not JSON"), KeyError("lat"), psycopg.DataError("NUL")):
        assert not is_infrastructure(data), data


def test_a_stage_adds_its_own_outage_types() -> None:
    class MissingTable(Exception):
        pass

    def step(batch: Sequence[int]) -> None:
        raise MissingTable("relation checkins does not exist")

    assert [f.item for f in isolate([1, 2], step).failures] == [1, 2]
    with pytest.raises(MissingTable):
        isolate([1, 2], step, outages=(MissingTable,))


def test_map_isolated_runs_each_item_alone() -> None:
    result = map_isolated(["1", "x", "3"], int)
    assert result.results == (1, 3)
    [failure] = result.failures
    assert failure.item == "x" and failure.reason.startswith("ValueError: invalid literal") and failure.label == "ValueError"
    with pytest.raises(KafkaTimeoutError):
        map_isolated([1], lambda _: (_ for _ in ()).throw(KafkaTimeoutError()))


def test_reasons_and_labels_are_bounded() -> None:
    assert describe(ValueError("x" * 10_000)).startswith("ValueError: xxx") and len(describe(ValueError("x" * 10_000))) == 500
    assert describe(KeyError("lat"), "while writing") == "KeyError: while writing: 'lat'"

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert describe(Unprintable()) == "Unprintable: <Unprintable without a printable message>"
    assert label(InvalidEvent("too long", "$.channels[3].address")) == "$.channels.address"
    assert label(RecursionError()) == "RecursionError" and label(ValueError("free text " * 50)) == "ValueError"
    assert error_type(RecursionError()) == "RecursionError"
    assert error_type(InvalidEvent("x")) == "schemas.codec.InvalidEvent"


# --- dead letters ---------------------------------------------------------------------------------------

BROKER_LIMIT = 1_000_000


def test_an_oversized_payload_is_truncated_and_identifiable() -> None:
    payload = b'{"schema":"checkin/1","pad":"' + b"x" * 1_500_000 + b'"}'
    record = dlq.build(payload, reason="InvalidEvent: $: message too large", error_type="schemas.codec.InvalidEvent",
                       stage="locate", source_topic="checkins", partition=3, offset=42, key=b"k" * 5000)
    headers = dict(record.headers)
    assert record.value == payload[:dlq.DEFAULT_MAX_PAYLOAD_BYTES]
    assert headers[topics.DLQ_ORIGINAL_SIZE_HEADER] == str(len(payload)).encode()
    assert headers[topics.DLQ_ORIGINAL_SHA256_HEADER] == hashlib.sha256(payload).hexdigest().encode()
    assert headers[topics.DLQ_TRUNCATED_HEADER] == b"value,key"
    assert record.key == b"k" * dlq.MAX_KEY_BYTES
    assert (headers[topics.DLQ_SOURCE_TOPIC_HEADER], headers[topics.DLQ_SOURCE_PARTITION_HEADER],
            headers[topics.DLQ_SOURCE_OFFSET_HEADER], headers[topics.DLQ_STAGE_HEADER]) == (b"checkins", b"3", b"42", b"locate")
    assert headers[topics.DLQ_ERROR_TYPE_HEADER] == b"schemas.codec.InvalidEvent"
    assert record.size() < BROKER_LIMIT - 10_000  # room for the record's framing


def test_a_small_payload_is_kept_whole_with_its_size_and_hash() -> None:
    record = dlq.build(b"not json", reason="InvalidEvent: $: not JSON", stage="sink", source_topic="acks")
    headers = dict(record.headers)
    assert record.value == b"not json" and topics.DLQ_TRUNCATED_HEADER not in headers
    assert headers[topics.DLQ_ORIGINAL_SIZE_HEADER] == b"8"
    assert headers[topics.DLQ_ORIGINAL_SHA256_HEADER] == hashlib.sha256(b"not json").hexdigest().encode()
    assert topics.DLQ_SOURCE_OFFSET_HEADER not in headers  # not known: not invented
    assert dlq.build(None, reason="x", stage="s", source_topic="t").value == b""


def test_headers_are_bounded_and_never_fail_to_encode() -> None:
    record = dlq.build(b"{}", reason="ValueError: title '\ud800' " + "é" * 2000, error_type="E" * 500, stage="s" * 500,
                       source_topic="t" * 1000)
    headers = dict(record.headers)
    reason = headers[topics.DLQ_REASON_HEADER].decode("utf-8")  # valid UTF-8: cut on a character boundary
    assert reason.startswith("ValueError: title '\\ud800' é") and len(headers[topics.DLQ_REASON_HEADER]) <= dlq.MAX_HEADER_BYTES
    assert all(len(value) <= dlq.MAX_HEADER_BYTES for value in headers.values())
    assert record.size() < 10_000


def test_the_publisher_builds_its_dead_letters_with_the_one_builder() -> None:
    letter = dead_letter(b"y" * 2_000_000, "RecursionError: too deep", "acks", "sink", b"c-1", error_type="RecursionError",
                         partition=1, offset=7, max_payload_bytes=100_000)
    assert letter.topic == topics.DLQ and len(letter.value) == 100_000 and letter.key == b"c-1"
    assert dict(letter.headers)[topics.DLQ_ORIGINAL_SIZE_HEADER] == b"2000000"


def test_the_dead_letter_payload_limit_is_a_setting_that_must_leave_room() -> None:
    assert Settings.from_env({}).dlq_max_payload_bytes == dlq.DEFAULT_MAX_PAYLOAD_BYTES
    assert Settings.from_env({"CRISISWATCH_DLQ_MAX_PAYLOAD_BYTES": "65536"}).dlq_max_payload_bytes == 65536
    for bad in ("1000000", "10", "lots"):
        with pytest.raises(SettingsError, match="CRISISWATCH_DLQ_MAX_PAYLOAD_BYTES"):
            Settings.from_env({"CRISISWATCH_DLQ_MAX_PAYLOAD_BYTES": bad})
    with pytest.raises(ValueError):
        dlq.build(b"x", reason="r", stage="s", source_topic="t", max_payload_bytes=10)
