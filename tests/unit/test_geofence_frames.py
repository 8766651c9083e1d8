"""A crisis is indexed once per process (``pipeline.domain.geofence.Frames``): the rehearsal's indexing
of an admitted crisis is what the worker's full index uses, and only for that very crisis object."""

from __future__ import annotations

import dataclasses

from pipeline.domain.admission import rehearse
from pipeline.domain.geofence import FRAMES, CrisisIndex, Frames
from pipeline.testing import make_crisis, square


def test_the_full_index_reuses_the_rehearsals_indexing() -> None:
    crisis = make_crisis("frames-1", square(13.4, 52.5, 0.2), buffer_km=5.0)
    rehearse(crisis)
    before = FRAMES.hits
    index = CrisisIndex([crisis, make_crisis("frames-2", square(2.35, 48.85, 0.1))])
    assert FRAMES.hits == before + 1  # frames-1 from the rehearsal; frames-2 indexed anew
    again = CrisisIndex([crisis])
    assert again.by_id["frames-1"].area is index.by_id["frames-1"].area
    found = index.match([52.5, 48.85, 0.0], [13.4, 2.35, 0.0])
    assert sorted((m.point, m.crisis_id, m.distance_km) for m in found) == [(0, "frames-1", 0.0), (1, "frames-2", 0.0)]


def test_another_object_is_indexed_anew_even_when_equal() -> None:
    frames = Frames()
    crisis = make_crisis("frames-3", square(0.0, 0.0, 0.1))
    first = frames.of(crisis)
    assert frames.of(crisis) is first and frames.hits == 1
    twin = dataclasses.replace(crisis)
    assert twin == crisis and twin is not crisis
    assert frames.of(twin) is not first and frames.hits == 1
    newer = dataclasses.replace(crisis, version=2, geometry=square(1.0, 1.0, 0.1))
    assert frames.of(newer)[1].bounds != first[1].bounds


def test_at_most_capacity_kept_oldest_forgotten_first() -> None:
    frames = Frames(capacity=2)
    a, b, c = (make_crisis(f"frames-{k}", square(k, k, 0.1)) for k in (4, 5, 6))
    kept_a = frames.of(a)
    frames.of(b)
    frames.of(a)  # a used again: b is now the oldest
    frames.of(c)
    assert frames.of(a) is kept_a and frames.hits == 2
    assert len(frames._kept) == 2 and id(b) not in frames._kept
