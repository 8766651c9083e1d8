"""Feed pollers: fetch (conditional GET, capped) → parse (pure) → merge into incidents → publish.

One thread per feed fetches on its own schedule; parsing, merging, publishing and saving the
state happen one feed at a time under a lock, because the incident registry is shared by every
feed (a GDACS item and a USGS item may join the same incident).

Three kinds of failure, three paths:

- a document or an item that cannot be used → ``dlq`` with a reason header (once per distinct
  document or item, not on every poll). That includes an event a parser or the merge built that
  the stages would refuse: every event is encoded and decoded again by the stages' own check
  (:func:`pipeline.domain.validation.prepare_outgoing`) before it is published;
- the feed cannot be fetched (timeout, network, HTTP error, too large) → metrics, a log line
  and exponential backoff with jitter;
- Kafka does not acknowledge → nothing is marked as published (state and validators stay as
  they were), so the next poll fetches the whole document again and republishes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from http.client import HTTPException
from pathlib import Path
from typing import Any, Literal, Protocol

from pipeline import topics
from pipeline.domain.feeds.base import FeedError, ParseContext, ParseResult, Rejection, parse_document
from pipeline.domain.feeds.merge import MergeRule, merge
from pipeline.domain.validation import prepare_outgoing
from pipeline.metrics import FeedMetrics
from pipeline.settings import Settings
from producers.feeds.config import FeedConfig, PollerConfig
from producers.feeds.state import FeedState, PollerState, StateError, StateStore
from producers.publisher import BrokerUnavailable, Outgoing, dead_letter, outgoing
from schemas import Crisis, InvalidEvent

log = logging.getLogger(__name__)

USER_AGENT = "crisiswatch-feed-poller/0.1 (+https://github.com/crisiswatch)"
# A dead-lettered document keeps at most this much of its body: enough to see what went wrong,
# within the default Kafka message size.
DLQ_DOCUMENT_BYTES = 512 * 1024
READ_CHUNK = 64 * 1024
DLQ_STAGE = "feed-parse"
DEFAULT_RULE = MergeRule()

ErrorKind = Literal["timeout", "network", "http", "too_large", "io", "parse", "broker", "state", "internal"]


class FetchError(Exception):
    def __init__(self, kind: ErrorKind, reason: str) -> None:
        super().__init__(reason)
        self.kind: ErrorKind = kind


class Sink(Protocol):
    """Where messages go: :class:`producers.publisher.Publisher` (raises ``BrokerUnavailable``)."""

    def publish(self, messages: Iterable[Outgoing]) -> int: ...


@dataclass(frozen=True, slots=True)
class FeedTopics:
    crisis: str = topics.CRISIS_EVENTS
    review: str = topics.FEED_REVIEW
    dlq: str = topics.DLQ


@dataclass(frozen=True, slots=True)
class Fetched:
    body: bytes | None  # None: 304 Not Modified
    etag: str | None
    last_modified: str | None


@dataclass(frozen=True, slots=True)
class PollResult:
    feed: str
    ok: bool
    error_kind: ErrorKind | None = None
    error: str | None = None
    not_modified: bool = False
    published: int = 0
    review: int = 0
    rejected: int = 0
    unchanged: int = 0
    notes: tuple[str, ...] = field(default=())


def fetch(feed: FeedConfig, etag: str | None, last_modified: str | None, user_agent: str = USER_AGENT) -> Fetched:
    """Fetch a feed with a conditional GET; the whole download must finish within ``timeout_s``."""
    if feed.path is not None:
        return Fetched(_read_file(feed.path, feed.max_bytes), None, None)
    assert feed.url is not None
    headers = {"User-Agent": user_agent, "Accept": "*/*"}
    if etag:
        headers["If-None-Match"] = etag
    if last_modified:
        headers["If-Modified-Since"] = last_modified
    request = urllib.request.Request(feed.url, headers=headers)  # noqa: S310 - config allows http(s) only
    deadline = time.monotonic() + feed.timeout_s
    try:
        with urllib.request.urlopen(request, timeout=feed.timeout_s) as response:  # noqa: S310
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > feed.max_bytes:
                raise FetchError("too_large", f"response of {declared} bytes exceeds max_bytes={feed.max_bytes}")
            chunks: list[bytes] = []
            size = 0
            while chunk := response.read(READ_CHUNK):
                size += len(chunk)
                if size > feed.max_bytes:
                    raise FetchError("too_large", f"response exceeds max_bytes={feed.max_bytes}; stopped reading")
                if time.monotonic() > deadline:
                    raise FetchError("timeout", f"download took longer than timeout_s={feed.timeout_s:g}")
                chunks.append(chunk)
            return Fetched(b"".join(chunks), response.headers.get("ETag"), response.headers.get("Last-Modified"))
    except urllib.error.HTTPError as exc:
        if exc.code == 304:
            return Fetched(None, exc.headers.get("ETag") or etag, exc.headers.get("Last-Modified") or last_modified)
        raise FetchError("http", f"HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise FetchError("timeout", f"no answer within timeout_s={feed.timeout_s:g}") from None
        raise FetchError("network", f"cannot reach {feed.url}: {exc.reason}") from None
    except TimeoutError:
        raise FetchError("timeout", f"no answer within timeout_s={feed.timeout_s:g}") from None
    except (OSError, HTTPException) as exc:
        raise FetchError("network", f"connection to {feed.url} failed: {type(exc).__name__}: {exc}") from None


def _read_file(path: Path, max_bytes: int) -> bytes:
    try:
        with path.open("rb") as src:
            data = src.read(max_bytes + 1)
    except OSError as exc:
        raise FetchError("io", f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise FetchError("too_large", f"{path} exceeds max_bytes={max_bytes}; stopped reading")
    return data


def backoff_delay(failures: int, interval_s: float, jitter: float, base_s: float = 10.0, cap_s: float = 3600.0) -> float:
    """Seconds until the next poll: the interval when healthy, else exponential backoff with jitter.

    After ``n`` consecutive failures the ceiling is ``base_s * 2**(n-1)`` (capped at ``cap_s`` or
    the interval, whichever is larger) and the delay is drawn from [ceiling/2, ceiling]
    ("equal jitter": never a thundering herd, never a hot retry loop). ``jitter`` is in [0, 1).
    """
    if failures <= 0:
        return interval_s
    ceiling = min(max(cap_s, interval_s), base_s * 2.0 ** min(failures - 1, 30))
    return ceiling * (0.5 + jitter / 2.0)


def _unicode(text: str) -> str:
    """Text from a feed as it can be encoded: a lone surrogate (an XML character reference can make one) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FeedPoller:
    """Polls the configured feeds and publishes what is new; see the module docstring."""

    def __init__(self, config: PollerConfig, settings: Settings, sink: Sink, state_path: Path, metrics: FeedMetrics,
                 feed_topics: FeedTopics = FeedTopics(), clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 jitter: Callable[[], float] = random.random, rule: MergeRule = DEFAULT_RULE,
                 user_agent: str = USER_AGENT, geocoder: Any = None) -> None:
        self.config = config
        self.settings = settings
        self.sink = sink
        self.metrics = metrics
        self.topics = feed_topics
        self.clock = clock
        self.jitter = jitter
        self.rule = rule
        self.rules = settings.event_rules()
        self.user_agent = user_agent
        # Only news items need place names looked up; build the configured geocoder only then.
        # ValueError/TypeError here name a bad [geocoder] section.
        self.geocoder = geocoder if geocoder is not None or not any(f.format in ("rss", "auto") for f in config.feeds) \
            else _make_geocoder(config)
        self._store = StateStore(state_path)
        self._state = self._store.load(clock())
        self._lock = threading.Lock()
        self._failures: dict[str, int] = {}
        self._threads: list[threading.Thread] = []

    @property
    def state(self) -> PollerState:
        return self._state

    # --- one poll --------------------------------------------------------------------------------

    def poll(self, feed: FeedConfig) -> PollResult:
        """Fetch, parse, merge and publish one feed once. Never raises."""
        started = time.monotonic()
        try:
            result = self._poll(feed)
        except Exception as exc:  # a bug must not stop the other feeds or the next poll
            log.exception("feed poll failed unexpectedly", extra={"feed": feed.name})
            result = PollResult(feed.name, ok=False, error_kind="internal", error=f"{type(exc).__name__}: {exc}")
        self.metrics.fetch_seconds.labels(feed.name).observe(time.monotonic() - started)
        if result.ok:
            self._failures.pop(feed.name, None)
            self.metrics.last_success.labels(feed.name).set(self.clock().timestamp())
        else:
            self._failures[feed.name] = self._failures.get(feed.name, 0) + 1
            assert result.error_kind is not None
            self.metrics.errors.labels(feed.name, result.error_kind).inc()
            log.warning("feed poll failed", extra={"feed": feed.name, "kind": result.error_kind, "reason": result.error})
        return result

    def poll_once(self) -> list[PollResult]:
        return [self.poll(feed) for feed in self.config.feeds]

    def next_delay(self, feed: FeedConfig) -> float:
        return backoff_delay(self._failures.get(feed.name, 0), feed.interval_s, self.jitter())

    def _poll(self, feed: FeedConfig) -> PollResult:
        known = self._state.feed(feed.name, feed.location)
        try:
            fetched = fetch(feed, known.etag, known.last_modified, self.user_agent)
        except FetchError as exc:
            return PollResult(feed.name, ok=False, error_kind=exc.kind, error=str(exc))
        with self._lock:
            return self._handle(feed, fetched)

    def _handle(self, feed: FeedConfig, fetched: Fetched) -> PollResult:
        known = self._state.feed(feed.name, feed.location)
        validators = replace(known, etag=fetched.etag or known.etag, last_modified=fetched.last_modified or known.last_modified)
        if fetched.body is None or _sha256(fetched.body) == known.sha256:
            try:
                self._commit(self._state.with_feed(feed.name, validators), changed=validators != known)
            except StateError as exc:
                return PollResult(feed.name, ok=False, error_kind="state", error=str(exc), not_modified=True)
            return PollResult(feed.name, ok=True, not_modified=True)
        now = self.clock()
        body = fetched.body
        ctx = ParseContext(now=now, max_bytes=feed.max_bytes, source_name=feed.name, language=feed.language,
                           exercise_mode=self.settings.exercise_mode if feed.exercise is None else feed.exercise,
                           geocoder=self.geocoder)
        if feed.min_confidence is not None:
            ctx = replace(ctx, min_confidence=feed.min_confidence)
        try:
            parsed = parse_document(body, feed.format, ctx)
        except FeedError as exc:
            return self._dead_letter_document(feed, body, validators, str(exc))
        except Exception as exc:  # a parser bug is still only this document's problem
            log.exception("parser failed", extra={"feed": feed.name})
            return self._dead_letter_document(feed, body, validators, f"parser failed: {type(exc).__name__}: {exc}")
        return self._publish_parsed(feed, body, validators, parsed, now)

    def _publish_parsed(self, feed: FeedConfig, body: bytes, validators: FeedState, parsed: ParseResult,
                        now: datetime) -> PollResult:
        state = self._state
        invalid: list[Rejection] = []

        def admitted(event: Crisis) -> Crisis | None:
            """The event as the stages will read it, or None (and a rejection) if they would refuse it."""
            try:
                return prepare_outgoing(self._with_language(event, feed), now, self.rules)[0]
            except InvalidEvent as exc:
                reason = f"the parser produced an invalid crisis/1 event ({exc})"
            except Exception as exc:  # an item's problem nobody foresaw stays that item's problem
                log.exception("checking a parsed event failed", extra={"feed": feed.name})
                reason = f"checking the parsed event failed: {type(exc).__name__}: {exc}"
            invalid.append(Rejection(event.source_ref or event.crisis_id, reason))
            return None

        events: list[Outgoing] = []
        review_seen: dict[str, int] = {}
        for event in filter(None, map(admitted, parsed.review)):
            if max(state.review.get(event.crisis_id, 0), review_seen.get(event.crisis_id, 0)) >= event.version:
                continue
            review_seen[event.crisis_id] = event.version
            events.append(outgoing(event, self.topics.review))

        registry = state.registry
        published = unchanged = 0
        for event in filter(None, map(admitted, parsed.events)):
            outcome = merge(registry, event, self.rule, now)
            combined = None if outcome.publish is None else admitted(outcome.publish)
            if outcome.publish is not None and combined is None:
                continue  # the incident stays as it was; the reason is dead-lettered below
            registry = outcome.registry
            if combined is None:
                unchanged += 1
                continue
            published += 1
            events.append(outgoing(combined, self.topics.crisis))
            log.info("crisis event", extra={"feed": feed.name, "crisis_id": combined.crisis_id,
                                            "version": combined.version, "op": combined.op,
                                            "source_ref": event.source_ref})

        messages: list[Outgoing] = []
        new_rejections: list[str] = []
        rejections = (*parsed.rejected, *invalid)
        for rejection in rejections:
            item_ref, reason = _unicode(rejection.item_ref), _unicode(rejection.reason)
            mark = _sha256(f"{item_ref}\n{reason}".encode())[:24]
            if mark in validators.rejections or mark in new_rejections:
                continue
            new_rejections.append(mark)
            payload = json.dumps({"feed": feed.name, "location": feed.location, "item_ref": item_ref,
                                  "reason": reason}, ensure_ascii=False).encode("utf-8")
            messages.append(self._to_dlq(payload, reason, feed))
        messages += events
        for note in parsed.notes:
            log.info("feed note", extra={"feed": feed.name, "note": note[:500]})

        if messages:
            try:
                self.sink.publish(messages)
            except BrokerUnavailable as exc:
                return PollResult(feed.name, ok=False, error_kind="broker", error=str(exc))

        new_state = (state.with_feed(feed.name, replace(validators, sha256=_sha256(body)).with_rejections(tuple(new_rejections)))
                     .with_review(review_seen))
        new_state = replace(new_state, registry=registry.prune(now, self.rule))
        items = self.metrics.items
        items.labels(feed.name, "published").inc(published)
        items.labels(feed.name, "unchanged").inc(unchanged)
        items.labels(feed.name, "review").inc(len(review_seen))
        items.labels(feed.name, "rejected").inc(len(rejections))
        items.labels(feed.name, "noted").inc(len(parsed.notes))
        self.metrics.dlq.labels(DLQ_STAGE, "item").inc(len(new_rejections))
        try:
            self._commit(new_state)
        except StateError as exc:
            return PollResult(feed.name, ok=False, error_kind="state", error=str(exc), published=published)
        return PollResult(feed.name, ok=True, published=published, review=len(review_seen), rejected=len(rejections),
                          unchanged=unchanged, notes=parsed.notes)

    def _dead_letter_document(self, feed: FeedConfig, body: bytes, validators: FeedState, reason: str) -> PollResult:
        detail = f"{reason} [feed {feed.name}: {feed.location}, {len(body)} bytes" + \
                 (f", first {DLQ_DOCUMENT_BYTES} kept]" if len(body) > DLQ_DOCUMENT_BYTES else "]")
        try:
            self.sink.publish([self._to_dlq(body[:DLQ_DOCUMENT_BYTES], detail, feed)])
        except BrokerUnavailable as exc:
            return PollResult(feed.name, ok=False, error_kind="broker", error=str(exc))
        self.metrics.dlq.labels(DLQ_STAGE, "document").inc()
        # Remember the document as handled: the same bytes are not dead-lettered again on every poll.
        try:
            self._commit(self._state.with_feed(feed.name, replace(validators, sha256=_sha256(body))))
        except StateError as exc:
            log.error("cannot save feed state", extra={"feed": feed.name, "reason": str(exc)})
        return PollResult(feed.name, ok=False, error_kind="parse", error=reason)

    def _to_dlq(self, raw: bytes, reason: str, feed: FeedConfig) -> Outgoing:
        letter = dead_letter(raw, reason, source_topic=f"feed:{feed.name}", stage=DLQ_STAGE, key=feed.name.encode("utf-8"))
        return replace(letter, topic=self.topics.dlq)

    @staticmethod
    def _with_language(event: Crisis, feed: FeedConfig) -> Crisis:
        return event if event.language is not None or feed.language is None else replace(event, language=feed.language)

    def _commit(self, state: PollerState, changed: bool = True) -> None:
        self._state = state
        if changed:
            self._store.save(state)

    # --- running -----------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Poll every feed on its own schedule until ``stop`` is set; returns when all threads ended."""
        self._threads = [threading.Thread(target=self._loop, args=(feed, stop), name=f"feed-{feed.name}", daemon=True)
                         for feed in self.config.feeds]
        for thread in self._threads:
            thread.start()
        for thread in self._threads:
            thread.join()

    def healthy(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def _loop(self, feed: FeedConfig, stop: threading.Event) -> None:
        while not stop.is_set():
            self.poll(feed)
            stop.wait(self.next_delay(feed))


def _make_geocoder(config: PollerConfig) -> Any:
    from producers.feeds.geocoding import make_geocoder

    try:
        return make_geocoder(config.geocoder_service, **config.geocoder_options)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"[geocoder]: {exc}") from None


def failures(results: Sequence[PollResult]) -> list[str]:
    """One line per failed feed, for a human."""
    return [f"{r.feed}: {r.error_kind}: {r.error}" for r in results if not r.ok]
