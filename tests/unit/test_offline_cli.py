"""``crisiswatch geofence``: files in, the warning/1 lines the pipeline would emit out, no broker."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from pipeline.testing import T0, make_checkin, make_crisis, square
from schemas import check, encode


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "geofence", *map(str, args)],
                          capture_output=True, text=True, timeout=60, check=False)


def write(path: Path, lines: list[bytes | str]) -> Path:
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
    return path


def test_warnings_in_time_order_with_emitted_at_of_the_trigger(tmp_path: Path) -> None:
    area = square(106.8, -6.2, 0.1)
    crises = write(tmp_path / "crises.jsonl", [
        encode(make_crisis("flood", area, effective=T0 + timedelta(minutes=10), buffer_km=5.0)),
        encode(make_crisis("flood", None, op="cancel", version=2, effective=T0 + timedelta(hours=1))),
    ])
    checkins = write(tmp_path / "checkins.jsonl", [
        # deliberately out of order in the file: the engine sorts by observed_at
        encode(make_checkin("walker", -6.2, 106.8, observed_at=T0 + timedelta(minutes=20))),
        encode(make_checkin("resident", -6.21, 106.79, observed_at=T0)),
        encode(make_checkin("walker", -7.0, 106.8, observed_at=T0 + timedelta(minutes=5))),
        encode(make_checkin("tie", -6.2, 106.8, observed_at=T0 + timedelta(minutes=10))),  # tie: crisis first
    ])
    done = run("--crises", crises, "--checkins", checkins)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert all(check(line) == "warning/1" for line in lines)
    assert [(w["citizen_id"], w["kind"], w["emitted_at"]) for w in lines] == [
        ("resident", "inside", "2026-01-01T12:10:00Z"),
        ("tie", "entered", "2026-01-01T12:10:00Z"),
        ("walker", "entered", "2026-01-01T12:20:00Z"),
        ("resident", "all_clear", "2026-01-01T13:00:00Z"),
        ("tie", "all_clear", "2026-01-01T13:00:00Z"),
        ("walker", "all_clear", "2026-01-01T13:00:00Z"),
    ]


def test_invalid_lines_are_reported_with_their_number_and_skipped(tmp_path: Path) -> None:
    crises = write(tmp_path / "crises.jsonl", [encode(make_crisis("flood", square(0, 0, 1))), "{not json"])
    checkins = write(tmp_path / "checkins.jsonl", [
        "# a comment", "", encode(make_checkin("a", 0.0, 0.0)),
        json.dumps({"schema": "checkin/1", "citizen_id": "b", "lat": 95, "lon": 0,
                    "observed_at": "2026-01-01T12:00:00Z", "source": "app"})])
    done = run("--crises", crises, "--checkins", checkins)
    assert done.returncode == 2
    errors = done.stderr.splitlines()
    assert len(errors) == 2
    assert errors[0].startswith(f"{crises}:2: invalid crisis/1")
    assert errors[1].startswith(f"{checkins}:4: invalid checkin/1") and "$.lat" in errors[1]
    assert [json.loads(x)["citizen_id"] for x in done.stdout.splitlines()] == ["a"]


def test_missing_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    done = run("--crises", tmp_path / "nope.jsonl", "--checkins", tmp_path / "nope2.jsonl")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "no such file" in done.stderr
