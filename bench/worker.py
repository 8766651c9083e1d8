"""Check-ins per second through one crisiswatch worker, next to a raw consume→produce passthrough.

    python -m bench.worker [--checkins 40000] [--citizens 10000] [--crises 200]

The runtime's own work is timed first, in process, with no Kafka. Then, on one embedded broker
(4 partitions), the same pre-loaded check-ins are read by:
1. a raw aiokafka consumer that produces every message to another topic (the ceiling for any
   Kafka-to-Kafka step in Python on this machine);
2. ``crisiswatch worker`` with the embedded profile's one-record producer batches;
3. ``crisiswatch worker`` with the producer's default batching (what it runs with on Apache Kafka).
The worker's rate is measured from its own ``crisiswatch_checkins_processed_total``, from the first
check-in processed to the last, so start-up and group join are not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from pipeline.embedded import EmbeddedBroker, create_topics, ensure_topics, free_port
from pipeline.observability import read_metric
from pipeline.settings import Settings
from pipeline.testing import make_checkin, make_crisis, square
from schemas import encode

PARTITIONS = 4


async def preload(bootstrap: str, checkins: list[bytes], keys: list[bytes], crises: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=1 << 20)
    await producer.start()
    try:
        for value in crises:
            await producer.send("crisis-events", value, key=value[:16])
        for key, value in zip(keys, checkins, strict=True):
            await producer.send("checkins", value, key=key)
        await producer.flush()
    finally:
        await producer.stop()


async def passthrough(bootstrap: str, total: int) -> float:
    out_topic = "bench-passthrough"
    create_topics(bootstrap, [out_topic], PARTITIONS)
    consumer = AIOKafkaConsumer("checkins", bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                                enable_auto_commit=False, fetch_max_wait_ms=100)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=1 << 20)
    await consumer.start()
    await producer.start()
    try:
        seen = 0
        started = time.perf_counter()
        while seen < total:
            batches = await consumer.getmany(timeout_ms=500, max_records=5000)
            for records in batches.values():
                for record in records:
                    await producer.send(out_topic, record.value, key=record.key)
                seen += len(records)
        await producer.flush()
        return total / (time.perf_counter() - started)
    finally:
        await consumer.stop()
        await producer.stop()


def processed(url: str) -> float:
    return read_metric(url, "crisiswatch_checkins_processed_total")


def run_worker(bootstrap: str, total: int, batch_bytes: str, data_dir: Path, app_suffix: str,
               batch_wait_s: float) -> tuple[float, float]:
    """Check-ins per second of one worker over the preloaded backlog, and its mean batch size."""
    port = free_port()
    settings = Settings.from_env({"CRISISWATCH_KAFKA_BOOTSTRAP": bootstrap, "CRISISWATCH_WORKER_WEB_PORT": str(port),
                                  "CRISISWATCH_DATA_DIR": str(data_dir), "CRISISWATCH_PARTITIONS": str(PARTITIONS),
                                  "CRISISWATCH_PRODUCER_MAX_BATCH_BYTES": batch_bytes, "CRISISWATCH_LOG_LEVEL": "WARNING",
                                  "CRISISWATCH_BATCH_WAIT_S": str(batch_wait_s)})
    env = {**os.environ, **settings.env(), "CRISISWATCH_BENCH_APP_ID": app_suffix}
    log = (data_dir / f"worker-{app_suffix}.log").open("wb")
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
                return (done - first_n) / max(time.perf_counter() - first_t, 1e-9), mean_batch
            if worker.poll() is not None:
                raise RuntimeError(f"worker exited; see {log.name}")
            time.sleep(0.05)
        raise TimeoutError(f"worker processed {processed(url)} of {total} in 300 s")
    finally:
        worker.terminate()
        worker.wait(30)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkins", type=int, default=40_000)
    parser.add_argument("--citizens", type=int, default=10_000)
    parser.add_argument("--crises", type=int, default=200)
    parser.add_argument("--batch-wait", type=float, default=Settings().batch_wait_s,
                        help="CRISISWATCH_BATCH_WAIT_S of the workers (default: the setting's default)")
    parser.add_argument("--as-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.as_worker:
        as_worker()
        return
    rng = np.random.default_rng(3)
    t0 = datetime.now(UTC)
    areas = [(rng.uniform(-170, 170), rng.uniform(-60, 60)) for _ in range(args.crises)]
    crises = [encode(make_crisis(f"bench-{i}", square(lon, lat, 0.5), buffer_km=10.0, effective=t0))
              for i, (lon, lat) in enumerate(areas)]
    checkins, keys = [], []
    for n in range(args.checkins):
        citizen = f"b{n % args.citizens:06d}"
        lon, lat = areas[int(rng.integers(0, len(areas)))]
        c = make_checkin(citizen, float(np.clip(lat + rng.normal(0, 0.6), -89, 89)),
                         float(np.clip(lon + rng.normal(0, 0.6), -180, 180)),
                         observed_at=t0 + timedelta(seconds=n // args.citizens))
        checkins.append(encode(c))
        keys.append(citizen.encode())
    with tempfile.TemporaryDirectory() as tmp:
        broker = EmbeddedBroker.start()
        try:
            ensure_topics(broker.bootstrap, PARTITIONS)
            asyncio.run(preload(broker.bootstrap, checkins, keys, crises))
            raw = asyncio.run(passthrough(broker.bootstrap, args.checkins))
            one, one_batch = run_worker(broker.bootstrap, args.checkins, "1", Path(tmp), "one", args.batch_wait)
            batched, batched_batch = run_worker(broker.bootstrap, args.checkins, "", Path(tmp), "batched", args.batch_wait)
        finally:
            broker.stop()
    batch = max(1, round((one_batch + batched_batch) / 2))
    alone = runtime_alone(checkins, keys, crises, batch=batch)  # the batches the workers really took
    print(f"worker: {args.checkins} check-ins of {args.citizens} citizens, {args.crises} crises, "
          f"{PARTITIONS} partitions, one worker")
    print(f"  raw aiokafka passthrough                {raw:>9,.0f} msg/s")
    print(f"  geofence runtime alone, no Kafka        {alone:>9,.0f} check-ins/s   (batches of {batch:,}, as the workers took them)")
    print(f"  worker, one-record batches (embedded)   {one:>9,.0f} check-ins/s   "
          f"({one / raw:.2f}x passthrough, {one / alone:.2f}x runtime alone; mean batch {one_batch:,.0f})")
    print(f"  worker, default batching (Apache Kafka) {batched:>9,.0f} check-ins/s   "
          f"({batched / raw:.2f}x passthrough, {batched / alone:.2f}x runtime alone; mean batch {batched_batch:,.0f})")


if __name__ == "__main__":
    main()
