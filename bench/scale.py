"""Scale-out: N workers in one consumer group draining one backlog, for several N in one run.

    python -m bench.scale --workers 1,2,4,8 [--partitions 16] [--checkins 80000] [--crises 1000]

For each N, on a fresh embedded broker with ``--partitions`` partitions per topic (at least 16, so
8 workers still get two each): the workload's crises (:mod:`bench.workload`) are published, N
``crisiswatch worker`` processes are started in one consumer group and waited for until every
one answers ``/health`` (crises loaded, table recovered), then the check-in backlog is published
at once. Throughput is the check-ins processed, summed over the workers'
``crisiswatch_checkins_processed_total``, from the first processed to the last; efficiency is
throughput(N) / (N × throughput(1)). The target is 0.75 at 8 workers, which needs at least 8 free
cores besides the broker: on a smaller machine the table says how many cores it had.
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
from pathlib import Path

from aiokafka import AIOKafkaProducer

from bench.workload import checkins, workload
from pipeline import topics
from pipeline.embedded import EmbeddedBroker, die_with_parent, ensure_topics, free_port
from pipeline.observability import read_metric
from pipeline.settings import Settings
from schemas import encode

APP_ID = "crisiswatch-bench-scale"
READY_TIMEOUT_S = 240.0
DRAIN_TIMEOUT_S = 600.0


async def publish(bootstrap: str, records: list[tuple[str, bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=1 << 20)
    await producer.start()
    try:
        for topic, key, value in records:
            await producer.send(topic, value, key=key)
        await producer.flush()
    finally:
        await producer.stop()


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def one(n_workers: int, partitions: int, backlog: list[tuple[str, bytes, bytes]], crises: list[tuple[str, bytes, bytes]],
        data: Path) -> float:
    """Check-ins per second of ``n_workers`` workers in one group over the backlog."""
    broker = EmbeddedBroker.start(log_path=data / f"broker-{n_workers}.log")
    workers: list[tuple[subprocess.Popen[bytes], int]] = []
    try:
        ensure_topics(broker.bootstrap, partitions)
        asyncio.run(publish(broker.bootstrap, crises))
        for w in range(n_workers):
            port = free_port()
            settings = Settings.from_env({
                "CRISISWATCH_KAFKA_BOOTSTRAP": broker.bootstrap, "CRISISWATCH_WORKER_WEB_PORT": str(port),
                "CRISISWATCH_DATA_DIR": str(data / f"w{n_workers}-{w}"), "CRISISWATCH_PARTITIONS": str(partitions),
                "CRISISWATCH_LOG_LEVEL": "WARNING"})
            with (data / f"worker-{n_workers}-{w}.log").open("wb") as log:
                proc = subprocess.Popen([sys.executable, "-m", "bench.scale", "--as-worker"],
                                        env={**os.environ, **settings.env()}, stdout=log, stderr=subprocess.STDOUT,
                                            preexec_fn=die_with_parent)
            workers.append((proc, port))
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not all(_healthy(port) for _, port in workers):
            if any(proc.poll() is not None for proc, _ in workers):
                raise RuntimeError(f"a worker exited while starting; logs in {data}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n_workers} workers not all ready within {READY_TIMEOUT_S:.0f} s")
            time.sleep(0.2)
        time.sleep(3.0)  # the last join's rebalance settles
        asyncio.run(publish(broker.bootstrap, backlog))
        urls = [f"http://127.0.0.1:{port}/metrics" for _, port in workers]
        total = len(backlog)
        first_t: float | None = None
        first_n = 0.0
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while time.monotonic() < deadline:
            done = sum(read_metric(url, "crisiswatch_checkins_processed_total") for url in urls)
            now = time.perf_counter()
            if done > 0 and first_t is None:
                first_t, first_n = now, done
            if done >= total and first_t is not None:
                return (done - first_n) / max(now - first_t, 1e-9)
            if any(proc.poll() is not None for proc, _ in workers):
                raise RuntimeError(f"a worker exited; logs in {data}")
            time.sleep(0.1)
        raise TimeoutError(f"{n_workers} workers did not drain {total} check-ins in {DRAIN_TIMEOUT_S:.0f} s")
    finally:
        for proc, _ in workers:
            proc.terminate()
        for proc, _ in workers:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        broker.stop()


def measure(worker_counts: list[int], partitions: int, n_checkins: int, n_crises: int) -> list[dict[str, float]]:
    if partitions < max(worker_counts):
        raise ValueError(f"{partitions} partitions cannot keep {max(worker_counts)} workers busy")
    load = workload(n_crises)
    crises = [(topics.CRISIS_EVENTS, c.crisis_id.encode(), encode(c)) for c in load.crises]
    citizens = load.citizens(n_checkins, inside_share=0.1)
    backlog = [(topics.CHECKINS, c.citizen_id.encode(), encode(c)) for c in checkins(citizens)]
    rows: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in worker_counts:
            rate = one(n, partitions, backlog, crises, Path(tmp))
            base = rows[0]["checkins_per_s"] / rows[0]["workers"] if rows else rate / n
            rows.append({"workers": n, "checkins_per_s": rate, "efficiency": rate / (n * base)})
            print(f"  {n} workers: {rate:,.0f} check-ins/s", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2,4,8", help="comma-separated worker counts; the first is the baseline")
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument("--checkins", type=int, default=80_000)
    parser.add_argument("--crises", type=int, default=1000)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--as-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.as_worker:
        from pipeline.worker_cmd import run_worker

        run_worker(Settings.from_env(), "warning", app_id=APP_ID)
        return
    counts = [int(n) for n in args.workers.split(",") if n.strip()]
    rows = measure(counts, args.partitions, args.checkins, args.crises)
    if args.json:
        print(json.dumps({"partitions": args.partitions, "cpus": os.cpu_count(), "rows": rows}))
        return
    print(f"scale: {args.checkins:,} check-ins, {args.crises} crises, {args.partitions} partitions, "
          f"{os.cpu_count()} CPUs; efficiency = throughput(N) / (N x throughput({counts[0]}) / {counts[0]})")
    print(f"  {'workers':>7}  {'check-ins/s':>12}  {'efficiency':>10}")
    for row in rows:
        print(f"  {row['workers']:>7.0f}  {row['checkins_per_s']:>12,.0f}  {row['efficiency']:>10.2f}")


if __name__ == "__main__":
    main()
