"""API tokens: their roles, their rate limits, and the embedded profile's tokens file.

**Roles.** Every token has a name (who, as the audit log records it) and one of three roles, each
allowed what the one before it may and more: ``ingest`` (check-ins, citizens' registrations,
replies), ``operator`` (crises, cases, the accountability views, looking up a citizen), ``admin``
(the audit log, erasing a citizen). The tokens of ``CRISISWATCH_INGEST_TOKEN``,
``CRISISWATCH_OPERATOR_TOKEN`` and ``CRISISWATCH_ADMIN_TOKEN`` are named after their roles.

**Rate limits.** Each token may make ``CRISISWATCH_API_RATE_LIMITS`` requests per second for its role
(a token bucket holding one second's worth, so a client may burst that much); beyond it the API
answers 429 with ``Retry-After`` (:class:`RateLimiter`). One noisy client cannot starve the others,
and a stolen token cannot be used to page through the registry at speed.

**The tokens file.** The embedded profile's tokens and reply-link secret are kept in the data
directory so that every ``crisiswatch up`` on it hands out the same ones: scripts, simulators and
phones configured once keep working across restarts, and so do the reply links already sent. The
file (``<data dir>/tokens.json``) is readable by its owner only (mode 0600), written whole or not at
all, and holds only tokens crisiswatch generated; a token set in the environment always wins and is
never written there.
"""

from __future__ import annotations

import hmac
import json
import math
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final, Literal, cast

from pipeline.settings import Secret, Settings

TOKENS_FILE: Final = "tokens.json"
_KEYS: Final = ("ingest", "operator", "reply", "admin")

Role = Literal["ingest", "operator", "admin"]
ROLES: Final[tuple[Role, ...]] = ("ingest", "operator", "admin")
_RANK: Final[Mapping[str, int]] = {role: rank for rank, role in enumerate(ROLES)}


@dataclass(frozen=True, slots=True)
class ApiToken:
    """A bearer token the API accepts: who (``name``), what it may (``role``), and the secret itself."""

    name: str
    role: Role
    secret: Secret

    def may(self, needed: Role) -> bool:
        """Whether this token opens an endpoint that needs ``needed`` (roles include the ones before them)."""
        return _RANK[self.role] >= _RANK[needed]


def configured_tokens(settings: Settings) -> tuple[ApiToken, ...]:
    """The tokens of the settings, each named after its role; unset ones are left out."""
    pairs: tuple[tuple[Role, Secret], ...] = (("ingest", settings.ingest_token), ("operator", settings.operator_token),
                                              ("admin", settings.admin_token))
    return tuple(ApiToken(role, role, secret) for role, secret in pairs if secret)


def find_token(tokens: Iterable[ApiToken], presented: str) -> ApiToken | None:
    """The token ``presented`` is, compared in constant time against every one, always, so the time
    taken says nothing about which matched or how much of one did."""
    found: ApiToken | None = None
    given = presented.encode("utf-8")
    for token in tokens:
        if hmac.compare_digest(given, token.secret.get().encode("utf-8")) and token.secret:
            found = found or token
    return found


def parse_rate_limits(raw: str) -> dict[Role, float]:
    """``ingest:1000,operator:50,admin:20`` → requests per second by role; a role left out is unlimited,
    0 is unlimited too."""
    limits: dict[Role, float] = {}
    for part in filter(None, (p.strip() for p in raw.split(","))):
        role, sep, number = part.partition(":")
        role = role.strip()
        if not sep or role not in _RANK:
            raise ValueError(f"expected <role>:<requests per second> with a role of {', '.join(ROLES)}: {part!r}")
        try:
            rate = float(number)
        except ValueError:
            raise ValueError(f"not a number of requests per second: {part!r}") from None
        if not math.isfinite(rate) or rate < 0:
            raise ValueError(f"a rate must be >= 0: {part!r}")
        limits[cast(Role, role)] = rate
    return limits


class RateLimiter:
    """A token bucket per API token: ``rate`` requests per second, bursts of ``max(1, rate)``.

    Thread-safe (the API's dependencies may run in its thread pool); time comes from ``clock``
    (monotonic seconds), so a test steps through minutes at once."""

    def __init__(self, limits: Mapping[Role, float], clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = dict(limits)
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # token name -> (tokens left, when)
        self._lock = threading.Lock()

    def admit(self, token: ApiToken) -> float | None:
        """Take one request from ``token``'s bucket; None if it may go on, else the seconds until it may."""
        rate = self.limits.get(token.role, 0.0)
        if rate <= 0:
            return None
        burst = max(1.0, rate)
        now = self.clock()
        with self._lock:
            left, then = self._buckets.get(token.name, (burst, now))
            left = min(burst, left + (now - then) * rate)
            if left >= 1.0:
                self._buckets[token.name] = (left - 1.0, now)
                return None
            self._buckets[token.name] = (left, now)
            return (1.0 - left) / rate


class TokenFileError(ValueError):
    """The tokens file cannot be used; the message names it and says what to do."""


def new_token() -> str:
    return secrets.token_urlsafe(24)


def tokens_path(data_dir: Path) -> Path:
    return data_dir / TOKENS_FILE


def load_or_create_tokens(path: Path, make: Callable[[], str] = new_token) -> dict[str, str]:
    """The ``ingest``, ``operator`` and ``admin`` tokens and the ``reply`` secret kept in ``path``, creating
    the file (mode 0600) or adding a missing one first. A file others could read is made private again."""
    kept: dict[str, str] = {}
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            path.chmod(0o600)
        try:
            raw = json.loads(path.read_text("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise TokenFileError(f"{path}: cannot be read as JSON ({exc}); delete it to generate new tokens") from None
        if not isinstance(raw, dict) or not all(isinstance(raw.get(k, ""), str) for k in _KEYS):
            raise TokenFileError(f'{path}: expected {{"ingest": "...", "operator": "...", "admin": "...", "reply": "..."}}; '
                                 "delete it to generate new tokens")
        kept = {k: raw[k] for k in _KEYS if raw.get(k)}
    if all(k in kept for k in _KEYS):
        return kept
    kept = {k: kept.get(k) or make() for k in _KEYS}
    _write_private(path, json.dumps(kept, indent=2) + "\n")
    return kept


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600 from the first byte, replacing it atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, 0o600)  # O_CREAT's mode is masked by the umask, never widened; make sure
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def with_kept_tokens(settings: Settings, make: Callable[[], str] = new_token) -> tuple[Settings, Path | None]:
    """``settings`` with each unset API token and the reply secret filled in from the data directory's
    tokens file; the file's path, or None when all four are configured (then no file is read or written)."""
    if settings.ingest_token and settings.operator_token and settings.admin_token and settings.reply_secret:
        return settings, None
    path = tokens_path(settings.data_dir)
    kept = load_or_create_tokens(path, make)
    return replace(settings, ingest_token=settings.ingest_token or Secret(kept["ingest"]),
                   operator_token=settings.operator_token or Secret(kept["operator"]),
                   admin_token=settings.admin_token or Secret(kept["admin"]),
                   reply_secret=settings.reply_secret or Secret(kept["reply"])), path
