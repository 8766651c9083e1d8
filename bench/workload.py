"""The benchmarks' one workload: crisis areas around real cities, citizens clustered around them.

Every benchmark that geofences draws from here, so their figures describe the same situation and a
rerun on another machine measures the same thing: the generator is seeded and walks the cities in
the stable order of :func:`producers.cities.load_cities`.

A crisis is a lobed, star-shaped polygon of 20–500 vertices centred on a city of at least 100,000
people (a flood plain, a fire front: irregular, with as many vertices as the alerts of real feeds
carry), 5–40 km across, with a proximity band of 0, 5, 10 or 25 km. A citizen belongs to one crisis's
city: a chosen share (``inside_share``) stands strictly inside the star's inner circle, so is
inside the area whatever the star's spikes do; the rest stand in a ring from just past its outer
radius to a few bands beyond, some near, most out. Cities close together have overlapping areas,
so a citizen may be in or near more than one crisis, as happens in a real disaster.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache

import numpy as np

from pipeline.domain.travellers import City
from pipeline.testing import make_checkin, make_crisis
from producers.cities import load_cities
from schemas import Checkin, Crisis

SEED = 8
BANDS_KM = (0.0, 5.0, 10.0, 25.0)
MIN_VERTICES, MAX_VERTICES = 20, 500
KM_PER_DEGREE = 111.32
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Area:
    """One crisis area as generated: its city, its radii (km) and its proximity band."""

    city: City
    inner_km: float  # every vertex is at least this far from the centre
    outer_km: float  # and at most this far
    band_km: float


@dataclass(frozen=True, slots=True)
class Citizens:
    """Citizens' positions as columns; ``inside`` says who was placed inside their crisis's area."""

    lats: np.ndarray
    lons: np.ndarray
    crisis: np.ndarray  # index of the crisis each citizen was placed around
    inside: np.ndarray

    def __len__(self) -> int:
        return len(self.lats)

    def ids(self, prefix: str = "cz") -> list[str]:
        return [f"{prefix}{i:07d}" for i in range(len(self))]


@dataclass(frozen=True, slots=True)
class Workload:
    areas: tuple[Area, ...]
    crises: tuple[Crisis, ...]

    def citizens(self, n: int, inside_share: float = 0.1, seed: int = SEED) -> Citizens:
        return place_citizens(self.areas, n, inside_share, seed)


def _radii(outer_km: float, vertices: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Angles and radii of a lobed outline: a few random harmonics and a little jitter, between half
    and all of ``outer_km`` (real alert areas follow valleys and coasts; they are not spiky stars)."""
    step = 2 * math.pi / vertices
    angles = np.arange(vertices) * step + rng.uniform(0, 0.4 * step, vertices)
    shape = sum(rng.uniform(0, 1 / k) * np.cos(k * angles + rng.uniform(0, 2 * math.pi)) for k in range(1, 5))
    shape = np.asarray(shape, dtype=float) + rng.normal(0, 0.03, vertices)
    shape = (shape - shape.min()) / max(float(np.ptp(shape)), 1e-9)  # 0..1
    return angles, outer_km * (0.5 + 0.5 * shape)


def _star(area: Area, angles: np.ndarray, radii: np.ndarray) -> dict[str, object]:
    """The ring (counter-clockwise, closed) through those angles and radii around the city."""
    lat0, lon0 = area.city.lat, area.city.lon
    lats = lat0 + radii * np.sin(angles) / KM_PER_DEGREE
    lons = lon0 + radii * np.cos(angles) / (KM_PER_DEGREE * math.cos(math.radians(lat0)))
    ring = [[round(float(x), 6), round(float(y), 6)] for x, y in zip(lons, lats, strict=True)]
    return {"type": "Polygon", "coordinates": [[*ring, ring[0]]]}


@cache
def workload(n_crises: int = 1000, seed: int = SEED) -> Workload:
    """``n_crises`` crisis areas around as many distinct cities (cached: the same call, the same objects)."""
    rng = np.random.default_rng(seed)
    # Cities far enough from the poles and the antimeridian that a 40 km star stays a simple polygon.
    cities = [c for c in load_cities() if abs(c.lat) < 70 and abs(c.lon) < 179]
    chosen = sorted(rng.choice(len(cities), size=n_crises, replace=False).tolist())
    areas, crises = [], []
    effective = EPOCH - timedelta(days=1)
    for i, at in enumerate(chosen):
        vertices = int(rng.integers(MIN_VERTICES, MAX_VERTICES + 1))
        angles, radii = _radii(float(rng.uniform(5.0, 40.0)) / 2, vertices, rng)
        area = Area(cities[at], inner_km=float(radii.min()), outer_km=float(radii.max()),
                    band_km=float(rng.choice(BANDS_KM)))
        areas.append(area)
        crises.append(make_crisis(f"bench-{i:04d}", _star(area, angles, radii), buffer_km=area.band_km,
                                  effective=effective, title=f"Flooding near {area.city.name}",
                                  country_codes=(area.city.country_code,)))
    return Workload(tuple(areas), tuple(crises))


def place_citizens(areas: Sequence[Area], n: int, inside_share: float, seed: int = SEED) -> Citizens:
    """``n`` citizens around the areas' cities, ``inside_share`` of them inside the area they belong to."""
    rng = np.random.default_rng(seed + 1)
    around = rng.integers(0, len(areas), n)
    inside = rng.random(n) < inside_share
    inner = np.array([a.inner_km for a in areas])[around]
    outer = np.array([a.outer_km for a in areas])[around]
    band = np.array([a.band_km for a in areas])[around]
    # Inside: uniform over a disc well within the star (every edge of the star passes farther out).
    radius_in = 0.9 * inner * np.cos(np.pi / MIN_VERTICES) * np.sqrt(rng.random(n))
    # Outside: from just past the outermost vertex to three bands (or 30 km) beyond it.
    radius_out = outer * 1.02 + rng.random(n) * np.maximum(3 * band, 30.0)
    radius = np.where(inside, radius_in, radius_out)
    angle = rng.uniform(0, 2 * np.pi, n)
    lat0 = np.array([a.city.lat for a in areas])[around]
    lon0 = np.array([a.city.lon for a in areas])[around]
    lats = lat0 + radius * np.sin(angle) / KM_PER_DEGREE
    lons = lon0 + radius * np.cos(angle) / (KM_PER_DEGREE * np.cos(np.radians(lat0)))
    return Citizens(lats, lons, around, inside)


def checkins(citizens: Citizens, start: datetime = EPOCH, per_second: int = 1000,
             prefix: str = "cz") -> Iterator[Checkin]:
    """One check-in per citizen in order, ``observed_at`` advancing ``per_second`` check-ins a second."""
    for i, (lat, lon) in enumerate(zip(citizens.lats.tolist(), citizens.lons.tolist(), strict=True)):
        yield make_checkin(f"{prefix}{i:07d}", lat, lon, observed_at=start + timedelta(seconds=i / per_second))
