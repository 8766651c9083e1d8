"""One validation of every event, wherever it enters: the API, the feed parsers, a stage reading a topic.

Two layers, because of which way dependencies point (DESIGN.md §2). :mod:`schemas.codec` is the
wire contract and depends on nothing in the project: it bounds size and nesting, refuses text
and numbers no later stage could store or encode, checks the JSON Schema and builds the typed
event. What needs the domain is added here, in ``pipeline/domain`` (which may import ``schemas``):

- ``crisis/1``: the area goes through :func:`pipeline.domain.geometry.normalise_geometry`, the
  normaliser the API applies to an operator's polygon, with the same limits. What the API would
  repair (a bow-tie, an open ring, an unsplit antimeridian crossing) is repaired identically, and
  what it would refuse (the whole globe, no area left, too many vertices) is refused with the
  normaliser's reason. Normalising is idempotent, so an area that was already normalised by the
  API or a feed parser comes out unchanged and every stage works on the very area published.
  The structure stays the JSON Schema's, though: on the wire a ring has at least four positions
  (GeoJSON), while the API first closes the three-point ring an operator may draw.
- ``checkin/1`` observed, or ``ack/1`` received, more than ``max_future_skew_s`` after ``now``
  is refused. A stage keeps a citizen's latest location (and, for replies, the latest answer) by
  time; one check-in dated 9999-12-31 would make every later one look stale, so that citizen
  would never be warned again. A small skew is allowed for phones whose clocks run ahead.
- ``crisis/1`` ``effective`` and ``expires`` may lie far in the future: CAP alerts announce
  storms ahead, updates are ordered by ``version``, not by time, and an expiry years ahead only
  keeps a crisis active, which is what its publisher asked for.

Who calls what: a stage reading a topic calls :func:`decode_event` on the message bytes (the
worker's locate and crisis agents, the sink, ``crisiswatch geofence`` on files; the router's
warnings have no domain rule, so the codec's :func:`schemas.decode` is the whole check there).
Whoever builds an event in-process before publishing it (the API, the feed poller,
``crisiswatch parse``) calls :func:`prepare_outgoing`, which encodes the event and decodes the
bytes again through :func:`decode_event`: exactly what a stage will do, so nothing is
acknowledged that a stage would then refuse. ``crisiswatch replay`` sends lines as written and
checks each with :func:`admit` first.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Final, TypeVar

from shapely.errors import ShapelyError

from pipeline.domain.geometry import GeometryError, normalise_geometry
from schemas import Ack, Checkin, Crisis, InvalidEvent, decode, encode
from schemas.codec import check_values
from schemas.models import Event

E = TypeVar("E", bound=Event)

DEFAULT_MAX_FUTURE_SKEW_S: Final = 300.0


@dataclass(frozen=True, slots=True)
class EventRules:
    """The domain's limits on events; built from settings at the entry point and passed down."""

    max_future_skew_s: float = DEFAULT_MAX_FUTURE_SKEW_S
    # The geometry normaliser's own defaults: the limits the API has always applied to an operator's area.
    max_globe_share: float = 0.2
    max_vertices: int = 50_000


DEFAULT_RULES: Final = EventRules()


def admit(event: E, now: datetime, rules: EventRules = DEFAULT_RULES) -> E:
    """An event that passed the codec, checked against the domain's rules: the event as every
    stage will use it (a crisis with its area normalised), or :class:`InvalidEvent`."""
    if isinstance(event, Checkin):
        _not_ahead(event.observed_at, now, rules, "$.observed_at", "observed")
    elif isinstance(event, Ack):
        _not_ahead(event.received_at, now, rules, "$.received_at", "received")
    elif isinstance(event, Crisis) and event.geometry is not None:
        try:
            area = normalise_geometry(event.geometry, max_globe_share=rules.max_globe_share,
                                      max_vertices=rules.max_vertices)
        except GeometryError as exc:
            raise InvalidEvent(str(exc), "$.geometry") from None
        except (ShapelyError, ValueError, TypeError, ArithmeticError) as exc:  # GEOS failing on this area: its fault
            raise InvalidEvent(f"area cannot be normalised ({type(exc).__name__}: {exc})", "$.geometry") from None
        if area != event.geometry:
            return replace(event, geometry=area)
    return event


def decode_event(raw: bytes | str, expected: type[E], now: datetime, rules: EventRules = DEFAULT_RULES) -> E:
    """Message bytes to the event a stage works with, or :class:`InvalidEvent` with field and reason."""
    return admit(decode(raw, expected), now, rules)


def prepare_outgoing(event: E, now: datetime, rules: EventRules = DEFAULT_RULES) -> tuple[E, bytes]:
    """An event built in this process, as the stages will read it, and the bytes to publish.

    The event is encoded and the bytes decoded again by :func:`decode_event`, so whatever a stage
    would refuse is refused here, with the same reason. The bytes returned are those of the event
    as decoded, so the area published is already the normalised one.
    """
    try:
        raw = encode(event)
    except UnicodeEncodeError:  # a lone surrogate: find it and name its field
        check_values(event.to_dict())
        raise InvalidEvent("text that is not valid Unicode") from None
    seen = decode_event(raw, type(event), now, rules)
    return seen, raw if seen == event else encode(seen)


def _not_ahead(when: datetime, now: datetime, rules: EventRules, field: str, verb: str) -> None:
    ahead = (when - now).total_seconds()
    if ahead > rules.max_future_skew_s:
        raise InvalidEvent(f"{verb} {ahead:.0f} s in the future (at most {rules.max_future_skew_s:g} s ahead of "
                           f"this clock, CRISISWATCH_MAX_FUTURE_SKEW_S, is accepted)", field)
