"""Reply links: the "are you safe?" answer a citizen gives with one tap, without logging in.

A link carries a token naming one citizen and one crisis, signed with the deployment's
``CRISISWATCH_REPLY_SECRET`` (itsdangerous, HMAC) and dated, so it cannot be guessed or altered,
and stops working ``CRISISWATCH_REPLY_TTL_S`` after it was made (seven days by default: long enough
for a phone that was off, short enough that an old message forwarded around does not speak for
someone weeks later). The token is not encrypted: it shows the two ids, never anything else.

Time comes from an injected clock, so expiry is tested without waiting.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from itsdangerous import BadSignature, SignatureExpired, TimestampSigner, URLSafeTimedSerializer

from pipeline.settings import Settings

SALT: Final = "crisiswatch-reply/1"
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


class ReplyTokenError(ValueError):
    """A token that cannot be used: ``status`` 410 when it expired, 400 when it is not ours."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass(frozen=True, slots=True)
class ReplyToken:
    citizen_id: str
    crisis_id: str
    signed_at: datetime


def _signer_on(clock: Clock) -> type[TimestampSigner]:
    class ClockedSigner(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(clock().timestamp())

    return ClockedSigner


class ReplyLinks:
    """Signs and checks reply tokens with one secret."""

    def __init__(self, secret: str, ttl_s: float, clock: Clock = utc_now) -> None:
        if not secret:
            raise ValueError("reply links need a secret (CRISISWATCH_REPLY_SECRET)")
        self.ttl_s = ttl_s
        self._serializer = URLSafeTimedSerializer(secret, salt=SALT, signer=_signer_on(clock))

    def sign(self, citizen_id: str, crisis_id: str) -> str:
        token = self._serializer.dumps([citizen_id, crisis_id])
        return token if isinstance(token, str) else token.decode("ascii")

    def verify(self, token: str) -> ReplyToken:
        try:
            payload, signed_at = self._serializer.loads(token, max_age=int(self.ttl_s), return_timestamp=True)
        except SignatureExpired:
            raise ReplyTokenError(410, "this reply link has expired; reply by SMS or call the embassy") from None
        except BadSignature:
            raise ReplyTokenError(400, "this reply link is not valid (altered or incomplete)") from None
        if not (isinstance(payload, list) and len(payload) == 2 and all(isinstance(p, str) and p for p in payload)):
            raise ReplyTokenError(400, "this reply link is not valid (unknown content)")
        return ReplyToken(payload[0], payload[1], signed_at)


def reply_links(settings: Settings, clock: Clock = utc_now) -> ReplyLinks | None:
    """The deployment's reply links, or None when no secret is configured (then no message carries one)."""
    return ReplyLinks(settings.reply_secret.get(), settings.reply_ttl_s, clock) if settings.reply_secret else None


def public_base_url(settings: Settings) -> str:
    return (settings.public_url or f"http://{settings.api_host}:{settings.api_port}").rstrip("/")


def make_reply_url(settings: Settings, citizen_id: str, crisis_id: str, clock: Clock = utc_now) -> str:
    """The link a message carries: ``<CRISISWATCH_PUBLIC_URL>/r/<token>``."""
    links = reply_links(settings, clock)
    if links is None:
        raise ValueError("reply links need a secret (CRISISWATCH_REPLY_SECRET)")
    return f"{public_base_url(settings)}/r/{links.sign(citizen_id, crisis_id)}"
