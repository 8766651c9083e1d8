"""Check-ins decoded and checked in one pass of msgspec, the hot path of the API and of every worker.

Why: the generic path (:func:`schemas.codec.parse_json`, then jsonschema walking the Python
object keyword by keyword) costs tens of microseconds a check-in, most of the API's time per
check-in and a good share of a worker's. msgspec decodes the JSON bytes straight into a typed
struct and checks the bounds, lengths, patterns and enums of ``checkin-1.schema.json`` while
it parses, in C.

Sound, not complete. The fast decoder accepts only a *plain* check-in: the six fields of the
schema (``accuracy_m`` optional), no other key. Every rule the schema and the codec state for
those fields is checked here too — read from the schema file itself, so the two cannot drift:
``schema`` is the constant, ``citizen_id`` 1..128 characters of the ECMA-262 pattern (``$`` is
the very end, ``\\d`` ASCII only: :func:`schemas.codec.ecma_pattern`), coordinates and accuracy
are numbers (not booleans, not ``null``) within bounds, ``observed_at`` matches the pattern and
parses with an offset inside the instants every stage can convert, ``source`` is one of the
enum. Every string field is ASCII by its pattern or enum, so NUL, lone surrogates and invalid
UTF-8 cannot pass; a number beyond a double fails its bound; there is nothing nested, so the
depth limit cannot be reached. Anything else — an unknown key, a byte-order mark, any error at
all — returns ``None`` and the caller takes the full path (:func:`schemas.codec.decode`), which
accepts it the same way or refuses it with the precise reason and JSON path. So error messages
keep their quality, and a property test (``tests/property/test_fast_decode.py``) holds the two
paths to the same verdict and the same event on valid, mutated and generated messages.

Warnings go out the same way: :func:`encode_warnings` writes what :func:`schemas.encode` writes, by
msgspec, for the worker's send path (``tests/unit/test_warning_encoding.py`` holds the two to the same
JSON).

The API's variant lets ``schema`` be left out (as the API always has) and reads a whole request
body, one check-in, an array or ``{"checkins": [...]}``, in one call
(:func:`api_checkins`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import cache
from importlib import resources
from typing import Annotated, Any, Final, Literal, cast

import msgspec

from schemas.codec import MAX_MESSAGE_BYTES, InvalidEvent, ecma_pattern
from schemas.models import Checkin, CheckinSource, Warning, format_time, parse_time

_UNSET: Final = msgspec.UNSET


def _checkin_schema() -> dict[str, Any]:
    text = resources.files("schemas").joinpath("json", "checkin-1.schema.json").read_text("utf-8")
    return cast(dict[str, Any], json.loads(text))


def _pattern(ecma: str) -> str:
    """An ECMA-262 pattern as msgspec takes it (Python ``re``, applied with ``search``)."""
    return "(?a)" + ecma_pattern(ecma).pattern


def _number(spec: dict[str, Any]) -> Any:
    return Annotated[float, msgspec.Meta(ge=spec["minimum"], le=spec["maximum"])]


def _struct(name: str, *, schema_optional: bool) -> Any:
    """The msgspec struct of a plain check-in, its constraints read from ``checkin-1.schema.json``."""
    schema = _checkin_schema()
    props = schema["properties"]
    required = set(schema["required"])
    assert set(props) == {"schema", "citizen_id", "lat", "lon", "accuracy_m", "observed_at", "source"}, \
        "checkin-1.schema.json changed: update schemas/fast.py"
    assert required == set(props) - {"accuracy_m"} and props["observed_at"]["format"] == "date-time"
    cid, when = props["citizen_id"], props["observed_at"]
    tag = Literal[props["schema"]["const"]]  # type: ignore[valid-type]
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = [
        ("citizen_id", Annotated[str, msgspec.Meta(min_length=cid["minLength"], max_length=cid["maxLength"],
                                                   pattern=_pattern(cid["pattern"]))]),
        ("lat", _number(props["lat"])),
        ("lon", _number(props["lon"])),
        ("observed_at", Annotated[str, msgspec.Meta(pattern=_pattern(when["pattern"]))]),
        ("source", Literal[tuple(props["source"]["enum"])]),
        ("schema", tag, props["schema"]["const"]) if schema_optional else ("schema", tag),
        ("accuracy_m", _number(props["accuracy_m"]) | msgspec.UnsetType, _UNSET),
    ]
    if not schema_optional:  # required fields first, as a struct needs them
        fields.insert(0, fields.pop(5))
    return msgspec.defstruct(name, fields, forbid_unknown_fields=True, frozen=True)


@cache
def _decoders() -> tuple[Any, Any, Any, Any]:
    wire = _struct("WireCheckin", schema_optional=False)
    posted = _struct("PostedCheckin", schema_optional=True)
    batch = msgspec.defstruct("PostedBatch", [("checkins", list[posted])], forbid_unknown_fields=True)  # type: ignore[valid-type]
    return (msgspec.json.Decoder(wire), msgspec.json.Decoder(posted), msgspec.json.Decoder(list[posted]),  # type: ignore[valid-type]
            msgspec.json.Decoder(batch))


def _checkin(s: Any) -> Checkin:
    accuracy = s.accuracy_m
    return Checkin(s.citizen_id, s.lat, s.lon, parse_time(s.observed_at), cast(CheckinSource, s.source),
                   None if accuracy is _UNSET else accuracy)


def checkin(raw: bytes) -> Checkin | None:
    """A plain ``checkin/1`` message to its event, or ``None``: then the full path decides."""
    if len(raw) > MAX_MESSAGE_BYTES:
        return None
    try:
        return _checkin(_decoders()[0].decode(raw))
    except (msgspec.DecodeError, ValueError, RecursionError):  # ValidationError is a DecodeError
        return None


def api_checkins(raw: bytes, max_batch: int) -> list[Checkin] | None:
    """A request body of plain check-ins (one, an array of 1..``max_batch``, or ``{"checkins": [...]}``;
    ``schema`` may be left out) to its events, or ``None``: then the API's full path decides (and names
    the item and field at fault)."""
    _, one, many, wrapped = _decoders()
    start = raw.lstrip()[:1]
    try:
        if start == b"[":
            items: Sequence[Any] = many.decode(raw)
        elif start == b"{":
            try:
                items = [one.decode(raw)]
            except msgspec.ValidationError:
                items = wrapped.decode(raw).checkins
        else:
            return None
        if not 0 < len(items) <= max_batch:
            return None
        return [_checkin(s) for s in items]
    except (msgspec.DecodeError, ValueError, RecursionError):  # ValidationError is a DecodeError
        return None


# --- checkin-batch/1: a request's check-ins of one partition as one record ---------------------------------------

BATCH_SCHEMA: Final = "checkin-batch/1"
MAX_BATCH_ITEMS: Final = 10_000
"""Most check-ins in one ``checkin-batch/1`` record (``maxItems`` of its schema)."""
_BATCH_HEAD: Final = b'{"schema":"' + BATCH_SCHEMA.encode() + b'","checkins":['


class _Head(msgspec.Struct):
    schema: object = None


class _Batch(msgspec.Struct, forbid_unknown_fields=True):
    schema: str
    checkins: Annotated[list[msgspec.Raw], msgspec.Meta(min_length=1, max_length=MAX_BATCH_ITEMS)]


class _Keyed(msgspec.Struct):
    citizen_id: object = None


_HEAD_DECODER: Final = msgspec.json.Decoder(_Head)
_BATCH_DECODER: Final = msgspec.json.Decoder(_Batch)
_KEYED_DECODER: Final = msgspec.json.Decoder(_Keyed)


def encode_checkin_batch(items: Sequence[bytes]) -> bytes:
    """Encoded check-ins (each :func:`schemas.encode` of one) as one ``checkin-batch/1`` record."""
    if not 0 < len(items) <= MAX_BATCH_ITEMS:
        raise ValueError(f"a checkin-batch/1 holds 1 to {MAX_BATCH_ITEMS} check-ins, not {len(items)}")
    return _BATCH_HEAD + b",".join(items) + b"]}"


def split_checkin_batch(raw: bytes) -> list[bytes] | None:
    """The check-ins of a ``checkin-batch/1`` record, each as the bytes it was written with, to be
    decoded as if it had come alone; ``None`` for anything that does not say it is a batch (a single
    check-in, or what its own decoding will refuse). A record that says it is a batch but is not a
    valid one is :class:`~schemas.codec.InvalidEvent` with the reason."""
    if BATCH_SCHEMA.encode() not in raw:
        return None
    try:
        if _HEAD_DECODER.decode(raw).schema != BATCH_SCHEMA:
            return None
    except (msgspec.DecodeError, RecursionError):
        return None
    if len(raw) > MAX_MESSAGE_BYTES:
        raise InvalidEvent(f"message of {len(raw)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        return [bytes(item) for item in _BATCH_DECODER.decode(raw).checkins]
    except (msgspec.DecodeError, RecursionError) as exc:
        raise InvalidEvent(f"not a valid {BATCH_SCHEMA}: {exc}") from None


def citizen_of(item: bytes) -> str | None:
    """The ``citizen_id`` a check-in's bytes name, read without checking anything else; ``None`` if none."""
    try:
        citizen = _KEYED_DECODER.decode(item).citizen_id
    except (msgspec.DecodeError, RecursionError):
        return None
    return citizen if isinstance(citizen, str) else None


# --- warning/1 out: the worker's most frequent write ------------------------------------------------------

_WARNING_ENCODER: Final = msgspec.json.Encoder()


def encode_warnings(warnings: Sequence[Warning]) -> list[bytes]:
    """Warnings as :func:`schemas.encode` writes them (the same keys in the same order, the same values),
    by msgspec: a sweep writes one per citizen inside, and ``json.dumps`` of each warning's dict, with its
    two instants formatted anew, was the larger share of the worker's own CPU per warning. The instants
    of a batch are few (one ``emitted_at``, a check-in time per citizen), so each is formatted once."""
    times: dict[datetime, str] = {}

    def instant(at: datetime) -> str:
        text = times.get(at)
        if text is None:
            text = times[at] = format_time(at)
        return text

    return [_WARNING_ENCODER.encode({
        "schema": w.SCHEMA, "warning_id": w.warning_id, "citizen_id": w.citizen_id, "crisis_id": w.crisis_id,
        "crisis_version": w.crisis_version, "kind": w.kind, "severity": w.severity, "title": w.title,
        "instruction": w.instruction, "distance_km": w.distance_km, "lat": w.lat, "lon": w.lon,
        "observed_at": instant(w.observed_at), "emitted_at": instant(w.emitted_at),
        "country_codes": list(w.country_codes)}) for w in warnings]
