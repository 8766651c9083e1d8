"""The ways a warning reaches a person, behind one small interface: ``Channel.send(message, address,
idempotency_key) -> Receipt``, raising :class:`TransientError` (try again later),
:class:`PermanentError` (this channel will never work for this address) or
:class:`ChannelUnavailable` (the deployment's own relay is down: an outage, not the recipient's fault);
and ``Channel.send_many(attempts) -> [Sent]``, the same for many recipients at once, each outcome a
value (the receipt, or the exception ``send`` would have raised) so one failure never hides another.
The dispatcher sends a round of attempts with ``send_many``: most of a delivery is waiting for the
receiver, so the webhook channel keeps one aiohttp session (a keep-alive connection pool of
``concurrency`` connections) on an event loop of its own, and the other channels send on a pool of
``concurrency`` threads.

* **webhook** — JSON POST with aiohttp: the warning and its rendered text, signed with HMAC-SHA256 over
  ``"<timestamp>.<body>"`` (``X-Crisiswatch-Signature: t=<unix>,v1=<hex>``, see
  :func:`pipeline.domain.delivery.sign`), ``Idempotency-Key: <warning_id>``. 5xx, 408, 429 and
  timeouts are transient (``Retry-After`` honoured); any other 4xx is permanent.
* **email** — SMTP (smtplib), STARTTLS and login as the URL says
  (``smtp://user:pass@host:port?starttls=true``; ``smtps://`` for TLS from the start), a multipart
  message with plain-text and HTML parts and a ``Message-ID`` derived from the warning_id, so a re-sent
  copy is recognisably the same message. The server's 4xx replies are transient, 5xx permanent; a relay
  that cannot be reached is :class:`ChannelUnavailable`.
* **sms, push** — through Apprise (100+ services: Twilio, Vonage, FCM, Telegram …): the operator gives
  an Apprise URL template per channel type with ``{address}`` where the citizen's address goes.
  **Apprise carries no idempotency key and returns no provider reference**: a re-send after a crash
  may reach the person twice, and the receipt says ``"apprise: no provider reference"``. Apprise
  reports only success or failure, so a failure is taken as transient (retried, then the next channel).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import smtplib
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any, Protocol, TypeVar

from pipeline.domain.delivery import IDEMPOTENCY_HEADER, SIGNATURE_HEADER, sign
from pipeline.messages import RenderedMessage
from schemas import Warning


class DeliveryError(Exception):
    """A send that did not deliver; ``reason`` goes into the deliveries row."""


class TransientError(DeliveryError):
    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class PermanentError(DeliveryError):
    pass


class ChannelUnavailable(DeliveryError):
    """The deployment's own relay (SMTP server) cannot be reached: an outage the dispatcher waits out
    without counting it against the recipient, and without committing past the warning."""


@dataclass(frozen=True, slots=True)
class Outbound:
    """What is sent: the warning and its rendered message."""

    warning: Warning
    message: RenderedMessage


@dataclass(frozen=True, slots=True)
class Receipt:
    """The outcome of a delivered send, stored in the deliveries row's ``receipt``."""

    provider: str
    reference: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"provider": self.provider, "reference": self.reference, **self.detail}


@dataclass(frozen=True, slots=True)
class Attempt:
    """One send of a round: the message, to whom, with which idempotency key."""

    outbound: Outbound
    address: str
    idempotency_key: str


@dataclass(frozen=True, slots=True)
class Sent:
    """What became of one :class:`Attempt`: its receipt, or the exception ``send`` raised for it (a
    :class:`DeliveryError`, or anything unforeseen), and how long it took."""

    receipt: Receipt | None
    error: BaseException | None
    seconds: float


class Channel(Protocol):
    name: str

    def send(self, outbound: Outbound, address: str, idempotency_key: str) -> Receipt: ...

    def send_many(self, attempts: Sequence[Attempt]) -> list[Sent]: ...

    def close(self) -> None: ...


class ThreadedSends:
    """``send_many`` for a channel whose client is blocking (SMTP, Apprise): ``send`` on a pool of
    ``concurrency`` threads, made on first use."""

    concurrency: int = 1
    _pool: ThreadPoolExecutor | None = None
    _pool_lock = threading.Lock()

    def send(self, outbound: Outbound, address: str, idempotency_key: str) -> Receipt:
        raise NotImplementedError

    def _timed(self, attempt: Attempt) -> Sent:
        started = time.perf_counter()
        try:
            receipt = self.send(attempt.outbound, attempt.address, attempt.idempotency_key)
        except Exception as exc:
            return Sent(None, exc, time.perf_counter() - started)
        return Sent(receipt, None, time.perf_counter() - started)

    def send_many(self, attempts: Sequence[Attempt]) -> list[Sent]:
        if len(attempts) <= 1 or self.concurrency <= 1:
            return [self._timed(a) for a in attempts]
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix=f"send-{type(self).__name__}")
            pool = self._pool
        return list(pool.map(self._timed, attempts))

    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


T = TypeVar("T")


def _new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's where it is installed (a dependency except on Windows): less CPU per request."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class EventLoopThread:
    """An asyncio event loop on a daemon thread of its own, for the blocking dispatcher to run
    coroutines on (an aiohttp session lives on one loop for its whole life)."""

    def __init__(self, name: str) -> None:
        self.loop = _new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


# --- webhook ---------------------------------------------------------------------------------------------


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def webhook_body(outbound: Outbound) -> bytes:
    m = outbound.message
    return json.dumps({"warning": outbound.warning.to_dict(),
                       "message": {"language": m.language, "subject": m.subject, "text": m.text}},
                      ensure_ascii=False, separators=(",", ":")).encode()


class WebhookChannel:
    """Signed JSON POSTs through one aiohttp session: up to ``concurrency`` requests in flight on
    kept-alive connections."""

    name = "webhook"

    def __init__(self, secret: str, timeout_s: float = 10.0, clock: Callable[[], float] = time.time,
                 concurrency: int = 16) -> None:
        self.secret = secret.encode()
        self.clock = clock
        self.timeout_s = timeout_s
        self.concurrency = max(1, concurrency)
        self._loop: EventLoopThread | None = None
        self._session: Any = None
        self._lock = threading.Lock()

    def _request(self, outbound: Outbound, idempotency_key: str) -> tuple[bytes, dict[str, str]]:
        body = webhook_body(outbound)
        headers = {"Content-Type": "application/json", IDEMPOTENCY_HEADER: idempotency_key,
                   "User-Agent": "crisiswatch-dispatch"}
        if self.secret:
            headers[SIGNATURE_HEADER] = sign(self.secret, int(self.clock()), body)
        return body, headers

    async def _open(self) -> Any:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.concurrency, limit_per_host=self.concurrency),
                timeout=aiohttp.ClientTimeout(total=self.timeout_s), cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False)
        return self._session

    async def _post(self, session: Any, attempt: Attempt) -> Sent:
        import aiohttp

        started = time.perf_counter()
        try:
            return Sent(await self._post_one(session, aiohttp, attempt), None, time.perf_counter() - started)
        except Exception as exc:
            return Sent(None, exc, time.perf_counter() - started)

    async def _post_one(self, session: Any, aiohttp: Any, attempt: Attempt) -> Receipt:
        address = attempt.address
        if not address.startswith(("http://", "https://")):
            raise PermanentError(f"not an http(s) URL: {address[:80]!r}")
        body, headers = self._request(attempt.outbound, attempt.idempotency_key)
        try:
            async with session.post(address, data=body, headers=headers, allow_redirects=False) as response:
                await response.read()
                status = response.status
                response_headers = response.headers
        except aiohttp.InvalidURL as exc:
            raise PermanentError(f"invalid URL: {exc}") from None
        except (aiohttp.ClientError, TimeoutError) as exc:  # connect errors and timeouts: the receiver's, so transient
            raise TransientError(f"{type(exc).__name__}: {exc}") from None
        if 200 <= status < 300:
            reference = response_headers.get("X-Request-Id") or response_headers.get("Location")
            return Receipt("webhook", reference, {"status": status})
        reason = f"HTTP {status}"
        if status >= 500 or status in (408, 429):
            raise TransientError(reason, _retry_after(response_headers.get("Retry-After")))
        raise PermanentError(reason)

    async def _post_all(self, attempts: Sequence[Attempt]) -> list[Sent]:
        session = await self._open()
        return list(await asyncio.gather(*(self._post(session, a) for a in attempts)))

    def send_many(self, attempts: Sequence[Attempt]) -> list[Sent]:
        if not attempts:
            return []
        with self._lock:
            if self._loop is None:
                self._loop = EventLoopThread("webhook-sends")
            loop = self._loop
        return loop.run(self._post_all(attempts))

    def send(self, outbound: Outbound, address: str, idempotency_key: str) -> Receipt:
        [sent] = self.send_many([Attempt(outbound, address, idempotency_key)])
        if sent.error is not None:
            raise sent.error
        assert sent.receipt is not None
        return sent.receipt

    def close(self) -> None:
        with self._lock:
            loop, self._loop = self._loop, None
        if loop is None:
            return
        if self._session is not None:
            session, self._session = self._session, None
            loop.run(session.close())
        loop.close()


# --- email -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    host: str
    port: int
    username: str | None
    password: str | None
    starttls: bool
    implicit_tls: bool
    timeout_s: float = 30.0

    @classmethod
    def from_url(cls, url: str) -> SmtpConfig:
        """``smtp://[user:pass@]host[:port][?starttls=true]`` or ``smtps://…`` (TLS from the start)."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise ValueError("expected smtp://[user:pass@]host[:port][?starttls=true] or smtps://...")
        query = urllib.parse.parse_qs(parts.query)
        starttls = query.get("starttls", ["false"])[-1].lower() in ("1", "true", "yes", "on")
        implicit = parts.scheme == "smtps"
        return cls(parts.hostname, parts.port or (465 if implicit else 587 if starttls else 25),
                   urllib.parse.unquote(parts.username) if parts.username else None,
                   urllib.parse.unquote(parts.password) if parts.password else None, starttls, implicit)


def message_id(warning_id: str, address: str, domain: str) -> str:
    """The same for every send of one warning to one address, so a re-send is recognisably one message."""
    digest = hashlib.sha256(f"{warning_id}\x00{address}".encode()).hexdigest()[:32]
    return f"<{digest}.{warning_id[:64]}@{domain}>"


class EmailChannel(ThreadedSends):
    name = "email"

    def __init__(self, config: SmtpConfig, mail_from: str, concurrency: int = 1) -> None:
        self.concurrency = concurrency
        self.config = config
        self.mail_from = mail_from
        self.domain = mail_from.rpartition("@")[2] or "crisiswatch.invalid"

    def build(self, outbound: Outbound, address: str, idempotency_key: str) -> EmailMessage:
        m = outbound.message
        email = EmailMessage()
        email["From"] = self.mail_from
        email["To"] = address
        email["Subject"] = m.subject
        email["Date"] = formatdate(localtime=False)
        email["Message-ID"] = message_id(idempotency_key, address, self.domain)
        email["X-Crisiswatch-Warning-Id"] = idempotency_key
        email.set_content(m.text)
        email.add_alternative(m.html, subtype="html")
        email["Content-Language"] = m.language  # after the parts: set_content drops Content-* headers
        return email

    def _connect(self) -> smtplib.SMTP:
        c = self.config
        context = ssl.create_default_context()
        smtp = (smtplib.SMTP_SSL(c.host, c.port, timeout=c.timeout_s, context=context) if c.implicit_tls
                else smtplib.SMTP(c.host, c.port, timeout=c.timeout_s))
        try:
            if c.starttls:
                smtp.starttls(context=context)
            if c.username:
                smtp.login(c.username, c.password or "")
        except BaseException:
            smtp.close()
            raise
        return smtp

    def send(self, outbound: Outbound, address: str, idempotency_key: str) -> Receipt:
        email = self.build(outbound, address, idempotency_key)
        try:
            smtp = self._connect()
        except smtplib.SMTPAuthenticationError as exc:
            raise ChannelUnavailable(f"SMTP login refused: {exc.smtp_code}") from None
        except (OSError, smtplib.SMTPException) as exc:
            raise ChannelUnavailable(f"SMTP relay unreachable: {type(exc).__name__}: {exc}") from None
        try:
            refused = smtp.send_message(email)
        except smtplib.SMTPRecipientsRefused as exc:
            code = next(iter(exc.recipients.values()))[0] if exc.recipients else 550
            raise (TransientError if 400 <= code < 500 else PermanentError)(f"recipient refused: {code}") from None
        except smtplib.SMTPResponseException as exc:
            raise (TransientError if 400 <= exc.smtp_code < 500 else PermanentError)(
                f"SMTP {exc.smtp_code}: {exc.smtp_error!r}") from None
        except (OSError, smtplib.SMTPException) as exc:
            raise TransientError(f"SMTP: {type(exc).__name__}: {exc}") from None
        finally:
            try:
                smtp.quit()
            except (OSError, smtplib.SMTPException):
                smtp.close()
        if refused:
            raise PermanentError(f"recipient refused: {next(iter(refused.values()))[0]}")
        return Receipt("smtp", email["Message-ID"])


# --- apprise ---------------------------------------------------------------------------------------------

APPRISE_NO_REFERENCE = "apprise: no provider reference"


class AppriseChannel(ThreadedSends):
    """One channel type carried by Apprise: ``url_template`` with ``{address}`` replaced by the citizen's
    (URL-quoted) address."""

    def __init__(self, name: str, url_template: str, concurrency: int = 1) -> None:
        self.concurrency = concurrency
        self.name = name
        self.url_template = url_template

    def send(self, outbound: Outbound, address: str, idempotency_key: str) -> Receipt:
        import apprise

        url = self.url_template.replace("{address}", urllib.parse.quote(address, safe="+@"))
        notifier = apprise.Apprise()
        if not notifier.add(url):
            raise PermanentError(f"Apprise does not accept the configured {self.name} URL for this address")
        m = outbound.message
        body = m.sms if self.name == "sms" else m.text
        if not notifier.notify(body=body, title="" if self.name == "sms" else m.subject):
            raise TransientError(f"Apprise reported a failed {self.name} notification")
        return Receipt("apprise", None, {"note": APPRISE_NO_REFERENCE})
