"""Privacy on the real broker and real PostgreSQL: consent refused at the API and never stored by the sink
(its dead letter without the coordinates), withdrawal forgets the history, erasure everywhere (rows,
tombstones, the sink applying them), the minimised citizen view and export, and the audit log."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from consumers.escalate import Escalator
from consumers.kafka_io import read_topic
from consumers.sink import SinkTopics
from pipeline import topics
from pipeline.domain.escalation import parse_rules
from pipeline.settings import Secret, Settings
from pipeline.testing import records_for
from producers.api import ApiTopics, create_app
from producers.audit import PostgresAuditLog
from producers.citizen_store import PostgresCitizenStore
from producers.erase import ERASED_TABLES, PostgresEraser
from producers.operator_page import PostgresOperatorStore
from producers.publisher import Outgoing, Publisher, outgoing
from producers.reply_store import PostgresReplyStore
from schemas import Channel, Checkin, Citizen, Crisis, Warning, decode, encode
from tests.stack_helpers import count, dead_letters, make_sink, new_database, running, uid, wait_until

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC).replace(microsecond=0)
SQUARE = {"type": "Polygon", "coordinates": [[[106.7, -6.3], [106.9, -6.3], [106.9, -6.1], [106.7, -6.1], [106.7, -6.3]]]}
INGEST = {"Authorization": "Bearer ingest-secret"}
OPERATOR = {"Authorization": "Bearer operator-secret"}
ADMIN = {"Authorization": "Bearer admin-secret"}
# Values that must never leave the places they belong in: a test looks for them in what it should not be in.
NAME, PHONE, LAT, LON = "Sari Wulandari", "+6281200000001", -6.21234, 106.84321


def citizen(citizen_id: str, tracking: bool = True) -> Citizen:
    return Citizen(citizen_id, NAME, "ID", "id", (Channel("sms", PHONE),),
                   ({"name": "Budi", "relation": "brother", "phone": "+6281200000002"},), tracking,
                   {"country": "ID", "from": "2025-02-20", "until": "2099-03-20"})


def checkin(citizen_id: str, at: datetime = NOW) -> Checkin:
    return Checkin(citizen_id, LAT, LON, at - timedelta(minutes=1), "app", 15.0)


def crisis(crisis_id: str, op: str = "upsert", version: int = 1) -> Crisis:
    return Crisis(crisis_id, op, version, "operator", crisis_id, "Flooding in Jakarta", "met",  # type: ignore[arg-type]
                  "severe", "immediate", "observed", SQUARE, 5.0, ("ID",), NOW - timedelta(hours=1), None,
                  "Move to higher ground", "", ())


def warning(citizen_id: str, crisis_id: str, kind: str, at: datetime = NOW) -> Warning:
    return Warning("w-" + uuid.uuid4().hex, citizen_id, crisis_id, 1, kind, "severe", "Flooding in Jakarta",  # type: ignore[arg-type]
                   "Move to higher ground", 0.0, LAT, LON, at, at, ("ID",))


@pytest.fixture
def db(database_url: str) -> str:
    return new_database(database_url, "privacy")


@pytest.fixture
def publisher(kafka_bootstrap: str) -> Iterator[Publisher]:
    pub = Publisher(Settings(), bootstrap=kafka_bootstrap, timeout_s=10)
    yield pub
    pub.close()


@contextmanager
def running_sink(kafka_bootstrap: str, url: str, sink_topics: SinkTopics) -> Iterator[CollectorRegistry]:
    registry = CollectorRegistry()
    with running(make_sink(kafka_bootstrap, url, sink_topics, registry)):
        yield registry


@contextmanager
def api(kafka_bootstrap: str, url: str, sink_topics: SinkTopics, publisher: Publisher) -> Iterator[TestClient]:
    settings = Settings(kafka_bootstrap=kafka_bootstrap, database_url=Secret(url), ingest_token=Secret("ingest-secret"),
                        operator_token=Secret("operator-secret"), admin_token=Secret("admin-secret"))
    stores = (PostgresAuditLog(url), PostgresCitizenStore(url), PostgresEraser(url), PostgresReplyStore(url),
              PostgresOperatorStore(url))
    names = ApiTopics(checkins=sink_topics.checkins, citizens=sink_topics.citizens, crises=sink_topics.crisis_events,
                      acks=sink_topics.acks, cases=sink_topics.cases)
    app = create_app(settings, publisher, CollectorRegistry(), lambda: datetime.now(UTC), api_topics=names,
                     audit_log=stores[0], citizen_store=stores[1], eraser=stores[2], reply_store=stores[3],
                     operator_store=stores[4])
    try:
        yield TestClient(app)
    finally:
        for store in stores:
            store.close()


def audit_rows(url: str, action: str, subject: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return list(conn.execute("SELECT actor, role, action, subject, detail FROM audit_log "
                                 "WHERE action = %s AND subject = %s", (action, subject)).fetchall())


def test_a_citizen_without_consent_is_refused_at_the_api_and_never_stored_by_the_sink(
        kafka_bootstrap: str, db: str, sink_topics: SinkTopics, publisher: Publisher) -> None:
    untracked, tracked = uid("cit"), uid("cit")
    publisher.publish([outgoing(citizen(untracked, tracking=False), sink_topics.citizens),
                       outgoing(citizen(tracked), sink_topics.citizens)])
    with running_sink(kafka_bootstrap, db, sink_topics):
        wait_until(lambda: count(db, "SELECT count(*) FROM citizens") == 2, what="the registrations")
        # The registry knows: the API refuses the whole batch and names the check-in.
        with api(kafka_bootstrap, db, sink_topics, publisher) as client:
            body = [json.loads(encode(checkin(tracked))), json.loads(encode(checkin(untracked)))]
            refused = client.post("/v1/checkins", json=body, headers=INGEST)
            assert refused.status_code == 422, refused.text
            assert refused.json()["error"] == "no_consent"
            assert refused.json()["field"] == "$[1].citizen_id"
            assert str(LAT) not in refused.text
            assert client.post("/v1/checkins", json=body[0], headers=INGEST).status_code == 202
        assert records_for(kafka_bootstrap, sink_topics.checkins, {untracked}, None) == []

        # A producer that does not ask the registry (or asked before it knew): the database refuses the row.
        publisher.publish([outgoing(checkin(untracked), sink_topics.checkins)])
        [letter] = dead_letters(kafka_bootstrap, sink_topics.checkins, 1)
        wait_until(lambda: count(db, "SELECT count(*) FROM checkins WHERE citizen_id = %s", tracked) == 1,
                   what="the consenting citizen's check-in")
    assert count(db, "SELECT count(*) FROM checkins WHERE citizen_id = %s", untracked) == 0
    reason = dict(letter.headers)[topics.DLQ_REASON_HEADER].decode()
    assert "not consented to location tracking" in reason and "checkins_location_tracking_consent" in reason
    payload = json.loads(letter.value)
    assert payload["citizen_id"] == untracked and "lat" not in payload and "lon" not in payload
    assert str(LAT).encode() not in letter.value and str(LON).encode() not in letter.value
    assert str(LAT) not in reason


def test_withdrawn_consent_forgets_the_history_and_a_refusal_never_quotes_the_row(
        kafka_bootstrap: str, db: str, sink_topics: SinkTopics, publisher: Publisher) -> None:
    who, refused = uid("cit"), uid("cit")
    with psycopg.connect(db, autocommit=True) as conn:  # a refusal nobody foresaw, played by this test's constraint
        conn.execute(f"ALTER TABLE citizens ADD CONSTRAINT no_such_trip CHECK (citizen_id <> '{refused}')")
    publisher.publish([outgoing(citizen(who), sink_topics.citizens), outgoing(checkin(who), sink_topics.checkins),
                       outgoing(citizen(refused), sink_topics.citizens)])
    with running_sink(kafka_bootstrap, db, sink_topics):
        wait_until(lambda: count(db, "SELECT count(*) FROM checkins WHERE citizen_id = %s", who) == 1, what="history")
        [letter] = dead_letters(kafka_bootstrap, sink_topics.citizens, 1)
        publisher.publish([outgoing(citizen(who, tracking=False), sink_topics.citizens)])
        wait_until(lambda: count(db, "SELECT count(*) FROM citizens WHERE citizen_id = %s AND NOT location_tracking",
                                 who) == 1, what="the withdrawal")
    assert count(db, "SELECT count(*) FROM checkins WHERE citizen_id = %s", who) == 0
    reason = dict(letter.headers)[topics.DLQ_REASON_HEADER].decode()
    assert reason.startswith("CheckViolation: postgresql refused the row for citizens") and "no_such_trip" in reason
    assert NAME not in reason and PHONE not in reason and "Failing row" not in reason


def test_erasure_deletes_every_row_publishes_tombstones_and_is_audited(
        kafka_bootstrap: str, db: str, sink_topics: SinkTopics, publisher: Publisher) -> None:
    who, other, what = uid("cit"), uid("cit"), uid("crisis")
    with psycopg.connect(db, autocommit=True) as conn:
        for citizen_id in (who, other):
            conn.execute("INSERT INTO citizens (citizen_id, name, nationality, language, channels, location_tracking) "
                         "VALUES (%s, %s, 'ID', 'id', %s::jsonb, true)",
                         (citizen_id, NAME, json.dumps([{"type": "sms", "address": PHONE}])))
            conn.execute("INSERT INTO checkins (citizen_id, observed_at, source, lat, lon) VALUES (%s, %s, 'app', %s, %s)",
                         (citizen_id, NOW, LAT, LON))
            conn.execute("INSERT INTO warnings (warning_id, citizen_id, crisis_id, crisis_version, kind, severity, title, "
                         "instruction, distance_km, lat, lon, observed_at, emitted_at) VALUES "
                         "(%s, %s, %s, 1, 'inside', 'severe', 't', 'i', 0, %s, %s, %s, %s)",
                         (uid("w"), citizen_id, what, LAT, LON, NOW, NOW))
            conn.execute("INSERT INTO deliveries (warning_id, channel, address, citizen_id, crisis_id) "
                         "VALUES (%s, 'sms', %s, %s, %s)", (uid("w"), PHONE, citizen_id, what))
            conn.execute("INSERT INTO acks (citizen_id, crisis_id, received_at, status, channel) "
                         "VALUES (%s, %s, %s, 'need_help', 'app')", (citizen_id, what, NOW))
            conn.execute("INSERT INTO cases (case_id, citizen_id, crisis_id, kind, state, lat, lon, note, opened_at, "
                         "updated_at) VALUES (%s, %s, %s, 'need_help', 'open', %s, %s, 'trapped', %s, %s)",
                         (uid("case"), citizen_id, what, LAT, LON, NOW, NOW))
            conn.execute("INSERT INTO escalations (crisis_id, citizen_id, level) VALUES (%s, %s, 1)", (what, citizen_id))

    with api(kafka_bootstrap, db, sink_topics, publisher) as client:
        assert client.delete(f"/v1/citizens/{who}", headers=OPERATOR).status_code == 403  # admins only
        erased = client.delete(f"/v1/citizens/{who}", headers=ADMIN)
        assert erased.status_code == 200, erased.text
        assert erased.json()["deleted"] == {"checkins": 1, "warnings": 1, "deliveries": 1, "acks": 1, "escalations": 1,
                                            "cases": 1, "citizens": 1}
        assert erased.json()["tombstones"] == [sink_topics.citizens, sink_topics.checkins]
        again = client.delete(f"/v1/citizens/{who}", headers=ADMIN)  # idempotent
        assert again.status_code == 200 and set(again.json()["deleted"].values()) == {0}

        audit = client.get("/v1/audit", params={"action": "erase", "subject": who}, headers=ADMIN)
        assert audit.status_code == 200
        assert [(e["actor"], e["role"], e["action"]) for e in audit.json()["entries"]] == [("admin", "admin", "erase")] * 2
        assert client.get("/v1/audit", headers=OPERATOR).status_code == 403

    for table in ERASED_TABLES:
        assert count(db, f"SELECT count(*) FROM {table} WHERE citizen_id = %s", who) == 0, table
        assert count(db, f"SELECT count(*) FROM {table} WHERE citizen_id = %s", other) == 1, table
    assert count(db, "SELECT count(*) FROM case_history h JOIN cases c USING (case_id) WHERE c.citizen_id = %s", who) == 0
    assert len(audit_rows(db, "read_audit", who)) == 1  # reading the log is in the log too
    for topic in (sink_topics.citizens, sink_topics.checkins):
        marks = records_for(kafka_bootstrap, topic, {who}, 2)
        assert [m.value for m in marks] == [None, None]
    with psycopg.connect(db, autocommit=True) as conn, pytest.raises(psycopg.Error, match="append-only"):
        conn.execute("DELETE FROM audit_log")


def test_the_sink_applies_erasure_tombstones_after_what_came_before_them(
        kafka_bootstrap: str, db: str, sink_topics: SinkTopics, publisher: Publisher) -> None:
    who, other = uid("cit"), uid("cit")
    publisher.publish([outgoing(citizen(who), sink_topics.citizens), outgoing(citizen(other), sink_topics.citizens),
                       outgoing(checkin(who), sink_topics.checkins), outgoing(checkin(other), sink_topics.checkins)])
    with api(kafka_bootstrap, db, sink_topics, publisher) as client:
        # erased while the sink has not written anything yet: what was in flight must not come back
        assert client.delete(f"/v1/citizens/{who}", headers=ADMIN).status_code == 200
    empty = uid("cit")  # an empty value is not a tombstone: still bad data, dead-lettered
    publisher.publish([Outgoing(sink_topics.citizens, empty.encode(), b""), outgoing(citizen(empty), sink_topics.citizens)])
    with running_sink(kafka_bootstrap, db, sink_topics) as registry:
        wait_until(lambda: count(db, "SELECT count(*) FROM checkins WHERE citizen_id = %s", other) == 1
                   and registry.get_sample_value("crisiswatch_sink_rows_written_total", {"table": "erase:checkins"})
                   is not None, what="the sink past the tombstones")
    assert count(db, "SELECT count(*) FROM citizens WHERE citizen_id = %s", who) == 0
    assert count(db, "SELECT count(*) FROM checkins WHERE citizen_id = %s", who) == 0
    assert count(db, "SELECT count(*) FROM citizens WHERE citizen_id = %s", other) == 1
    letters = dead_letters(kafka_bootstrap, sink_topics.citizens, 1)
    assert [m.key for m in letters] == [empty.encode()]  # the tombstones were not dead-lettered, the empty value was
    assert count(db, "SELECT count(*) FROM citizens WHERE citizen_id = %s", empty) == 1
    assert [m for m in read_topic(kafka_bootstrap, topics.DLQ, lambda seen: False, 1.0)
            if dict(m.headers).get(topics.DLQ_SOURCE_TOPIC_HEADER) == sink_topics.checkins.encode()] == []


def test_an_operator_sees_a_location_only_inside_or_near_an_active_crisis_and_every_look_is_audited(
        kafka_bootstrap: str, db: str, sink_topics: SinkTopics, publisher: Publisher) -> None:
    inside, away, what = uid("cit"), uid("cit"), uid("crisis")
    publisher.publish([outgoing(citizen(inside), sink_topics.citizens), outgoing(citizen(away), sink_topics.citizens),
                       outgoing(checkin(away), sink_topics.checkins), outgoing(crisis(what), sink_topics.crisis_events),
                       outgoing(warning(inside, what, "inside"), sink_topics.warnings),
                       outgoing(warning(away, what, "near", NOW - timedelta(minutes=5)), sink_topics.warnings),
                       outgoing(warning(away, what, "exited"), sink_topics.warnings)])
    with running_sink(kafka_bootstrap, db, sink_topics), api(kafka_bootstrap, db, sink_topics, publisher) as client:
        wait_until(lambda: count(db, "SELECT count(*) FROM warnings WHERE crisis_id = %s", what) == 3
                   and count(db, "SELECT count(*) FROM citizens WHERE citizen_id IN (%s, %s)", inside, away) == 2,
                   what="the sink")
        assert client.get(f"/v1/citizens/{inside}", headers=INGEST).status_code == 403
        seen = client.get(f"/v1/citizens/{inside}", headers=OPERATOR).json()
        assert seen["location"]["lat"] == LAT and [c["crisis_id"] for c in seen["crises"]] == [what]
        hidden = client.get(f"/v1/citizens/{away}", headers=OPERATOR).json()
        assert hidden["name"] == NAME and hidden["location"] is None and "crises" in hidden
        assert hidden["location_withheld"] == "not inside or near an active crisis"
        export = client.get(f"/v1/crises/{what}/citizens", headers=OPERATOR)
        assert [c["citizen_id"] for c in export.json()["citizens"]] == [inside]

        publisher.publish([outgoing(crisis(what, "cancel", 2), sink_topics.crisis_events)])
        wait_until(lambda: count(db, "SELECT count(*) FROM crises_current WHERE crisis_id = %s AND op = 'cancel'",
                                 what) == 1, what="the cancel")
        assert client.get(f"/v1/citizens/{inside}", headers=OPERATOR).json()["location"] is None
        assert client.get(f"/v1/crises/{what}/citizens", headers=OPERATOR).status_code == 409  # ended: no points
        assert client.get(f"/v1/citizens/{uid('nobody')}", headers=OPERATOR).status_code == 404

    assert [(r[0], r[1]) for r in audit_rows(db, "view_citizen", inside)] == [("operator", "operator")] * 2
    assert len(audit_rows(db, "view_citizen", away)) == 1
    assert len(audit_rows(db, "export", what)) == 2
    with psycopg.connect(db) as conn:
        details = [row[0] for row in conn.execute("SELECT detail::text FROM audit_log").fetchall()]
    assert not [d for d in details if str(LAT) in d or NAME in d]


def test_declaring_and_cancelling_a_crisis_and_changing_a_case_are_audited(
        kafka_bootstrap: str, db: str, sink_topics: SinkTopics, publisher: Publisher) -> None:
    with api(kafka_bootstrap, db, sink_topics, publisher) as client:
        declared = client.post("/v1/crises", json={"title": "Gas leak", "geometry": SQUARE}, headers=OPERATOR)
        assert declared.status_code == 202
        crisis_id = declared.json()["crisis_id"]
        assert client.post("/v1/crises", json={"crisis_id": crisis_id, "title": "Gas leak (wider)", "geometry": SQUARE},
                           headers=ADMIN).status_code == 202
        assert client.post("/v1/crises", json={"op": "cancel", "crisis_id": crisis_id},
                           headers=OPERATOR).status_code == 202
        assert client.get("/v1/cases", headers=OPERATOR).status_code == 200
    assert [r[:3] for r in audit_rows(db, "declare", crisis_id)] == [("operator", "operator", "declare")]
    assert [r[:3] for r in audit_rows(db, "update", crisis_id)] == [("admin", "admin", "update")]
    assert [r[:3] for r in audit_rows(db, "cancel", crisis_id)] == [("operator", "operator", "cancel")]
    assert count(db, "SELECT count(*) FROM audit_log WHERE action = 'list_cases'") == 1


def test_a_citizen_not_tracked_is_warned_by_the_country_of_their_trip_once(
        kafka_bootstrap: str, db: str, sink_topics: SinkTopics, publisher: Publisher) -> None:
    untracked, tracked, what, mild = uid("cit"), uid("cit"), uid("crisis"), uid("crisis")
    with psycopg.connect(db, autocommit=True) as conn:
        for citizen_id, tracking in ((untracked, False), (tracked, True)):
            conn.execute("INSERT INTO citizens (citizen_id, name, nationality, language, location_tracking, trip_country, "
                         "trip_from, trip_until) VALUES (%s, %s, 'ID', 'id', %s, 'ID', %s, %s)",
                         (citizen_id, NAME, tracking, (NOW - timedelta(days=2)).date(), (NOW + timedelta(days=5)).date()))
        for crisis_id, severity in ((what, "severe"), (mild, "moderate")):
            conn.execute("INSERT INTO crises (crisis_id, version, op, source, source_ref, title, category, severity, urgency, "
                         "certainty, geometry, buffer_km, country_codes, effective, instruction, url) VALUES "
                         "(%s, 1, 'upsert', 'operator', %s, 'Flooding', 'met', %s, 'immediate', 'observed', %s::jsonb, 0, "
                         "'{ID}', %s, '', '')", (crisis_id, crisis_id, severity, json.dumps(SQUARE), NOW - timedelta(hours=1)))
    warnings_topic = sink_topics.warnings
    escalator = Escalator(db, publisher, parse_rules(""), lambda: NOW, warnings_topic=warnings_topic)
    try:
        sweeps = [escalator.sweep(), escalator.sweep()]
    finally:
        escalator.close()
    assert [(s.in_country, s.pre_arrival) for s in sweeps] == [(1, 0), (1, 0)]  # found again until the sink has it
    sent = [decode(r.value, Warning) for r in records_for(kafka_bootstrap, warnings_topic, {untracked, tracked}, 2)]
    assert {(w.citizen_id, w.crisis_id, w.kind) for w in sent} == {(untracked, what, "in_country")}
    assert len({w.warning_id for w in sent}) == 1  # one warning, delivered once
    assert (sent[0].lat, sent[0].lon) != (LAT, LON) and -6.3 <= sent[0].lat <= -6.1  # a point of the area, not theirs
    assert "country of your registered trip" in sent[0].instruction
    with psycopg.connect(db, autocommit=True) as conn:  # the sink can store the new kind
        conn.execute("INSERT INTO warnings (warning_id, citizen_id, crisis_id, crisis_version, kind, severity, title, "
                     "instruction, distance_km, lat, lon, observed_at, emitted_at) VALUES "
                     "(%s, %s, %s, 1, 'in_country', 'severe', 't', 'i', 0, 0, 0, %s, %s)",
                     (sent[0].warning_id, untracked, what, NOW, NOW))
