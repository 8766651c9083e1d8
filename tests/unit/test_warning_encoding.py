"""The worker's warning encoder (:func:`schemas.fast.encode_warnings`, msgspec) writes what
:func:`schemas.encode` writes: the same keys in the same order with the same values, and every
warning reads back as itself, on a corpus of ordinary and awkward warnings."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import Warning, decode, encode
from schemas.fast import encode_warnings

T0 = datetime(2026, 3, 1, 12, 30, tzinfo=UTC)


def warning(i: int, **changes: object) -> Warning:
    fields: dict[str, object] = dict(
        warning_id=f"w-{i:032x}", citizen_id=f"citizen-{i}", crisis_id="flood", crisis_version=3, kind="entered",
        severity="severe", title="Flood warning", instruction="Move to higher ground.", distance_km=0.0,
        lat=-6.2 + i / 1000, lon=106.8, observed_at=T0 - timedelta(seconds=i), emitted_at=T0, country_codes=("ID",))
    fields.update(changes)
    return Warning(**fields)  # type: ignore[arg-type]


CORPUS = [
    warning(0),
    warning(1, kind="near", distance_km=4.123456789012345, country_codes=()),
    warning(2, title="Überschwemmung — «évacuez» 洪水警报 🌊", instruction='quote " backslash \\ tab \t newline \n'),
    warning(3, observed_at=datetime(2026, 3, 1, 18, 0, 0, 123456, tzinfo=timezone(timedelta(hours=5, minutes=30)))),
    warning(4, lat=-89.999999, lon=179.999999, distance_km=12345.6789, country_codes=("FR", "DE", "BE")),
    warning(5, kind="all_clear", distance_km=1e-07, lat=0.1, lon=-0.30000000000000004),
    warning(6, instruction="\u2028 line separator, control \x01 char", crisis_version=2**40),
]


def test_the_same_json_as_the_generic_encoder() -> None:
    for w, fast in zip(CORPUS, encode_warnings(CORPUS), strict=True):
        assert list(json.loads(fast).items()) == list(json.loads(encode(w)).items())  # keys in order, values equal
        assert decode(fast, Warning) == w


def test_times_shared_by_a_batch_are_each_written_right() -> None:
    batch = [warning(i, observed_at=T0 - timedelta(minutes=i % 3)) for i in range(20)]
    assert [json.loads(b) for b in encode_warnings(batch)] == [json.loads(encode(w)) for w in batch]
    assert encode_warnings([]) == []


@settings(max_examples=200, deadline=None)
@given(title=st.text(max_size=60), distance=st.floats(min_value=0, max_value=20_000, allow_nan=False),
       lat=st.floats(min_value=-90, max_value=90), lon=st.floats(min_value=-180, max_value=180))
def test_generated_warnings_agree(title: str, distance: float, lat: float, lon: float) -> None:
    w = warning(7, title=title, distance_km=distance, lat=lat, lon=lon)
    (fast,) = encode_warnings([w])
    assert list(json.loads(fast).items()) == list(json.loads(encode(w)).items())
