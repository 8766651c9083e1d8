"""``crisiswatch parse [--format F] [--exercise] FILE...``: print the crisis/1 events feed documents yield.

The pure parsers of :mod:`pipeline.domain.feeds`, no broker: one JSON line per event on stdout,
each passed through the very check the stages apply when they read ``crisis-events``
(:func:`pipeline.domain.validation.prepare_outgoing`: the decoder and the geometry normaliser)
before it is printed, so what is printed is what the pipeline would use. On stderr, one
line per item the parser rejected (``FILE: rejected ITEM: REASON``) and per news item held for
review (``FILE: review ...``), and one line counting the items left out because they are no crisis
as of ``--at`` (``FILE: left out 3 items: 2 expired as of ..., 1 index entry that only links
elsewhere``; expiry is judged alike for every format); with ``--notes`` also each item left out and
the parser's notes (geometry repairs, swapped coordinates, areas left unmapped). Exit 0 when every
file parsed (even if some items were rejected), 2 when any file could not be read or parsed at all,
with one ``FILE: REASON`` line each.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from pipeline.domain.feeds.base import FORMATS, FeedError, ParseContext, ParseResult, parse_document, skip_phrase
from pipeline.domain.feeds.detect import detect_format
from pipeline.domain.validation import DEFAULT_RULES, EventRules, prepare_outgoing
from pipeline.settings import Settings
from producers.feeds.geocoding import make_geocoder
from schemas import InvalidEvent, parse_time

DEFAULT_MIN_CONFIDENCE = ParseContext(now=datetime.min.replace(tzinfo=UTC)).min_confidence


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE", help="feed documents to parse")
    parser.add_argument("--format", default="auto", choices=["auto", *FORMATS],
                        help="document format [default: auto, detected from the content]")
    parser.add_argument("--exercise", action="store_true",
                        help="keep Exercise/Test/Draft CAP alerts (they carry their status) "
                             "[env: CRISISWATCH_EXERCISE_MODE]")
    parser.add_argument("--language", default=None, metavar="TAG",
                        help="preferred language among a multilingual CAP alert's info blocks, e.g. id or fr-CA "
                             "[default: English, else the first]")
    parser.add_argument("--geocoder", default="offline", metavar="NAME",
                        help="geocoder for place names in news items: offline (GeoNames gazetteer, no network) "
                             "or a geopy service name such as nominatim [default: offline]")
    parser.add_argument("--min-confidence", type=float, default=DEFAULT_MIN_CONFIDENCE, metavar="X",
                        help="news items scoring below X (0..1) are held for review, not printed "
                             f"[default: {DEFAULT_MIN_CONFIDENCE}]")
    parser.add_argument("--include-review", action="store_true",
                        help="print events held for review too (they are only listed on stderr otherwise)")
    parser.add_argument("--notes", action="store_true", help="also list the parsers' notes on stderr")
    parser.add_argument("--at", type=_aware_time, default=None, metavar="TIME",
                        help="read the documents as of this RFC 3339 time, e.g. an archived feed as it was when "
                             "published (items expired by then yield no event) [default: now]")
    parser.add_argument("--include-expired", action="store_true",
                        help="print the items expired as of --at too (inspecting an archive), whatever the format")


def _aware_time(text: str) -> datetime:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an RFC 3339 time with an offset: {text!r} ({exc})") from None


class _LazyGeocoder:
    """Builds the geocoder on first use: only news documents need one, and the gazetteer takes a moment to load."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._geocoder: Any = None

    def geocode(self, query: str) -> Any:
        if self._geocoder is None:
            self._geocoder = make_geocoder(self._name)
        return self._geocoder.geocode(query)


def parse_file(path: Path, fmt: str, ctx: ParseContext) -> ParseResult:
    """Read and parse one file; :class:`FeedError` with a one-line reason when it cannot be used at all."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FeedError(f"cannot read: {exc.strerror or exc}") from None
    chosen = detect_format(data) if fmt == "auto" else fmt
    try:
        return parse_document(data, chosen, ctx)
    except ImportError:
        raise FeedError(f"no parser for format {chosen!r} is installed") from None


def emit(path: Path, result: ParseResult, args: argparse.Namespace, out: BinaryIO, err: TextIO,
         now: datetime | None = None, rules: EventRules = DEFAULT_RULES) -> None:
    printed = [*result.events, *(result.review if args.include_review else ())]
    for event in printed:
        try:
            _, raw = prepare_outgoing(event, now or datetime.now(UTC), rules)
        except InvalidEvent as exc:
            print(f"{path}: rejected {event.crisis_id}: produced an invalid crisis/1 event ({exc})", file=err)
            continue
        out.write(raw + b"\n")
    for rejection in result.rejected:
        print(f"{path}: rejected {rejection.item_ref}: {rejection.reason}", file=err)
    if not args.include_review:
        for event in result.review:
            print(f"{path}: review {event.crisis_id}: {event.title}", file=err)
    if result.skipped:
        when = now or datetime.now(UTC)
        counts = Counter(s.reason for s in result.skipped)
        total = len(result.skipped)
        print(f"{path}: left out {total} item{'s' if total != 1 else ''}: "
              + ", ".join(skip_phrase(reason, when, n) for reason, n in counts.items()), file=err)
    if args.notes:
        for skipped in result.skipped:
            print(f"{path}: left out {skipped.item_ref}: {skip_phrase(skipped.reason, now or datetime.now(UTC))}",
                  file=err)
        for note in result.notes:
            print(f"{path}: note: {note}", file=err)


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    if not 0.0 <= args.min_confidence <= 1.0:
        print(f"crisiswatch parse: --min-confidence must be within 0..1, got {args.min_confidence}", file=sys.stderr)
        return 2
    try:
        if args.geocoder.strip().lower() != "offline":
            make_geocoder(args.geocoder)  # refuse an unknown name before any file is read
    except ValueError as exc:
        print(f"crisiswatch parse: {exc}", file=sys.stderr)
        return 2
    ctx = ParseContext(now=args.at or datetime.now(UTC), exercise_mode=args.exercise or settings.exercise_mode,
                       source_name="crisiswatch parse", language=args.language,
                       geocoder=_LazyGeocoder(args.geocoder), min_confidence=args.min_confidence,
                       keep_expired=args.include_expired)
    failed = 0
    out = sys.stdout.buffer
    for path in args.files:
        try:
            result = parse_file(path, args.format, ctx)
        except FeedError as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            failed += 1
            continue
        except Exception as exc:  # a parser bug must not hide the other files' results
            print(f"{path}: internal parser error: {type(exc).__name__}: {exc}".replace("\n", " "), file=sys.stderr)
            failed += 1
            continue
        emit(path, result, args, out, sys.stderr, ctx.now, settings.event_rules())
        out.flush()
    return 2 if failed else 0
