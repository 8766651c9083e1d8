"""A poison flood: hundreds (``--scale`` for thousands) of bad messages written straight into every
topic the stack reads — malformed, truncated, oversized, deeply nested, of the wrong schema, with
impossible geometries, lone surrogates, NULs, huge integers, check-ins from the future — interleaved
with good traffic.

Each input must have its outcome, and the count covers both: ``expected`` is the warnings the offline
engine computes for the good messages plus one dead letter per bad message; ``stored`` the distinct
warnings in PostgreSQL plus the bad messages found in ``dlq`` (with a reason and their source topic);
``duplicates`` surplus warnings plus second dead letters of one message; ``lost`` what is missing of
either. And no process of the stack restarted: same pids, none exited.

A bow-tie (self-intersecting) polygon is not poison: the API repairs it, and so must a stage reading
it from ``crisis-events``. The same bow-tie is declared both ways over one city; both crises must warn
the same citizens the same way.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pipeline import topics
from pipeline.domain.geometry import normalise_geometry
from pipeline.lag import ROUTER_GROUP, SINK_GROUP, WORKER_GROUP
from pipeline.stack import Stack, running_stack
from pipeline.testing import make_checkin, make_crisis
from schemas import Ack, Channel, Checkin, Citizen, Crisis, Warning, decode, format_time
from tests.chaos.harness import (
    OPERATOR_TOKEN,
    Raw,
    Scenario,
    Tally,
    Workload,
    Zone,
    active_crises,
    api_post,
    assert_exact,
    chaos_settings,
    child_pids,
    combine,
    dead_children,
    exit_codes,
    geofence_config,
    publish_crises,
    read_all,
    report,
    scaled,
    stored_warnings,
    wait_consumed,
    wait_until,
    worker_urls,
)

pytestmark = pytest.mark.chaos

OCEAN = (-40.0, -140.0)  # lat, lon: where a poison crisis points, so that one wrongly taken warns nobody


@pytest.fixture(scope="module")
def stack(module_dir: Path) -> Iterator[Stack]:
    with running_stack(chaos_settings(module_dir)) as running:
        yield running


def bow_tie(zone: Zone) -> dict[str, Any]:
    """The zone's square drawn as a bow-tie: its two diagonals and two sides, crossing in the middle."""
    h, lat, lon = zone.half_deg, zone.lat, zone.lon
    return {"type": "Polygon", "coordinates": [[[lon - h, lat - h], [lon + h, lat + h], [lon + h, lat - h],
                                                [lon - h, lat + h], [lon - h, lat - h]]]}


# --- the poison --------------------------------------------------------------------------------


def valid_events(prefix: str, now: datetime) -> dict[str, dict[str, Any]]:
    """One valid event per topic, about nobody the good traffic concerns (mutated below)."""
    lat, lon = OCEAN
    crisis = make_crisis(f"{prefix}-poison-crisis", None, effective=now, country_codes=())
    crisis_dict = crisis.to_dict() | {"geometry": {"type": "Polygon", "coordinates": [[
        [lon, lat], [lon + 0.1, lat], [lon + 0.1, lat + 0.1], [lon, lat + 0.1], [lon, lat]]]}}
    citizen = Citizen(citizen_id=f"{prefix}-poison-citizen", name="Budi", nationality="ID", language="id",
                      channels=(Channel("sms", "+447700900123"),), emergency_contacts=(), location_tracking=True, trip=None)
    ack = Ack(citizen_id=f"{prefix}-poison-citizen", crisis_id=f"{prefix}-poison-crisis", status="safe",
              received_at=now, channel="app", note=None)
    warning = Warning(warning_id="w-" + "0" * 32, citizen_id=f"{prefix}-poison-citizen", crisis_id=f"{prefix}-poison-crisis",
                      crisis_version=1, kind="inside", severity="severe", title="Flooding", instruction="Move.",
                      distance_km=0.0, lat=lat, lon=lon, observed_at=now, emitted_at=now, country_codes=())
    return {
        topics.CHECKINS: make_checkin(f"{prefix}-poison-citizen", lat, lon, observed_at=now).to_dict(),
        topics.CRISIS_EVENTS: crisis_dict,
        topics.CITIZENS: citizen.to_dict(),
        topics.ACKS: ack.to_dict(),
        topics.WARNINGS: warning.to_dict(),
    }


REQUIRED_FIELD = {topics.CHECKINS: "lat", topics.CRISIS_EVENTS: "crisis_id", topics.CITIZENS: "citizen_id",
                  topics.ACKS: "status", topics.WARNINGS: "warning_id"}
TEXT_FIELD = {topics.CHECKINS: "citizen_id", topics.CRISIS_EVENTS: "title", topics.CITIZENS: "name",
              topics.ACKS: "note", topics.WARNINGS: "title"}
INT_FIELD = {topics.CHECKINS: "lat", topics.CRISIS_EVENTS: "version", topics.WARNINGS: "crisis_version"}


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def with_text(obj: dict[str, Any], name: str, text: str) -> bytes:
    """``obj`` with ``text`` in a string field, written as JSON escapes (a lone surrogate has no UTF-8)."""
    return dumps(obj | {name: "PLACEHOLDER"}).replace(b"PLACEHOLDER", text.encode("ascii"))


def mutations(topic: str, base: dict[str, Any], other: dict[str, Any], now: datetime) -> dict[str, bytes | None]:
    """Every kind of bad message for one topic, by name."""
    text = TEXT_FIELD[topic]
    out: dict[str, bytes | None] = {
        "malformed": b"\xff\xfe{not json at all",
        "truncated": dumps(base)[: len(dumps(base)) // 2],
        "empty": b"",
        "not_an_object": b"[1,2,3]",
        "nan": dumps(base).replace(b'"schema"', b'"x":NaN,"schema"', 1),
        "deeply_nested": b'{"schema":"' + base["schema"].encode() + b'","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "wrong_schema": dumps(other),
        "unknown_schema": dumps(base | {"schema": base["schema"].split("/")[0] + "/9"}),
        "missing_field": dumps({k: v for k, v in base.items() if k != REQUIRED_FIELD[topic]}),
        "lone_surrogate": with_text(base, text, "poison \\ud800 text"),
        "nul": with_text(base, text, "poison \\u0000 text"),
    }
    if topic not in (topics.CHECKINS, topics.CITIZENS):  # there a tombstone erases a citizen (pipeline/consent.py)
        out["tombstone"] = None
    if topic in INT_FIELD:
        out["huge_int"] = dumps(base | {INT_FIELD[topic]: 10**30})
    if topic == topics.CHECKINS:
        out["future"] = dumps(base | {"observed_at": format_time(now + timedelta(days=1))})
        out["far_future"] = dumps(base | {"observed_at": "9999-12-31T23:59:59Z"})
    if topic == topics.CRISIS_EVENTS:
        out["whole_globe"] = dumps(base | {"geometry": {"type": "Polygon", "coordinates": [[
            [-180, -90], [180, -90], [180, 90], [-180, 90], [-180, -90]]]}})
        out["one_point_ring"] = dumps(base | {"geometry": {"type": "Polygon", "coordinates": [[[10, 10]] * 4]}})
        out["not_a_polygon"] = dumps(base | {"geometry": {"type": "Point", "coordinates": [10, 10]}})
    return out


def oversized(base: dict[str, Any]) -> bytes:
    """Over 1 MB: more than any stage accepts, and more than a dead letter may carry as it is."""
    return dumps(base | {"padding": "x" * 1_200_000})


def poison_messages(prefix: str, count: int, now: datetime, seed: int) -> list[Raw]:
    """``count`` bad messages over every topic and every kind of badness (oversized ones: one per topic
    per hundred), each with a key of its own so its dead letter can be found."""
    valid = valid_events(prefix, now)
    names = list(valid)
    kinds = [(topic, kind, value) for i, topic in enumerate(names)
             for kind, value in mutations(topic, valid[topic], valid[names[(i + 1) % len(names)]], now).items()]
    random.Random(seed).shuffle(kinds)
    out: list[Raw] = []
    value: bytes | None
    for n in range(count):
        if n % 100 < len(names):  # oversized: a few
            topic, kind, value = names[n % 100], "oversized", oversized(valid[names[n % 100]])
        else:
            topic, kind, value = kinds[(n - (n // 100 + 1) * len(names)) % len(kinds)]
        out.append(Raw(topic, f"{prefix}-poison-{n:05d}".encode(), value, kind))
    return out


def tally_dead_letters(poison: list[Raw], dlq: list[Any], sent: int) -> Tally:
    """One dead letter per poison message, with a reason and the topic it was read from."""
    ours = {p.key: p for p in poison}
    letters = Counter(m.key for m in dlq if m.key in ours)
    proper = {m.key for m in dlq if m.key in ours
              and dict(m.headers).get(topics.DLQ_REASON_HEADER, b"").strip()
              and dict(m.headers).get(topics.DLQ_SOURCE_TOPIC_HEADER, b"").decode() == ours[m.key].topic}
    missing = [p for p in poison if p.key not in proper]
    detail = ""
    if missing:
        detail = (f"poison without a proper dead letter: {Counter((p.topic, p.kind) for p in missing).most_common(12)}"
                  f" ({sum(1 for p in missing if p.key in letters)} of them dead-lettered without a reason or topic)")
    twice = Counter((ours[k].topic, ours[k].kind) for k, n in letters.items() if n > 1)
    if twice:
        detail += f"; dead-lettered more than once: {twice.most_common(8)}"
    return Tally("dead letters", sent, len(poison), len(proper), sum(n - 1 for n in letters.values()), len(missing),
                 detail)


def test_poison_flood(stack: Stack, scale: int, count_lines: list[str]) -> None:
    settings = stack.settings
    before = child_pids(stack)

    def nobody_died() -> None:
        died = dead_children(stack)
        assert not died, f"processes exited: {died}; see {stack.logs}"

    zones = [Zone.of_city("Nairobi", "KE"), Zone.of_city("Cairo", "EG"), Zone.of_city("Lagos", "NG")]
    squares, tie = zones[:2], zones[2]
    workload = Workload("pois", zones, scaled(40, scale), 21, geofence_config(settings))
    s = Scenario("poison_flood", settings.kafka_bootstrap, settings.database_url.get(), workload,
                 lambda: worker_urls(stack), guard=nobody_died)
    poison = poison_messages("bad", scaled(300, scale), datetime.now(UTC), seed=21)
    try:
        s.prepare(squares)
        # the bow-tie, straight into crisis-events: repaired as the API repairs it, not dead-lettered
        raw_tie = make_crisis(workload.crisis_id(tie), bow_tie(tie), buffer_km=tie.buffer_km, effective=workload.now(),
                              country_codes=(tie.country_code,), title="Flooding around Lagos")
        publish_crises(s.feed, [raw_tie], worker_urls(stack), 1, guard=nobody_died)
        workload.crisis(Crisis.from_dict(raw_tie.to_dict() | {"geometry": normalise_geometry(raw_tie.geometry or {})}))
        # and the same through the API
        held = active_crises(worker_urls(stack))
        status, body = api_post(f"http://{settings.api_host}:{settings.api_port}", "/v1/crises", {
            "crisis_id": f"{workload.crisis_id(tie)}-api", "title": "Flooding around Lagos", "buffer_km": tie.buffer_km,
            "country_codes": [tie.country_code], "geometry": bow_tie(tie)}, token=OPERATOR_TOKEN)
        assert status == 202, body
        api_tie = Crisis.from_dict(body)
        wait_until(lambda: active_crises(worker_urls(stack)) == [n + 1 for n in held], 60,
                   "the workers to hold the crisis declared through the API")
        workload.crisis(api_tie)

        stream = s.stream(rounds=5, duration_s=20.0, mixed_in=poison, seed=21)
        stream.finish()
        s.settle()
        s.cancel(squares[:1])
        wait_consumed(settings.kafka_bootstrap, WORKER_GROUP, s.feed.ends_of(topics.CHECKINS, topics.CRISIS_EVENTS),
                      guard=nobody_died)
        wait_consumed(settings.kafka_bootstrap, SINK_GROUP, s.feed.ends_of(
            topics.CHECKINS, topics.CRISIS_EVENTS, topics.CITIZENS, topics.ACKS, topics.WARNINGS), guard=nobody_died)
        wait_consumed(settings.kafka_bootstrap, ROUTER_GROUP, s.feed.ends_of(topics.WARNINGS), guard=nobody_died)
        warnings = s.tally()
        letters = tally_dead_letters(poison, read_all(settings.kafka_bootstrap, topics.DLQ), s.sent)
    finally:
        s.close()
    tally = combine("poison_flood", warnings, letters)
    report(tally, count_lines)
    assert child_pids(stack) == before and not any(code is not None for code in exit_codes(stack).values()), \
        f"a process restarted: {before} -> {child_pids(stack)}, exit codes {exit_codes(stack)}"
    assert_exact(tally)
    # the raw bow-tie warned exactly as the API-repaired one did
    rows = stored_warnings(settings.database_url.get(), workload.prefix)
    by_crisis = {cid: Counter((r.citizen_id, r.kind) for r in rows if r.crisis_id == cid)
                 for cid in (raw_tie.crisis_id, api_tie.crisis_id)}
    assert by_crisis[raw_tie.crisis_id] == by_crisis[api_tie.crisis_id] and by_crisis[raw_tie.crisis_id]


def test_poison_counting_is_sound() -> None:
    """The flood holds every kind of badness for every topic, each message once, each with its own key."""
    poison = poison_messages("p", 300, datetime.now(UTC), seed=1)
    assert len({p.key for p in poison}) == 300
    kinds = {(p.topic, p.kind) for p in poison}
    for topic in TEXT_FIELD:
        assert {(topic, "oversized"), (topic, "deeply_nested"), (topic, "lone_surrogate"), (topic, "nul"),
                (topic, "truncated"), (topic, "wrong_schema")} <= kinds
        assert all(len(p.value or b"") > 1_000_000 for p in poison if p.kind == "oversized")
    assert {(topics.CHECKINS, "future"), (topics.CRISIS_EVENTS, "whole_globe"), (topics.CRISIS_EVENTS, "huge_int")} <= kinds
    valid = valid_events("p", datetime.now(UTC))
    for topic, model in ((topics.CHECKINS, Checkin), (topics.CRISIS_EVENTS, Crisis), (topics.CITIZENS, Citizen),
                         (topics.ACKS, Ack), (topics.WARNINGS, Warning)):
        decode(dumps(valid[topic]), model)  # what is mutated is valid to begin with
