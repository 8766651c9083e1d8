"""A full ``crisiswatch demo``, every log line of every process kept, then searched for what the demo's
citizens told the registry and where they were: names (theirs and their emergency contacts'), phone
numbers, e-mail addresses, webhook URLs, coordinates of check-ins and warnings. None may be there.

The demo's own report on stdout shows a few messages as the citizens read them ("Dear Sari", to which
address): that is output a person asked for, not a log; it is searched for coordinates and phone numbers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from pipeline.embedded import EmbeddedPostgres

pytestmark = pytest.mark.e2e


def what_the_registry_holds(data_dir: Path) -> tuple[set[str], set[str], set[str]]:
    """(names, contact details, coordinates as logged: repr of the float), read from the demo's PostgreSQL."""
    pg = EmbeddedPostgres.start(data_dir)
    try:
        with psycopg.connect(pg.url) as conn:
            citizens = conn.execute("SELECT name, channels, emergency_contacts FROM citizens").fetchall()
            places = conn.execute("SELECT lat, lon FROM checkins UNION SELECT lat, lon FROM warnings "
                                  "WHERE kind NOT IN ('pre_arrival', 'in_country')").fetchall()
    finally:
        pg.stop()
    names, contacts = set(), set()
    for name, channels, emergency in citizens:
        names.add(name)
        contacts |= {c["address"] for c in channels}
        for person in emergency:
            names.add(person["name"])
            contacts |= {person[k] for k in ("phone", "email") if person.get(k)}
    return names, contacts, {repr(float(v)) for place in places for v in place}


NUMBER = re.compile(r"(?<![\d.:])-?\d{1,3}\.\d+(?![\d.])")  # not a time of day (12:57:13.152)


def leaks(text: str, names: set[str], contacts: set[str], coordinates: set[str]) -> list[str]:
    """What of it ``text`` holds: names as words, contact details anywhere, coordinates as numbers."""
    numbers = {repr(float(n)) for n in NUMBER.findall(text)}
    found = [n for n in names if re.search(rf"(?<!\w){re.escape(n)}(?!\w)", text)]
    return sorted(found + [c for c in contacts if c in text] + sorted(numbers & coordinates))[:5]


def test_no_log_of_a_full_demo_holds_a_name_a_contact_or_a_position(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRISISWATCH_")}
    env.update({"CRISISWATCH_DATA_DIR": str(data_dir), "CRISISWATCH_LOG_LEVEL": "INFO"})
    run = subprocess.run([sys.executable, "-m", "pipeline.cli", "demo", "--travellers", "300"], env=env,
                         capture_output=True, text=True, timeout=540)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    names, contacts, coordinates = what_the_registry_holds(data_dir)
    assert len(names) > 300 and len(contacts) > 300 and len(coordinates) > 300  # the search has something to find
    logs = {path.name: path.read_text("utf-8", "replace") for path in (data_dir / "logs").glob("*.log")}
    assert {"api.log", "worker.log", "sink.log", "dispatch.log"} <= set(logs)
    logs["demo stderr"] = run.stderr
    server_log = data_dir / "postgres" / "log"
    if server_log.is_file():
        logs["postgresql"] = server_log.read_text("utf-8", "replace")
    found = {where: leaks(text, names, contacts, coordinates) for where, text in logs.items()}
    assert {where: hits for where, hits in found.items() if hits} == {}
    assert leaks(run.stdout, set(), {c for c in contacts if c.startswith("+")}, coordinates) == []
