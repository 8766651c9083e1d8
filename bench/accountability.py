"""Facts per second folded by the accountability process (``crisiswatch accountability``).

    python -m bench.accountability [--facts 20000] [--repeat 3] [--compare DIR]

On an embedded broker of its own (4 partitions, the producers' own batching,
as ``crisiswatch up`` runs it), warnings, delivery outcomes and replies about many citizens of a few
crises are preloaded on their topics; then one accountability process reads them all: re-keys them by
crisis, folds them into the standings and writes the standings to its changelog. The rate counts the
facts whose offsets the folding agent committed (it commits only what it folded and saw acknowledged
in the changelog), from the first commit to the last, so start-up and group join are not counted;
commits come once a second, so a run needs several seconds of work to be meaningful.

``--compare DIR`` runs the process from another checkout (say, an earlier commit's tree) in
alternation with this one, on fresh brokers, and prints the ratio: side by side in one run, which is
the only comparison worth making on a shared machine.
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

from aiokafka import AIOKafkaProducer

from pipeline import topics
from pipeline.accountability_app import APP_ID, regrouped_topic
from pipeline.domain.ids import warning_id
from pipeline.embedded import EmbeddedBroker, ensure_topics, free_port
from pipeline.settings import Settings
from pipeline.stack import internal_topics
from schemas import Ack, Delivery, Warning, encode

PARTITIONS = 4
CRISES = 20
ROOT = Path(__file__).resolve().parents[1]


def facts(total: int) -> list[tuple[str, bytes, bytes]]:
    """(topic, key, value): per citizen a warning, its delivery and a reply, until ``total``."""
    t0 = datetime.now(UTC) - timedelta(hours=1)
    out: list[tuple[str, bytes, bytes]] = []
    n = 0
    while len(out) < total:
        citizen, crisis = f"b{n:07d}", f"bench-{n % CRISES}"
        w = Warning(warning_id(citizen, crisis, 1, "inside", 0), citizen, crisis, 1, "inside", "severe", "Flood",
                    "Go up", 0.0, -6.2, 106.8, t0, t0, ("ID",))
        key = citizen.encode()
        out.append((topics.WARNINGS, key, encode(w)))
        out.append((topics.DELIVERIES, key, encode(Delivery(w.warning_id, citizen, crisis, "webhook", "delivered", 1,
                                                            t0 + timedelta(seconds=1)))))
        out.append((topics.ACKS, key, encode(Ack(citizen, crisis, "safe" if n % 3 else "need_help",
                                                 t0 + timedelta(minutes=5), "app"))))
        n += 1
    return out[:total]


async def preload(bootstrap: str, messages: list[tuple[str, bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=1 << 20)
    await producer.start()
    try:
        for topic, key, value in messages:
            await producer.send(topic, value, key=key)
        await producer.flush()
    finally:
        await producer.stop()


class Folded:
    """The facts the folding agent committed: its group's offsets on the re-keyed stream (read without
    joining the group)."""

    def __init__(self, bootstrap: str) -> None:
        from kafka import KafkaConsumer, TopicPartition

        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=APP_ID, enable_auto_commit=False,
                                      client_id="bench-accountability")
        self.partitions = [TopicPartition(regrouped_topic(), p) for p in range(PARTITIONS)]

    def __call__(self) -> int:
        return sum(self.consumer.committed(tp) or 0 for tp in self.partitions)

    def close(self) -> None:
        self.consumer.close(autocommit=False)


def one_run(messages: list[tuple[str, bytes, bytes]], code: Path, data_dir: Path, timeout_s: float = 600) -> float:
    """Facts per second of one accountability process run from ``code``, on a fresh broker."""
    data_dir.mkdir(parents=True, exist_ok=True)
    broker = EmbeddedBroker.start(log_path=data_dir / "broker.log")
    try:
        ensure_topics(broker.bootstrap, PARTITIONS, extra=internal_topics())
        asyncio.run(preload(broker.bootstrap, messages))
        settings = Settings.from_env({
            "CRISISWATCH_KAFKA_BOOTSTRAP": broker.bootstrap, "CRISISWATCH_DATA_DIR": str(data_dir),
            "CRISISWATCH_ACCOUNTABILITY_WEB_PORT": str(free_port()), "CRISISWATCH_PARTITIONS": str(PARTITIONS),
            "CRISISWATCH_LOG_LEVEL": "WARNING", "CRISISWATCH_STATUS_INTERVAL_S": "1.0"})
        env = {**os.environ, **settings.env(), "PYTHONPATH": str(code)}
        log_path = data_dir / "accountability.log"
        with log_path.open("ab") as log:
            # run from the checkout's directory: `python -m` puts the working directory first on the path
            process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "accountability"], cwd=code, env=env,
                                       stdout=log, stderr=subprocess.STDOUT)
        folded = Folded(broker.bootstrap)
        try:
            total = len(messages)
            deadline = time.monotonic() + timeout_s
            first: tuple[float, int] | None = None
            while time.monotonic() < deadline:
                done = folded()
                now = time.perf_counter()
                if done > 0 and first is None:
                    first = (now, done)
                if done >= total and first is not None:
                    return (done - first[1]) / max(now - first[0], 1e-9)
                if process.poll() is not None:
                    raise RuntimeError(f"the accountability process exited; see {log_path}")
                time.sleep(0.1)
            raise TimeoutError(f"{folded()} of {total} facts folded in {timeout_s:.0f} s")
        finally:
            folded.close()
            process.terminate()
            process.wait(30)
    finally:
        broker.stop()


def run(quick: bool, compare: Path | None = None) -> dict[str, list[float]]:
    """``accountability_facts_per_s``: one figure per run of this checkout (and, with ``compare``,
    ``accountability_facts_per_s_compared`` for the other checkout's runs, alternating with these)."""
    messages = facts(6_000 if quick else 20_000)
    repeat = 1 if quick else 3
    results: dict[str, list[float]] = {"accountability_facts_per_s": []}
    if compare is not None:
        results["accountability_facts_per_s_compared"] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(repeat):
            if compare is not None:
                results["accountability_facts_per_s_compared"].append(
                    one_run(messages, compare, Path(tmp) / f"compared-{n}"))
            here = Path(tmp) / f"this-{n}"
            results["accountability_facts_per_s"].append(one_run(messages, ROOT, here))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="6,000 facts, one run")
    parser.add_argument("--compare", type=Path, help="another checkout to run alternately with this one")
    args = parser.parse_args()
    if args.compare is not None:
        args.compare = args.compare.resolve()
    results = run(args.quick, args.compare)
    this = results["accountability_facts_per_s"]
    print(f"accountability: {len(facts(6_000 if args.quick else 20_000)):,} facts (warnings, deliveries, replies) of "
          f"{CRISES} crises, {PARTITIONS} partitions, one process, the producers' own batching")
    print(f"  this checkout      {', '.join(f'{r:,.0f}' for r in this)} facts/s")
    if args.compare is not None:
        other = results["accountability_facts_per_s_compared"]
        print(f"  {args.compare}  {', '.join(f'{r:,.0f}' for r in other)} facts/s")
        ratios = [a / b for a, b in zip(this, other, strict=True)]
        print(f"  ratio (this / compared, run by run) {', '.join(f'{r:.2f}' for r in ratios)}")


if __name__ == "__main__":
    main()
