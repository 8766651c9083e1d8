"""``crisiswatch api`` as a real process (and as a thread, as ``crisiswatch up`` runs it) on the real broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pipeline import topics
from pipeline.embedded import free_port, wait_for_port
from pipeline.settings import Secret, Settings
from pipeline.testing import records_for
from producers.api_cmd import ApiServer
from schemas import Checkin, Crisis, decode

pytestmark = pytest.mark.integration

INGEST_TOKEN = "integration-ingest-token"
OPERATOR_TOKEN = "integration-operator-token"


def checkins(n: int) -> list[dict[str, Any]]:
    return [{"citizen_id": f"it-{uuid.uuid4().hex[:12]}", "lat": 35.68, "lon": 139.76,
             "observed_at": "2025-03-01T21:00:00+09:00", "source": "app"} for _ in range(n)]


@pytest.fixture
def api_process(kafka_bootstrap: str, tmp_path: Any) -> Iterator[tuple[subprocess.Popen[bytes], str, Any]]:
    port = free_port()
    env = {**os.environ, "CRISISWATCH_KAFKA_BOOTSTRAP": kafka_bootstrap, "CRISISWATCH_API_PORT": str(port),
           "CRISISWATCH_INGEST_TOKEN": INGEST_TOKEN, "CRISISWATCH_OPERATOR_TOKEN": OPERATOR_TOKEN,
           "CRISISWATCH_LOG_LEVEL": "INFO"}
    stderr_path = tmp_path / "api.stderr"
    with open(stderr_path, "wb") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "api", "--host", "127.0.0.1"], env=env,
                                   stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_for_port("127.0.0.1", port, timeout_s=30)
        yield process, f"http://127.0.0.1:{port}", stderr_path
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_api_process_publishes_and_stops_cleanly_on_sigterm(api_process: Any, kafka_bootstrap: str) -> None:
    process, base, stderr_path = api_process
    batch = checkins(50)
    with httpx.Client(base_url=base, timeout=30) as http:
        accepted = http.post("/v1/checkins", json=batch, headers={"Authorization": f"Bearer {INGEST_TOKEN}"})
        declared = http.post("/v1/crises", headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"}, json={
            "title": "Flood in central Tokyo",
            "geometry": {"type": "Polygon", "coordinates": [[[139.7, 35.6], [139.8, 35.6], [139.8, 35.7], [139.7, 35.7]]]}})
        refused = http.post("/v1/checkins", json=batch, headers={"Authorization": "Bearer guess"})
        health = http.get("/health")
        metrics = http.get("/metrics").text

    assert accepted.status_code == 202 and accepted.json() == {"accepted": 50}
    assert declared.status_code == 202 and declared.json()["country_codes"] == ["JP"]
    assert refused.status_code == 401
    assert health.json() == {"status": "ok", "dependencies": {"kafka": "up"}}
    assert 'crisiswatch_api_events_published_total{topic="checkins"} 50.0' in metrics

    ids = {c["citizen_id"] for c in batch}
    on_topic = records_for(kafka_bootstrap, topics.CHECKINS, ids, len(ids))
    assert {decode(r.value, Checkin).citizen_id for r in on_topic} == ids
    crisis_id = declared.json()["crisis_id"]
    [crisis] = records_for(kafka_bootstrap, topics.CRISIS_EVENTS, {crisis_id}, 1)
    assert decode(crisis.value, Crisis).title == "Flood in central Tokyo"

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0

    log_lines = stderr_path.read_text().splitlines()
    assert log_lines, "the API logs structured lines"
    assert all(isinstance(json.loads(line), dict) for line in log_lines)
    assert any(json.loads(line)["msg"] == "ingest API stopped" for line in log_lines)
    assert not any(token in line for line in log_lines for token in (INGEST_TOKEN, OPERATOR_TOKEN))


def test_api_verb_refuses_to_start_without_kafka(tmp_path: Any) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRISISWATCH_")}
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "api"], env=env, capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)

    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "CRISISWATCH_KAFKA_BOOTSTRAP" in result.stderr


def test_api_server_in_a_thread_as_crisiswatch_up_runs_it(kafka_bootstrap: str) -> None:
    settings = Settings(kafka_bootstrap=kafka_bootstrap, api_port=free_port(), ingest_token=Secret(INGEST_TOKEN))
    server = ApiServer(settings)
    thread = server.start_in_thread()
    try:
        wait_for_port("127.0.0.1", settings.api_port, timeout_s=30)
        batch = checkins(3)
        response = httpx.post(f"http://127.0.0.1:{settings.api_port}/v1/checkins", json={"checkins": batch},
                              headers={"Authorization": f"Bearer {INGEST_TOKEN}"}, timeout=30)
    finally:
        server.stop()
        thread.join(timeout=30)

    assert response.status_code == 202
    assert not thread.is_alive()
    ids = {c["citizen_id"] for c in batch}
    assert len(records_for(kafka_bootstrap, topics.CHECKINS, ids, len(ids))) == 3
