"""The sink's pure half: events to rows, batch decoding with reasons, de-duplication, offsets."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from consumers.kafka_io import Message, dlq_label, next_offsets
from consumers.router import route
from consumers.sink import (
    ACKS_TABLE,
    CHECKINS_TABLE,
    CITIZENS_TABLE,
    CRISES_TABLE,
    WARNINGS_TABLE,
    Row,
    SinkTopics,
    TableSpec,
    dedupe,
    prepare,
    retention_cutoff,
    row_for,
)
from schemas import Ack, Channel, Checkin, Citizen, Crisis, Warning, encode

T0 = datetime(2025, 3, 1, 8, 30, tzinfo=UTC)
NOW = T0 + timedelta(hours=1)
SQUARE = {"type": "Polygon", "coordinates": [[[106.7, -6.3], [106.9, -6.3], [106.9, -6.1], [106.7, -6.1], [106.7, -6.3]]]}


def checkin(citizen: str = "c-1", at: datetime = T0, lat: float = -6.2, accuracy: float | None = 12.0) -> Checkin:
    return Checkin(citizen, lat, 106.8, at, "app", accuracy)


def citizen(name: str = "Sari Wulandari", trip: dict[str, str | None] | None = None) -> Citizen:
    return Citizen("c-1", name, "ID", "id", (Channel("sms", "+6281200000001"), Channel("email", "sari@example.org")),
                   ({"name": "Budi", "relation": "brother", "phone": "+6281200000002"},), True, trip)


def crisis(version: int = 1) -> Crisis:
    return Crisis("jkt-flood", "upsert", version, "operator", "op-1", "Flooding in Jakarta", "met", "severe",
                  "immediate", "observed", SQUARE, 5.0, ("ID",), T0, T0 + timedelta(days=2),
                  "Move to higher ground", "https://example.org/jkt", ("op-0",))


def warning(warning_id: str = "w-" + "a" * 32) -> Warning:
    return Warning(warning_id, "c-1", "jkt-flood", 1, "entered", "severe", "Flooding in Jakarta", "Move to higher ground",
                   0.0, -6.2, 106.8, T0, T0 + timedelta(seconds=1), ("ID",))


def ack() -> Ack:
    return Ack("c-1", "jkt-flood", "need_help", T0, "sms", "water rising")


def message(value: bytes, topic: str = "checkins", offset: int = 0, partition: int = 0) -> Message:
    return Message(topic, partition, offset, b"c-1", value)


def columns(spec_row: tuple[TableSpec, Row]) -> dict[str, object]:
    spec, row = spec_row
    return dict(zip(spec.columns, row, strict=True))


def test_checkin_row_keeps_the_aware_time_and_accuracy() -> None:
    spec, _ = row_for(checkin())
    assert spec is CHECKINS_TABLE
    assert columns(row_for(checkin())) == {"citizen_id": "c-1", "observed_at": T0, "source": "app", "lat": -6.2,
                                           "lon": 106.8, "accuracy_m": 12.0}
    assert columns(row_for(checkin(accuracy=None)))["accuracy_m"] is None


def test_citizen_row_flattens_trip_and_keeps_channels_and_contacts() -> None:
    row = columns(row_for(citizen(trip={"country": "JP", "from": "2025-03-01", "until": None})))
    assert row["channels"] == [{"type": "sms", "address": "+6281200000001"},
                               {"type": "email", "address": "sari@example.org"}]
    assert row["emergency_contacts"] == [{"name": "Budi", "relation": "brother", "phone": "+6281200000002"}]
    assert (row["trip_country"], row["trip_from"], row["trip_until"]) == ("JP", date(2025, 3, 1), None)
    assert row["location_tracking"] is True
    no_trip = columns(row_for(citizen()))
    assert (no_trip["trip_country"], no_trip["trip_from"], no_trip["trip_until"]) == (None, None, None)


def test_crisis_row_has_every_field_of_the_version() -> None:
    spec, _ = row_for(crisis())
    row = columns(row_for(crisis(version=3)))
    assert spec is CRISES_TABLE
    assert set(row) == set(crisis().to_dict()) - {"schema"} | {"language"}
    assert (row["crisis_id"], row["version"], row["geometry"]) == ("jkt-flood", 3, SQUARE)
    assert row["country_codes"] == ["ID"] and row["references"] == ["op-0"]
    assert row["expires"] == T0 + timedelta(days=2)


def test_warning_and_ack_rows() -> None:
    assert row_for(warning())[0] is WARNINGS_TABLE
    w = columns(row_for(warning()))
    assert (w["warning_id"], w["kind"], w["distance_km"], w["country_codes"]) == ("w-" + "a" * 32, "entered", 0.0, ["ID"])
    assert row_for(ack())[0] is ACKS_TABLE
    assert columns(row_for(ack()))["note"] == "water rising"


def test_prepare_sets_aside_bad_messages_with_the_reason() -> None:
    models = SinkTopics().models()
    good = message(encode(checkin()), offset=0)
    not_json = message(b"{lat: oops", offset=1)
    out_of_range = message(encode(checkin()).replace(b'"lat":-6.2', b'"lat":-96.2'), offset=2)
    wrong_topic = message(encode(citizen()), offset=3)
    prepared = prepare([good, not_json, out_of_range, wrong_topic], models, NOW)
    assert [r.source.offset for r in prepared.rows] == [0]
    reasons = {r.message.offset: r.reason for r in prepared.rejected}
    assert reasons[1].startswith("InvalidEvent: $: not JSON")
    assert reasons[2].startswith("InvalidEvent: $.lat:")
    assert "expected schema 'checkin/1', got 'citizen/1'" in reasons[3]
    assert [r.label for r in prepared.rejected] == ["$", "$.lat", "$.schema"]
    assert {r.error_type for r in prepared.rejected} == {"schemas.codec.InvalidEvent"}


def test_prepare_sets_aside_whatever_a_message_makes_decoding_raise() -> None:
    models = SinkTopics().models()
    deep = message(b'{"schema":"checkin/1","x":' + b"[" * 5000 + b"]" * 5000 + b"}", offset=0)
    good = message(encode(checkin()), offset=1)
    prepared = prepare([deep, good], models, NOW)
    assert [r.source.offset for r in prepared.rows] == [1]
    [rejected] = prepared.rejected
    assert rejected.reason == "InvalidEvent: $: arrays and objects nested more than 64 levels deep"
    assert (rejected.label, rejected.error_type) == ("$", "schemas.codec.InvalidEvent")


def test_sink_topics_must_be_distinct() -> None:
    with pytest.raises(ValueError, match="one event type"):
        SinkTopics(checkins="events", acks="events").models()


def test_dedupe_keeps_the_latest_citizen_and_the_first_of_everything_else() -> None:
    models = SinkTopics().models()
    same_instant_other_offset = checkin(at=T0.astimezone(timezone(timedelta(hours=7))), lat=-6.25)
    prepared = prepare([message(encode(citizen("Old Name")), "citizens", 0), message(encode(citizen("New Name")), "citizens", 1),
                        message(encode(checkin()), "checkins", 0), message(encode(same_instant_other_offset), "checkins", 1),
                        message(encode(checkin(at=T0 + timedelta(minutes=1))), "checkins", 2)], models, NOW)
    by_table = dedupe(prepared.rows)
    assert [columns((CITIZENS_TABLE, r.values))["name"] for r in by_table["citizens"]] == ["New Name"]
    assert [r.source.offset for r in by_table["checkins"]] == [0, 2]


def test_next_offsets_are_one_past_the_last_message_per_partition() -> None:
    msgs = [message(b"x", "a", 5, 0), message(b"x", "a", 7, 0), message(b"x", "a", 2, 1), message(b"x", "b", 0, 0)]
    assert next_offsets(msgs) == {("a", 0): 8, ("a", 1): 3, ("b", 0): 1}


def test_dlq_label_is_bounded() -> None:
    assert dlq_label("$.channels[3].address") == "$.channels.address"
    assert dlq_label("$") == "$"


def test_retention_cutoff_needs_an_aware_clock() -> None:
    assert retention_cutoff(T0, 30) == T0 - timedelta(days=30)
    with pytest.raises(ValueError):
        retention_cutoff(T0.replace(tzinfo=None), 30)


def test_route_copies_to_each_country_once_and_counts_the_rest() -> None:
    two = replace(warning(), country_codes=("ID", "TL", "ID"))
    none = replace(warning(), country_codes=())
    msg = Message("warnings", 0, 0, b"c-1", encode(two), (("trace", b"abc"),))
    routed = route([msg, message(encode(none), "warnings", 1), message(b"[]", "warnings", 2)])
    assert [(c.topic, c.key, c.value, c.headers) for c in routed.copies] == [
        ("warnings.ID", b"c-1", msg.value, (("trace", b"abc"),)), ("warnings.TL", b"c-1", msg.value, (("trace", b"abc"),))]
    assert routed.unrouted == 1
    assert [dict(letter.headers)["crisiswatch-dlq-stage"] for letter, _ in routed.dead] == [b"router"]
