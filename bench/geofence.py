"""Geofencing a batch of check-ins: the vectorised index against one call per point and a naive loop.

    python -m bench.geofence [--points 200000] [--crises 200] [--naive-points 200]

All three answer the same question (which crises contain each point, and which are within their
proximity band) over the same random points and crisis areas, and the results are checked equal on
the points the slow variants see. Prints points/second for each and the ratios.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import shapely

from pipeline.domain.geofence import CrisisIndex
from pipeline.testing import make_crisis, square


def crises(n: int, rng: np.random.Generator) -> list:  # type: ignore[type-arg]
    out = []
    for i in range(n):
        lon, lat = rng.uniform(-170, 170), rng.uniform(-60, 60)
        out.append(make_crisis(f"c{i}", square(lon, lat, rng.uniform(0.2, 2.0)), buffer_km=float(rng.choice([0, 10, 50]))))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=200_000)
    parser.add_argument("--crises", type=int, default=200)
    parser.add_argument("--naive-points", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    index = CrisisIndex(crises(args.crises, rng))
    # points clustered near crisis areas so matches are frequent, plus a uniform background
    centres = np.array([shapely.get_coordinates(i.area.centroid)[0] for i in index.items])
    pick = rng.integers(0, len(centres), args.points)
    lons = np.clip(centres[pick, 0] + rng.normal(0, 1.5, args.points), -180, 180)
    lats = np.clip(centres[pick, 1] + rng.normal(0, 1.5, args.points), -89, 89)

    t = time.perf_counter()
    batch = index.match(lats, lons)
    vectorised_s = time.perf_counter() - t

    n_one = min(args.points, 20 * args.naive_points)
    t = time.perf_counter()
    one_by_one = {(i, m.crisis_id) for i in range(n_one) for m in index.match(lats[i:i + 1], lons[i:i + 1])}
    one_s = time.perf_counter() - t

    n_naive = min(args.points, args.naive_points)
    t = time.perf_counter()
    naive = []
    for i in range(n_naive):
        for item in index.items:
            distance = item.distance_km(float(lats[i]), float(lons[i]))
            if distance == 0.0 or distance <= item.crisis.buffer_km:
                naive.append((i, item.crisis_id, distance))
    naive_s = time.perf_counter() - t

    def key(matches: list, limit: int) -> set:  # type: ignore[type-arg]
        return {(m.point, m.crisis_id) for m in matches if m.point < limit}

    assert key(batch, n_one) == one_by_one
    assert key(batch, n_naive) == {(p, c) for p, c, _ in naive}

    rates = {"vectorised batch": args.points / vectorised_s, "one call per point": n_one / one_s,
             "naive loop": n_naive / naive_s}
    print(f"geofence: {args.crises} crisis areas, {args.points} points ({len(batch)} matches)")
    for name, rate in rates.items():
        print(f"  {name:<20} {rate:>12,.0f} points/s")
    print(f"  ratio vectorised / one-per-point: {rates['vectorised batch'] / rates['one call per point']:.1f}x")
    print(f"  ratio vectorised / naive loop:    {rates['vectorised batch'] / rates['naive loop']:.1f}x")


if __name__ == "__main__":
    main()
