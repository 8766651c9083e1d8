"""The one-pass batch geofence gives exactly what one crisis at a time gives, for any mix of crises."""

from __future__ import annotations

import numpy as np

from pipeline.domain.geofence import CrisisIndex
from pipeline.testing import DONUT, FIJI_SPLIT, make_crisis, square


def index_and_points() -> tuple[CrisisIndex, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    crises = [make_crisis("fiji", FIJI_SPLIT, buffer_km=80.0), make_crisis("donut", DONUT, buffer_km=30.0),
              make_crisis("donut-0", DONUT, buffer_km=0.0)]
    for i in range(40):  # overlapping squares of every band, so points are in and near several at once
        lon, lat = rng.uniform(-3, 3), rng.uniform(50, 56)
        crises.append(make_crisis(f"sq{i}", square(lon, lat, rng.uniform(0.05, 0.8)),
                                  buffer_km=float(rng.choice([0.0, 1.0, 10.0, 60.0]))))
    lats = np.concatenate([rng.uniform(-20, -14, 1500), rng.uniform(9, 13, 1500), rng.uniform(48, 58, 3000)])
    lons = np.concatenate([np.where(rng.random(1500) < 0.5, rng.uniform(176, 180, 1500), rng.uniform(-180, -177, 1500)),
                           rng.uniform(9, 13, 1500), rng.uniform(-5, 5, 3000)])
    return CrisisIndex(crises), lats, lons


def test_batch_match_equals_one_crisis_at_a_time() -> None:
    index, lats, lons = index_and_points()
    expected = set()
    for item in index.items:
        distances = item.distances_km(lats, lons)
        for i, d in enumerate(distances.tolist()):
            if d == 0.0 or (item.crisis.buffer_km > 0 and d <= item.crisis.buffer_km):
                expected.add((i, item.crisis_id, d))
    got = {(m.point, m.crisis_id, m.distance_km) for m in index.match(lats, lons)}
    assert got == expected
    assert {c for _, c, d in got if d > 0} >= {"fiji", "donut"}  # the case is not vacuous: near matches too
    assert not {c for _, c, d in got if d > 0} & {"donut-0"}


def test_pair_distances_equal_per_crisis_distances_for_every_pair() -> None:
    index, lats, lons = index_and_points()
    rng = np.random.default_rng(3)
    point = rng.integers(0, len(lats), 4000)
    crisis = rng.integers(0, len(index), 4000)
    got = index.pair_distances_km(point, crisis, lats, lons)
    for k in range(len(index)):
        rows = crisis == k
        assert got[rows].tolist() == index.items[k].distances_km(lats[point[rows]], lons[point[rows]]).tolist()


def test_match_columns_of_an_empty_batch() -> None:
    index, _, _ = index_and_points()
    assert len(index.match_columns(np.zeros(0), np.zeros(0))) == 0
