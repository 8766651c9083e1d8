"""The contract every feed parser follows.

A parser is a pure function ``parse(data: bytes, ctx: ParseContext) -> ParseResult``: no I/O,
no clock of its own (``ctx.now``). A document that cannot be read at all raises
:class:`FeedError` with a one-line reason; an item inside a readable document that cannot be
used becomes a :class:`Rejection` and does not spoil the rest of the feed.

Identity and lifecycle, the same for every source:
- ``crisis_id`` is deterministic from the source's own identity of the real-world event
  (``cap:<sender>:<first identifier>``, ``gdacs:<eventtype>:<eventid>``, ``usgs:<id>``...), so an
  update lands on the same crisis.
- ``version`` is monotonic per crisis: the source's own update time as whole epoch seconds
  (CAP ``sent``, GDACS ``datemodified``, USGS ``updated``...), never a counter kept in memory.
- Expiry, the same for every format: an item whose crisis has expired as of ``ctx.now`` yields no
  event (:func:`parse_document` sees to it whatever the parser did, unless ``ctx.keep_expired``), and is counted as
  :class:`Skipped`, like the items that are no crisis at all (a feed saying "no tropical cyclones at
  this time", an index entry that only links elsewhere): nothing is left out without a count.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

from schemas import Crisis

# format name -> module defining ``parse(data, ctx) -> ParseResult`` (and, optionally, ``sniff(data) -> bool``)
FORMATS: dict[str, str] = {
    "cap": "pipeline.domain.feeds.cap",
    "gdacs": "pipeline.domain.feeds.gdacs",
    "usgs": "pipeline.domain.feeds.usgs",
    "rss": "pipeline.domain.feeds.news",
    "advisory": "pipeline.domain.feeds.advisory",
}


class FeedError(ValueError):
    """The whole document was refused; ``str(exc)`` is a one-line reason for a human."""


@dataclass(frozen=True, slots=True)
class Rejection:
    """One item of a feed that could not become a crisis, and why."""

    item_ref: str
    reason: str


SkipReason = Literal["expired", "all_quiet", "no_hazard", "link_only"]


@dataclass(frozen=True, slots=True)
class Skipped:
    """An item that is no crisis now, which is no error either: ``reason`` says which kind."""

    item_ref: str
    reason: SkipReason


def skip_phrase(reason: SkipReason, now: datetime, count: int = 1) -> str:
    """How a person reads a count of skipped items (``3 expired as of 2024-10-01T11:38:00+00:00``)."""
    entries = "entry" if count == 1 else "entries"
    items = "item" if count == 1 else "items"
    return {"expired": f"{count} expired as of {now.isoformat(timespec='seconds')}",
            "all_quiet": f"{count} {items} saying there is nothing to report (e.g. 'no active cyclones')",
            "no_hazard": f"{count} {items} naming no hazard (outlooks, explainers)",
            "link_only": f"{count} index {entries} that only link elsewhere"}[reason]


@dataclass(frozen=True, slots=True)
class ParseContext:
    now: datetime
    exercise_mode: bool = False
    max_bytes: int = 10_000_000
    source_name: str = ""
    # Preferred language (BCP 47, e.g. "id", "fr-CA") among a multilingual CAP alert's <info> blocks.
    language: str | None = None
    # A geopy geocoder, duck-typed: ``.geocode(query)`` -> ``geopy.location.Location`` or None (news place names).
    geocoder: Any = None
    # News items whose confidence is below this go to review instead of straight to citizens.
    min_confidence: float = 0.6
    # Keep items expired as of ``now`` (inspecting an archive); never set where events reach citizens.
    keep_expired: bool = False


@dataclass(frozen=True, slots=True)
class ParseResult:
    events: tuple[Crisis, ...] = ()
    rejected: tuple[Rejection, ...] = ()
    # Events that must be seen by an operator before reaching citizens (low-confidence news items).
    review: tuple[Crisis, ...] = ()
    # Events kept without geometry (geocode-only CAP areas we could not resolve), for metrics.
    notes: tuple[str, ...] = field(default=())
    # Items that are no crisis as of ctx.now (expired, "nothing to report", index links): counted, not errors.
    skipped: tuple[Skipped, ...] = ()


def expired(crisis: Crisis, now: datetime) -> bool:
    """An upsert whose crisis has ended by ``now``; a cancel never expires (it ends the crisis)."""
    return crisis.op == "upsert" and crisis.expires is not None and crisis.expires <= now


def without_expired(result: ParseResult, now: datetime) -> ParseResult:
    """``result`` with the upserts expired as of ``now`` moved from its events (and review) to skipped."""
    gone = [c for c in (*result.events, *result.review) if expired(c, now)]
    if not gone:
        return result
    return replace(result, events=tuple(c for c in result.events if not expired(c, now)),
                   review=tuple(c for c in result.review if not expired(c, now)),
                   skipped=(*result.skipped, *(Skipped(c.source_ref or c.crisis_id, "expired") for c in gone)))


Parser = Callable[[bytes, ParseContext], ParseResult]


def parser_for(fmt: str) -> Parser:
    if fmt not in FORMATS:
        raise FeedError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    module = importlib.import_module(FORMATS[fmt])
    parse: Parser = module.parse
    return parse


def detect_format(data: bytes) -> str:
    """Guess the format of a document from its content (see ``pipeline.domain.feeds.detect``)."""
    detect = importlib.import_module("pipeline.domain.feeds.detect")
    fmt: str = detect.detect_format(data)
    return fmt


def parse_document(data: bytes, fmt: str, ctx: ParseContext) -> ParseResult:
    """Parse one document; ``fmt`` is a name from :data:`FORMATS` or ``"auto"``."""
    if len(data) > ctx.max_bytes:
        raise FeedError(f"document of {len(data)} bytes exceeds the {ctx.max_bytes}-byte limit")
    result = parser_for(detect_format(data) if fmt == "auto" else fmt)(data, ctx)
    return result if ctx.keep_expired else without_expired(result, ctx.now)
