"""msgspec's check-in path (:mod:`schemas.fast`) and the JSON Schema path agree: on every message of a
corpus of valid, mutated and generated check-ins, the fast path gives either nothing (the full path then
decides, with its reason) or exactly the event the full path gives; it gives the event for every plain
valid check-in; and an event it accepts is encoded and read back unchanged, as a stage will read it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pipeline.domain.validation import decode_event
from pipeline.testing import make_crisis, square
from producers.api import MAX_BATCH, decode_json, parse_checkin_body, parse_checkins
from schemas import Checkin, InvalidEvent, check, encode
from schemas.codec import parse_json, validator
from schemas.fast import api_checkins, checkin
from tests import fast_path_checks
from tests.fast_path_checks import FRAMING_MUTATIONS, agreed

VALID: dict[str, Any] = {"schema": "checkin/1", "citizen_id": "c-1", "lat": -6.2, "lon": 106.8, "accuracy_m": 12.5,
                         "observed_at": "2026-01-01T12:00:00+07:00", "source": "app"}
FIELDS = [*VALID]
CRISIS: dict[str, Any] = json.loads(encode(make_crisis("k-1")))

# Values that sit on or just past what the schema and the codec allow.
EDGES = ["app", "sms", "manual", "import", "simulator", "App", "app\n", "", "x" * 128, "x" * 129, "-bad", "ok:id/1",
         "a@b.c", "c-1\n", "c 1", "٢٠٢٦", "\u0000", "\ud800", "é", "2026-01-01T12:00:00Z", "2026-01-01t12:00:00z",
         "2026-01-01T12:00:00Z\n", "2026-01-01 12:00:00Z", "2026-01-01T12:00:00", "2026-13-01T12:00:00Z",
         "2026-02-30T12:00:00Z", "2026-01-01T24:00:00Z", "2026-01-01T12:00:00.123456789+01:00",
         "2026-01-01T12:00:00.5-00:00", "2026-01-01T12:00:00+24:00", "9999-12-31T23:59:59-01:00",
         "0001-01-01T00:00:00+01:00", "9999-12-30T00:00:00Z", "0001-01-02T00:00:00Z", "٢٠٢٦-01-01T12:00:00Z",
         2**63, -(2**63), 10**30, 90, 90.0, 90.0000001, -90, -180, 180, 180.5, 0, -0.0, 1e-300, 100_000, 100_000.5,
         -1, True, False, None, [], {}, [1], {"a": 1}, 1.5, "1"]
values = st.one_of(st.sampled_from(EDGES), st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                   st.text(max_size=40), st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:@/-]{0,10}\Z"),
                   st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()))


def full(raw: bytes) -> Checkin | None:
    return fast_path_checks.full(raw, Checkin)


def verdict(raw: bytes) -> Checkin | None:
    fast = agreed(raw, Checkin, checkin)
    if fast is not None:  # what the API publishes without a second decode is what a stage reads
        assert decode_event(encode(fast), Checkin, fast.observed_at) == fast
    return fast


# Byte-level changes no object-level mutation makes: escapes, encodings, duplicates, nesting, framing.
BYTE_MUTATIONS = [*FRAMING_MUTATIONS,
    lambda b: b.replace(b'"c-1"', b'"c\\u002d1"'), lambda b: b.replace(b'"c-1"', b'"c-1\\u0000"'),
    lambda b: b.replace(b'"c-1"', b'"c-1\\ud800"'), lambda b: b.replace(b'"c-1"', b'"c-1\xff"'),
    lambda b: b.replace(b'"c-1"', b'"c-1\xed\xa0\x80"'), lambda b: b.replace(b'"app"', b'"\\u0061pp"'),
    lambda b: b.replace(b'"lat":-6.2', b'"lat":-6.2,"lat":100'), lambda b: b.replace(b'"lat":-6.2', b'"lat":100,"lat":-6.2'),
    lambda b: b.replace(b'"lat":-6.2', b'"lat":1e400'), lambda b: b.replace(b'"lat":-6.2', b'"lat":-6.2e0'),
    lambda b: b.replace(b'"lat":-6.2', b'"lat":NaN'), lambda b: b.replace(b'"lat":-6.2', b'"lat":' + b"9" * 5000),
    lambda b: b.replace(b'"lat":-6.2', b'"lat":-0'), lambda b: b.replace(b'"lat":-6.2', b'"lat":-6.20000000000000000001'),
    lambda b: b.replace(b'"source"', b'"sourc\\u0065"'), lambda b: b[:-1] + b',"x":"\\u0000"}',
    lambda b: b[:-1] + b',"x":' + str(2**63).encode() + b"}", lambda b: b[:-1] + b',"\\ud800":1}',
]


def plain(**changes: Any) -> bytes:
    return json.dumps({**VALID, **changes}, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")


@pytest.mark.parametrize("index", range(len(BYTE_MUTATIONS)))
def test_byte_level_mutations_get_the_full_paths_verdict(index: int) -> None:
    verdict(BYTE_MUTATIONS[index](plain()))


@pytest.mark.parametrize("value", EDGES, ids=repr)
@pytest.mark.parametrize("field", FIELDS)
def test_every_edge_value_in_every_field_gets_the_full_paths_verdict(field: str, value: Any) -> None:
    verdict(plain(**{field: value}))


def test_the_plain_checkins_of_the_projects_builders_all_take_the_fast_path() -> None:
    from pipeline.testing import make_checkin

    for event in (make_checkin("c-1", -6.2, 106.8), make_checkin("u@x.org/2", 90, -180, accuracy_m=None),
                  make_checkin("Z", -90.0, 180.0, observed_at=datetime(2026, 5, 1, tzinfo=UTC), source="sms")):
        assert checkin(encode(event)) == event
    assert checkin(plain()) == full(plain()) is not None
    assert checkin(plain(accuracy_m=None)) is None and full(plain(accuracy_m=None)) is None  # null is not a number


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=st.dictionaries(st.sampled_from([*FIELDS, "extra"]), values, max_size=3),
       drop=st.lists(st.sampled_from(FIELDS), max_size=2), mutation=st.none() | st.sampled_from(range(len(BYTE_MUTATIONS))))
@example(changes={}, drop=["accuracy_m"], mutation=None)
def test_generated_checkins_get_the_full_paths_verdict(changes: dict[str, Any], drop: list[str], mutation: int | None) -> None:
    obj = {**VALID, **changes}
    for name in drop:
        obj.pop(name, None)
    raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")
    if mutation is not None:
        raw = BYTE_MUTATIONS[mutation](raw)
    got = verdict(raw)
    if not changes and not drop and mutation is None:
        assert got is not None


# --- the API's bodies --------------------------------------------------------------------------------------------

NOW = datetime(2026, 1, 1, 5, 0, tzinfo=UTC)


def api_outcome(raw: bytes, full_only: bool = False) -> list[Checkin] | tuple[str, str]:
    try:
        return parse_checkins(decode_json(raw), NOW) if full_only else parse_checkin_body(raw, NOW)
    except InvalidEvent as exc:
        return exc.field, exc.reason
    except ValueError as exc:  # BatchTooLarge
        return "$", str(exc)


items = st.fixed_dictionaries({}, optional={name: st.one_of(st.just(VALID[name]), values) for name in FIELDS})
bodies = st.one_of(st.lists(items, max_size=4), items, st.lists(items, max_size=3).map(lambda xs: {"checkins": xs}),
                   st.lists(items, max_size=3).map(lambda xs: {"checkins": xs, "more": 1}))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies)
@example(body=[{k: v for k, v in VALID.items() if k != "schema"}])
@example(body={"checkins": [VALID, {**VALID, "observed_at": "2026-01-01T12:00:00+01:00"}]})  # 2 h ahead of NOW
def test_api_bodies_get_the_same_checkins_or_the_same_error(body: Any) -> None:
    raw = json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")
    assert api_outcome(raw) == api_outcome(raw, full_only=True)


def test_api_fast_path_takes_plain_batches_and_leaves_the_rest() -> None:
    one = {k: v for k, v in VALID.items() if k != "schema"}
    many = json.dumps([one] * MAX_BATCH).encode()
    assert api_checkins(many, MAX_BATCH) == parse_checkins(json.loads(many), NOW + timedelta(days=1))
    assert api_checkins(json.dumps([one] * (MAX_BATCH + 1)).encode(), MAX_BATCH) is None  # 413 from the full path
    assert api_checkins(b"[]", MAX_BATCH) is None
    assert api_checkins(json.dumps({"checkins": [one]}).encode(), MAX_BATCH) is not None
    assert api_checkins(json.dumps([{**one, "nickname": "x"}]).encode(), MAX_BATCH) is None


# --- a crisis's area: loops for the area, jsonschema for the rest ---------------------------------------------------

FIXTURES = Path(__file__).parent.parent / "fixtures" / "geometry"
SQUARE = [[0.0, 0.0], [1, 0], [1.0, 1.0], [0, 1.5], [0.0, 0.0]]
AREAS: list[Any] = [
    None, {"type": "Polygon", "coordinates": [SQUARE]}, {"type": "MultiPolygon", "coordinates": [[SQUARE], [SQUARE, SQUARE]]},
    *(json.loads(path.read_text()) for path in sorted(FIXTURES.glob("*.geojson"))),
]
area_parts = st.recursive(st.one_of(st.sampled_from([0, 1.5, -180, 1e300, True, None, "1", 2**70]), st.floats()),
                          lambda inner: st.lists(inner, max_size=6) | st.tuples(inner, inner, inner), max_leaves=40)


def area_mutations(area: Any) -> list[Any]:
    ring = [list(p) for p in SQUARE]
    return [area, {**(area or {}), "extra": [1]}, {"type": "Polygon"}, {"coordinates": [SQUARE]},
            {"type": "Polygon", "coordinates": []}, {"type": "Polygon", "coordinates": [ring[:3]]},
            {"type": "Polygon", "coordinates": [[*ring[:3], [0, 0, 0, 0]]]}, {"type": "Polygon", "coordinates": [[*ring[:3], [0]]]},
            {"type": "Polygon", "coordinates": [[*ring[:3], [0, True]]]}, {"type": "Polygon", "coordinates": [[*ring[:3], (0, 0)]]},
            {"type": "Polygon", "coordinates": ([*ring],)}, {"type": "Polygon", "coordinates": [[*ring[:3], ["0", 0]]]},
            {"type": "Polygon", "coordinates": [[*ring[:3], [0.0, 0.0, 5]]]}, {"type": "MultiPolygon", "coordinates": [SQUARE]},
            {"type": "MultiPolygon", "coordinates": [[]]}, {"type": "MultiPolygon", "coordinates": []},
            {"type": "Point", "coordinates": [0, 0]}, {"type": ["Polygon"], "coordinates": [SQUARE]}, "Polygon", [], 0,
            {"type": "Polygon", "coordinates": [SQUARE], "bbox": "x"}, {"type": "polygon", "coordinates": [SQUARE]}]


def schema_verdict(obj: dict[str, Any]) -> tuple[str, str] | None:
    """What :func:`schemas.check` says, next to what jsonschema alone says."""
    alone = next(validator("crisis/1").iter_errors(obj), None) is None
    try:
        check(obj, "crisis/1")
    except InvalidEvent as exc:
        assert not alone, obj
        return exc.field, exc.reason
    assert alone, obj
    return None


@pytest.mark.parametrize("area", [m for area in AREAS for m in area_mutations(area)], ids=repr)
def test_crisis_areas_get_the_schemas_verdict(area: Any) -> None:
    schema_verdict({**CRISIS, "geometry": area})
    schema_verdict({**CRISIS, "geometry": area, "version": 0})  # the rest wrong too: the same first error


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(coordinates=area_parts, kind=st.sampled_from(["Polygon", "MultiPolygon", "Point"]), title=st.sampled_from(["t", 5]))
def test_generated_crisis_areas_get_the_schemas_verdict(coordinates: Any, kind: str, title: Any) -> None:
    schema_verdict({**CRISIS, "title": title, "geometry": {"type": kind, "coordinates": coordinates}})


def test_a_crisis_without_geometry_is_still_refused_for_it() -> None:
    assert schema_verdict({k: v for k, v in CRISIS.items() if k != "geometry"}) is not None


def test_a_crisis_is_admitted_once_per_process_and_a_refused_one_every_time() -> None:
    from pipeline.domain.admission import AdmittedCrises

    crises = AdmittedCrises(capacity=2)
    raw = encode(make_crisis("once-1", square(10, 10, 1)))
    first = crises.admit(raw)
    assert crises.admit(raw) is first and crises.hits == 1
    refused = encode(make_crisis("once-2", {"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [0, 1], [0, 0]]]}))
    for _ in range(2):  # a bow-tie without area... or any refusal: raised each time, never remembered
        with pytest.raises(InvalidEvent):
            crises.admit(refused.replace(b"[0,1]", b"[0,0]"))
    crises.admit(encode(make_crisis("once-3"))), crises.admit(encode(make_crisis("once-4")))
    assert crises.admit(raw) is not first and crises.admit(raw) == first  # forgotten beyond capacity, same verdict


# --- parse_json: msgspec where it can, the json module for the rest -------------------------------------------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                         st.text(max_size=12), st.sampled_from([2**63 - 1, 2**63, -(2**63), 10**18, 1e308, 5e-324, -0.0]))
json_trees = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                          max_leaves=30)
TEXT_MUTATIONS = [lambda t: t, lambda t: "[" * 70 + t + "]" * 70, lambda t: "[" * 64 + t + "]" * 64, lambda t: t + " ",
                  lambda t: t.replace("1", "NaN", 1), lambda t: t.replace("0", "1e400", 1), lambda t: t + ",",
                  lambda t: t.replace("]", "]]", 1), lambda t: '{"a":1,"a":' + t + "}", lambda t: "\ufeff" + t,
                  lambda t: t.replace("1", "1" * 19, 1), lambda t: t.replace("1", "01", 1)]


def parse_outcome(parse: Any, text: str) -> Any:
    try:
        return ("ok", parse(text))
    except InvalidEvent as exc:
        return ("refused", exc.field, exc.reason)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=json_trees, ascii_only=st.booleans(), mutation=st.sampled_from(range(len(TEXT_MUTATIONS))))
def test_parse_json_gives_what_the_json_module_gives(tree: Any, ascii_only: bool, mutation: int) -> None:
    from schemas.codec import MAX_DEPTH, _parse_with_json_module

    text = TEXT_MUTATIONS[mutation](json.dumps(tree, ensure_ascii=ascii_only))
    raw = text.encode("utf-8", "surrogatepass")
    fast = parse_outcome(lambda t: parse_json(raw), text)
    try:
        decoded = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        assert fast[0] == "refused"
        return
    general = parse_outcome(lambda t: _parse_with_json_module(decoded, MAX_DEPTH, True), text)
    assert fast == general
    assert parse_outcome(parse_json, text) == parse_outcome(lambda t: _parse_with_json_module(t, MAX_DEPTH, True), text)
