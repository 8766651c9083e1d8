"""The ingest API fuzzed from the OpenAPI document it serves (schemathesis: schema-conforming and
schema-violating requests), against the real API with a real broker behind it, bounded in examples
and time.

Two promises are counted: nothing is answered with a 5xx (an unexpected error is a 4xx with a
reason, or a 503 when Kafka is away), and nothing is answered 202 that a later stage refuses: every
event the API accepted is in PostgreSQL afterwards. ``sent`` is the requests made, ``expected`` the
distinct events answered 202 (by the key PostgreSQL stores them under), ``stored`` those found in
PostgreSQL, ``duplicates`` accepted events stored as more than one row, ``lost`` accepted events not
stored. Check-ins of a citizen whose last accepted registration withholds location consent are the
exception, checked the other way: none of them may be in PostgreSQL. No process of the stack may exit
meanwhile.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import hypothesis
import psycopg
import pytest
import schemathesis
from hypothesis import HealthCheck
from schemathesis import GenerationMode

from pipeline.stack import Stack, running_stack
from pipeline.testing import square
from producers.api import parse_ack, parse_checkins, parse_citizen
from schemas import Crisis, format_time
from tests.chaos.harness import OPERATOR_TOKEN, Tally, api_post_raw, assert_exact, chaos_settings, dead_children, report, scaled

pytestmark = pytest.mark.chaos

Key = tuple[Any, ...]


@pytest.fixture(scope="module")
def stack(module_dir: Path) -> Iterator[Stack]:
    with running_stack(chaos_settings(module_dir)) as running:
        yield running


@dataclass
class Ledger:
    """What the fuzzer sent and what the API said, by the key each accepted event is stored under."""

    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)
    accepted: dict[str, set[Key]] = field(default_factory=lambda: {t: set() for t in ("checkins", "citizens", "acks", "crises")})
    tracking: dict[str, bool] = field(default_factory=dict)  # citizen -> consent of their last accepted registration

    def withheld(self) -> set[Key]:
        """Accepted check-ins that must not be stored: their citizen's last registration withholds consent
        (registered later, it deletes what was stored; earlier, the API or the sink refuses them)."""
        return {k for k in self.accepted["checkins"] if self.tracking.get(k[0]) is False}

    def record(self, path: str, request_body: bytes | None, status: int, response_body: bytes) -> None:
        self.requests += 1
        self.statuses[status] += 1
        if status >= 500:
            self.server_errors.append(f"{status} on {path}: {response_body[:200]!r} for {(request_body or b'')[:200]!r}")
        if status != 202:
            return
        body = json.loads(request_body or b"null")
        if path == "/v1/checkins":
            self.accepted["checkins"] |= {(c.citizen_id, c.observed_at, c.source) for c in parse_checkins(body, datetime.now(UTC))}
        elif path == "/v1/citizens":
            citizen = parse_citizen(body, datetime.now(UTC))
            self.accepted["citizens"].add((citizen.citizen_id,))
            self.tracking[citizen.citizen_id] = citizen.location_tracking
        elif path == "/v1/acks":
            ack = parse_ack(body, datetime.now(UTC))
            self.accepted["acks"].add((ack.citizen_id, ack.crisis_id, ack.status, ack.channel))
        elif path == "/v1/crises":
            crisis = Crisis.from_dict(json.loads(response_body))
            self.accepted["crises"].add((crisis.crisis_id, crisis.version))


STORED_UNDER = {"checkins": "citizen_id, observed_at, source", "citizens": "citizen_id",
                "acks": "citizen_id, crisis_id, status, channel", "crises": "crisis_id, version"}


def hostile_requests(now: datetime) -> list[tuple[str, bytes]]:
    """Requests a fuzzer rarely writes but an attacker does, each to be refused with a 4xx."""
    checkin = {"citizen_id": "hostile-1", "lat": 1.0, "lon": 1.0, "observed_at": format_time(now), "source": "app"}
    crisis = {"crisis_id": "hostile-c", "title": "T", "geometry": square(40.0, 40.0, 0.1)}
    citizen = {"citizen_id": "hostile-2", "name": "N", "nationality": "ID", "language": "id", "channels": [],
               "emergency_contacts": [], "consent": {"location_tracking": True}}

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj).encode()

    return [
        ("/v1/checkins", b"[" * 5000 + b"]" * 5000),
        ("/v1/checkins", b'{"checkins":' + b"[" * 990 + b"]" * 990 + b"}"),
        ("/v1/crises", dumps(crisis | {"title": "PLACEHOLDER"}).replace(b"PLACEHOLDER", b"\\ud800")),
        ("/v1/citizens", dumps(citizen | {"name": "PLACEHOLDER"}).replace(b"PLACEHOLDER", b"\\ud800")),
        ("/v1/citizens", dumps(citizen | {"name": "PLACEHOLDER"}).replace(b"PLACEHOLDER", b"a\\u0000b")),
        ("/v1/crises", dumps(crisis | {"title": "PLACEHOLDER"}).replace(b"PLACEHOLDER", b"a\\u0000b")),
        ("/v1/crises", dumps(crisis | {"version": 10**30})),
        ("/v1/crises", dumps(crisis | {"geometry": {"type": "Polygon", "coordinates": [[
            [-180, -90], [180, -90], [180, 90], [-180, 90], [-180, -90]]]}})),
        ("/v1/checkins", dumps(checkin | {"observed_at": "9999-12-31T23:59:59Z"})),
        ("/v1/checkins", dumps(checkin | {"observed_at": format_time(now + timedelta(days=1))})),
        ("/v1/checkins", dumps(checkin).replace(b'"lat": 1.0', b'"lat": NaN')),
        ("/v1/checkins", dumps(checkin | {"lat": 10**400})),
        ("/v1/checkins", b"\xff\xfe not json"),
        ("/v1/checkins", dumps([checkin] * 1001)),
    ]


def stored_keys(database_url: str) -> dict[str, Counter[Key]]:
    """Rows per key in each table (acks by reply, whatever its time: the API may have stamped it)."""
    with psycopg.connect(database_url, connect_timeout=5) as conn:
        return {table: Counter(tuple(r) for r in conn.execute(f"SELECT {columns} FROM {table}"))
                for table, columns in STORED_UNDER.items()}


def missing_from(database_url: str, accepted: dict[str, set[Key]]) -> dict[str, set[Key]]:
    stored = stored_keys(database_url)
    return {table: {k for k in keys if k not in stored[table]} for table, keys in accepted.items()}


def test_api_fuzzing_gives_no_5xx_and_loses_nothing_accepted(stack: Stack, scale: int, count_lines: list[str]) -> None:
    settings = stack.settings
    base = f"http://{settings.api_host}:{settings.api_port}"
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    headers = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}  # the operator's token opens every endpoint
    ledger = Ledger()
    stop_at = time.monotonic() + 45.0 * scale

    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        @hypothesis.given(case=schema.as_strategy(generation_mode=mode, headers=headers))
        @hypothesis.settings(max_examples=scaled(100, scale), deadline=None, database=None, derandomize=True,
                             suppress_health_check=list(HealthCheck), phases=[hypothesis.Phase.generate])
        def fuzz(case: schemathesis.Case[Any]) -> None:
            if time.monotonic() > stop_at:
                return
            response = case.call(base_url=base, timeout=30)
            body = response.request.body
            sent = body.encode() if isinstance(body, str) else body if isinstance(body, bytes) else None
            ledger.record(case.operation.path, sent, response.status_code, response.content)

        fuzz()

    hostile: list[str] = []
    for path, data in hostile_requests(datetime.now(UTC)):
        status, answer = api_post_raw(base, path, data, OPERATOR_TOKEN)
        ledger.record(path, data, status, answer)
        if not 400 <= status < 500:
            hostile.append(f"{status} for {data[:80]!r} on {path}")

    died = dead_children(stack)
    assert not died, f"processes exited during the fuzzing: {died}; see {stack.logs}"
    database_url = settings.database_url.get()
    withheld = ledger.withheld()
    ledger.accepted["checkins"] -= withheld

    def kept_without_consent() -> list[Key]:
        return [k for k in withheld if stored_keys(database_url)["checkins"][k]]

    deadline, missing = time.monotonic() + 30.0, missing_from(database_url, ledger.accepted)
    while (any(missing.values()) or kept_without_consent()) and time.monotonic() < deadline:
        time.sleep(1.0)
        missing = missing_from(database_url, ledger.accepted)
    assert not kept_without_consent(), "check-ins of citizens without location_tracking consent are stored"
    stored = stored_keys(database_url)
    expected = sum(len(keys) for keys in ledger.accepted.values())
    lost = sum(len(keys) for keys in missing.values())
    # an ack is found by reply whatever its time (the API may have stamped it), so a second reply is a second row
    twice = sum(stored[table][k] - 1 for table, keys in ledger.accepted.items() if table != "acks"
                for k in keys if stored[table][k] > 1)
    tally = Tally("api_fuzz", ledger.requests, expected, expected - lost, twice, lost,
                  f"statuses {dict(sorted(ledger.statuses.items()))}; accepted but not stored: "
                  f"{ {t: sorted(map(str, k))[:3] for t, k in missing.items() if k} }")
    report(tally, count_lines)
    assert not ledger.server_errors, f"{len(ledger.server_errors)} answers with a 5xx, e.g. {ledger.server_errors[:3]}"
    assert not hostile, f"hostile requests not refused with a 4xx: {hostile}"
    assert ledger.statuses[202] > 0 and sum(n for s, n in ledger.statuses.items() if 400 <= s < 500) > 0, ledger.statuses
    assert_exact(tally)
