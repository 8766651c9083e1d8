"""Accepted by the decoder ⇒ stored by PostgreSQL. Events with extreme but valid values (versions up to
2^63-1, the longest titles, emoji and every other plane of Unicode, latitudes ±90 and longitudes ±180,
times from 0001-01-02 to 9999-12-30 at any offset) go through the sink's own decoding and writing into the
real PostgreSQL: none of them is refused there, and what is read back is what was sent."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumers.kafka_io import Message
from consumers.sink import PostgresStore, SinkTopics, prepare
from pipeline.domain.validation import decode_event
from pipeline.testing import square
from schemas import Ack, Channel, Checkin, Citizen, Crisis, InvalidEvent, Warning, decode, encode
from schemas.codec import MAX_INTEGER
from schemas.models import EARLIEST_TIME, LATEST_TIME, Event
from tests.stack_helpers import new_database

pytestmark = pytest.mark.integration

TOPICS = SinkTopics()
TOPIC_OF = {model: topic for topic, model in TOPICS.models().items()}
NOW = LATEST_TIME  # no time counts as "ahead": the rule about the clock is not what this test is about

# Text as people and feeds write it: any plane of Unicode, emoji, combining marks, right-to-left scripts,
# control characters other than NUL. Surrogates are not characters; the decoder's tests cover them.
any_text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"))
extreme_text = st.one_of(any_text, st.sampled_from(["", "\U0001f30a\u200d\U0001f3e0", "بانجير", "e\u0301", "\t\n\r\x7f",
                                                    "\U0010fffd", "'; DROP TABLE crises; --", "\\", '"', "{}", "\u2028"]))
ids = st.one_of(st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}\Z"),
                st.just("Z" * 128), st.just("a/b@c:d.e-f_g"))
countries = st.from_regex(r"\A[A-Z]{2}\Z")
offsets = st.integers(-(24 * 60 - 1), 24 * 60 - 1).map(lambda m: timezone(timedelta(minutes=m)))
instants = st.one_of(st.datetimes(min_value=EARLIEST_TIME.replace(tzinfo=None), max_value=LATEST_TIME.replace(tzinfo=None),
                                  timezones=st.just(UTC)),
                     st.sampled_from([EARLIEST_TIME, LATEST_TIME, datetime(1970, 1, 1, tzinfo=UTC)]))
times = st.builds(lambda instant, offset: instant.astimezone(offset), instants, offsets)
lats = st.one_of(st.floats(-90, 90), st.sampled_from([-90.0, 90.0, -0.0, 5e-324]))
lons = st.one_of(st.floats(-180, 180), st.sampled_from([-180.0, 180.0, -0.0]))
versions = st.one_of(st.integers(1, MAX_INTEGER), st.sampled_from([1, MAX_INTEGER, 2**53 + 1, 2**31]))


def lengths(max_size: int) -> st.SearchStrategy[str]:
    return st.one_of(extreme_text.map(lambda t: t[:max_size]), st.just(("\U0001f30a" * max_size)[:max_size]))


checkins = st.builds(Checkin, ids, lats, lons, times, st.sampled_from(["app", "sms", "manual", "import", "simulator"]),
                     st.one_of(st.none(), st.floats(0, 100_000), st.just(100_000.0)))
channels = st.builds(Channel, st.sampled_from(["webhook", "email", "sms", "push"]), lengths(2048).filter(bool))
contacts = st.fixed_dictionaries({"name": lengths(200)}, optional={"relation": lengths(100), "phone": lengths(40),
                                                                   "email": lengths(320)})
dates = st.dates(min_value=date(1, 1, 1), max_value=date(9999, 12, 31)).map(date.isoformat)
trips = st.one_of(st.none(), st.fixed_dictionaries({"country": countries}, optional={"from": dates,
                                                                                     "until": st.one_of(st.none(), dates)}))
citizens = st.builds(Citizen, ids, lengths(200).filter(bool), countries,
                     st.from_regex(r"\A[a-z]{2,3}(-[A-Za-z0-9]{2,8}){0,2}\Z"),
                     st.lists(channels, max_size=10).map(tuple), st.lists(contacts, max_size=10).map(tuple),
                     st.booleans(), trips)
areas = st.builds(square, st.floats(-179.0, 179.0), st.floats(-89.0, 89.0), st.floats(0.001, 0.9))
crises = st.builds(
    Crisis, ids, st.sampled_from(["upsert", "cancel"]), versions,
    st.sampled_from(["cap", "gdacs", "usgs", "rss", "advisory", "operator"]), lengths(1024), lengths(500),
    st.sampled_from(["geo", "met", "safety", "security", "rescue", "fire", "health", "env", "transport", "infra",
                     "cbrne", "other"]),
    st.sampled_from(["minor", "moderate", "severe", "extreme", "unknown"]),
    st.sampled_from(["immediate", "expected", "future", "past", "unknown"]),
    st.sampled_from(["observed", "likely", "possible", "unlikely", "unknown"]),
    st.one_of(st.none(), areas), st.one_of(st.floats(0, 1000), st.just(1000.0)),
    st.lists(countries, unique=True, max_size=5).map(tuple), times, st.one_of(st.none(), times), lengths(5000),
    lengths(2048), st.lists(lengths(1024), max_size=5).map(tuple), st.one_of(st.none(), lengths(35)),
    st.sampled_from(["actual", "exercise", "test", "draft"]))
warnings = st.builds(
    Warning, st.from_regex(r"\Aw-[0-9a-f]{32}\Z"), ids, ids, versions,
    st.sampled_from(["inside", "entered", "near", "exited", "all_clear"]),
    st.sampled_from(["minor", "moderate", "severe", "extreme", "unknown"]), lengths(500), lengths(5000),
    st.one_of(st.floats(0, 1e308), st.sampled_from([0.0, 1.7976931348623157e308])), lats, lons, times, times,
    st.lists(countries, max_size=5).map(tuple))
acks = st.builds(Ack, ids, ids, st.sampled_from(["safe", "need_help"]), times,
                 st.sampled_from(["app", "sms", "email", "webhook", "push", "operator"]), st.one_of(st.none(), lengths(2000)))
events = st.lists(st.one_of(checkins, citizens, crises, warnings, acks), min_size=1, max_size=8)


@pytest.fixture(scope="module")
def storable_db(database_url: str) -> Iterator[str]:
    yield new_database(database_url, "storable")


def connect(url: str) -> Any:
    conn = psycopg.connect(url)
    conn.execute(b"SET TIME ZONE 'UTC'")  # 9999-12-30 UTC is read back; at +14:00 it would be year 10000
    return conn


def message(event: Event, offset: int) -> Message:
    return Message(TOPIC_OF[type(event)], 0, offset, None, encode(event))


def unique(event: Event) -> Event:
    """The event under a key no other example uses, so that what is read back can only be this event's row."""
    tag = uuid.uuid4().hex[:12]
    if isinstance(event, Warning):
        return replace(event, warning_id=f"w-{uuid.uuid4().hex}")
    field = "crisis_id" if isinstance(event, Crisis) else "citizen_id"
    return replace(event, **{field: f"{tag}-{getattr(event, field)}"[:128]})  # type: ignore[type-var]


def stored(conn: Any, event: Event) -> tuple[Any, ...] | None:
    """What PostgreSQL holds for an event, looked up by its key."""
    if isinstance(event, Checkin):
        query, key = ("SELECT lat, lon, accuracy_m FROM checkins WHERE citizen_id = %s AND observed_at = %s AND source = %s",
                      (event.citizen_id, event.observed_at, event.source))
    elif isinstance(event, Citizen):
        query, key = "SELECT name, channels, emergency_contacts FROM citizens WHERE citizen_id = %s", (event.citizen_id,)
    elif isinstance(event, Crisis):
        query, key = ("SELECT title, instruction, geometry, effective, expires FROM crises WHERE crisis_id = %s AND version = %s",
                      (event.crisis_id, event.version))
    elif isinstance(event, Warning):
        query, key = "SELECT crisis_version, title, distance_km FROM warnings WHERE warning_id = %s", (event.warning_id,)
    else:
        assert isinstance(event, Ack)
        query, key = ("SELECT note FROM acks WHERE citizen_id = %s AND crisis_id = %s AND received_at = %s "
                      "AND status = %s AND channel = %s",
                      (event.citizen_id, event.crisis_id, event.received_at, event.status, event.channel))
    row = conn.execute(query.encode(), key).fetchone()
    return None if row is None else tuple(row)


def expected(event: Event) -> tuple[Any, ...]:
    """What :func:`stored` must find: the event's own values (for a crisis, its area as the stages normalised it)."""
    if isinstance(event, Checkin):
        return (event.lat, event.lon, event.accuracy_m)
    if isinstance(event, Citizen):
        return (event.name, [{"type": c.type, "address": c.address} for c in event.channels],
                [dict(c) for c in event.emergency_contacts])
    if isinstance(event, Crisis):
        return (event.title, event.instruction, event.geometry, event.effective, event.expires)
    if isinstance(event, Warning):
        return (event.crisis_version, event.title, event.distance_km)
    assert isinstance(event, Ack)
    return (event.note,)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                   HealthCheck.function_scoped_fixture])
@given(batch=events)
def test_every_event_the_decoder_accepts_is_stored_by_postgresql(storable_db: str, batch: list[Event]) -> None:
    sent = [unique(event) for event in batch]
    try:  # the sink's own decoding (the stages' rules), which is what a row is built from
        accepted = [decode_event(encode(event), type(event), NOW) for event in sent]
    except InvalidEvent as exc:  # the strategies draw valid events: a refusal would be a finding too
        raise AssertionError(f"a valid event was refused: {exc}") from None
    prepared = prepare([message(e, i) for i, e in enumerate(sent)], TOPICS.models(), NOW)
    assert prepared.rejected == ()

    store = PostgresStore(storable_db)
    try:
        outcome = store.write(prepared.rows)
    finally:
        store.close()
    assert [reason for _, reason in outcome.refused] == []

    with connect(storable_db) as conn:
        for event in accepted:
            assert stored(conn, event) == expected(event)


hostile = st.one_of(
    st.sampled_from(["a\x00b", "\ud800", "\udfff x", "ID\n", "id\n", "c-1\n", 10**30, 2**63, -(2**63), MAX_INTEGER, 1e308, -0.0,
                     "9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00", "2025-01-01T00:00:00Z\n", "2025-02-30",
                     "0000-01-01", [], {}, None, True, "", "Z" * 129]),
    st.text(st.characters(), max_size=5), st.integers(), st.floats(allow_nan=False, allow_infinity=False))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                   HealthCheck.function_scoped_fixture])
@given(event=st.one_of(checkins, citizens, crises, warnings, acks), data=st.data())
def test_whatever_a_writer_puts_in_a_field_is_refused_by_the_decoder_or_stored(storable_db: str, event: Event,
                                                                               data: st.DataObject) -> None:
    """The converse direction, with hostile values written straight to the topic: nothing the decoder lets
    through is refused by PostgreSQL (the issue's NUL, version 10^30, a country code with a newline...)."""
    obj = unique(event).to_dict()
    path = data.draw(st.sampled_from(sorted(_paths(obj))))
    _put(obj, path, data.draw(hostile))
    raw = json.dumps(obj, ensure_ascii=True).encode()
    prepared = prepare([Message(TOPIC_OF[type(event)], 0, 0, None, raw)], TOPICS.models(), NOW)
    store = PostgresStore(storable_db)
    try:
        outcome = store.write(prepared.rows)
    finally:
        store.close()
    assert [reason for _, reason in outcome.refused] == []


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    children = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in children:
        out += _paths(value, (*prefix, key))
    return out


def _put(obj: Any, path: tuple[Any, ...], value: Any) -> None:
    for key in path[:-1]:
        obj = obj[key]
    obj[path[-1]] = value


def test_the_values_of_the_issue_are_stored_at_their_limits(storable_db: str) -> None:
    """The examples a reader looks for, written out: bigint's largest version, a 500-character emoji title."""
    crisis = decode(encode(Crisis("k-limits", "upsert", MAX_INTEGER, "operator", "r", "\U0001f30a" * 500, "met", "extreme",
                                  "immediate", "observed", square(179.5, 89.5, 0.5), 1000.0, ("FJ",), EARLIEST_TIME,
                                  LATEST_TIME, "\u0644" * 5000, "https://example.org", ())), Crisis)
    checkin = Checkin("c-limits", 90.0, -180.0, LATEST_TIME.astimezone(timezone(timedelta(hours=-23, minutes=-59))), "app",
                      100_000.0)
    prepared = prepare([message(crisis, 0), message(checkin, 1)], TOPICS.models(), NOW)
    store = PostgresStore(storable_db)
    try:
        assert store.write(prepared.rows).refused == []
    finally:
        store.close()
    with connect(storable_db) as conn:
        assert stored(conn, crisis) == expected(crisis)
        assert conn.execute(b"SELECT version FROM crises WHERE crisis_id = 'k-limits'").fetchone() == (MAX_INTEGER,)
        assert stored(conn, checkin) == (90.0, -180.0, 100_000.0)
