"""Whatever bytes arrive, the decoder answers with an event or :class:`InvalidEvent`, never another exception;
and whatever it accepts can be encoded again and stored: no lone surrogate, no NUL, no integer beyond
``bigint``, no infinite number, whatever was hidden where in the JSON."""

from __future__ import annotations

import contextlib
import json
import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.testing import make_checkin, make_crisis
from schemas import Ack, Checkin, Citizen, Crisis, InvalidEvent, Warning, decode, encode
from schemas.codec import MAX_INTEGER

SETTINGS = settings(max_examples=300, deadline=None)
MODELS = [Checkin, Crisis, Ack, Citizen, Warning]
TEMPLATES = {Checkin: json.loads(encode(make_checkin("c-1", -6.2, 106.8))), Crisis: json.loads(encode(make_crisis("k-1")))}

awkward_text = st.text(alphabet=st.one_of(st.characters(), st.sampled_from(["\ud800", "\udfff", "\x00", "[", "{", "]", "\\",
                                                                            '"', "\U0001f30a"])), max_size=30)
scalars = st.one_of(st.none(), st.booleans(), awkward_text, st.floats(), st.integers(),
                    st.sampled_from([MAX_INTEGER, MAX_INTEGER + 1, -(2**63), 10**30, 1e308]))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(awkward_text, inner, max_size=4)),
                           max_leaves=20)


def deeply(depth: int, leaf: Any) -> Any:
    for _ in range(depth):
        leaf = [leaf]
    return leaf


def as_bytes(obj: Any, raw_surrogates: bool) -> bytes:
    if raw_surrogates:  # the UTF-8 form of a surrogate, which json.loads(bytes) would have read
        return json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return json.dumps(obj, ensure_ascii=True).encode("ascii")  # NaN/Infinity written as such: JSON has neither


def storable(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" not in value and not any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, dict):
        return all(storable(k) and storable(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(storable(v) for v in value)
    if isinstance(value, bool) or value is None:
        return True
    if isinstance(value, int):
        return abs(value) <= MAX_INTEGER
    if isinstance(value, float):
        return math.isfinite(value)
    return True


@SETTINGS
@given(st.binary(max_size=300), st.sampled_from(MODELS))
def test_any_bytes_give_an_event_or_invalid_event(data: bytes, model: Any) -> None:
    with contextlib.suppress(InvalidEvent):  # anything else fails the test
        decode(data, model)


@SETTINGS
@given(model=st.sampled_from([Checkin, Crisis]), field=st.sampled_from(["title", "citizen_id", "lat", "version", "extra",
                                                                        "references", "observed_at", "geometry"]),
       value=json_values, depth=st.sampled_from([0, 0, 0, 60, 70, 1200]), raw_surrogates=st.booleans())
def test_what_is_accepted_encodes_again_and_holds_nothing_postgresql_refuses(
        model: Any, field: str, value: Any, depth: int, raw_surrogates: bool) -> None:
    obj = {**TEMPLATES[model], field: deeply(depth, value)}
    try:
        data = as_bytes(obj, raw_surrogates)
    except ValueError:
        return
    try:
        event = decode(data, model)
    except InvalidEvent as exc:
        assert exc.field.startswith("$") and exc.reason
        return
    again = encode(event)  # no UnicodeEncodeError
    assert decode(again, model) == event
    assert storable(event.to_dict())
    assert storable(json.loads(data))  # nothing unstorable was hidden anywhere, not even in an extra field
