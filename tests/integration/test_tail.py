"""``crisiswatch tail`` as a user runs it, against the real broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from pipeline.embedded import create_topics, free_port
from pipeline.settings import Settings
from producers.publisher import Outgoing, Publisher, outgoing
from schemas import Warning, decode

pytestmark = pytest.mark.integration

T0 = datetime(2025, 3, 1, 8, 30, tzinfo=UTC)


def warning(crisis_id: str, citizen_id: str, kind: str, distance_km: float = 0.0,
            country_codes: tuple[str, ...] = ("ID",)) -> Warning:
    return Warning("w-" + uuid.uuid4().hex, citizen_id, crisis_id, 2, kind, "severe", "Flooding in Jakarta",  # type: ignore[arg-type]
                   "Move to higher ground", distance_km, -6.2, 106.8, T0, T0 + timedelta(minutes=3), country_codes)


def tail(bootstrap: str, *args: str, timeout_s: float = 90) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CRISISWATCH_KAFKA_BOOTSTRAP": bootstrap}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "tail", *args], env=env, text=True,
                          capture_output=True, timeout=timeout_s, check=False)


def publish(bootstrap: str, messages: list[Outgoing]) -> None:
    publisher = Publisher(Settings(), bootstrap=bootstrap)
    try:
        publisher.publish(messages)
    finally:
        publisher.close()


def test_tail_prints_matching_warnings_as_lines(kafka_bootstrap: str, fresh_topic: Callable[..., str]) -> None:
    topic, crisis_id = fresh_topic("warnings"), "flood-" + uuid.uuid4().hex[:8]
    entered = warning(crisis_id, "cit-1", "entered")
    near = warning(crisis_id, "cit-2", "near", 3.25)
    entered_again = warning(crisis_id, "cit-3", "entered")
    publish(kafka_bootstrap, [outgoing(entered, topic), Outgoing(topic, b"x", b"{broken"), outgoing(near, topic),
                              outgoing(warning("other-crisis", "cit-4", "entered"), topic),
                              outgoing(entered_again, topic)])

    result = tail(kafka_bootstrap, "--topic", topic, "--from-beginning", "--crisis", crisis_id, "--kind", "entered",
                  "--kind", "near", "--max", "3", "--wait-s", "60")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    assert sorted(line.split()[1] for line in lines) == ["entered", "entered", "near"]
    near_line = next(line for line in lines if " cit-2 " in line)
    assert near_line.split() == ["2025-03-01T08:33:00Z", "near", "cit-2", "severe", "Flooding", "in", "Jakarta",
                                 "(ID,", "3.2", "km", "away)", f"[{crisis_id}]"]
    entered_line = next(line for line in lines if " cit-1 " in line)
    assert "km" not in entered_line and "(ID)" in entered_line  # inside the area: no distance to speak of
    assert "skipping" in result.stderr and "not JSON" in result.stderr


def test_tail_json_and_kind_filter(kafka_bootstrap: str, fresh_topic: Callable[..., str]) -> None:
    topic, crisis_id = fresh_topic("warnings"), "flood-" + uuid.uuid4().hex[:8]
    wanted = warning(crisis_id, "cit-9", "all_clear")
    publish(kafka_bootstrap, [outgoing(warning(crisis_id, "cit-8", "inside"), topic), outgoing(wanted, topic)])

    result = tail(kafka_bootstrap, "--topic", topic, "--from-beginning", "--kind", "all_clear", "--json", "--max", "1",
                  "--wait-s", "60")

    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()
    assert json.loads(line)["schema"] == "warning/1"
    assert decode(line.encode(), Warning) == wanted


def test_tail_country_reads_the_per_country_topic_from_the_end(kafka_bootstrap: str) -> None:
    topic = "warnings.NZ"
    create_topics(kafka_bootstrap, [topic], 2)
    crisis_id = "quake-" + uuid.uuid4().hex[:8]
    old, new = warning(crisis_id, "cit-old", "inside", country_codes=("NZ",)), warning(crisis_id, "cit-new", "inside",
                                                                                        country_codes=("NZ",))
    publish(kafka_bootstrap, [outgoing(old, topic)])

    env = {**os.environ, "CRISISWATCH_KAFKA_BOOTSTRAP": kafka_bootstrap}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "tail", "--country", "nz", "--crisis", crisis_id,
                             "--max", "1", "--wait-s", "60"], env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        listening = proc.stderr.readline()  # tail says when it is positioned at the end
        assert "listening on warnings.NZ" in listening
        publish(kafka_bootstrap, [outgoing(new, topic)])
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert " cit-new " in out and "cit-old" not in out


@pytest.mark.parametrize(("args", "env", "message"), [
    (["--country", "Indonesia"], {"CRISISWATCH_KAFKA_BOOTSTRAP": "127.0.0.1:9"}, "--country"),
    ([], {"CRISISWATCH_KAFKA_BOOTSTRAP": "", "CRISISWATCH_DATA_DIR": "/nonexistent/crisiswatch"},
     "no stack runs on /nonexistent/crisiswatch: start one with `crisiswatch up`"),
    (["--max", "0"], {"CRISISWATCH_KAFKA_BOOTSTRAP": "127.0.0.1:9"}, "--max"),
    ([], {"CRISISWATCH_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"}, "cannot reach Kafka"),
])
def test_tail_refuses_bad_usage_with_one_line(args: list[str], env: dict[str, str], message: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "tail", *args], env={**os.environ, **env}, text=True,
                            capture_output=True, timeout=60, check=False)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
