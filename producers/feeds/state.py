"""What the feed poller must remember across restarts, in one JSON file written atomically.

- per feed: the validators of the last response (``ETag``, ``Last-Modified``) for conditional
  requests, the SHA-256 of the last document fully handled (an unchanged document is not
  parsed again) and the fingerprints of item rejections already dead-lettered;
- the incident registry (:mod:`pipeline.domain.feeds.merge`): every incident with the last
  version published and its members' latest events, which is what keeps a restarted poller
  from announcing a crisis again;
- the ``(crisis_id, version)`` of events already sent to the review topic.

The state only ever moves forward after Kafka acknowledged what it describes, so a crash
between the two republishes (at-least-once) rather than loses anything.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.domain.feeds.merge import IncidentRegistry

log = logging.getLogger(__name__)

STATE_FORMAT = 1
STATE_FILE_NAME = "feeds-state.json"
# Bounds on the remembered fingerprints; the oldest go first.
MAX_REJECTIONS_PER_FEED = 2000
MAX_REVIEW_ENTRIES = 20_000


class StateError(RuntimeError):
    """The state file cannot be written; the message says which file and why."""


@dataclass(frozen=True, slots=True)
class FeedState:
    location: str
    etag: str | None = None
    last_modified: str | None = None
    sha256: str | None = None
    rejections: tuple[str, ...] = ()

    def with_rejections(self, fingerprints: tuple[str, ...]) -> FeedState:
        merged = tuple(dict.fromkeys((*self.rejections, *fingerprints)))
        return replace(self, rejections=merged[-MAX_REJECTIONS_PER_FEED:])


@dataclass(frozen=True, slots=True)
class PollerState:
    feeds: Mapping[str, FeedState] = field(default_factory=dict)
    registry: IncidentRegistry = field(default_factory=IncidentRegistry)
    review: Mapping[str, int] = field(default_factory=dict)

    def feed(self, name: str, location: str) -> FeedState:
        """The feed's state, or a fresh one if unknown or its location changed (old validators are meaningless)."""
        known = self.feeds.get(name)
        return known if known is not None and known.location == location else FeedState(location)

    def with_feed(self, name: str, feed: FeedState) -> PollerState:
        return replace(self, feeds={**self.feeds, name: feed})

    def with_review(self, seen: Mapping[str, int]) -> PollerState:
        merged = {**self.review, **seen}
        if len(merged) > MAX_REVIEW_ENTRIES:
            merged = dict(list(merged.items())[-MAX_REVIEW_ENTRIES:])
        return replace(self, review=merged)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "feeds": {name: {"location": f.location, "etag": f.etag, "last_modified": f.last_modified,
                             "sha256": f.sha256, "rejections": list(f.rejections)} for name, f in self.feeds.items()},
            "incidents": self.registry.to_json(),
            "review": dict(self.review),
        }

    @classmethod
    def from_json(cls, data: Any) -> PollerState:
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            raise ValueError(f"not a feed poller state of format {STATE_FORMAT}")
        try:
            feeds = {str(name): FeedState(str(f["location"]), f.get("etag"), f.get("last_modified"), f.get("sha256"),
                                          tuple(str(r) for r in f.get("rejections", ())))
                     for name, f in data["feeds"].items()}
            review = {str(k): int(v) for k, v in data.get("review", {}).items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"malformed feed state: {exc!r}") from None
        return cls(feeds, IncidentRegistry.from_json(data.get("incidents", [])), review)


class StateStore:
    """Loads and atomically saves :class:`PollerState` at one path."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self, now: datetime | None = None) -> PollerState:
        """The saved state, or an empty one.

        An unreadable file is moved aside (``<name>.corrupt-<time>``) and the poller starts
        empty: re-announcing current crises (downstream keeps them idempotent per version) is
        better than a crisis centre hearing nothing because a file was damaged.
        """
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return PollerState()
        except OSError as exc:
            raise StateError(f"{self.path}: cannot read feed state: {exc.strerror or exc}") from None
        try:
            return PollerState.from_json(json.loads(raw))
        except (UnicodeDecodeError, ValueError) as exc:
            stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
            try:
                os.replace(self.path, aside)
            except OSError as move_exc:
                raise StateError(f"{self.path}: unreadable ({exc}) and cannot be moved aside: {move_exc}") from None
            log.error("feed state unreadable, moved aside; starting empty", extra={"path": str(self.path),
                                                                                    "moved_to": str(aside),
                                                                                    "reason": str(exc)[:300]})
            return PollerState()

    def save(self, state: PollerState) -> None:
        """Write to a temporary file in the same folder, fsync, then rename over the old one."""
        body = json.dumps(state.to_json(), separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(body)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise StateError(f"{self.path}: cannot save feed state: {exc.strerror or exc}") from None
