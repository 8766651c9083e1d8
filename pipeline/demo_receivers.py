"""The demo's stand-ins for the world outside: a mail server (aiosmtpd) and a webhook receiver
(``http.server``), both in this process on loopback, recording what the dispatcher delivers.

They are the real protocols, not mocks: the dispatcher runs as its own process and reaches them over
SMTP and HTTP exactly as it would reach a ministry's relay or a travel desk's endpoint. The webhook
receiver checks every request's signature with :func:`pipeline.domain.delivery.verify`, as a real
receiver must, and answers 401 to one that does not verify (counted: the demo fails on any).
What they record lets the demo check that each warning arrived exactly once per channel.
"""

from __future__ import annotations

import email
import email.policy
import json
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pipeline.domain.delivery import IDEMPOTENCY_HEADER, SIGNATURE_HEADER, verify


@dataclass(frozen=True, slots=True)
class Delivered:
    """One message as a receiver saw it."""

    channel: str
    warning_id: str
    address: str
    language: str
    subject: str
    text: str


@dataclass
class Inbox:
    """What the receivers got, shared by both (thread-safe)."""

    delivered: list[Delivered] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)  # why a request was refused (bad signature, no key ...)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, item: Delivered) -> None:
        with self.lock:
            self.delivered.append(item)

    def reject(self, reason: str) -> None:
        with self.lock:
            self.rejected.append(reason)

    def snapshot(self) -> list[Delivered]:
        with self.lock:
            return list(self.delivered)

    def per_channel(self) -> Counter[tuple[str, str]]:
        """How many times each (warning_id, channel) arrived."""
        return Counter((d.warning_id, d.channel) for d in self.snapshot())


class WebhookReceiver:
    """POST /<anything>: verifies the signature, records the warning_id (the Idempotency-Key) and the
    rendered message; 204 when accepted, 401 when the signature does not verify."""

    def __init__(self, inbox: Inbox, secret: str, host: str = "127.0.0.1") -> None:
        receiver = self
        self.inbox = inbox
        self.secret = secret.encode()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status = receiver.accept(self.path, dict(self.headers.items()), body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="demo-webhook", daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def accept(self, path: str, headers: dict[str, str], body: bytes) -> int:
        key = headers.get(IDEMPOTENCY_HEADER, "")
        if not verify(self.secret, headers.get(SIGNATURE_HEADER, ""), body, int(time.time())):
            self.inbox.reject(f"bad signature on {path} ({key})")
            return 401
        try:
            payload = json.loads(body)
            message = payload["message"]
            warning_id = payload["warning"]["warning_id"]
        except (ValueError, KeyError, TypeError):
            self.inbox.reject(f"unreadable body on {path}")
            return 400
        if warning_id != key:
            self.inbox.reject(f"Idempotency-Key {key!r} is not the warning_id {warning_id!r}")
            return 400
        self.inbox.add(Delivered("webhook", warning_id, path, str(message.get("language", "")),
                                 str(message.get("subject", "")), str(message.get("text", ""))))
        return 204

    def start(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class MailServer:
    """An SMTP server (aiosmtpd) that accepts every recipient and records each message per recipient."""

    def __init__(self, inbox: Inbox, host: str = "127.0.0.1") -> None:
        from aiosmtpd.controller import Controller

        from pipeline.embedded import free_port

        self.inbox = inbox
        self.host = host
        self.port = free_port()
        self.controller = Controller(self, hostname=host, port=self.port)

    @property
    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        if not isinstance(message, EmailMessage):
            return "554 unreadable message"
        warning_id = str(message.get("X-Crisiswatch-Warning-Id", ""))
        body = message.get_body(("plain",))
        text = body.get_content() if isinstance(body, EmailMessage) else ""
        for recipient in envelope.rcpt_tos:
            self.inbox.add(Delivered("email", warning_id, recipient, str(message.get("Content-Language", "")),
                                     " ".join(str(message.get("Subject", "")).split()), text))
        return "250 OK"

    def start(self) -> MailServer:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()


@dataclass
class Receivers:
    """Both receivers and the generated webhook secret, started together."""

    inbox: Inbox
    webhook: WebhookReceiver
    mail: MailServer
    secret: str

    @classmethod
    def start(cls) -> Receivers:
        inbox = Inbox()
        secret = secrets.token_urlsafe(32)
        webhook = WebhookReceiver(inbox, secret).start()
        try:
            mail = MailServer(inbox).start()
        except BaseException:
            webhook.stop()
            raise
        return cls(inbox, webhook, mail, secret)

    def stop(self) -> None:
        try:
            self.mail.stop()
        finally:
            self.webhook.stop()
