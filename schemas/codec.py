"""Decoding and encoding of wire events: bytes in, typed events out, or a reason why not.

Every event on a crisiswatch topic is a JSON object carrying ``"schema": "<name>/<major>"``.
Decoding checks the object against the JSON Schema of that name (draft 2020-12) before a
typed model is built, so a malformed message is refused at the edge with the field and the
reason, and never becomes an exception deep inside an agent.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from functools import cache
from importlib import resources
from typing import Any, TypeVar, cast

from jsonschema import Draft202012Validator, FormatChecker

from schemas.models import MODELS, Checkin, CheckinSource, Event, parse_time

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


def _no_constant(name: str) -> Any:
    raise InvalidEvent(f"{name} is not a JSON number")


def parse_json(raw: bytes | str) -> Any:
    """JSON bytes to an object, with size and encoding errors as :class:`InvalidEvent`.
    NaN and Infinity, which Python's json module would accept, are refused: JSON has no such numbers."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise InvalidEvent(f"message of {len(raw)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidEvent(f"not JSON: {exc}") from None


class _CheckinFastPath:
    """checkin/1, the hot path of every worker, checked by plain comparisons read from its JSON
    Schema (bounds, pattern, enum), about 50 times faster than the generic validator. Anything it
    does not accept goes through the full validator, which gives the precise error; a test checks
    that both agree on valid and mutated messages."""

    def __init__(self) -> None:
        props = validator("checkin/1").schema["properties"]
        cid = props["citizen_id"]
        self.id_pattern = re.compile(cid["pattern"])
        self.id_len = (cid["minLength"], cid["maxLength"])
        self.lat = (props["lat"]["minimum"], props["lat"]["maximum"])
        self.lon = (props["lon"]["minimum"], props["lon"]["maximum"])
        self.accuracy = (props["accuracy_m"]["minimum"], props["accuracy_m"]["maximum"])
        self.time_pattern = re.compile(props["observed_at"]["pattern"])
        self.sources = frozenset(props["source"]["enum"])

    @staticmethod
    def _number(value: Any, bounds: tuple[float, float]) -> bool:
        return type(value) in (int, float) and bounds[0] <= value <= bounds[1]

    def __call__(self, obj: Any) -> Checkin | None:
        if not isinstance(obj, dict) or obj.get("schema") != "checkin/1":
            return None
        cid, lat, lon = obj.get("citizen_id"), obj.get("lat"), obj.get("lon")
        observed, source, accuracy = obj.get("observed_at"), obj.get("source"), obj.get("accuracy_m")
        if not (type(cid) is str and self.id_len[0] <= len(cid) <= self.id_len[1] and self.id_pattern.match(cid)
                and self._number(lat, self.lat) and self._number(lon, self.lon)
                and type(observed) is str and self.time_pattern.match(observed)
                and type(source) is str and source in self.sources
                and ("accuracy_m" not in obj or self._number(accuracy, self.accuracy))):
            return None
        try:
            when = parse_time(observed)
        except ValueError:
            return None
        return Checkin(cid, float(cast(float, lat)), float(cast(float, lon)), when, cast(CheckinSource, source),
                       None if accuracy is None else float(accuracy))


@cache
def _checkin_fast_path() -> _CheckinFastPath:
    return _CheckinFastPath()


def from_obj(obj: Mapping[str, Any], expected: type[E] | None = None) -> E:
    """A validated object to its typed model."""
    name = check(obj, expected.SCHEMA if expected is not None else None)
    try:
        return cast(E, MODELS[name].from_dict(obj))
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidEvent(str(exc)) from None


def decode(raw: bytes | str, expected: type[E] | None = None) -> E:
    """Bytes from the wire to a typed event, or :class:`InvalidEvent` with the reason."""
    obj = parse_json(raw)
    if expected is Checkin:
        fast = _checkin_fast_path()(obj)
        if fast is not None:
            return cast(E, fast)
    return from_obj(obj, expected)


def encode(event: Event) -> bytes:
    return json.dumps(event.to_dict(), separators=(",", ":"), ensure_ascii=False).encode("utf-8")
