"""`crisiswatch replay` and `crisiswatch simulate` against the real embedded broker."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline import topics
from schemas import check

pytestmark = pytest.mark.integration


def crisiswatch(*args: str, bootstrap: str, stdin: str | None = None,
                data_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CRISISWATCH_KAFKA_BOOTSTRAP": bootstrap, "CRISISWATCH_LOG_LEVEL": "WARNING",
           **({"CRISISWATCH_DATA_DIR": str(data_dir)} if data_dir else {})}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, input=stdin, capture_output=True,
                          text=True, timeout=120, check=False)


def read_topic(bootstrap: str, topic: str) -> Iterator[tuple[bytes | None, bytes]]:
    """Every message now in ``topic``, from the beginning of each partition to its current end."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=10_000)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        ends = consumer.end_offsets(partitions)
        while any(consumer.position(tp) < ends[tp] for tp in partitions):
            polled = consumer.poll(timeout_ms=1000)
            for records in polled.values():
                for record in records:
                    yield record.key, record.value
    finally:
        consumer.close()


def mine(bootstrap: str, topic: str, marker: str) -> list[tuple[str | None, dict[str, Any]]]:
    """The messages of this test (whose value mentions ``marker``), decoded."""
    return [(None if key is None else key.decode(), json.loads(value))
            for key, value in read_topic(bootstrap, topic) if marker.encode() in value]


def test_replay_routes_each_event_type_to_its_topic_and_reports_bad_lines(kafka_bootstrap: str, tmp_path: Path) -> None:
    u = uuid.uuid4().hex[:10]
    citizen_id, crisis_id = f"rp-{u}-citizen", f"rp-{u}-crisis"
    warning_id = f"w-{uuid.uuid4().hex}"
    at = "2025-03-01T06:00:00Z"
    lines = [
        "# a replay file: one event per line",                                                               # 1
        json.dumps({"schema": "citizen/1", "citizen_id": citizen_id, "name": "Siti Rahman", "nationality": "ID",
                    "language": "id", "channels": [{"type": "email", "address": "siti@example.org"}],
                    "emergency_contacts": [], "trip": {"country": "JP", "from": "2025-02-20", "until": None},
                    "consent": {"location_tracking": True}}),                                                # 2
        json.dumps({"schema": "checkin/1", "citizen_id": citizen_id, "lat": 35.68, "lon": 139.69,
                    "observed_at": at, "source": "app", "accuracy_m": 12.0, "note_from_the_future": "kept"}),  # 3
        "",                                                                                                   # 4
        json.dumps({"schema": "checkin/1", "citizen_id": citizen_id, "lat": 123.0, "lon": 139.69,
                    "observed_at": at, "source": "app"}),                                                    # 5 bad lat
        json.dumps({"schema": "crisis/1", "crisis_id": crisis_id, "op": "upsert", "version": 1,
                    "source": "operator", "source_ref": f"op-{u}", "title": "Flooding in central Tokyo",
                    "category": "met", "severity": "severe", "urgency": "immediate", "certainty": "observed",
                    "geometry": {"type": "Polygon", "coordinates": [[[139.6, 35.6], [139.8, 35.6], [139.8, 35.8],
                                                                     [139.6, 35.8], [139.6, 35.6]]]},
                    "buffer_km": 2.0, "country_codes": ["JP"], "effective": at, "expires": None,
                    "instruction": "Move to higher ground.", "url": "https://example.org/flood", "references": []}),  # 6
        "{this is not json",                                                                                 # 7
        json.dumps({"schema": "ack/1", "citizen_id": citizen_id, "crisis_id": crisis_id, "status": "safe",
                    "received_at": at, "channel": "sms"}),                                                   # 8
        json.dumps({"schema": "ack/1", "citizen_id": citizen_id, "crisis_id": crisis_id, "status": "fine",
                    "received_at": at, "channel": "sms"}),                                                   # 9 bad status
        json.dumps({"schema": "warning/1", "warning_id": warning_id, "citizen_id": citizen_id, "crisis_id": crisis_id,
                    "crisis_version": 1, "kind": "inside", "severity": "severe", "title": "Flooding",
                    "instruction": "Move to higher ground.", "distance_km": 0.0, "lat": 35.68, "lon": 139.69,
                    "observed_at": at, "emitted_at": at}),                                                   # 10
        json.dumps({"schema": "gossip/1", "citizen_id": citizen_id}),                                        # 11 unknown
        json.dumps({"schema": "checkin/1", "citizen_id": citizen_id, "lat": 35.69, "lon": 139.70,
                    "observed_at": "2025-03-01T06:05:00Z", "source": "sms"}),                                # 12
    ]
    replay_file = tmp_path / "events.jsonl"
    replay_file.write_text("\n".join(lines) + "\n", encoding="utf-8")

    result = crisiswatch("replay", str(replay_file), bootstrap=kafka_bootstrap)

    assert result.returncode == 2, result.stderr
    reported = [int(n) for n in re.findall(r": line (\d+): ", result.stderr)]
    assert reported == [5, 7, 9, 11]
    assert "$.lat" in result.stderr and "$.status" in result.stderr and "gossip/1" in result.stderr
    assert "published 6 events" in result.stdout

    checkins = mine(kafka_bootstrap, topics.CHECKINS, citizen_id)
    assert sorted((key, e["lat"]) for key, e in checkins) == [(citizen_id, 35.68), (citizen_id, 35.69)]
    assert any(e.get("note_from_the_future") == "kept" for _, e in checkins), "lines go out as written"
    assert [e["schema"] for _, e in mine(kafka_bootstrap, topics.CITIZENS, citizen_id)] == ["citizen/1"]
    assert [(k, e["schema"]) for k, e in mine(kafka_bootstrap, topics.CRISIS_EVENTS, crisis_id)] == [(crisis_id, "crisis/1")]
    assert [(k, e["status"]) for k, e in mine(kafka_bootstrap, topics.ACKS, citizen_id)] == [(citizen_id, "safe")]
    assert [e["warning_id"] for _, e in mine(kafka_bootstrap, topics.WARNINGS, citizen_id)] == [warning_id]


def test_replay_reads_stdin_and_exits_0_when_every_line_is_valid(kafka_bootstrap: str) -> None:
    citizen_id = f"rp-{uuid.uuid4().hex[:10]}"
    line = json.dumps({"schema": "checkin/1", "citizen_id": citizen_id, "lat": -6.2, "lon": 106.8,
                       "observed_at": "2025-03-01T06:00:00+07:00", "source": "manual"})

    result = crisiswatch("replay", "-", bootstrap=kafka_bootstrap, stdin=f"# header\n\n{line}\n")

    assert result.returncode == 0, result.stderr
    assert [k for k, _ in mine(kafka_bootstrap, topics.CHECKINS, citizen_id)] == [citizen_id]


def test_simulate_registers_travellers_and_publishes_the_requested_check_ins(kafka_bootstrap: str) -> None:
    prefix = f"sim{uuid.uuid4().hex[:8]}"

    result = crisiswatch("simulate", "--citizens", "50", "--rate", "200", "--duration", "1", "--seed", "3",
                         "--countries", "JP,MY", "--id-prefix", prefix, bootstrap=kafka_bootstrap)

    assert result.returncode == 0, result.stderr
    assert "registered 50 citizens" in result.stdout and "sent 200 check-ins" in result.stdout
    citizens = mine(kafka_bootstrap, topics.CITIZENS, f'"{prefix}-')
    assert len(citizens) == 50
    assert {key for key, _ in citizens} == {f"{prefix}-{i:06d}" for i in range(50)}
    assert {e["trip"]["country"] for _, e in citizens} <= {"JP", "MY"}
    checkins = mine(kafka_bootstrap, topics.CHECKINS, f'"{prefix}-')
    assert len(checkins) == 200
    assert all(check(e) == "checkin/1" and key == e["citizen_id"] for key, e in checkins)
    assert {key for key, _ in checkins} == {key for key, _ in citizens}, "every traveller reported"


def test_simulate_and_replay_refuse_to_run_without_a_broker_unless_dry_run(tmp_path: Path) -> None:
    for verb in (("simulate", "--citizens", "5", "--duration", "1"), ("replay", str(tmp_path / "none.jsonl"))):
        result = crisiswatch(*verb, bootstrap="", data_dir=tmp_path)  # where no stack runs
        assert result.returncode == 2
        assert f"no stack runs on {tmp_path}" in result.stderr and "--dry-run" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_simulate_dry_run_writes_a_file_that_replay_accepts(kafka_bootstrap: str, tmp_path: Path) -> None:
    prefix = f"dry{uuid.uuid4().hex[:8]}"
    dry = crisiswatch("simulate", "--citizens", "10", "--rate", "100", "--duration", "0.5", "--id-prefix", prefix,
                      "--dry-run", bootstrap="")
    assert dry.returncode == 0, dry.stderr
    events = [json.loads(line) for line in dry.stdout.splitlines()]
    assert [e["schema"] for e in events] == ["citizen/1"] * 10 + ["checkin/1"] * 50
    recorded = tmp_path / "sim.jsonl"
    recorded.write_text(dry.stdout, encoding="utf-8")

    result = crisiswatch("replay", str(recorded), bootstrap=kafka_bootstrap)

    assert result.returncode == 0, result.stderr
    assert len(mine(kafka_bootstrap, topics.CHECKINS, f'"{prefix}-')) == 50
