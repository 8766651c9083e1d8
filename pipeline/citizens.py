"""A worker's citizens in columns: one vectorised query per sweep, under 200 bytes each.

A new crisis must reach everyone already inside it at once, and a worker tracks up to a million
citizens. Held as a dict of JSON-shaped dicts (what Faust's memory store kept) that cost 500 to
1,100 bytes per citizen, and every sweep rebuilt a Python object per citizen before it could ask
a single question. Here each citizen is a row: last location, time and accuracy in numpy columns,
the partition of their key, and, only for the few who hold any, their presences (what they were
told about which crisis) as a compact binary segment. A sweep asks the columns which rows can be
concerned (inside the crisis's search bounds, or holding a presence for it) and builds state
objects for those rows only.

The value of a citizen in the table and in its changelog (see :func:`encode_state`) is a fixed
binary layout, a format byte first. The worker still reads the JSON of the previous versions
(``{"lat": ..., "p": {...}}``, which ``crisiswatch restore`` writes too), so a worker upgraded on a
changelog written by the previous version recovers every citizen; a state the binary layout cannot
hold exactly (a UTC offset that is not whole minutes) is written as that JSON.

:class:`CitizenStore` is the Faust table store (``citizens://memory``) that keeps a table's values in a
:class:`CitizenColumns`; :class:`CitizenColumns` alone is the same store for a runtime without Faust.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, MutableMapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Final

import numpy as np
from faust.stores import STORES
from faust.stores.memory import Store as MemoryStore
from faust.types import TP, EventT
from kafka.partitioner.default import murmur2

from pipeline.domain.tracking import CitizenState, Presence

log = logging.getLogger(__name__)

FORMAT: Final = 1  # first byte of a binary state; JSON states start with "{"
# format, lat, lon, observed_at (µs since the epoch), accuracy (NaN: none), UTC offset of observed_at (minutes)
_HEAD = struct.Struct("<Bddqdh")
_COUNT = struct.Struct("<H")  # presences that follow
_ID = struct.Struct("<H")  # length of a crisis id (UTF-8), the id follows
# status, crisis version, seq, flags (1: warned, 2: leaving), leaving_since (µs), its UTC offset (minutes)
_ENTRY = struct.Struct("<BqqBqh")
_NO_PRESENCE: Final = _COUNT.pack(0)
_FORMAT_BYTE: Final = bytes([FORMAT])
_STATUSES: Final = ("in", "near", "out")
_STATUS_CODE: Final = {status: code for code, status in enumerate(_STATUSES)}
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ZONES: dict[int, timezone] = {0: UTC}


class Unrepresentable(ValueError):
    """A state the binary layout cannot hold exactly (it is stored as JSON)."""


def _micros(at: datetime) -> tuple[int, int]:
    """An aware datetime as (µs since the epoch, UTC offset in minutes), exactly."""
    offset = at.utcoffset()
    if offset is None:
        raise Unrepresentable("naive datetime")
    seconds = offset.days * 86_400 + offset.seconds
    if offset.microseconds or seconds % 60 or not -32_768 < seconds // 60 < 32_768:
        raise Unrepresentable(f"UTC offset {offset}")
    delta = at - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds, seconds // 60


def _time(micros: int, minutes: int) -> datetime:
    if not minutes:
        return _EPOCH + timedelta(0, 0, micros)
    zone = _ZONES.get(minutes)
    if zone is None:
        zone = _ZONES.setdefault(minutes, timezone(timedelta(minutes=minutes)))
    return (_EPOCH + timedelta(microseconds=micros)).astimezone(zone)


class _StoredPresence(dict[str, Presence]):
    """Presences read from a segment, with that segment: a state written back with the same presences
    (most check-ins) is not encoded again. Presences are never changed in place (the tracker builds a
    new mapping for a change), so the segment stays theirs."""

    __slots__ = ("segment",)

    def __init__(self, segment: bytes) -> None:
        super().__init__()
        self.segment = segment


def _presence_segment(presence: Mapping[str, Presence]) -> bytes:
    if not presence:
        return _NO_PRESENCE
    if type(presence) is _StoredPresence:
        return presence.segment
    parts = [_COUNT.pack(len(presence))]
    for crisis_id, p in presence.items():
        name = crisis_id.encode("utf-8")
        leaving, zone = _micros(p.leaving_since) if p.leaving_since is not None else (0, 0)
        flags = (1 if p.warned else 0) | (2 if p.leaving_since is not None else 0)
        parts += [_ID.pack(len(name)), name, _ENTRY.pack(_STATUS_CODE[p.status], p.version, p.seq, flags, leaving, zone)]
    return b"".join(parts)


def _read_presence(segment: bytes | memoryview, at: int = 0) -> dict[str, Presence]:
    start = at
    (count,) = _COUNT.unpack_from(segment, at)
    at += _COUNT.size
    out: dict[str, Presence] = {}
    canonical = True  # as _presence_segment writes these presences, byte for byte
    for _ in range(count):
        (size,) = _ID.unpack_from(segment, at)
        at += _ID.size
        crisis_id = bytes(segment[at:at + size]).decode("utf-8")
        at += size
        status, version, seq, flags, leaving, zone = _ENTRY.unpack_from(segment, at)
        at += _ENTRY.size
        out[crisis_id] = Presence(_STATUSES[status], version, seq, bool(flags & 1),
                                  _time(leaving, zone) if flags & 2 else None)
        if flags > 3 or (not flags & 2 and (leaving or zone)):
            canonical = False
    if at != len(segment):
        raise ValueError(f"a citizen state has {len(segment) - at} bytes too many")
    if not canonical or len(out) != count or not out:
        return out
    stored = _StoredPresence(bytes(segment[start:at]))
    stored.update(out)
    return stored


def _crisis_ids(segment: bytes) -> list[str]:
    (count,) = _COUNT.unpack_from(segment, 0)
    at, ids = _COUNT.size, []
    for _ in range(count):
        (size,) = _ID.unpack_from(segment, at)
        ids.append(segment[at + _ID.size:at + _ID.size + size].decode("utf-8"))
        at += _ID.size + size + _ENTRY.size
    return ids


def encode_state(state: CitizenState) -> bytes:
    """A citizen's state as stored in the table and its changelog: binary, or JSON if it must be."""
    try:
        return _encode_binary(state)
    except (Unrepresentable, struct.error):
        return json.dumps(state.to_dict(), separators=(",", ":")).encode("utf-8")


def _encode_binary(state: CitizenState) -> bytes:
    observed, zone = _micros(state.observed_at)
    accuracy = math.nan if state.accuracy_m is None else state.accuracy_m
    if state.accuracy_m is not None and math.isnan(state.accuracy_m):
        raise Unrepresentable("accuracy NaN")
    return _HEAD.pack(FORMAT, state.lat, state.lon, observed, accuracy, zone) + _presence_segment(state.presence)


def decode_state(citizen_id: str, raw: bytes | Mapping[str, Any]) -> CitizenState:
    """A stored state: the binary layout, or the JSON (bytes, or already decoded) of earlier versions."""
    if isinstance(raw, Mapping):
        return CitizenState.from_dict(citizen_id, raw)
    if raw[:1] == b"{":
        return CitizenState.from_dict(citizen_id, json.loads(raw))
    if raw[:1] != bytes([FORMAT]):
        raise ValueError(f"unknown citizen state format {raw[:1]!r}")
    _, lat, lon, observed, accuracy, zone = _HEAD.unpack_from(raw, 0)
    return CitizenState(citizen_id, lat, lon, None if math.isnan(accuracy) else accuracy, _time(observed, zone),
                        _read_presence(memoryview(raw), _HEAD.size))


def partition_of(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2) gives a key."""
    return int(murmur2(key) & 0x7FFFFFFF) % partitions


class KeyIndex:
    """Citizen ids and their rows with no Python object per citizen (a dict of a million ids costs
    about 130 bytes each: its slot, the bytes object, the row's int).

    The ids are a fixed-width byte column (widened as longer ids come, up to :attr:`WIDTH_LIMIT`;
    longer ids, and ids ending in a NUL byte, which the column would lose, are kept aside). To find
    a row: the ids added lately are in a small dict; the others in a sorted column of their hashes,
    searched by bisection and confirmed against the id column. The dict is merged into the sorted
    column once it holds an eighth of the ids, so the merges cost O(log n) sorts while the index grows.
    A bisection costs microseconds, so the rows of ids just read are remembered for a while
    (:meth:`remember`): a sweep reads its citizens by row and writes their new states by id."""

    WIDTH_LIMIT: Final = 64
    MERGE_AT: Final = 16_384
    HINTS: Final = 16_384  # rows of ids lately read, remembered

    def __init__(self, capacity: int) -> None:
        self.ids = np.zeros(capacity, dtype="S16")
        self._aside: dict[int, bytes] = {}
        self._hashes = np.empty(0, dtype=np.int64)
        self._hash_rows = np.empty(0, dtype=np.int32)  # -1: removed
        self._recent: dict[bytes, int] = {}
        self._hints: dict[bytes, int] = {}
        self.count = 0

    def grow(self, capacity: int) -> None:
        ids = np.zeros(capacity, dtype=self.ids.dtype)
        ids[:len(self.ids)] = self.ids
        self.ids = ids

    def key(self, row: int) -> bytes:
        aside = self._aside.get(row)
        return aside if aside is not None else bytes(self.ids[row])

    def _position(self, key: bytes) -> int | None:
        hashes = self._hashes
        if not len(hashes):
            return None
        h = hash(key)
        at = int(hashes.searchsorted(h))  # the method: np.searchsorted's dispatch costs more than the search
        while at < len(hashes) and hashes[at] == h:
            row = int(self._hash_rows[at])
            if row >= 0 and self.key(row) == key:
                return at
            at += 1
        return None

    def remember(self, key: bytes, row: int) -> None:
        """A row just read by its index: its id will likely be written soon."""
        if len(self._hints) >= self.HINTS:
            self._hints.clear()
        self._hints[key] = row

    def row(self, key: bytes) -> int | None:
        row = self._recent.get(key)
        if row is not None:
            return row
        row = self._hints.get(key)
        if row is not None:
            return row
        at = self._position(key)
        return None if at is None else int(self._hash_rows[at])

    def add(self, key: bytes, row: int) -> None:
        """Index a new id at a row."""
        if len(key) > self.WIDTH_LIMIT or key.endswith(b"\0"):
            self._aside[row] = key
        else:
            if len(key) > self.ids.dtype.itemsize:
                self.ids = self.ids.astype(f"S{min(self.WIDTH_LIMIT, max(len(key), 2 * self.ids.dtype.itemsize))}")
            self.ids[row] = key
        self._recent[key] = row
        self.count += 1
        if len(self._recent) > max(self.MERGE_AT, self.count // 8):
            self._merge()

    def remove(self, key: bytes) -> int | None:
        """Forget an id; returns its row (None if unknown)."""
        self._hints.pop(key, None)
        row = self._recent.pop(key, None)
        if row is None:
            at = self._position(key)
            if at is None:
                return None
            row = int(self._hash_rows[at])
            self._hash_rows[at] = -1
        self._aside.pop(row, None)
        self.ids[row] = b""
        self.count -= 1
        return row

    def _merge(self) -> None:
        keep = self._hash_rows >= 0
        hashes = np.concatenate([self._hashes[keep], np.fromiter((hash(k) for k in self._recent), dtype=np.int64,
                                                                 count=len(self._recent))])
        rows = np.concatenate([self._hash_rows[keep], np.fromiter(self._recent.values(), dtype=np.int32,
                                                                  count=len(self._recent))])
        order = np.argsort(hashes, kind="stable")
        self._hashes, self._hash_rows = hashes[order], rows[order]
        self._recent = {}


class CitizenColumns(MutableMapping[bytes, bytes]):
    """Citizen states by raw citizen id, kept in columns; the mapping's values are :func:`encode_state`'s.

    A value that cannot be read is kept as it is (its row's location is NaN: no sweep selects it;
    reading it raises, so the check-in that needs it is dead-lettered like before). Rows of deleted
    citizens are reused."""

    GROWTH: Final = 1.25  # the columns' spare capacity stays under a quarter

    def __init__(self, partitions: int | None = None, capacity: int = 1024) -> None:
        self.partitions = partitions  # to place a key written live; None: unknown (-1)
        self._reset(capacity)

    def _reset(self, capacity: int) -> None:
        self._index = KeyIndex(capacity)
        self._n = 0  # rows ever used
        self._free: list[int] = []
        self._live = np.zeros(capacity, dtype=bool)
        self.lat = np.empty(capacity)
        self.lon = np.empty(capacity)
        self._t = np.empty(capacity, dtype=np.int64)
        self._acc = np.empty(capacity)
        self._zone = np.empty(capacity, dtype=np.int16)
        self.part = np.empty(capacity, dtype=np.int16)
        self._presence: dict[int, bytes] = {}  # the presence segment of each row that holds one
        self._whole: dict[int, bytes] = {}  # values kept as they are (JSON or unreadable)
        self._holders: dict[str, set[int]] = {}  # crisis id -> rows holding a presence for it

    # -- the mapping -----------------------------------------------------------------------------
    def row_of(self, key: bytes) -> int | None:
        """The row of a citizen, None if unknown."""
        return self._index.row(key)

    def __getitem__(self, key: bytes) -> bytes:
        row = self._index.row(key)
        if row is None:
            raise KeyError(key)
        self._index.remember(key, row)
        whole = self._whole.get(row)
        if whole is not None:
            return whole
        head = _HEAD.pack(FORMAT, self.lat[row], self.lon[row], int(self._t[row]), self._acc[row], int(self._zone[row]))
        return head + self._presence.get(row, _NO_PRESENCE)

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self.put(key, value)

    def __delitem__(self, key: bytes) -> None:
        row = self._index.row(key)
        if row is None:
            raise KeyError(key)
        self._hold(row, ())
        self._index.remove(key)
        self._presence.pop(row, None)
        self._whole.pop(row, None)
        self._live[row] = False
        self.lat[row] = self.lon[row] = math.nan
        self._free.append(row)

    def __iter__(self) -> Iterator[bytes]:
        return iter([self._index.key(row) for row in np.flatnonzero(self._live[:self._n]).tolist()])

    def __len__(self) -> int:
        return self._index.count

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes) and self._index.row(key) is not None

    def clear(self) -> None:
        self._reset(1024)

    # -- writing ---------------------------------------------------------------------------------
    def put(self, key: bytes, value: bytes | Mapping[str, Any], partition: int | None = None) -> int:
        """Store a citizen's state (any format :func:`decode_state` reads); ``partition``: the
        changelog partition it was read from (else computed from the key when first seen). Returns its row."""
        row = self._index.row(key)
        if row is None:
            row = self._new_row(key, partition)
        elif partition is not None:
            self.part[row] = partition
        if type(value) is bytes and value[:1] == _FORMAT_BYTE and row not in self._whole \
                and value[_HEAD.size:] == self._presence.get(row, _NO_PRESENCE):
            # The common write: a new location, the same presences (a check-in that changed nothing
            # else). The segment was read when it was stored, so the holders index stands as it is.
            _, self.lat[row], self.lon[row], self._t[row], self._acc[row], self._zone[row] = _HEAD.unpack_from(value, 0)
            return row
        if not isinstance(value, Mapping) and value[:1] == bytes([FORMAT]):
            try:
                head = _HEAD.unpack_from(value, 0)
                segment = value[_HEAD.size:]
                ids = _crisis_ids(segment)
            except (struct.error, UnicodeDecodeError) as exc:
                self._keep_whole(row, key, value, exc)
                return row
            _, self.lat[row], self.lon[row], self._t[row], self._acc[row], self._zone[row] = head
            self._set_presence(row, segment, ids)
            return row
        try:
            state = decode_state(key.decode("utf-8"), value)
            binary = _encode_binary(state)
        except (Unrepresentable, struct.error) as exc:  # readable, but the columns cannot hold it exactly
            self._keep_whole(row, key, value, exc, readable=True)
            return row
        except Exception as exc:  # a stored value no sweep can use; reading it raises again
            self._keep_whole(row, key, value, exc)
            return row
        return self.put(key, binary, partition)

    def _new_row(self, key: bytes, partition: int | None) -> int:
        if self._free:
            row = self._free.pop()
        else:
            row = self._n
            if row == len(self.lat):
                self._grow(max(1024, int(row * self.GROWTH)))
            self._n += 1
        self._index.add(key, row)
        self._live[row] = True
        if partition is None:
            partition = -1 if self.partitions is None else partition_of(key, self.partitions)
        self.part[row] = partition
        return row

    def _grow(self, capacity: int) -> None:
        self._index.grow(capacity)
        for name in ("lat", "lon", "_t", "_acc", "_zone", "part", "_live"):
            old = getattr(self, name)
            new = np.zeros(capacity, dtype=old.dtype)
            new[:len(old)] = old
            setattr(self, name, new)

    def _keep_whole(self, row: int, key: bytes, value: Any, exc: Exception, readable: bool = False) -> None:
        raw = value if isinstance(value, bytes) else json.dumps(value, separators=(",", ":")).encode("utf-8")
        state = decode_state(key.decode("utf-8"), raw) if readable else None
        self._hold(row, () if state is None else state.presence)
        self._presence.pop(row, None)
        self._whole[row] = raw
        self.lat[row] = math.nan if state is None else state.lat
        self.lon[row] = math.nan if state is None else state.lon
        if not readable:
            log.error("the stored state of citizen %r cannot be read: %s", key, exc)

    def _set_presence(self, row: int, segment: bytes, ids: Iterable[str]) -> None:
        self._hold(row, ids)
        self._whole.pop(row, None)
        if segment == _NO_PRESENCE:
            self._presence.pop(row, None)
        else:
            self._presence[row] = segment

    def _held_by(self, row: int) -> Iterable[str]:
        segment = self._presence.get(row)
        if segment is not None:
            return _crisis_ids(segment)
        whole = self._whole.get(row)
        if whole is not None:
            try:
                return list(decode_state("", whole).presence)
            except Exception:  # an unreadable value holds nothing
                return ()
        return ()

    def _hold(self, row: int, ids: Iterable[str]) -> None:
        """Update the holders index for a row about to hold ``ids`` (call before replacing its value)."""
        new = set(ids)
        for crisis_id in self._held_by(row):
            if crisis_id not in new:
                rows = self._holders.get(crisis_id)
                if rows is not None:
                    rows.discard(row)
                    if not rows:
                        del self._holders[crisis_id]
        for crisis_id in new:
            self._holders.setdefault(crisis_id, set()).add(row)

    def keep_partitions(self, partitions: Collection[int]) -> int:
        """Forget the citizens of every other partition (after a rebalance); returns how many."""
        n = self._n
        gone = np.flatnonzero(self._live[:n] & ~np.isin(self.part[:n], np.fromiter(partitions, dtype=np.int16)))
        for row in gone.tolist():
            del self[self._index.key(row)]
        return len(gone)

    # -- reading ---------------------------------------------------------------------------------
    def within(self, bounds: tuple[float, float, float, float] | None, partitions: Collection[int] | None,
               holding: str | None = None) -> np.ndarray:
        """Rows (ascending) whose location lies within ``bounds`` (min lat, max lat, min lon, max lon;
        None: none) or that hold a presence for ``holding``, of these partitions (all if None)."""
        n = self._n
        mask = np.zeros(n, dtype=bool)
        if bounds is not None:
            lat, lon = self.lat[:n], self.lon[:n]
            mask = (lat >= bounds[0]) & (lat <= bounds[1]) & (lon >= bounds[2]) & (lon <= bounds[3])
        if holding is not None and holding in self._holders:
            mask[np.fromiter(self._holders[holding], dtype=np.int64)] = True
        if partitions is not None:
            mask &= np.isin(self.part[:n], np.fromiter(partitions, dtype=np.int16))
        return np.flatnonzero(mask & self._live[:n])

    def holders(self, crisis_id: str, partitions: Collection[int] | None = None) -> np.ndarray:
        """Rows (ascending) holding a presence for a crisis, of these partitions (all if None)."""
        rows = np.fromiter(sorted(self._holders.get(crisis_id, ())), dtype=np.int64)
        if partitions is not None and len(rows):
            rows = rows[np.isin(self.part[rows], np.fromiter(partitions, dtype=np.int16))]
        return rows

    def held(self, partitions: Collection[int] | None = None) -> set[str]:
        """The crises some citizen (of these partitions) holds a presence for."""
        if partitions is None:
            return set(self._holders)
        return {crisis_id for crisis_id in self._holders if len(self.holders(crisis_id, partitions))}

    def key(self, row: int) -> bytes:
        if not self._live[row]:
            raise KeyError(row)
        return self._index.key(row)

    def states_of(self, citizen_ids: Iterable[str]) -> dict[str, CitizenState]:
        """The states of the known ones of these citizens (what :meth:`state` reads, row by row), their
        locations gathered from the columns in one vectorised read. Their rows are remembered, as
        their new states will likely be written next. Raises if one cannot be read."""
        index = self._index
        found: list[tuple[str, int]] = []
        for citizen_id in citizen_ids:
            key = citizen_id.encode("utf-8")
            row = index.row(key)
            if row is not None:
                index.remember(key, row)
                found.append((citizen_id, row))
        if not found:
            return {}
        rows = np.fromiter((row for _, row in found), dtype=np.intp, count=len(found))
        whole, presence = self._whole, self._presence
        out: dict[str, CitizenState] = {}
        for (citizen_id, row), lat, lon, t, accuracy, zone in zip(
                found, self.lat[rows].tolist(), self.lon[rows].tolist(), self._t[rows].tolist(),
                self._acc[rows].tolist(), self._zone[rows].tolist(), strict=True):
            raw = whole.get(row)
            if raw is not None:
                out[citizen_id] = decode_state(citizen_id, raw)
                continue
            segment = presence.get(row)
            out[citizen_id] = CitizenState(citizen_id, lat, lon, None if math.isnan(accuracy) else accuracy,
                                           _time(t, zone), {} if segment is None else _read_presence(segment))
        return out

    def state(self, row: int) -> CitizenState:
        """The state of the citizen in a row."""
        key = self.key(row)
        self._index.remember(key, row)
        citizen_id = key.decode("utf-8")
        whole = self._whole.get(row)
        if whole is not None:
            return decode_state(citizen_id, whole)
        segment = self._presence.get(row)
        accuracy = float(self._acc[row])
        return CitizenState(citizen_id, float(self.lat[row]), float(self.lon[row]),
                            None if math.isnan(accuracy) else accuracy, _time(int(self._t[row]), int(self._zone[row])),
                            {} if segment is None else _read_presence(segment))

    @classmethod
    def of(cls, states: Iterable[tuple[str, bytes | Mapping[str, Any]]], on_error: Callable[[str, Exception], None]
           ) -> CitizenColumns:
        """Columns of states held elsewhere (a runtime over a plain mapping); a value that cannot be
        read is left out and reported."""
        columns = cls()
        for citizen_id, raw in states:
            try:
                columns.put(citizen_id.encode("utf-8"), encode_state(decode_state(citizen_id, raw)))
            except Exception as exc:  # reported; the others are used
                on_error(citizen_id, exc)
        return columns


class CitizenStore(MemoryStore[bytes, bytes]):
    """The Faust table store (``citizens://memory``) that keeps the citizen-state table in columns.

    Like Faust's memory store, it holds what it read from the changelog at recovery and forgets the
    partitions this worker was not given; the changelog record's partition is the row's partition."""

    def __init__(self, url: Any, app: Any, table: Any, **kwargs: Any) -> None:
        super().__init__(url, app, table, **kwargs)
        self.data.partitions = table.partitions or app.conf.topic_partitions  # to place keys written live

    def __post_init__(self) -> None:  # runs inside Store.__init__, before the table is known
        self.data: CitizenColumns = CitizenColumns()
        self._key_partition = {}

    def apply_changelog_batch(self, batch: Iterable[EventT[Any]], to_key: Callable[[Any], Any],
                              to_value: Callable[[Any], Any]) -> None:
        for event in batch:
            message = event.message
            if message.key is None:
                continue
            if message.value is None:
                self.data.pop(message.key, None)
            else:
                self.data.put(message.key, message.value, message.partition)

    async def on_recovery_completed(self, active_tps: set[TP], standby_tps: set[TP]) -> None:
        self.data.keep_partitions({partition for _, partition in active_tps})


STORES.aliases.setdefault("citizens", f"{__name__}:CitizenStore")
