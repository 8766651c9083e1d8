"""The crisis index: which active crises contain, or are near, a whole batch of points.

One STRtree over the bounding box of each crisis's *search area* — the area grown by its
proximity band, in degrees, generously; the area itself for a crisis without a band — finds the
candidate (point, crisis) pairs of a whole batch in one vectorised call. One point-in-area test over all the pairs says
which are inside (the compiled kernel's ray parity where a point is clear of every edge, GEOS's
``contains_xy`` near the edges); the others with a band get an exact distance, all in one pass (one call of the
compiled nearest-point kernel of :mod:`pipeline.domain.nearest`, which gives GEOS's nearest point
bit for bit at a fraction of its cost; one ellipsoid formula), however many crises the batch touches. A loop per crisis made the
geofence about four times slower on batches that touch hundreds of crises (docs/benchmarks.md).

Distances are computed on the WGS84 ellipsoid, for a whole array of points at once: the nearest
point of the area is found in a local equirectangular frame (longitudes scaled by the cosine of
the crisis latitude), then the distance from the citizen to that point is the great-circle angle
times the ellipsoid's radius of curvature at that latitude in that direction (Euler's formula
with the meridional and prime-vertical radii). Over proximity bands up to a few hundred
kilometres this agrees with geopy's exact geodesic (Karney) to far better than 0.5 %
(tests/unit/test_geofence.py checks it against brute-force geodesics).

Crisis areas are split at the antimeridian (crisis/1 requires it). For the proximity band
across the antimeridian, the search area and the distance frame of a crisis touching ±180°
also hold copies shifted by ±360°, so a citizen at 179.9°E is 22 km from an area at 179.9°W,
not 40,000 km.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import shapely
from shapely.affinity import scale, translate
from shapely.geometry import shape
from shapely.geometry.base import BaseGeometry

from pipeline.domain.nearest import RingSegments
from schemas import Crisis

KM_PER_DEGREE_LAT = 110.574  # the shortest degree of latitude (at the equator); a conservative bound
MAX_SEARCH_LAT = 89.0


@dataclass(frozen=True, slots=True)
class IndexedCrisis:
    crisis: Crisis
    area: BaseGeometry
    # The area in the crisis's local frame (lon scaled by cos(lat0)), with ±360° copies when it touches ±180°.
    frame_area: BaseGeometry
    # Its rings: the nearest point of an area to a point outside it is on them. As segments for the
    # compiled nearest-point kernel (pipeline/domain/nearest.py), which gives what GEOS gives from them.
    frame_rings: BaseGeometry
    segments: RingSegments
    lon_scale: float
    touches_antimeridian: bool

    @property
    def crisis_id(self) -> str:
        return self.crisis.crisis_id

    def distance_km(self, lat: float, lon: float) -> float:
        """Distance on the ellipsoid from a point to the area, 0 when inside."""
        return float(self.distances_km(np.array([lat]), np.array([lon]))[0])

    def distances_km(self, lats: np.ndarray, lons: np.ndarray) -> np.ndarray:
        """Distances from many points to the area in one vectorised pass, 0 for those inside."""
        inside = np.asarray(shapely.contains_xy(self.area, lons, lats), dtype=bool)
        out = np.zeros(len(lats), dtype=float)
        outside = ~inside
        if outside.any():
            near_x, near_y = self.segments.nearest_points(lons[outside] * self.lon_scale, lats[outside],
                                                          np.zeros(int(outside.sum()), dtype=np.int64))
            near_lons = near_x / self.lon_scale
            near_lats = np.clip(near_y, -90.0, 90.0)
            out[outside] = ellipsoid_distance_km(lats[outside], lons[outside], near_lats, near_lons)
        return out


WGS84_A_KM = 6378.137
WGS84_E2 = 0.00669437999014


def ellipsoid_distance_km(lat1: np.ndarray, lon1: np.ndarray, lat2: np.ndarray, lon2: np.ndarray) -> np.ndarray:
    """Great-circle angle (haversine) times the WGS84 radius of curvature at the mean latitude in the
    direction of travel. Accurate to well under 0.1 % for the distances of a proximity band."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dlat = p2 - p1
    dlon = np.radians((lon2 - lon1 + 180.0) % 360.0 - 180.0)
    h = np.sin(dlat / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dlon / 2) ** 2
    angle = 2 * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0)))
    mid = (p1 + p2) / 2
    w = 1.0 - WGS84_E2 * np.sin(mid) ** 2
    meridional = WGS84_A_KM * (1 - WGS84_E2) / w**1.5
    prime_vertical = WGS84_A_KM / np.sqrt(w)
    north = dlat
    east = dlon * np.cos(mid)
    norm = north**2 + east**2
    with np.errstate(invalid="ignore", divide="ignore"):
        cos2 = np.where(norm > 0, north**2 / norm, 1.0)  # cos² of the azimuth
    radius = meridional * prime_vertical / (meridional * (1 - cos2) + prime_vertical * cos2)
    return np.asarray(radius * angle, dtype=float)


def _index_crises(crises: Iterable[Crisis]) -> tuple[IndexedCrisis, ...]:
    """Each crisis indexed; the rings' segments of all of them cut in one vectorised pass (one crisis
    at a time, that took as long as the rest of the indexing)."""
    frames = [FRAMES.of(c) for c in crises if c.geometry is not None]
    if not frames:
        return ()
    segments = RingSegments.of([f[3] for f in frames])
    return tuple(IndexedCrisis(*f[:4], segments.part(k), *f[4:]) for k, f in enumerate(frames))


_Frame = tuple[Crisis, BaseGeometry, BaseGeometry, BaseGeometry, float, bool]


class Frames:
    """Each crisis's indexing (:func:`_frame`), kept for the next index of the same crisis.

    Why: every crisis a worker admits is indexed by its rehearsal
    (:func:`pipeline.domain.admission.rehearse`) and then again by the worker's full index, and the
    index is rebuilt with every crisis in it whenever one crisis changes; ``shape()`` of the area, its
    frame and rings were half a rehearsal's cost and most of the full index's (about 0.3 s for 1,000
    crises, on the way to a starting worker's first batch). The admitted crisis is one immutable object
    shared by the rehearsal and the table (:class:`pipeline.domain.admission.AdmittedCrises`), so its
    indexing is kept by the object's identity (the object itself is held, so the identity cannot be
    reused while kept) and read back only for that very object: a new version of a crisis is another
    object, indexed anew. At most ``capacity`` kept, the oldest forgotten first; shapely geometries are
    immutable, and a prepared one may serve several indexes."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._kept: OrderedDict[int, _Frame] = OrderedDict()
        self._lock = threading.Lock()  # the API admits (and so rehearses) in a thread pool
        self.hits = 0

    def of(self, crisis: Crisis) -> _Frame:
        key = id(crisis)
        with self._lock:
            kept = self._kept.get(key)
            if kept is not None and kept[0] is crisis:
                self._kept.move_to_end(key)
                self.hits += 1
                return kept
        frame = _frame(crisis)
        with self._lock:
            self._kept[key] = frame
            self._kept.move_to_end(key)
            while len(self._kept) > self.capacity:
                self._kept.popitem(last=False)
        return frame


FRAMES: Final = Frames()


def _frame(crisis: Crisis) -> _Frame:
    """The crisis, its area (prepared), the area and its rings in the crisis's frame, the frame's
    longitude scale, and whether the area touches the antimeridian."""
    if crisis.geometry is None:
        raise ValueError(f"crisis {crisis.crisis_id} has no geometry")
    area = shape(crisis.geometry)
    if area.is_empty or not area.is_valid:
        raise ValueError(f"crisis {crisis.crisis_id} has an empty or invalid geometry")
    shapely.prepare(area)
    minx, miny, maxx, maxy = area.bounds
    lat0 = (miny + maxy) / 2.0
    lon_scale = max(math.cos(math.radians(lat0)), 0.05)
    touches = minx <= -179.999 or maxx >= 179.999
    frame_source = area
    if touches:
        frame_source = shapely.union_all([area, translate(area, 360.0), translate(area, -360.0)])
    frame_area = scale(frame_source, xfact=lon_scale, yfact=1.0, origin=(0, 0))
    return crisis, area, frame_area, shapely.boundary(frame_area), lon_scale, touches


def search_box(item: IndexedCrisis) -> tuple[float, float, float, float]:
    """Bounds (min lon, min lat, max lon, max lat) of every point that may be inside the area or within
    its proximity band: the area's bounds grown by the band in degrees, never smaller than the true
    band (the shortest degree of latitude, the longitude degree at the worst latitude the band can
    reach, and 1 % and a micro-degree more, so that no rounding drops a point on the edge). Across the
    antimeridian a band reaches round the world's edge: the longitudes are then unbounded (±inf).

    The one formula behind the index's candidates (:meth:`CrisisIndex.match_columns`) and the sweep's
    selection of citizens from columns (:meth:`pipeline.domain.tracking.Tracker.search_bounds`)."""
    minx, miny, maxx, maxy = item.area.bounds
    band = item.crisis.buffer_km
    worst_lat = min(max(abs(miny), abs(maxy)) + band / KM_PER_DEGREE_LAT, MAX_SEARCH_LAT)
    margin = 1.01 * band / (KM_PER_DEGREE_LAT * math.cos(math.radians(worst_lat))) + 1e-6
    if item.touches_antimeridian and band > 0:
        return (-math.inf, miny - margin, math.inf, maxy + margin)
    return (minx - margin, miny - margin, maxx + margin, maxy + margin)


def _search_area(item: IndexedCrisis) -> BaseGeometry:
    """Where a point may be inside or near the crisis: the area itself without a band (only the inside
    matters), else :func:`search_box` as a geometry (longitudes over two turns of the world when unbounded)."""
    if item.crisis.buffer_km <= 0:
        return item.area
    minx, miny, maxx, maxy = search_box(item)
    return shapely.box(max(minx, -540.0), miny, min(maxx, 540.0), maxy)


BAND_SLACK = 1.05  # a point skipped as beyond the band is more than 5 % past it by the bound below


def _frame_units_beyond_band(item: IndexedCrisis) -> float:
    """A distance in the crisis's frame past which a point is surely farther than the proximity band.

    The distance the geofence reports is the ellipsoid distance from a point to the frame-nearest point
    of the area: a great-circle angle times a radius of curvature of at least ``KM_PER_DEGREE_LAT``
    km per degree; and between two points of latitude at most ``worst`` a few hundred kilometres
    apart, the angle is at least ``min(1, cos(worst) / lon_scale)`` times their frame distance (the
    frame shrinks longitudes by ``lon_scale``, the sphere by the cosine of the latitude). ``worst`` is
    the search area's worst latitude plus a degree for the great circle's poleward bulge, and the
    band is widened by ``BAND_SLACK``: points near the limit are measured exactly, the bound only
    skips the many that are clearly out (docs/benchmarks.md, "Geofence kernel")."""
    band = item.crisis.buffer_km
    if band <= 0 or item.touches_antimeridian:
        return math.inf
    _, miny, _, maxy = item.area.bounds
    worst = min(max(abs(miny), abs(maxy)) + band / KM_PER_DEGREE_LAT + 1.0, MAX_SEARCH_LAT)
    km_per_unit = KM_PER_DEGREE_LAT * min(1.0, math.cos(math.radians(worst)) / item.lon_scale)
    return BAND_SLACK * band / km_per_unit


@dataclass(frozen=True, slots=True)
class Match:
    """One (check-in, crisis) pair that is inside or within the proximity band."""

    point: int  # index into the batch
    crisis_id: str
    distance_km: float  # 0 when inside


@dataclass(frozen=True, slots=True)
class Matches:
    """The matches of a batch as columns: row ``k`` is point ``point[k]`` in or near ``items[crisis[k]]``."""

    point: np.ndarray  # int64, index into the batch
    crisis: np.ndarray  # int64, index into CrisisIndex.items
    distance_km: np.ndarray  # float64, 0 when inside

    def __len__(self) -> int:
        return len(self.point)


class CrisisIndex:
    """An immutable index over the active crises that have an area.

    A batch is geofenced in a fixed number of array calls whatever its size and however many crises
    it touches: one STRtree query (bounding boxes) for the candidate (point, crisis) pairs, one vectorised
    point-in-area test over all pairs, one nearest-point kernel call over the pairs outside an area with a
    proximity band, one ellipsoid distance over those. No Python loop runs per pair or per crisis.
    """

    def __init__(self, crises: Iterable[Crisis]) -> None:
        self.items: tuple[IndexedCrisis, ...] = _index_crises(crises)
        self.by_id: dict[str, IndexedCrisis] = {i.crisis_id: i for i in self.items}
        self.position: dict[str, int] = {i.crisis_id: k for k, i in enumerate(self.items)}
        self.ids: tuple[str, ...] = tuple(i.crisis_id for i in self.items)  # row k of a Matches is crisis ids[k]
        self._ids = np.array(self.ids, dtype=object)
        self._areas_arr = np.array([i.area for i in self.items], dtype=object)
        self._segments = RingSegments.concat([i.segments for i in self.items])
        self._scales = np.array([i.lon_scale for i in self.items], dtype=float)
        self._bands = np.array([i.crisis.buffer_km for i in self.items], dtype=float)
        self._antimeridian = np.array([i.touches_antimeridian for i in self.items], dtype=bool)
        self._bounds = np.array([i.area.bounds for i in self.items], dtype=float).reshape(-1, 4)
        # Past this many frame units from an area's rings, a point is surely beyond the proximity band:
        # skipped without an exact distance (infinite across the antimeridian: not worth a proof there).
        self._beyond_band = np.array([_frame_units_beyond_band(i) for i in self.items], dtype=float)
        # Candidates by bounding box alone: a search area with a band is a rectangle already, and for
        # one without, the point-in-area test that follows decides; a predicate in the query would
        # only test the same thing twice.
        self._search = shapely.STRtree([_search_area(i).envelope for i in self.items])

    def __len__(self) -> int:
        return len(self.items)

    def match_columns(self, lats: Sequence[float] | np.ndarray, lons: Sequence[float] | np.ndarray) -> Matches:
        """Every crisis each point is inside or near, for a whole batch of points, as columns."""
        if not self.items or len(lats) == 0:
            empty = np.zeros(0, dtype=np.int64)
            return Matches(empty, empty, np.zeros(0, dtype=float))
        lat_arr = np.asarray(lats, dtype=float)
        lon_arr = np.asarray(lons, dtype=float)
        point, crisis = self._search.query(shapely.points(lon_arr, lat_arr))
        distance = self.pair_distances_km(point, crisis, lat_arr, lon_arr, band_only=True)
        keep = distance <= self._bands[crisis]  # inside (0) always passes; a band of 0 keeps only the inside
        return Matches(point[keep], crisis[keep], distance[keep])

    def match(self, lats: Sequence[float] | np.ndarray, lons: Sequence[float] | np.ndarray) -> list[Match]:
        """Every crisis each point is inside or near, for a whole batch of points."""
        found = self.match_columns(lats, lons)
        return [Match(p, c, d) for p, c, d in zip(found.point.tolist(), self._ids[found.crisis].tolist(),
                                                   found.distance_km.tolist(), strict=True)]

    def pair_distances_km(self, point: np.ndarray, crisis: np.ndarray, lats: np.ndarray, lons: np.ndarray,
                          *, band_only: bool = False) -> np.ndarray:
        """For every pair ``k``, the distance on the ellipsoid from point ``(lats[point[k]], lons[point[k]])``
        to the area of ``items[crisis[k]]``, 0 inside: what :meth:`IndexedCrisis.distances_km` gives, for
        any mix of crises in one pass. With ``band_only``, a point outside a crisis without a proximity
        band, or surely beyond the band (by :func:`_frame_units_beyond_band`), gets ``inf`` (no distance
        to it can matter to a match), and its distance is not computed."""
        point = np.asarray(point, dtype=np.int64)
        crisis = np.asarray(crisis, dtype=np.int64)
        out = np.zeros(len(point), dtype=float)
        if len(point) == 0:
            return out
        plat, plon = lats[point], lons[point]
        # Outside an area's bounding box nothing is inside it: GEOS is asked only about the others.
        box = self._bounds[crisis]
        maybe = (plon >= box[:, 0]) & (plon <= box[:, 2]) & (plat >= box[:, 1]) & (plat <= box[:, 3])
        inside = np.zeros(len(point), dtype=bool)
        if maybe.any():
            inside[maybe] = self._inside(crisis[maybe], plat[maybe], plon[maybe])
        measure = ~inside
        if band_only:
            measure &= self._bands[crisis] > 0
            out[~inside & ~measure] = np.inf
        if measure.any():
            c, mlat, mlon = crisis[measure], plat[measure], plon[measure]
            beyond = self._beyond_band[c] if band_only else None
            near_x, near_y = self._segments.nearest_points(mlon * self._scales[c], mlat, c, beyond)
            found = ~np.isnan(near_x)  # the others are surely beyond the band
            if not found.all():
                c, mlat, mlon, near_x, near_y = c[found], mlat[found], mlon[found], near_x[found], near_y[found]
                measured = np.flatnonzero(measure)
                out[measured[~found]] = np.inf
                measure = measured[found]
            near_lons = near_x / self._scales[c]
            near_lats = np.clip(near_y, -90.0, 90.0)
            out[measure] = ellipsoid_distance_km(mlat, mlon, near_lats, near_lons)
        return out

    def _inside(self, crisis: np.ndarray, lats: np.ndarray, lons: np.ndarray) -> np.ndarray:
        """Whether each point is inside its crisis's area: GEOS's ``contains_xy``, answered by the kernel's
        ray parity for points clear of every edge (the same answer there), by GEOS for the others and for
        areas across the antimeridian (whose frame merges the area with its shifted copies)."""
        verdict = self._segments.inside(lons * self._scales[crisis], lats, crisis)
        ask = (verdict < 0) | self._antimeridian[crisis]
        out: np.ndarray = verdict == 1
        if ask.any():
            out[ask] = shapely.contains_xy(self._areas_arr[crisis[ask]], lons[ask], lats[ask])
        return out

    def inside_mask(self, crisis_id: str, lats: np.ndarray, lons: np.ndarray) -> np.ndarray:
        """For one crisis, which of many points are inside it (one vectorised call)."""
        return np.asarray(shapely.contains_xy(self.by_id[crisis_id].area, lons, lats), dtype=bool)

    def candidate_mask(self, crisis_id: str, lats: np.ndarray, lons: np.ndarray) -> np.ndarray:
        """For one crisis, which of many points are inside its search area (inside or possibly near)."""
        item = self.by_id[crisis_id]
        search = _search_area(item)
        shapely.prepare(search)
        return np.asarray(shapely.contains_xy(search, lons, lats) | shapely.intersects_xy(search, lons, lats), dtype=bool)
