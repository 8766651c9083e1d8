"""``crisiswatch demo``: the stack plus a scripted scenario, then a summary; exit 0 when the
pipeline did exactly what the offline engine says it must.

The scenario (a few thousand simulated travellers around real cities, from GeoNames data):

1. every traveller registers (``citizen/1``) and checks in where they are;
2. a flash-flood warning for central Kuala Lumpur arrives as a CAP 1.2 document, parsed by the
   CAP parser → those already inside or within its 5 km band are warned (``inside``/``near``);
3. an operator draws an area over central Tokyo through the ingest API (``POST /v1/crises``);
4. travellers move: some walk into the flooded area (``entered``), some leave the Tokyo area and
   stay away past the dwell time (``exited``);
5. some of those warned reply "safe" or "need help" (``POST /v1/acks``);
6. the operator cancels the Tokyo crisis → ``all_clear`` to everyone warned about it.

The same events are applied, phase by phase, to the offline engine (``pipeline.domain.timeline``);
the warnings that reach Kafka must be exactly those, and every one of them must be in PostgreSQL.

The stack's dispatcher delivers every one of those warnings to a mail server and a webhook receiver
run by the demo itself on loopback (:mod:`pipeline.demo_receivers`): most travellers registered a
webhook (their travel desk's), one in four an email address. Each warning must arrive exactly once,
through its citizen's channel, with a valid signature, and the ``deliveries`` table must agree; the
summary shows a few of the messages as the citizens read them, in Bahasa Indonesia and English.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

from pipeline import topics
from pipeline.demo_receivers import Delivered, Receivers
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
EMAIL_EVERY = 4  # one traveller in four registered an email address, the others a webhook
UNTRACKED_EVERY = 25  # one traveller in 25 registered without location consent: no check-ins, warned by their trip
# Warnings by registered trip (pre-arrival; in-country for travellers without location consent) come from the
# dispatcher's periodic sweep, on its own clock: they are not what the offline engine models, so the checks
# below leave them out (they are delivered all the same).
TRIP_KINDS = ("pre_arrival", "in_country")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--travellers", type=int, default=3000, help="simulated travellers (default 3000)")
    parser.add_argument("--seed", type=int, default=7, help="random seed of the scenario")


class WarningCollector(threading.Thread):
    """Reads ``warnings`` from the beginning and stamps each with its arrival time."""

    def __init__(self, settings: Settings, prefix: str) -> None:
        super().__init__(name="warning-collector", daemon=True)
        self.settings = settings
        self.prefix = prefix
        self.received: list[tuple[Warning, float]] = []
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
                            self.received.append((warning, now))
        consumer.close()

    def count(self) -> int:
        with self.lock:
            return len(self.received)


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.1)


def api_post(base: str, path: str, token: str, body: Any) -> Any:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    request = urllib.request.Request(  # noqa: S310 - loopback URL we built
        base + path, data=json.dumps(body).encode(), method="POST", headers=headers)
    with urllib.request.urlopen(request, timeout=15) as response:  # noqa: S310 - loopback URL we built
        return json.loads(response.read())


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
        self.untracked: set[str] = set()  # travellers without location_tracking consent: their phones do not report

    def with_demo_channel(self, index: int, citizen: Citizen) -> Citizen:
        """The citizen's channels replaced by one the demo receives: an email address for one in
        ``EMAIL_EVERY``, the travel desk's webhook for the others (their language is the model's); one in
        ``UNTRACKED_EVERY`` registered without location consent."""
        if index % EMAIL_EVERY == 0:
            channel = Channel("email", f"{citizen.citizen_id.lower()}@example.org")
        else:
            channel = Channel("webhook", f"{self.webhook_base}/travel-desk/{citizen.citizen_id}")
        return replace(citizen, channels=(channel,), location_tracking=index % UNTRACKED_EVERY != UNTRACKED_EVERY - 1)

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

        warned = [w for w in self._mirror if w.kind in ("inside", "entered")]
        for w in self.rng.sample(warned, min(60, len(warned))):
            status = "need_help" if self.rng.random() < 0.25 else "safe"
            api_post(self.api, "/v1/acks", self.settings.ingest_token.get(),
                     {"citizen_id": w.citizen_id, "crisis_id": w.crisis_id, "status": status})
            self.acks += 1

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

        def complete() -> bool:
            arrived = {d.warning_id for d in receivers.inbox.snapshot()}
            return wanted <= arrived and sum(n for (_, status), n in self.delivery_counts().items()
                                             if status == "delivered") >= len(wanted)

        with contextlib.suppress(TimeoutError):
            wait_for(complete, timeout_s, "the dispatcher")

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
    settings = Settings.from_env()
    # The dispatcher delivers to the demo's own receivers; the local mail server takes mail as fast as it comes.
    settings = replace(settings, dwell_seconds=min(settings.dwell_seconds, 2.0), smtp_url=Secret(receivers.mail.url),
                       webhook_secret=Secret(receivers.secret), rate_limit_email_per_s=0.0)
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
        except TimeoutError as exc:
            print(f"crisiswatch demo: {exc}", file=sys.stderr)
            return 1
        counts = scenario.wait_for_database()
        scenario.collector.stop.set()
        scenario.wait_for_dispatch(receivers)
        ok = summary(scenario, counts) == 0
        dispatched = dispatch_summary(scenario, receivers) == 0
        # Replies moving the crisis status and the silent escalated are shown here once those parts run.
        print(f"  took               {time.monotonic() - started:.1f}s")
        return 0 if ok and dispatched else 1
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
    print(f"  crises             {len(set(s.crises))}: 1 from a CAP 1.2 document, 1 drawn by an operator; 1 cancelled")
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
    per_channel = Counter((d.warning_id, d.channel) for d in delivered)
    twice = [key for key, n in per_channel.items() if n > 1]
    missing = wanted - {d.warning_id for d in delivered}
    through_two = [w for w, n in Counter(w for w, _ in per_channel).items() if n > 1]
    by_channel = Counter(d.channel for d in delivered)
    rows = s.delivery_counts()
    rows_agree = all(rows.get((channel, "delivered"), 0) == n for channel, n in by_channel.items()) \
        and sum(n for (_, status), n in rows.items() if status == "delivered") == len(wanted)
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
          + f" of {len(wanted)} warnings; received by the demo's webhook receiver and mail server")
    languages = Counter(d.language for d in delivered)
    print("  languages          " + ", ".join(f"{lang} {n}" for lang, n in sorted(languages.items())))
    print("  exactly once       " + ("yes: each warning once, through one channel" if not (twice or missing or through_two)
                                     else f"NO: {len(missing)} missing, {len(twice)} twice on a channel, "
                                          f"{len(through_two)} through two channels"))
    print("  signatures         " + ("all valid" if not rejected else f"{len(rejected)} REFUSED, e.g. {rejected[0]}"))
    print("  deliveries table   " + ", ".join(f"{c} {st} {n}" for (c, st), n in sorted(rows.items()))
          + (" (agrees)" if rows_agree else " (DISAGREES)"))
    if missing:
        print(f"  missing: {sorted(missing)[:5]}", file=sys.stderr)
    return 0 if not (twice or missing or through_two or rejected) and rows_agree else 1
