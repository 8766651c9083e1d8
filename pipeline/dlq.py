"""Dead-letter records: the one builder every stage uses, so that a dead letter always fits the broker.

A message is dead-lettered because something about it is wrong, and "too big" is one of the things
that can be wrong: a record of 1 MB or more, copied as it is to ``dlq``, is refused by the producer
(``max_request_size``) or the broker (``message.max.bytes``) — and a stage that cannot write its
dead letter cannot go on past the message. So the payload is cut to ``max_payload_bytes`` (well below
the 1,000,000-byte limits, leaving room for the key and headers), the key to :data:`MAX_KEY_BYTES`,
and every header to :data:`MAX_HEADER_BYTES`. What was cut is still identifiable: the original
payload's size and SHA-256 are always in the headers (a reader can match a dead letter with the
message it came from, or count distinct ones), and a ``truncated`` header says what was cut.

Headers (names in :mod:`pipeline.topics`): reason (``"<ExcType>: <message>"``), exception type,
source topic, partition and offset where known, stage, original size, original SHA-256, truncated.
Header values are UTF-8; text that cannot be encoded (a lone surrogate quoted in an exception
message) is written with backslash escapes rather than failing the dead letter.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final

from pipeline import topics

DEFAULT_MAX_PAYLOAD_BYTES: Final = 512 * 1024
MAX_KEY_BYTES: Final = 1024
MAX_HEADER_BYTES: Final = 1000
MIN_PAYLOAD_BYTES: Final = 1024


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    """A record for the ``dlq`` topic: key, (possibly truncated) value and headers."""

    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]

    def size(self) -> int:
        """Bytes of key, value and headers (names and values): what counts against the broker's limit,
        less the record's fixed framing of a few dozen bytes."""
        return (len(self.key or b"") + len(self.value)
                + sum(len(name.encode("utf-8")) + len(value) for name, value in self.headers))

    def header(self, name: str) -> bytes | None:
        return next((value for key, value in self.headers if key == name), None)


def header_text(text: str, limit: int = MAX_HEADER_BYTES) -> bytes:
    """``text`` as UTF-8 of at most ``limit`` bytes, cut on a character boundary, never raising."""
    raw = text.encode("utf-8", errors="backslashreplace")
    if len(raw) <= limit:
        return raw
    return raw[:limit].decode("utf-8", errors="ignore").encode("utf-8")


def build(value: bytes | None, *, reason: str, stage: str, source_topic: str, error_type: str = "",
          partition: int | None = None, offset: int | None = None, key: bytes | None = None,
          max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> DeadLetterRecord:
    """The dead letter of one message. ``value`` None (a tombstone) is an empty payload."""
    if max_payload_bytes < MIN_PAYLOAD_BYTES:
        raise ValueError(f"max_payload_bytes must be at least {MIN_PAYLOAD_BYTES}, got {max_payload_bytes}")
    payload = value or b""
    truncated: list[str] = []
    if len(payload) > max_payload_bytes:
        truncated.append("value")
    if key is not None and len(key) > MAX_KEY_BYTES:
        truncated.append("key")
    headers: list[tuple[str, bytes]] = [
        (topics.DLQ_REASON_HEADER, header_text(reason)),
        (topics.DLQ_ERROR_TYPE_HEADER, header_text(error_type, 200)),
        (topics.DLQ_SOURCE_TOPIC_HEADER, header_text(source_topic, 255)),
        (topics.DLQ_STAGE_HEADER, header_text(stage, 100)),
        (topics.DLQ_ORIGINAL_SIZE_HEADER, str(len(payload)).encode()),
        (topics.DLQ_ORIGINAL_SHA256_HEADER, hashlib.sha256(payload).hexdigest().encode()),
    ]
    if partition is not None:
        headers.append((topics.DLQ_SOURCE_PARTITION_HEADER, str(partition).encode()))
    if offset is not None:
        headers.append((topics.DLQ_SOURCE_OFFSET_HEADER, str(offset).encode()))
    if truncated:
        headers.append((topics.DLQ_TRUNCATED_HEADER, ",".join(truncated).encode()))
    return DeadLetterRecord(None if key is None else key[:MAX_KEY_BYTES], payload[:max_payload_bytes], tuple(headers))
