"""Geometry normalisation on the shapes real feeds publish (own fixtures, and the real samples when present)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import shapely
from shapely.geometry import Point, shape

from pipeline.domain.geometry import (
    MIN_CIRCLE_RADIUS_KM,
    GeometryError,
    bbox,
    circle,
    globe_share,
    normalise_geometry,
    polygon_from_latlon,
    union,
)
from pipeline.testing import assert_normalised_area

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "geometry"
SAMPLES = Path(__file__).resolve().parents[4] / "shared" / "samples" / "tricky"
EARTH_KM2 = 510_065_622.0


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return data


def parts(geojson: dict[str, Any]) -> list[Any]:
    return list(shapely.get_parts(shape(geojson)))


def test_unsplit_polygon_crossing_180_becomes_two_narrow_parts() -> None:
    out = normalise_geometry(load("crossing_180_unsplit.geojson"))
    assert_normalised_area(out)
    east, west = sorted(parts(out), key=lambda p: -p.bounds[0])
    # the edges are cut where they meet 180°: 52.0 + 0.1 * 6/7 and 52.3 + 0.1 * 6/7
    assert east.bounds == pytest.approx((179.4, 52.0, 180.0, 52.3 + 0.6 / 7), abs=1e-9)
    assert west.bounds == pytest.approx((-180.0, 52.0 + 0.6 / 7, -179.9, 52.4), abs=1e-9)
    # 0.7° wide, not a 359° band around the globe
    assert shape(out).covers(Point(179.7, 52.2))
    assert not shape(out).covers(Point(0.0, 52.2))


def test_lon_above_180_and_unclosed_ring_is_closed_and_wrapped() -> None:
    out = normalise_geometry(load("lon_over_180_unclosed.geojson"))
    assert_normalised_area(out)
    area = shape(out)
    assert area.covers(Point(-172.0, 64.3))  # 188°E written as 188
    assert area.covers(Point(179.0, 64.0))
    assert not area.covers(Point(0.0, 64.0))
    assert max(p.bounds[2] - p.bounds[0] for p in parts(out)) < 13.0


def test_presplit_multipolygon_stays_split_and_keeps_its_area() -> None:
    raw = load("presplit_at_180.geojson")
    out = normalise_geometry(raw)
    assert_normalised_area(out)
    assert out["type"] == "MultiPolygon"
    assert len(out["coordinates"]) == 3
    assert shape(out).area == pytest.approx(shape(raw).area, rel=1e-12)
    lons = {lon for p in out["coordinates"] for lon, _ in p[0]}
    assert 180.0 in lons and -180.0 in lons


def test_spike_is_cut_off_and_only_the_area_is_kept() -> None:
    out = normalise_geometry(load("spike.geojson"))
    assert_normalised_area(out)
    assert out["type"] == "Polygon"
    assert shape(out).area == pytest.approx(16.0)
    assert shape(out).bounds == (10.0, 50.0, 14.0, 54.0)


def test_self_touching_ring_becomes_two_triangles() -> None:
    out = normalise_geometry(load("self_touching.geojson"))
    assert_normalised_area(out)
    assert out["type"] == "MultiPolygon"
    assert len(out["coordinates"]) == 2
    assert shape(out).area == pytest.approx(0.5)


def test_empty_polygon_is_refused_with_a_reason() -> None:
    with pytest.raises(GeometryError, match="empty"):
        normalise_geometry(load("empty_polygon.geojson"))


def test_four_vertex_sliver_is_kept() -> None:
    raw = load("sliver.geojson")
    out = normalise_geometry(raw)
    assert_normalised_area(out)
    assert shape(out).area == pytest.approx(shape(raw).area, rel=1e-9)
    assert shape(out).area > 0


@pytest.mark.parametrize(
    ("geojson", "reason"),
    [
        ({"type": "Point", "coordinates": [1.0, 2.0]}, "not a polygon"),
        ({"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [2, 2], [0, 0]]]}, "empty"),
        ({"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 95], [0, 0]]]}, "latitude out of range"),
        ({"type": "Polygon", "coordinates": [[[0, 0], [1, 0], ["x", 1], [0, 0]]]}, "not a number"),
        ({"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [float("nan"), 1], [0, 0]]]}, "not finite"),
        ({"type": "Polygon", "coordinates": [[[-100, -80], [100, -80], [100, 80], [-100, 80]]]}, "of the globe"),
        ({"type": "MultiPolygon", "coordinates": "nope"}, "list of polygons"),
    ],
)
def test_unusable_input_is_refused(geojson: dict[str, Any], reason: str) -> None:
    with pytest.raises(GeometryError, match=reason) as excinfo:
        normalise_geometry(geojson)
    assert "\n" not in str(excinfo.value)


def test_too_many_vertices_is_refused() -> None:
    ring = [[math.cos(a / 100) * 0.1, math.sin(a / 100) * 0.1] for a in range(628)]
    with pytest.raises(GeometryError, match="too many vertices"):
        normalise_geometry({"type": "Polygon", "coordinates": [ring]}, max_vertices=500)


def test_globe_share_limit_is_configurable() -> None:
    wide = {"type": "Polygon", "coordinates": [[[-100, 0], [0, 0], [100, 0], [100, 89], [0, 89], [-100, 89], [-100, 0]]]}
    with pytest.raises(GeometryError, match=r"27\.8% of the globe"):
        normalise_geometry(wide)
    out = normalise_geometry(wide, max_globe_share=0.5)
    assert globe_share(out) == pytest.approx(200 / 360 * math.sin(math.radians(89)) / 2, rel=1e-9)


def test_hole_is_kept_even_when_written_on_the_other_side_of_the_antimeridian() -> None:
    shell = [[175, -10], [185, -10], [185, 0], [175, 0], [175, -10]]
    hole = [[-178, -6], [-178, -4], [178, -4], [178, -6], [-178, -6]]
    out = normalise_geometry({"type": "Polygon", "coordinates": [shell, hole]})
    assert_normalised_area(out)
    area = shape(out)
    assert not area.covers(Point(179.5, -5))
    assert not area.covers(Point(-179.5, -5))
    assert area.covers(Point(176, -8)) and area.covers(Point(-176, -8))


def test_polygon_from_latlon_swaps_to_lonlat() -> None:
    out = polygon_from_latlon([(38.47, -120.14), (38.34, -119.95), (38.52, -119.74), (38.62, -119.89), (38.47, -120.14)])
    assert_normalised_area(out)
    assert shape(out).covers(Point(-119.94, 38.49))


def test_radius_zero_circle_gets_the_minimum_radius() -> None:
    out = circle(32.9525, -115.5527, 0)
    assert_normalised_area(out)
    area_km2 = globe_share(out) * EARTH_KM2
    assert area_km2 == pytest.approx(math.pi * MIN_CIRCLE_RADIUS_KM**2, rel=0.02)


def test_circle_contains_every_point_at_its_radius() -> None:
    from geopy.distance import geodesic

    out = shape(circle(-33.87, 151.21, 25.0))
    for bearing in range(0, 360, 7):
        edge = geodesic(kilometers=24.99).destination((-33.87, 151.21), bearing)
        assert out.covers(Point(edge.longitude, edge.latitude))


def test_circle_over_the_antimeridian_is_split() -> None:
    out = circle(-17.8, 179.9, 50.0)
    assert_normalised_area(out)
    assert out["type"] == "MultiPolygon"
    assert shape(out).covers(Point(-179.8, -17.8)) and shape(out).covers(Point(179.6, -17.8))


def test_circle_around_a_pole_is_a_cap() -> None:
    out = circle(88.0, 20.0, 400.0)
    assert_normalised_area(out)
    assert shape(out).covers(Point(-160.0, 89.9))


def test_negative_radius_is_refused() -> None:
    with pytest.raises(GeometryError, match="negative"):
        circle(0, 0, -1)


def test_bbox_with_longitudes_below_minus_180_lands_on_both_sides() -> None:
    out = bbox(-183.5, -175.5, -26.0, -18.0)
    assert_normalised_area(out)
    assert out["type"] == "MultiPolygon"
    west, east = sorted(parts(out), key=lambda p: p.bounds[0])
    assert west.bounds == pytest.approx((-180.0, -26.0, -175.5, -18.0))
    assert east.bounds == pytest.approx((176.5, -26.0, 180.0, -18.0))


def test_bbox_written_across_the_antimeridian() -> None:
    assert shape(bbox(175, -175, -5, 5)).equals(shape(bbox(175, 185, -5, 5)))


def test_point_bbox_is_refused() -> None:
    with pytest.raises(GeometryError, match="no area"):
        bbox(10, 10, 5, 5)


def test_union_merges_overlaps_and_keeps_split() -> None:
    out = union([bbox(170, 190, 0, 10), bbox(0, 10, 0, 10), bbox(5, 15, 0, 10)])
    assert_normalised_area(out)
    assert shape(out).area == pytest.approx(20 * 10 + 15 * 10)
    with pytest.raises(GeometryError):
        union([])


def test_normalising_twice_changes_nothing() -> None:
    for name in ("crossing_180_unsplit.geojson", "lon_over_180_unclosed.geojson", "presplit_at_180.geojson", "spike.geojson",
                 "self_touching.geojson", "sliver.geojson"):
        once = normalise_geometry(load(name))
        assert normalise_geometry(once) == once, name


# --- the real documents, when the shared samples are present ------------------------------------

needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason="shared samples not present")


@needs_samples
def test_sample_issue174_unsplit_crossing() -> None:
    out = normalise_geometry(json.loads((SAMPLES / "antimeridian_issue174_polygon_crossing_180_unsplit.geojson").read_text()))
    assert_normalised_area(out)
    assert out["type"] == "MultiPolygon"
    widths = sorted(p.bounds[2] - p.bounds[0] for p in parts(out))
    assert widths == pytest.approx([0.00117, 0.49301], abs=1e-4)


@needs_samples
def test_sample_issue187_lon_over_180_unclosed() -> None:
    out = normalise_geometry(json.loads((SAMPLES / "antimeridian_issue187_polygon_lon_over_180_unclosed.geojson").read_text()))
    assert_normalised_area(out)
    assert shape(out).covers(Point(-162.0, 66.5))
    assert max(p.bounds[2] - p.bounds[0] for p in parts(out)) < 22


@needs_samples
def test_sample_fiji_presplit() -> None:
    raw = json.loads((SAMPLES / "fiji_split_at_antimeridian_world.geo.json_FJI.geojson").read_text())["features"][0]["geometry"]
    out = normalise_geometry(raw)
    assert_normalised_area(out)
    assert len(out["coordinates"]) == 3
    assert shape(out).area == pytest.approx(shape(raw).area, rel=1e-12)
