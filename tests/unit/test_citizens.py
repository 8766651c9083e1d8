"""Citizen states in columns: the compact format, the old JSON still read, the vectorised selections,
and a runtime over columns that tells exactly what a runtime over a plain mapping tells."""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator
from datetime import timedelta, timezone
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from pipeline.citizens import FORMAT, CitizenColumns, decode_state, encode_state, partition_of
from pipeline.domain.geofence import CrisisIndex
from pipeline.domain.tracking import CitizenState, GeofenceConfig, Presence, Tracker
from pipeline.metrics import WorkerMetrics
from pipeline.runtime import ColumnarStates, GeofenceRuntime, MemoryEmitter, RawMessage
from pipeline.testing import T0, make_checkin, make_crisis, square
from schemas import encode

JAKARTA = timezone(timedelta(hours=7))
STATES = [
    CitizenState("a", -6.2, 106.8, 10.0, T0),
    CitizenState("b", 1e-9, -179.99999999, None, T0.astimezone(JAKARTA) + timedelta(microseconds=7)),
    CitizenState("ü-ß", 48.85, 2.35, 3.5, T0, {
        "flood": Presence("in", 3, 2, True, T0 + timedelta(seconds=30)),
        "fire": Presence("near", 1, 1, True),
        "quake-é": Presence("out", 2, 5, False, (T0 - timedelta(days=400)).astimezone(JAKARTA))}),
]


@pytest.mark.parametrize("state", STATES, ids=lambda s: s.citizen_id)
def test_a_state_round_trips_exactly_in_the_binary_layout(state: CitizenState) -> None:
    raw = encode_state(state)
    assert raw[0] == FORMAT
    back = decode_state(state.citizen_id, raw)
    assert back == state
    assert back.observed_at.utcoffset() == state.observed_at.utcoffset()  # the offset the warnings quote
    assert len(raw) < len(json.dumps(state.to_dict()))


@pytest.mark.parametrize("state", STATES, ids=lambda s: s.citizen_id)
def test_the_json_of_earlier_versions_is_read(state: CitizenState) -> None:
    old = json.dumps(state.to_dict(), separators=(",", ":")).encode()
    assert decode_state(state.citizen_id, old) == state
    assert decode_state(state.citizen_id, state.to_dict()) == state


def test_a_state_the_layout_cannot_hold_exactly_is_stored_as_json() -> None:
    odd = CitizenState("x", 1.0, 2.0, None, T0.astimezone(timezone(timedelta(seconds=30))))
    raw = encode_state(odd)
    assert raw.startswith(b"{") and decode_state("x", raw) == odd
    columns = CitizenColumns(4)
    columns[b"x"] = raw
    assert columns[b"x"] == raw and columns.state(columns.within((0, 2, 1, 3), None)[0]) == odd


def test_unknown_formats_are_refused() -> None:
    with pytest.raises(ValueError, match="format"):
        decode_state("a", b"\x07whatever")


def test_columns_hold_what_was_written_in_either_format() -> None:
    columns = CitizenColumns(partitions=4)
    for state in STATES[:2]:
        columns[state.citizen_id.encode()] = encode_state(state)
    old = STATES[2]
    columns[old.citizen_id.encode()] = json.dumps(old.to_dict()).encode()  # a changelog of the previous version
    assert len(columns) == 3 and set(columns) == {s.citizen_id.encode() for s in STATES}
    for state in STATES:
        key = state.citizen_id.encode()
        assert decode_state(state.citizen_id, columns[key]) == state
        assert columns[key] == encode_state(state)  # stored compactly from now on
        assert columns.part[columns.row_of(key)] == partition_of(key, 4)
    assert columns.held() == {"flood", "fire", "quake-é"}


def test_holders_follow_every_write_and_deleted_rows_are_reused() -> None:
    columns = CitizenColumns(partitions=2)
    told = CitizenState("a", 0.0, 0.0, None, T0, {"flood": Presence("in", 1, 1, True)})
    columns[b"a"] = encode_state(told)
    columns[b"b"] = encode_state(CitizenState("b", 0.0, 0.0, None, T0, {"flood": Presence("near", 1, 1, True),
                                                                         "fire": Presence("in", 1, 1, True)}))
    assert columns.holders("flood").tolist() == [0, 1] and columns.holders("fire").tolist() == [1]
    columns[b"a"] = encode_state(told.with_presence("flood", None))
    assert columns.holders("flood").tolist() == [1] and columns.held() == {"flood", "fire"}
    del columns[b"b"]
    assert columns.held() == set() and b"b" not in columns and len(columns) == 1
    assert columns.within((-1, 1, -1, 1), None).tolist() == [0]  # the deleted row is never selected
    columns[b"c"] = encode_state(CitizenState("c", 5.0, 5.0, None, T0))
    assert columns.row_of(b"c") == 1 and columns.state(1).citizen_id == "c"


def test_selections_by_bounds_holders_and_partitions() -> None:
    columns = CitizenColumns(partitions=4)
    rng = np.random.default_rng(5)
    lats, lons = rng.uniform(-60, 60, 2000), rng.uniform(-180, 180, 2000)
    for i, (lat, lon) in enumerate(zip(lats, lons, strict=True)):
        presence = {"far": Presence("in", 1, 1, True)} if i % 100 == 0 else {}
        columns[f"c{i}".encode()] = encode_state(CitizenState(f"c{i}", float(lat), float(lon), None, T0, presence))
    parts = np.array([partition_of(f"c{i}".encode(), 4) for i in range(2000)])
    box = (-10.0, 10.0, -50.0, 50.0)
    inside = (lats >= -10) & (lats <= 10) & (lons >= -50) & (lons <= 50)
    assert columns.within(box, None).tolist() == np.flatnonzero(inside).tolist()
    mine = {1, 3}
    expected = (inside | (np.arange(2000) % 100 == 0)) & np.isin(parts, list(mine))
    assert columns.within(box, mine, holding="far").tolist() == np.flatnonzero(expected).tolist()
    assert columns.holders("far", mine).tolist() == [i for i in range(0, 2000, 100) if parts[i] in mine]
    assert columns.keep_partitions(mine) == int((~np.isin(parts, list(mine))).sum())
    assert set(columns) == {f"c{i}".encode() for i in range(2000) if parts[i] in mine}


def test_an_unreadable_value_is_kept_never_swept_and_raises_when_read() -> None:
    columns = CitizenColumns(partitions=4)
    columns[b"bad"] = b"\x01\x00"
    columns[b"worse"] = b'{"lat": "north"}'
    assert len(columns) == 2 and columns[b"bad"] == b"\x01\x00"
    assert columns.within((-90, 90, -180, 180), None).tolist() == []
    with pytest.raises(Exception):  # noqa: B017 - whatever the value makes the decoder raise
        columns.state(0)


def test_search_bounds_hold_every_candidate_of_the_index() -> None:
    rng = np.random.default_rng(11)
    crises = [make_crisis(f"c{i}", square(float(rng.uniform(-179, 179)), float(rng.uniform(-80, 80)),
                                          float(rng.uniform(0.01, 1.5))), buffer_km=float(rng.choice([0, 1, 25, 300])))
              for i in range(60)]
    crises.append(make_crisis("dateline", square(179.9, 10.0, 0.2), buffer_km=50.0))
    tracker = Tracker()
    for crisis in crises:
        tracker.accept(crisis)
    index = CrisisIndex(crises)
    for crisis in crises:
        bounds = tracker.search_bounds(crisis.crisis_id)
        assert bounds is not None
        item = index.by_id[crisis.crisis_id]
        minx, miny, maxx, maxy = item.area.bounds
        lats = np.concatenate([rng.uniform(miny - 5, maxy + 5, 4000), np.full(50, maxy + (bounds[1] - maxy) * 0.999)])
        lons = np.concatenate([rng.uniform(minx - 5, maxx + 5, 4000), np.full(50, (minx + maxx) / 2)])
        lats = np.clip(lats, -90, 90)
        lons = (lons + 180) % 360 - 180
        candidate = index.candidate_mask(crisis.crisis_id, lats, lons) | index.inside_mask(crisis.crisis_id, lats, lons)
        within = (lats >= bounds[0]) & (lats <= bounds[1]) & (lons >= bounds[2]) & (lons <= bounds[3])
        assert not (candidate & ~within).any(), crisis.crisis_id


class ColumnStates(ColumnarStates):
    """The worker's table in memory: columns, every write durable at once, owning some partitions."""

    def __init__(self, owned: Collection[int] = (0, 1, 2, 3)) -> None:
        self._columns = CitizenColumns(partitions=4)
        self.owned = owned
        self.writes: list[str] = []

    @property
    def columns(self) -> CitizenColumns:
        return self._columns

    def owned_partitions(self) -> Collection[int]:
        return self.owned

    def __getitem__(self, key: str) -> Any:
        return self._columns[key.encode()]

    def __setitem__(self, key: str, value: Any) -> None:
        self.writes.append(key)
        self._columns[key.encode()] = value

    def __delitem__(self, key: str) -> None:
        del self._columns[key.encode()]

    def __iter__(self) -> Iterator[str]:
        return iter([k.decode() for k in self._columns])

    def __len__(self) -> int:
        return len(self._columns)

    async def persisted(self) -> None:
        return None


def twin_runtimes(owned: Collection[int] = (0, 1, 2, 3)) -> tuple[GeofenceRuntime, GeofenceRuntime]:
    def runtime(states: Any) -> GeofenceRuntime:
        return GeofenceRuntime(GeofenceConfig(dwell_seconds=60.0), states, MemoryEmitter(),
                               WorkerMetrics(CollectorRegistry()), clock=lambda: T0 + timedelta(hours=1),
                               owns=lambda cid: partition_of(cid.encode(), 4) in owned)
    return runtime({}), runtime(ColumnStates(owned))


async def test_a_runtime_over_columns_tells_exactly_what_one_over_a_mapping_tells() -> None:
    rng = np.random.default_rng(8)
    plain, columnar = twin_runtimes(owned=(0, 2, 3))
    areas = [(106.8, -6.2), (2.35, 48.86), (139.7, 35.7)]
    crises = [make_crisis(f"k{i}", square(lon, lat, 0.1), buffer_km=5.0, effective=T0) for i, (lon, lat) in enumerate(areas)]
    for step in range(4):
        checkins = []
        for n in range(300):
            lon, lat = areas[int(rng.integers(0, 3))]
            checkins.append(make_checkin(f"z{n}", float(lat + rng.normal(0, 0.12)), float(lon + rng.normal(0, 0.12)),
                                         observed_at=T0 + timedelta(minutes=step)))
        messages = [RawMessage(encode(c), c.citizen_id.encode()) for c in checkins]
        for runtime in (plain, columnar):
            await runtime.process_checkins(messages)
            if step < 3:
                await runtime.apply_crisis(crises[step])
            else:
                await runtime.apply_crisis(make_crisis("k1", square(2.35, 48.9, 0.05), version=2, buffer_km=1.0,
                                                       effective=T0))
                await runtime.apply_crisis(make_crisis("k0", None, op="cancel", version=2, effective=T0))
                await runtime.reconcile()
    told = [[(w.warning_id, encode(w)) for w in r.emitter.sent] for r in (plain, columnar)]  # type: ignore[attr-defined]
    assert len(told[0]) > 300
    assert sorted(told[0]) == sorted(told[1])
    assert {"inside", "entered", "near", "exited", "all_clear"} <= {w.kind for w in plain.emitter.sent}  # type: ignore[attr-defined]
    assert {cid: decode_state(cid, raw) for cid, raw in plain.states.items()} == \
        {cid: decode_state(cid, columnar.states[cid]) for cid in columnar.states}


async def test_a_sweep_writes_only_the_citizens_whose_state_changed() -> None:
    _, runtime = twin_runtimes()
    states = runtime.states
    assert isinstance(states, ColumnStates)
    # one citizen inside, one in the band, one in a corner of the search area but beyond the band, one far away
    where = {"in": (-6.2, 106.8), "near": (-6.2, 106.93), "beyond": (-6.02, 106.98), "far": (10.0, 10.0)}
    await runtime.process_checkins([RawMessage(encode(make_checkin(c, *p)), c.encode()) for c, p in where.items()])
    states.writes.clear()
    await runtime.apply_crisis(make_crisis("flood", AREA_10KM, buffer_km=10.0, effective=T0))
    assert sorted((w.citizen_id, w.kind) for w in runtime.emitter.sent) == [("in", "inside"), ("near", "near")]  # type: ignore[attr-defined]
    assert sorted(states.writes) == ["in", "near"]


AREA_10KM = square(106.8, -6.2, 0.1)


def test_ids_are_found_across_merges_removals_and_odd_lengths() -> None:
    columns = CitizenColumns(partitions=8)
    ids = [f"c{i}".encode() for i in range(60_000)] + [b"x" * 128, b"ends-in-nul\x00", b"", "ü-€".encode()]
    state = encode_state(CitizenState("any", 1.0, 2.0, None, T0))
    for key in ids:
        columns[key] = state
    assert len(columns) == len(ids) and all(columns.row_of(k) is not None for k in ids)
    for key in ids[::3]:
        del columns[key]
    assert b"c0" not in columns and b"c1" in columns and len(columns) == len(ids) - len(ids[::3])
    for key in ids[::6]:  # back again: reused rows
        columns[key] = state
    expected = set(ids) - set(ids[::3]) | set(ids[::6])
    assert set(columns) == expected and len(columns) == len(expected)
    assert {columns.key(columns.row_of(k) or 0) for k in expected} == expected
    assert columns.row_of(b"never") is None and b"never" not in columns


class _Message:
    def __init__(self, key: bytes, value: bytes | None, partition: int) -> None:
        self.key, self.value, self.partition = key, value, partition


class _Event:
    def __init__(self, key: bytes, value: bytes | None, partition: int) -> None:
        self.message = _Message(key, value, partition)


async def test_the_table_store_recovers_a_changelog_written_by_the_previous_version() -> None:
    """A worker upgraded on a changelog of JSON states, later records binary, tombstones, and the
    partitions it was not given forgotten, as Faust's memory store does."""
    import faust
    from faust.types import TP

    from pipeline.citizens import CitizenStore

    app = faust.App("citizens-store-test", broker="kafka://127.0.0.1:1", store="memory://")
    table = app.Table("citizen-state", partitions=4, key_type=bytes, value_type=bytes, store="citizens://memory")
    store = table.data
    assert isinstance(store, CitizenStore)
    old = {s.citizen_id: json.dumps(s.to_dict(), separators=(",", ":")).encode() for s in STATES}
    newer = CitizenState("a", -6.3, 106.9, 5.0, T0 + timedelta(minutes=1), {"flood": Presence("near", 2, 1, True)})
    batch = [_Event(cid.encode(), value, partition_of(cid.encode(), 4)) for cid, value in old.items()]
    batch += [_Event(b"a", encode_state(newer), partition_of(b"a", 4)), _Event(b"b", None, partition_of(b"b", 4))]
    store.apply_changelog_batch(batch, to_key=lambda k: k, to_value=lambda v: v)
    assert {k.decode(): decode_state(k.decode(), store[k]) for k in store} == {"a": newer, "ü-ß": STATES[2]}
    assert store.data.held() == {"flood", "fire", "quake-é"}
    keep = partition_of("ü-ß".encode(), 4)
    await store.on_recovery_completed({TP("crisiswatch-citizen-state-changelog", keep)}, set())
    assert set(store) == {k for k in (b"a", "ü-ß".encode()) if partition_of(k, 4) == keep}
