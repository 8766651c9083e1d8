"""The compiled nearest-point kernel gives GEOS's nearest point bit for bit, so warnings do not change.

GEOS here is what the geofence called before the kernel: ``shapely.shortest_line`` from the area's
prepared rings (in the crisis's frame) to the point, whose first point is the nearest point.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shapely
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.workload import workload
from pipeline.domain.geofence import CrisisIndex, IndexedCrisis, ellipsoid_distance_km
from pipeline.domain.nearest import CHUNK, RingSegments
from pipeline.domain.tracking import CitizenState, Tracker
from pipeline.testing import DONUT, FIJI_SPLIT, T0, make_checkin, make_crisis, square

TWO_PARTS = {"type": "MultiPolygon", "coordinates": [  # two parts 0.02° apart, one with a hole
    [[[20.0, 40.0], [20.3, 40.0], [20.3, 40.3], [20.0, 40.3], [20.0, 40.0]],
     [[20.1, 40.1], [20.1, 40.2], [20.2, 40.2], [20.2, 40.1], [20.1, 40.1]]],
    [[[20.32, 40.0], [20.5, 40.05], [20.45, 40.3], [20.32, 40.2], [20.32, 40.0]]],
]}


def geos_nearest(rings: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """GEOS's nearest points of ``rings[k]`` to ``(x[k], y[k])``, from prepared rings as before."""
    shapely.prepare(rings)
    return np.asarray(shapely.get_coordinates(shapely.shortest_line(rings, shapely.points(x, y)))[0::2])


def assert_same_as_geos(index: CrisisIndex, crisis: np.ndarray, lats: np.ndarray, lons: np.ndarray) -> None:
    scales = np.array([i.lon_scale for i in index.items])
    x, y = lons * scales[crisis], lats
    got_x, got_y = RingSegments.concat([i.segments for i in index.items]).nearest_points(x, y, crisis)
    rings = np.array([i.frame_rings for i in index.items], dtype=object)[crisis]
    want = geos_nearest(rings, x, y)
    differ = np.flatnonzero((got_x != want[:, 0]) | (got_y != want[:, 1]))
    assert differ.size == 0, (f"{differ.size} of {len(x)} differ, e.g. at {(x[differ[0]], y[differ[0]])}: "
                              f"{(got_x[differ[0]], got_y[differ[0]])} != {tuple(want[differ[0]])}")


def assert_inside_as_geos(index: CrisisIndex, crisis: np.ndarray, lats: np.ndarray, lons: np.ndarray) -> int:
    """The index's inside test (the kernel's ray parity, GEOS near edges) answers what GEOS answers.
    Returns how many points the kernel left to GEOS."""
    areas = np.array([i.area for i in index.items], dtype=object)
    want = np.asarray(shapely.contains_xy(areas[crisis], lons, lats), dtype=bool)
    got = index._inside(crisis, lats, lons)
    differ = np.flatnonzero(got != want)
    assert differ.size == 0, f"{differ.size} of {len(lats)} differ, e.g. {(lons[differ[0]], lats[differ[0]])}"
    scales = np.array([i.lon_scale for i in index.items])
    verdict = RingSegments.concat([i.segments for i in index.items]).inside(lons * scales[crisis], lats, crisis)
    return int((verdict < 0).sum())


@pytest.fixture(scope="module")
def bench_index() -> CrisisIndex:
    return CrisisIndex(workload(300).crises)


@pytest.fixture(scope="module")
def small_index() -> CrisisIndex:
    return CrisisIndex([make_crisis("fiji", FIJI_SPLIT, buffer_km=80.0), make_crisis("donut", DONUT, buffer_km=30.0),
                        make_crisis("parts", TWO_PARTS, buffer_km=10.0), make_crisis("sq", square(5.0, 52.0, 0.3))])


def test_the_benchmark_areas_and_their_citizens(bench_index: CrisisIndex) -> None:
    load = workload(300)
    citizens = load.citizens(30_000, inside_share=0.1)
    rng = np.random.default_rng(5)
    crisis = citizens.crisis  # each citizen against the crisis it was placed around: inside, near and far
    assert_same_as_geos(bench_index, crisis, citizens.lats, citizens.lons)
    other = rng.integers(0, len(bench_index), len(citizens))  # and against any other, far away
    assert_same_as_geos(bench_index, other, citizens.lats, citizens.lons)
    assert_inside_as_geos(bench_index, crisis, citizens.lats, citizens.lons)
    assert_inside_as_geos(bench_index, other, citizens.lats, citizens.lons)


def test_vertices_edges_and_their_neighbourhood(bench_index: CrisisIndex) -> None:
    """Points exactly on a vertex, on an edge, and a hair off either, where rounding decides."""
    segments = RingSegments.concat([i.segments for i in bench_index.items])
    scales = np.array([i.lon_scale for i in bench_index.items])
    rng = np.random.default_rng(9)
    crisis = rng.integers(0, len(bench_index), 20_000)
    first = segments.chunk_start[segments.chunks[crisis]]
    last = segments.chunk_start[segments.chunks[crisis + 1]]
    seg = first + (rng.random(len(crisis)) * (last - first)).astype(np.int64)
    t = rng.random(len(crisis))
    t[: len(t) // 4] = 0.0  # exact vertices
    x = segments.x0[seg] + t * (segments.x1[seg] - segments.x0[seg])
    y = segments.y0[seg] + t * (segments.y1[seg] - segments.y0[seg])
    nudge = rng.choice([0.0, 1e-15, -1e-15, 1e-9, -1e-9, 1e-4], len(x))
    x, y = x + nudge * rng.standard_normal(len(x)), y + nudge * rng.standard_normal(len(x))
    assert_same_as_geos(bench_index, crisis, y, x / scales[crisis])


def test_inside_on_and_next_to_the_areas_own_vertices_and_edges(bench_index: CrisisIndex) -> None:
    """In degrees, where GEOS decides: points on the areas' vertices and edges and a hair off them are
    left to GEOS or answered as GEOS answers; the kernel never guesses near an edge."""
    rng = np.random.default_rng(13)
    crisis = rng.integers(0, len(bench_index), 20_000)
    lons, lats = np.empty(len(crisis)), np.empty(len(crisis))
    for k in np.unique(crisis).tolist():
        rows = np.flatnonzero(crisis == k)
        ring = shapely.get_coordinates(bench_index.items[k].area)
        at = rng.integers(0, len(ring) - 1, len(rows))
        t = np.where(rng.random(len(rows)) < 0.3, 0.0, rng.random(len(rows)))
        lons[rows] = ring[at, 0] + t * (ring[at + 1, 0] - ring[at, 0])
        lats[rows] = ring[at, 1] + t * (ring[at + 1, 1] - ring[at, 1])
    nudge = rng.choice([0.0, 1e-15, 1e-12, 1e-9, 1e-6, 1e-3], len(crisis))
    lons, lats = lons + nudge * rng.standard_normal(len(crisis)), lats + nudge * rng.standard_normal(len(crisis))
    left_to_geos = assert_inside_as_geos(bench_index, crisis, lats, lons)
    assert left_to_geos > len(crisis) // 3  # the points on and next to the edges were left to GEOS


coordinate = st.floats(min_value=-0.6, max_value=0.6, allow_nan=False)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 3), dx=coordinate, dy=coordinate, snap=st.sampled_from(["free", "vertex", "grid"]))
def test_random_points_around_holes_parts_and_the_antimeridian(small_index: CrisisIndex, which: int, dx: float,
                                                              dy: float, snap: str) -> None:
    item = small_index.items[which]
    minx, miny, maxx, maxy = item.area.bounds
    lon, lat = (minx + maxx) / 2 + dx * (maxx - minx + 1), (miny + maxy) / 2 + dy * (maxy - miny + 1)
    if snap == "vertex":  # the area's vertex nearest the drawn point
        coords = shapely.get_coordinates(item.area)
        lon, lat = coords[np.argmin((coords[:, 0] - lon) ** 2 + (coords[:, 1] - lat) ** 2)]
    elif snap == "grid":  # on the 0.05° grid the test areas are drawn on: edges, hole centres, ties
        lon, lat = round(lon * 20) / 20, round(lat * 20) / 20
    lon = (lon + 180.0) % 360.0 - 180.0
    assert_same_as_geos(small_index, np.array([which]), np.array([lat]), np.array([lon]))
    assert_inside_as_geos(small_index, np.array([which]), np.array([lat]), np.array([lon]))


def test_exact_ties_take_geos_choice(small_index: CrisisIndex) -> None:
    """Midway between the donut's outer ring and its hole, two edges are exactly as near with different
    nearest points: GEOS's facet tree picks one (not the first in ring order), and so does the geofence."""
    donut = small_index.position["donut"]
    lats = np.array([11.75, 10.25, 11.0, 11.0, 11.75])
    lons = np.array([11.0, 11.0, 10.25, 11.75, 10.25])
    assert_same_as_geos(small_index, np.full(len(lats), donut), lats, lons)


def test_chunks_cover_every_segment_once_and_never_span_two_areas(bench_index: CrisisIndex) -> None:
    segments = RingSegments.concat([i.segments for i in bench_index.items])
    assert segments.chunk_start[0] == 0 and segments.chunk_start[-1] == len(segments.x0)
    assert (np.diff(segments.chunk_start) >= 1).all() and (np.diff(segments.chunk_start) <= CHUNK).all()
    for k, item in enumerate(bench_index.items):
        lo, hi = segments.chunk_start[segments.chunks[k]], segments.chunk_start[segments.chunks[k + 1]]
        assert hi - lo == len(item.segments.x0) == shapely.get_num_coordinates(item.frame_rings) - \
            shapely.get_num_geometries(item.frame_rings)
        alone = RingSegments.of(item.frame_rings)  # an item's part of the index's segments is its own
        for name in ("x0", "y0", "x1", "y1", "chunk_start", "boxes", "chunks"):
            assert np.array_equal(getattr(item.segments, name), getattr(alone, name)), (item.crisis_id, name)


def test_one_point_at_a_time_or_many_at_once_the_same_distances(bench_index: CrisisIndex) -> None:
    """The sweep measures its citizens in one call, a check-in's fallback one at a time: same values."""
    citizens = workload(300).citizens(600, inside_share=0.1, seed=2)
    for k in range(0, len(bench_index), 7):
        item = bench_index.items[k]
        many = item.distances_km(citizens.lats, citizens.lons).tolist()
        assert many == [item.distance_km(float(a), float(o)) for a, o in zip(citizens.lats, citizens.lons, strict=True)]


# -- the warnings: the tracker with the kernel against the tracker with GEOS's nearest points ---------


def geos_distances_km(self: IndexedCrisis, lats: np.ndarray, lons: np.ndarray) -> np.ndarray:
    """IndexedCrisis.distances_km as it was, with shapely.shortest_line."""
    inside = np.asarray(shapely.contains_xy(self.area, lons, lats), dtype=bool)
    out = np.zeros(len(lats), dtype=float)
    if (~inside).any():
        lo, la = lons[~inside], lats[~inside]
        near = geos_nearest(np.full(len(lo), self.frame_rings, dtype=object), lo * self.lon_scale, la)
        out[~inside] = ellipsoid_distance_km(la, lo, np.clip(near[:, 1], -90.0, 90.0), near[:, 0] / self.lon_scale)
    return out


def geos_pair_distances_km(self: CrisisIndex, point: np.ndarray, crisis: np.ndarray, lats: np.ndarray,
                           lons: np.ndarray, *, band_only: bool = False) -> np.ndarray:
    """CrisisIndex.pair_distances_km as it was, with shapely.shortest_line."""
    items = self.items
    areas = np.array([i.area for i in items], dtype=object)
    rings = np.array([i.frame_rings for i in items], dtype=object)
    scales = np.array([i.lon_scale for i in items])
    bands = np.array([i.crisis.buffer_km for i in items])
    out = np.zeros(len(point), dtype=float)
    plat, plon = lats[point], lons[point]
    inside = np.asarray(shapely.contains_xy(areas[crisis], plon, plat), dtype=bool)
    measure = ~inside
    if band_only:
        measure &= bands[crisis] > 0
        out[~inside & ~measure] = np.inf
    if measure.any():
        c, mlat, mlon = crisis[measure], plat[measure], plon[measure]
        near = geos_nearest(rings[c], mlon * scales[c], mlat)
        out[measure] = ellipsoid_distance_km(mlat, mlon, np.clip(near[:, 1], -90.0, 90.0), near[:, 0] / scales[c])
    return out


def run_workload(tracker: Tracker) -> Iterator[Any]:
    """Citizens of the workload check in, move (in, out, along the bands), and a crisis is swept."""
    load = workload(200)
    rng = np.random.default_rng(21)
    first = load.citizens(6000, inside_share=0.3, seed=1)
    ids = [f"c{i}" for i in range(len(first))]
    states: dict[str, CitizenState] = {}
    for crisis in load.crises[1:]:
        tracker.accept(crisis)
    for step in range(4):
        order = rng.permutation(len(first))  # everyone moves to where someone else was
        lats, lons = first.lats[order], first.lons[order]
        at = T0 + timedelta(minutes=5 * step)
        checkins = [make_checkin(ids[i], float(lats[i]), float(lons[i]), at, accuracy_m=float(rng.choice([5, 80, 400])))
                    for i in range(len(ids))]
        for start in range(0, len(checkins), 500):
            outcome = tracker.on_checkins(checkins[start:start + 500], states, at)
            states.update(outcome.states)
            yield from (w.to_dict() for w in outcome.warnings)
    tracker.accept(load.crises[0])
    swept = tracker.on_upsert(load.crises[0], list(states.values()), T0 + timedelta(hours=1))
    yield from (w.to_dict() for w in swept.warnings)
    yield from sorted((cid, s.to_dict()) for cid, s in {**states, **swept.states}.items())


def test_the_warnings_over_the_workload_are_those_of_geos(monkeypatch: pytest.MonkeyPatch) -> None:
    ours = list(run_workload(Tracker()))
    with monkeypatch.context() as patch:
        patch.setattr(IndexedCrisis, "distances_km", geos_distances_km)
        patch.setattr(CrisisIndex, "pair_distances_km", geos_pair_distances_km)
        theirs = list(run_workload(Tracker()))
    warnings = [w for w in ours if isinstance(w, dict)]
    assert {w["kind"] for w in warnings} >= {"entered", "near", "exited", "inside"}  # the case is not vacuous
    assert len([w for w in warnings if w["kind"] == "near"]) > 100
    assert ours == theirs


# -- pairs skipped as surely beyond the band ---------------------------------------------------------


def exact_matches(index: CrisisIndex, lats: np.ndarray, lons: np.ndarray) -> set[tuple[int, str, float]]:
    """Every point against every crisis, one exact distance each: no bound skips anything."""
    found = set()
    for item in index.items:
        for i, d in enumerate(item.distances_km(lats, lons).tolist()):
            if d == 0.0 or (item.crisis.buffer_km > 0 and d <= item.crisis.buffer_km):
                found.add((i, item.crisis_id, d))
    return found


def test_the_band_bound_skips_no_match_of_the_workload() -> None:
    load = workload(120)
    index = CrisisIndex(load.crises)
    citizens = load.citizens(20_000, inside_share=0.1, seed=4)
    found = index.match_columns(citizens.lats, citizens.lons)
    got = set(zip(found.point.tolist(), [index.ids[c] for c in found.crisis.tolist()], found.distance_km.tolist(),
                  strict=True))
    assert got == exact_matches(index, citizens.lats, citizens.lons)


@pytest.mark.parametrize("lat", [-75.0, -40.0, 0.0, 55.0, 70.0, 80.0])
def test_the_band_bound_skips_no_match_at_any_latitude(lat: float) -> None:
    """Wide bands and tall areas far from the equator, where the frame and the ellipsoid differ most;
    points packed around the band's edge, where a loose bound would drop a match."""
    rng = np.random.default_rng(int(lat) + 100)
    crises = [make_crisis("tall", {"type": "Polygon", "coordinates": [[[10.0, lat - 1.5], [10.4, lat - 1.5],
                                   [10.2, lat + 1.5], [10.0, lat - 1.5]]]}, buffer_km=300.0),
              make_crisis("small", square(12.0, lat, 0.05), buffer_km=25.0),
              make_crisis("mid", square(9.0, lat + 0.5, 0.3), buffer_km=100.0)]
    index = CrisisIndex(crises)
    lats = np.clip(lat + rng.uniform(-5.0, 5.0, 6000), -89.0, 89.0)
    lons = 10.0 + rng.uniform(-25.0, 25.0, 6000)
    found = index.match_columns(lats, lons)
    got = set(zip(found.point.tolist(), [index.ids[c] for c in found.crisis.tolist()], found.distance_km.tolist(),
                  strict=True))
    want = exact_matches(index, lats, lons)
    assert got == want
    assert {c for _, c, d in want if d > 0} == {"tall", "small", "mid"}  # near matches of every crisis were tested


def test_numba_cache_goes_to_the_temporary_directory_only_where_the_module_dir_is_read_only(tmp_path: Path) -> None:
    from pipeline.domain._nearest_kernel import CACHE_DIR_FALLBACK, cache_dir_fallback

    environ: dict[str, str] = {}
    assert cache_dir_fallback(str(tmp_path), environ, writable=lambda path: True) is None
    assert environ == {}
    chosen = cache_dir_fallback(str(tmp_path), environ, writable=lambda path: False)
    assert chosen is not None and chosen.endswith(CACHE_DIR_FALLBACK)
    assert environ == {"NUMBA_CACHE_DIR": chosen}
    told = {"NUMBA_CACHE_DIR": "/somewhere"}
    assert cache_dir_fallback(str(tmp_path), told, writable=lambda path: False) is None
    assert told == {"NUMBA_CACHE_DIR": "/somewhere"}
