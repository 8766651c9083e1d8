"""Decoding and encoding of wire events: bytes in, typed events out, or a reason why not.

Every event on a crisiswatch topic is a JSON object carrying ``"schema": "<name>/<major>"``.
Decoding checks the object against the JSON Schema of that name (draft 2020-12) before a
typed model is built, so a malformed message is refused at the edge with the field and the
reason, and never becomes an exception deep inside an agent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from importlib import resources
from typing import Any, TypeVar, cast

from jsonschema import Draft202012Validator, FormatChecker

from schemas.models import MODELS, Event

E = TypeVar("E", bound=Event)

MAX_MESSAGE_BYTES = 1_000_000


class InvalidEvent(ValueError):
    """A message that is not a valid event. ``field`` is a JSON path (``$.lat``) or ``$``."""

    def __init__(self, reason: str, field: str = "$") -> None:
        super().__init__(f"{field}: {reason}")
        self.reason = reason
        self.field = field


@cache
def validator(schema_name: str) -> Draft202012Validator:
    """The compiled validator for ``schema_name`` (``checkin/1``...)."""
    file_name = schema_name.replace("/", "-") + ".schema.json"
    try:
        text = resources.files("schemas").joinpath("json", file_name).read_text("utf-8")
    except FileNotFoundError:
        raise InvalidEvent(f"unknown schema {schema_name!r}", "$.schema") from None
    return Draft202012Validator(json.loads(text), format_checker=FormatChecker())


def schema_names() -> tuple[str, ...]:
    return tuple(MODELS)


def _json_path(path: Any) -> str:
    out = "$"
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def check(obj: Mapping[str, Any], expected: str | None = None) -> str:
    """Validate a decoded JSON object; return its schema name or raise :class:`InvalidEvent`."""
    if not isinstance(obj, Mapping):
        raise InvalidEvent("an event must be a JSON object")
    name = obj.get("schema")
    if not isinstance(name, str):
        raise InvalidEvent("missing or non-string 'schema'", "$.schema")
    if expected is not None and name != expected:
        raise InvalidEvent(f"expected schema {expected!r}, got {name!r}", "$.schema")
    if name not in MODELS:
        raise InvalidEvent(f"unknown schema {name!r}", "$.schema")
    errors = sorted(validator(name).iter_errors(obj), key=lambda e: (len(e.absolute_path), str(e.absolute_path)))
    if errors:
        first = errors[0]
        raise InvalidEvent(first.message, _json_path(first.absolute_path))
    return name


def parse_json(raw: bytes | str) -> Any:
    """JSON bytes to an object, with size and encoding errors as :class:`InvalidEvent`."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise InvalidEvent(f"message of {len(raw)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidEvent(f"not JSON: {exc}") from None


def from_obj(obj: Mapping[str, Any], expected: type[E] | None = None) -> E:
    """A validated object to its typed model."""
    name = check(obj, expected.SCHEMA if expected is not None else None)
    try:
        return cast(E, MODELS[name].from_dict(obj))
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidEvent(str(exc)) from None


def decode(raw: bytes | str, expected: type[E] | None = None) -> E:
    """Bytes from the wire to a typed event, or :class:`InvalidEvent` with the reason."""
    return from_obj(parse_json(raw), expected)


def encode(event: Event) -> bytes:
    return json.dumps(event.to_dict(), separators=(",", ":"), ensure_ascii=False).encode("utf-8")
