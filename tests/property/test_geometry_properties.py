"""Properties of the geometry normaliser that must hold for any polygon a feed can send."""

from __future__ import annotations

import math
from typing import Any

import pytest
import shapely
from hypothesis import given, settings
from hypothesis import strategies as st
from shapely.geometry import Point, Polygon, shape

from pipeline.domain.geometry import GeometryError, bbox, circle, globe_share, normalise_geometry
from pipeline.testing import assert_normalised_area

SETTINGS = settings(max_examples=120, deadline=None)


def wrap(lon: float) -> float:
    return ((lon + 180.0) % 360.0) - 180.0


@st.composite
def star_polygons(draw: st.DrawFn) -> tuple[dict[str, Any], tuple[float, float], Polygon]:
    """A star-shaped ring around a centre (so the centre is well inside), written the way feeds do:
    any vertex may be shifted by ±360°, the ring may be left open, the centre may lie past ±180."""
    centre_lon = draw(st.floats(-200.0, 200.0))
    centre_lat = draw(st.floats(-60.0, 60.0))
    n = draw(st.integers(3, 24))
    # jittered even angles: consecutive vertices less than 180° apart seen from the centre
    jitter = draw(st.lists(st.floats(0.0, 0.8 if n > 3 else 0.0), min_size=n, max_size=n))
    angles = [2 * math.pi * (i + j) / n for i, j in enumerate(jitter)]
    radii = draw(st.lists(st.floats(0.05, 20.0), min_size=n, max_size=n))
    extended = [(centre_lon + r * math.cos(a), centre_lat + r * math.sin(a)) for a, r in zip(angles, radii, strict=True)]
    shifts = draw(st.lists(st.sampled_from([-360.0, 0.0, 360.0]), min_size=n, max_size=n))
    ring = [[lon + s if abs(lon + s) <= 540 else lon, lat] for (lon, lat), s in zip(extended, shifts, strict=True)]
    if draw(st.booleans()):
        ring.append(list(ring[0]))
    return {"type": "Polygon", "coordinates": [ring]}, (wrap(centre_lon), centre_lat), Polygon(extended)


@st.composite
def arbitrary_polygons(draw: st.DrawFn) -> dict[str, Any]:
    """Any ring at all: self-intersecting, spiky, repeated vertices, crossing the antimeridian."""
    lon0 = draw(st.floats(-190.0, 190.0))
    lat0 = draw(st.floats(-70.0, 70.0))
    offsets = draw(st.lists(st.tuples(st.floats(-15.0, 15.0), st.floats(-15.0, 15.0)), min_size=3, max_size=20))
    ring = [[wrap(lon0 + dx) if draw(st.booleans()) else lon0 + dx, lat0 + dy] for dx, dy in offsets]
    if draw(st.booleans()) and len(ring) > 3:
        ring.insert(2, list(ring[1]))  # a repeated vertex: a spike when the ring folds back
    return {"type": "Polygon", "coordinates": [ring]}


def part_widths(geojson: dict[str, Any]) -> list[float]:
    return [p.bounds[2] - p.bounds[0] for p in shapely.get_parts(shape(geojson))]


@SETTINGS
@given(star_polygons())
def test_star_polygon_is_well_formed_narrow_and_keeps_its_centre(case: tuple[dict[str, Any], tuple[float, float], Polygon]) -> None:
    raw, (lon, lat), extended = case
    out = normalise_geometry(raw)
    assert_normalised_area(out)
    # never a band around the globe: no part is wider than the original shape
    assert max(part_widths(out)) <= (extended.bounds[2] - extended.bounds[0]) + 1e-9
    # same area as the shape drawn continuously (splitting only moves pieces by 360°)
    assert shape(out).area == pytest.approx(extended.area, rel=1e-9)
    assert shape(out).covers(Point(lon, lat))


@SETTINGS
@given(star_polygons())
def test_normalising_is_idempotent(case: tuple[dict[str, Any], tuple[float, float], Polygon]) -> None:
    # Exactly, not just the same shape: every stage normalises what it reads (pipeline.domain.validation), so an
    # area published by the API or a feed parser must come out of the worker and the sink unchanged.
    once = normalise_geometry(case[0])
    assert normalise_geometry(once) == once


@SETTINGS
@given(arbitrary_polygons())
def test_any_ring_is_repaired_or_refused_with_a_reason(raw: dict[str, Any]) -> None:
    try:
        out = normalise_geometry(raw)
    except GeometryError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert_normalised_area(out)
    assert max(part_widths(out)) <= 30.0 + 1e-9
    assert normalise_geometry(out) == out


@SETTINGS
@given(st.floats(-85.0, 85.0), st.floats(-180.0, 180.0), st.floats(0.0, 2000.0))
def test_circle_is_well_formed_and_holds_its_centre(lat: float, lon: float, radius_km: float) -> None:
    out = circle(lat, lon, radius_km)
    assert_normalised_area(out)
    assert shape(out).covers(Point(wrap(lon), lat))
    assert normalise_geometry(out) == out


@SETTINGS
@given(st.floats(-179.9, 179.9), st.floats(0.1, 359.0), st.floats(-80.0, 79.0), st.floats(0.1, 10.0))
def test_a_box_of_any_width_across_the_antimeridian_reads_back_as_itself(west: float, width: float, south: float,
                                                                         height: float) -> None:
    # GDACS writes "175 -175"; a box wider than 180° comes out as two parts whose long edges, read again with the
    # shorter-way-round rule, would describe the narrow box between them unless they are densified.
    east = wrap(west + width)
    try:
        out = bbox(west, east, south, min(south + height, 90.0))
    except GeometryError:
        return
    assert_normalised_area(out)
    assert normalise_geometry(out) == out
    assert globe_share(out) == pytest.approx(globe_share(normalise_geometry(out)))
    assert shape(out).area == pytest.approx(width * (min(south + height, 90.0) - south), rel=1e-6)


def test_the_multipolygon_of_a_wide_box_keeps_its_width_when_read_again() -> None:
    wide = bbox(136.44, 75.26, 0.0, 1.0)  # 298.8° wide, from 136.44 east across the antimeridian to 75.26
    assert wide["type"] == "MultiPolygon"
    assert shape(normalise_geometry(wide)).area == pytest.approx(298.82, abs=1e-6)
