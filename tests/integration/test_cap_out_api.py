"""CAP out against the real PostgreSQL: crises stored by the sink's own code, served by the API as CAP 1.2
alerts valid against the OASIS schema and as an Atom feed of the active ones; our own CAP reader
(``crisiswatch parse``) reads a served alert back into the same crisis."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import defusedxml.ElementTree as SafeET
import feedparser
import pytest
import xmlschema
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from consumers.kafka_io import Message
from consumers.sink import PostgresStore, SinkTopics, prepare
from pipeline.embedded import free_port
from pipeline.settings import Settings
from producers.api import create_app, parse_crisis
from producers.crisis_store import PostgresCrisisStore
from producers.publisher import Publisher
from schemas import Crisis, encode

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = xmlschema.XMLSchema(str(ROOT / "tests" / "fixtures" / "schemas" / "cap-1.2.xsd"))
NS = {"cap": "urn:oasis:names:tc:emergency:cap:1.2"}
SENDER = "alerts@kemlu.example"
NOW = datetime.now(UTC).replace(microsecond=0)
TOPICS = SinkTopics()
AREA = {"type": "Polygon", "coordinates": [[[28.5, 40.8], [29.5, 40.8], [29.5, 41.3], [28.5, 41.3], [28.5, 40.8]]]}


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def declared(body: dict[str, Any], at: datetime) -> Crisis:
    """A crisis as the API makes it from an operator's request at ``at`` (defaults, normalised area, countries)."""
    return parse_crisis(body, at, lambda: uid("op"))


def store(database_url: str, *crises: Crisis) -> None:
    """Through the sink's own path: admit the encoded messages as the sink does, then its batched write."""
    messages = [Message(TOPICS.crisis_events, 0, i, c.crisis_id.encode(), encode(c)) for i, c in enumerate(crises)]
    prepared = prepare(messages, TOPICS.models(), NOW)
    assert prepared.rejected == ()
    sink = PostgresStore(database_url)
    try:
        outcome = sink.write(prepared.rows)
    finally:
        sink.close()
    assert outcome.refused == []


@pytest.fixture
def client(database_url: str) -> Iterator[TestClient]:
    settings = Settings(kafka_bootstrap=f"127.0.0.1:{free_port()}", cap_sender=SENDER)  # Kafka is never used here
    crisis_store = PostgresCrisisStore(database_url)
    app = create_app(settings, Publisher(settings), CollectorRegistry(), lambda: NOW, crisis_store=crisis_store)
    try:
        yield TestClient(app)
    finally:
        crisis_store.close()


def texts(doc: bytes, path: str) -> list[str]:
    return [e.text or "" for e in SafeET.fromstring(doc).findall(path, NS)]


def test_updated_crisis_is_served_as_a_valid_cap_update(client: TestClient, database_url: str) -> None:
    crisis_id = uid("quake")
    body = {"crisis_id": crisis_id, "title": "Gempa <&> Istanbul", "category": "geo", "geometry": AREA,
            "expires": (NOW + timedelta(days=1)).isoformat(), "instruction": "Move to open ground."}
    first = declared(body, NOW - timedelta(minutes=10))
    second = declared({**body, "severity": "extreme"}, NOW - timedelta(minutes=5))
    store(database_url, first, second)

    response = client.get(f"/v1/crises/{crisis_id}.cap")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/cap+xml")
    SCHEMA.validate(response.content)
    assert texts(response.content, "cap:msgType") == ["Update"]
    assert texts(response.content, "cap:identifier") == [f"{SENDER}:{crisis_id}:{second.version}"]
    assert texts(response.content, "cap:references")[0].split(",")[1] == f"{SENDER}:{crisis_id}:{first.version}"
    assert texts(response.content, "cap:info/cap:language") == ["id-ID", "en-US"]
    assert texts(response.content, "cap:info/cap:severity") == ["Extreme", "Extreme"]
    assert texts(response.content, "cap:info/cap:headline") == ["Gempa <&> Istanbul"] * 2
    assert texts(response.content, "cap:info/cap:area/cap:geocode/cap:value") == ["TR", "TR"]


def test_crisiswatch_parse_reads_a_served_alert_back_into_the_same_crisis(client: TestClient, database_url: str,
                                                                           tmp_path: Path) -> None:
    crisis_id = uid("flood")
    original = declared({"crisis_id": crisis_id, "title": "Banjir Jakarta", "category": "met", "severity": "moderate",
                         "geometry": {"type": "Polygon", "coordinates": [[[106.7, -6.3], [106.9, -6.3], [106.9, -6.1],
                                                                          [106.7, -6.1], [106.7, -6.3]]]},
                         "expires": (NOW + timedelta(hours=6)).isoformat(), "instruction": "Avoid low ground."}, NOW)
    store(database_url, original)
    response = client.get(f"/v1/crises/{crisis_id}.cap")
    assert response.status_code == 200, response.text
    path = tmp_path / "ours.cap"
    path.write_bytes(response.content)
    run = subprocess.run([sys.executable, "-m", "pipeline.cli", "parse", str(path)], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, check=False)
    assert run.returncode == 0, run.stderr
    [line] = run.stdout.splitlines()
    parsed = json.loads(line)
    assert parsed["crisis_id"] == f"cap:{SENDER}:{SENDER}:{crisis_id}:{original.version}"
    assert parsed["op"] == "upsert"
    assert parsed["geometry"] == original.geometry
    assert parsed["country_codes"] == list(original.country_codes) == ["ID"]
    assert (parsed["severity"], parsed["urgency"], parsed["certainty"], parsed["category"]) == \
        (original.severity, original.urgency, original.certainty, original.category)
    assert (parsed["title"], parsed["instruction"]) == (original.title, original.instruction)
    assert datetime.fromisoformat(parsed["expires"]) == original.expires


def test_cancelled_crisis_gives_a_cancel_and_leaves_the_feed(client: TestClient, database_url: str) -> None:
    active_id, cancelled_id, expired_id = uid("active"), uid("cancelled"), uid("expired")
    store(database_url,
          declared({"crisis_id": active_id, "title": "Active & <listed>", "geometry": AREA}, NOW - timedelta(minutes=3)),
          declared({"crisis_id": cancelled_id, "title": "Soon cancelled", "geometry": AREA}, NOW - timedelta(minutes=3)),
          declared({"crisis_id": expired_id, "title": "Expired", "geometry": AREA,
                    "expires": (NOW - timedelta(minutes=1)).isoformat()}, NOW - timedelta(minutes=2)))
    store(database_url, declared({"crisis_id": cancelled_id, "op": "cancel"}, NOW - timedelta(minutes=1)))

    cancel = client.get(f"/v1/crises/{cancelled_id}.cap")
    assert cancel.status_code == 200, cancel.text
    SCHEMA.validate(cancel.content)
    assert texts(cancel.content, "cap:msgType") == ["Cancel"]
    assert texts(cancel.content, "cap:info/cap:responseType") == ["AllClear", "AllClear"]

    feed = client.get("/v1/cap.atom")
    assert feed.status_code == 200, feed.text
    assert feed.headers["content-type"].startswith("application/atom+xml")
    parsed = feedparser.parse(feed.content)
    assert not parsed.bozo, parsed.get("bozo_exception")
    links = {link.href for entry in parsed.entries for link in entry.links if link.type == "application/cap+xml"}
    assert f"http://testserver/v1/crises/{active_id}.cap" in links
    assert f"http://testserver/v1/crises/{cancelled_id}.cap" not in links
    assert f"http://testserver/v1/crises/{expired_id}.cap" not in links
    [entry] = [e for e in parsed.entries if e.title == "Active & <listed>"]
    # Each entry's link serves a valid alert.
    served = client.get(entry.links[0].href.removeprefix("http://testserver"))
    assert served.status_code == 200
    SCHEMA.validate(served.content)


def test_unknown_crisis_is_404_with_the_usual_error_body(client: TestClient) -> None:
    response = client.get(f"/v1/crises/{uid('nobody')}.cap")
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"


def test_unreachable_database_is_503(database_url: str) -> None:
    settings = Settings(kafka_bootstrap=f"127.0.0.1:{free_port()}")
    nowhere = PostgresCrisisStore(f"postgresql://crisiswatch@127.0.0.1:{free_port()}/crisiswatch", connect_timeout_s=2)
    client = TestClient(create_app(settings, Publisher(settings), CollectorRegistry(), lambda: NOW, crisis_store=nowhere))
    for path in ("/v1/crises/x.cap", "/v1/cap.atom"):
        response = client.get(path)
        assert response.status_code == 503, response.text
        assert response.json()["error"] == "database_unavailable"
        assert "PostgreSQL is unavailable" in response.json()["reason"]
    without = TestClient(create_app(settings, Publisher(settings), CollectorRegistry(), lambda: NOW))
    assert without.get("/v1/cap.atom").status_code == 503
