"""The compiled body of :mod:`pipeline.domain.nearest` (imported on first use: numba costs half a second).

Each formula is GEOS's (``Distance::pointToSegment``, ``LineSegment::closestPoint`` and its
``projectionFactor``), written with the same operations in the same order, and compiled without
fast-math, so that every value rounds as GEOS's does.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, MutableMapping

CACHE_DIR_FALLBACK = "crisiswatch-numba-cache"


def cache_dir_fallback(module_dir: str, environ: MutableMapping[str, str],
                       writable: Callable[[str], bool] = lambda path: os.access(path, os.W_OK)) -> str | None:
    """Where numba should keep the compiled kernels when it cannot keep them next to this module.

    numba caches a ``cache=True`` function in ``__pycache__`` beside its module, else in the user's
    cache directory, and refuses to compile it at all when it can write neither — as in a container
    with a read-only root filesystem (deploy/k8s). Then, unless ``NUMBA_CACHE_DIR`` says where, the
    kernels are cached under the temporary directory (an emptyDir in deploy/k8s): set in ``environ``
    and returned; ``None`` when numba's own choice stands."""
    if environ.get("NUMBA_CACHE_DIR"):
        return None
    pycache = os.path.join(module_dir, "__pycache__")
    if writable(pycache if os.path.isdir(pycache) else module_dir):
        return None
    environ["NUMBA_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), CACHE_DIR_FALLBACK)
    return environ["NUMBA_CACHE_DIR"]


cache_dir_fallback(os.path.dirname(os.path.abspath(__file__)), os.environ)  # before numba reads its configuration

import numba  # noqa: E402 - numba reads NUMBA_CACHE_DIR when imported
import numpy as np  # noqa: E402

# Box pruning may only skip a chunk that cannot hold the nearest segment, rounding included: the
# bound is widened by far more than the rounding of any distance here (degrees, values below 400).
RELATIVE_SLACK = 1e-9
ABSOLUTE_SLACK = 1e-9


@numba.njit(cache=True, nogil=True, inline="always")
def point_to_segment(px: float, py: float, ax: float, ay: float, bx: float, by: float) -> float:
    """GEOS ``Distance::pointToSegment``."""
    if ax == bx and ay == by:
        return math.sqrt((px - ax) * (px - ax) + (py - ay) * (py - ay))
    len2 = (bx - ax) * (bx - ax) + (by - ay) * (by - ay)
    r = ((px - ax) * (bx - ax) + (py - ay) * (by - ay)) / len2
    if r <= 0.0:
        return math.sqrt((px - ax) * (px - ax) + (py - ay) * (py - ay))
    if r >= 1.0:
        return math.sqrt((px - bx) * (px - bx) + (py - by) * (py - by))
    s = ((ay - py) * (bx - ax) - (ax - px) * (by - ay)) / len2
    return abs(s) * math.sqrt(len2)


@numba.njit(cache=True, nogil=True, inline="always")
def box_distance2(px: float, py: float, minx: float, miny: float, maxx: float, maxy: float) -> float:
    """Squared distance from a point to a box (0 inside): no segment in the box is nearer."""
    dx = max(minx - px, 0.0, px - maxx)
    dy = max(miny - py, 0.0, py - maxy)
    return dx * dx + dy * dy


@numba.njit(cache=True, nogil=True, inline="always")
def closest_point(px: float, py: float, ax: float, ay: float, bx: float, by: float) -> tuple[float, float]:
    """GEOS ``LineSegment::closestPoint`` (with ``projectionFactor``'s exact answers at the ends)."""
    if px == ax and py == ay:
        factor = 0.0
    elif px == bx and py == by:
        factor = 1.0
    else:
        dx = bx - ax
        dy = by - ay
        factor = ((px - ax) * dx + (py - ay) * dy) / (dx * dx + dy * dy)
    if factor > 0.0 and factor < 1.0:
        return ax + factor * (bx - ax), ay + factor * (by - ay)
    if math.sqrt((ax - px) * (ax - px) + (ay - py) * (ay - py)) < \
            math.sqrt((bx - px) * (bx - px) + (by - py) * (by - py)):
        return ax, ay
    return bx, by


@numba.njit(cache=True, nogil=True)
def nearest(xs: np.ndarray, ys: np.ndarray, geometry: np.ndarray, beyond: np.ndarray, chunks: np.ndarray,
            chunk_start: np.ndarray, boxes: np.ndarray, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray,
            y1: np.ndarray, out_x: np.ndarray, out_y: np.ndarray, tied: np.ndarray) -> None:
    """For each ``k``: the nearest point of geometry ``geometry[k]``'s segments to ``(xs[k], ys[k])``, or
    NaN when every chunk's box is farther than ``beyond[k]`` (so is every segment). ``tied[k]`` is set
    when another segment is as near (to 1e-12) with another nearest point: GEOS's facet tree may pick
    either, so the caller asks GEOS."""
    widest = 0
    for g in range(len(chunks) - 1):
        widest = max(widest, chunks[g + 1] - chunks[g])
    box_d2 = np.empty(widest)  # each chunk's box distance, measured once per point
    seen = np.empty(widest * 64, dtype=np.int64)  # the segments measured for one point ...
    seen_d = np.empty(widest * 64)  # ... and their distances
    for k in range(len(xs)):
        tied[k] = False
        px, py = xs[k], ys[k]
        first, last = chunks[geometry[k]], chunks[geometry[k] + 1]
        # an upper bound: the segments of the chunk whose box is nearest
        closest_box, closest_d2 = first, math.inf
        for h in range(first, last):
            d2 = box_distance2(px, py, boxes[h, 0], boxes[h, 1], boxes[h, 2], boxes[h, 3])
            box_d2[h - first] = d2
            if d2 < closest_d2:
                closest_box, closest_d2 = h, d2
        if closest_d2 > beyond[k] * beyond[k]:
            out_x[k] = math.nan
            out_y[k] = math.nan
            continue
        bound = math.inf
        for s in range(chunk_start[closest_box], chunk_start[closest_box + 1]):
            bound = min(bound, point_to_segment(px, py, x0[s], y0[s], x1[s], y1[s]))
        bound = bound * (1.0 + RELATIVE_SLACK) + ABSOLUTE_SLACK
        bound2 = bound * bound
        # GEOS's choice: the first strictly nearest segment in ring order
        best, chosen, measured = math.inf, -1, 0
        for h in range(first, last):
            if box_d2[h - first] > bound2:
                continue
            for s in range(chunk_start[h], chunk_start[h + 1]):
                d = point_to_segment(px, py, x0[s], y0[s], x1[s], y1[s])
                if measured < len(seen):
                    seen[measured] = s
                    seen_d[measured] = d
                    measured += 1
                else:
                    tied[k] = True  # more candidates than kept: let GEOS decide
                if d < best:
                    best, chosen = d, s
        near_x, near_y = closest_point(px, py, x0[chosen], y0[chosen], x1[chosen], y1[chosen])
        out_x[k] = near_x
        out_y[k] = near_y
        for j in range(measured):
            s = seen[j]
            if s != chosen and seen_d[j] <= best * (1.0 + 1e-12) + 1e-300:
                other_x, other_y = closest_point(px, py, x0[s], y0[s], x1[s], y1[s])
                if other_x != near_x or other_y != near_y:
                    tied[k] = True
                    break


INSIDE, OUTSIDE, ASK_GEOS = 1, 0, -1
# Nearer than this (frame units, about 0.1 mm) to an edge, a point is left to GEOS's exact predicate.
EDGE_CLEARANCE = 1e-9


@numba.njit(cache=True, nogil=True)
def inside(xs: np.ndarray, ys: np.ndarray, geometry: np.ndarray, chunks: np.ndarray, chunk_start: np.ndarray,
           boxes: np.ndarray, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray,
           out: np.ndarray) -> None:
    """For each ``k``: whether ``(xs[k], ys[k])`` is inside geometry ``geometry[k]``'s rings by the parity of
    the edges a ray towards +x crosses, or ASK_GEOS when the point is within EDGE_CLEARANCE of an edge.

    Away from every edge the parity is exact: whether an edge straddles the ray is decided by exact
    comparisons (half-open in y), and the crossing's x is computed within a few units of the last place
    of the coordinates (far below EDGE_CLEARANCE), while the point is at least its distance to the edge
    away from it horizontally. So the answer is the one GEOS's robust predicate gives."""
    clearance2 = EDGE_CLEARANCE * EDGE_CLEARANCE
    for k in range(len(xs)):
        px, py = xs[k], ys[k]
        crossings = 0
        near_edge = False
        for h in range(chunks[geometry[k]], chunks[geometry[k] + 1]):
            minx, miny, maxx, maxy = boxes[h, 0], boxes[h, 1], boxes[h, 2], boxes[h, 3]
            close = box_distance2(px, py, minx, miny, maxx, maxy) <= clearance2
            if not close and (maxy <= py or miny > py or maxx < px):
                continue  # no edge here straddles the ray to the right of the point, none is near
            for s in range(chunk_start[h], chunk_start[h + 1]):
                ax, ay, bx, by = x0[s], y0[s], x1[s], y1[s]
                if close and point_to_segment(px, py, ax, ay, bx, by) <= EDGE_CLEARANCE:
                    near_edge = True
                    break
                if (ay > py) != (by > py) and px < ax + (py - ay) * (bx - ax) / (by - ay):
                    crossings += 1
            if near_edge:
                break
        out[k] = ASK_GEOS if near_edge else (INSIDE if crossings % 2 == 1 else OUTSIDE)
