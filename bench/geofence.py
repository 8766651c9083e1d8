"""Geofencing check-ins in the worker's batches, next to bare shapely and a naive loop, in one run.

    python -m bench.geofence [--quick] [--points N] [--crises N] [--rounds N]

The workload is :mod:`bench.workload`'s: 1,000 crisis areas of 20–500 vertices around real cities,
citizens clustered around them, 10 % inside. Each round times, on the same points:

1. :meth:`CrisisIndex.match_columns` over batches of ``CRISISWATCH_BATCH_SIZE`` points, as the worker's
   tracker calls it (inside and within the proximity band, with distances on the ellipsoid, as
   columns);
2. bare shapely on the same batches: ``STRtree.query(shapely.points(lons, lats), "within")`` over
   the crisis areas alone (only "inside", no band, no distances): the floor for any geofence
   built on shapely on this machine;
3. a naive loop, on a small sample: every point against every crisis, one distance each.

The three answers are checked equal where they overlap (the naive loop's sample; the inside pairs
of bare shapely), so a fast wrong answer cannot pass. Ratios are of rates measured in the same round.
Rates are of this process's CPU time: the work is single-threaded and in-process, so time the
machine gives to other processes does not count (on a shared machine, wall-clock rates of the
same code moved 2–3× between rounds).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import shapely

from bench.workload import workload
from pipeline.domain.geofence import CrisisIndex, Matches
from pipeline.settings import Settings

FULL = {"points": 1_000_000, "crises": 1000, "rounds": 3, "naive_points": 20}
QUICK = {"points": 100_000, "crises": 1000, "rounds": 3, "naive_points": 5}


def _batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@contextmanager
def _no_gc() -> Iterator[None]:
    """As ``timeit`` does: collect first, then no collection while timing, so one variant does not
    pay for scanning the objects another one left alive."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def measure(points: int, crises: int, rounds: int, naive_points: int, batch: int) -> dict[str, list[float]]:
    load = workload(crises)
    index = CrisisIndex(load.crises)
    bare_tree = shapely.STRtree([item.area for item in index.items])
    citizens = load.citizens(points, inside_share=0.1)
    lats, lons = citizens.lats, citizens.lons
    slices = _batches(points, batch)
    out: dict[str, list[float]] = {"geofence_points_per_s": [], "geofence_bare_shapely_points_per_s": [],
                                   "geofence_naive_points_per_s": [], "geofence_vs_bare_shapely_ratio": [],
                                   "geofence_vs_naive_ratio": []}
    for s in slices[:10]:  # warm-up, not counted: first calls pay for lazily built indexes and caches
        index.match_columns(lats[s], lons[s])
        bare_tree.query(shapely.points(lons[s], lats[s]), predicate="within")
    for round_no in range(rounds):
        with _no_gc():
            started = time.process_time()
            found = [index.match_columns(lats[s], lons[s]) for s in slices]  # what the tracker calls
            ours = points / (time.process_time() - started)
        with _no_gc():
            started = time.process_time()
            bare = [bare_tree.query(shapely.points(lons[s], lats[s]), predicate="within") for s in slices]
            floor = points / (time.process_time() - started)

        sample = np.random.default_rng(round_no).choice(points, naive_points, replace=False)
        started = time.process_time()
        naive = set()
        for i in sample.tolist():
            for item in index.items:
                distance = item.distance_km(float(lats[i]), float(lons[i]))
                if distance == 0.0 or (item.crisis.buffer_km > 0 and distance <= item.crisis.buffer_km):
                    naive.add((i, item.crisis_id))
        slow = naive_points / (time.process_time() - started)

        if round_no == 0:
            _check(index, slices, found, bare, naive, set(sample.tolist()))
        out["geofence_points_per_s"].append(ours)
        out["geofence_bare_shapely_points_per_s"].append(floor)
        out["geofence_naive_points_per_s"].append(slow)
        out["geofence_vs_bare_shapely_ratio"].append(ours / floor)
        out["geofence_vs_naive_ratio"].append(ours / slow)
    return out


def _check(index: CrisisIndex, slices: list[slice], found: list[Matches], bare: list[np.ndarray],
           naive: set[tuple[int, str]], sample: set[int]) -> None:
    """The batch answer agrees with bare shapely on "inside" and with the naive loop on its sample."""
    ids = [item.crisis_id for item in index.items]
    ours: set[tuple[int, str]] = set()
    ours_inside: set[tuple[int, str]] = set()
    floor: set[tuple[int, str]] = set()
    for s, matches, (points, crises) in zip(slices, found, bare, strict=True):
        start = s.start
        for p, c, d in zip(matches.point.tolist(), matches.crisis.tolist(), matches.distance_km.tolist(), strict=True):
            ours.add((start + p, ids[c]))
            if d == 0.0:
                ours_inside.add((start + p, ids[c]))
        floor.update((start + p, ids[c]) for p, c in zip(points.tolist(), crises.tolist(), strict=True))
    if ours_inside != floor:
        raise AssertionError(f"geofence and bare shapely disagree on {len(ours_inside ^ floor)} inside pairs")
    mine = {pair for pair in ours if pair[0] in sample}
    if mine != naive:
        raise AssertionError(f"geofence and the naive loop disagree on {len(mine ^ naive)} pairs")


def run(quick: bool) -> dict[str, list[float]]:
    """The harness's entry point: per-round values of each key."""
    sizes = QUICK if quick else FULL
    return measure(batch=Settings().batch_size, **sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the harness's quick sizes")
    parser.add_argument("--points", type=int)
    parser.add_argument("--crises", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--naive-points", type=int)
    parser.add_argument("--batch", type=int, default=Settings().batch_size, help="points per match call (the worker's batch)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sizes = dict(QUICK if args.quick else FULL)
    for key in sizes:
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    result = measure(batch=args.batch, **sizes)
    if args.json:
        print(json.dumps(result))
        return
    print(f"geofence: {sizes['crises']} crisis areas, {sizes['points']:,} points in batches of {args.batch:,}")
    for key, values in result.items():
        print(f"  {key:<38} {float(np.median(values)):>14,.2f}   rounds: {', '.join(f'{v:,.2f}' for v in values)}")


if __name__ == "__main__":
    main()
