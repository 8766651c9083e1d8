"""Crises decoded and checked in one pass of msgspec: what a starting worker does a thousand times.

Why: a worker admits every active crisis when it starts (:mod:`pipeline.domain.admission`), and the
generic path (:func:`schemas.codec.parse_json`, its depth walk over every coordinate, then the area's
loops and jsonschema for the rest) cost about 0.7 ms a crisis of a few hundred vertices, 0.7 s of CPU
for 1,000 crises on every start. msgspec decodes the bytes straight into typed structs and checks the
bounds, lengths, patterns, enums and the area's shape of ``crisis-1.schema.json`` while it parses, in C.

Sound, not complete, as :mod:`schemas.fast` is for check-ins. The fast decoder accepts only a *plain*
crisis: the fields of the schema and no other key (the schema allows others: those take the full
path), an area of ``Polygon`` or ``MultiPolygon`` with only ``type`` and ``coordinates``, and none of
what the codec would have to look at again: no ``\\u`` escape (which could hide a NUL or a lone
surrogate), no run of 19 digits (a number past what every stage stores), nothing over the message
size. Every rule the schema states for those fields is read from the schema file itself, so the two
cannot drift; ``uniqueItems`` of ``country_codes`` and the date-time format (the instant parses with
an offset inside what every stage converts: :func:`schemas.models.parse_time`) are checked after the
parse. Anything else — any error at all — returns ``None`` and the caller takes the full path, which
accepts it the same way or refuses it with the precise reason and JSON path.
``tests/property/test_crisis_fast_path.py`` holds the two paths to the same verdict and the same event.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Annotated, Any, Final, Literal, cast

import msgspec

from schemas.codec import MAX_MESSAGE_BYTES, ecma_pattern
from schemas.models import Crisis, parse_time

_KNOWN: Final = frozenset({
    "schema", "crisis_id", "op", "version", "source", "source_ref", "title", "category", "severity", "urgency",
    "certainty", "geometry", "buffer_km", "country_codes", "effective", "expires", "instruction", "url",
    "references", "language", "status"})
_DIGITS_AS_ZERO: Final = bytes.maketrans(b"123456789", b"000000000")  # 19 in a row may exceed what is stored


def _crisis_schema() -> dict[str, Any]:
    text = resources.files("schemas").joinpath("json", "crisis-1.schema.json").read_text("utf-8")
    return cast(dict[str, Any], json.loads(text))


def _string(spec: dict[str, Any]) -> Any:
    """A JSON Schema string (its ``const``, ``enum``, lengths and pattern) as a msgspec type."""
    if "const" in spec:
        return Literal[spec["const"]]
    if "enum" in spec:
        return Literal[tuple(spec["enum"])]
    assert spec["type"] == "string" and set(spec) <= {"type", "minLength", "maxLength", "pattern", "format"}, spec
    meta: dict[str, Any] = {}
    if "minLength" in spec:
        meta["min_length"] = spec["minLength"]
    if "maxLength" in spec:
        meta["max_length"] = spec["maxLength"]
    if "pattern" in spec:  # ECMA-262 as the validator reads it (``$`` the very end, ``\d`` ASCII)
        meta["pattern"] = "(?a)" + ecma_pattern(spec["pattern"]).pattern
    return Annotated[str, msgspec.Meta(**meta)] if meta else str


def _area_types(schema: dict[str, Any]) -> Any:
    """``geometry``: null, or a Polygon or MultiPolygon of rings of at least four positions of two or three numbers."""
    defs = schema["$defs"]
    position, ring = defs["position"], defs["ring"]
    assert position["items"] == {"type": "number"} and ring["items"] == {"$ref": "#/$defs/position"}
    number = int | float  # JSON's numbers as the json module reads them (ints stay ints), never a boolean
    position_t = Annotated[list[number], msgspec.Meta(min_length=position["minItems"],
                                                      max_length=position["maxItems"])]
    ring_t = Annotated[list[position_t], msgspec.Meta(min_length=ring["minItems"])]
    null, polygon, multi = schema["properties"]["geometry"]["oneOf"]
    assert null == {"type": "null"} and polygon["properties"]["type"] == {"const": "Polygon"}
    assert multi["properties"]["type"] == {"const": "MultiPolygon"}
    rings = Annotated[list[ring_t], msgspec.Meta(min_length=polygon["properties"]["coordinates"]["minItems"])]
    inner = multi["properties"]["coordinates"]["items"]
    assert inner["items"] == {"$ref": "#/$defs/ring"}
    polygons = Annotated[list[Annotated[list[ring_t], msgspec.Meta(min_length=inner["minItems"])]],
                         msgspec.Meta(min_length=multi["properties"]["coordinates"]["minItems"])]
    kinds = [msgspec.defstruct(kind, [("coordinates", coordinates)], tag_field="type", tag=kind,
                               forbid_unknown_fields=True, frozen=True)
             for kind, coordinates in (("Polygon", rings), ("MultiPolygon", polygons))]
    return kinds[0] | kinds[1] | None


def _field_type(name: str, spec: dict[str, Any], schema: dict[str, Any]) -> Any:
    if name == "geometry":
        return _area_types(schema)
    if "oneOf" in spec:  # ``expires``: null or an instant
        null, value = spec["oneOf"]
        assert null == {"type": "null"}
        return _string(value) | None
    kind = spec.get("type")
    if kind == "integer":
        return Annotated[int, msgspec.Meta(ge=spec["minimum"], le=spec["maximum"])]
    if kind == "number":
        return Annotated[float, msgspec.Meta(ge=spec["minimum"], le=spec["maximum"])]
    if kind == "array":
        assert set(spec) <= {"type", "items", "uniqueItems"}, spec
        return list[_string(spec["items"])]  # type: ignore[misc]
    return _string(spec)


@cache
def _decoder() -> msgspec.json.Decoder[Any]:
    """The msgspec decoder of a plain ``crisis/1``, its constraints read from ``crisis-1.schema.json``."""
    schema = _crisis_schema()
    props = schema["properties"]
    assert set(props) == _KNOWN, "crisis-1.schema.json changed: update schemas/fast_crisis.py"
    assert set(schema["required"]) == _KNOWN - {"language", "status"}
    assert props["country_codes"].get("uniqueItems") is True
    assert props["effective"]["format"] == "date-time" and props["expires"]["oneOf"][1]["format"] == "date-time"
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = [
        (name, _field_type(name, props[name], schema)) for name in props if name in schema["required"]]
    fields += [("language", _field_type("language", props["language"], schema) | msgspec.UnsetType, msgspec.UNSET),
               ("status", _field_type("status", props["status"], schema) | msgspec.UnsetType, msgspec.UNSET)]
    struct = msgspec.defstruct("WireCrisis", fields, forbid_unknown_fields=True, frozen=True)
    return msgspec.json.Decoder(struct)


def crisis(raw: bytes) -> Crisis | None:
    """A plain ``crisis/1`` message to its event, or ``None``: then the full path decides."""
    if len(raw) > MAX_MESSAGE_BYTES or b"\\u" in raw:
        return None
    if b"0" * 19 in raw.translate(_DIGITS_AS_ZERO):
        return None
    try:
        s = _decoder().decode(raw)
        if len(set(s.country_codes)) != len(s.country_codes):
            return None
        effective = parse_time(s.effective)
        expires = None if s.expires is None else parse_time(s.expires)
    except (msgspec.DecodeError, ValueError, RecursionError):  # ValidationError is a DecodeError
        return None
    area = s.geometry
    geometry = None if area is None else {"type": type(area).__name__, "coordinates": area.coordinates}
    return Crisis(s.crisis_id, s.op, s.version, s.source, s.source_ref, s.title, s.category, s.severity, s.urgency,
                  s.certainty, geometry, s.buffer_km, tuple(s.country_codes), effective, expires, s.instruction,
                  s.url, tuple(s.references), None if s.language is msgspec.UNSET else s.language,
                  "actual" if s.status is msgspec.UNSET else s.status)
