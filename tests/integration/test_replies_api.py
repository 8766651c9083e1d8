"""Replies, SOS and cases through the API's HTTP interface, on the real broker and real PostgreSQL:
the reply link's page and its answer, an inbound SMS matched to its sender and crisis, replies for
unknown citizens or crises refused with nothing published, an SOS and a need_help reply opening cases
on ``cases`` and ``cases.<CC>``, and operators moving a case whose history the sink stores."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from consumers.kafka_io import Backoff
from consumers.sink import PostgresSink, SinkTopics
from pipeline import topics
from pipeline.embedded import create_topics, free_port
from pipeline.metrics import SinkMetrics
from pipeline.reply_links import ReplyLinks
from pipeline.settings import Secret, Settings
from pipeline.testing import records_for
from producers.api import ApiTopics, create_app
from producers.audit import PostgresAuditLog
from producers.publisher import Publisher, outgoing
from producers.reply_store import PostgresReplyStore
from schemas import Ack, Case, decode

pytestmark = pytest.mark.integration

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
INGEST = {"Authorization": "Bearer ingest-secret"}
OPERATOR = {"Authorization": "Bearer operator-secret"}
SECRET = "reply-links-secret"
TOKYO = (35.68, 139.76)
SQUARE = {"type": "Polygon", "coordinates": [[[139.7, 35.6], [139.8, 35.6], [139.8, 35.7], [139.7, 35.7], [139.7, 35.6]]]}


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def clock() -> datetime:
    return NOW


@pytest.fixture(scope="module")
def api_topics(kafka_bootstrap: str) -> ApiTopics:
    suffix = uuid.uuid4().hex[:8]
    names = ApiTopics(checkins=f"rp-checkins-{suffix}", citizens=f"rp-citizens-{suffix}", crises=f"rp-crises-{suffix}",
                      acks=f"rp-acks-{suffix}", cases=f"rp-cases-{suffix}")
    create_topics(kafka_bootstrap, [names.checkins, names.citizens, names.crises, names.acks, names.cases], 2)
    return names


@pytest.fixture(scope="module")
def settings(kafka_bootstrap: str) -> Settings:
    return Settings(kafka_bootstrap=kafka_bootstrap, ingest_token=Secret("ingest-secret"),
                    operator_token=Secret("operator-secret"), reply_secret=Secret(SECRET))


@pytest.fixture(scope="module")
def publisher(settings: Settings) -> Iterator[Publisher]:
    pub = Publisher(settings, timeout_s=10)
    yield pub
    pub.close()


@pytest.fixture(scope="module")
def store(database_url: str) -> Iterator[PostgresReplyStore]:
    reader = PostgresReplyStore(database_url)
    yield reader
    reader.close()


@pytest.fixture
def client(settings: Settings, publisher: Publisher, api_topics: ApiTopics, store: PostgresReplyStore,
           database_url: str) -> Iterator[TestClient]:
    audit = PostgresAuditLog(database_url)  # listing cases shows where citizens are: it is audited, or refused
    yield TestClient(create_app(settings, publisher, CollectorRegistry(), clock, api_topics=api_topics,
                                reply_store=store, audit_log=audit))
    audit.close()


# --- the registry, as the sink would have written it ---------------------------------------------


def add_citizen(url: str, citizen_id: str, sms: str | None = None) -> None:
    channels = [{"type": "webhook", "address": "https://example.org/hook"}]
    if sms is not None:
        channels.append({"type": "sms", "address": sms})
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO citizens (citizen_id, name, nationality, language, channels, location_tracking) "
                     "VALUES (%s, 'Sari Wulandari', 'ID', 'id', %s, true)", (citizen_id, json.dumps(channels)))


def add_crisis(url: str, crisis_id: str, op: str = "upsert", version: int = 1) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO crises (crisis_id, version, op, source, source_ref, title, category, severity, "
                     "urgency, certainty, geometry, buffer_km, country_codes, effective, instruction, url) "
                     "VALUES (%s, %s, %s, 'operator', %s, 'Flood in Tokyo', 'met', 'severe', 'immediate', 'observed', "
                     "%s, 5, '{JP}', %s, 'Move to higher ground', '')",
                     (crisis_id, version, op, crisis_id, json.dumps(SQUARE), NOW - timedelta(hours=3)))


def add_warning(url: str, citizen_id: str, crisis_id: str, emitted_at: datetime, at: tuple[float, float] = TOKYO) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO warnings (warning_id, citizen_id, crisis_id, crisis_version, kind, severity, title, "
                     "instruction, distance_km, lat, lon, observed_at, emitted_at) VALUES (%s, %s, %s, 1, 'inside', "
                     "'severe', 'Flood in Tokyo', 'Move to higher ground', 0, %s, %s, %s, %s)",
                     (uid("w"), citizen_id, crisis_id, at[0], at[1], emitted_at, emitted_at))


def warned_citizen(url: str, sms: str | None = None) -> tuple[str, str]:
    citizen_id, crisis_id = uid("cit"), uid("op")
    add_citizen(url, citizen_id, sms)
    add_crisis(url, crisis_id)
    add_warning(url, citizen_id, crisis_id, NOW - timedelta(hours=1))
    return citizen_id, crisis_id


def nothing_on(bootstrap: str, topic: str, key: str) -> bool:
    return records_for(bootstrap, topic, {key}) == []


# --- the reply link --------------------------------------------------------------------------------


def test_the_link_page_shows_two_buttons_and_an_answer_is_published(
        client: TestClient, database_url: str, kafka_bootstrap: str, api_topics: ApiTopics) -> None:
    citizen_id, crisis_id = warned_citizen(database_url)
    token = ReplyLinks(SECRET, 7 * 86400, clock).sign(citizen_id, crisis_id)

    page = client.get(f"/r/{token}")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "Saya aman" in page.text and "I need help" in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert page.headers["referrer-policy"] == "no-referrer" and page.headers["cache-control"] == "no-store"

    answered = client.post(f"/r/{token}", data={"status": "need_help"})
    assert answered.status_code == 200 and "Help is being arranged" in answered.text

    [record] = records_for(kafka_bootstrap, api_topics.acks, {citizen_id}, 1)
    ack = decode(record.value, Ack)
    assert (ack.crisis_id, ack.status, ack.channel, ack.received_at) == (crisis_id, "need_help", "link", NOW)
    [on_cases] = records_for(kafka_bootstrap, api_topics.cases, {citizen_id}, 1)
    [on_japan] = records_for(kafka_bootstrap, topics.country_case_topic("JP", api_topics.cases), {citizen_id}, 1)
    case = decode(on_cases.value, Case)
    assert (case.kind, case.state, case.crisis_id, case.country, (case.lat, case.lon)) == \
        ("need_help", "open", crisis_id, "JP", TOKYO)
    assert decode(on_japan.value, Case) == case


def test_expired_and_forged_links_are_refused_and_nothing_is_published(
        client: TestClient, database_url: str, kafka_bootstrap: str, api_topics: ApiTopics) -> None:
    citizen_id, crisis_id = warned_citizen(database_url)
    old = ReplyLinks(SECRET, 7 * 86400, lambda: NOW - timedelta(days=8)).sign(citizen_id, crisis_id)
    forged = ReplyLinks("someone else's key", 7 * 86400, clock).sign(citizen_id, crisis_id)

    for token, status, reason in ((old, 410, "expired"), (forged, 400, "not valid")):
        for response in (client.get(f"/r/{token}"), client.post(f"/r/{token}", data={"status": "safe"})):
            assert response.status_code == status
            assert reason in response.text and "default-src 'none'" in response.headers["content-security-policy"]
    valid = ReplyLinks(SECRET, 7 * 86400, clock).sign(citizen_id, crisis_id)
    assert client.post(f"/r/{valid}", data={"status": "fine"}).status_code == 400
    assert nothing_on(kafka_bootstrap, api_topics.acks, citizen_id)


# --- inbound SMS -----------------------------------------------------------------------------------


def test_an_sms_is_matched_to_its_sender_and_latest_active_crisis(
        client: TestClient, database_url: str, kafka_bootstrap: str, api_topics: ApiTopics) -> None:
    number = f"+8190{uuid.uuid4().int % 10**8:08d}"
    spaced = f"{number[:3]} {number[3:6]}-{number[6:]}"  # registered as people type it
    citizen_id, older = warned_citizen(database_url, sms=spaced)
    newest_but_cancelled = uid("op")
    add_crisis(database_url, newest_but_cancelled)
    add_crisis(database_url, newest_but_cancelled, op="cancel", version=2)
    add_warning(database_url, citizen_id, newest_but_cancelled, NOW - timedelta(minutes=5))

    form = client.post("/v1/sms/inbound", data={"From": "00" + number[1:], "Body": "  aman  sudah di hotel"},
                       headers=INGEST)
    as_json = client.post("/v1/sms/inbound", json={"from": number, "body": "TOLONG"}, headers=INGEST)

    assert form.status_code == 202, form.text
    assert form.json() | {"case_id": None} == {"accepted": 1, "citizen_id": citizen_id, "crisis_id": older,
                                               "status": "safe", "case_id": None}
    assert as_json.status_code == 202 and as_json.json()["status"] == "need_help" and as_json.json()["case_id"]
    acks = [decode(r.value, Ack) for r in records_for(kafka_bootstrap, api_topics.acks, {citizen_id}, 2)]
    assert sorted((a.status, a.crisis_id, a.channel, a.note) for a in acks) == [
        ("need_help", older, "sms", None), ("safe", older, "sms", "sudah di hotel")]


def test_unknown_senders_keywords_and_crises_are_422_and_nothing_is_published(
        client: TestClient, database_url: str, kafka_bootstrap: str, api_topics: ApiTopics) -> None:
    number = f"+6281{uuid.uuid4().int % 10**9:09d}"
    never_warned = uid("cit")
    add_citizen(database_url, never_warned, sms=number)

    cases = [({"from": "+1 555 000 0000", "body": "SAFE"}, "unknown_sender", "$.from"),
             ({"from": number, "body": "OK thanks"}, "invalid", "$.body"),
             ({"from": "0812 3456", "body": "SAFE"}, "invalid", "$.from"),
             ({"from": number, "body": "HELP"}, "no_crisis", "$.body")]
    for body, error, field in cases:
        response = client.post("/v1/sms/inbound", json=body, headers=INGEST)
        assert response.status_code == 422, body
        assert (response.json()["error"], response.json()["field"]) == (error, field)
        assert response.json()["reason"]
    assert nothing_on(kafka_bootstrap, api_topics.acks, never_warned)
    assert nothing_on(kafka_bootstrap, api_topics.cases, never_warned)


# --- POST /v1/acks against the registry -------------------------------------------------------------


def test_replies_for_unknown_citizens_or_crises_are_refused_and_not_published(
        client: TestClient, database_url: str, kafka_bootstrap: str, api_topics: ApiTopics) -> None:
    citizen_id, crisis_id = warned_citizen(database_url)
    stranger = uid("cit")

    unknown_citizen = client.post("/v1/acks", json={"citizen_id": stranger, "crisis_id": crisis_id,
                                                    "status": "need_help"}, headers=INGEST)
    unknown_crisis = client.post("/v1/acks", json={"citizen_id": citizen_id, "crisis_id": uid("op"),
                                                   "status": "safe"}, headers=INGEST)

    assert unknown_citizen.status_code == 422 and unknown_citizen.json()["field"] == "$.citizen_id"
    assert stranger in unknown_citizen.json()["reason"]
    assert unknown_crisis.status_code == 422 and unknown_crisis.json()["field"] == "$.crisis_id"
    assert nothing_on(kafka_bootstrap, api_topics.acks, stranger)
    assert nothing_on(kafka_bootstrap, api_topics.acks, citizen_id)
    assert nothing_on(kafka_bootstrap, api_topics.cases, stranger)


def test_a_database_away_is_503_and_nothing_is_published(
        settings: Settings, publisher: Publisher, kafka_bootstrap: str, api_topics: ApiTopics) -> None:
    away = PostgresReplyStore(f"postgresql://nobody@127.0.0.1:{free_port()}/none", connect_timeout_s=1)
    client = TestClient(create_app(settings, publisher, CollectorRegistry(), clock, api_topics=api_topics,
                                   reply_store=away))
    cid = uid("cit")
    for path, body in (("/v1/acks", {"citizen_id": cid, "crisis_id": "op-1", "status": "safe"}),
                       ("/v1/sos", {"citizen_id": cid, "lat": 1.0, "lon": 2.0}),
                       ("/v1/sms/inbound", {"from": "+6281234567890", "body": "AMAN"})):
        response = client.post(path, json=body, headers=INGEST)
        assert response.status_code == 503 and response.json()["error"] == "database_unavailable", path
    assert nothing_on(kafka_bootstrap, api_topics.acks, cid)


# --- cases ---------------------------------------------------------------------------------------------


def test_an_sos_opens_a_case_on_cases_and_its_country_topic_at_once(
        client: TestClient, database_url: str, kafka_bootstrap: str, api_topics: ApiTopics) -> None:
    citizen_id = uid("cit")
    add_citizen(database_url, citizen_id)  # no crisis anywhere near: an SOS opens a case all the same

    response = client.post("/v1/sos", json={"citizen_id": citizen_id, "lat": TOKYO[0], "lon": TOKYO[1],
                                            "message": "passport stolen, phone at 5%"}, headers=INGEST)
    again = client.post("/v1/sos", json={"citizen_id": citizen_id, "lat": TOKYO[0], "lon": TOKYO[1],
                                         "message": "passport stolen, phone at 5%", "sent_at": "2025-03-01T12:00:00Z"},
                        headers=INGEST)
    stranger = client.post("/v1/sos", json={"citizen_id": uid("cit"), "lat": 1.0, "lon": 2.0}, headers=INGEST)
    bad = client.post("/v1/sos", json={"citizen_id": citizen_id, "lat": 95, "lon": 2.0}, headers=INGEST)

    assert response.status_code == 202, response.text
    case = Case.from_dict(response.json())
    assert (case.kind, case.state, case.crisis_id, case.country, case.note) == \
        ("sos", "open", None, "JP", "passport stolen, phone at 5%")
    assert again.json()["case_id"] == case.case_id  # the retry of one press is the same case
    assert stranger.status_code == 422 and stranger.json()["field"] == "$.citizen_id"
    assert bad.status_code == 422 and bad.json()["field"] == "$.lat"
    on_cases = [decode(r.value, Case) for r in records_for(kafka_bootstrap, api_topics.cases, {citizen_id}, 2)]
    assert {c.case_id for c in on_cases} == {case.case_id}
    [on_japan, _] = records_for(kafka_bootstrap, topics.country_case_topic("JP", api_topics.cases), {citizen_id}, 2)
    assert decode(on_japan.value, Case) == case


def wait_until(condition: Callable[[], Any], what: str, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)
    return result


def history(url: str, case_id: str) -> list[tuple[str, str | None]]:
    with psycopg.connect(url) as conn:
        return [(r[0], r[1]) for r in conn.execute(
            "SELECT state, assignee FROM case_history WHERE case_id = %s ORDER BY updated_at", (case_id,))]


def test_a_need_help_reply_opens_a_case_operators_move_it_and_the_sink_keeps_its_history(
        client: TestClient, database_url: str, kafka_bootstrap: str, api_topics: ApiTopics, settings: Settings,
        publisher: Publisher, store: PostgresReplyStore) -> None:
    suffix = uuid.uuid4().hex[:8]
    others = [f"rp-sink-{name}-{suffix}" for name in ("checkins", "citizens", "crises", "warnings", "acks")]
    create_topics(kafka_bootstrap, others, 2)
    sink = PostgresSink(settings, SinkMetrics(CollectorRegistry()), database_url=database_url,
                        sink_topics=SinkTopics(*others, cases=api_topics.cases), group_id=f"rp-sink-{suffix}",
                        publisher=publisher, backoff=Backoff(0.1, 1.0))
    stop = threading.Event()
    thread = threading.Thread(target=sink.run, args=(stop,), daemon=True)
    thread.start()
    try:
        citizen_id, crisis_id = warned_citizen(database_url)
        reply = client.post("/v1/acks", json={"citizen_id": citizen_id, "crisis_id": crisis_id, "status": "need_help",
                                              "note": "trapped on the 3rd floor"}, headers=INGEST)
        assert reply.status_code == 202, reply.text
        case_id = reply.json()["case_id"]
        stored = wait_until(lambda: store.case(case_id), "the case in PostgreSQL")
        assert (stored.state, stored.note, stored.country) == ("open", "trapped on the 3rd floor", "JP")

        # The same reply again: the case is open already, so nothing about it changes.
        again = client.post("/v1/acks", json={"citizen_id": citizen_id, "crisis_id": crisis_id, "status": "need_help"},
                            headers=INGEST)
        assert again.json()["case_id"] == case_id

        assigned = client.patch(f"/v1/cases/{case_id}", json={"state": "assigned", "assignee": "KBRI Tokyo duty"},
                                headers=OPERATOR)
        assert assigned.status_code == 202, assigned.text
        wait_until(lambda: (c := store.case(case_id)) is not None and c.state == "assigned", "assigned")
        closed = client.patch(f"/v1/cases/{case_id}", json={"state": "closed", "note": "evacuated, safe"},
                              headers=OPERATOR)
        assert closed.status_code == 202
        wait_until(lambda: (c := store.case(case_id)) is not None and c.state == "closed", "closed")

        # An old version replayed never moves the case back.
        publisher.publish([outgoing(stored, api_topics.cases)])
        listed = client.get("/v1/cases?state=closed", headers=OPERATOR).json()["cases"]
        assert case_id in {c["case_id"] for c in listed}
        assert [(c["lat"], c["lon"]) for c in listed if c["case_id"] == case_id] == [(None, None)]  # closed: no location
        time.sleep(2)
        final = store.case(case_id)
        assert final is not None and (final.state, final.assignee, final.note) == \
            ("closed", "KBRI Tokyo duty", "evacuated, safe")
        assert history(database_url, case_id) == [("open", None), ("assigned", "KBRI Tokyo duty"),
                                                  ("closed", "KBRI Tokyo duty")]

        assert client.patch(f"/v1/cases/{case_id}", json={"state": "assigned"}, headers=OPERATOR).status_code == 202
        assert client.patch(f"/v1/cases/{case_id}", json={"state": "resolved"}, headers=OPERATOR).status_code == 422
        assert client.patch("/v1/cases/case-nope", json={"state": "closed"}, headers=OPERATOR).status_code == 404
        assert client.patch("/v1/cases/case%00nul", json={"state": "closed"}, headers=OPERATOR).status_code == 404
        assert client.patch(f"/v1/cases/{case_id}", json={"state": "closed"}, headers=INGEST).status_code == 403
        assert client.get("/v1/cases?state=lost", headers=OPERATOR).status_code == 422
    finally:
        stop.set()
        thread.join(30)
