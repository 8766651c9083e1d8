"""The worker's shortcuts for a check-in that changes nothing: states read in one gather, presences
written back without encoding them again, an unchanged presence segment not re-indexed. Each must
give exactly what the long way gives."""

from __future__ import annotations

import struct
from datetime import timedelta

import pytest

from pipeline.citizens import _COUNT, _HEAD, FORMAT, CitizenColumns, decode_state, encode_state
from pipeline.domain.tracking import CitizenState, Presence
from pipeline.testing import T0
from tests.unit.test_citizens import JAKARTA, STATES  # the same awkward states as the layout's own tests


@pytest.mark.parametrize("state", STATES, ids=lambda s: s.citizen_id)
def test_a_state_read_and_written_back_is_the_same_bytes(state: CitizenState) -> None:
    raw = encode_state(state)
    back = decode_state(state.citizen_id, raw)
    assert encode_state(back) == raw
    moved = CitizenState(back.citizen_id, 1.5, 2.5, 7.0, T0 + timedelta(minutes=1), back.presence)
    assert encode_state(moved) == encode_state(CitizenState(moved.citizen_id, 1.5, 2.5, 7.0, moved.observed_at,
                                                            dict(state.presence)))


def test_states_of_reads_what_state_reads_row_by_row() -> None:
    columns = CitizenColumns(partitions=4)
    for state in STATES:
        columns[state.citizen_id.encode()] = encode_state(state)
    ids = [s.citizen_id for s in STATES] + ["nobody", STATES[0].citizen_id]
    read = columns.states_of(ids)
    assert read == {s.citizen_id: s for s in STATES}
    for state in STATES:
        row = columns.row_of(state.citizen_id.encode())
        assert row is not None and read[state.citizen_id] == columns.state(row)
        assert read[state.citizen_id].observed_at.utcoffset() == state.observed_at.utcoffset()
    columns[b"bad"] = b"\x01\x00"
    with pytest.raises(Exception):  # noqa: B017 - an unreadable state raises, as state() does
        columns.states_of(["bad"])


def test_a_new_location_with_the_same_presences_keeps_the_holders() -> None:
    columns = CitizenColumns(partitions=2)
    told = CitizenState("a", 0.0, 0.0, None, T0, {"flood": Presence("in", 1, 1, True)})
    columns[b"a"] = encode_state(told)
    moved = CitizenState("a", 3.0, 4.0, 12.0, (T0 + timedelta(seconds=5)).astimezone(JAKARTA), told.presence)
    columns[b"a"] = encode_state(moved)
    assert columns.holders("flood").tolist() == [0]
    assert columns.states_of(["a"])["a"] == moved and columns[b"a"] == encode_state(moved)
    columns[b"a"] = encode_state(CitizenState("a", 3.0, 4.0, None, T0, {}))
    assert columns.held() == set()


def test_a_segment_not_written_as_this_build_writes_it_is_encoded_anew() -> None:
    entry = struct.Struct("<BqqBqh")
    name = b"flood"
    segment = _COUNT.pack(1) + struct.pack("<H", len(name)) + name + entry.pack(0, 1, 1, 1 | 4, 99, 0)  # unknown flag
    raw = _HEAD.pack(FORMAT, 1.0, 2.0, 0, float("nan"), 0) + segment
    state = decode_state("a", raw)
    assert state.presence == {"flood": Presence("in", 1, 1, True)}
    again = encode_state(state)
    assert again != raw and decode_state("a", again) == state
