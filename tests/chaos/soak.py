"""A soak run: the embedded stack under steady simulated load for a while, sampled as it goes.

    python -m tests.chaos.soak --minutes 30 [--rate 200] [--citizens 5000]

Not part of the test suite (it takes as long as you ask). Travellers around real cities check in
at ``--rate`` per second (the simulator's model and pacing); once a minute an operator declares a
crisis over the city with the most travellers through the ingest API, and cancels it the next
minute, so warnings and all-clears flow too. Every ``--every`` seconds it samples the resident
memory of each process, the consumer lag of each group (committed against end offsets) and the
error and dead-letter counts on ``/metrics``, prints one row of a table, and ends with a summary
line. Nothing here breaks anything: it shows whether the stack holds steady over time.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline import topics
from pipeline.domain.travellers import TravellerModel
from pipeline.lag import ROUTER_GROUP, SINK_GROUP, STACK_GROUPS, WORKER_GROUP, group_lags
from pipeline.observability import read_metric
from pipeline.stack import Stack, running_stack
from pipeline.testing import square
from producers.cities import load_cities
from producers.publisher import Publisher
from producers.simulator import DEFAULT_DESTINATIONS, paced_batches
from tests.chaos.harness import (
    OPERATOR_TOKEN,
    api_post,
    chaos_settings,
    child_pids,
    exit_codes,
    make_data_dir,
)

GROUP_TOPICS = {**STACK_GROUPS, WORKER_GROUP: (topics.CHECKINS,)}  # the worker's lag on check-ins alone
MB = 1024 * 1024


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--minutes", type=float, required=True, help="how long to run")
    parser.add_argument("--rate", type=float, default=200.0, help="check-ins per second (default 200)")
    parser.add_argument("--citizens", type=int, default=5000, help="simulated travellers (default 5000)")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples (default 10)")
    parser.add_argument("--seed", type=int, default=1, help="random seed of the travellers (default 1)")
    parser.add_argument("--data-dir", type=Path, default=None, help="keep the stack's data here (default: a new temporary directory)")


def rss_mb(pid: int, with_children: bool = False) -> float:
    import psutil

    try:
        process = psutil.Process(pid)
        total = process.memory_info().rss
        if with_children:
            total += sum(c.memory_info().rss for c in process.children(recursive=True))
        return float(total) / MB
    except psutil.Error:
        return float("nan")


def postgres_pid(stack: Stack) -> int:
    assert stack.postgres is not None
    return int((Path(stack.postgres.server.pgdata) / "postmaster.pid").read_text().splitlines()[0])


def lags(bootstrap: str) -> dict[str, int]:
    """Messages not yet committed, per group (the embedded broker may list an end offset slightly short)."""
    return group_lags(bootstrap, GROUP_TOPICS)


@dataclass
class Load:
    """Steady check-ins from the simulator's travellers, plus an operator's crisis every other minute
    over ``hotspot`` (lat, lon), the biggest city of the country most travellers are in."""

    stack: Stack
    model: TravellerModel
    rate: float
    stop: threading.Event
    hotspot: tuple[float, float]
    sent: int = 0
    crises: int = 0
    error: str = ""

    def checkins(self) -> None:
        publisher = Publisher(self.stack.settings, client_id="crisiswatch-soak")
        try:
            for i in range(0, len(citizens := self.model.citizens()), 1000):
                publisher.publish_events(citizens[i:i + 1000])
            for batch in paced_batches(self.model.checkins(self.rate, start=datetime.now(UTC)), self.rate, stop=self.stop):
                self.sent += publisher.publish_events(batch)
        except Exception as exc:  # reported in the summary
            self.error = repr(exc)
        finally:
            publisher.close()

    def operator(self) -> None:
        s = self.stack.settings
        api = f"http://{s.api_host}:{s.api_port}"
        minute = 0
        while not self.stop.wait(60.0):
            minute += 1
            crisis_id = f"soak-{minute // 2}"
            if minute % 2:
                lat, lon = self.hotspot
                body: dict[str, Any] = {"crisis_id": crisis_id, "title": "Soak crisis", "buffer_km": 2.0,
                                        "geometry": square(lon, lat, 0.05)}
            else:
                body = {"crisis_id": crisis_id, "op": "cancel"}
            status, answer = api_post(api, "/v1/crises", body, token=OPERATOR_TOKEN)
            if status == 202:
                self.crises += 1
            else:
                self.error = f"operator got {status}: {answer}"


def sample(stack: Stack, broker_pid: int, pg_pid: int) -> dict[str, float]:
    s = stack.settings
    pids = child_pids(stack)
    worker = f"http://{s.api_host}:{s.worker_web_port}/metrics"
    sink = f"http://{s.api_host}:{s.sink_metrics_port}/metrics"
    api = f"http://{s.api_host}:{s.api_port}/metrics"
    lag = lags(s.kafka_bootstrap)
    return {
        "rss_worker": rss_mb(pids["worker"]), "rss_sink": rss_mb(pids["sink"]), "rss_api": rss_mb(pids["api"]),
        "rss_broker": rss_mb(broker_pid), "rss_pg": rss_mb(pg_pid, with_children=True),
        "lag_worker": lag[WORKER_GROUP], "lag_sink": lag[SINK_GROUP], "lag_router": lag[ROUTER_GROUP],
        "processed": read_metric(worker, "crisiswatch_checkins_processed_total"),
        "warnings": read_metric(worker, "crisiswatch_warnings_emitted_total", ""),
        "dlq": sum(read_metric(u, "crisiswatch_dlq_messages_total", "") for u in (worker, sink, api)),
        "sink_errors": read_metric(sink, "crisiswatch_sink_errors_total"),
        "api_5xx": read_metric(api, "crisiswatch_api_requests_total", 'status="5'),
    }


COLUMNS = ("rss_worker", "rss_sink", "rss_api", "rss_broker", "rss_pg", "lag_worker", "lag_sink", "lag_router",
           "processed", "warnings", "dlq", "sink_errors", "api_5xx")


def row(elapsed_s: float, values: dict[str, float], sent: int) -> str:
    cells = [f"{elapsed_s:7.0f}", f"{sent:9d}"] + [f"{values[c]:>10.0f}" if not c.startswith("rss") else f"{values[c]:>10.1f}"
                                                   for c in COLUMNS]
    return " ".join(cells)


def run(args: argparse.Namespace) -> int:
    data_dir = args.data_dir or make_data_dir("soak")
    data_dir.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    began = time.monotonic()
    with running_stack(chaos_settings(data_dir)) as stack:
        assert stack.broker is not None
        pids, broker_pid, pg_pid = child_pids(stack), stack.broker.process.pid, postgres_pid(stack)
        cities = load_cities(DEFAULT_DESTINATIONS, 500_000)
        model = TravellerModel(cities, args.citizens, args.seed, datetime.now(UTC), id_prefix="soak",
                               country_weights=DEFAULT_DESTINATIONS)
        country, _ = Counter((c.trip or {}).get("country") for c in model.citizens()).most_common(1)[0]
        city = max((c for c in cities if c.country_code == country), key=lambda c: c.population)
        load = Load(stack, model, args.rate, stop, (city.lat, city.lon))
        threads = [threading.Thread(target=load.checkins, daemon=True), threading.Thread(target=load.operator, daemon=True)]
        for t in threads:
            t.start()
        print(f"soak: {args.citizens} travellers, {args.rate:g} check-ins/s for {args.minutes:g} min; data and logs in {data_dir}")
        print(f"{'t_s':>7} {'sent':>9} " + " ".join(f"{c:>10}" for c in COLUMNS), flush=True)
        started = time.monotonic()
        samples: list[dict[str, float]] = []
        try:
            while time.monotonic() - started < args.minutes * 60:
                time.sleep(min(args.every, max(0.0, started + args.minutes * 60 - time.monotonic())))
                samples.append(sample(stack, broker_pid, pg_pid))
                print(row(time.monotonic() - started, samples[-1], load.sent), flush=True)
                if any(code is not None for code in exit_codes(stack).values()):
                    break
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        drained = time.monotonic()
        while any(lags(stack.settings.kafka_bootstrap).values()) and time.monotonic() - drained < 60:
            time.sleep(1.0)
        final = sample(stack, broker_pid, pg_pid)
        restarted = {n: p for n, p in child_pids(stack).items() if pids.get(n) != p}
        died = {n: c for n, c in exit_codes(stack).items() if c is not None}
    first = samples[0] if samples else final
    growth = " ".join(f"{c.removeprefix('rss_')}={first[c]:.0f}->{final[c]:.0f}MB" for c in COLUMNS if c.startswith("rss"))
    print(f"soak summary: {time.monotonic() - began:.0f}s, sent={load.sent} processed={final['processed']:.0f} "
          f"warnings={final['warnings']:.0f} crises_declared_or_cancelled={load.crises} dlq={final['dlq']:.0f} "
          f"sink_errors={final['sink_errors']:.0f} api_5xx={final['api_5xx']:.0f} "
          f"max_lag worker={max(s['lag_worker'] for s in samples or [final]):.0f} "
          f"sink={max(s['lag_sink'] for s in samples or [final]):.0f} "
          f"lag_after_drain={final['lag_worker'] + final['lag_sink'] + final['lag_router']:.0f} rss {growth} "
          f"restarted={restarted or 'none'} exited={died or 'none'}" + (f" load_error={load.error}" if load.error else ""),
          flush=True)
    return 0 if not died and not restarted and not load.error else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.soak", description=__doc__.split("\n\n")[0])
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
