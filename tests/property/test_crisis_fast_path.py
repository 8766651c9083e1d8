"""msgspec's crisis path (:mod:`schemas.fast_crisis`) and the JSON Schema path agree: on every message of
a corpus of valid, mutated and generated crises (the bench's 1,000 areas, every edge value in every
field, the geometry fixtures and their mutations, byte-level changes), the fast path gives either
nothing (the full path then decides, with its reason) or exactly the crisis the full path gives; and it
gives the crisis for every plain valid one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pipeline.testing import make_crisis
from schemas import Crisis, encode
from schemas.fast_crisis import crisis
from tests import fast_path_checks
from tests.fast_path_checks import FRAMING_MUTATIONS, agreed

VALID: dict[str, Any] = {**json.loads(encode(make_crisis("k-1", expires=None))), "language": "en-GB"}
FIELDS = [*VALID]
SQUARE: list[Any] = [[0.0, 0.0], [1, 0], [1.0, 1.0], [0, 1.5], [0.0, 0.0]]
FIXTURES = Path(__file__).parent.parent / "fixtures" / "geometry"
AREAS: list[Any] = [
    None, {"type": "Polygon", "coordinates": [SQUARE]}, {"type": "MultiPolygon", "coordinates": [[SQUARE], [SQUARE, SQUARE]]},
    *(json.loads(path.read_text()) for path in sorted(FIXTURES.glob("*.geojson"))),
]
EDGES: list[Any] = [
    "k-1", "", "x" * 128, "x" * 129, "-bad", "a@b.c/1:2", "k-1\n", "k 1", "é", "\u0000", "\ud800", "٢",
    "upsert", "cancel", "Upsert", "operator", "cap", "met", "other", "severe", "extreme", "unknown", "immediate",
    "observed", "actual", "draft", "exercise", "x" * 35, "x" * 36, "x" * 500, "x" * 501, "x" * 1024, "x" * 1025,
    "2026-01-01T12:00:00Z", "2026-01-01t12:00:00z", "2026-01-01T12:00:00Z\n", "2026-01-01T12:00:00",
    "2026-13-01T12:00:00Z", "2026-02-30T12:00:00Z", "2026-01-01T12:00:00.123456789+01:00", "9999-12-31T23:59:59-01:00",
    "0001-01-01T00:00:00+01:00", ["ID"], ["ID", "ID"], ["ID", "FR"], ["id"], ["IDN"], [], ["x" * 1025], ["a", "b"],
    [1], ["ID\n"], 0, 1, -1, 2**63 - 1, 2**63, 1.0, 1.5, 1000, 1000.5, 0.0, -0.0, 1e-300, True, False, None, {}, "1",
    {"a": 1}, *AREAS[1:3],
]
values = st.one_of(st.sampled_from(EDGES), st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                   st.text(max_size=20), st.lists(st.text(max_size=3), max_size=3),
                   st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:@/-]{0,10}\Z"))


def full(raw: bytes) -> Crisis | None:
    return fast_path_checks.full(raw, Crisis)


def verdict(raw: bytes) -> Crisis | None:
    return agreed(raw, Crisis, crisis, raw[:300])


def plain(**changes: Any) -> bytes:
    return json.dumps({**VALID, **changes}, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")


BYTE_MUTATIONS = [*FRAMING_MUTATIONS,
    lambda b: b.replace(b'"k-1"', b'"k\\u002d1"', 1), lambda b: b.replace(b'"k-1"', b'"k-1\\u0000"', 1),
    lambda b: b.replace(b'"k-1"', b'"k-1\\ud800"', 1), lambda b: b.replace(b'"k-1"', b'"k-1\xff"', 1),
    lambda b: b.replace(b'"op":"upsert"', b'"op":"upsert","op":"nope"'),
    lambda b: b.replace(b'"op":"upsert"', b'"op":"nope","op":"upsert"'),
    lambda b: b.replace(b'"buffer_km":0.0', b'"buffer_km":1e400'), lambda b: b.replace(b'"buffer_km":0.0', b'"buffer_km":NaN'),
    lambda b: b.replace(b'"buffer_km":0.0', b'"buffer_km":' + b"9" * 5000),
    lambda b: b.replace(b'"buffer_km":0.0', b'"buffer_km":0.00000000000000000001'),
    lambda b: b.replace(b'"version":1', b'"version":1.0'), lambda b: b.replace(b'"version":1', b'"version":' + b"9" * 19),
    lambda b: b.replace(b'"coordinates":[[[', b'"coordinates":[[[1e400,0],[', 1),
    lambda b: b.replace(b'"coordinates":[[[', b'"coordinates":[[[' + b"1" * 19 + b",0],[", 1),
]


def area_mutations(area: Any) -> list[Any]:
    ring = [list(p) for p in SQUARE]
    return [area, {**(area or {}), "extra": [1]}, {"type": "Polygon"}, {"coordinates": [SQUARE]},
            {"type": "Polygon", "coordinates": []}, {"type": "Polygon", "coordinates": [ring[:3]]},
            {"type": "Polygon", "coordinates": [[*ring[:3], [0, 0, 0, 0]]]}, {"type": "Polygon", "coordinates": [[*ring[:3], [0]]]},
            {"type": "Polygon", "coordinates": [[*ring[:3], [0, True]]]}, {"type": "Polygon", "coordinates": [[*ring[:3], ["0", 0]]]},
            {"type": "Polygon", "coordinates": [[*ring[:3], [0.0, 0.0, 5]]]}, {"type": "Polygon", "coordinates": [[*ring[:3], None]]},
            {"type": "MultiPolygon", "coordinates": [SQUARE]}, {"type": "MultiPolygon", "coordinates": [[]]},
            {"type": "MultiPolygon", "coordinates": []}, {"type": "Point", "coordinates": [0, 0]},
            {"type": ["Polygon"], "coordinates": [SQUARE]}, "Polygon", [], 0, {"type": "polygon", "coordinates": [SQUARE]},
            {"type": "Polygon", "coordinates": [SQUARE], "bbox": [0, 0, 1, 1]}, {"coordinates": [SQUARE], "type": "Polygon"}]


def test_the_bench_crises_all_take_the_fast_path_to_the_same_crisis() -> None:
    from bench.workload import workload

    for event in workload(1000).crises:
        raw = encode(event)
        assert crisis(raw) == full(raw) is not None


def test_the_projects_builders_crises_take_the_fast_path() -> None:
    for event in (make_crisis("k-1"), make_crisis("c", op="cancel", geometry=None), make_crisis("x@y/1", version=10**18 - 1,
                  buffer_km=1000.0, country_codes=("FR", "DE"), status="exercise")):
        assert crisis(encode(event)) == full(encode(event)) is not None
    assert verdict(plain()) is not None
    without = {k: v for k, v in VALID.items() if k not in ("language", "status")}
    assert crisis(json.dumps(without).encode()) == full(json.dumps(without).encode()) is not None


@pytest.mark.parametrize("index", range(len(BYTE_MUTATIONS)))
def test_byte_level_mutations_get_the_full_paths_verdict(index: int) -> None:
    verdict(BYTE_MUTATIONS[index](plain()))


@pytest.mark.parametrize("value", EDGES, ids=repr)
@pytest.mark.parametrize("field", FIELDS)
def test_every_edge_value_in_every_field_gets_the_full_paths_verdict(field: str, value: Any) -> None:
    verdict(plain(**{field: value}))


@pytest.mark.parametrize("area", [m for area in AREAS for m in area_mutations(area)], ids=repr)
def test_areas_and_their_mutations_get_the_full_paths_verdict(area: Any) -> None:
    verdict(plain(geometry=area))


area_parts = st.recursive(st.one_of(st.sampled_from([0, 1.5, -180, 1e300, True, None, "1", 2**70]), st.floats()),
                          lambda inner: st.lists(inner, max_size=6), max_leaves=40)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=st.dictionaries(st.sampled_from([*FIELDS, "extra"]), values, max_size=3),
       drop=st.lists(st.sampled_from(FIELDS), max_size=2), mutation=st.none() | st.sampled_from(range(len(BYTE_MUTATIONS))),
       area=st.none() | st.sampled_from(AREAS) | area_parts.map(lambda c: {"type": "Polygon", "coordinates": c})
       | area_parts.map(lambda c: {"type": "MultiPolygon", "coordinates": c}))
@example(changes={}, drop=["language"], mutation=None, area=None)
def test_generated_crises_get_the_full_paths_verdict(changes: dict[str, Any], drop: list[str], mutation: int | None,
                                                     area: Any) -> None:
    obj = {**VALID, **changes}
    if area is not None:
        obj["geometry"] = area
    for name in drop:
        obj.pop(name, None)
    raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")
    if mutation is not None:
        raw = BYTE_MUTATIONS[mutation](raw)
    got = verdict(raw)
    if not changes and drop in ([], ["language"], ["status"]) and mutation is None and area is None:
        assert got is not None
