"""Check-in → warning latency at a steady rate, next to a raw passthrough's latency at the same rate.

    python -m bench.latency [--quick] [--rate 1000] [--seconds 20] [--rounds 3] [--crises 1000]
                            [--producer-batch-bytes N] [--batch-wait S]

On one embedded broker, two processes read check-ins the whole time:

1. ``crisiswatch worker`` (the embedded profile; ``--producer-batch-bytes 1`` sets
   ``CRISISWATCH_PRODUCER_MAX_BATCH_BYTES=1``, the one-record batches of earlier builds, for a side by
   side comparison), with the workload's crisis areas (:mod:`bench.workload`) loaded before the first measured check-in;
2. a raw aiokafka passthrough: consume a record, produce it to another topic (no decoding, no
   geofence, no state): the latency any Kafka-to-Kafka step in Python has on this machine. It
   fetches with the worker's bounded wait (``pipeline.app.FETCH_MAX_WAIT_MS``).

This process sends check-ins at a steady rate (paced from a fixed schedule, so a slow moment is
not made up for by a burst) and reads the outputs. A check-in's latency is from the moment it was
handed to the producer to the moment its citizen's first warning (or its relayed copy) arrived. Each
round sends ``--seconds`` of check-ins to the passthrough, then as many to the worker, each citizen
new (their first check-in; 10 % inside an area, others near or out: the check-ins that warn nobody
load the worker but are not measured). p50/p99 per round; their ratio is of the same round.
``latency_sent_per_s`` is the rate really sent: on a machine too busy to keep the schedule it is
below ``--rate``, and the latencies describe that lower rate.
``--seconds 600`` checks that the p99 does not grow over a ten-minute run (one value per minute
with ``--rounds 10 --seconds 60``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench.workload import Citizens, workload
from pipeline import topics
from pipeline.app import FETCH_MAX_WAIT_MS
from pipeline.embedded import EmbeddedBroker, create_topics, die_with_parent, ensure_topics, free_port
from pipeline.settings import Settings
from pipeline.testing import make_checkin
from schemas import encode

PARTITIONS = 4
RELAY_IN, RELAY_OUT = "bench-latency-in", "bench-latency-out"
FULL = {"rate": 1000, "seconds": 20.0, "rounds": 3, "crises": 1000}
QUICK = {"rate": 1000, "seconds": 4.0, "rounds": 3, "crises": 100}
START_TIMEOUT_S = 600.0  # a worker reading 1,000 crises on a busy 2-core machine is slow to start


@dataclass(frozen=True, slots=True)
class Round:
    p50_ms: float
    p99_ms: float
    samples: int
    sent_per_s: float  # the rate really achieved: below the target rate, this machine could not keep the schedule


async def relay(bootstrap: str) -> None:
    """The passthrough: every record of ``RELAY_IN`` produced again to ``RELAY_OUT``, as it comes."""
    consumer = AIOKafkaConsumer(RELAY_IN, bootstrap_servers=bootstrap, group_id="bench-latency-relay",
                                auto_offset_reset="latest", enable_auto_commit=True, fetch_max_wait_ms=FETCH_MAX_WAIT_MS)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await consumer.start()
    await producer.start()
    try:
        while True:
            batches = await consumer.getmany(timeout_ms=100)
            for records in batches.values():
                for record in records:
                    await producer.send(RELAY_OUT, record.value, key=record.key)
    finally:
        await consumer.stop()
        await producer.stop()


class Meter:
    """Sends check-ins on a schedule and times the first output that names each one's citizen."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.sent: dict[str, float] = {}
        self.latencies: dict[str, float] = {}
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        self._readers: list[asyncio.Task[None]] = []
        self.sent_per_s = 0.0

    async def start(self) -> None:
        await self._producer.start()
        for topic, citizen_of in ((topics.WARNINGS, _warned_citizen), (RELAY_OUT, _relayed_citizen)):
            ready = asyncio.get_running_loop().create_future()
            self._readers.append(asyncio.create_task(self._read(topic, citizen_of, ready)))
            await ready

    async def stop(self) -> None:
        for task in self._readers:
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        await self._producer.stop()

    async def _read(self, topic: str, citizen_of: object, ready: asyncio.Future[None]) -> None:
        # A short fetch wait: the embedded broker holds an empty fetch for all of it, and the time a
        # reader waits is added to every latency it measures (the same to both).
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
                                    fetch_max_wait_ms=10)
        try:
            await consumer.start()
            partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
            consumer.assign(partitions)
            await consumer.seek_to_end(*partitions)
            for tp in partitions:
                await consumer.position(tp)
            ready.set_result(None)
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            await consumer.stop()
            raise
        try:
            while True:
                batches = await consumer.getmany(timeout_ms=20)
                now = time.perf_counter()
                for records in batches.values():
                    for record in records:
                        citizen = citizen_of(record.key, record.value)  # type: ignore[operator]
                        if citizen in self.sent and citizen not in self.latencies:
                            self.latencies[citizen] = now - self.sent[citizen]
        finally:
            await consumer.stop()

    async def send(self, topic: str, citizens: Citizens, prefix: str, rate: float) -> list[str]:
        """One check-in per citizen, ``rate`` a second on a fixed schedule; the citizen ids sent. The
        rate achieved is in ``self.sent_per_s``."""
        ids = []
        started = time.perf_counter()
        for i, (lat, lon) in enumerate(zip(citizens.lats.tolist(), citizens.lons.tolist(), strict=True)):
            due = started + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            citizen = f"{prefix}{i:07d}"
            value = encode(make_checkin(citizen, lat, lon, observed_at=datetime.now(UTC)))
            self.sent[citizen] = time.perf_counter()
            await self._producer.send(topic, value, key=citizen.encode())
            ids.append(citizen)
        await self._producer.flush()
        self.sent_per_s = len(ids) / max(time.perf_counter() - started, 1e-9)
        return ids

    async def measure(self, topic: str, citizens: Citizens, prefix: str, rate: float, settle_s: float) -> Round:
        ids = await self.send(topic, citizens, prefix, rate)
        sent_per_s = self.sent_per_s
        await asyncio.sleep(settle_s)  # let the last ones arrive; a later arrival counts as lost here
        found = np.array([self.latencies[c] for c in ids if c in self.latencies]) * 1000.0
        if len(found) == 0:
            raise RuntimeError(f"no output for any of {len(ids)} check-ins on {topic}")
        return Round(float(np.percentile(found, 50)), float(np.percentile(found, 99)), len(found), sent_per_s)


def _warned_citizen(key: bytes | None, value: bytes) -> str:
    return str(json.loads(value)["citizen_id"])


def _relayed_citizen(key: bytes | None, value: bytes) -> str:
    return key.decode() if key else ""


async def preload_crises(bootstrap: str, crises: list[bytes], ids: list[str]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20)
    await producer.start()
    try:
        for crisis_id, value in zip(ids, crises, strict=True):
            await producer.send(topics.CRISIS_EVENTS, value, key=crisis_id.encode())
        await producer.flush()
    finally:
        await producer.stop()


async def wait_healthy(port: int, alive: Callable[[], str | None]) -> float:
    """Seconds until the worker's ``/health`` says ready (every crisis loaded, its table recovered)."""
    started = time.monotonic()
    while not await asyncio.to_thread(_healthy, port):
        if (dead := alive()) is not None:
            raise RuntimeError(dead)
        if time.monotonic() - started > START_TIMEOUT_S:
            raise TimeoutError(f"worker not ready within {START_TIMEOUT_S:.0f} s")
        await asyncio.sleep(0.5)
    return time.monotonic() - started


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


async def rounds_against(bootstrap: str, rate: float, seconds: float, rounds: int, crises: int, worker_port: int,
                         alive: Callable[[], str | None]) -> dict[str, list[float]]:
    load = workload(crises)
    ready_s = await wait_healthy(worker_port, alive)
    print(f"  worker ready after {ready_s:.0f} s", file=sys.stderr, flush=True)
    meter = Meter(bootstrap)
    await meter.start()
    out: dict[str, list[float]] = {"latency_p50_ms": [], "latency_p99_ms": [], "latency_vs_passthrough_p99_ratio": [],
                                   "latency_passthrough_p50_ms": [], "latency_passthrough_p99_ms": [],
                                   "latency_sent_per_s": []}
    try:
        # Warm up both until they answer: the worker has then read every crisis and joined its group.
        warm = load.citizens(200, inside_share=1.0, seed=99)
        deadline = time.monotonic() + START_TIMEOUT_S
        for topic, prefix in ((RELAY_IN, "warm-relay-"), (topics.CHECKINS, "warm-worker-")):
            attempt = 0
            while True:
                attempt += 1
                ids = await meter.send(topic, warm, f"{prefix}{attempt}-", rate)
                await asyncio.sleep(2.0)
                if any(c in meter.latencies for c in ids):
                    break
                if (dead := alive()) is not None:
                    raise RuntimeError(dead)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no output for check-ins on {topic} within {START_TIMEOUT_S:.0f} s")
        n = int(rate * seconds)
        for r in range(rounds):
            citizens = load.citizens(n, inside_share=0.1, seed=1000 + r)
            relayed = await meter.measure(RELAY_IN, citizens, f"relay-{r}-", rate, settle_s=2.0)
            warned = await meter.measure(topics.CHECKINS, citizens, f"worker-{r}-", rate, settle_s=3.0)
            out["latency_p50_ms"].append(warned.p50_ms)
            out["latency_p99_ms"].append(warned.p99_ms)
            out["latency_passthrough_p50_ms"].append(relayed.p50_ms)
            out["latency_passthrough_p99_ms"].append(relayed.p99_ms)
            out["latency_vs_passthrough_p99_ratio"].append(warned.p99_ms / relayed.p99_ms)
            out["latency_sent_per_s"].append(min(warned.sent_per_s, relayed.sent_per_s))
            print(f"  round {r + 1}: worker p50 {warned.p50_ms:.1f} ms p99 {warned.p99_ms:.1f} ms ({warned.samples} warned, "
                  f"{warned.sent_per_s:.0f} sent/s), "
                  f"passthrough p50 {relayed.p50_ms:.1f} ms p99 {relayed.p99_ms:.1f} ms", file=sys.stderr, flush=True)
    finally:
        await meter.stop()
    return out


def measure(rate: float, seconds: float, rounds: int, crises: int,
            producer_batch_bytes: int | None = None, batch_wait_s: float | None = None) -> dict[str, list[float]]:
    load = workload(crises)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        broker = EmbeddedBroker.start(log_path=data / "broker.log")
        children: list[subprocess.Popen[bytes]] = []
        try:
            ensure_topics(broker.bootstrap, PARTITIONS)
            create_topics(broker.bootstrap, [RELAY_IN, RELAY_OUT], PARTITIONS)
            asyncio.run(preload_crises(broker.bootstrap, [encode(c) for c in load.crises], [c.crisis_id for c in load.crises]))
            worker_port = free_port()
            settings = Settings.from_env({
                "CRISISWATCH_KAFKA_BOOTSTRAP": broker.bootstrap, "CRISISWATCH_WORKER_WEB_PORT": str(worker_port),
                "CRISISWATCH_DATA_DIR": str(data), "CRISISWATCH_PARTITIONS": str(PARTITIONS),
                "CRISISWATCH_PRODUCER_MAX_BATCH_BYTES": str(producer_batch_bytes or ""),
                **({"CRISISWATCH_BATCH_WAIT_S": str(batch_wait_s)} if batch_wait_s is not None else {}),
                "CRISISWATCH_LOG_LEVEL": "WARNING"})
            env = {**os.environ, **settings.env()}
            roles: dict[subprocess.Popen[bytes], str] = {}
            for role in ("worker", "relay"):
                with (data / f"{role}.log").open("wb") as log:
                    proc = subprocess.Popen([sys.executable, "-m", "bench.latency", f"--as-{role}"], env=env,
                                            stdout=log, stderr=subprocess.STDOUT,
                                            preexec_fn=die_with_parent)
                children.append(proc)
                roles[proc] = role
            def alive() -> str | None:
                gone = [p for p in children if p.poll() is not None]
                return None if not gone else f"the {roles[gone[0]]} exited: " + _tail(data / f"{roles[gone[0]]}.log")

            return asyncio.run(rounds_against(broker.bootstrap, rate, seconds, rounds, crises, worker_port, alive))
        finally:
            for proc in children:
                proc.terminate()
            for proc in children:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            broker.stop()


def _tail(path: Path) -> str:
    lines = path.read_text(errors="replace").strip().splitlines()
    return lines[-1][:300] if lines else "(empty)"


def run(quick: bool) -> dict[str, list[float]]:
    """The harness's entry point: per-round values of each key."""
    sizes = QUICK if quick else FULL
    return measure(float(sizes["rate"]), float(sizes["seconds"]), int(sizes["rounds"]), int(sizes["crises"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the harness's quick sizes")
    parser.add_argument("--rate", type=float)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--crises", type=int)
    parser.add_argument("--producer-batch-bytes", type=int, metavar="N",
                        help="CRISISWATCH_PRODUCER_MAX_BATCH_BYTES of the worker (default: the producer's own batching)")
    parser.add_argument("--batch-wait", type=float, metavar="S",
                        help="CRISISWATCH_BATCH_WAIT_S of the worker (default: the setting's default)")
    parser.add_argument("--as-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--as-relay", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.as_worker:
        from pipeline.worker_cmd import run_worker

        run_worker(Settings.from_env(), "warning", app_id="crisiswatch-bench-latency")
        return
    if args.as_relay:
        asyncio.run(relay(Settings.from_env().kafka_bootstrap))
        return
    sizes = dict(QUICK if args.quick else FULL)
    for key in sizes:
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    result = measure(float(sizes["rate"]), float(sizes["seconds"]), int(sizes["rounds"]), int(sizes["crises"]),
                     args.producer_batch_bytes, args.batch_wait)
    print(f"latency: {sizes['rate']:g} check-ins/s, {sizes['seconds']:g} s a round, {sizes['crises']} crises, "
          f"producer batches of {args.producer_batch_bytes or 'default'} bytes, batch wait {args.batch_wait or 'default'} s")
    for key, values in result.items():
        print(f"  {key:<36} {float(np.median(values)):>9.1f}   rounds: {', '.join(f'{v:.1f}' for v in values)}")


if __name__ == "__main__":
    main()
