"""``crisiswatch demo``: the stack plus a scripted scenario, then a summary; exit 0 when the
pipeline did exactly what the offline engine says it must.

The scenario (a few thousand simulated travellers around real cities, from GeoNames data):

1. every traveller registers (``citizen/1``) and checks in where they are;
2. a flash-flood warning for central Kuala Lumpur arrives as a CAP 1.2 document, parsed by the
   CAP parser → those already inside or within its 5 km band are warned (``inside``/``near``);
3. an operator draws an area over central Tokyo through the ingest API (``POST /v1/crises``);
4. travellers move: some walk into the flooded area (``entered``), some leave the Tokyo area and
   stay away past the dwell time (``exited``);
5. the operator cancels the Tokyo crisis → ``all_clear`` to everyone warned about it;
6. travellers warned of the flood reply "safe" or "need help" through each path a citizen has —
   the app (``POST /v1/acks``), an SMS keyword (``AMAN``/``TOLONG`` to the inbound-SMS webhook, matched
   to the sender's registered number) and the one-tap link in the message they received (the reply
   page) — and the flood's ``crisis-status`` counts move by exactly those replies;
7. a small, moderate crisis (a gas leak around a traveller in central Tokyo) with the demo's escalation delays (seconds, not
   the production hours): a few warned travellers answer, the silent ones get the warning again
   through their next channel after T1 and are escalated to the embassy (a case) after T2; then it
   is cancelled.

The same events are applied, phase by phase, to the offline engine (``pipeline.domain.timeline``);
the warnings that reach Kafka must be exactly those, and every one of them must be in PostgreSQL.

The stack's dispatcher delivers every one of those warnings to a mail server and a webhook receiver
run by the demo itself on loopback (:mod:`pipeline.demo_receivers`): most travellers registered a
webhook (their travel desk's) first and an email address second, one in four the other way round, and
an SMS number last (for their replies). Each warning must arrive exactly once, through its citizen's
first channel, with a valid signature — a warning re-sent for a silent citizen once more, through the
next channel — and the ``deliveries`` table must agree; the summary shows a few of the messages as the
citizens read them, in Bahasa Indonesia and English, and each crisis's accountability counts
(``GET /v1/crises/{id}/status``), which must equal the same counts recomputed from PostgreSQL.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any, Final

from pipeline import topics
from pipeline.demo_receivers import Delivered, Receivers
from pipeline.domain.accountability import COUNT_NAMES, COUNTS_SQL
from pipeline.domain.escalation import parse_rules
from pipeline.domain.feeds import ParseContext, parse_document
from pipeline.domain.timeline import Timeline
from pipeline.domain.tracking import GeofenceConfig
from pipeline.domain.travellers import City, TravellerModel
from pipeline.observability import read_metric
from pipeline.settings import Secret, Settings
from pipeline.stack import Stack, StackError
from producers.publisher import Publisher
from schemas import Checkin, Citizen, Crisis, InvalidEvent, Warning, decode
from schemas.models import Channel

KL_FLOOD = (3.100, 3.190, 101.640, 101.730)  # lat_min, lat_max, lon_min, lon_max of the CAP polygon
TOKYO_AREA = {"type": "Polygon", "coordinates": [[[139.66, 35.66], [139.74, 35.66], [139.74, 35.72],
                                                  [139.66, 35.72], [139.66, 35.66]]]}
YOKOHAMA = (35.4437, 139.6380)
EMAIL_EVERY = 4  # one traveller in four registered an email address first, the others a webhook
# Production delays for the severe and extreme crises (nothing of theirs escalates within the demo);
# seconds for the moderate one the demo declares to show escalation.
DEMO_ESCALATION: Final = "extreme:15m,1h;severe:1h,6h;moderate:10s,20s"
REPLIES_PER_PATH: Final = 20
REPLY_LINK = re.compile(r"https?://\S+/r/[A-Za-z0-9_.\-]+")
ZONE_KINDS: Final = frozenset({"inside", "entered", "near"})
UNTRACKED_EVERY = 25  # one traveller in 25 registered without location consent: no check-ins, warned by their trip
# Warnings by registered trip (pre-arrival; in-country for travellers without location consent) come from the
# dispatcher's periodic sweep, on its own clock: they are not what the offline engine models, so the checks
# below leave them out (they are delivered all the same).
TRIP_KINDS = ("pre_arrival", "in_country")


DEMO_DATA_DIR = Path(".crisiswatch-demo")  # unless CRISISWATCH_DATA_DIR says otherwise


def in_demo_dir(settings: Settings) -> Settings:
    """The demo's own data directory unless the user chose one: its simulated citizens and warnings
    stay out of the database `crisiswatch up` uses."""
    return settings if "CRISISWATCH_DATA_DIR" in settings.configured else replace(settings, data_dir=DEMO_DATA_DIR)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--travellers", type=int, default=3000, help="simulated travellers (default 3000)")
    parser.add_argument("--seed", type=int, default=7, help="random seed of the scenario")


class WarningCollector(threading.Thread):
    """Reads ``warnings`` from the beginning and stamps each with its arrival time; a warning published
    again for a silent citizen (escalation, ``crisiswatch-resend`` header) is kept apart in ``resent``."""

    def __init__(self, settings: Settings, prefix: str) -> None:
        super().__init__(name="warning-collector", daemon=True)
        self.settings = settings
        self.prefix = prefix
        self.received: list[tuple[Warning, float]] = []
        self.resent: list[Warning] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        from kafka import KafkaConsumer, TopicPartition

        consumer = KafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap, enable_auto_commit=False, fetch_max_wait_ms=20,
                                 **self.settings.kafka_client_options())
        parts = consumer.partitions_for_topic("warnings") or set()
        tps = [TopicPartition("warnings", p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        while not self.stop.is_set():
            for records in consumer.poll(timeout_ms=100).values():
                now = time.time()
                for record in records:
                    warning = decode(record.value, Warning)
                    if warning.citizen_id.startswith(self.prefix) and warning.kind not in TRIP_KINDS:
                        with self.lock:
                            if (topics.RESEND_HEADER, topics.RESEND_NEXT_CHANNEL) in (record.headers or []):
                                self.resent.append(warning)
                            else:
                                self.received.append((warning, now))
        consumer.close()

    def count(self) -> int:
        with self.lock:
            return len(self.received)


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(poll_s)


def api_post(base: str, path: str, token: str, body: Any) -> Any:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    request = urllib.request.Request(  # noqa: S310 - loopback URL we built
        base + path, data=json.dumps(body).encode(), method="POST", headers=headers)
    with urllib.request.urlopen(request, timeout=15) as response:  # noqa: S310 - loopback URL we built
        return json.loads(response.read())


def api_get(base: str, path: str, token: str) -> Any:
    request = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {token}"})  # noqa: S310 - loopback
    with urllib.request.urlopen(request, timeout=15) as response:  # noqa: S310 - loopback URL we built
        return json.loads(response.read())


def answer_link(url: str, status: str) -> None:
    """What a citizen does with the link in their message: opens the page, taps one of its two buttons."""
    with urllib.request.urlopen(url, timeout=15) as page:  # noqa: S310 - the API's own link, on loopback
        if page.status != 200 or b"<form" not in page.read():
            raise RuntimeError(f"the reply page {url} did not show its buttons")
    request = urllib.request.Request(url, data=urllib.parse.urlencode({"status": status}).encode(), method="POST",  # noqa: S310
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    with urllib.request.urlopen(request, timeout=15) as answered:  # noqa: S310 - the API's own link, on loopback
        if answered.status != 200:
            raise RuntimeError(f"the reply page {url} answered {answered.status}")


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def cap_flood(now: datetime, identifier: str) -> Crisis:
    template = resources.files("pipeline").joinpath("scenario", "flash_flood_kuala_lumpur.cap.xml").read_text("utf-8")
    document = template.format(sent=now.isoformat(timespec="seconds"), identifier=identifier,
                               expires=(now + timedelta(hours=6)).isoformat(timespec="seconds"))
    result = parse_document(document.encode("utf-8"), "auto", ParseContext(now=now))
    if len(result.events) != 1:
        raise RuntimeError(f"the scenario's CAP document gave {len(result.events)} events: {result.rejected}")
    return result.events[0]


def crises_on_the_broker(settings: Settings, timeout_s: float = 30.0) -> list[Crisis]:
    """The crisis events already on ``crisis-events`` when the scenario starts: those the stack
    restored from PostgreSQL (an earlier run's crisis still in force), or a shared Kafka's. The
    worker knows them, so the offline engine must too."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                             **settings.kafka_client_options())
    try:
        tps = [TopicPartition(topics.CRISIS_EVENTS, p)
               for p in sorted(consumer.partitions_for_topic(topics.CRISIS_EVENTS) or ())]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        found: list[Crisis] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            batches = consumer.poll(timeout_ms=300)
            for record in (r for batch in batches.values() for r in batch):
                with contextlib.suppress(InvalidEvent):  # the worker dead-letters those and knows them not
                    found.append(decode(record.value or b"", Crisis))
            if not batches and all(consumer.position(tp) >= ends[tp] for tp in tps):
                return found
        raise TimeoutError(f"crisis-events not read to its end in {timeout_s:.0f}s")
    finally:
        consumer.close()


def square_around(lat: float, lon: float, half_deg: float) -> dict[str, Any]:
    x0, x1, y0, y1 = lon - half_deg, lon + half_deg, lat - half_deg, lat + half_deg
    return {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}


@dataclass
class Replies:
    """The flood's replies by path (``app``, ``sms``, ``link``) and answer, and its counts before and after."""

    crisis_id: str
    before: dict[str, int]
    after: dict[str, int] = field(default_factory=dict)
    by_path: Counter[tuple[str, str]] = field(default_factory=Counter)
    asked_for_help: int = 0
    help_cases: int = 0  # need_help cases opened for them (GET /v1/cases)
    problems: list[str] = field(default_factory=list)


@dataclass
class EscalationReport:
    """The escalation crisis: who was warned, who answered at once, what happened to the silent."""

    crisis_id: str
    title: str
    rule: str
    warned: list[str]
    answered: list[str]
    silent: list[str]
    resent: set[str] = field(default_factory=set)  # citizens whose warning was published again
    resent_channels: Counter[str] = field(default_factory=Counter)  # the next channel that delivered it
    cases: set[str] = field(default_factory=set)  # citizens with an escalation case (GET /v1/cases)
    case_countries: Counter[str] = field(default_factory=Counter)
    status: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def inside_box(c: Checkin, box: tuple[float, float, float, float]) -> bool:
    return box[0] < c.lat < box[1] and box[2] < c.lon < box[3]


class Scenario:
    def __init__(self, stack: Stack, travellers: int, seed: int, webhook_base: str) -> None:
        self.stack = stack
        self.webhook_base = webhook_base
        self.settings = stack.settings
        self.run_id = f"demo{int(time.time()) % 100000:05d}"
        self.rng = random.Random(seed)
        self.start = datetime.now(UTC)
        from producers.cities import find_city, load_cities

        kl, tokyo = find_city("Kuala Lumpur", "MY"), find_city("Tokyo", "JP")
        self.model = TravellerModel(load_cities(min_population=500_000), max(travellers - 2 * (travellers * 2 // 5), 0),
                                    seed, self.start, id_prefix=self.run_id)
        self.model.add_cluster(City(kl.name, kl.country_code, 3.145, 101.685, kl.population), travellers * 2 // 5,
                               radius_km=12.0, roam=False)
        self.model.add_cluster(City(tokyo.name, tokyo.country_code, 35.69, 139.70, tokyo.population),
                               travellers * 2 // 5, radius_km=10.0, roam=False)
        self.mirror = Timeline(GeofenceConfig(self.settings.hysteresis_m, self.settings.dwell_seconds))
        for known in crises_on_the_broker(self.settings):  # as the worker loads them at start
            if known.op == "cancel":
                self.mirror.tracker.end(known.crisis_id, known.version)
            else:
                self.mirror.tracker.accept(known, self.start)
        self.publisher = Publisher(self.settings, client_id="crisiswatch-demo")
        self.collector = WarningCollector(self.settings, self.run_id)
        self.sent_at: dict[str, float] = {}  # citizen -> when their latest check-in was published
        self.checkins_sent = 0
        self.api = f"http://{self.settings.api_host}:{self.settings.api_port}"
        self.worker_metrics = f"http://{self.settings.api_host}:{self.settings.worker_web_port}/metrics"
        self.crises: list[str] = []
        self.acks = 0
        self._mirror: list[Warning] = []
        self.sms_numbers: dict[str, str] = {}
        self.cancelled = 0
        self.flood_id = ""
        self.untracked: set[str] = set()  # travellers without location_tracking consent: their phones do not report

    def with_demo_channel(self, index: int, citizen: Citizen) -> Citizen:
        """The citizen's channels replaced by ones the demo receives: the travel desk's webhook first and
        an email address second, or (one in ``EMAIL_EVERY``) the other way round; then an SMS number, which
        only their replies use (their language is the model's). One in ``UNTRACKED_EVERY`` registered without
        location consent."""
        email = Channel("email", f"{citizen.citizen_id.lower()}@example.org")
        webhook = Channel("webhook", f"{self.webhook_base}/travel-desk/{citizen.citizen_id}")
        number = f"+628{self.run_id[-5:]}{index:05d}"  # E.164, one per traveller and run
        self.sms_numbers[citizen.citizen_id] = number
        first, second = (email, webhook) if index % EMAIL_EVERY == 0 else (webhook, email)
        return replace(citizen, channels=(first, second, Channel("sms", number)),
                       location_tracking=index % UNTRACKED_EVERY != UNTRACKED_EVERY - 1)

    def publish_checkins(self, checkins: list[Checkin]) -> None:
        checkins = [c for c in checkins if c.citizen_id not in self.untracked]
        stamp = time.time()
        self.publisher.publish_events(checkins)
        for c in checkins:
            self.sent_at[c.citizen_id] = stamp
        self.checkins_sent += len(checkins)
        self._mirror.extend(self.mirror.checkins(checkins))

    def crisis(self, crisis: Crisis) -> None:
        self._mirror.extend(self.mirror.crisis(crisis, datetime.now(UTC)))
        self.crises.append(crisis.crisis_id)
        self.cancelled += int(crisis.op == "cancel")

    def settle(self, what: str) -> None:
        wait_for(lambda: read_metric(self.worker_metrics, "crisiswatch_checkins_processed_total") >= self.checkins_sent, 60,
                 f"the worker to process {self.checkins_sent} check-ins ({what})")
        wait_for(lambda: self.collector.count() >= len(self._mirror), 60,
                 f"{len(self._mirror)} warnings ({what}); {self.collector.count()} arrived")

    def play(self) -> None:
        self.collector.start()
        at = self.start
        citizens = [self.with_demo_channel(i, c) for i, c in enumerate(self.model.citizens())]
        self.publisher.publish_events(citizens)
        self.untracked = {c.citizen_id for c in citizens if not c.location_tracking}
        print(f"  {len(citizens)} travellers registered, {len(self.untracked)} of them without location consent "
              "(not tracked: warned by the country of their trip)", flush=True)
        self.publish_checkins([self.model.checkin(c.citizen_id, at) for c in citizens])
        self.settle("first check-ins")
        # The dispatcher reads a citizen's channels from PostgreSQL: the registry is there before any warning.
        wait_for(lambda: self.database_counts()["citizens"] >= len(citizens), 60, "the citizens in PostgreSQL")
        print(f"  {self.checkins_sent} check-ins geofenced", flush=True)

        flood = cap_flood(datetime.now(UTC), f"MD-{self.run_id}")
        self.publisher.publish_events([flood])
        self.crisis(flood)
        self.flood_id = flood.crisis_id
        self.settle("the CAP flood warning")
        print(f"  CAP alert {flood.crisis_id}: {len(self._mirror)} warnings so far", flush=True)

        token = self.settings.operator_token.get()
        tokyo = api_post(self.api, "/v1/crises", token, {
            "crisis_id": f"op-{self.run_id}-tokyo", "title": "Building collapse and gas leak: central Tokyo",
            "category": "infra", "severity": "extreme", "buffer_km": 3.0, "country_codes": ["JP"],
            "instruction": "Leave the area on foot and avoid the subway.", "geometry": TOKYO_AREA})
        tokyo_crisis = Crisis.from_dict(tokyo)
        self.crisis(tokyo_crisis)
        self.settle("the operator's Tokyo crisis")
        print(f"  operator crisis {tokyo_crisis.crisis_id}: {len(self._mirror)} warnings so far", flush=True)

        at = datetime.now(UTC)
        positions = {cid: s for cid, s in self.mirror.states.items() if cid.startswith(self.run_id)}
        kl_out = [cid for cid, s in positions.items()
                  if not (KL_FLOOD[0] < s.lat < KL_FLOOD[1] and KL_FLOOD[2] < s.lon < KL_FLOOD[3])
                  and abs(s.lat - 3.145) < 0.3 and abs(s.lon - 101.685) < 0.3]
        movers_in = self.rng.sample(kl_out, min(150, len(kl_out)))
        moves: list[Checkin] = []
        for cid in movers_in:
            lat = self.rng.uniform(KL_FLOOD[0] + 0.01, KL_FLOOD[1] - 0.01)
            lon = self.rng.uniform(KL_FLOOD[2] + 0.01, KL_FLOOD[3] - 0.01)
            moves += self.model.move_into(cid, lat, lon, at)
        tokyo_in = [w.citizen_id for w in self._mirror if w.crisis_id == tokyo_crisis.crisis_id and w.kind == "inside"]
        leavers = self.rng.sample(tokyo_in, min(100, len(tokyo_in)))
        dwell = timedelta(seconds=self.settings.dwell_seconds + 1)
        for cid in leavers:
            moves += self.model.move_into(cid, *YOKOHAMA, at)
        self.publish_checkins(moves)
        self.settle("travellers moving")
        self.publish_checkins([self.model.checkin(cid, at + dwell) for cid in leavers])
        self.settle("travellers staying away")
        print(f"  {len(movers_in)} walked into the flood, {len(leavers)} left the Tokyo area", flush=True)

        cancel = api_post(self.api, "/v1/crises", token, {"crisis_id": tokyo_crisis.crisis_id, "op": "cancel"})
        self.crisis(Crisis.from_dict(cancel))
        self.settle("the cancel")
        print(f"  {tokyo_crisis.crisis_id} cancelled", flush=True)

    def database_counts(self) -> dict[str, int]:
        import psycopg

        like = self.run_id + "%"
        counts: dict[str, int] = {}
        with psycopg.connect(self.settings.database_url.get()) as conn:
            for table in ("warnings", "citizens", "checkins", "acks"):
                by_trip = " AND kind <> ALL(%s)" if table == "warnings" else ""
                row = conn.execute(f"SELECT count(*) FROM {table} WHERE citizen_id LIKE %s{by_trip}",
                                   (like, list(TRIP_KINDS)) if by_trip else (like,)).fetchone()
                counts[table] = int(row[0]) if row else 0
        return counts

    def delivery_counts(self) -> Counter[tuple[str, str]]:
        """The ``deliveries`` rows of this run's citizens, by (channel, status)."""
        import psycopg

        with psycopg.connect(self.settings.database_url.get()) as conn:
            rows = conn.execute("SELECT channel, status, count(*) FROM deliveries WHERE citizen_id LIKE %s "
                                "AND warning_id IN (SELECT warning_id FROM warnings WHERE citizen_id LIKE %s "
                                "AND kind <> ALL(%s)) GROUP BY channel, status",
                                (self.run_id + "%", self.run_id + "%", list(TRIP_KINDS))).fetchall()
        return Counter({(str(channel), str(status)): int(n) for channel, status, n in rows})

    def warning_ids(self) -> set[str]:
        with self.collector.lock:
            return {w.warning_id for w, _ in self.collector.received}

    def wait_for_dispatch(self, receivers: Receivers, timeout_s: float = 180.0) -> None:
        """Until every warning of the run reached a receiver and its row says ``delivered`` (or the
        deadline: the summary then says what is missing)."""
        wanted = self.warning_ids()
        expected = len(wanted) + len(self.resent_ids())  # a re-sent warning once more, through the next channel

        def complete() -> bool:
            arrived = {(d.warning_id, d.channel) for d in receivers.inbox.snapshot() if d.warning_id in wanted}
            return wanted <= {w for w, _ in arrived} and len(arrived) >= expected and sum(
                n for (_, status), n in self.delivery_counts().items() if status == "delivered") >= expected

        with contextlib.suppress(TimeoutError):
            wait_for(complete, timeout_s, "the dispatcher", poll_s=0.3)

    def resent_ids(self) -> set[str]:
        with self.collector.lock:
            return {w.warning_id for w in self.collector.resent}

    # -- replies and escalation ---------------------------------------------------------------------

    def counts_in_database(self, crisis_id: str) -> dict[str, int]:
        """The crisis's counts recomputed from PostgreSQL's tables (what the agent's must equal)."""
        import psycopg

        with psycopg.connect(self.settings.database_url.get()) as conn:
            row = conn.execute(COUNTS_SQL, {"crisis_id": crisis_id}).fetchone()
        return dict(zip(COUNT_NAMES, (int(v) for v in row or (0,) * len(COUNT_NAMES)), strict=True))

    def served_status(self, crisis_id: str) -> dict[str, Any]:
        path = f"/v1/crises/{urllib.parse.quote(crisis_id, safe='')}/status"
        body: dict[str, Any] = api_get(self.api, path, self.settings.operator_token.get())
        return body

    def settled_status(self, crisis_id: str, condition: Callable[[dict[str, int]], bool] = lambda counts: True,
                       timeout_s: float = 60.0) -> tuple[dict[str, int], bool]:
        """The crisis's counts as ``GET /v1/crises/{id}/status`` serves them once they equal PostgreSQL's
        (and meet ``condition``); at the deadline the last ones seen, and False."""
        seen: dict[str, int] = {}

        def settled() -> bool:
            nonlocal seen
            body = self.served_status(crisis_id)
            seen = {name: int(body[name]) for name in COUNT_NAMES}
            return body.get("as_of") is not None and condition(seen) and seen == self.counts_in_database(crisis_id)

        try:
            wait_for(settled, timeout_s, f"the status of {crisis_id}", poll_s=0.5)
        except TimeoutError:
            return seen, False
        return seen, True

    def cases_of(self, crisis_id: str, kind: str) -> list[dict[str, Any]]:
        found = api_get(self.api, "/v1/cases", self.settings.operator_token.get())["cases"]
        return [c for c in found if c.get("crisis_id") == crisis_id and c.get("kind") == kind]

    def crisis_stored(self, crisis_id: str) -> bool:
        import psycopg

        with psycopg.connect(self.settings.database_url.get()) as conn:
            return conn.execute("SELECT 1 FROM crises WHERE crisis_id = %s", (crisis_id,)).fetchone() is not None

    def reply_links(self, receivers: Receivers, crisis_id: str) -> dict[str, str]:
        """Each citizen's one-tap reply link, taken from the message about ``crisis_id`` they received."""
        with self.collector.lock:
            citizen_of = {w.warning_id: w.citizen_id for w, _ in self.collector.received if w.crisis_id == crisis_id}
        links: dict[str, str] = {}
        for d in receivers.inbox.snapshot():
            found = REPLY_LINK.search(d.text)
            if d.warning_id in citizen_of and found is not None:
                links[citizen_of[d.warning_id]] = found.group(0)
        return links

    def reply(self, receivers: Receivers) -> Replies:
        """Phase 6: travellers in or near the flood answer, ``REPLIES_PER_PATH`` through each path, one in
        four asking for help; the flood's counts must move by exactly those answers."""
        flood = self.flood_id
        before, settled = self.settled_status(flood)
        report = Replies(flood, before)
        if not settled:
            report.problems.append("the flood's status never equalled PostgreSQL's before the replies")
        latest: dict[str, Warning] = {}
        for w in self._mirror:
            if w.crisis_id == flood:
                latest[w.citizen_id] = w
        candidates = sorted(c for c, w in latest.items() if w.kind in ZONE_KINDS)
        self.rng.shuffle(candidates)
        links = self.reply_links(receivers, flood)
        n = REPLIES_PER_PATH
        by_app, by_sms = candidates[:n], candidates[n:2 * n]
        by_link = [c for c in candidates[2 * n:] if c in links][:n]
        token = self.settings.ingest_token.get()
        helpers: set[str] = set()

        def answer(i: int, citizen_id: str, path: str) -> str:
            status = "need_help" if i % 4 == 3 else "safe"
            report.by_path[path, status] += 1
            if status == "need_help":
                helpers.add(citizen_id)
            return status

        for i, cid in enumerate(by_app):
            api_post(self.api, "/v1/acks", token, {"citizen_id": cid, "crisis_id": flood, "status": answer(i, cid, "app")})
        for i, cid in enumerate(by_sms):
            body = "TOLONG air sudah masuk rumah" if answer(i, cid, "sms") == "need_help" else "AMAN"
            stored = api_post(self.api, "/v1/sms/inbound", token, {"from": self.sms_numbers[cid], "body": body})
            if (stored.get("citizen_id"), stored.get("crisis_id")) != (cid, flood):
                report.problems.append(f"the SMS from {self.sms_numbers[cid]} was taken as {stored}")
        for i, cid in enumerate(by_link):
            answer_link(links[cid], answer(i, cid, "link"))
        if len(by_link) < n:
            report.problems.append(f"only {len(by_link)} messages carried a reply link")
        self.acks += sum(report.by_path.values())
        report.asked_for_help = len(helpers)
        safe = sum(k for (_, status), k in report.by_path.items() if status == "safe")
        report.after, settled = self.settled_status(
            flood, lambda c: (c["safe"], c["need_help"]) == (before["safe"] + safe, before["need_help"] + len(helpers)))
        if not settled:
            report.problems.append("the flood's status did not move by the replies (or differs from PostgreSQL)")

        def help_cases() -> int:
            return len({c["citizen_id"] for c in self.cases_of(flood, "need_help")} & helpers)

        with contextlib.suppress(TimeoutError):
            wait_for(lambda: help_cases() >= len(helpers), 30, "the need-help cases", poll_s=0.5)
        report.help_cases = help_cases()
        if report.help_cases != len(helpers):
            report.problems.append(f"{report.help_cases} cases for {len(helpers)} calls for help")
        print(f"  {sum(report.by_path.values())} replies to the flood warning (app, SMS, reply link)", flush=True)
        return report

    def escalate(self, receivers: Receivers) -> EscalationReport:
        """Phase 7: a moderate crisis around a traveller in central Tokyo; one in four of those warned
        answers at once, the others stay silent and must be re-sent through their next channel, then
        escalated to the embassy, while the ones who answered are left alone. Then it is cancelled."""
        rule = parse_rules(self.settings.escalation).get("moderate")
        rule_text = (f"re-send after {rule.resend_after.total_seconds():.0f}s, case after "
                     f"{rule.case_after.total_seconds():.0f}s" if rule else "none")
        around = sorted(cid for cid, st in self.mirror.states.items()
                        if cid.startswith(self.run_id) and abs(st.lat - 35.69) < 0.05 and abs(st.lon - 139.70) < 0.05)
        centre = self.mirror.states[self.rng.choice(around)] if around else None
        lat, lon = (centre.lat, centre.lon) if centre is not None else (35.69, 139.70)
        body = api_post(self.api, "/v1/crises", self.settings.operator_token.get(), {
            "crisis_id": f"op-{self.run_id}-gas", "title": "Gas leak: central Tokyo", "category": "infra",
            "severity": "moderate", "buffer_km": 0.5, "country_codes": ["JP"], "geometry": square_around(lat, lon, 0.008),
            "instruction": "Keep away from the area; do not use open flames.",
            "expires": (datetime.now(UTC) + timedelta(minutes=15)).isoformat(timespec="seconds")})
        gas = Crisis.from_dict(body)
        self.crisis(gas)
        self.settle("the gas leak")
        warned = sorted({w.citizen_id for w in self._mirror if w.crisis_id == gas.crisis_id and w.kind in ZONE_KINDS})
        answered = warned[::4]
        silent = [c for c in warned if c not in set(answered)]
        report = EscalationReport(gas.crisis_id, gas.title, rule_text, warned, answered, silent)
        if rule is None or not warned:
            report.problems.append("no moderate escalation rule" if rule is None else "nobody was warned")
        wait_for(lambda: self.crisis_stored(gas.crisis_id), 30, "the gas leak in PostgreSQL", poll_s=0.2)
        for cid in answered:  # at once: well before T1
            api_post(self.api, "/v1/acks", self.settings.ingest_token.get(),
                     {"citizen_id": cid, "crisis_id": gas.crisis_id, "status": "safe"})
        self.acks += len(answered)
        print(f"  gas leak {gas.crisis_id}: {len(warned)} warned, {len(answered)} answered at once; "
              f"waiting for the silent to be escalated ({rule_text})", flush=True)

        def observed() -> bool:
            with self.collector.lock:
                report.resent = {w.citizen_id for w in self.collector.resent if w.crisis_id == gas.crisis_id}
            cases = self.cases_of(gas.crisis_id, "escalation")
            report.cases = {c["citizen_id"] for c in cases}
            report.case_countries = Counter(str(c.get("country")) for c in cases)
            return report.resent >= set(silent) and report.cases >= set(silent)

        limit = (rule.case_after.total_seconds() if rule else 0.0) + 60.0
        try:
            wait_for(observed, limit, "the silent to be re-sent and escalated", poll_s=0.5)
        except TimeoutError as exc:
            report.problems.append(str(exc))
        with self.collector.lock:
            resent_ids = {w.warning_id: w.citizen_id for w in self.collector.resent if w.crisis_id == gas.crisis_id}

        def next_channels() -> Counter[str]:
            per_warning: dict[str, list[str]] = {}
            for d in receivers.inbox.snapshot():
                if d.warning_id in resent_ids:
                    per_warning.setdefault(d.warning_id, []).append(d.channel)
            return Counter(chans[1] for chans in per_warning.values() if len(chans) > 1)

        with contextlib.suppress(TimeoutError):
            wait_for(lambda: sum(next_channels().values()) >= len(resent_ids), 60, "the re-sent warnings", poll_s=0.5)
        report.resent_channels = next_channels()
        report.status, settled = self.settled_status(
            gas.crisis_id, lambda c: (c["escalated"], c["safe"]) == (len(silent), len(answered)))
        if not settled:
            report.problems.append("the gas leak's status does not show the escalations (or differs from PostgreSQL)")
        cancel = api_post(self.api, "/v1/crises", self.settings.operator_token.get(),
                          {"crisis_id": gas.crisis_id, "op": "cancel"})
        self.crisis(Crisis.from_dict(cancel))
        self.settle("the gas leak's end")
        print(f"  {gas.crisis_id}: {len(report.resent)} re-sent, {len(report.cases)} escalated; cancelled", flush=True)
        return report

    def wait_for_database(self) -> dict[str, int]:
        counts: dict[str, int] = {}

        def complete() -> bool:
            nonlocal counts
            counts = self.database_counts()
            return (counts["warnings"] >= len(self._mirror) and counts["acks"] >= self.acks
                    and counts["checkins"] >= self.checkins_sent)

        with contextlib.suppress(TimeoutError):
            wait_for(complete, 60, "the Postgres sink")
        return counts


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    receivers = Receivers.start()
    try:
        return run_with(args, receivers, started)
    finally:
        receivers.stop()


def run_with(args: argparse.Namespace, receivers: Receivers, started: float) -> int:
    settings = in_demo_dir(Settings.from_env())
    # The dispatcher delivers to the demo's own receivers; the local mail server takes mail as fast as it comes.
    # Escalation: production delays but for moderate crises, in seconds (DEMO_ESCALATION), swept every second;
    # statuses at most once a second per crisis.
    settings = replace(settings, dwell_seconds=min(settings.dwell_seconds, 2.0), smtp_url=Secret(receivers.mail.url),
                       webhook_secret=Secret(receivers.secret), rate_limit_email_per_s=0.0,
                       escalation=DEMO_ESCALATION, escalation_interval_s=1.0,
                       status_interval_s=min(settings.status_interval_s, 1.0))
    stack = Stack(settings)
    print("crisiswatch demo: starting the stack...", flush=True)
    try:
        stack.start()
    except StackError as exc:
        print(f"crisiswatch demo: {exc}", file=sys.stderr)
        return 1
    try:
        print(f"  stack up in {time.monotonic() - started:.1f}s", flush=True)
        if stack.restored is not None:  # an earlier run's crises and travellers, back from PostgreSQL
            print(f"  {stack.restored.line()}", flush=True)
        scenario = Scenario(stack, args.travellers, args.seed, receivers.webhook.base_url)
        try:
            scenario.play()
            scenario.wait_for_dispatch(receivers)  # the replies use the links in the messages delivered
            replies = scenario.reply(receivers)
            escalation = scenario.escalate(receivers)
        except (TimeoutError, urllib.error.URLError) as exc:
            print(f"crisiswatch demo: {exc}", file=sys.stderr)
            return 1
        counts = scenario.wait_for_database()
        scenario.wait_for_dispatch(receivers)
        scenario.collector.stop.set()
        ok = summary(scenario, counts) == 0
        dispatched = dispatch_summary(scenario, receivers) == 0
        replied = replies_summary(replies) == 0
        escalated = escalation_summary(escalation) == 0
        accounted = status_table(scenario) == 0
        print(f"  took               {time.monotonic() - started:.1f}s")
        return 0 if ok and dispatched and replied and escalated and accounted else 1
    finally:
        stack.stop()


def summary(s: Scenario, counts: dict[str, int]) -> int:
    with s.collector.lock:
        received = list(s.collector.received)
    got = Counter((w.citizen_id, w.crisis_id, w.kind) for w, _ in received)
    want = Counter((w.citizen_id, w.crisis_id, w.kind) for w in s._mirror)
    by_kind = Counter(w.kind for w, _ in received)
    latencies = [arrived - s.sent_at[w.citizen_id] for w, arrived in received
                 if w.kind in ("entered", "exited") and w.citizen_id in s.sent_at]
    identical = got == want
    in_db = counts.get("warnings", 0) == len({w.warning_id for w, _ in received})
    st = s.settings
    print()
    print("crisiswatch demo: summary")
    print(f"  travellers         {len(s.model.citizens())} around real cities (Kuala Lumpur, Tokyo and elsewhere)")
    print(f"  check-ins          {s.checkins_sent}")
    print(f"  crises             {len(set(s.crises))}: 1 from a CAP 1.2 document, {len(set(s.crises)) - 1} drawn by an "
          f"operator; {s.cancelled} cancelled")
    print("  warnings by kind   " + ", ".join(f"{k} {by_kind.get(k, 0)}" for k in
                                             ("inside", "entered", "near", "exited", "all_clear")))
    print(f"  vs offline engine  {'identical' if identical else 'DIFFERENT'} ({sum(want.values())} expected, "
          f"{sum(got.values())} received)")
    if latencies:
        print(f"  latency            check-in published -> warning received: p50 {percentile(latencies, 0.5) * 1000:.0f} ms,"
              f" p99 {percentile(latencies, 0.99) * 1000:.0f} ms (n={len(latencies)})")
    print(f"  postgresql         warnings {counts.get('warnings', 0)}, citizens {counts.get('citizens', 0)}, "
          f"check-ins {counts.get('checkins', 0)}, acks {counts.get('acks', 0)}"
          f" {'(complete)' if in_db else '(INCOMPLETE)'}")
    print(f"  database           {st.database_url.get()}  (data under {st.data_dir}/postgres)")
    print(f"  metrics            worker http://{st.api_host}:{st.worker_web_port}/metrics, "
          f"sink http://{st.api_host}:{st.sink_metrics_port}/metrics, api http://{st.api_host}:{st.api_port}/metrics"
          " (while the stack runs: `crisiswatch up`)")
    print(f"  logs               {st.data_dir}/logs/")
    if not identical:
        missing = want - got
        extra = got - want
        print(f"  missing: {list(missing.items())[:5]}  unexpected: {list(extra.items())[:5]}", file=sys.stderr)
    return 0 if identical and in_db else 1


def first_lines(text: str, n: int) -> list[str]:
    return [line for line in text.splitlines() if line.strip()][:n]


def samples(delivered: Sequence[Delivered]) -> list[Delivered]:
    """A few messages to show: for each language, one webhook message and one email, the first of a
    warning kind not shown yet (so the readers see different kinds)."""
    shown: list[Delivered] = []
    for language in ("id", "en"):
        for channel in ("webhook", "email"):
            pick = next((d for d in delivered if d.language == language and d.channel == channel
                         and d.subject not in {s.subject for s in shown}), None)
            if pick is not None:
                shown.append(pick)
    return shown


def dispatch_summary(s: Scenario, receivers: Receivers) -> int:
    """Messages as the citizens read them, then the check: every warning of the run delivered exactly
    once, through one channel, signed, and the ``deliveries`` table agreeing with the receivers."""
    delivered = [d for d in receivers.inbox.snapshot() if d.warning_id in (wanted := s.warning_ids())]
    resent = s.resent_ids()
    per_channel = Counter((d.warning_id, d.channel) for d in delivered)
    twice = [key for key, n in per_channel.items() if n > 1]
    missing = wanted - {d.warning_id for d in delivered}
    channels = Counter(w for w, _ in per_channel)
    # One channel each; a warning re-sent for a silent citizen through exactly one more.
    through_two = [w for w, n in channels.items() if n != (2 if w in resent else 1)]
    by_channel = Counter(d.channel for d in delivered)
    rows = s.delivery_counts()
    rows_agree = all(rows.get((channel, "delivered"), 0) == n for channel, n in by_channel.items()) \
        and sum(n for (_, status), n in rows.items() if status == "delivered") == len(wanted) + len(resent)
    rejected = list(receivers.inbox.rejected)
    print()
    print("crisiswatch demo: messages delivered (subject and first lines)")
    for d in samples(delivered):
        print(f"  [{d.channel} {d.language}] to {d.address}")
        print(f"    {d.subject}")
        for line in first_lines(d.text, 3):
            print(f"      {line}")
    print()
    print("crisiswatch demo: dispatch")
    print("  delivered          " + ", ".join(f"{c} {by_channel.get(c, 0)}" for c in ("webhook", "email"))
          + f" for {len(wanted)} warnings ({len(resent)} re-sent to the silent); received by the demo's webhook"
          " receiver and mail server")
    languages = Counter(d.language for d in delivered)
    print("  languages          " + ", ".join(f"{lang} {n}" for lang, n in sorted(languages.items())))
    print("  exactly once       " + ("yes: each warning once per channel, through one channel (re-sent ones: "
                                      "one more)" if not (twice or missing or through_two)
                                     else f"NO: {len(missing)} missing, {len(twice)} twice on a channel, "
                                          f"{len(through_two)} through an unexpected number of channels"))
    print("  signatures         " + ("all valid" if not rejected else f"{len(rejected)} REFUSED, e.g. {rejected[0]}"))
    print("  deliveries table   " + ", ".join(f"{c} {st} {n}" for (c, st), n in sorted(rows.items()))
          + (" (agrees)" if rows_agree else " (DISAGREES)"))
    if missing:
        print(f"  missing: {sorted(missing)[:5]}", file=sys.stderr)
    return 0 if not (twice or missing or through_two or rejected) and rows_agree else 1


def replies_summary(r: Replies) -> int:
    """The flood's counts before and after the replies, by path; 0 when they moved by exactly those."""
    print()
    print(f"crisiswatch demo: replies to {r.crisis_id}")
    for path, what in (("app", "POST /v1/acks (the app)"), ("sms", "SMS keyword (AMAN / TOLONG) to /v1/sms/inbound"),
                       ("link", "reply link in the message, page's button")):
        print(f"  {what:<48} safe {r.by_path.get((path, 'safe'), 0):>3}, need help {r.by_path.get((path, 'need_help'), 0):>3}")
    print(f"  need-help cases    {r.help_cases} opened for {r.asked_for_help} calls for help (GET /v1/cases)")
    for name in ("safe", "need_help"):
        print(f"  {name.replace('_', ' '):<18} {r.before.get(name, 0)} before -> {r.after.get(name, 0)} after")
    for problem in r.problems:
        print(f"  PROBLEM: {problem}")
    return 1 if r.problems else 0


def escalation_summary(e: EscalationReport) -> int:
    """The silent of the escalation crisis re-sent and escalated, those who answered left alone."""
    silent, answered = set(e.silent), set(e.answered)
    print()
    print(f"crisiswatch demo: escalation of the silent (demo delays for moderate crises: {e.rule})")
    print(f"  crisis             {e.crisis_id}: {e.title}, {len(e.warned)} travellers warned, "
          f"{len(e.answered)} answered at once")
    print(f"  re-sent            {len(e.resent & silent)} of {len(silent)} silent, through their next channel ("
          + ", ".join(f"{c} {n}" for c, n in sorted(e.resent_channels.items())) + "), same warning id")
    print(f"  escalated          {len(e.cases & silent)} cases opened for the embassy ("
          + ", ".join(f"{cc} {n}" for cc, n in sorted(e.case_countries.items())) + "; on cases and cases.<CC>)")
    left_alone = not (answered & (e.resent | e.cases))
    print(f"  answered           {len(answered)}: " + ("left alone (no re-send, no case)" if left_alone
                                                     else "SOME RE-SENT OR ESCALATED"))
    if e.status:
        print(f"  status             escalated {e.status.get('escalated', 0)}, safe {e.status.get('safe', 0)}")
    exact = e.resent == silent and e.cases == silent and sum(e.resent_channels.values()) == len(silent)
    if not exact:
        e.problems.append(f"silent {len(silent)}, re-sent {len(e.resent)}, delivered again "
                          f"{sum(e.resent_channels.values())}, escalated {len(e.cases)}")
    for problem in e.problems:
        print(f"  PROBLEM: {problem}")
    return 0 if exact and left_alone and not e.problems else 1


def status_table(s: Scenario) -> int:
    """Each crisis of the run with its accountability counts as the API serves them; 0 when every row
    equals the counts recomputed from PostgreSQL."""
    header = ("inside", "near", "warned", "delivered", "safe", "need help", "unreached", "escalated")
    rows: list[tuple[str, str, dict[str, int], bool]] = []
    for crisis_id in dict.fromkeys(s.crises):
        counts, settled = s.settled_status(crisis_id, timeout_s=30.0)
        active = bool(s.served_status(crisis_id).get("active"))
        rows.append((crisis_id, "active" if active else "cancelled", counts, settled))
    width = max(len(c) for c, _, _, _ in rows)
    print()
    print("crisiswatch demo: crisis status (GET /v1/crises/{id}/status)")
    print(f"  {'crisis':<{width}}  {'state':<9}  " + "  ".join(header))
    for crisis_id, state, counts, settled in rows:
        cells = "  ".join(f"{counts.get(name, 0):>{len(title)}}" for name, title in zip(COUNT_NAMES, header, strict=True))
        print(f"  {crisis_id:<{width}}  {state:<9}  {cells}" + ("" if settled else "  DIFFERS FROM POSTGRESQL"))
    print("  every row equals the counts recomputed from PostgreSQL" if all(r[3] for r in rows) else
          "  NOT every row equals PostgreSQL's counts")
    return 0 if all(r[3] for r in rows) else 1
