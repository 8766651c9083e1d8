"""The crisis index: which active crises contain, or are near, a whole batch of points.

One STRtree over the crisis areas answers "inside" for a batch of points in one vectorised
call (``STRtree.query(points, predicate="within")``). A second STRtree over each crisis's
*search area* — the area grown by its proximity band, in degrees, generously — finds the
candidates for ``near``; only those candidates get an exact distance.

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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import shapely
from shapely.affinity import scale, translate
from shapely.geometry import shape
from shapely.geometry.base import BaseGeometry

from schemas import Crisis

KM_PER_DEGREE_LAT = 110.574  # the shortest degree of latitude (at the equator); a conservative bound
MAX_SEARCH_LAT = 89.0


@dataclass(frozen=True, slots=True)
class IndexedCrisis:
    crisis: Crisis
    area: BaseGeometry
    # The area in the crisis's local frame (lon scaled by cos(lat0)), with ±360° copies when it touches ±180°.
    frame_area: BaseGeometry
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
            local = shapely.points(lons[outside] * self.lon_scale, lats[outside])
            nearest = shapely.get_coordinates(shapely.shortest_line(local, self.frame_area))[1::2]
            near_lons = nearest[:, 0] / self.lon_scale
            near_lats = np.clip(nearest[:, 1], -90.0, 90.0)
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


def _index_crisis(crisis: Crisis) -> IndexedCrisis:
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
    shapely.prepare(frame_area)
    return IndexedCrisis(crisis, area, frame_area, lon_scale, touches)


def _search_area(item: IndexedCrisis) -> BaseGeometry:
    """The area grown by its proximity band, in degrees, never smaller than the true band."""
    band = item.crisis.buffer_km
    area = item.area
    if item.touches_antimeridian and band > 0:
        area = shapely.union_all([area, translate(area, 360.0), translate(area, -360.0)])
    if band <= 0:
        return area
    _, miny, _, maxy = item.area.bounds
    worst_lat = min(max(abs(miny), abs(maxy)) + band / KM_PER_DEGREE_LAT, MAX_SEARCH_LAT)
    degrees = band / (KM_PER_DEGREE_LAT * math.cos(math.radians(worst_lat)))
    return area.envelope.buffer(degrees, quad_segs=2, join_style="mitre")


@dataclass(frozen=True, slots=True)
class Match:
    """One (check-in, crisis) pair that is inside or within the proximity band."""

    point: int  # index into the batch
    crisis_id: str
    distance_km: float  # 0 when inside


class CrisisIndex:
    """An immutable index over the active crises that have an area."""

    def __init__(self, crises: Iterable[Crisis]) -> None:
        self.items: tuple[IndexedCrisis, ...] = tuple(_index_crisis(c) for c in crises if c.geometry is not None)
        self.by_id: dict[str, IndexedCrisis] = {i.crisis_id: i for i in self.items}
        self._areas = shapely.STRtree([i.area for i in self.items])
        self._search = shapely.STRtree([_search_area(i) for i in self.items])

    def __len__(self) -> int:
        return len(self.items)

    def match(self, lats: Sequence[float] | np.ndarray, lons: Sequence[float] | np.ndarray) -> list[Match]:
        """Every crisis each point is inside or near, for a whole batch of points."""
        if not self.items or len(lats) == 0:
            return []
        lat_arr = np.asarray(lats, dtype=float)
        lon_arr = np.asarray(lons, dtype=float)
        points = shapely.points(lon_arr, lat_arr)
        inside = self._areas.query(points, predicate="within")
        out = [Match(int(p), self.items[int(c)].crisis_id, 0.0) for p, c in zip(inside[0], inside[1], strict=True)]
        seen = {(m.point, m.crisis_id) for m in out}
        near = self._search.query(points, predicate="intersects")
        by_crisis: dict[int, list[int]] = {}
        for p, c in zip(near[0], near[1], strict=True):
            item = self.items[int(c)]
            if item.crisis.buffer_km > 0 and (int(p), item.crisis_id) not in seen:
                by_crisis.setdefault(int(c), []).append(int(p))
        for c, pts in by_crisis.items():
            item = self.items[c]
            idx = np.asarray(pts, dtype=int)
            distances = item.distances_km(lat_arr[idx], lon_arr[idx])
            for p, distance in zip(pts, distances.tolist(), strict=True):
                if distance <= item.crisis.buffer_km:
                    out.append(Match(p, item.crisis_id, distance))
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
