"""The check-in fast path and the JSON Schema validator agree exactly: the same event for what the
schema accepts, nothing for what it refuses (the full validator then gives the reason)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import Checkin, InvalidEvent, from_obj
from schemas.codec import _checkin_fast_path

VALID = {"schema": "checkin/1", "citizen_id": "c-1", "lat": -6.2, "lon": 106.8, "accuracy_m": 12.5,
         "observed_at": "2026-01-01T12:00:00+07:00", "source": "app"}

values = st.one_of(st.none(), st.booleans(), st.integers(-1000, 100_000), st.floats(allow_nan=False),
                   st.text(max_size=40), st.sampled_from(["app", "sms", "2026-01-01T12:00:00Z", "2026-13-01T12:00:00Z",
                                                          "2026-01-01 12:00:00", "x" * 129, "-bad", "ok:id/1", "c-1\n",
                                                          "2026-01-01T12:00:00Z\n", "9999-12-31T23:59:59-01:00",
                                                          "0001-01-01T00:00:00+01:00", "9999-12-30T00:00:00Z", "٢٠٢٦",
                                                          "app\n"]),
                   st.sampled_from([2**63, -(2**63), 10**30, 90, 90.0, -180]),
                   st.lists(st.integers(), max_size=2))


def full(obj: dict[str, Any]) -> Checkin | None:
    try:
        return from_obj(obj, Checkin)
    except InvalidEvent:
        return None


@settings(max_examples=400, deadline=None)
@given(field=st.sampled_from([*VALID, "accuracy_m"]), value=values, drop=st.booleans())
def test_fast_path_agrees_with_the_schema(field: str, value: Any, drop: bool) -> None:
    obj = json.loads(json.dumps(VALID))
    if drop:
        obj.pop(field, None)
    else:
        obj[field] = value
    assert _checkin_fast_path()(obj) == full(obj)


def test_fast_path_accepts_the_ordinary_checkin() -> None:
    assert _checkin_fast_path()(dict(VALID)) == full(dict(VALID)) is not None
