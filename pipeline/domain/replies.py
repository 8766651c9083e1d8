"""What a citizen's SMS reply says, and who sent it: pure, so every inbound path reads a reply the same way.

A reply is a keyword as the first word — ``AMAN``/``SAFE`` (safe) or ``TOLONG``/``HELP`` (need help),
in any case, with any spaces or punctuation around it, since people type on small keyboards under
stress; whatever follows is kept as the citizen's note. Anything else is not a reply: the sender
is told which words work rather than guessed at.

Numbers are compared in E.164 (``+`` and 8 to 15 digits): spaces, dashes, dots, slashes and
parentheses are dropped and a leading international ``00`` becomes ``+``. A number without a
country code cannot be placed, so it matches nobody. PostgreSQL applies the same rule to the
registered numbers (``crisiswatch_e164`` in deploy/sql/002_cases.sql); a test holds the two together.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from schemas.models import AckStatus

KEYWORDS: Final[Mapping[str, AckStatus]] = {"AMAN": "safe", "SAFE": "safe", "TOLONG": "need_help", "HELP": "need_help"}
KEYWORD_HINT: Final = "reply AMAN or SAFE if you are safe, TOLONG or HELP if you need help"
MAX_NOTE_CHARS: Final = 2000

_SEPARATORS: Final = re.compile(r"[\s().\-/]")
_E164: Final = re.compile(r"\+[1-9][0-9]{7,14}", re.ASCII)
_EDGE_PUNCTUATION: Final = ".,;:!?¡¿\"'()[]*_~"


@dataclass(frozen=True, slots=True)
class KeywordReply:
    status: AckStatus
    note: str | None


def parse_keyword(body: str) -> KeywordReply | None:
    """The reply in an SMS body, or None when its first word is not a keyword."""
    words = body.split(maxsplit=1)
    if not words:
        return None
    status = KEYWORDS.get(words[0].strip(_EDGE_PUNCTUATION).upper())
    if status is None:
        return None
    rest = words[1].strip() if len(words) > 1 else ""
    return KeywordReply(status, rest[:MAX_NOTE_CHARS] or None)


def normalise_phone(raw: str) -> str | None:
    """``raw`` in E.164 (``+6281234567890``), or None when it is not an international number."""
    compact = _SEPARATORS.sub("", raw)
    if compact.startswith("00"):
        compact = "+" + compact[2:]
    return compact if _E164.fullmatch(compact) else None
