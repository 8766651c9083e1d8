"""The crisis index: inside, near (geodesic), holes, antimeridian."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from geopy.distance import geodesic

from pipeline.domain.geofence import CrisisIndex
from pipeline.testing import DONUT, FIJI_SPLIT, make_crisis, square


def kinds(index: CrisisIndex, lat: float, lon: float) -> dict[str, float]:
    return {m.crisis_id: m.distance_km for m in index.match([lat], [lon])}


def test_batch_match_inside_and_outside() -> None:
    index = CrisisIndex([make_crisis("jakarta", square(106.8, -6.2, 0.1)), make_crisis("bali", square(115.2, -8.6, 0.2))])
    matches = index.match(np.array([-6.2, -8.6, 0.0]), np.array([106.8, 115.2, 0.0]))
    assert sorted((m.point, m.crisis_id, m.distance_km) for m in matches) == [(0, "jakarta", 0.0), (1, "bali", 0.0)]


def test_hole_is_outside() -> None:
    index = CrisisIndex([make_crisis("donut", DONUT)])
    assert kinds(index, 11.0, 11.0) == {}
    assert kinds(index, 10.2, 10.2) == {"donut": 0.0}


def test_hole_is_near_when_band_reaches_the_ring() -> None:
    index = CrisisIndex([make_crisis("donut", DONUT, buffer_km=100.0)])
    distance = kinds(index, 11.0, 11.0)["donut"]
    # centre of the 1°x1° hole: half a degree of longitude at 11°N to the inner ring
    expected = geodesic((11.0, 11.0), (11.0, 10.5)).km
    assert distance == pytest.approx(expected, rel=0.005)


def test_antimeridian_split_area_matches_both_sides() -> None:
    index = CrisisIndex([make_crisis("fiji", FIJI_SPLIT)])
    assert kinds(index, -17.0, 179.5) == {"fiji": 0.0}
    assert kinds(index, -17.0, -179.5) == {"fiji": 0.0}
    assert kinds(index, -17.0, 0.0) == {}  # no 360°-wide band


def test_near_band_across_the_antimeridian() -> None:
    east_only = {"type": "Polygon", "coordinates": [[[-180.0, -18.0], [-179.0, -18.0], [-179.0, -16.0],
                                                     [-180.0, -16.0], [-180.0, -18.0]]]}
    index = CrisisIndex([make_crisis("east", east_only, buffer_km=50.0)])
    distance = kinds(index, -17.0, 179.8)["east"]
    assert distance == pytest.approx(geodesic((-17.0, 179.8), (-17.0, -180.0)).km, rel=0.005)
    assert kinds(index, -17.0, 179.0) == {}  # ~106 km away: outside the 50 km band


@pytest.mark.parametrize("lat", [-60.0, 0.0, 64.0])
def test_near_distance_is_geodesic_within_half_a_percent(lat: float) -> None:
    area = square(20.0, lat, 0.5)
    index = CrisisIndex([make_crisis("a", area, buffer_km=300.0)])
    rng = np.random.default_rng(7)
    lats = lat + rng.uniform(-2.0, 2.0, 60)
    lons = 20.0 + rng.uniform(-3.0, 3.0, 60)
    matched = {m.point: m.distance_km for m in index.match(lats, lons)}
    # brute force: geodesic distance to a dense sampling of the square's boundary
    ring = area["coordinates"][0]
    boundary = []
    for (x0, y0), (x1, y1) in itertools.pairwise(ring):
        for t in np.linspace(0.0, 1.0, 80):
            boundary.append((y0 + t * (y1 - y0), x0 + t * (x1 - x0)))
    checked = 0
    for i, (plat, plon) in enumerate(zip(lats, lons, strict=True)):
        inside = abs(plat - lat) < 0.5 and abs(plon - 20.0) < 0.5
        truth = 0.0 if inside else min(geodesic((plat, plon), b).km for b in boundary)
        if truth <= 300.0:
            assert i in matched
            assert matched[i] == pytest.approx(truth, rel=0.005, abs=0.05)
            checked += 1
        else:
            assert i not in matched or matched[i] <= 300.0
    assert checked > 5


def test_inside_mask_is_one_vectorised_call_over_many_points() -> None:
    index = CrisisIndex([make_crisis("sq", square(0.0, 0.0, 1.0))])
    lats = np.array([0.0, 0.5, 2.0, -0.9])
    lons = np.array([0.0, -0.5, 0.0, 0.9])
    assert index.inside_mask("sq", lats, lons).tolist() == [True, True, False, True]


def test_crisis_without_geometry_is_not_indexed() -> None:
    geocode_only = make_crisis("nogeo", None, op="cancel")
    index = CrisisIndex([geocode_only])
    assert len(index) == 0
    assert index.match([0.0], [0.0]) == []
