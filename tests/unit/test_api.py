"""The ingest API through its HTTP interface, publishing to the real embedded broker.

Each module gets its own topics; each test reads back only the citizen or crisis ids it made up.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from pipeline.cli import main
from pipeline.domain.validation import decode_event
from pipeline.embedded import create_topics, free_port
from pipeline.settings import Secret, Settings
from pipeline.testing import records_for
from producers.api import MAX_BATCH, ApiTopics, create_app
from producers.publisher import Outgoing, Publisher
from producers.reply_store import PostgresReplyStore
from schemas import Ack, Case, Checkin, Citizen, Crisis, decode

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)
INGEST = {"Authorization": "Bearer ingest-secret"}
OPERATOR = {"Authorization": "Bearer operator-secret"}


def fixed_clock() -> datetime:
    return NOW


@pytest.fixture(scope="module")
def api_topics(kafka_bootstrap: str) -> ApiTopics:
    suffix = uuid.uuid4().hex[:8]
    names = ApiTopics(checkins=f"api-checkins-{suffix}", citizens=f"api-citizens-{suffix}",
                      crises=f"api-crises-{suffix}", acks=f"api-acks-{suffix}", cases=f"api-cases-{suffix}")
    create_topics(kafka_bootstrap, [names.checkins, names.citizens, names.crises, names.acks, names.cases], 2)
    return names


@pytest.fixture(scope="module")
def settings(kafka_bootstrap: str) -> Settings:
    return Settings(kafka_bootstrap=kafka_bootstrap, ingest_token=Secret("ingest-secret"),
                    operator_token=Secret("operator-secret"))


@pytest.fixture(scope="module")
def publisher(settings: Settings) -> Iterator[Publisher]:
    pub = Publisher(settings, timeout_s=10)
    yield pub
    pub.close()


def make_client(settings: Settings, publisher: Publisher, api_topics: ApiTopics | None = None) -> TestClient:
    app = create_app(settings, publisher, CollectorRegistry(), fixed_clock, api_topics=api_topics)
    return TestClient(app)


@pytest.fixture
def client(settings: Settings, publisher: Publisher, api_topics: ApiTopics) -> TestClient:
    return make_client(settings, publisher, api_topics)


def checkin(citizen_id: str, **overrides: Any) -> dict[str, Any]:
    """A check-in as a client sends it: no ``schema`` field."""
    body = {"citizen_id": citizen_id, "lat": -6.2, "lon": 106.8, "accuracy_m": 25,
            "observed_at": "2025-03-01T11:59:00+07:00", "source": "app"}
    body.update(overrides)
    return body


def new_id(prefix: str = "c") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# --- check-ins ---------------------------------------------------------------------------------


def test_single_checkin_is_on_the_topic_when_202_is_answered(client: TestClient, kafka_bootstrap: str,
                                                              api_topics: ApiTopics) -> None:
    cid = new_id()
    response = client.post("/v1/checkins", json=checkin(cid), headers=INGEST)

    assert response.status_code == 202
    assert response.json() == {"accepted": 1}
    [record] = records_for(kafka_bootstrap, api_topics.checkins, {cid}, 1)
    event = decode(record.value, Checkin)
    assert event.citizen_id == cid and event.lat == -6.2 and event.accuracy_m == 25
    assert event.observed_at == datetime(2025, 3, 1, 4, 59, tzinfo=UTC)
    assert json.loads(record.value)["schema"] == "checkin/1"


@pytest.mark.parametrize("wrap", [lambda items: items, lambda items: {"checkins": items}], ids=["array", "object"])
def test_batch_forms_publish_every_item(client: TestClient, kafka_bootstrap: str, api_topics: ApiTopics, wrap: Any) -> None:
    ids = [new_id() for _ in range(5)]
    response = client.post("/v1/checkins", json=wrap([checkin(i) for i in ids]), headers=INGEST)

    assert response.status_code == 202
    assert response.json() == {"accepted": 5}
    records = records_for(kafka_bootstrap, api_topics.checkins, set(ids), len(ids))
    assert sorted(r.key.decode() for r in records) == sorted(ids)


def test_full_batch_of_the_limit_is_accepted(client: TestClient, kafka_bootstrap: str, api_topics: ApiTopics) -> None:
    ids = [new_id() for _ in range(MAX_BATCH)]
    response = client.post("/v1/checkins", json=[checkin(i) for i in ids], headers=INGEST)

    assert response.status_code == 202
    assert response.json() == {"accepted": MAX_BATCH}
    assert len(records_for(kafka_bootstrap, api_topics.checkins, set(ids), MAX_BATCH)) == MAX_BATCH


@pytest.mark.parametrize(("body", "field", "reason"), [
    (checkin("x", lat=91), "$.lat", "must be at most 90"),
    (checkin("x", lon="106.8"), "$.lon", "must be of type number"),
    ({k: v for k, v in checkin("x").items() if k != "observed_at"}, "$.observed_at", "required field is missing"),
    (checkin("x", observed_at="2025-03-01T11:59:00"), "$.observed_at", "UTC offset"),
    (checkin("x", source="carrier-pigeon"), "$.source", "is not one of"),
    (checkin("x", schema="checkin/2"), "$.schema", "expected schema 'checkin/1'"),
    ({**checkin("x"), "citizen_id": ""}, "$.citizen_id", "should be non-empty"),
    ([], "$", "empty batch"),
    ({"checkins": "many"}, "$.checkins", "expected an array"),
    ("hello", "$", "expected a check-in object"),
], ids=["bad-lat", "lon-as-string", "missing-field", "datetime-without-offset", "unknown-source", "wrong-schema",
        "empty-id", "empty-batch", "checkins-not-array", "not-an-object"])
def test_invalid_checkin_gets_422_with_field_and_reason(client: TestClient, body: Any, field: str, reason: str) -> None:
    response = client.post("/v1/checkins", json=body, headers=INGEST)

    assert response.status_code == 422
    assert response.json()["field"] == field
    assert reason in response.json()["reason"]


def test_non_json_and_nan_are_refused(client: TestClient) -> None:
    not_json = client.post("/v1/checkins", content=b"{lat: 1", headers=INGEST)
    nan = client.post("/v1/checkins", headers={**INGEST, "Content-Type": "application/json"},
                      content=b'{"citizen_id": "x", "lat": NaN, "lon": 1, "observed_at": "2025-03-01T00:00:00Z", '
                              b'"source": "app"}')

    assert not_json.status_code == 422 and not_json.json()["reason"].startswith("not JSON")
    assert nan.status_code == 422 and "NaN is not a JSON number" in nan.json()["reason"]


@pytest.mark.parametrize(("wrap", "field"), [(lambda items: items, "$[3].lat"),
                                             (lambda items: {"checkins": items}, "$.checkins[3].lat")],
                         ids=["array", "object"])
def test_one_bad_item_refuses_the_whole_batch(client: TestClient, kafka_bootstrap: str, api_topics: ApiTopics,
                                              wrap: Any, field: str) -> None:
    ids = [new_id() for _ in range(5)]
    items = [checkin(i) for i in ids]
    items[3]["lat"] = -123.0

    response = client.post("/v1/checkins", json=wrap(items), headers=INGEST)

    assert response.status_code == 422
    assert response.json()["field"] == field
    assert response.json()["reason"] == "must be at least -90"  # described, not echoed: no coordinates in reasons
    # 202 is answered only after acknowledgement, so anything published would already be on the topic.
    assert records_for(kafka_bootstrap, api_topics.checkins, set(ids)) == []


# --- size limits -------------------------------------------------------------------------------


def test_batch_over_the_limit_gets_413(client: TestClient, kafka_bootstrap: str, api_topics: ApiTopics) -> None:
    ids = [new_id() for _ in range(MAX_BATCH + 1)]
    response = client.post("/v1/checkins", json={"checkins": [checkin(i) for i in ids]}, headers=INGEST)

    assert response.status_code == 413
    assert f"the limit is {MAX_BATCH}" in response.json()["reason"]
    assert records_for(kafka_bootstrap, api_topics.checkins, set(ids)) == []


def test_body_over_the_limit_gets_413_by_content_length(settings: Settings, publisher: Publisher,
                                                        api_topics: ApiTopics) -> None:
    small = make_client(Settings(kafka_bootstrap=settings.kafka_bootstrap, ingest_token=settings.ingest_token,
                                 max_body_bytes=2048), publisher, api_topics)
    body = [checkin(new_id()) for _ in range(30)]

    response = small.post("/v1/checkins", json=body, headers=INGEST)

    assert response.status_code == 413
    assert "exceeds the limit of 2048 bytes" in response.json()["reason"]


def test_chunked_body_over_the_limit_gets_413_by_counting(settings: Settings, publisher: Publisher,
                                                          api_topics: ApiTopics) -> None:
    small = make_client(Settings(kafka_bootstrap=settings.kafka_bootstrap, ingest_token=settings.ingest_token,
                                 max_body_bytes=2048), publisher, api_topics)
    raw = json.dumps([checkin(new_id()) for _ in range(30)]).encode()

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server has to count
        for start in range(0, len(raw), 500):
            yield raw[start:start + 500]

    response = small.post("/v1/checkins", content=chunks(), headers={**INGEST, "Content-Type": "application/json"})

    assert response.status_code == 413
    assert "exceeds the limit of 2048 bytes" in response.json()["reason"]


# --- authentication ----------------------------------------------------------------------------


def test_missing_token_gets_401_with_challenge(client: TestClient) -> None:
    response = client.post("/v1/checkins", json=checkin(new_id()))

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("header", ["Bearer wrong", "Bearer ingest-secret-but-longer", "Basic aW5nZXN0LXNlY3JldA==",
                                    "ingest-secret"])
def test_wrong_token_gets_401(client: TestClient, header: str) -> None:
    response = client.post("/v1/checkins", json=checkin(new_id()), headers={"Authorization": header})

    assert response.status_code == 401
    assert "WWW-Authenticate" in response.headers


def test_ingest_token_cannot_declare_crises(client: TestClient) -> None:
    response = client.post("/v1/crises", json={"op": "cancel", "crisis_id": new_id("k")}, headers=INGEST)

    assert response.status_code == 403
    assert 'error="insufficient_scope"' in response.headers["WWW-Authenticate"]


def test_operator_token_also_opens_ingest_endpoints(client: TestClient, kafka_bootstrap: str,
                                                    api_topics: ApiTopics) -> None:
    cid = new_id()
    response = client.post("/v1/checkins", json=checkin(cid), headers=OPERATOR)

    assert response.status_code == 202
    assert len(records_for(kafka_bootstrap, api_topics.checkins, {cid}, 1)) == 1


def test_unconfigured_tokens_open_nothing(settings: Settings, publisher: Publisher, api_topics: ApiTopics) -> None:
    closed = make_client(Settings(kafka_bootstrap=settings.kafka_bootstrap), publisher, api_topics)

    for header in ({"Authorization": "Bearer "}, {"Authorization": "Bearer anything"}, INGEST, OPERATOR):
        assert closed.post("/v1/checkins", json=checkin(new_id()), headers=header).status_code == 401
        assert closed.post("/v1/crises", json={"op": "cancel", "crisis_id": "k"}, headers=header).status_code == 401
    assert "CRISISWATCH_OPERATOR_TOKEN" in closed.post("/v1/crises", json={}, headers=OPERATOR).json()["reason"]


def test_ingest_token_alone_leaves_crises_closed(settings: Settings, publisher: Publisher, api_topics: ApiTopics) -> None:
    partial = make_client(Settings(kafka_bootstrap=settings.kafka_bootstrap, ingest_token=Secret("ingest-secret")),
                          publisher, api_topics)

    assert partial.post("/v1/checkins", json=checkin(new_id()), headers=INGEST).status_code == 202
    assert partial.post("/v1/crises", json={"op": "cancel", "crisis_id": "k"}, headers=INGEST).status_code == 401


# --- broker outage -----------------------------------------------------------------------------


def test_unreachable_broker_gets_503_never_2xx(settings: Settings, api_topics: ApiTopics) -> None:
    nowhere = Publisher(settings, bootstrap=f"127.0.0.1:{free_port()}", timeout_s=1.0)
    try:
        client = make_client(settings, nowhere, api_topics)
        checkins = client.post("/v1/checkins", json=checkin(new_id()), headers=INGEST)
        crisis = client.post("/v1/crises", json={"op": "cancel", "crisis_id": new_id("k")}, headers=OPERATOR)
    finally:
        nowhere.close()

    for response in (checkins, crisis):
        assert response.status_code == 503
        assert response.json()["error"] == "broker_unavailable"
        assert "Kafka" in response.json()["reason"]
        assert response.headers["Retry-After"]


# --- crises ------------------------------------------------------------------------------------

FIJI_ACROSS_ANTIMERIDIAN_UNCLOSED = {"type": "Polygon", "coordinates": [[[178.0, -18.5], [-179.0, -18.5], [-179.0, -16.0],
                                                                        [178.0, -16.0]]]}


def outer_rings(geometry: dict[str, Any]) -> list[list[list[float]]]:
    polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
    return [ring for polygon in polygons for ring in polygon]


def test_declared_crisis_is_normalised_and_published(client: TestClient, kafka_bootstrap: str,
                                                     api_topics: ApiTopics) -> None:
    response = client.post("/v1/crises", json={"title": "Cyclone over Fiji", "geometry": FIJI_ACROSS_ANTIMERIDIAN_UNCLOSED},
                           headers=OPERATOR)

    assert response.status_code == 202
    crisis = response.json()
    assert crisis["schema"] == "crisis/1"
    assert crisis["crisis_id"].startswith("op-")
    assert (crisis["op"], crisis["source"], crisis["version"]) == ("upsert", "operator", NOW_MS)
    assert crisis["effective"] == "2025-03-01T12:00:00Z"
    assert (crisis["buffer_km"], crisis["references"], crisis["url"], crisis["expires"]) == (0, [], "", None)
    assert crisis["country_codes"] == ["FJ"]
    # split at the antimeridian into two parts, every ring closed, every longitude in range
    assert crisis["geometry"]["type"] == "MultiPolygon"
    rings = outer_rings(crisis["geometry"])
    assert all(ring[0] == ring[-1] for ring in rings)
    assert all(-180 <= lon <= 180 for ring in rings for lon, _lat in ring)
    assert {max(lon for lon, _ in ring) for ring in rings} >= {180.0}
    [record] = records_for(kafka_bootstrap, api_topics.crises, {crisis["crisis_id"]}, 1)
    assert decode(record.value, Crisis) == Crisis.from_dict(crisis)


SAMPLES = Path(__file__).resolve().parents[2].parent / "shared" / "samples" / "tricky"


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="shared feed samples not available")
@pytest.mark.parametrize(("sample", "countries"), [
    ("antimeridian_issue187_polygon_lon_over_180_unclosed.geojson", ["RU", "US"]),
    ("antimeridian_issue174_polygon_crossing_180_unsplit.geojson", []),
])
def test_real_antimeridian_polygons_are_split(client: TestClient, sample: str, countries: list[str]) -> None:
    geometry = json.loads((SAMPLES / sample).read_text())

    response = client.post("/v1/crises", json={"geometry": geometry}, headers=OPERATOR)

    assert response.status_code == 202
    crisis = response.json()
    assert crisis["geometry"]["type"] == "MultiPolygon"
    east, west = sorted(outer_rings(crisis["geometry"]), key=lambda ring: -ring[0][0])
    assert max(lon for lon, _ in east) == 180.0 and min(lon for lon, _ in west) == -180.0
    assert all(-180 <= lon <= 180 for ring in (east, west) for lon, _ in ring)
    assert east[0] == east[-1] and west[0] == west[-1]
    assert crisis["country_codes"] == countries


def test_given_fields_are_kept_and_version_never_goes_back(client: TestClient) -> None:
    crisis_id = new_id("k")
    square = {"type": "Polygon", "coordinates": [[[106.7, -6.3], [106.9, -6.3], [106.9, -6.1], [106.7, -6.1], [106.7, -6.3]]]}
    old = client.post("/v1/crises", headers=OPERATOR, json={
        "crisis_id": crisis_id, "version": 7, "severity": "extreme", "category": "met", "buffer_km": 15,
        "country_codes": ["ID"], "geometry": square})
    ahead = client.post("/v1/crises", headers=OPERATOR, json={
        "crisis_id": crisis_id, "version": NOW_MS + 5, "geometry": square})

    assert old.status_code == 202 and ahead.status_code == 202
    assert old.json()["version"] == NOW_MS
    assert (old.json()["severity"], old.json()["category"], old.json()["buffer_km"]) == ("extreme", "met", 15)
    assert old.json()["country_codes"] == ["ID"]
    assert ahead.json()["version"] == NOW_MS + 5


def test_cancel_needs_only_the_crisis_id(client: TestClient, kafka_bootstrap: str, api_topics: ApiTopics) -> None:
    crisis_id = new_id("k")
    response = client.post("/v1/crises", json={"op": "cancel", "crisis_id": crisis_id}, headers=OPERATOR)

    assert response.status_code == 202
    assert (response.json()["op"], response.json()["geometry"], response.json()["version"]) == ("cancel", None, NOW_MS)
    [record] = records_for(kafka_bootstrap, api_topics.crises, {crisis_id}, 1)
    assert decode(record.value, Crisis).op == "cancel"


class _KnownCrises:
    """The crisis store's one question PUT and DELETE ask: does PostgreSQL know this crisis?"""

    def __init__(self, known: set[str]) -> None:
        self.known = known

    def versions(self, crisis_id: str) -> list[int]:
        return [1] if crisis_id in self.known else []


def test_put_updates_and_delete_cancels_only_a_crisis_that_exists(settings: Settings, publisher: Publisher,
                                                                   kafka_bootstrap: str, api_topics: ApiTopics) -> None:
    known, unknown = new_id("k"), new_id("u")
    app = create_app(settings, publisher, CollectorRegistry(), fixed_clock, api_topics=api_topics,
                     crisis_store=_KnownCrises({known}))  # type: ignore[arg-type]
    api = TestClient(app)
    area = {"type": "Polygon", "coordinates": [[[106.7, -6.3], [106.9, -6.3], [106.9, -6.1], [106.7, -6.1], [106.7, -6.3]]]}

    for refused in (api.put(f"/v1/crises/{unknown}", json={"title": "Flood", "geometry": area}, headers=OPERATOR),
                    api.delete(f"/v1/crises/{unknown}", headers=OPERATOR)):
        assert refused.status_code == 404 and refused.json()["error"] == "not_found", refused.text
    updated = api.put(f"/v1/crises/{known}", json={"title": "Flood, now wider", "geometry": area,
                                                   "crisis_id": "ignored", "op": "cancel"}, headers=OPERATOR)
    assert updated.status_code == 202, updated.text
    assert (updated.json()["crisis_id"], updated.json()["op"], updated.json()["title"]) == (known, "upsert", "Flood, now wider")
    cancelled = api.delete(f"/v1/crises/{known}", headers=OPERATOR)
    assert cancelled.status_code == 202 and cancelled.json()["op"] == "cancel"
    assert api.put(f"/v1/crises/{known}", json=[area], headers=OPERATOR).status_code == 422
    assert api.delete(f"/v1/crises/{known}", headers=INGEST).status_code == 403
    records = records_for(kafka_bootstrap, api_topics.crises, {known, unknown}, 2)
    assert [(r.key.decode(), decode(r.value, Crisis).op) for r in records] == [(known, "upsert"), (known, "cancel")]


@pytest.mark.parametrize(("body", "field", "reason"), [
    ({"op": "cancel"}, "$.crisis_id", "must name the crisis_id"),
    ({"title": "no area"}, "$.geometry", "needs a GeoJSON Polygon"),
    ({"geometry": {"type": "Point", "coordinates": [1, 2]}}, "$.geometry", "not a polygon"),
    ({"geometry": {"type": "Polygon", "coordinates": [[[1, 95], [2, 95], [2, 96]]]}}, "$.geometry", "latitude out of range"),
    ({"geometry": {"type": "Polygon", "coordinates": [[[1, 1], [2, 2]]]}}, "$.geometry", "empty geometry"),
    ({"geometry": {"type": "Polygon", "coordinates": [[[-80, -70], [80, -70], [80, 70], [-80, 70]]]}}, "$.geometry",
     "globe"),
    ({"op": "delete", "crisis_id": "k"}, "$.op", "must be 'upsert' or 'cancel'"),
    ({"op": "cancel", "crisis_id": "k", "version": "7"}, "$.version", "must be an integer"),
    ({"op": "cancel", "crisis_id": "k", "severity": "apocalyptic"}, "$.severity", "is not one of"),
    ({"op": "cancel", "crisis_id": "k", "expires": "tomorrow"}, "$.expires", "UTC offset"),
], ids=["cancel-without-id", "upsert-without-area", "point", "latitude", "degenerate", "too-large", "unknown-op",
        "version-string", "unknown-severity", "bad-expires"])
def test_invalid_crisis_gets_422_with_field_and_reason(client: TestClient, body: dict[str, Any], field: str,
                                                       reason: str) -> None:
    response = client.post("/v1/crises", json=body, headers=OPERATOR)

    assert response.status_code == 422
    assert response.json()["field"] == field
    assert reason in response.json()["reason"]


# --- citizens and acks -------------------------------------------------------------------------


def citizen(citizen_id: str, **overrides: Any) -> dict[str, Any]:
    body = {"citizen_id": citizen_id, "name": "Siti Rahma", "nationality": "ID", "language": "id",
            "channels": [{"type": "sms", "address": "+628123456789"}],
            "emergency_contacts": [{"name": "Budi", "relation": "brother", "phone": "+628987654321"}],
            "trip": {"country": "JP", "from": "2025-02-20", "until": "2025-03-10"},
            "consent": {"location_tracking": True}}
    body.update(overrides)
    return body


def test_citizen_self_report_reaches_the_citizens_topic(client: TestClient, kafka_bootstrap: str,
                                                        api_topics: ApiTopics) -> None:
    cid = new_id()
    response = client.post("/v1/citizens", json=citizen(cid), headers=INGEST)

    assert response.status_code == 202
    [record] = records_for(kafka_bootstrap, api_topics.citizens, {cid}, 1)
    event = decode(record.value, Citizen)
    assert (event.name, event.nationality, event.location_tracking) == ("Siti Rahma", "ID", True)
    assert event.trip == {"country": "JP", "from": "2025-02-20", "until": "2025-03-10"}


@pytest.mark.parametrize(("body", "field"), [
    (citizen("x", nationality="Indonesia"), "$.nationality"),
    (citizen("x", channels=[{"type": "pager", "address": "1"}]), "$.channels[0].type"),
    ({k: v for k, v in citizen("x").items() if k != "consent"}, "$.consent"),
])
def test_invalid_citizen_gets_422(client: TestClient, body: dict[str, Any], field: str) -> None:
    response = client.post("/v1/citizens", json=body, headers=INGEST)

    assert response.status_code == 422
    assert response.json()["field"] == field


def registered(database_url: str, citizen_id: str, crisis_id: str) -> None:
    """The citizen and the crisis in PostgreSQL, as the sink writes them: a reply is accepted only for those."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO citizens (citizen_id, name, nationality, language, location_tracking) "
                     "VALUES (%s, 'Siti Rahma', 'ID', 'id', true)", (citizen_id,))
        conn.execute("INSERT INTO crises (crisis_id, version, op, source, source_ref, title, category, severity, "
                     "urgency, certainty, buffer_km, effective, instruction, url) VALUES (%s, 1, 'upsert', 'operator', "
                     "%s, 'Flood', 'met', 'severe', 'immediate', 'observed', 0, %s, 'Move to higher ground', '')",
                     (crisis_id, crisis_id, NOW))


def test_ack_gets_received_at_and_channel_defaults(settings: Settings, publisher: Publisher, kafka_bootstrap: str,
                                                   api_topics: ApiTopics, database_url: str) -> None:
    cid, crisis_id = new_id(), new_id("op")
    registered(database_url, cid, crisis_id)
    store = PostgresReplyStore(database_url)
    client = TestClient(create_app(settings, publisher, CollectorRegistry(), fixed_clock, api_topics=api_topics,
                                   reply_store=store))
    try:
        response = client.post("/v1/acks", json={"citizen_id": cid, "crisis_id": crisis_id, "status": "need_help",
                                                 "note": "trapped on the 3rd floor"}, headers=INGEST)
    finally:
        store.close()

    assert response.status_code == 202
    [record] = records_for(kafka_bootstrap, api_topics.acks, {cid}, 1)
    ack = decode(record.value, Ack)
    assert (ack.status, ack.channel, ack.received_at, ack.note) == ("need_help", "app", NOW, "trapped on the 3rd floor")
    [case] = records_for(kafka_bootstrap, api_topics.cases, {cid}, 1)  # a need_help reply opens a case
    assert decode(case.value, Case).case_id == response.json()["case_id"]


def test_without_a_database_a_reply_cannot_be_checked_and_is_503(client: TestClient, kafka_bootstrap: str,
                                                                  api_topics: ApiTopics) -> None:
    cid = new_id()
    response = client.post("/v1/acks", json={"citizen_id": cid, "crisis_id": "op-1", "status": "safe"}, headers=INGEST)

    assert response.status_code == 503
    assert "CRISISWATCH_DATABASE_URL" in response.json()["reason"]
    assert records_for(kafka_bootstrap, api_topics.acks, {cid}) == []


def test_invalid_ack_gets_422(client: TestClient) -> None:
    response = client.post("/v1/acks", json={"citizen_id": "x", "crisis_id": "op-1", "status": "fine"}, headers=INGEST)

    assert response.status_code == 422
    assert response.json()["field"] == "$.status"


# --- operations ---------------------------------------------------------------------------------


def test_openapi_docs_health_and_metrics(client: TestClient) -> None:
    client.post("/v1/checkins", json=checkin(new_id()), headers=INGEST)
    client.post("/v1/checkins", json=checkin(new_id(), lat=200), headers=INGEST)

    spec = client.get("/openapi.json").json()
    assert {"/v1/checkins", "/v1/citizens", "/v1/crises", "/v1/acks", "/health", "/metrics"} <= set(spec["paths"])
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    checkin_body = spec["paths"]["/v1/checkins"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "citizen_id" in checkin_body["oneOf"][0]["required"]
    assert client.get("/docs").status_code == 200
    assert client.get("/health").json() == {"status": "ok"}
    metrics = client.get("/metrics").text
    assert 'crisiswatch_api_requests_total{endpoint="/v1/checkins",status="202"} 1.0' in metrics
    assert 'crisiswatch_api_requests_total{endpoint="/v1/checkins",status="422"} 1.0' in metrics
    assert "crisiswatch_api_events_published_total" in metrics


def test_api_verb_without_kafka_exits_2_with_one_line(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("CRISISWATCH_KAFKA_BOOTSTRAP", raising=False)

    assert main(["api"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "CRISISWATCH_KAFKA_BOOTSTRAP" in err and "crisiswatch up" in err


# --- nothing a stage would refuse is answered 202, nothing is answered 500 -----------------------------------

SQUARE = {"type": "Polygon", "coordinates": [[[106.7, -6.3], [106.9, -6.3], [106.9, -6.1], [106.7, -6.1], [106.7, -6.3]]]}
BOW_TIE = {"type": "Polygon", "coordinates": [[[106.7, -6.3], [106.9, -6.1], [106.9, -6.3], [106.7, -6.1], [106.7, -6.3]]]}
FOUR_IDENTICAL = {"type": "Polygon", "coordinates": [[[106.8, -6.2], [106.8, -6.2], [106.8, -6.2], [106.8, -6.2]]]}
WHOLE_GLOBE = {"type": "Polygon", "coordinates": [[[-180, -89], [0, -89], [180, -89], [180, 89], [0, 89], [-180, 89],
                                                   [-180, -89]]]}
LATER = (NOW + timedelta(hours=1)).isoformat()


def escaped(obj: Any) -> bytes:
    """JSON as an attacker writes it: any string escapes, lone surrogates included."""
    return json.dumps(obj, ensure_ascii=True).encode()


def deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize(("path", "body", "field", "reason"), [
    ("/v1/checkins", b'{"citizen_id": "x", "extra": ' + deep(1000) + b"}", "$", "nested more than 64 levels deep"),
    ("/v1/checkins", deep(980), "$", "nested more than 64 levels deep"),
    ("/v1/crises", b'{"geometry": ' + deep(5000) + b"}", "$", "nested more than 64 levels deep"),
    ("/v1/crises", escaped({"title": "Banjir \ud800", "geometry": SQUARE}), "$.title", "lone surrogate U+D800"),
    ("/v1/acks", escaped({"citizen_id": "x", "crisis_id": "k", "status": "safe", "\udc80": 1}), "$.\\udc80",
     "lone surrogate U+DC80 is not valid Unicode in an object key"),
    ("/v1/checkins", b'"\xed\xa0\x80"', "$", "not UTF-8"),
    ("/v1/citizens", escaped(citizen("x", name="Siti\u0000Rahma")), "$.name", "NUL (U+0000) is not allowed"),
    ("/v1/crises", escaped({"version": 10**30, "geometry": SQUARE}), "$.version", "below 2^63"),
    ("/v1/crises", escaped({"version": 2**63, "geometry": SQUARE}), "$.version", "below 2^63"),
    ("/v1/checkins", escaped(checkin("x")).replace(b'"lat": -6.2', b'"lat": 1e400'), "$.lat", "beyond a double"),
    ("/v1/checkins", escaped(checkin("x")).replace(b'"lat": -6.2', b'"lat": ' + b"1" * 5000), "$", "not JSON"),
    ("/v1/checkins", escaped(checkin("x", observed_at="9999-12-31T00:00:00Z")), "$.observed_at", "out of range"),
    ("/v1/checkins", escaped(checkin("x", observed_at=LATER)), "$.observed_at", "observed 3600 s in the future"),
    ("/v1/checkins", escaped({"checkins": [checkin("x"), checkin("y", observed_at=LATER)]}), "$.checkins[1].observed_at",
     "in the future"),
    ("/v1/acks", escaped({"citizen_id": "x", "crisis_id": "k", "status": "safe", "received_at": LATER}), "$.received_at",
     "received 3600 s in the future"),
    ("/v1/crises", escaped({"geometry": WHOLE_GLOBE}), "$.geometry", "area covers 100.0% of the globe"),
    ("/v1/crises", escaped({"geometry": FOUR_IDENTICAL}), "$.geometry", "empty geometry"),
], ids=["deep-checkin", "deep-980", "deep-crisis", "surrogate-title", "surrogate-key", "encoded-surrogate", "nul-name",
        "version-1e30", "version-2^63", "infinite-lat", "5000-digits", "checkin-9999", "checkin-ahead",
        "batch-item-ahead", "ack-ahead", "whole-globe", "four-identical-points"])
def test_the_issues_bad_input_is_422_with_field_and_reason(client: TestClient, path: str, body: bytes, field: str,
                                                           reason: str) -> None:
    headers = {**(OPERATOR if path == "/v1/crises" else INGEST), "Content-Type": "application/json"}
    response = client.post(path, content=body, headers=headers)

    assert response.status_code == 422, response.text
    assert (response.json()["error"], response.json()["field"]) == ("invalid", field)
    assert reason in response.json()["reason"]


def test_a_bow_tie_is_published_as_every_stage_will_read_it(client: TestClient, kafka_bootstrap: str,
                                                            api_topics: ApiTopics) -> None:
    response = client.post("/v1/crises", json={"title": "Banjir \U0001f30a", "geometry": BOW_TIE}, headers=OPERATOR)

    assert response.status_code == 202
    crisis = response.json()
    assert crisis["geometry"]["type"] == "MultiPolygon" and len(crisis["geometry"]["coordinates"]) == 2
    [record] = records_for(kafka_bootstrap, api_topics.crises, {crisis["crisis_id"]}, 1)
    assert decode_event(record.value, Crisis, NOW) == Crisis.from_dict(crisis)


def test_a_checkin_a_little_ahead_of_the_clock_is_accepted(client: TestClient) -> None:
    ahead = (NOW + timedelta(seconds=299)).isoformat()
    assert client.post("/v1/checkins", json=checkin(new_id(), observed_at=ahead), headers=INGEST).status_code == 202


class _BrokenPublisher:
    """A publisher failing in a way nobody foresaw (not a BrokerUnavailable)."""

    def publish(self, messages: Iterable[Outgoing]) -> int:
        raise RuntimeError("something nobody foresaw")


def test_an_unexpected_error_is_422_while_validating_and_503_elsewhere_and_counted(
        settings: Settings, publisher: Publisher, api_topics: ApiTopics) -> None:
    def broken_ids() -> str:
        raise KeyError("no ids left")

    client = TestClient(create_app(settings, publisher, CollectorRegistry(), fixed_clock, api_topics=api_topics,
                                   new_crisis_id=broken_ids))
    validating = client.post("/v1/crises", json={"geometry": SQUARE}, headers=OPERATOR)
    assert validating.status_code == 422
    assert validating.json()["reason"] == "the input could not be validated (KeyError: 'no ids left')"
    assert 'crisiswatch_api_unexpected_errors_total{step="validate"} 1.0' in client.get("/metrics").text

    broken = TestClient(create_app(settings, _BrokenPublisher(), CollectorRegistry(), fixed_clock,  # type: ignore[arg-type]
                                   api_topics=api_topics))
    publishing = broken.post("/v1/checkins", json=checkin(new_id()), headers=INGEST)
    assert publishing.status_code == 503
    assert publishing.json() == {"error": "unavailable",
                                 "reason": "unexpected RuntimeError; nothing was accepted, retry later"}
    assert publishing.headers["Retry-After"]
    metrics = broken.get("/metrics").text
    assert 'crisiswatch_api_unexpected_errors_total{step="request"} 1.0' in metrics
    assert 'crisiswatch_api_requests_total{endpoint="/v1/checkins",status="503"} 1.0' in metrics
