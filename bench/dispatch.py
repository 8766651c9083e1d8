"""Warnings delivered per second by the dispatcher to a webhook receiver, next to a plain async HTTP
client posting the same bodies to the same receiver in the same run.

    python -m bench.dispatch [--warnings 4000] [--rounds 3] [--per-citizen 2] [--quick] [--json]

On one embedded broker and one embedded PostgreSQL: a fast aiohttp receiver on loopback, in a process
of its own, answering 200 and counting requests by ``Idempotency-Key``; one dispatcher, started (and
its consumer group joined) before the first round, on a topic of 4 partitions. Each round registers
new citizens (one webhook each), then:

1. a plain aiohttp client (the library the dispatcher's webhook channel uses, on the same uvloop)
   with as many requests in flight as the dispatcher serves citizens at once posts every warning's
   signed webhook body once (the ceiling: HTTP on this machine, no broker, no database, no
   rendering); then a plain ``httpx.AsyncClient`` does the same (the reference of earlier runs,
   ``dispatch_plain_httpx_msgs_per_s``; ``--plain httpx`` makes it the one the ratio is taken to);
2. the round's warnings are published on the topic and the real :class:`consumers.dispatch.Dispatcher`
   delivers every one: decoding it, the ``deliveries`` rows before and after each send, the advisory
   locks, rendering the message, signing it, publishing the outcome.

The dispatcher's rate is measured at the receiver from its first delivery to its last (publishing a
round takes a fraction of that: the dispatcher is not kept waiting for its input). A round fails if any warning arrived twice or not at all.
:func:`run` returns the per-round values (``python -m bench`` imports it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import uvloop
from aiohttp import web

from pipeline.domain.delivery import IDEMPOTENCY_HEADER, SIGNATURE_HEADER, sign
from pipeline.embedded import create_topics, embedded_stack, free_port, wait_for_port
from pipeline.settings import Secret, Settings
from schemas import Warning

PARTITIONS = 4
SECRET = "bench-webhook-secret"  # noqa: S105 - a key for loopback only
T0 = datetime(2025, 3, 1, 8, 30, tzinfo=UTC)


class Receiver:
    """An aiohttp server in its own process (so it competes with neither client for the GIL): 200 to
    every POST, counted per ``Idempotency-Key``; ``GET /stats`` (with the counts per key when asked:
    ``?counts=1``; the bench polls it while a client runs, so it stays small) and ``POST /reset``."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.received = 0
        self.first: float | None = None
        self.last = 0.0

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        now = time.monotonic()  # CLOCK_MONOTONIC: the same clock in every process of the machine
        self.counts[request.headers.get(IDEMPOTENCY_HEADER, "")] += 1
        self.received += 1
        if self.first is None:
            self.first = now
        self.last = now
        return web.Response(status=200)

    async def stats(self, request: web.Request) -> web.Response:
        stats: dict[str, Any] = {"received": self.received, "first": self.first, "last": self.last}
        if request.query.get("counts"):
            stats["counts"] = dict(self.counts)
        return web.json_response(stats)

    async def reset(self, request: web.Request) -> web.Response:
        self.counts.clear()
        self.received = 0
        self.first, self.last = None, 0.0
        return web.Response(status=204)

    def serve(self, port: int) -> None:
        app = web.Application()
        app.router.add_get("/stats", self.stats)
        app.router.add_post("/reset", self.reset)
        app.router.add_post("/{tail:.*}", self.handle)
        web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, backlog=1024)


class ReceiverProcess:
    def __init__(self) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, "-m", "bench.dispatch", "--as-receiver", str(self.port)])
        wait_for_port("127.0.0.1", self.port, 30)
        self.client = httpx.Client(timeout=30)  # one connection: polling costs the measured process little

    def stats(self, counts: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = self.client.get(self.base + "/stats" + ("?counts=1" if counts else "")).json()
        return data

    def received(self) -> int:
        return int(self.stats()["received"])

    def reset(self) -> None:
        self.client.post(self.base + "/reset").raise_for_status()

    def rate(self) -> float:
        s = self.stats()
        n, first, last = s["received"], s["first"], s["last"]
        return float((n - 1) / (last - first)) if first is not None and n > 1 and last > first else 0.0

    def stop(self) -> None:
        self.client.close()
        self.process.terminate()
        self.process.wait(10)


NAMES = ("Siti Rahma", "Budi Santoso", "Ayu Lestari", "Wayan Sudarsana", "Dewi Kartika", "Agus Salim",
         "Putu Ayu <Bali> & Co", "Rina O'Neil")


def make_warnings(total: int, per_citizen: int) -> list[Warning]:
    citizens = [f"bench-{uuid.uuid4().hex[:12]}" for _ in range(max(1, total // per_citizen))]
    return [Warning(f"w-{uuid.uuid4().hex}", citizens[i % len(citizens)], f"bench-crisis-{i // len(citizens)}", 1,
                    "inside", "extreme", "Earthquake M6.8", "Drop, cover, hold on", 0.0, -8.65, 115.2, T0,
                    T0 + timedelta(seconds=i), ("ID",)) for i in range(total)]


def register(database_url: str, warnings: Sequence[Warning], url: str) -> None:
    import psycopg
    from psycopg.types.json import Jsonb

    citizens = sorted({w.citizen_id for w in warnings})
    with psycopg.connect(database_url, autocommit=True) as conn, conn.cursor() as cur:
        cur.executemany("INSERT INTO citizens (citizen_id, name, nationality, language, channels, location_tracking) "
                        "VALUES (%s, %s, 'ID', %s, %s, true)",
                        [(c, NAMES[n % len(NAMES)], "id" if n % 2 else "en",
                          Jsonb([{"type": "webhook", "address": f"{url}/{c}"}])) for n, c in enumerate(citizens)])


def preload(bootstrap: str, topic: str, warnings: Sequence[Warning]) -> None:
    from producers.publisher import Publisher, outgoing

    publisher = Publisher(Settings(), bootstrap=bootstrap)
    try:
        publisher.publish([outgoing(w, topic) for w in warnings])
    finally:
        publisher.close()


def bodies(warnings: Sequence[Warning], url: str) -> list[tuple[str, bytes, str]]:
    """(url, body, key) of each warning exactly as the dispatcher's webhook channel builds them."""
    from consumers.channels import Outbound, webhook_body
    from consumers.dispatch import CitizenContact, compose
    from pipeline.messages import EmbassyDirectory

    embassies = EmbassyDirectory.load(None)
    order = {c: n for n, c in enumerate(sorted({w.citizen_id for w in warnings}))}
    out = []
    for w in warnings:
        n = order[w.citizen_id]
        citizen = CitizenContact(w.citizen_id, NAMES[n % len(NAMES)], "id" if n % 2 else "en",
                                 (("webhook", f"{url}/{w.citizen_id}"),))
        out.append((f"{url}/{w.citizen_id}", webhook_body(Outbound(w, compose(w, citizen, embassies))), w.warning_id))
    return out


async def plain_aiohttp(requests: Sequence[tuple[str, bytes, str]], concurrency: int) -> float:
    import aiohttp

    queue = iter(requests)
    secret = SECRET.encode()

    async def worker(session: aiohttp.ClientSession) -> None:
        for url, body, key in queue:
            headers = {"Content-Type": "application/json", IDEMPOTENCY_HEADER: key,
                       SIGNATURE_HEADER: sign(secret, int(time.time()), body)}
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                response.raise_for_status()

    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return len(requests) / (time.perf_counter() - started)


async def plain_httpx(requests: Sequence[tuple[str, bytes, str]], concurrency: int) -> float:
    queue = iter(requests)
    secret = SECRET.encode()

    async def worker(client: httpx.AsyncClient) -> None:
        for url, body, key in queue:
            headers = {"Content-Type": "application/json", IDEMPOTENCY_HEADER: key,
                       SIGNATURE_HEADER: sign(secret, int(time.time()), body)}
            response = await client.post(url, content=body, headers=headers)
            response.raise_for_status()

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return len(requests) / (time.perf_counter() - started)


class RunningDispatcher:
    """The real dispatcher on the bench topic, in a thread of this process, for all rounds (one group
    join, outside the measurement)."""

    def __init__(self, settings: Settings, topic: str) -> None:
        from prometheus_client import CollectorRegistry

        from consumers.dispatch import Dispatcher
        from pipeline.metrics import DispatchMetrics

        self.dispatcher = Dispatcher(settings, DispatchMetrics(CollectorRegistry()), source_topic=topic,
                                     group_id=f"bench-dispatch-{uuid.uuid4().hex[:8]}")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.dispatcher.run, args=(self.stop,), name="bench-dispatcher",
                                       daemon=True)
        self.thread.start()

    def wait_for(self, receiver: ReceiverProcess, total: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while (received := receiver.received()) < total:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the dispatcher delivered {received} of {total} in {timeout_s:.0f}s")
            if not self.thread.is_alive():
                raise RuntimeError("the dispatcher stopped")
            time.sleep(0.2)  # the rate comes from the receiver's own clock: polling often adds nothing

    def close(self) -> None:
        self.stop.set()
        self.thread.join(60)


def check_once(receiver: ReceiverProcess, warnings: Sequence[Warning], what: str) -> None:
    counts: Counter[str] = Counter(receiver.stats(counts=True)["counts"])
    wrong = {w.warning_id: counts.get(w.warning_id, 0) for w in warnings if counts.get(w.warning_id, 0) != 1}
    if wrong or sum(counts.values()) != len(warnings):
        raise SystemExit(f"{what}: {len(wrong)} warnings not received exactly once, e.g. {list(wrong.items())[:3]}")


def measure(*, warnings: int, rounds: int, per_citizen: int, plain: str = "aiohttp", concurrency: int | None = None,
            dispatch_concurrency: int | None = None, timeout_s: float = 600.0,
            report: bool = False) -> dict[str, list[float]]:
    """Run ``rounds`` rounds on one embedded stack; per-round values by key."""
    dispatch_concurrency = dispatch_concurrency or Settings().dispatch_concurrency
    concurrency = concurrency or dispatch_concurrency
    results: dict[str, list[float]] = {"dispatch_msgs_per_s": [], "dispatch_plain_client_msgs_per_s": [],
                                       "dispatch_vs_plain_ratio": [], "dispatch_plain_httpx_msgs_per_s": [],
                                       "dispatch_plain_aiohttp_msgs_per_s": []}
    receiver = ReceiverProcess()
    url = f"{receiver.base}/hook"
    try:
        with tempfile.TemporaryDirectory(prefix="crisiswatch-bench-") as tmp, \
                embedded_stack(Path(tmp), PARTITIONS, broker_log=Path(tmp) / "broker.log") as (bootstrap, database_url):
            settings = Settings(kafka_bootstrap=bootstrap, database_url=Secret(database_url),
                                webhook_secret=Secret(SECRET), log_level="WARNING",
                                dispatch_concurrency=dispatch_concurrency)
            topic = "bench-warnings"
            create_topics(bootstrap, [topic], PARTITIONS)
            dispatcher = RunningDispatcher(settings, topic)
            try:
                warm_up = make_warnings(40, per_citizen)  # the group joined, the connections open
                register(database_url, warm_up, url)
                receiver.reset()
                preload(bootstrap, topic, warm_up)
                dispatcher.wait_for(receiver, len(warm_up), timeout_s)
                for number in range(1, rounds + 1):
                    batch = make_warnings(warnings, per_citizen)
                    register(database_url, batch, url)
                    requests = bodies(batch, url)
                    plain_rates: dict[str, float] = {}
                    for name, client in (("aiohttp", plain_aiohttp), ("httpx", plain_httpx)):
                        receiver.reset()
                        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:  # the webhook channel's loop
                            plain_rates[name] = runner.run(client(requests, concurrency))
                        check_once(receiver, batch, f"plain {name} client")
                        results[f"dispatch_plain_{name}_msgs_per_s"].append(plain_rates[name])
                    plain_rate = plain_rates[plain]
                    receiver.reset()
                    started, cpu = time.perf_counter(), time.process_time()
                    preload(bootstrap, topic, batch)  # the dispatcher reads them as they come (publishing is faster)
                    dispatcher.wait_for(receiver, len(batch), timeout_s)
                    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
                    rate = receiver.rate()
                    time.sleep(0.5)  # anything sent twice would have arrived by now
                    check_once(receiver, batch, "dispatcher")
                    results["dispatch_msgs_per_s"].append(rate)
                    results["dispatch_plain_client_msgs_per_s"].append(plain_rate)
                    results["dispatch_vs_plain_ratio"].append(rate / plain_rate)
                    if report:
                        print(f"  round {number}: plain aiohttp {plain_rates['aiohttp']:7,.0f}/s, plain httpx "
                              f"{plain_rates['httpx']:7,.0f}/s ({concurrency} in flight); dispatcher "
                              f"({dispatch_concurrency} at once) {rate:7,.0f}/s ({wall:.1f}s, CPU "
                              f"{cpu / len(batch) * 1e6:,.0f} µs/warning with publishing); "
                              f"ratio to plain {plain} {rate / plain_rate:.2f}", flush=True)
            finally:
                dispatcher.close()
    finally:
        receiver.stop()
    return results


def run(quick: bool) -> dict[str, list[float]]:
    """Per-round values of ``dispatch_msgs_per_s``, ``dispatch_plain_client_msgs_per_s`` (aiohttp) and
    ``dispatch_vs_plain_ratio``, and of both plain clients by name: 3 rounds of 600 warnings when
    ``quick``, of 4,000 otherwise."""
    return measure(warnings=600 if quick else 4000, rounds=3, per_citizen=2)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warnings", type=int, default=None, help="warnings per round [default: 4000; --quick 600]")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="600 warnings a round")
    parser.add_argument("--per-citizen", type=int, default=2, help="warnings per citizen (kept in order)")
    parser.add_argument("--plain", choices=("aiohttp", "httpx"), default="aiohttp",
                        help="the plain client the ratio is taken to [default: aiohttp, as the dispatcher]")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="requests in flight of the plain client [default: the dispatcher's concurrency]")
    parser.add_argument("--dispatch-concurrency", type=int, default=Settings().dispatch_concurrency,
                        help="citizens the dispatcher serves at once (CRISISWATCH_DISPATCH_CONCURRENCY)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds the dispatcher may take a round")
    parser.add_argument("--json", action="store_true", help="print the per-round values as JSON")
    parser.add_argument("--as-receiver", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.as_receiver:
        Receiver().serve(args.as_receiver)
        return
    warnings = args.warnings or (600 if args.quick else 4000)
    if not args.json:
        print(f"  {warnings:,} warnings a round, {max(1, warnings // args.per_citizen):,} citizens, {PARTITIONS} partitions, "
              "webhook receiver on loopback", flush=True)
    results = measure(warnings=warnings, rounds=args.rounds, per_citizen=args.per_citizen, plain=args.plain,
                      concurrency=args.concurrency, dispatch_concurrency=args.dispatch_concurrency,
                      timeout_s=args.timeout, report=not args.json)
    if args.json:
        print(json.dumps(results))
        return
    rate, plain, ratio = (statistics.median(results[k]) for k in
                          ("dispatch_msgs_per_s", "dispatch_plain_client_msgs_per_s", "dispatch_vs_plain_ratio"))
    httpx_ratio = statistics.median(r / h for r, h in zip(results["dispatch_msgs_per_s"],
                                                          results["dispatch_plain_httpx_msgs_per_s"], strict=True))
    print(f"  median: dispatcher {rate:,.0f} warnings/s, plain {args.plain} client {plain:,.0f}/s, "
          f"ratio {ratio:.2f} (to plain httpx {httpx_ratio:.2f})  (target >= 0.5, and >= 2,000/s)")
    print("  each warning received exactly once: yes")


if __name__ == "__main__":
    main()
