"""The one decoder refuses, with a field and a reason, what would hurt a later stage: nesting deep enough to
blow Python's recursion, text that is not Unicode or holds NUL, numbers PostgreSQL cannot store, date-times
that cannot be converted; and it never raises anything but :class:`InvalidEvent`."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from pipeline.testing import make_checkin, make_crisis
from schemas import Ack, Checkin, Citizen, Crisis, InvalidEvent, Warning, decode, encode
from schemas.codec import (
    MAX_DEPTH,
    MAX_INTEGER,
    _checkin_fast_path,
    ecma_pattern,
    nesting_depth_exceeds,
    parse_json,
    validator,
)

CHECKIN = json.loads(encode(make_checkin("c-1", -6.2, 106.8)))
CRISIS = json.loads(encode(make_crisis("k-1")))


def raw(obj: dict[str, Any], **fields: Any) -> bytes:
    return json.dumps({**obj, **fields}, ensure_ascii=True).encode()


def refusal(data: bytes | str, expected: Any = None) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as caught:
        decode(data, expected)
    return caught.value


def nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


# --- nesting ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [Checkin, Crisis, Ack, Citizen, Warning])
@pytest.mark.parametrize("depth", [MAX_DEPTH, 1_000, 100_000])
def test_deep_nesting_is_refused_before_parsing_in_every_event_type(model: Any, depth: int) -> None:
    text = '{"schema": "%s", "extra": %s}' % (model.SCHEMA, nested(depth))  # noqa: UP031 - braces in JSON
    error = refusal(text.encode(), model)
    assert error.field == "$" and f"more than {MAX_DEPTH} levels" in error.reason


def test_nesting_up_to_the_limit_is_parsed_and_brackets_inside_strings_do_not_count() -> None:
    assert parse_json(nested(MAX_DEPTH)) is not None
    assert not nesting_depth_exceeds(json.dumps({"title": "[" * 500 + '\\"{' * 100}))
    event = decode(raw(CRISIS, title="[" * 400 + '"' + "{" * 99), Crisis)
    assert event.title.startswith("[[[") and event.title.endswith("{{{")


def test_unbalanced_deep_input_is_still_refused_as_too_deep_not_a_recursion_error() -> None:
    assert "levels" in refusal(b"[" * 5000).reason
    assert "levels" in refusal(b'{"a":' * 5000).reason


# --- text ---------------------------------------------------------------------------------------------------


def test_lone_surrogate_in_a_value_is_refused_with_its_path() -> None:
    error = refusal(raw(CRISIS, title="\ud800 flood"), Crisis)
    assert (error.field, error.reason) == ("$.title", "lone surrogate U+D800 is not valid Unicode in text")
    nested_error = refusal(raw(CRISIS, references=["ok", "\udfff"]), Crisis)
    assert nested_error.field == "$.references[1]"


def test_lone_surrogate_and_nul_in_an_object_key_are_refused() -> None:
    error = refusal(raw(CHECKIN, extra={"\ud83d": 1}), Checkin)
    assert error.field == "$.extra.\\ud83d" and "in an object key" in error.reason
    assert "NUL" in refusal(raw(CHECKIN, **{"a\u0000b": 1}), Checkin).reason


def test_nul_in_a_value_is_refused() -> None:
    error = refusal(raw(CRISIS, instruction="go\u0000now"), Crisis)
    assert (error.field, error.reason) == ("$.instruction", "NUL (U+0000) is not allowed in text")


def test_a_surrogate_pair_is_one_character_and_accepted() -> None:
    data = raw(CRISIS, title="\U0001f30a Banjir")
    assert b"\\ud83c\\udf0a" in data  # written as an escaped pair
    assert decode(data, Crisis).title == "\U0001f30a Banjir"


def test_encoded_surrogates_and_other_encodings_are_not_utf8() -> None:
    # json.loads(bytes) would read these: the UTF-8 encoding of a surrogate, and UTF-16
    assert refusal(b'{"schema": "crisis/1", "title": "\xed\xa0\x80"}').reason.startswith("not JSON: not UTF-8")
    assert refusal(json.dumps(CHECKIN).encode("utf-16"), Checkin).reason.startswith("not JSON: not UTF-8")


def test_text_handed_over_as_str_is_checked_too_and_a_utf8_bom_is_tolerated() -> None:
    as_text = json.dumps({**CRISIS, "title": "\ud800"}, ensure_ascii=False)  # the surrogate itself, not an escape
    assert refusal(as_text, Crisis).field == "$.title"
    assert decode(b"\xef\xbb\xbf" + raw(CHECKIN), Checkin).citizen_id == "c-1"


# --- numbers ------------------------------------------------------------------------------------------------


def test_version_up_to_bigint_is_accepted_and_beyond_is_refused() -> None:
    assert decode(raw(CRISIS, version=MAX_INTEGER), Crisis).version == MAX_INTEGER
    for version in (MAX_INTEGER + 1, 10**30):
        error = refusal(raw(CRISIS, version=version), Crisis)
        assert error.field == "$.version" and "2^63" in error.reason


def test_every_integer_and_number_must_fit_where_it_is_stored() -> None:
    assert refusal(raw(CHECKIN, extra=[1, -(2**63)]), Checkin).field == "$.extra[1]"
    assert "double" in refusal(raw(CHECKIN).replace(b'"lat": -6.2', b'"lat": 1e400'), Checkin).reason
    assert refusal(raw(CHECKIN).replace(b'"lat": -6.2', b'"lat": ' + b"9" * 5000), Checkin).reason.startswith("not JSON")


def test_the_json_schema_says_so_too() -> None:
    assert validator("crisis/1").schema["properties"]["version"]["maximum"] == MAX_INTEGER
    assert validator("warning/1").schema["properties"]["crisis_version"]["maximum"] == MAX_INTEGER


# --- patterns and times ---------------------------------------------------------------------------------------


def test_patterns_mean_what_json_schema_says_dollar_is_the_end() -> None:
    assert ecma_pattern("^[A-Z]{2}$").search("ID")
    assert not ecma_pattern("^[A-Z]{2}$").search("ID\n")
    assert not ecma_pattern(r"^\d{4}$").search("٢٠٢٥")  # Arabic-Indic digits are not \d in ECMA-262
    assert ecma_pattern("^[$]x$").search("$x")
    assert refusal(raw(CHECKIN, citizen_id="c-1\n"), Checkin).field == "$.citizen_id"
    assert _checkin_fast_path()({**CHECKIN, "citizen_id": "c-1\n"}) is None


@pytest.mark.parametrize("when", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "9999-12-31T00:00:00Z"])
def test_times_that_do_not_convert_to_utc_are_refused(when: str) -> None:
    error = refusal(raw(CHECKIN, observed_at=when), Checkin)
    assert error.field == "$.observed_at" and "out of range" in error.reason
    assert refusal(raw(CRISIS, expires=when), Crisis).field == "$.expires"


def test_far_past_and_future_times_within_range_are_accepted() -> None:
    crisis = decode(raw(CRISIS, effective="0001-01-02T00:00:00Z", expires="9999-12-30T00:00:00+14:00"), Crisis)
    assert crisis.effective == datetime(1, 1, 2, tzinfo=UTC)
    assert crisis.expires is not None and crisis.expires.year == 9999


def test_only_invalid_event_escapes_whatever_the_bytes() -> None:
    for data in (b"", b"\xff\xfe", b"[" * 10**6, b'"\\ud800"', b"1" * 5000, b"-", b'{"schema": "\\u0000"}', b"\x00"):
        with pytest.raises(InvalidEvent):
            decode(data, Checkin)
