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
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

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


@dataclass(frozen=True, slots=True)
class ParseResult:
    events: tuple[Crisis, ...] = ()
    rejected: tuple[Rejection, ...] = ()
    # Events that must be seen by an operator before reaching citizens (low-confidence news items).
    review: tuple[Crisis, ...] = ()
    # Events kept without geometry (geocode-only CAP areas we could not resolve), for metrics.
    notes: tuple[str, ...] = field(default=())


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
    return parser_for(detect_format(data) if fmt == "auto" else fmt)(data, ctx)
