"""The embedded profile's API tokens and reply-link secret, kept in the data directory so that every
``crisiswatch up`` on it hands out the same ones: scripts, simulators and phones configured once keep
working across restarts, and so do the reply links already sent.

The file (``<data dir>/tokens.json``) is readable by its owner only (mode 0600), written whole or
not at all, and holds only tokens crisiswatch generated; a token set in the environment always
wins and is never written there.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Final

from pipeline.settings import Secret, Settings

TOKENS_FILE: Final = "tokens.json"
_KEYS: Final = ("ingest", "operator", "reply")


class TokenFileError(ValueError):
    """The tokens file cannot be used; the message names it and says what to do."""


def new_token() -> str:
    return secrets.token_urlsafe(24)


def tokens_path(data_dir: Path) -> Path:
    return data_dir / TOKENS_FILE


def load_or_create_tokens(path: Path, make: Callable[[], str] = new_token) -> dict[str, str]:
    """The ``ingest`` and ``operator`` tokens and the ``reply`` secret kept in ``path``, creating the
    file (mode 0600) or adding a missing one first. A file others could read is made private again."""
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
            raise TokenFileError(f'{path}: expected {{"ingest": "...", "operator": "...", "reply": "..."}}; '
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
    tokens file; the file's path, or None when all three are configured (then no file is read or written)."""
    if settings.ingest_token and settings.operator_token and settings.reply_secret:
        return settings, None
    path = tokens_path(settings.data_dir)
    kept = load_or_create_tokens(path, make)
    return replace(settings, ingest_token=settings.ingest_token or Secret(kept["ingest"]),
                   operator_token=settings.operator_token or Secret(kept["operator"]),
                   reply_secret=settings.reply_secret or Secret(kept["reply"])), path
