"""Deterministic identifiers: the same situation always yields the same id, so every sink can
drop a replayed or re-emitted message with ``ON CONFLICT DO NOTHING``."""

from __future__ import annotations

import hashlib


def warning_id(citizen_id: str, crisis_id: str, crisis_version: int, kind: str, seq: int = 0) -> str:
    """``w-`` + 32 hex digits of BLAKE2b over the citizen, crisis, crisis version, kind and the
    number of warnings the citizen already got about this crisis (so a second entry into the
    same area is a new warning, while a re-emission of the first is not)."""
    material = "\x1f".join((citizen_id, crisis_id, str(crisis_version), kind, str(seq)))
    return "w-" + hashlib.blake2b(material.encode("utf-8"), digest_size=16).hexdigest()
