"""A new crisis against every citizen a worker tracks: how soon the first warning, how soon the last.

    python -m bench.sweep [--citizens 1000000] [--inside 100000] [--crises 1000] [--rounds 3] [--json]

One embedded broker; each round runs in a fresh process (so its memory figure is its own) that does
what a worker does, through the worker's own objects (:func:`pipeline.app.create_app`): the runtime,
the ``citizen-state`` table with its changelog writes, and the app's producer to the broker.

1. ``--crises`` active crises around cities (polygons of 20–500 vertices) are loaded, as a worker
   loads the crisis log at start;
2. ``--citizens`` citizen states are written to the table (the worker's own writes), clustered
   around those crises, one in ten holding a presence for the crisis next to them; the process's
   resident memory before and after, divided by the number of citizens, is ``bytes_per_citizen``;
3. a new crisis covering ``--inside`` of them is seen (as the crisis reader sees it: bytes,
   admitted, applied). ``sweep_first_warning_s``: from then until Kafka acknowledged the first
   warnings; ``sweep_all_warnings_s``: until every warning and every changed state is
   acknowledged (the point where the worker would read its next message).

The machine may be shared; the figures are per round so the spread shows, and each round also
reports (on stderr) the CPU seconds the worker process spent on the sweep (``sweep_cpu_s``), which
a busy machine inflates less than wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import psutil

PARTITIONS = 4
KEYS = ("sweep_first_warning_s", "sweep_all_warnings_s", "bytes_per_citizen")
NEW_CRISIS = (2.35, 48.86)  # the new crisis's centre (lon, lat); no other crisis within 5 degrees
NEW_HALF_SIDE = 0.2  # degrees


def polygon(lon: float, lat: float, radius_deg: float, vertices: int, rng: np.random.Generator) -> dict[str, Any]:
    """A star-shaped ring around (lon, lat): a city-sized area with an irregular edge."""
    angles = np.sort(rng.uniform(0, 2 * math.pi, vertices))
    radii = radius_deg * rng.uniform(0.6, 1.0, vertices)
    ring = [[float(lon + r * math.cos(a) / max(math.cos(math.radians(lat)), 0.2)), float(lat + r * math.sin(a))]
            for a, r in zip(angles, radii, strict=True)]
    return {"type": "Polygon", "coordinates": [[*ring, ring[0]]]}


def cities(n: int, rng: np.random.Generator) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    while len(out) < n:
        lon, lat = float(rng.uniform(-170, 170)), float(rng.uniform(-55, 60))
        if abs(lon - NEW_CRISIS[0]) > 5 or abs(lat - NEW_CRISIS[1]) > 5:
            out.append((lon, lat))
    return out


async def one_round(bootstrap: str, citizens: int, inside: int, n_crises: int, seed: int) -> dict[str, float]:
    from aiokafka.structs import TopicPartition
    from prometheus_client import CollectorRegistry

    from pipeline import topics
    from pipeline.app import create_app, internal_topics
    from pipeline.domain.tracking import CitizenState, Presence
    from pipeline.embedded import ensure_topics
    from pipeline.runtime import DeadLetter, RawMessage
    from pipeline.settings import Settings
    from pipeline.testing import make_crisis, square
    from schemas import encode

    rng = np.random.default_rng(seed)
    now = datetime.now(UTC).replace(microsecond=0)
    app_id = f"crisiswatch-sweep-{seed}-{os.getpid()}"
    with tempfile.TemporaryDirectory() as tmp:
        ensure_topics(bootstrap, PARTITIONS, extra=internal_topics(app_id))
        settings = Settings(kafka_bootstrap=bootstrap, partitions=PARTITIONS, data_dir=Path(tmp))
        app, runtime = create_app(settings, registry=CollectorRegistry(), app_id=app_id, clock=lambda: now)
        # One worker owning every partition, as after its group join.
        owned = {TopicPartition(topics.CHECKINS, p) for p in range(PARTITIONS)}
        app.assignor.assigned_actives = lambda: owned  # type: ignore[method-assign]
        await app.producer.start()
        try:
            places = cities(n_crises, rng)
            crises = [make_crisis(f"city-{i}", polygon(lon, lat, float(rng.uniform(0.05, 0.3)),
                                                        int(rng.integers(20, 501)), rng),
                                  buffer_km=float(rng.choice([0.0, 5.0, 20.0])), effective=now - timedelta(hours=1))
                      for i, (lon, lat) in enumerate(places)]
            runtime.remember(crises)
            _ = runtime.tracker.index
            loaded = time.perf_counter()

            # Citizens: ``inside`` in the new crisis's square, the others around the cities.
            gc.collect()
            rss0 = psutil.Process().memory_info().rss
            chunk = 50_000
            warned = Presence("in", 1, 1, True)
            observed = now - timedelta(minutes=5)
            for start in range(0, citizens, chunk):
                n = min(chunk, citizens - start)
                ids = range(start, start + n)
                city = rng.integers(0, len(places), n)
                lons = np.array([places[c][0] for c in city]) + rng.normal(0, 0.25, n)
                lats = np.array([places[c][1] for c in city]) + rng.normal(0, 0.25, n)
                first_inside = max(0, min(n, inside - start))
                lons[:first_inside] = rng.uniform(NEW_CRISIS[0] - NEW_HALF_SIDE * 0.99, NEW_CRISIS[0] + NEW_HALF_SIDE * 0.99,
                                                  first_inside)
                lats[:first_inside] = rng.uniform(NEW_CRISIS[1] - NEW_HALF_SIDE * 0.99, NEW_CRISIS[1] + NEW_HALF_SIDE * 0.99,
                                                  first_inside)
                lats = np.clip(lats, -89.0, 89.0)
                lons = (lons + 180.0) % 360.0 - 180.0
                holds = rng.random(n) < 0.1
                for j, cid in enumerate(ids):
                    presence = {f"city-{city[j]}": warned} if holds[j] and j >= first_inside else {}
                    state = CitizenState(f"citizen-{cid:07d}", float(lats[j]), float(lons[j]), 12.0, observed, presence)
                    runtime.states[state.citizen_id] = store_value(state)
                runtime.states.unsent.clear()  # type: ignore[attr-defined]  # as recovered: nothing left to send
                getattr(runtime.states, "unsent_partitions", []).clear()
            gc.collect()
            per_citizen = (psutil.Process().memory_info().rss - rss0) / citizens
            filled = time.perf_counter()

            crisis = make_crisis("sweep-new", square(*NEW_CRISIS, NEW_HALF_SIDE), buffer_km=5.0, effective=now)
            message = RawMessage(encode(crisis), crisis.crisis_id.encode(), topics.CRISIS_EVENTS)
            emitter = runtime.emitter
            first: list[float] = []
            sent = [0]

            class Timed:
                async def warnings(self, warnings: Sequence[Any]) -> None:
                    await emitter.warnings(warnings)
                    sent[0] += len(warnings)
                    if warnings and not first:
                        first.append(time.perf_counter())

                async def dead_letters(self, letters: Sequence[Any]) -> None:
                    await emitter.dead_letters(letters)

            runtime.emitter = Timed()
            seen, cpu = time.perf_counter(), time.process_time()
            admitted = runtime.admit_crisis(message)
            if isinstance(admitted, DeadLetter):
                raise SystemExit(f"the new crisis was refused: {admitted.reason}")
            await runtime.apply_crisis(admitted)
            done, cpu = time.perf_counter(), time.process_time() - cpu
            if sent[0] < inside:
                raise SystemExit(f"only {sent[0]} warnings for {inside} citizens inside")
            return {"sweep_first_warning_s": first[0] - seen, "sweep_all_warnings_s": done - seen,
                    "bytes_per_citizen": per_citizen, "warnings": float(sent[0]), "sweep_cpu_s": cpu,
                    "fill_s": filled - loaded}
        finally:
            await app.producer.stop()


def store_value(state: Any) -> Any:
    """A state as the runtime writes it to the worker's table."""
    try:
        from pipeline.citizens import encode_state
    except ImportError:  # the version before pipeline.citizens, for the before/after comparison
        return state.to_dict()
    return encode_state(state)


def run(quick: bool, *, citizens: int | None = None, inside: int | None = None, n_crises: int = 1000,
        rounds: int = 3) -> dict[str, list[float]]:
    """Per-round values of ``sweep_first_warning_s``, ``sweep_all_warnings_s`` and ``bytes_per_citizen``
    (quick: 100,000 citizens, 10,000 inside)."""
    from pipeline.embedded import EmbeddedBroker, ensure_topics

    citizens = citizens or (100_000 if quick else 1_000_000)
    inside = inside if inside is not None else citizens // 10
    results: dict[str, list[float]] = {key: [] for key in KEYS}
    broker = EmbeddedBroker.start()
    try:
        ensure_topics(broker.bootstrap, PARTITIONS)
        for seed in range(1, rounds + 1):
            out = subprocess.run([sys.executable, "-m", "bench.sweep", "--round", "--bootstrap", broker.bootstrap,
                                  "--citizens", str(citizens), "--inside", str(inside), "--crises", str(n_crises),
                                  "--seed", str(seed)], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"round {seed} failed:\n{out.stderr[-4000:]}")
            values = json.loads(out.stdout.strip().splitlines()[-1])
            for key in KEYS:
                results[key].append(round(values[key], 4 if key != "bytes_per_citizen" else 1))
            print(f"round {seed}: " + ", ".join(f"{k}={v:.3f}" for k, v in values.items()), file=sys.stderr)
    finally:
        broker.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--citizens", type=int, default=1_000_000)
    parser.add_argument("--inside", type=int, default=None, help="citizens inside the new crisis (default: a tenth)")
    parser.add_argument("--crises", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="100,000 citizens, 10,000 inside")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--round", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.round:
        inside = args.inside if args.inside is not None else args.citizens // 10
        print(json.dumps(asyncio.run(one_round(args.bootstrap, args.citizens, inside, args.crises, args.seed))))
        return
    citizens = 100_000 if args.quick else args.citizens
    results = run(args.quick, citizens=citizens, inside=args.inside, n_crises=args.crises, rounds=args.rounds)
    if args.json:
        print(json.dumps(results))
        return
    print(f"sweep: {citizens:,} citizens, {args.inside or citizens // 10:,} inside the new crisis, "
          f"{args.crises} active crises, {PARTITIONS} partitions, one worker")
    for key, values in results.items():
        print(f"  {key:<24} median {float(np.median(values)):>10.3f}   rounds {values}")


if __name__ == "__main__":
    main()
