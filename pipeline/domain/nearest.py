"""The nearest point of an area's rings to many points, compiled: what GEOS's nearest points give, 5–10× sooner.

The geofence needs, for every (check-in, crisis) pair outside an area with a proximity band, the
nearest point of the area's rings in the crisis's local frame (:mod:`pipeline.domain.geofence`).
``shapely.shortest_line`` answers it exactly but costs GEOS 4–5 µs a pair (a geometry per point, a
facet tree walk, a line built and taken apart again), and the workload has about 0.6 such pairs per
check-in: it alone was twice what bare shapely spends on a whole point (docs/benchmarks.md,
"Geofence kernel").

Here the rings are flat arrays of segments, in the rings' own order, cut into chunks of
:data:`CHUNK` segments with their bounding boxes. For each pair a numba kernel takes the chunk whose
box is nearest, measures its segments for an upper bound, then walks every chunk in order, skipping
those whose box is farther than that bound, and measures the rest segment by segment. Each segment
is measured with GEOS's own formulas (``Distance::pointToSegment`` to choose the segment, the first
strictly nearest one winning; ``LineSegment::closestPoint`` for the point on it), evaluated in the
same order of operations, so the nearest point is the one GEOS gives, bit for bit
(tests/unit/test_geofence_kernel.py compares them on the benchmark's areas and on random and
adversarial points). Where two segments are exactly as near with different nearest points (a point
midway between a ring and its hole), GEOS's facet tree, not ring order, decides which one it
reports: the kernel flags such pairs and GEOS answers them.

The same chunks answer "is the point inside?" by the parity of the edges a ray crosses, exactly
where the point is clear of every edge; nearer than ``EDGE_CLEARANCE`` (1e-9 frame units, see
:mod:`pipeline.domain._nearest_kernel`) the kernel says it cannot tell, and the caller asks GEOS's
robust predicate.

numba is imported and the kernel compiled (or loaded from numba's on-disk cache) on first use, so a
process that never geofences does not pay its half second of import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

CHUNK = 8  # segments per chunk: small enough to skip most of a ring, big enough that boxes are few


@dataclass(frozen=True, slots=True)
class RingSegments:
    """The segments of one or many geometries' rings, chunked, with each chunk's bounding box.

    Geometry ``g`` owns chunks ``chunks[g]:chunks[g + 1]``; chunk ``h`` owns segments
    ``chunk_start[h]:chunk_start[h + 1]``. A chunk never spans two geometries."""

    x0: np.ndarray
    y0: np.ndarray
    x1: np.ndarray
    y1: np.ndarray
    chunk_start: np.ndarray  # int64, one more than the chunks
    boxes: np.ndarray  # float64 (chunks, 4): min x, min y, max x, max y of each chunk's segments
    chunks: np.ndarray  # int64, one more than the geometries
    rings: np.ndarray  # the geometries themselves (prepared), for GEOS to settle exact ties

    @classmethod
    def of(cls, rings: BaseGeometry | np.ndarray | list[BaseGeometry]) -> RingSegments:
        """The segments of each (multi)linestring, in the order GEOS stores them."""
        geoms = np.empty(1 if isinstance(rings, BaseGeometry) else len(rings), dtype=object)
        geoms[:] = [rings] if isinstance(rings, BaseGeometry) else list(rings)
        shapely.prepare(geoms)
        parts, owner = shapely.get_parts(geoms, return_index=True)
        coords, part = shapely.get_coordinates(parts, return_index=True)
        same = part[1:] == part[:-1]  # consecutive vertices of one part make a segment
        x0, y0 = coords[:-1][same, 0], coords[:-1][same, 1]
        x1, y1 = coords[1:][same, 0], coords[1:][same, 1]
        seg_geom = owner[part[:-1][same]]
        # chunk boundaries: every CHUNK segments within a geometry, and wherever the geometry changes
        counts = np.bincount(seg_geom, minlength=len(geoms))
        per_geom = -(-counts // CHUNK)  # ceil
        chunks = np.concatenate([[0], np.cumsum(per_geom)]).astype(np.int64)
        seg_offset = np.concatenate([[0], np.cumsum(counts)])
        starts = [seg_offset[g] + CHUNK * np.arange(per_geom[g]) for g in range(len(geoms))]
        chunk_start = np.concatenate([*starts, [len(x0)]]).astype(np.int64) if len(x0) else np.zeros(1, np.int64)
        xs_min, xs_max = np.minimum(x0, x1), np.maximum(x0, x1)
        ys_min, ys_max = np.minimum(y0, y1), np.maximum(y0, y1)
        begin = chunk_start[:-1]
        boxes = np.empty((len(begin), 4), dtype=float)
        if len(begin):
            boxes[:, 0] = np.minimum.reduceat(xs_min, begin)
            boxes[:, 1] = np.minimum.reduceat(ys_min, begin)
            boxes[:, 2] = np.maximum.reduceat(xs_max, begin)
            boxes[:, 3] = np.maximum.reduceat(ys_max, begin)
        return cls(np.ascontiguousarray(x0), np.ascontiguousarray(y0), np.ascontiguousarray(x1),
                   np.ascontiguousarray(y1), chunk_start, boxes, chunks, geoms)

    @classmethod
    def concat(cls, many: list[RingSegments]) -> RingSegments:
        """Several geometries' segments as one: geometry ``g`` of the result is the ``g``-th in order."""
        if not many:
            return cls.of(np.zeros(0, dtype=object))
        seg_offsets = np.cumsum([0] + [len(s.x0) for s in many])
        chunk_offsets = np.cumsum([0] + [len(s.boxes) for s in many])
        return cls(
            np.concatenate([s.x0 for s in many]), np.concatenate([s.y0 for s in many]),
            np.concatenate([s.x1 for s in many]), np.concatenate([s.y1 for s in many]),
            np.concatenate([s.chunk_start[:-1] + o for s, o in zip(many, seg_offsets, strict=False)]
                           + [np.array([seg_offsets[-1]])]).astype(np.int64),
            np.concatenate([s.boxes for s in many]).reshape(-1, 4),
            np.concatenate([s.chunks[:-1] + o for s, o in zip(many, chunk_offsets, strict=False)]
                           + [np.array([chunk_offsets[-1]])]).astype(np.int64),
            np.concatenate([s.rings for s in many]))

    def part(self, g: int) -> RingSegments:
        """Geometry ``g``'s segments alone (views of these arrays)."""
        c0, c1 = int(self.chunks[g]), int(self.chunks[g + 1])
        s0, s1 = int(self.chunk_start[c0]), int(self.chunk_start[c1])
        return RingSegments(self.x0[s0:s1], self.y0[s0:s1], self.x1[s0:s1], self.y1[s0:s1],
                            self.chunk_start[c0:c1 + 1] - s0, self.boxes[c0:c1], np.array([0, c1 - c0], dtype=np.int64),
                            self.rings[g:g + 1])

    def nearest_points(self, x: np.ndarray, y: np.ndarray, geometry: np.ndarray,
                       beyond: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """For each ``k``, the nearest point of geometry ``geometry[k]``'s rings to ``(x[k], y[k])``:
        ``shapely.shortest_line(rings, point)``'s first point. With ``beyond``, NaN instead for a point
        whose distance to the rings is surely more than ``beyond[k]`` (a lower bound says so: the
        nearest bounding box of the rings' chunks is farther), without measuring it."""
        kernel = _kernel()
        x = np.ascontiguousarray(x, dtype=float)
        y = np.ascontiguousarray(y, dtype=float)
        geometry = np.ascontiguousarray(geometry, dtype=np.int64)
        out_x = np.empty(len(x), dtype=float)
        out_y = np.empty(len(x), dtype=float)
        tied = np.empty(len(x), dtype=bool)
        if beyond is None:
            beyond = np.full(len(x), np.inf)
        kernel(x, y, geometry, np.ascontiguousarray(beyond, dtype=float), self.chunks, self.chunk_start,
               self.boxes, self.x0, self.y0, self.x1, self.y1, out_x, out_y, tied)
        if tied.any():  # equally near segments: GEOS's own choice, from GEOS
            nearest = shapely.get_coordinates(shapely.shortest_line(self.rings[geometry[tied]],
                                                                    shapely.points(x[tied], y[tied])))[0::2]
            out_x[tied], out_y[tied] = nearest[:, 0], nearest[:, 1]
        return out_x, out_y


    def inside(self, x: np.ndarray, y: np.ndarray, geometry: np.ndarray) -> np.ndarray:
        """For each ``k``, 1 when ``(x[k], y[k])`` is inside geometry ``geometry[k]``'s rings, 0 when
        outside, -1 when it is too near an edge to say without an exact predicate (ask GEOS)."""
        from pipeline.domain import _nearest_kernel

        out = np.empty(len(x), dtype=np.int8)
        _nearest_kernel.inside(np.ascontiguousarray(x, dtype=float), np.ascontiguousarray(y, dtype=float),
                               np.ascontiguousarray(geometry, dtype=np.int64), self.chunks, self.chunk_start,
                               self.boxes, self.x0, self.y0, self.x1, self.y1, out)
        return out


def _kernel() -> Callable[..., Any]:
    """The compiled kernel: numba is imported, and the kernel compiled or loaded from numba's on-disk
    cache, on first use."""
    from pipeline.domain import _nearest_kernel

    return _nearest_kernel.nearest
