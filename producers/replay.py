"""``crisiswatch replay FILE``: publish a JSON-lines file of events, each into the topic of its schema.

Every line is checked as the stages will check it (:mod:`pipeline.domain.validation`: the JSON
Schema, an area the normaliser refuses, a check-in from the future) before anything is sent. A
line that is not a valid event is reported on stderr with its number and the reason, and skipped; the rest are
still published, and the exit code is 2 so a script notices. Blank lines and ``#`` comments are
ignored; ``-`` reads stdin. What goes to Kafka is the line exactly as written (fields this
version does not know included), keyed like every other producer keys it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO

from pipeline.domain.validation import DEFAULT_RULES, EventRules, admit
from pipeline.observability import setup_logging
from pipeline.state_file import client_settings, no_stack
from producers.publisher import TOPIC_OF_SCHEMA, BrokerUnavailable, Outgoing, Publisher, key_of
from schemas import Event, InvalidEvent, from_obj, parse_json

BATCH = 500


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="JSON lines of checkin/1, citizen/1, crisis/1, ack/1... ('-': stdin)")
    parser.add_argument("--rate", type=float, default=0.0, metavar="R",
                        help="events per second at most (default: as fast as Kafka takes them)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate and print {topic, key, event} JSON lines to stdout instead of publishing")


@dataclass(frozen=True, slots=True)
class BadLine:
    number: int
    reason: str


@dataclass(slots=True)
class ReplayCounts:
    per_topic: Counter[str] = field(default_factory=Counter)
    invalid: int = 0

    def line(self, dry_run: bool) -> str:
        verb = "would publish" if dry_run else "published"
        topics = ", ".join(f"{topic} {n}" for topic, n in sorted(self.per_topic.items())) or "nothing"
        return f"replay: {verb} {sum(self.per_topic.values())} events ({topics}); {self.invalid} invalid lines skipped"


def read_events(lines: Iterable[bytes], rules: EventRules = DEFAULT_RULES) -> Iterator[Outgoing | BadLine]:
    """Each meaningful line as the message to publish, or the reason it cannot be (numbers from 1)."""
    for number, raw in enumerate(lines, start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith(b"#"):
            continue
        try:
            event: Event = admit(from_obj(parse_json(stripped)), datetime.now(UTC), rules)
        except InvalidEvent as exc:
            yield BadLine(number, str(exc))
            continue
        topic = TOPIC_OF_SCHEMA.get(event.SCHEMA)
        if topic is None:
            yield BadLine(number, f"$.schema: no topic takes {event.SCHEMA!r}")
            continue
        yield Outgoing(topic, key_of(event), stripped)


def _open(path: str) -> IO[bytes]:
    # Bytes, so that a line that is not UTF-8 is reported as such rather than silently altered.
    return sys.stdin.buffer if path == "-" else open(path, "rb")


def run(args: argparse.Namespace) -> int:
    settings, _stack = client_settings()
    setup_logging(settings.log_level, "replay")
    if args.rate < 0:
        print("crisiswatch replay: --rate must be >= 0", file=sys.stderr)
        return 2
    if not args.dry_run and not settings.kafka_bootstrap:
        print(f"crisiswatch replay: {no_stack(settings)}; or use --dry-run", file=sys.stderr)
        return 2
    try:
        source = _open(args.file)
    except OSError as exc:
        print(f"crisiswatch replay: cannot read {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return 2

    label = "stdin" if args.file == "-" else args.file
    counts = ReplayCounts()
    publisher = None if args.dry_run else Publisher(settings, client_id="crisiswatch-replay")
    pending: list[Outgoing] = []
    began, released = time.monotonic(), 0

    def flush() -> None:
        nonlocal released
        if not pending:
            return
        released += len(pending)
        if args.rate > 0:
            time.sleep(max(0.0, began + (released - 1) / args.rate - time.monotonic()))
        if publisher is None:
            for m in pending:
                key = None if m.key is None else m.key.decode("utf-8")
                sys.stdout.write(json.dumps({"topic": m.topic, "key": key, "event": json.loads(m.value)},
                                            ensure_ascii=False, separators=(",", ":")) + "\n")
            sys.stdout.flush()
        else:
            publisher.publish(pending)
        counts.per_topic.update(m.topic for m in pending)
        pending.clear()

    batch = BATCH if args.rate <= 0 else max(1, min(BATCH, int(args.rate * 0.05)))
    try:
        with source:
            for item in read_events(source, settings.event_rules()):
                if isinstance(item, BadLine):
                    counts.invalid += 1
                    print(f"crisiswatch replay: {label}: line {item.number}: {item.reason}", file=sys.stderr)
                    continue
                pending.append(item)
                if len(pending) >= batch:
                    flush()
            flush()
    except BrokerUnavailable as exc:
        print(f"crisiswatch replay: {exc} ({sum(counts.per_topic.values())} events published before)", file=sys.stderr)
        return 1
    finally:
        if publisher is not None:
            publisher.close()
    print(counts.line(args.dry_run), file=sys.stderr if args.dry_run else sys.stdout)
    return 2 if counts.invalid else 0
