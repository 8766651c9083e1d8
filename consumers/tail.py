"""``crisiswatch tail``: print warnings as they arrive, filtered by crisis, country or kind.

Finds the broker of the stack ``crisiswatch up`` runs on the data directory by itself
(:mod:`pipeline.state_file`). A read-only observer: no consumer group (every partition is assigned, nothing is committed), so
it never takes partitions from a real consumer. Starts at the end unless ``--from-beginning``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC
from types import FrameType
from typing import Any, TextIO, get_args

from consumers.kafka_io import Message, poll_messages
from pipeline import topics
from pipeline.settings import Settings
from pipeline.state_file import client_settings, no_stack
from schemas import InvalidEvent, Warning, decode
from schemas.models import WarningKind


@dataclass(frozen=True, slots=True)
class WarningFilter:
    crisis_id: str | None = None
    country_code: str | None = None
    kinds: frozenset[str] = frozenset()

    def matches(self, warning: Warning) -> bool:
        return ((self.crisis_id is None or warning.crisis_id == self.crisis_id)
                and (self.country_code is None or self.country_code in warning.country_codes)
                and (not self.kinds or warning.kind in self.kinds))


# A distance says something only for a citizen outside the area (near it, or just gone out of it);
# severity means nothing on an all-clear.
_DISTANCE_KINDS = frozenset({"near", "exited"})


def format_line(warning: Warning) -> str:
    """One line for a person: time (UTC, to the second), kind, citizen, severity, crisis title and
    country, the distance where it means something, and the crisis id to filter on (``--crisis``)."""
    when = warning.emitted_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    severity = "" if warning.kind == "all_clear" else warning.severity
    where = ",".join(warning.country_codes) or "--"
    distance = (f", {warning.distance_km:.1f} km away" if warning.kind in _DISTANCE_KINDS and warning.distance_km > 0
                else "")
    return (f"{when}  {warning.kind:<9}  {warning.citizen_id}  {severity:<8}  {warning.title} ({where}{distance})"
            f"  [{warning.crisis_id}]")


def format_json(warning: Warning) -> str:
    return json.dumps(warning.to_dict(), ensure_ascii=False, separators=(",", ":"))


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--crisis", metavar="ID", help="only warnings about this crisis")
    parser.add_argument("--country", metavar="CC",
                        help="read the per-country topic warnings.<CC> (ISO 3166-1 alpha-2) instead of warnings")
    parser.add_argument("--kind", action="append", choices=get_args(WarningKind), metavar="K",
                        help="only this kind (inside, entered, near, exited, all_clear); repeatable")
    parser.add_argument("--from-beginning", action="store_true", help="start at the oldest warning kept, not the end")
    parser.add_argument("--max", type=int, metavar="N", help="exit after printing N warnings")
    parser.add_argument("--json", action="store_true", help="print warning/1 JSON lines (one per warning, for programs)")
    parser.add_argument("--topic", help="read this topic instead (default: warnings, or warnings.<CC> with --country)")
    parser.add_argument("--bootstrap", metavar="HOST:PORT",
                        help="Kafka bootstrap servers [env CRISISWATCH_KAFKA_BOOTSTRAP; default: the running stack's]")
    parser.add_argument("--wait-s", type=float, default=None, metavar="S",
                        help="give up (exit 1) when nothing matched for S seconds; default: wait forever")


class TailError(Exception):
    """Raised with a one-line message for the user; the verb exits 2."""


def _assign(consumer: Any, topic: str, from_beginning: bool, stop: threading.Event, err: TextIO,
            deadline: float | None) -> bool:
    import time

    from kafka import TopicPartition

    waited = False
    while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
        partitions = consumer.partitions_for_topic(topic)
        if partitions:
            assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
            consumer.assign(assigned)
            if from_beginning:
                consumer.seek_to_beginning(*assigned)
            else:
                consumer.seek_to_end(*assigned)
            for tp in assigned:  # resolve the start now, so "listening" below is true
                consumer.position(tp)
            start = "the beginning" if from_beginning else "now"
            print(f"crisiswatch tail: listening on {topic} ({len(assigned)} partitions) from {start}", file=err, flush=True)
            return True
        if not waited:
            print(f"crisiswatch tail: waiting for topic {topic} to exist", file=err, flush=True)
            waited = True
        stop.wait(1.0)
    return False


def tail(bootstrap: str, topic: str, wanted: WarningFilter, *, settings: Settings, stop: threading.Event,
         out: TextIO = sys.stdout, err: TextIO = sys.stderr, as_json: bool = False, from_beginning: bool = False,
         max_count: int | None = None, wait_s: float | None = None) -> int:
    """Print matching warnings until ``stop``, ``max_count`` or ``wait_s`` of silence; return how many."""
    import time

    from kafka import KafkaConsumer
    from kafka.errors import KafkaError

    try:
        consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                 allow_auto_create_topics=False, client_id="crisiswatch-tail", bootstrap_timeout_ms=10_000,
                                 **settings.kafka_client_options())
    except KafkaError as exc:
        raise TailError(f"cannot reach Kafka at {bootstrap}: {exc}") from exc
    printed = 0
    last_match = time.monotonic()
    try:
        if not _assign(consumer, topic, from_beginning, stop, err, None if wait_s is None else last_match + wait_s):
            return 0
        while not stop.is_set() and (max_count is None or printed < max_count):
            if wait_s is not None and time.monotonic() - last_match > wait_s:
                break
            messages: Sequence[Message] = poll_messages(consumer, 0.5, 500)
            for message in messages:
                try:
                    warning = decode(message.value, Warning)
                except InvalidEvent as exc:
                    print(f"crisiswatch tail: skipping {message.where()}: {exc}", file=err, flush=True)
                    continue
                if not wanted.matches(warning):
                    continue
                print(format_json(warning) if as_json else format_line(warning), file=out, flush=True)
                printed += 1
                last_match = time.monotonic()
                if max_count is not None and printed >= max_count:
                    break
    finally:
        consumer.close()
    return printed


def run(args: argparse.Namespace) -> int:
    settings, _stack = client_settings()
    bootstrap = args.bootstrap or settings.kafka_bootstrap
    if not bootstrap:
        print(f"crisiswatch tail: {no_stack(settings)} or --bootstrap", file=sys.stderr)
        return 2
    if args.max is not None and args.max < 1:
        print("crisiswatch tail: --max must be at least 1", file=sys.stderr)
        return 2
    country = None
    topic = args.topic or topics.WARNINGS
    if args.country:
        try:
            country_topic = topics.country_warning_topic(args.country)
        except ValueError as exc:
            print(f"crisiswatch tail: --country: {exc}", file=sys.stderr)
            return 2
        country = args.country.upper()
        topic = args.topic or country_topic
    wanted = WarningFilter(args.crisis, country, frozenset(args.kind or ()))
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        printed = tail(bootstrap, topic, wanted, settings=settings, stop=stop, as_json=args.json,
                       from_beginning=args.from_beginning, max_count=args.max, wait_s=args.wait_s)
    except TailError as exc:
        print(f"crisiswatch tail: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`crisiswatch tail | head`): a normal end
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if args.max is not None and printed < args.max and not stop.is_set():
        return 1
    return 0
