"""What the operator's map draws around a crisis: its proximity band, the area grown by ``buffer_km``.

The worker calls a citizen ``near`` a crisis when the ellipsoidal distance to its area is at most
the crisis's ``buffer_km`` (:mod:`pipeline.domain.geofence`). The map shows that band as a polygon
so an operator sees where "near" ends. It is drawn, not decided on: the area is grown in a local
equirectangular frame (longitudes scaled by the cosine of the area's mid latitude, one degree of
latitude taken as :data:`KM_PER_DEGREE`), which matches the worker's distances to within a few per
cent over bands of tens of kilometres — close enough for the eye, and the counts come from the
worker, never from this outline.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final

import shapely
from shapely.affinity import scale
from shapely.geometry import mapping, shape

KM_PER_DEGREE: Final = 111.32  # a mean degree of latitude; display only
# Vertices per quarter circle of the band's rounded corners: smooth enough on screen, small on the wire.
BAND_QUAD_SEGMENTS: Final = 8
# Vertex budget of a band sent to the page: a detailed coastline area is simplified to about this size.
BAND_TOLERANCE_KM: Final = 0.2


def proximity_band(geometry: Mapping[str, Any] | None, buffer_km: float) -> dict[str, Any] | None:
    """The crisis area grown by ``buffer_km`` as GeoJSON (lon,lat), or None without an area or a band."""
    if geometry is None or buffer_km <= 0:
        return None
    area = shape(geometry)
    if area.is_empty:
        return None
    _, miny, _, maxy = area.bounds
    lon_scale = max(math.cos(math.radians((miny + maxy) / 2.0)), 0.05)
    local = scale(area, xfact=lon_scale, yfact=1.0, origin=(0, 0))
    grown = local.buffer(buffer_km / KM_PER_DEGREE, quad_segs=BAND_QUAD_SEGMENTS)
    grown = grown.simplify(BAND_TOLERANCE_KM / KM_PER_DEGREE, preserve_topology=True)
    band = scale(grown, xfact=1.0 / lon_scale, yfact=1.0, origin=(0, 0))
    # Latitudes past a pole mean nothing on a Web Mercator map; longitudes past ±180 are drawn as they are.
    band = shapely.clip_by_rect(band, -540.0, -85.0, 540.0, 85.0)
    return None if band.is_empty else dict(mapping(band))
