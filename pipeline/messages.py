"""Messages a citizen reads — a minimal stand-in (English only, plain f-strings) with the interface
of the templated, multilingual renderer that replaces it: :func:`render`, :class:`Recipient`,
:class:`RenderedMessage`, :class:`Embassy` and :class:`EmbassyDirectory`."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

from schemas import Warning

SMS_SEGMENT_CHARS = 153  # a GSM-7 segment of a concatenated SMS


@dataclass(frozen=True, slots=True)
class Recipient:
    citizen_id: str
    name: str
    language: str


@dataclass(frozen=True, slots=True)
class Embassy:
    country: str
    mission: str
    phone: str
    email: str


@dataclass(frozen=True, slots=True)
class RenderedMessage:
    language: str
    subject: str
    text: str
    html: str
    sms: str
    sms_segments: int


@dataclass(frozen=True, slots=True)
class EmbassyDirectory:
    embassies: tuple[Embassy, ...] = ()

    @classmethod
    def load(cls, path: Path | str | None) -> EmbassyDirectory:
        if path is None:
            return cls()
        entries = json.loads(Path(path).read_text("utf-8"))
        return cls(tuple(Embassy(cc, e["mission"], e["phone"], e["email"]) for cc, e in entries.items()))

    def for_country(self, cc: str) -> Embassy | None:
        return next((e for e in self.embassies if e.country == cc), None)


def render(warning: Warning, recipient: Recipient, *, embassy: Embassy | None, reply_url: str | None,
           sms_max_segments: int = 2) -> RenderedMessage:
    where = "inside the affected area" if warning.distance_km == 0 else f"{warning.distance_km:.1f} km from the affected area"
    subject = f"[{warning.severity.upper()}] {warning.title}"
    lines = [f"Dear {recipient.name},", "", f"{warning.title} ({warning.kind}): you are {where}.", warning.instruction]
    if embassy is not None:
        lines.append(f"{embassy.mission}: {embassy.phone}, {embassy.email}")
    if reply_url is not None:
        lines.append(f"Reply: {reply_url}")
    text = "\n".join(lines)
    body = "".join(f"<p>{html.escape(line)}</p>" for line in lines if line)
    sms = f"{warning.title}: {warning.instruction}"[:SMS_SEGMENT_CHARS * sms_max_segments]
    segments = max(1, -(-len(sms) // SMS_SEGMENT_CHARS))
    return RenderedMessage("en", subject, text, f"<html><body>{body}</body></html>", sms, segments)
