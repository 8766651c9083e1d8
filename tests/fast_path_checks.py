"""What the fast decoders' property tests share (tests/property/test_fast_decode.py for check-ins,
test_crisis_fast_path.py for crises): the full path's verdict, the agreement every case must show,
and the byte-level changes that are not about any one field."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

from schemas import InvalidEvent, decode, from_obj
from schemas.codec import MAX_MESSAGE_BYTES, parse_json

T = TypeVar("T")

# Byte-level changes no object-level mutation makes: framing, encodings, nesting, size.
FRAMING_MUTATIONS: list[Callable[[bytes], bytes]] = [
    lambda b: b"\xef\xbb\xbf" + b, lambda b: b" \n\t" + b + b"\r\n", lambda b: b + b"x", lambda b: b[:-1],
    lambda b: b.replace(b'"schema"', b'"Schema"'), lambda b: b[:-1] + b',"x":' + b"[" * 70 + b"]" * 70 + b"}",
    lambda b: b[:-1] + b',"x":1}', lambda b: b"[" + b + b"]", lambda b: json.dumps(json.loads(b)).encode("utf-16"),
    lambda b: b[:-1] + b',"pad":"' + b"x" * MAX_MESSAGE_BYTES + b'"}', lambda b: b.replace(b"{", b"{ ", 1),
]


def full(raw: bytes, model: type[T]) -> T | None:
    """The generic path, never the fast one: parse, JSON Schema, model."""
    try:
        return from_obj(parse_json(raw), model)
    except InvalidEvent:
        return None


def agreed(raw: bytes, model: type[T], fast: Callable[[bytes], T | None], shown: Any = None) -> T | None:
    """The fast decoder's answer, after checking it: either it declines (None) or it equals the full
    path's, and ``schemas.decode`` (which takes the fast path where it can) equals the full path."""
    quick, reference = fast(raw), full(raw, model)
    shown = raw if shown is None else shown
    assert quick is None or quick == reference, (shown, quick, reference)
    try:
        decoded: T | None = decode(raw, model)
    except InvalidEvent:
        decoded = None
    assert decoded == reference, shown
    return quick
