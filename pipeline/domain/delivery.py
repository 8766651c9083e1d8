"""Delivery decisions, without I/O: what the dispatcher does with a warning given what the
``deliveries`` table says about it, how long it waits before the next attempt, how a channel's rate
limit is kept, and how a webhook body is signed.

The dispatcher (``consumers.dispatch``) only moves bytes; every choice it makes is one of these
functions, so each is tested without a broker, a database or a server.

*Delivered once, in effect.* A warning counts as done when one of its channels delivered it, or
when every channel of the citizen gave up. A row left ``sending`` (the process died between the
attempt and its outcome) is sent again with the same idempotency key (the ``warning_id``): the
receiver recognises the second copy of a message it may already have. A row ``delivered`` or
``gave_up`` is never sent again, whatever replays or rebalances bring.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal, cast, get_args

from schemas import Delivery, Warning
from schemas.models import ChannelType

DeliveryStatus = Literal["pending", "sending", "delivered", "failed", "gave_up"]
SETTLED: Final[frozenset[str]] = frozenset({"delivered", "gave_up"})

SIGNATURE_HEADER: Final = "X-Crisiswatch-Signature"
IDEMPOTENCY_HEADER: Final = "Idempotency-Key"


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    """What the table holds about one (warning, channel, address)."""

    channel: str
    address: str
    status: DeliveryStatus
    attempts: int


@dataclass(frozen=True, slots=True)
class Step:
    """One channel to try: ``resend`` when an attempt was left in flight (same idempotency key),
    ``attempts_done`` counts the attempts the table already records for it."""

    channel: str
    address: str
    attempts_done: int
    resend: bool


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do with a warning. ``done`` names why nothing is to be sent (``delivered``: a channel
    delivered it already; ``gave_up``: every channel gave up already; ``no_channel``: the citizen has
    none); otherwise ``steps`` are the channels still to try, in the citizen's order."""

    steps: tuple[Step, ...]
    done: str | None = None


def plan(channels: Sequence[tuple[str, str]], rows: Iterable[DeliveryRow], max_attempts: int) -> Plan:
    """The channels still to try for a warning, given the citizen's channels ``(type, address)`` in
    their order and the warning's rows. A channel whose row ``gave_up`` (or used up its attempts) is
    passed over; a ``sending`` row is re-sent with the same key; a delivered row ends everything."""
    by_key = {(r.channel, r.address): r for r in rows}
    if any(r.status == "delivered" for r in by_key.values()):
        return Plan((), "delivered")
    if not channels:
        return Plan((), "no_channel")
    steps: list[Step] = []
    for channel, address in dict.fromkeys(channels):
        row = by_key.get((channel, address))
        if row is None:
            steps.append(Step(channel, address, 0, resend=False))
        elif row.status == "sending":
            steps.append(Step(channel, address, row.attempts, resend=True))
        elif row.status != "gave_up" and row.attempts < max_attempts:
            steps.append(Step(channel, address, row.attempts, resend=False))
    return Plan(tuple(steps), None if steps else "gave_up")


def plan_resend(channels: Sequence[tuple[str, str]], rows: Iterable[DeliveryRow], max_attempts: int) -> Plan:
    """The plan for a warning escalation published again (no reply after T1): the citizen's channels
    *after* the first one that delivered it, tried as :func:`plan` tries a new warning. Sent once in
    effect too: a later channel already ``delivered`` ends it (``done`` ``delivered``); none left after
    the delivering one: ``done`` ``no_next_channel``. A warning never delivered gets its ordinary plan
    (still in flight: finish it; given up everywhere: nothing more to try)."""
    rows = list(rows)
    by_key = {(r.channel, r.address): r for r in rows}
    order = list(dict.fromkeys(channels))
    delivered = [i for i, key in enumerate(order) if (row := by_key.get(key)) is not None and row.status == "delivered"]
    if not delivered:
        return plan(channels, rows, max_attempts)
    later = order[delivered[0] + 1:]
    if not later:
        return Plan((), "no_next_channel")
    return plan(later, [r for r in rows if (r.channel, r.address) in set(later)], max_attempts)


def final_outcome(warning: Warning, rows: Iterable[DeliveryRow], at: datetime) -> Delivery | None:
    """The ``delivery/1`` event of a warning whose rows show a final outcome: delivered on the first
    channel (in row order) that delivered it, or given up on every one; None while in flight or
    when there are no rows. ``attempts``: over all its channels."""
    rows = list(rows)
    if not rows:
        return None
    attempts = sum(r.attempts for r in rows)
    delivered = next((r for r in rows if r.status == "delivered"), None)
    if delivered is not None:
        return Delivery(warning.warning_id, warning.citizen_id, warning.crisis_id, _channel(delivered.channel),
                        "delivered", attempts, at)
    if all(r.status == "gave_up" for r in rows):
        return Delivery(warning.warning_id, warning.citizen_id, warning.crisis_id, _channel(rows[-1].channel),
                        "gave_up", attempts, at)
    return None


def _channel(name: str) -> ChannelType | None:
    return cast(ChannelType, name) if name in get_args(ChannelType) else None


def unsettled_earlier(rows_by_warning: Mapping[str, Iterable[DeliveryRow]], this_warning: str) -> tuple[str, ...]:
    """The other warnings (of the same citizen and crisis) that are neither delivered nor given up:
    an all-clear waits for them. A warning settles when a row is delivered or every row gave up."""
    waiting = []
    for warning_id, rows in rows_by_warning.items():
        statuses = {r.status for r in rows}
        if warning_id == this_warning or not statuses or "delivered" in statuses or statuses == {"gave_up"}:
            continue
        waiting.append(warning_id)
    return tuple(sorted(waiting))


# --- retries -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter: attempt n waits between half and all of
    ``min(maximum_s, initial_s * 2**(n-1))`` ("equal jitter": never zero, so a receiver that
    is struggling is not hammered, yet dispatchers that failed together do not retry together)."""

    max_attempts: int = 5
    initial_s: float = 1.0
    maximum_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.initial_s < 0 or self.maximum_s < self.initial_s:
            raise ValueError(f"unusable retry policy {self}")

    def ceiling(self, attempt: int) -> float:
        return min(self.maximum_s, self.initial_s * 2.0 ** max(0, attempt - 1))

    def delay(self, attempt: int, unit_random: float, retry_after_s: float | None = None) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based); ``unit_random`` in [0, 1).
        A receiver's ``Retry-After`` is honoured up to ``maximum_s``."""
        ceiling = self.ceiling(attempt)
        delay = ceiling / 2 + unit_random * ceiling / 2
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, self.maximum_s))
        return delay


# --- rate limits ---------------------------------------------------------------------------------------


class TokenBucket:
    """A channel's rate limit: ``rate_per_s`` tokens a second, up to ``burst`` kept; each send takes
    one. :meth:`reserve` never refuses: it takes the token and says how long to wait before using
    it, so a full bucket is backpressure, never a dropped message. ``rate_per_s`` 0: no limit."""

    def __init__(self, rate_per_s: float, burst: float | None = None, *, clock: Callable[[], float]) -> None:
        if rate_per_s < 0:
            raise ValueError("rate must be >= 0")
        self.rate = rate_per_s
        self.capacity = max(1.0, burst if burst is not None else rate_per_s)
        self.clock = clock
        self.tokens = self.capacity
        self.updated = clock()

    def reserve(self) -> float:
        """Take one token; return the seconds to wait before the send it pays for (0: now)."""
        if self.rate == 0:
            return 0.0
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        self.tokens -= 1.0
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


# --- webhook signatures --------------------------------------------------------------------------------


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The signature header's value: HMAC-SHA256 over ``"<timestamp>.<body>"``, as ``t=<unix>,v1=<hex>``
    (the timestamp is signed so a captured request cannot be replayed later)."""
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: bytes, header: str, body: bytes, now: int, tolerance_s: int = 300) -> bool:
    """What a receiver does: the header is well formed, its signature matches, and it is recent."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        timestamp = int(parts["t"])
        given = parts["v1"]
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance_s:
        return False
    expected = sign(secret, timestamp, body).rsplit("v1=", 1)[1]
    return hmac.compare_digest(expected, given)
