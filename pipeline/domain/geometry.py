"""Geometry normalisation: the one place every feed's area goes through.

Whatever a publisher sends (rings left open, longitudes above 180 or below -180, a polygon that
crosses the antimeridian unsplit, self-intersections and spikes), what leaves this module is a
valid GeoJSON ``Polygon`` or ``MultiPolygon`` in lon,lat order, with closed counter-clockwise
exterior rings, every longitude within [-180, 180], split at the antimeridian, areal parts only.

How the antimeridian is handled. GeoJSON (RFC 7946 §3.1.9) and CAP draw the shortest way between
two vertices, so an edge whose longitudes differ by more than 180° is an edge that crosses the
antimeridian. Each ring is first *unwrapped*: every vertex is moved by a multiple of 360° so that
no edge spans more than 180°, giving one continuous ring in an extended longitude space (Fiji
then runs from 177° to 182° instead of jumping from 180° to -180°). A ring whose unwrapped
longitudes do not come back to the start encircles a pole and is closed over the pole nearer to
its mean latitude. The extended shape is repaired with :func:`shapely.make_valid` (keeping only
areal parts), cut into 360°-wide windows and each window shifted back into [-180, 180]. Edges
are straight lines in lon,lat (as CAP and GeoJSON publishers draw them), which is the
``great_circle=False`` behaviour of the ``antimeridian`` package. Output edges spanning 180° of
longitude or more (the rim of a polar cap) are densified so that normalising twice changes nothing.

Absurd areas are refused with :class:`GeometryError`: empty input, more than
``max_globe_share`` of the Earth's surface (an alert for a fifth of the planet is a data error,
not a crisis area), more than ``max_vertices`` positions, anything that is not a polygon.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from itertools import chain
from typing import Any

import numpy as np
import shapely
from geopy.distance import geodesic
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry
from shapely.geometry.polygon import orient

__all__ = [
    "MIN_CIRCLE_RADIUS_KM",
    "GeometryError",
    "bbox",
    "circle",
    "globe_share",
    "normalise_geometry",
    "polygon_from_latlon",
    "union",
]

# A CAP ``<circle>`` with radius 0 (OASIS CAP 1.2 Appendix A.3, the NWS tsunami messages, the NSW
# RFS feed) names a point. A point cannot contain anybody, so it becomes a circle of this radius:
# large enough to hold a phone's reported position around the point (network-assisted fixes are
# commonly off by several hundred metres), small enough that it still reads as "this place".
MIN_CIRCLE_RADIUS_KM: float = 1.0

# Vertices of the polygon approximating a circle; the polygon is circumscribed (its edges touch
# the circle from outside) so that nobody inside the circle is left outside the polygon.
CIRCLE_VERTICES = 64

# Longitudes beyond this are not an encoding of the antimeridian any more, they are garbage.
_MAX_ABS_LON = 540.0
# Output edges longer than this (degrees) get intermediate vertices; see the module docstring.
_MAX_EDGE_DEG = 90.0
# Coordinates this close to the seam are snapped onto it exactly.
_SEAM_EPS = 1e-9
_POLAR_GRID_DEG = 1e-10
# Below this (square degrees, about 1 m² at the equator) an area is a rounding artefact, not a place.
_MIN_AREA_DEG2 = 1e-10
_GLOBE_EQUAL_AREA = 4.0 * math.pi  # the Earth in Lambert cylindrical equal-area units (2π × 2)
# What a ring read in one array call may hold (bool is an int subclass, but not its type).
_PLAIN_POSITIONS = frozenset({list, tuple})
_PLAIN_NUMBERS = frozenset({float, int})


class GeometryError(ValueError):
    """An area that cannot be used; ``str(exc)`` is a one-line reason."""


def normalise_geometry(geojson: Mapping[str, Any], *, max_globe_share: float = 0.2,
                       max_vertices: int = 50_000) -> dict[str, Any]:
    """A GeoJSON Polygon/MultiPolygon (lon,lat) as a valid, split, closed GeoJSON geometry."""
    if not isinstance(geojson, Mapping):
        raise GeometryError(f"geometry must be a GeoJSON object, not {type(geojson).__name__}")
    kind = geojson.get("type")
    coordinates = geojson.get("coordinates")
    if kind == "Polygon":
        polygons: Sequence[Any] = [coordinates]
    elif kind == "MultiPolygon":
        if not isinstance(coordinates, Sequence) or isinstance(coordinates, str):
            raise GeometryError("MultiPolygon coordinates must be a list of polygons")
        polygons = coordinates
    else:
        raise GeometryError(f"not a polygon: GeoJSON type {kind!r}")
    rings_per_polygon = [_read_polygon(raw) for raw in polygons]
    count = sum(len(ring) for rings in rings_per_polygon for ring in rings)
    if count > max_vertices:
        raise GeometryError(f"too many vertices: {count} > {max_vertices}")
    shapes = [shape for rings in rings_per_polygon if rings for shape in [_unwrapped_polygon(rings)] if shape is not None]
    if not shapes:
        raise GeometryError("empty geometry: no ring with an area")
    return _finish(shapes, max_globe_share=max_globe_share, max_vertices=max_vertices)


def polygon_from_latlon(pairs: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """A CAP ``<polygon>`` (lat,lon pairs) as a normalised GeoJSON geometry."""
    ring = [[_number(lon, "longitude"), _number(lat, "latitude")] for lat, lon in pairs]
    return normalise_geometry({"type": "Polygon", "coordinates": [ring]})


def circle(lat: float, lon: float, radius_km: float) -> dict[str, Any]:
    """A geodesic circle (WGS84) as a normalised polygon; radii below the minimum are raised to it."""
    lat, lon, radius_km = _number(lat, "latitude"), _number(lon, "longitude"), _number(radius_km, "radius")
    _check_lat(lat)
    _check_lon(lon)
    if radius_km < 0:
        raise GeometryError(f"negative circle radius: {radius_km} km")
    radius_km = max(radius_km, MIN_CIRCLE_RADIUS_KM)
    if radius_km > 10_000:
        raise GeometryError(f"circle radius {radius_km:g} km covers most of the globe")
    reach = geodesic(kilometers=radius_km / math.cos(math.pi / CIRCLE_VERTICES))
    centre = (lat, ((lon + 180.0) % 360.0) - 180.0)
    ring = []
    for i in range(CIRCLE_VERTICES):
        point = reach.destination(centre, 360.0 * i / CIRCLE_VERTICES)
        ring.append([point.longitude, point.latitude])
    ring.append(ring[0])
    return normalise_geometry({"type": "Polygon", "coordinates": [ring]})


def bbox(lon_min: float, lon_max: float, lat_min: float, lat_max: float) -> dict[str, Any]:
    """A longitude/latitude box in GDACS order; longitudes may run past ±180 (``-183 -175``)."""
    lon_min, lon_max = _number(lon_min, "longitude"), _number(lon_max, "longitude")
    lat_min, lat_max = _number(lat_min, "latitude"), _number(lat_max, "latitude")
    for lon in (lon_min, lon_max):
        _check_lon(lon)
    for lat in (lat_min, lat_max):
        _check_lat(lat)
    if lon_max < lon_min:  # written across the antimeridian as "175 -175"
        lon_max += 360.0
    if lon_max - lon_min > 360.0:
        raise GeometryError(f"bbox wider than the globe: {lon_min} .. {lon_max}")
    if lon_max == lon_min or lat_max <= lat_min:
        raise GeometryError(f"bbox has no area: lon {lon_min} .. {lon_max}, lat {lat_min} .. {lat_max}")
    return _finish([shapely.box(lon_min, lat_min, lon_max, lat_max)], max_globe_share=0.2, max_vertices=50_000)


def union(geometries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Several areas as one normalised geometry (overlaps merged)."""
    if not geometries:
        raise GeometryError("empty geometry: nothing to unite")
    shapes = [shapely.geometry.shape(normalise_geometry(g)) for g in geometries]
    return _finish(shapes, max_globe_share=0.2, max_vertices=50_000)


def globe_share(geojson: Mapping[str, Any]) -> float:
    """The share of the Earth's surface (0..1) a normalised lon,lat geometry covers."""
    return _share(shapely.geometry.shape(geojson))


# --- internals -------------------------------------------------------------------------------


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise GeometryError(f"{what} is not a number: {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise GeometryError(f"{what} is not a number: {value!r}") from None
    if not math.isfinite(number):
        raise GeometryError(f"{what} is not finite: {value!r}")
    return number


def _check_lat(lat: float) -> None:
    if not -90.0 <= lat <= 90.0:
        raise GeometryError(f"latitude out of range: {lat}")


def _check_lon(lon: float) -> None:
    if not -_MAX_ABS_LON <= lon <= _MAX_ABS_LON:
        raise GeometryError(f"longitude out of range: {lon}")


def _read_polygon(raw: Any) -> list[np.ndarray]:
    """Rings of one GeoJSON polygon, checked and closed; degenerate rings are dropped."""
    if not isinstance(raw, Sequence) or isinstance(raw, str):
        raise GeometryError("polygon coordinates must be a list of rings")
    rings: list[np.ndarray] = []
    for index, raw_ring in enumerate(raw):
        ring = _read_ring(raw_ring)
        if ring is None:
            if index == 0:
                return []  # no exterior, no polygon
            continue  # a degenerate hole removes nothing
        rings.append(ring)
    return rings


def _read_ring(raw: Any) -> np.ndarray | None:
    """A ring as an (n, 2) array of lon,lat, consecutive repeats dropped, closed; None if it has no area.

    A ring of plain ``[lon, lat]`` numbers, all finite and in range (what every feed parser and the
    API write), is read in one array call; anything else goes through :func:`_checked_positions`,
    which names the first bad position. Both read the same numbers, so both give the same ring."""
    if not isinstance(raw, Sequence) or isinstance(raw, str):
        raise GeometryError("a ring must be a list of positions")
    xy = _plain_positions(raw)
    if xy is None:
        xy = _checked_positions(raw)
    if len(xy) > 1:  # a position equal to the one before it adds nothing
        xy = xy[np.concatenate(([True], (xy[1:] != xy[:-1]).any(axis=1)))]
    if len(xy) > 1 and (xy[0] == xy[-1]).all():
        xy = xy[:-1]
    if len(xy) < 3:
        return None
    return np.concatenate((xy, xy[:1]))


def _plain_positions(raw: Sequence[Any]) -> np.ndarray | None:
    """The positions as floats if every one is a two-number list or tuple within range, else None."""
    if not raw or not set(map(type, raw)) <= _PLAIN_POSITIONS or set(map(len, raw)) != {2}:
        return None
    if not set(map(type, chain.from_iterable(raw))) <= _PLAIN_NUMBERS:  # not bool (an int), not text
        return None
    try:
        xy = np.array(raw, dtype=float)
    except (ValueError, TypeError, OverflowError):  # an int too large for a float: named by the slow path
        return None
    lon, lat = xy[:, 0], xy[:, 1]
    if not (np.isfinite(xy).all() and (np.abs(lon) <= _MAX_ABS_LON).all() and (np.abs(lat) <= 90.0).all()):
        return None
    return xy


def _checked_positions(raw: Sequence[Any]) -> np.ndarray:
    """The positions one by one, raising :class:`GeometryError` on the first one that is not usable."""
    ring: list[tuple[float, float]] = []
    for position in raw:
        if not isinstance(position, Sequence) or isinstance(position, str) or len(position) < 2:
            raise GeometryError(f"a position must be [lon, lat], got {position!r}"[:200])
        lon, lat = _number(position[0], "longitude"), _number(position[1], "latitude")
        _check_lon(lon)
        _check_lat(lat)
        ring.append((lon, lat))
    return np.array(ring, dtype=float).reshape(-1, 2)


def _unwrap(ring: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Longitudes shifted by whole turns so no edge spans more than 180°, and the ring's winding."""
    lon, lat = ring[:, 0], ring[:, 1]
    step = np.diff(lon)
    step -= 360.0 * np.round(step / 360.0)
    continuous = lon[0] + np.concatenate(([0.0], np.cumsum(step)))
    # Shift each vertex by an exact multiple of 360 so untouched vertices keep their exact value.
    shifted = lon + 360.0 * np.round((continuous - lon) / 360.0)
    turns = round(float(shifted[-1] - shifted[0]) / 360.0)
    if turns == 0:
        shifted[-1] = shifted[0]
    return shifted, lat, turns


def _unwrapped_polygon(rings: list[np.ndarray]) -> BaseGeometry | None:
    shell_lon, shell_lat, turns = _unwrap(rings[0])
    if abs(turns) > 1:
        raise GeometryError("a ring winds around the globe more than once")
    shell = np.column_stack([shell_lon, shell_lat])
    if turns:  # encircles a pole: close the ring over the pole nearer to its mean latitude
        pole = -90.0 if float(np.mean(shell_lat)) < 0 else 90.0
        shell = np.vstack([shell, [[shell_lon[-1], pole], [shell_lon[0], pole]], shell[:1]])
    centre = float(np.mean(shell_lon))
    holes = []
    for ring in rings[1:]:
        lon, lat, hole_turns = _unwrap(ring)
        if hole_turns:
            raise GeometryError("a hole encircles a pole")
        lon = lon + 360.0 * round((centre - float(np.mean(lon))) / 360.0)
        holes.append(shapely.linearrings(np.column_stack([lon, lat])))
    repaired = _areal(shapely.make_valid(shapely.polygons(shell, holes=holes or None)))
    return None if repaired.is_empty else repaired


def _areal(geom: BaseGeometry) -> BaseGeometry:
    """Only the polygons of a geometry (``make_valid`` may add the lines and points of a spike)."""
    parts = [p for p in shapely.get_parts(geom) if isinstance(p, Polygon | MultiPolygon) and not p.is_empty]
    if not parts:
        return Polygon()
    return parts[0] if len(parts) == 1 else shapely.union_all(parts)


def _split_at_antimeridian(geom: BaseGeometry) -> list[BaseGeometry]:
    minx, _, maxx, _ = geom.bounds
    if minx >= -180.0 and maxx <= 180.0:
        return [geom]
    pieces = []
    for turn in range(math.floor((minx + 180.0) / 360.0), math.floor((maxx + 180.0) / 360.0) + 1):
        offset = 360.0 * turn
        window = shapely.box(-180.0 + offset, -90.0, 180.0 + offset, 90.0)
        piece = _areal(geom.intersection(window))
        if not piece.is_empty:
            pieces.append(shapely.transform(piece, lambda xy, o=offset: xy - np.array([o, 0.0])))
    return pieces


def _snap_to_seam(xy: np.ndarray) -> np.ndarray:
    x, y = xy[:, 0], xy[:, 1]
    x = np.where(np.abs(x - 180.0) < _SEAM_EPS, 180.0, np.where(np.abs(x + 180.0) < _SEAM_EPS, -180.0, x))
    return np.column_stack([np.clip(x, -180.0, 180.0), np.clip(y, -90.0, 90.0)])


def _has_wide_edge(geom: BaseGeometry) -> bool:
    """Whether an edge spans 180° of longitude or more (a band around a pole, read back as a jump)."""
    for ring in shapely.get_rings(shapely.get_parts(geom)):  # get_rings sees nothing in a MultiPolygon
        x = shapely.get_coordinates(ring)[:, 0]
        if len(x) > 1 and float(np.abs(np.diff(x)).max()) >= 180.0:
            return True
    return False


def _share(geom: BaseGeometry) -> float:
    equal_area = shapely.transform(geom, lambda xy: np.column_stack([np.radians(xy[:, 0]), np.sin(np.radians(xy[:, 1]))]))
    return float(equal_area.area) / _GLOBE_EQUAL_AREA


def _finish(shapes: Iterable[BaseGeometry], *, max_globe_share: float, max_vertices: int) -> dict[str, Any]:
    shapes = list(shapes)
    pieces = [piece for shape in shapes for piece in _split_at_antimeridian(shape)]
    pieces = [shapely.transform(p, _snap_to_seam) for p in pieces]
    # A polar cap spans 360° unwrapped; its two pieces meet again on the meridian where its ring
    # was closed, at coordinates that went through +360 and -360 and may differ in the last bit,
    # so they are united on a fine grid (1e-10°) to dissolve that seam.
    grid = _POLAR_GRID_DEG if any(s.bounds[2] - s.bounds[0] >= 360.0 - 1e-6 for s in shapes) else None
    merged = _areal(shapely.make_valid(shapely.union_all(pieces, grid_size=grid))) if pieces else Polygon()
    if merged.is_empty or merged.area < _MIN_AREA_DEG2:
        raise GeometryError("empty geometry: no area left after repair")
    if _has_wide_edge(merged):
        merged = shapely.segmentize(merged, _MAX_EDGE_DEG)
    # normalize() fixes the order of parts and the start of each ring, so equal areas serialise alike
    polygons = [orient(p, sign=1.0) for p in shapely.get_parts(shapely.normalize(merged)) if isinstance(p, Polygon)]
    result: BaseGeometry = polygons[0] if len(polygons) == 1 else MultiPolygon(polygons)
    share = _share(result)
    if share > max_globe_share:
        raise GeometryError(f"area covers {share:.1%} of the globe (limit {max_globe_share:.0%})")
    count = int(shapely.get_num_coordinates(result))
    if count > max_vertices:
        raise GeometryError(f"too many vertices after repair: {count} > {max_vertices}")
    return _to_geojson(polygons)


def _to_geojson(polygons: Sequence[Polygon]) -> dict[str, Any]:
    coordinates = [[shapely.get_coordinates(ring).tolist() for ring in (p.exterior, *p.interiors)] for p in polygons]
    if len(coordinates) == 1:
        return {"type": "Polygon", "coordinates": coordinates[0]}
    return {"type": "MultiPolygon", "coordinates": coordinates}
