"""``crisiswatch parse`` as a user runs it: a subprocess, JSON lines out, one line per problem on stderr."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from schemas import check

REPO = Path(__file__).resolve().parents[3]
FIXTURES = REPO / "tests" / "fixtures" / "feeds"
SAMPLES = REPO.parent / "shared" / "samples"


def crisiswatch_parse(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    executable = shutil.which("crisiswatch", path=str(Path(sys.executable).parent))
    command = [executable] if executable else [sys.executable, "-m", "pipeline.cli"]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CRISISWATCH_")} | (env or {})
    return subprocess.run([*command, "parse", *map(str, args)], capture_output=True, text=True, timeout=120,
                          env=environment, cwd=REPO, check=False)


def events_of(stdout: str) -> list[dict[str, Any]]:
    events = [json.loads(line) for line in stdout.splitlines()]
    for event in events:
        assert check(event) == "crisis/1"
    return events


def test_cap_documents_print_one_valid_event_per_line() -> None:
    done = crisiswatch_parse("--at", "2024-01-15T12:00:00+07:00", FIXTURES / "cap" / "cap12_polygon_alert_jakarta_flood.xml",
                             FIXTURES / "cap" / "cap12_cancel_without_info.xml")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    events = events_of(done.stdout)
    assert [(e["crisis_id"], e["op"]) for e in events] == [
        ("cap:alerts@crisiswatch.example:CW-JKT-FL-20240115-001", "upsert"),
        ("cap:ops@crisiswatch.example:CW-ALERT-0041", "cancel"),
    ]
    assert events[0]["geometry"]["type"] == "Polygon" and events[1]["geometry"] is None


def test_item_rejections_are_one_line_each_and_do_not_fail_the_file() -> None:
    done = crisiswatch_parse(FIXTURES / "cap" / "edxlde_three_alerts_one_broken.xml")
    assert done.returncode == 0
    assert len(events_of(done.stdout)) == 2
    assert done.stderr.splitlines() == [
        f"{FIXTURES / 'cap' / 'edxlde_three_alerts_one_broken.xml'}: rejected 2024-09-14T04:30:00-00:00:880003: "
        "sent 'yesterday afternoon' is not a date-time with an offset"]


def test_an_event_the_stages_would_refuse_is_not_printed_but_reported(tmp_path: Path) -> None:
    week = FIXTURES / "usgs" / "week.geojson"  # origin times around 2023-11-14
    doc = json.loads(week.read_text())
    doc["features"][0]["properties"]["title"] = "Quake \u0000 near the coast"
    path = tmp_path / "usgs.geojson"
    path.write_text(json.dumps(doc), encoding="utf-8")
    everything = crisiswatch_parse("--at", "2023-11-15T00:00:00Z", week)

    done = crisiswatch_parse("--at", "2023-11-15T00:00:00Z", path)

    assert done.returncode == 0
    printed = {e["crisis_id"] for e in events_of(done.stdout)}
    assert printed == {e["crisis_id"] for e in events_of(everything.stdout)} - {"usgs:us7000abcd"} and printed
    assert f"{path}: rejected usgs:us7000abcd: produced an invalid crisis/1 event ($.title: NUL (U+0000) is not allowed " \
           "in text)" in done.stderr.splitlines()


def test_exercise_flag_and_environment_keep_exercise_alerts() -> None:
    path = FIXTURES / "cap" / "cap12_exercise_polygon.xml"
    dropped = crisiswatch_parse(path)
    assert dropped.returncode == 0 and dropped.stdout == ""
    assert "not an actual alert" in dropped.stderr
    for kept in (crisiswatch_parse("--exercise", path), crisiswatch_parse(path, env={"CRISISWATCH_EXERCISE_MODE": "true"})):
        assert kept.returncode == 0
        [event] = events_of(kept.stdout)
        assert event["status"] == "exercise"


def test_rejected_files_give_exit_2_with_one_line_each_and_the_others_still_print() -> None:
    missing = FIXTURES / "does-not-exist.xml"
    bomb = FIXTURES / "hostile" / "billion_laughs.xml"
    good = FIXTURES / "cap" / "cap12_polygon_alert_jakarta_flood.xml"
    done = crisiswatch_parse("--at", "2024-01-15T12:00:00+07:00", missing, bomb, good)
    assert done.returncode == 2
    assert len(events_of(done.stdout)) == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{missing}: cannot read")
    assert lines[1].startswith(f"{bomb}: XML refused: entity declarations")
    assert "Traceback" not in done.stderr


def test_unknown_format_is_a_one_line_refusal(tmp_path: Path) -> None:
    odd = tmp_path / "odd.txt"
    odd.write_text("hello, world\n")
    done = crisiswatch_parse(odd)
    assert done.returncode == 2
    assert done.stderr.strip() == f"{odd}: unknown document format (not CAP, GDACS, USGS GeoJSON, RSS/Atom or a travel-advisory list)"


def test_forced_format_that_does_not_fit_is_refused() -> None:
    done = crisiswatch_parse("--format", "cap", FIXTURES / "news" / "rss_id_berita.xml")
    assert done.returncode == 2
    assert done.stderr.endswith("without any CAP content: not a CAP feed\n")


def test_news_events_print_and_review_items_are_listed() -> None:
    path = FIXTURES / "news" / "rss_id_berita.xml"
    done = crisiswatch_parse("--at", "2022-11-22T12:00:00+07:00", path)
    assert done.returncode == 0
    assert {e["title"] for e in events_of(done.stdout)} == {
        "Gempa M5,6 guncang Cianjur, 162 orang tewas", "Banjir di Semarang, ribuan warga mengungsi"}
    review_lines = [line for line in done.stderr.splitlines() if ": review rss:" in line]
    assert len(review_lines) == 2
    with_review = crisiswatch_parse("--at", "2022-11-22T12:00:00+07:00", "--include-review", path)
    assert len(events_of(with_review.stdout)) == 4


def test_language_choice_and_notes() -> None:
    done = crisiswatch_parse("--language", "id", "--notes", FIXTURES / "cap" / "cap12_multilingual_id_en.xml",
                             FIXTURES / "cap" / "atom_inline_lonlat_swapped_circles.atom.xml")
    assert done.returncode == 0
    events = events_of(done.stdout)
    assert events[0]["language"] == "id-ID"
    assert sum("read as lon,lat and swapped" in line for line in done.stderr.splitlines()) == 3


def test_bad_options_are_refused() -> None:
    assert crisiswatch_parse("--geocoder", "no-such-service", FIXTURES / "news" / "rss_id_berita.xml").returncode == 2
    assert crisiswatch_parse("--min-confidence", "3", FIXTURES / "news" / "rss_id_berita.xml").returncode == 2


def test_every_cap_and_news_sample_parses_to_valid_events() -> None:
    paths = sorted((SAMPLES / "cap").glob("*.xml")) + sorted((SAMPLES / "tricky").glob("*.xml")) + sorted(
        (SAMPLES / "news").glob("*.xml"))
    if not paths:
        pytest.skip("shared samples not present")
    done = crisiswatch_parse("--include-expired", *paths)  # documents of many dates: judge every item
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    events = events_of(done.stdout)
    assert len(events) >= 70  # 59 from the NSW RFS envelope alone


def test_at_reads_an_archived_feed_as_it_was() -> None:
    week = FIXTURES / "usgs" / "week.geojson"  # origin times around 2023-11-14
    today = events_of(crisiswatch_parse(week).stdout)
    then = crisiswatch_parse("--at", "2023-11-15T00:00:00Z", week)
    assert then.returncode == 0 and "rejected us7000bad1" in then.stderr  # a bad item does not fail the file
    assert today == []  # everything in it expired long ago
    assert "usgs:us7000abcd" in {e["crisis_id"] for e in events_of(then.stdout)}
    refused = crisiswatch_parse("--at", "2023-11-15 noon", week)
    assert refused.returncode == 2 and "RFC 3339" in refused.stderr


@pytest.mark.parametrize(("path", "at", "event"), [
    (FIXTURES / "cap" / "cap12_polygon_alert_jakarta_flood.xml", "2024-01-15T12:00:00+07:00",
     "cap:alerts@crisiswatch.example:CW-JKT-FL-20240115-001"),
    (FIXTURES / "usgs" / "week.geojson", "2023-11-15T00:00:00Z", "usgs:us7000abcd"),
    (FIXTURES / "gdacs" / "rss_current.xml", "2023-11-15T00:00:00Z", "gdacs:TC:1000900"),
])
def test_expiry_is_judged_alike_for_every_format_and_counted_on_stderr(path: Path, at: str, event: str) -> None:
    then = crisiswatch_parse("--at", at, path)
    assert event in {e["crisis_id"] for e in events_of(then.stdout)}
    later = crisiswatch_parse("--at", "2030-01-01T00:00:00Z", path)  # long after every item expired
    assert later.returncode == 0
    assert [e for e in events_of(later.stdout) if e["op"] == "upsert"] == []
    [summary] = [line for line in later.stderr.splitlines() if ": left out " in line]
    assert summary.startswith(f"{path}: left out ") and "expired as of 2030-01-01T00:00:00+00:00" in summary
    assert event in {e["crisis_id"] for e in events_of(crisiswatch_parse(
        "--at", "2030-01-01T00:00:00Z", "--include-expired", path).stdout)}


def test_items_that_are_no_crisis_are_counted_by_kind() -> None:
    done = crisiswatch_parse("--at", "2024-10-01T12:00:00Z", FIXTURES / "news" / "rss_quiet_no_cyclones.xml")
    assert done.returncode == 0 and events_of(done.stdout) == []
    assert done.stderr.splitlines() == [
        f"{FIXTURES / 'news' / 'rss_quiet_no_cyclones.xml'}: left out 2 items: 1 item naming no hazard (outlooks, "
        "explainers), 1 item saying there is nothing to report (e.g. 'no active cyclones')"]


def test_a_cap_index_of_links_is_no_error_and_says_what_it_left_out(tmp_path: Path) -> None:
    index = tmp_path / "index.atom"
    index.write_text("""<?xml version="1.0" encoding="UTF-8"?>
<feed xmlns="http://www.w3.org/2005/Atom" xmlns:cap="urn:oasis:names:tc:emergency:cap:1.2">
  <title>Alerts index</title><id>urn:index</id><updated>2024-01-15T00:00:00Z</updated>
  <entry><id>urn:a1</id><title>Flood warning</title><updated>2024-01-15T00:00:00Z</updated>
    <link rel="alternate" type="application/cap+xml" href="https://alerts.example/a1.xml"/></entry>
  <entry><id>urn:a2</id><title>Wind warning</title><updated>2024-01-15T00:00:00Z</updated>
    <link rel="alternate" type="application/cap+xml" href="https://alerts.example/a2.xml"/></entry>
</feed>
""", encoding="utf-8")
    done = crisiswatch_parse("--format", "cap", index)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [f"{index}: left out 2 items: 2 index entries that only link elsewhere"]
