"""Check-ins per second through ``POST /v1/checkins``, next to a raw kafka-python producer.

    python -m bench.api [--quick] [--json] [--batches 40] [--batch-size 1000] [--rounds 3]

One embedded broker. Each round, side by side:
1. a raw kafka-python producer, configured as the API's publisher is (acks=all, linger 5 ms, one
   request in flight), sends the check-ins of each batch as ready-made records and waits for
   every acknowledgement before the next batch: the ceiling for handing check-ins to Kafka from
   Python on this machine;
2. ``crisiswatch api`` (its own process, uvicorn) receives the same batches as JSON bodies, one
   request at a time from one HTTP client, and answers 202 once Kafka acknowledged them: parse,
   validation, encoding, publishing and HTTP included.
Both send the same number of check-ins; ``api_vs_raw_producer_ratio`` is the API's rate over the
raw producer's in the same round. Every round's values are printed, and the median.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from pipeline.embedded import EmbeddedBroker, ensure_topics, free_port, wait_for_port
from pipeline.settings import Settings

PARTITIONS = 4
TOKEN = secrets.token_hex(16)  # this run's ingest token
KEYS = ("raw_producer_checkins_per_s", "api_checkins_per_s", "api_vs_raw_producer_ratio")


def batches(count: int, size: int, seed: int = 5) -> list[list[dict[str, Any]]]:
    """Check-ins as a phone app posts them: ``schema`` left out, time now, coordinates around the world."""
    rng = np.random.default_rng(seed)
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    out = []
    for b in range(count):
        lats, lons = rng.uniform(-60, 60, size), rng.uniform(-180, 180, size)
        out.append([{"citizen_id": f"api-{b:04d}-{i:05d}", "lat": round(float(lats[i]), 6),
                     "lon": round(float(lons[i]), 6), "accuracy_m": 15.0, "observed_at": now, "source": "app"}
                    for i in range(size)])
    return out


def raw_producer(bootstrap: str, records: list[list[tuple[bytes, bytes]]]) -> float:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, retries=3,
                             max_in_flight_requests_per_connection=1)
    try:
        producer.send("bench-raw", b"{}", key=b"warm-up").get(30)
        started = time.perf_counter()
        for batch in records:
            futures = [producer.send("bench-raw", value, key=key) for key, value in batch]
            for future in futures:
                future.get(30)
        return sum(map(len, records)) / (time.perf_counter() - started)
    finally:
        producer.close(10)


def through_api(base: str, bodies: list[bytes], per_body: int) -> float:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    with httpx.Client(base_url=base, timeout=60) as http:
        http.post("/v1/checkins", content=bodies[0], headers=headers).raise_for_status()  # connection, producer, metadata
        started = time.perf_counter()
        for body in bodies:
            answer = http.post("/v1/checkins", content=body, headers=headers)
            if answer.status_code != 202:
                raise RuntimeError(f"API answered {answer.status_code}: {answer.text[:300]}")
        return len(bodies) * per_body / (time.perf_counter() - started)


def run(quick: bool, *, batches_per_round: int | None = None, batch_size: int = 1000, rounds: int = 3,
        batch_records: bool = True) -> dict[str, list[float]]:
    """Each key's value in every round (ratios measured side by side in the round). ``batch_records=False``:
    the API writes one record per check-in (CRISISWATCH_CHECKIN_BATCH_RECORDS=false)."""
    count = batches_per_round or (15 if quick else 60)
    posted = batches(count, batch_size)
    bodies = [json.dumps(b, separators=(",", ":")).encode() for b in posted]
    records = [[(c["citizen_id"].encode(), json.dumps({"schema": "checkin/1", **c}, separators=(",", ":")).encode())
                for c in batch] for batch in posted]
    results: dict[str, list[float]] = {key: [] for key in KEYS}
    with tempfile.TemporaryDirectory() as tmp:
        broker = EmbeddedBroker.start()
        api = None
        try:
            ensure_topics(broker.bootstrap, PARTITIONS)
            from pipeline.embedded import create_topics

            create_topics(broker.bootstrap, ["bench-raw"], PARTITIONS)
            port = free_port()
            settings = Settings.from_env({"CRISISWATCH_KAFKA_BOOTSTRAP": broker.bootstrap, "CRISISWATCH_API_PORT": str(port),
                                          "CRISISWATCH_INGEST_TOKEN": TOKEN, "CRISISWATCH_LOG_LEVEL": "WARNING",
                                          "CRISISWATCH_DATA_DIR": tmp, "CRISISWATCH_PARTITIONS": str(PARTITIONS),
                                          "CRISISWATCH_CHECKIN_BATCH_RECORDS": "true" if batch_records else "false"})
            log = (Path(tmp) / "api.log").open("wb")
            api = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "api", "--host", "127.0.0.1"],
                                   env={**os.environ, **settings.env()}, stdout=log, stderr=subprocess.STDOUT)
            wait_for_port("127.0.0.1", port, timeout_s=60)
            for _ in range(rounds):
                raw = raw_producer(broker.bootstrap, records)
                rate = through_api(f"http://127.0.0.1:{port}", bodies, batch_size)
                results["raw_producer_checkins_per_s"].append(raw)
                results["api_checkins_per_s"].append(rate)
                results["api_vs_raw_producer_ratio"].append(rate / raw)
        finally:
            if api is not None:
                api.terminate()
                api.wait(30)
            broker.stop()
    return results


def report(results: dict[str, list[float]]) -> str:
    lines = []
    for key, values in results.items():
        shown = ", ".join(f"{v:,.2f}" if v < 100 else f"{v:,.0f}" for v in values)
        median = statistics.median(values)
        lines.append(f"  {key:<32} {median:>12,.2f}   rounds: {shown}" if median < 100 else
                     f"  {key:<32} {median:>12,.0f}   rounds: {shown}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer batches per round (under a minute)")
    parser.add_argument("--json", action="store_true", help="print one JSON object: each key's rounds")
    parser.add_argument("--batches", type=int, default=None, help="batches per round (default 60, quick 15)")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--single-records", action="store_true",
                        help="the API writes one record per check-in (CRISISWATCH_CHECKIN_BATCH_RECORDS=false)")
    args = parser.parse_args()
    results = run(args.quick, batches_per_round=args.batches, batch_size=args.batch_size, rounds=args.rounds,
                  batch_records=not args.single_records)
    if args.json:
        print(json.dumps(results))
    else:
        print(f"api: batches of {args.batch_size} check-ins, {args.rounds} rounds (median, then every round)")
        print(report(results))


if __name__ == "__main__":
    main()
