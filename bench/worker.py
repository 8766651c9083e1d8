"""Check-ins per second through one crisiswatch worker, next to a raw consume→produce passthrough.

    python -m bench.worker [--quick] [--json] [--checkins N] [--citizens N] [--crises N] [--rounds 3]

The workload: crisis areas of 20–500 vertices around real cities (GeoNames, a fixed seed),
citizens clustered around the same cities, a share of them inside. On one embedded broker (4
partitions) the same pre-loaded check-ins are read, in each round, by:
1. a raw aiokafka consumer that produces every message to another topic (the ceiling for any
   Kafka-to-Kafka step in Python on this machine), over one record per check-in:
   ``raw_passthrough_msgs_per_s``; and over the ``checkin-batch/1`` records the API writes,
   counted in check-ins: ``raw_passthrough_batch_checkins_per_s``;
2. ``crisiswatch worker`` (the producer's own batching, as on Apache Kafka; ``--producer-batch-bytes 1``
   for the embedded stack's one-record batches) draining the
   backlog as the API writes it, requests of 1,000 check-ins as ``checkin-batch/1`` records:
   ``worker_checkins_per_s``, and ``worker_vs_raw_ratio`` = that over ``raw_passthrough_msgs_per_s``
   (the per-check-in ceiling the worker is held to); ``worker_vs_raw_same_records_ratio`` over the
   batch passthrough;
3. once, in the full run, the worker over one record per check-in (``worker_single_records_checkins_per_s``).
The worker's rate is measured from its own ``crisiswatch_checkins_processed_total``, from the first
check-in processed to the last, so start-up and group join are not counted; ``worker_ready_s`` is
from the worker process's start to its first geofenced check-in, with every crisis loaded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from pipeline.embedded import EmbeddedBroker, create_topics, ensure_topics, free_port
from pipeline.observability import read_metric
from pipeline.settings import Settings
from pipeline.testing import make_checkin, make_crisis
from schemas import Checkin, encode

PARTITIONS = 4


Record = tuple[bytes | None, bytes, int | None]  # key, value, partition (None: the key's)


def city_crises(n: int, rng: np.random.Generator, t0: datetime) -> tuple[list[bytes], list[tuple[float, float]]]:
    """``n`` crisis areas around real cities: star-shaped rings of 20–500 vertices, 5–60 km across,
    a 10 km proximity band; and the cities' (lon, lat)."""
    from producers.cities import load_cities

    cities = load_cities()
    picks = rng.choice(len(cities), size=n, replace=n > len(cities))
    crises, centres = [], []
    for i, pick in enumerate(picks):
        city = cities[int(pick)]
        vertices = int(rng.integers(20, 501))
        radius_deg = float(rng.uniform(5, 60)) / 111.0
        angles = np.sort(rng.uniform(0, 2 * np.pi, vertices))
        radii = radius_deg * rng.uniform(0.6, 1.0, vertices)
        ring = [[float(city.lon + r * np.cos(a) / max(np.cos(np.radians(city.lat)), 0.2)), float(city.lat + r * np.sin(a))]
                for a, r in zip(angles, radii, strict=True)]
        ring.append(ring[0])
        crises.append(encode(make_crisis(f"bench-{i}", {"type": "Polygon", "coordinates": [ring]}, buffer_km=10.0,
                                         effective=t0, country_codes=(city.country_code,))))
        centres.append((city.lon, city.lat))
    return crises, centres


def city_checkins(n: int, citizens: int, centres: list[tuple[float, float]], rng: np.random.Generator,
                  t0: datetime) -> list[Checkin]:
    """``n`` check-ins of ``citizens`` citizens, each living around one of the crisis cities (about
    a third inside its area), every citizen's check-ins later than the one before."""
    home = rng.integers(0, len(centres), citizens)
    spread = rng.choice([0.05, 0.3, 1.5], citizens, p=[0.35, 0.35, 0.3])
    out = []
    for i in range(n):
        c = i % citizens
        lon, lat = centres[int(home[c])]
        out.append(make_checkin(f"b{c:07d}", float(np.clip(lat + rng.normal(0, spread[c]), -89, 89)),
                                float(np.clip(lon + rng.normal(0, spread[c]), -180, 180)),
                                observed_at=t0 + timedelta(seconds=i // citizens)))
    return out


def single_records(checkins: list[Checkin]) -> list[Record]:
    return [(c.citizen_id.encode(), encode(c), None) for c in checkins]


def batch_records(checkins: list[Checkin], request: int = 1000) -> list[Record]:
    """What the API writes for requests of ``request`` check-ins: one checkin-batch/1 per partition."""
    from producers.publisher import checkin_batches

    out: list[Record] = []
    for start in range(0, len(checkins), request):
        out += [(r.key, r.value, r.partition) for r in checkin_batches(checkins[start:start + request], "checkins", PARTITIONS)]
    return out


async def preload(bootstrap: str, topic: str, records: list[Record], crises: Sequence[bytes] = ()) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=1 << 20,
                                max_request_size=4 << 20)
    await producer.start()
    try:
        for value in crises:
            await producer.send("crisis-events", value, key=value[:16])
        for key, value, partition in records:
            await producer.send(topic, value, key=key, partition=partition)
        await producer.flush()
    finally:
        await producer.stop()


async def passthrough(bootstrap: str, topic: str, records: int, checkins: int) -> float:
    """Check-ins per second of a raw consume→produce of ``records`` records holding ``checkins`` check-ins."""
    out_topic = f"bench-passthrough-{topic}"
    create_topics(bootstrap, [out_topic], PARTITIONS)
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                                enable_auto_commit=False, fetch_max_wait_ms=100)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=1 << 20,
                                max_request_size=4 << 20)
    await consumer.start()
    await producer.start()
    try:
        seen = 0
        started = time.perf_counter()
        while seen < records:
            batches = await consumer.getmany(timeout_ms=500, max_records=5000)
            for batch in batches.values():
                for record in batch:
                    await producer.send(out_topic, record.value, key=record.key)
                seen += len(batch)
        await producer.flush()
        return checkins / (time.perf_counter() - started)
    finally:
        await consumer.stop()
        await producer.stop()


def processed(url: str) -> float:
    return read_metric(url, "crisiswatch_checkins_processed_total")


def run_worker(bootstrap: str, total: int, batch_bytes: str, data_dir: Path, app_suffix: str,
               batch_wait_s: float) -> tuple[float, float, float]:
    """Check-ins per second of one worker over the preloaded backlog, its mean batch size, and the seconds
    from its start to its first geofenced check-in."""
    port = free_port()
    settings = Settings.from_env({"CRISISWATCH_KAFKA_BOOTSTRAP": bootstrap, "CRISISWATCH_WORKER_WEB_PORT": str(port),
                                  "CRISISWATCH_DATA_DIR": str(data_dir), "CRISISWATCH_PARTITIONS": str(PARTITIONS),
                                  "CRISISWATCH_PRODUCER_MAX_BATCH_BYTES": batch_bytes, "CRISISWATCH_LOG_LEVEL": "WARNING",
                                  "CRISISWATCH_BATCH_WAIT_S": str(batch_wait_s)})
    env = {**os.environ, **settings.env(), "CRISISWATCH_BENCH_APP_ID": app_suffix}
    log = (data_dir / f"worker-{app_suffix}.log").open("wb")
    launched = time.perf_counter()
    worker = subprocess.Popen([sys.executable, "-m", "bench.worker", "--as-worker"], env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        deadline = time.monotonic() + 300
        first_t = None
        while time.monotonic() < deadline:
            done = processed(url)
            if done > 0 and first_t is None:
                first_t, first_n = time.perf_counter(), done
            if done >= total:
                assert first_t is not None
                mean_batch = done / max(read_metric(url, "crisiswatch_batch_size_count"), 1)
                return (done - first_n) / max(time.perf_counter() - first_t, 1e-9), mean_batch, first_t - launched
            if worker.poll() is not None:
                raise RuntimeError(f"worker exited; see {log.name}")
            time.sleep(0.02)
        raise TimeoutError(f"worker processed {processed(url)} of {total} in 300 s; its log ends:\n"
                           + (data_dir / f"worker-{app_suffix}.log").read_text(errors="replace")[-3000:])
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(10)
        log.close()


def runtime_alone(checkins: list[bytes], keys: list[bytes], crises: list[bytes], batch: int) -> float:
    """The worker's own work (decode, geofence, transitions, state) with no Kafka and no Faust."""
    from prometheus_client import CollectorRegistry

    from pipeline.domain.tracking import GeofenceConfig
    from pipeline.metrics import WorkerMetrics
    from pipeline.runtime import GeofenceRuntime, MemoryEmitter, RawMessage
    from schemas import Crisis, decode

    runtime = GeofenceRuntime(GeofenceConfig(), {}, MemoryEmitter(), WorkerMetrics(CollectorRegistry()),
                              clock=lambda: datetime.now(UTC))
    runtime.remember([decode(c, Crisis) for c in crises])
    messages = [RawMessage(value, key) for key, value in zip(keys, checkins, strict=True)]

    async def go() -> None:
        for i in range(0, len(messages), batch):
            await runtime.process_checkins(messages[i:i + batch])

    started = time.perf_counter()
    asyncio.run(go())
    return len(messages) / (time.perf_counter() - started)


def as_worker() -> None:
    """A worker under its own app id, so each variant reads the check-ins from the start; otherwise
    exactly what ``crisiswatch worker`` runs."""
    from pipeline.worker_cmd import run_worker

    run_worker(Settings.from_env(), "warning", app_id=f"crisiswatch-bench-{os.environ['CRISISWATCH_BENCH_APP_ID']}")


KEYS = ("raw_passthrough_msgs_per_s", "raw_passthrough_batch_checkins_per_s", "worker_checkins_per_s",
        "worker_vs_raw_ratio", "worker_vs_raw_same_records_ratio", "worker_ready_s", "worker_single_records_checkins_per_s")


def run(quick: bool, *, checkins: int | None = None, citizens: int | None = None, crises: int | None = None,
        rounds: int = 3, batch_wait_s: float | None = None, records: str = "batch",
        producer_batch_bytes: str = "") -> dict[str, list[float]]:
    """Each key's value in every round; ratios are measured side by side within a round. ``records="single"``
    has the worker's rounds read one record per check-in (a build without checkin-batch/1)."""
    total = checkins or (10_000 if quick else 100_000)
    people = citizens or (2_500 if quick else 20_000)
    areas = crises or (100 if quick else 1_000)
    wait = Settings().batch_wait_s if batch_wait_s is None else batch_wait_s
    rng = np.random.default_rng(3)
    t0 = datetime.now(UTC)
    crisis_values, centres = city_crises(areas, rng, t0)
    events = city_checkins(total, people, centres, rng, t0)
    singles = single_records(events)
    batches = batch_records(events) if records == "batch" else singles
    results: dict[str, list[float]] = {key: [] for key in KEYS}
    with tempfile.TemporaryDirectory() as tmp:
        broker = EmbeddedBroker.start()
        try:
            ensure_topics(broker.bootstrap, PARTITIONS)
            create_topics(broker.bootstrap, ["bench-singles"], PARTITIONS)
            asyncio.run(preload(broker.bootstrap, "checkins", batches, crisis_values))
            asyncio.run(preload(broker.bootstrap, "bench-singles", singles))
            for n in range(rounds):
                raw = asyncio.run(passthrough(broker.bootstrap, "bench-singles", len(singles), total))
                raw_batch = asyncio.run(passthrough(broker.bootstrap, "checkins", len(batches), total))
                rate, _, ready = run_worker(broker.bootstrap, total, producer_batch_bytes, Path(tmp), f"batch-{n}", wait)
                for key, value in (("raw_passthrough_msgs_per_s", raw), ("raw_passthrough_batch_checkins_per_s", raw_batch),
                                   ("worker_checkins_per_s", rate), ("worker_vs_raw_ratio", rate / raw),
                                   ("worker_vs_raw_same_records_ratio", rate / raw_batch), ("worker_ready_s", ready)):
                    results[key].append(value)
        finally:
            broker.stop()
        if records == "single":
            results["worker_single_records_checkins_per_s"] = results["worker_checkins_per_s"]
            return results
        if quick:  # the comparison over one record per check-in only in the full run: a minute less
            del results["worker_single_records_checkins_per_s"]
            return results
        broker = EmbeddedBroker.start()  # one record per check-in, as before checkin-batch/1: once, for comparison
        try:
            ensure_topics(broker.bootstrap, PARTITIONS)
            asyncio.run(preload(broker.bootstrap, "checkins", singles, crisis_values))
            rate, _, _ = run_worker(broker.bootstrap, total, producer_batch_bytes, Path(tmp), "single", wait)
            results["worker_single_records_checkins_per_s"].append(rate)
        finally:
            broker.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (under a minute on 2 cores)")
    parser.add_argument("--json", action="store_true", help="print one JSON object: each key's rounds")
    parser.add_argument("--checkins", type=int, default=None, help="default 100,000 (quick 10,000)")
    parser.add_argument("--citizens", type=int, default=None, help="default 20,000 (quick 2,500)")
    parser.add_argument("--crises", type=int, default=None, help="default 1,000 (quick 100)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-wait", type=float, default=None,
                        help="CRISISWATCH_BATCH_WAIT_S of the workers (default: the setting's default)")
    parser.add_argument("--records", choices=("batch", "single"), default="batch",
                        help="what the worker's rounds read: checkin-batch/1 records as the API writes them, or one per check-in")
    parser.add_argument("--producer-batch-bytes", default="",
                        help="CRISISWATCH_PRODUCER_MAX_BATCH_BYTES of the workers (default: the producer's own batching, "
                             "as the stack runs; 1: the one-record batches of earlier builds)")
    parser.add_argument("--as-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.as_worker:
        as_worker()
        return
    results = run(args.quick, checkins=args.checkins, citizens=args.citizens, crises=args.crises, rounds=args.rounds,
                  batch_wait_s=args.batch_wait, records=args.records, producer_batch_bytes=args.producer_batch_bytes)
    if args.json:
        print(json.dumps(results))
        return
    print(f"worker: one worker, {PARTITIONS} partitions, {args.rounds} rounds (median, then every round)")
    for key, values in results.items():
        fmt = "{:,.2f}" if max(values) < 100 else "{:,.0f}"
        print(f"  {key:<40} {fmt.format(statistics.median(values)):>10}   rounds: {', '.join(map(fmt.format, values))}")


if __name__ == "__main__":
    main()
