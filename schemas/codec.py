"""Decoding and encoding of wire events: bytes in, typed events out, or a reason why not.

Every event on a crisiswatch topic is a JSON object carrying ``"schema": "<name>/<major>"``.
Decoding checks the object against the JSON Schema of that name (draft 2020-12) before a
typed model is built, so a malformed message is refused at the edge with the field and the
reason, and never becomes an exception deep inside an agent.

This is the one decoder of the project: the ingest API, the feed parsers' output check, the
worker's agents, the sink and the router all read events through :func:`decode` (the domain
adds its own rules on top, in :mod:`pipeline.domain.validation`). Before any JSON Schema is
consulted it refuses what would hurt a later stage rather than this one:

- more than :data:`MAX_MESSAGE_BYTES`, or containers nested more than :data:`MAX_DEPTH` levels
  deep, checked *before* parsing (Python's parser and every recursive walk after it would meet
  ``RecursionError`` at about a thousand levels; no event of ours needs more than six);
- text that is not UTF-8, and strings or object keys holding a lone surrogate (``"\\ud800"``:
  not Unicode, so encoding it again fails) or NUL (U+0000: PostgreSQL stores neither in
  ``text`` nor in ``jsonb``);
- integers beyond what PostgreSQL's ``bigint`` holds (``|n| < 2^63``) and numbers too large
  for a double (``1e400`` parses as infinity);
- date-times without an offset or whose instant is outside 0001-01-02 .. 9999-12-30 UTC (so
  every accepted time converts to any offset and back).

Patterns in the schemas are ECMA-262 regular expressions, as JSON Schema says: ``$`` matches
only at the very end and ``\\d`` only ASCII digits. Python's ``re`` would let ``"ID\\n"`` pass
``^[A-Z]{2}$``, which PostgreSQL's own check then refuses; :func:`ecma_pattern` translates.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from functools import cache
from importlib import resources
from itertools import accumulate
from typing import Any, Final, TypeVar, cast

import msgspec
from jsonschema import Draft202012Validator, FormatChecker, validators
from jsonschema.exceptions import ValidationError

from schemas.models import MODELS, Checkin, CheckinSource, Crisis, Event, parse_time

E = TypeVar("E", bound=Event)

MAX_MESSAGE_BYTES: Final = 1_000_000
MAX_DEPTH: Final = 64
"""Deepest nesting of arrays and objects accepted; a MultiPolygon position is six levels down."""
MAX_INTEGER: Final = 2**63 - 1
"""Largest magnitude of a JSON integer: PostgreSQL's ``bigint``."""


class InvalidEvent(ValueError):
    """A message that is not a valid event. ``field`` is a JSON path (``$.lat``) or ``$``."""

    def __init__(self, reason: str, field: str = "$") -> None:
        super().__init__(f"{field}: {reason}")
        self.reason = reason
        self.field = field


# --- JSON Schema, with ECMA-262 patterns and our date-time ------------------------------------


@cache
def ecma_pattern(pattern: str) -> re.Pattern[str]:
    """A JSON Schema ``pattern`` compiled with ECMA-262 meaning for what our schemas use: ``$``
    outside a character class is the end of the text (Python's ``\\Z``), classes are ASCII."""
    out: list[str] = []
    escaped = in_class = False
    for char in pattern:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
        elif char == "$":
            char = r"\Z"
        out.append(char)
    return re.compile("".join(out), re.ASCII)


def _pattern_keyword(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not ecma_pattern(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


_Validator = validators.extend(Draft202012Validator, {"pattern": _pattern_keyword})


def _date_time(instance: object) -> bool:
    """RFC 3339 with an offset, within the range every stage can convert (see :func:`parse_time`)."""
    if isinstance(instance, str):
        parse_time(instance)
    return True


_FORMATS = FormatChecker()
_FORMATS.checks("date-time", raises=ValueError)(_date_time)


@cache
def validator(schema_name: str) -> Any:
    """The compiled validator for ``schema_name`` (``checkin/1``...)."""
    file_name = schema_name.replace("/", "-") + ".schema.json"
    try:
        text = resources.files("schemas").joinpath("json", file_name).read_text("utf-8")
    except FileNotFoundError:
        raise InvalidEvent(f"unknown schema {schema_name!r}", "$.schema") from None
    return _Validator(json.loads(text), format_checker=_FORMATS)


def schema_names() -> tuple[str, ...]:
    return tuple(MODELS)


def _json_path(path: Any) -> str:
    out = "$"
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{_printable(str(part))}"
    return out


def _printable(text: str) -> str:
    """A key as it may appear in a path or a log line: lone surrogates and NUL escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


_AREA_SCHEMAS: Final = frozenset({"crisis/1"})
"""Schemas whose ``geometry`` is null, a GeoJSON Polygon or a MultiPolygon (``#/$defs/ring`` of ``crisis-1``)."""


def _plain_area(area: Any) -> bool:
    """Whether ``area`` is what the crisis schema's ``geometry`` allows: null, or a Polygon or
    MultiPolygon whose rings hold at least four positions of two or three numbers. Plain loops,
    some hundred times faster than jsonschema's walk of every position through ``$ref`` (a crisis
    of 500 vertices: tens of milliseconds). Only a yes is trusted; a no (which includes a tuple,
    a number subclass, anything not exactly JSON's) leaves the verdict and its reason to the
    validator. A test holds the two to the same verdict."""
    if area is None:
        return True
    if type(area) is not dict:
        return False
    kind, coordinates = area.get("type"), area.get("coordinates")
    if type(coordinates) is not list or not coordinates or type(kind) is not str:
        return False
    polygons = [coordinates] if kind == "Polygon" else coordinates if kind == "MultiPolygon" else None
    if polygons is None:
        return False
    for polygon in polygons:
        if type(polygon) is not list or not polygon:
            return False
        for ring in polygon:
            if type(ring) is not list or len(ring) < 4:
                return False
            for position in ring:
                if type(position) is not list or not 2 <= len(position) <= 3:
                    return False
                for number in position:
                    if type(number) is not float and type(number) is not int:
                        return False
    return True


def check(obj: Mapping[str, Any], expected: str | None = None) -> str:
    """Validate a decoded JSON object; return its schema name or raise :class:`InvalidEvent`."""
    if not isinstance(obj, Mapping):
        raise InvalidEvent("an event must be a JSON object")
    name = obj.get("schema")
    if not isinstance(name, str):
        raise InvalidEvent("missing or non-string 'schema'", "$.schema")
    if expected is not None and name != expected:
        raise InvalidEvent(f"expected schema {expected!r}, got {_printable(name)!r}", "$.schema")
    if name not in MODELS:
        raise InvalidEvent(f"unknown schema {_printable(name)!r}", "$.schema")
    # The area checked by loops, jsonschema the rest; any error, and the full check names it.
    if (name in _AREA_SCHEMAS and "geometry" in obj and _plain_area(obj["geometry"])
            and next(validator(name).iter_errors({**obj, "geometry": None}), None) is None):
        return name
    errors = sorted(validator(name).iter_errors(obj), key=lambda e: (len(e.absolute_path), str(e.absolute_path)))
    if errors:
        first = errors[0]
        raise InvalidEvent(described(first), _json_path(first.absolute_path))
    return name


def _listed(values: Any) -> str:
    return " or ".join(map(str, values)) if isinstance(values, list) else str(values)


_DESCRIPTIONS: Final[Mapping[str, Any]] = {
    "type": lambda want: f"must be of type {_listed(want)}",
    "enum": lambda want: "is not one of " + ", ".join(repr(v) for v in want),
    "const": lambda want: f"must be {want!r}",
    "minimum": lambda want: f"must be at least {want}",
    "maximum": lambda want: f"must be at most {want}",
    "exclusiveMinimum": lambda want: f"must be greater than {want}",
    "exclusiveMaximum": lambda want: f"must be less than {want}",
    "minLength": lambda want: "should be non-empty" if want == 1 else f"must be at least {want} characters long",
    "maxLength": lambda want: f"must be at most {want} characters long",
    "minItems": lambda want: "should be non-empty" if want == 1 else f"must have at least {want} items",
    "maxItems": lambda want: f"must have at most {want} items",
    "uniqueItems": lambda want: "has repeated items",
    "pattern": lambda want: f"does not match {want!r}",
    "multipleOf": lambda want: f"must be a multiple of {want}",
}


def described(error: ValidationError) -> str:
    """A schema violation described, never echoed: what the field must be, not the value it had. (The
    reasons reach API answers, dead-letter headers and logs, and a value may be where a citizen is, or
    their name or phone number.) Missing and unexpected properties are named: keys are the schema's."""
    describe = _DESCRIPTIONS.get(str(error.validator))
    if describe is not None:
        return str(describe(error.validator_value))
    if error.validator in ("required", "additionalProperties", "unevaluatedProperties", "dependentRequired"):
        return str(error.message)
    if error.validator == "format":
        return f"is not a valid {error.validator_value}" + ("" if error.cause is None else f": {error.cause}")
    return f"is not valid against the schema ({error.validator})"


# --- JSON text: size, depth, then values ------------------------------------------------------


def _no_constant(name: str) -> Any:
    raise InvalidEvent(f"{name} is not a JSON number")


class _Unstorable(Exception):
    """A number met while parsing that no stage could store; the text is parsed again to name its path."""


def _bounded_int(text: str) -> int:
    value = int(text)
    if -MAX_INTEGER <= value <= MAX_INTEGER:
        return value
    raise _Unstorable


def _finite_float(text: str) -> float:
    value = float(text)  # "1e400" is infinity
    if value - value == 0.0:
        return value
    raise _Unstorable


# Built once: json.loads with keyword arguments builds a new decoder on every call, which costs more than
# the checks these hooks make (the number hooks run only for numbers, in C when they pass).
_DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_int=_bounded_int, parse_float=_finite_float)
_LENIENT_DECODER = json.JSONDecoder(parse_constant=_no_constant)
_STRING_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_DEPTH_STEP: Final = {"[": 1, "{": 1, "]": -1, "}": -1}
_SURROGATE = re.compile("[\ud800-\udfff]")
_DIGITS_AS_ZERO: Final = str.maketrans("123456789", "000000000")  # 19 digits in a row may exceed bigint
_BAD_CHAR = re.compile("[\x00\ud800-\udfff]")


def nesting_depth_exceeds(text: str, limit: int = MAX_DEPTH) -> bool:
    """Whether arrays and objects in ``text`` nest deeper than ``limit``, without parsing it:
    string literals are blanked out, then brackets are counted. For a text that is not JSON the
    answer is an upper bound of what a parser would reach before it failed, which is what matters."""
    if text.count("[") + text.count("{") <= limit:
        return False
    brackets = _NOT_BRACKET.sub("", _STRING_TOKEN.sub("", text))
    return max(accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0) > limit


def _nested_deeper(obj: Any, limit: int) -> bool:
    """Whether arrays and objects in a parsed value nest deeper than ``limit`` (what
    :func:`nesting_depth_exceeds` reads from the text)."""
    if type(obj) is not list and type(obj) is not dict:
        return False
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        for item in value.values() if type(value) is dict else value:
            if type(item) is list or type(item) is dict:
                stack.append((item, depth + 1))
    return False


def _text_problem(text: str) -> str | None:
    bad = _BAD_CHAR.search(text)
    if bad is None:
        return None
    if bad.group() == "\x00":
        return "NUL (U+0000) is not allowed"
    return f"lone surrogate U+{ord(bad.group()):04X} is not valid Unicode"


def _number_problem(value: Any) -> str | None:
    kind = type(value)
    if kind is int and not -MAX_INTEGER <= value <= MAX_INTEGER:
        return f"integer of {len(str(abs(value)))} digits is out of range (|n| must be below 2^63)"
    if kind is float and not math.isfinite(value):
        return "number is out of range (beyond a double)"
    return None


def check_values(obj: Any) -> None:
    """Refuse lone surrogates and NUL in strings and object keys, integers beyond ``bigint`` and
    non-finite numbers anywhere in a JSON value, naming the first offending JSON path."""
    # The path is kept as links to the parent, turned into text only for the error.
    stack: list[tuple[Any, Any]] = [(obj, None)]
    while stack:
        value, trail = stack.pop()
        if isinstance(value, str):
            if (problem := _text_problem(value)) is not None:
                raise InvalidEvent(f"{problem} in text", _trail_path(trail))
        elif isinstance(value, Mapping):
            for key, item in value.items():
                if isinstance(key, str) and (problem := _text_problem(key)) is not None:
                    raise InvalidEvent(f"{problem} in an object key", _trail_path((trail, key)))
                stack.append((item, (trail, key)))
        elif isinstance(value, list | tuple):
            for index, item in enumerate(value):
                if type(item) is float or type(item) is int:
                    if (problem := _number_problem(item)) is not None:
                        raise InvalidEvent(problem, _trail_path((trail, index)))
                else:
                    stack.append((item, (trail, index)))
        elif (problem := _number_problem(value)) is not None:
            raise InvalidEvent(problem, _trail_path(trail))


def _trail_path(trail: Any) -> str:
    parts: list[Any] = []
    while trail is not None:
        trail, part = trail
        parts.append(part)
    return _json_path(reversed(parts))


def parse_json(raw: bytes | str, *, max_bytes: int = MAX_MESSAGE_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """JSON bytes (UTF-8) to an object, within the bounds of the module docstring, every refusal
    an :class:`InvalidEvent`. NaN and Infinity, which Python's json module would accept, are
    refused: JSON has no such numbers."""
    if len(raw) > max_bytes:
        raise InvalidEvent(f"message of {len(raw)} bytes exceeds {max_bytes}")
    if isinstance(raw, str):
        text = raw
        suspect = "\\u" in text or _SURROGATE.search(text) is not None
    else:
        try:  # json.loads(bytes) would accept UTF-16 and UTF-32 and let encoded surrogates through
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidEvent(f"not JSON: not UTF-8 ({exc.reason} at byte {exc.start})") from None
        text = text.removeprefix("\ufeff")
        # After strict decoding, a lone surrogate or a NUL can only come from a \u escape.
        suspect = "\\u" in text
    if not suspect and "0" * 19 not in text.translate(_DIGITS_AS_ZERO):
        # No escape that could hide a NUL or a surrogate, no run of digits that could exceed bigint:
        # msgspec parses in C what the json module would, several times faster for an area's numbers
        # (which the json module hands one by one to the hooks above), and the depth is read from the
        # containers parsed rather than from the text. Anything msgspec refuses (NaN, 1e400, a syntax
        # error, a thousand levels) goes the json module's way below, for its reason.
        try:
            obj = msgspec.json.decode(text)
        except (msgspec.DecodeError, RecursionError):
            pass
        else:
            if _nested_deeper(obj, max_depth):
                raise InvalidEvent(f"arrays and objects nested more than {max_depth} levels deep")
            return obj
    return _parse_with_json_module(text, max_depth, suspect)


def _parse_with_json_module(text: str, max_depth: int, suspect: bool) -> Any:
    """:func:`parse_json`'s general path: depth read from the text, the json module with its hooks,
    values walked when an escape or a number may hide what no stage could store."""
    if nesting_depth_exceeds(text, max_depth):
        raise InvalidEvent(f"arrays and objects nested more than {max_depth} levels deep")
    try:
        try:
            obj = _DECODER.decode(text)
        except _Unstorable:
            obj, suspect = _LENIENT_DECODER.decode(text), True  # the walk below names the number's path
    except json.JSONDecodeError as exc:
        raise InvalidEvent(f"not JSON: {exc}") from None
    except RecursionError:  # not reachable after the depth check; kept so it can never escape
        raise InvalidEvent("arrays and objects nested too deep") from None
    except InvalidEvent:
        raise
    except ValueError as exc:  # an integer of more than 4300 digits
        raise InvalidEvent(f"not JSON: {exc}") from None
    if suspect:
        check_values(obj)
    return obj


class _CheckinFastPath:
    """checkin/1, the hot path of every worker, checked by plain comparisons read from its JSON
    Schema (bounds, pattern, enum), about 50 times faster than the generic validator. Anything it
    does not accept goes through the full validator, which gives the precise error; a test checks
    that both agree on valid and mutated messages."""

    def __init__(self) -> None:
        props = validator("checkin/1").schema["properties"]
        cid = props["citizen_id"]
        self.id_pattern = ecma_pattern(cid["pattern"])
        self.id_len = (cid["minLength"], cid["maxLength"])
        self.lat = (props["lat"]["minimum"], props["lat"]["maximum"])
        self.lon = (props["lon"]["minimum"], props["lon"]["maximum"])
        self.accuracy = (props["accuracy_m"]["minimum"], props["accuracy_m"]["maximum"])
        self.time_pattern = ecma_pattern(props["observed_at"]["pattern"])
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
    except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
        raise InvalidEvent(str(exc)) from None


def decode(raw: bytes | str, expected: type[E] | None = None) -> E:
    """Bytes from the wire to a typed event, or :class:`InvalidEvent` with the reason. A plain
    check-in takes msgspec's path (:mod:`schemas.fast`), a plain crisis too (:mod:`schemas.fast_crisis`);
    what those do not accept comes here."""
    if expected is Checkin and isinstance(raw, bytes):
        from schemas.fast import checkin  # schemas.fast builds on this module

        if (event := checkin(raw)) is not None:
            return cast(E, event)
    elif expected is Crisis and isinstance(raw, bytes):
        from schemas.fast_crisis import crisis  # as schemas.fast, built on this module

        if (known := crisis(raw)) is not None:
            return cast(E, known)
    obj = parse_json(raw)
    if expected is Checkin:
        fast = _checkin_fast_path()(obj)
        if fast is not None:
            return cast(E, fast)
    return from_obj(obj, expected)


_MSGSPEC_ENCODER: Final = msgspec.json.Encoder()


def encode(event: Event) -> bytes:
    """An event's compact JSON (UTF-8). A check-in, the most frequent event, is written by msgspec,
    about four times faster than the json module (a non-finite number, which json would write as
    ``NaN``, becomes ``null``: refused as a check-in's coordinate or accuracy all the same)."""
    if type(event) is Checkin:
        return _MSGSPEC_ENCODER.encode(event.to_dict())
    return json.dumps(event.to_dict(), separators=(",", ":"), ensure_ascii=False).encode("utf-8")
