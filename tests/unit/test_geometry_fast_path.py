"""The normaliser's fast path gives exactly what the per-vertex one gave.

:func:`pipeline.domain.geometry.normalise_geometry` reads plain rings in one array call, builds the
polygon from arrays and writes coordinates back from arrays, because admitting a thousand active
crises at a worker's start spent most of its time reading coordinates one by one. Every stage must
still see the very area it saw before (a crisis's area is compared and republished byte for byte),
so here the earlier implementation of those three steps is put back in place and both are run on
the benchmark's 1,000 city areas, on inputs chosen to be awkward, and on random rings: results, and
refusals with their reasons, must be identical.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
import shapely
from hypothesis import given, settings
from hypothesis import strategies as st
from shapely.geometry import Polygon

from pipeline.domain import geometry
from pipeline.domain.geometry import GeometryError, normalise_geometry


# -- the per-vertex implementation the fast path replaced, as it was --------------------------------
def _reference_read_polygon(raw: Any) -> list[list[tuple[float, float]]]:
    if not isinstance(raw, Sequence) or isinstance(raw, str):
        raise GeometryError("polygon coordinates must be a list of rings")
    rings: list[list[tuple[float, float]]] = []
    for index, raw_ring in enumerate(raw):
        ring = _reference_read_ring(raw_ring)
        if ring is None:
            if index == 0:
                return []
            continue
        rings.append(ring)
    return rings


def _reference_read_ring(raw: Any) -> list[tuple[float, float]] | None:
    if not isinstance(raw, Sequence) or isinstance(raw, str):
        raise GeometryError("a ring must be a list of positions")
    ring: list[tuple[float, float]] = []
    for position in raw:
        if not isinstance(position, Sequence) or isinstance(position, str) or len(position) < 2:
            raise GeometryError(f"a position must be [lon, lat], got {position!r}"[:200])
        lon, lat = geometry._number(position[0], "longitude"), geometry._number(position[1], "latitude")
        geometry._check_lon(lon)
        geometry._check_lat(lat)
        if not ring or ring[-1] != (lon, lat):
            ring.append((lon, lat))
    if len(ring) > 1 and ring[0] == ring[-1]:
        ring.pop()
    if len(ring) < 3:
        return None
    ring.append(ring[0])
    return ring


def _reference_unwrapped_polygon(rings: list[list[tuple[float, float]]]) -> Any:
    shell_lon, shell_lat, turns = geometry._unwrap(np.asarray(rings[0], dtype=float))
    if abs(turns) > 1:
        raise GeometryError("a ring winds around the globe more than once")
    shell = list(zip(shell_lon.tolist(), shell_lat.tolist(), strict=True))
    if turns:
        pole = -90.0 if float(np.mean(shell_lat)) < 0 else 90.0
        shell = [*shell, (float(shell_lon[-1]), pole), (float(shell_lon[0]), pole), shell[0]]
    centre = float(np.mean(shell_lon))
    holes = []
    for ring in rings[1:]:
        lon, lat, hole_turns = geometry._unwrap(np.asarray(ring, dtype=float))
        if hole_turns:
            raise GeometryError("a hole encircles a pole")
        lon = lon + 360.0 * round((centre - float(np.mean(lon))) / 360.0)
        holes.append(list(zip(lon.tolist(), lat.tolist(), strict=True)))
    repaired = geometry._areal(shapely.make_valid(Polygon(shell, holes)))
    return None if repaired.is_empty else repaired


def _reference_to_geojson(polygons: Any) -> dict[str, Any]:
    coordinates = [[[[x, y] for x, y in ring.coords] for ring in (p.exterior, *p.interiors)] for p in polygons]
    if len(coordinates) == 1:
        return {"type": "Polygon", "coordinates": coordinates[0]}
    return {"type": "MultiPolygon", "coordinates": coordinates}


@pytest.fixture
def reference(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Any], Any]]:
    """The normaliser as it was before the fast path (called inside the fixture's patch only)."""

    def run(area: Any) -> Any:
        with monkeypatch.context() as patch:
            patch.setattr(geometry, "_read_polygon", _reference_read_polygon)
            patch.setattr(geometry, "_unwrapped_polygon", _reference_unwrapped_polygon)
            patch.setattr(geometry, "_to_geojson", _reference_to_geojson)
            return outcome(area)

    yield run


def outcome(area: Any) -> Any:
    """The normalised area, or the refusal's type and reason, as a value to compare."""
    try:
        return normalise_geometry(area)
    except (GeometryError, ValueError, TypeError, ArithmeticError) as exc:
        return (type(exc).__name__, str(exc))


def same_outcome(area: Any, reference: Callable[[Any], Any]) -> None:
    old, new = reference(area), outcome(area)
    assert repr(new) == repr(old)  # repr: -0.0 and 0.0, int and float told apart


def ring(*points: tuple[float, float]) -> list[list[float]]:
    return [[lon, lat] for lon, lat in points]


SQUARE = ring((0, 0), (10, 0), (10, 10), (0, 10), (0, 0))
AWKWARD: dict[str, Any] = {
    "square": {"type": "Polygon", "coordinates": [SQUARE]},
    "clockwise": {"type": "Polygon", "coordinates": [SQUARE[::-1]]},
    "open ring": {"type": "Polygon", "coordinates": [SQUARE[:-1]]},
    "bowtie": {"type": "Polygon", "coordinates": [ring((0, 0), (10, 10), (10, 0), (0, 10), (0, 0))]},
    "hole": {"type": "Polygon", "coordinates": [SQUARE, ring((2, 2), (2, 4), (4, 4), (4, 2), (2, 2))]},
    "hole outside": {"type": "Polygon", "coordinates": [SQUARE, ring((20, 20), (20, 24), (24, 24), (20, 20))]},
    "degenerate hole": {"type": "Polygon", "coordinates": [SQUARE, ring((2, 2), (3, 3), (2, 2))]},
    "overlapping multipolygon": {"type": "MultiPolygon", "coordinates": [
        [SQUARE], [ring((5, 5), (15, 5), (15, 15), (5, 15), (5, 5))], [ring((40, 40), (41, 40), (41, 41), (40, 40))]]},
    "fiji across the antimeridian": {"type": "Polygon", "coordinates": [
        ring((177, -16), (-178, -16), (-178, -19), (177, -19), (177, -16))]},
    "fiji unwrapped past 180": {"type": "Polygon", "coordinates": [ring((177, -16), (182, -16), (182, -19), (177, -19))]},
    "west of -180": {"type": "Polygon", "coordinates": [ring((-185, 10), (-175, 10), (-175, 20), (-185, 20))]},
    "on the seam": {"type": "Polygon", "coordinates": [ring((170, 0), (180, 0), (180, 5), (170, 5))]},
    "around the south pole": {"type": "Polygon", "coordinates": [
        ring((-180, -70), (-90, -72), (0, -70), (90, -72), (180, -70))]},
    "around the north pole, holed": {"type": "Polygon", "coordinates": [
        ring((0, 80), (120, 80), (240, 80), (360, 80)), ring((10, 85), (20, 85), (20, 86), (10, 85))]},
    "duplicate closing points": {"type": "Polygon", "coordinates": [[*SQUARE, [0, 0], [0, 0]]]},
    "repeated vertices": {"type": "Polygon", "coordinates": [
        ring((0, 0), (0, 0), (10, 0), (10, 0), (10, 0), (10, 10), (0, 10), (0, 0))]},
    "spike": {"type": "Polygon", "coordinates": [ring((0, 0), (10, 0), (10, 10), (15, 15), (10, 10), (0, 10), (0, 0))]},
    "tiny sliver": {"type": "Polygon", "coordinates": [ring((0, 0), (1, 1e-7), (2, 0), (1, 1e-7 / 2), (0, 0))]},
    "sliver beside a square": {"type": "MultiPolygon", "coordinates": [
        [SQUARE], [ring((10, 0), (20, 0), (20, 1e-12), (10, 0))]]},
    "collapses to a line": {"type": "Polygon", "coordinates": [ring((0, 0), (1, 1), (2, 2), (0, 0))]},
    "negative zero": {"type": "Polygon", "coordinates": [ring((-0.0, -0.0), (10, 0), (10, 10), (0.0, 10), (0, -0.0))]},
    "integers": {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]},
    "tuples": {"type": "Polygon", "coordinates": (((0.0, 0.0), (10.0, 0.0), (10.0, 10.0), (0.0, 0.0)),)},
    "altitudes": {"type": "Polygon", "coordinates": [[[0, 0, 5], [10, 0, 5], [10, 10, 5], [0, 0, 5]]]},
    "numbers as text": {"type": "Polygon", "coordinates": [[["0", "0"], ["10", "0"], ["10", "10"], ["0", "0"]]]},
    "mixed positions": {"type": "Polygon", "coordinates": [[[0, 0], [10, 0, 1], (10, 10), [0, 0]]]},
    "huge vertex count": {"type": "Polygon", "coordinates": [
        [[math.cos(a), math.sin(a)] for a in np.linspace(0, 2 * math.pi, 60_000)]]},
    # refused: the reason must be the one the per-vertex reader gave
    "bool coordinate": {"type": "Polygon", "coordinates": [[[0, 0], [True, 0], [10, 10], [0, 0]]]},
    "nan": {"type": "Polygon", "coordinates": [[[0, 0], [math.nan, 0], [10, 10], [0, 0]]]},
    "infinite": {"type": "Polygon", "coordinates": [[[0, 0], [10, math.inf], [10, 10], [0, 0]]]},
    "latitude out of range": {"type": "Polygon", "coordinates": [[[0, 0], [10, 91], [10, 10], [0, 0]]]},
    "longitude out of range": {"type": "Polygon", "coordinates": [[[0, 0], [541, 0], [10, 10], [0, 0]]]},
    "huge integer": {"type": "Polygon", "coordinates": [[[0, 0], [10**400, 0], [10, 10], [0, 0]]]},
    "null coordinate": {"type": "Polygon", "coordinates": [[[0, 0], [None, 0], [10, 10], [0, 0]]]},
    "short position": {"type": "Polygon", "coordinates": [[[0, 0], [10], [10, 10], [0, 0]]]},
    "position as text": {"type": "Polygon", "coordinates": [[[0, 0], "10,0", [10, 10], [0, 0]]]},
    "ring as text": {"type": "Polygon", "coordinates": ["0 0, 1 1"]},
    "empty ring": {"type": "Polygon", "coordinates": [[]]},
    "two points": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [0, 0]]]},
    "whole globe": {"type": "Polygon", "coordinates": [ring((-180, -90), (180, -90), (180, 90), (-180, 90))]},
    "winds twice": {"type": "Polygon", "coordinates": [
        ring(*[(-170 + 100 * i, 10.0) for i in range(8)], (-170, 20.0))]},
}


@pytest.mark.parametrize("name", sorted(AWKWARD))
def test_awkward_areas_come_out_as_before(name: str, reference: Callable[[Any], Any]) -> None:
    same_outcome(AWKWARD[name], reference)


def test_refusals_are_still_refusals() -> None:
    """The comparison above is not vacuous: the refused cases are refused, the others are not."""
    refused = {name for name in AWKWARD if isinstance(outcome(AWKWARD[name]), tuple)}
    assert {"bool coordinate", "nan", "infinite", "latitude out of range", "longitude out of range", "huge integer",
            "null coordinate", "short position", "position as text", "ring as text", "empty ring", "two points",
            "whole globe", "winds twice", "collapses to a line", "huge vertex count"} <= refused
    assert {"square", "bowtie", "hole", "fiji across the antimeridian", "around the south pole", "tiny sliver"}.isdisjoint(refused)


def test_the_benchmark_areas_come_out_as_before(reference: Callable[[Any], Any]) -> None:
    """The 1,000 city areas of ``python -m bench.worker`` (star-shaped rings of 20–500 vertices)."""
    from bench.worker import city_crises

    crises, _ = city_crises(1000, np.random.default_rng(3), datetime(2026, 1, 1, tzinfo=UTC))
    areas = [json.loads(raw)["geometry"] for raw in crises]
    assert [repr(outcome(a)) for a in areas] == [repr(reference(a)) for a in areas]


@st.composite
def rings(draw: st.DrawFn) -> dict[str, Any]:
    """Any ring, often invalid: near the antimeridian or a pole, with repeats, ints and open ends."""
    lon0 = draw(st.sampled_from([0.0, 179.0, -179.5, 185.0]))
    lat0 = draw(st.sampled_from([0.0, 60.0, -85.0]))
    coordinate = st.floats(-6.0, 6.0) | st.integers(-6, 6)
    offsets = draw(st.lists(st.tuples(coordinate, coordinate), min_size=2, max_size=14))
    positions = [[lon0 + dx, max(-90.0, min(90.0, lat0 + dy))] for dx, dy in offsets]
    if draw(st.booleans()):
        positions.insert(draw(st.integers(0, len(positions))), list(positions[0]))
    if draw(st.booleans()):
        positions.append(list(positions[0]))
    holes = [[[lon0 + 0.1, lat0], [lon0 + 0.2, lat0], [lon0 + 0.2, lat0 + 0.1], [lon0 + 0.1, lat0]]] if draw(st.booleans()) else []
    return {"type": "Polygon", "coordinates": [positions, *holes]}


@settings(max_examples=300, deadline=None)
@given(rings())
def test_random_rings_come_out_as_before(area: dict[str, Any]) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(geometry, "_read_polygon", _reference_read_polygon)
        patch.setattr(geometry, "_unwrapped_polygon", _reference_unwrapped_polygon)
        patch.setattr(geometry, "_to_geojson", _reference_to_geojson)
        old = outcome(area)
    assert repr(outcome(area)) == repr(old)
