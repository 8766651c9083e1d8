"""The ingest API: check-ins, citizens' self-reports, operator crises and citizens' replies into Kafka.

Every request goes through three steps, in this order:

1. **parse** — authenticate the bearer token, read the body within the size limit, decode JSON;
2. **validate** — pure functions with no I/O (:func:`parse_checkins`, :func:`parse_citizen`,
   :func:`parse_crisis`, :func:`parse_ack`): fill in what clients may leave out, check against the
   JSON Schema, build typed events, then encode each one and decode the bytes again exactly as the
   stages reading the topic will (:func:`pipeline.domain.validation.prepare_outgoing`: the same
   decoder, the same geometry normaliser, the same clock rules), so nothing is answered ``202``
   that a stage would then dead-letter. A batch is valid as a whole or refused as a whole;
3. **publish** — hand every event to Kafka and answer ``202`` only after the broker acknowledged
   each of them; an unreachable broker is ``503``, never a ``2xx``: at once while the health probe
   knows Kafka is away, else once ``CRISISWATCH_KAFKA_PUBLISH_TIMEOUT_S`` has passed.

Every refusal is a JSON object ``{"error": ..., "reason": ..., "field": ...}``: ``field`` is a JSON
path into the request body (``$[3].lat``, ``$.checkins[3].lat``, ``$.geometry``) when one field is
to blame. Nothing is answered ``500``: an unexpected exception while validating the input is that
input's fault (``422`` with the exception as the reason), anywhere else it is ``503``; both are
counted in ``crisiswatch_api_unexpected_errors_total`` and logged with their traceback.

Tokens (:mod:`pipeline.tokens`): each has a role — ``ingest`` opens check-ins, citizens and acks;
``operator`` crises, cases, the accountability views and looking up a citizen, and the ingest endpoints
too; ``admin`` all that, the audit log and erasing a citizen. A token that is not configured opens
nothing. Each token may make ``CRISISWATCH_API_RATE_LIMITS`` requests per second (429 with
``Retry-After`` beyond).

Privacy (docs/privacy.md): check-ins of a citizen the registry holds without location_tracking consent
are refused (422, ``no_consent``); an operator sees a citizen's location only while they are inside or
near an active crisis (:mod:`producers.citizen_store`); every operator action is written to the audit
log (:mod:`producers.audit`) — reading or erasing personal data is refused when it cannot be;
``DELETE /v1/citizens/{id}`` erases a citizen (:mod:`producers.erase`). Every response carries security
headers (nosniff, no framing, no referrer, a Content-Security-Policy), and no browser page of another
origin may call the API unless ``CRISISWATCH_CORS_ORIGINS`` names it.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import parse_qs

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi_offline import FastAPIOffline
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from pipeline import topics
from pipeline.consent import ConsentCache
from pipeline.domain.admission import rehearse
from pipeline.domain.cap_out import ATOM_MEDIA_TYPE, CAP_MEDIA_TYPE, atom_feed, cap_alert
from pipeline.domain.cases import CaseChangeError, change, country_at, new_case
from pipeline.domain.countries import countries_for
from pipeline.domain.geometry import GeometryError, normalise_geometry
from pipeline.domain.replies import KEYWORD_HINT, KeywordReply, normalise_phone, parse_keyword
from pipeline.domain.validation import DEFAULT_RULES, EventRules, admit, prepare_outgoing
from pipeline.health import KAFKA, HealthProbe
from pipeline.metrics import ApiMetrics
from pipeline.reply_links import ReplyToken, ReplyTokenError, reply_links
from pipeline.settings import Settings
from pipeline.stage import describe
from pipeline.tokens import ApiToken, RateLimiter, Role, configured_tokens, find_token, parse_rate_limits
from producers.audit import MAX_LISTED_ENTRIES, AuditEntry, AuditLog
from producers.cases import case_messages
from producers.citizen_store import CitizenStore
from producers.crisis_store import CrisisStore, StoreUnavailable
from producers.erase import Erased, Eraser, tombstones
from producers.publisher import BrokerUnavailable, Outgoing, Publisher, outgoing
from producers.reply_pages import SECURITY_HEADERS, ask_page, problem_page, thanks_page
from producers.reply_store import ReplyStore
from schemas import Ack, Case, Checkin, Citizen, Crisis, Event, InvalidEvent, format_time, from_obj, parse_time
from schemas.codec import MAX_MESSAGE_BYTES, parse_json
from schemas.fast import api_checkins

if TYPE_CHECKING:
    from producers.operator_page import OperatorStore

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Event)
T = TypeVar("T")

MAX_BATCH: Final = 1000
CONSENT_RETRY_S: Final = 5.0  # after the registry could not be read, how long check-ins go unchecked here
DATETIME_FIELDS: Final = frozenset({"observed_at", "received_at", "effective", "expires"})
_REQUIRED: Final = re.compile(r"'([A-Za-z_]+)' is a required property")

# What an operator may leave out when declaring a crisis. An operator drawing an area is
# declaring danger now, so the defaults lean towards warning people rather than staying quiet.
OPERATOR_DEFAULTS: Final[Mapping[str, Any]] = {
    "op": "upsert",
    "source": "operator",
    "category": "safety",
    "severity": "severe",
    "urgency": "immediate",
    "certainty": "likely",
    "buffer_km": 0,
    "expires": None,
    "instruction": "Follow the instructions of local authorities and reply to tell us whether you are safe.",
    "url": "",
    "references": [],
}
DEFAULT_CRISIS_TITLE: Final = "Crisis declared by operator"


# ---------------------------------------------------------------------------------------------
# Validation: pure functions, no I/O. They raise InvalidEvent (422) or BatchTooLarge (413).
# ---------------------------------------------------------------------------------------------


class BatchTooLarge(ValueError):
    """More items in one request than :data:`MAX_BATCH`."""


def parse_event(obj: Any, model: type[E], at: str = "$", *, now: datetime, rules: EventRules = DEFAULT_RULES) -> E:
    """One JSON object to a typed event, as the stages reading its topic will see it; ``schema``
    may be left out. ``at`` prefixes error paths."""
    if not isinstance(obj, Mapping):
        raise InvalidEvent(f"expected a JSON object ({model.SCHEMA})", at)
    filled = {"schema": model.SCHEMA, **obj}
    try:
        event = from_obj(filled, model)
    except InvalidEvent as exc:
        path, reason = _readable(exc, filled)
        raise InvalidEvent(reason, at + path.removeprefix("$")) from None
    try:
        return prepare_outgoing(event, now, rules)[0]
    except InvalidEvent as exc:
        raise InvalidEvent(exc.reason, at + exc.field.removeprefix("$")) from None


def _readable(exc: InvalidEvent, obj: Mapping[str, Any]) -> tuple[str, str]:
    """Point a missing field's error at the field itself, and say what a date-time must look like
    (jsonschema's "does not match '^\\d{4}...'" helps nobody)."""
    missing = _REQUIRED.fullmatch(exc.reason)
    if missing:
        return f"{exc.field}.{missing[1]}", "required field is missing"
    name = exc.field.removeprefix("$.")
    value = obj.get(name)
    if name in DATETIME_FIELDS and isinstance(value, str) and "out of range" not in exc.reason:
        return exc.field, f"{value!r} is not an RFC 3339 date-time with a UTC offset (e.g. 2025-03-01T12:00:00Z)"
    return exc.field, exc.reason


def parse_checkins(body: Any, now: datetime, rules: EventRules = DEFAULT_RULES) -> list[Checkin]:
    """One check-in, a JSON array of them, or ``{"checkins": [...]}``; all valid, or an error naming the item."""
    if isinstance(body, list):
        prefix, items = "$", body
    elif isinstance(body, Mapping) and "checkins" in body:
        prefix, items = "$.checkins", body["checkins"]
        if not isinstance(items, list):
            raise InvalidEvent("expected an array of check-ins", prefix)
    elif isinstance(body, Mapping):
        return [parse_event(body, Checkin, now=now, rules=rules)]
    else:
        raise InvalidEvent('expected a check-in object, an array of check-ins, or {"checkins": [...]}')
    if len(items) > MAX_BATCH:
        raise BatchTooLarge(f"{len(items)} check-ins in one request; the limit is {MAX_BATCH}")
    if not items:
        raise InvalidEvent("empty batch", prefix)
    return [parse_event(item, Checkin, f"{prefix}[{i}]", now=now, rules=rules) for i, item in enumerate(items)]


def parse_checkin_body(raw: bytes, now: datetime, rules: EventRules = DEFAULT_RULES) -> list[Checkin]:
    """A ``POST /v1/checkins`` body to its check-ins. Plain check-ins are decoded and checked in one
    pass (:func:`schemas.fast.api_checkins`, the same rules); anything else, or any check-in the domain
    refuses, takes :func:`parse_checkins`, which names the item and field at fault."""
    fast = api_checkins(raw, MAX_BATCH)
    if fast is not None:
        try:
            return [admit(checkin, now, rules) for checkin in fast]
        except InvalidEvent:
            pass
    return parse_checkins(decode_json(raw), now, rules)


def parse_citizen(body: Any, now: datetime, rules: EventRules = DEFAULT_RULES) -> Citizen:
    """A citizen's registration or update (the "Lapor Diri" self-report)."""
    return parse_event(body, Citizen, now=now, rules=rules)


def parse_ack(body: Any, now: datetime, rules: EventRules = DEFAULT_RULES) -> Ack:
    """A citizen's reply; ``received_at`` defaults to now, ``channel`` to ``app``."""
    if not isinstance(body, Mapping):
        raise InvalidEvent("expected a JSON object (ack/1)")
    return parse_event({"received_at": format_time(now), "channel": "app", **body}, Ack, now=now, rules=rules)


def parse_crisis(body: Any, now: datetime, new_id: Callable[[], str], rules: EventRules = DEFAULT_RULES) -> Crisis:
    """An operator's crisis: defaults filled in, geometry normalised, country codes derived.

    ``version`` becomes ``max(given, now in epoch milliseconds)`` so that successive operator
    events for one crisis always increase. ``op: cancel`` needs only ``crisis_id``.
    """
    if not isinstance(body, Mapping):
        raise InvalidEvent("expected a JSON object (crisis/1)")
    op = body.get("op", OPERATOR_DEFAULTS["op"])
    if op not in ("upsert", "cancel"):
        raise InvalidEvent("must be 'upsert' or 'cancel'", "$.op")
    crisis_id = body.get("crisis_id")
    if crisis_id is None:
        if op == "cancel":
            raise InvalidEvent("a cancel must name the crisis_id it cancels", "$.crisis_id")
        crisis_id = new_id()
    given_version = body.get("version", 0)
    if isinstance(given_version, bool) or not isinstance(given_version, int):
        raise InvalidEvent("must be an integer", "$.version")

    geometry = body.get("geometry")
    if geometry is None and op == "upsert":
        raise InvalidEvent("declaring a crisis needs a GeoJSON Polygon or MultiPolygon", "$.geometry")
    if geometry is not None:
        geometry = normalised_geometry(geometry, rules=rules)
    country_codes = body.get("country_codes")
    if country_codes is None:
        country_codes = list(countries_for(geometry)) if geometry is not None else []

    filled = {
        **OPERATOR_DEFAULTS,
        "title": DEFAULT_CRISIS_TITLE if op == "upsert" else "",
        "source_ref": crisis_id,
        "effective": format_time(now),
        **body,
        "op": op,
        "crisis_id": crisis_id,
        "version": max(given_version, int(now.timestamp() * 1000)),
        "geometry": geometry,
        "country_codes": country_codes,
    }
    crisis = parse_event(filled, Crisis, now=now, rules=rules)
    try:
        rehearse(crisis)  # what every stage does before it uses a crisis: refused here rather than dead-lettered there
    except Exception as exc:
        raise InvalidEvent(f"the pipeline cannot use this crisis: {describe(exc)}") from None
    return crisis


def normalised_geometry(raw: Any, at: str = "$.geometry", rules: EventRules = DEFAULT_RULES) -> dict[str, Any]:
    """Any GeoJSON Polygon or MultiPolygon an operator draws, normalised (closed, valid, split at the antimeridian)."""
    try:
        return normalise_geometry(raw, max_globe_share=rules.max_globe_share, max_vertices=rules.max_vertices)
    except GeometryError as exc:
        raise InvalidEvent(str(exc), at) from None


def decode_json(raw: bytes) -> Any:
    """Request bytes to JSON through the pipeline's own parser (:func:`schemas.codec.parse_json`):
    nesting bounded before parsing, NaN and Infinity refused (they would slip past range checks),
    lone surrogates, NUL and integers PostgreSQL cannot store refused with their JSON path. The
    body's size was bounded while it was read."""
    return parse_json(raw, max_bytes=len(raw))


# Replies, SOS and cases: what a request says, checked without I/O.

CASE_STATES: Final = ("open", "assigned", "closed")
_CASE_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}", re.ASCII)  # case/1's case_id
_SMS_SCHEMA: Final[dict[str, Any]] = {
    "type": "object", "required": ["from", "body"],
    "properties": {"from": {"type": "string", "description": "the sender's number, international (E.164)"},
                   "body": {"type": "string", "description": "AMAN/SAFE or TOLONG/HELP, then any note"}}}
_SOS_SCHEMA: Final[dict[str, Any]] = {
    "type": "object", "required": ["citizen_id", "lat", "lon"],
    "properties": {"citizen_id": {"type": "string"}, "lat": {"type": "number", "minimum": -90, "maximum": 90},
                   "lon": {"type": "number", "minimum": -180, "maximum": 180},
                   "message": {"type": "string", "maxLength": 2000},
                   "sent_at": {"type": "string", "format": "date-time",
                               "description": "when the button was pressed (default: now); a retry with the same "
                                              "sent_at is the same case"}}}
_CASE_CHANGE_SCHEMA: Final[dict[str, Any]] = {
    "type": "object", "required": ["state"],
    "properties": {"state": {"enum": list(CASE_STATES)}, "assignee": {"type": "string"}, "note": {"type": "string"}}}


def parse_sms(raw: bytes, content_type: str) -> tuple[str, KeywordReply]:
    """An inbound SMS as providers post it: form-encoded ``From``/``Body`` or JSON ``{"from", "body"}``;
    the sender in E.164 and the reply its first word says."""
    if content_type.split(";")[0].strip().lower() == "application/json":
        obj = decode_json(raw)
        if not isinstance(obj, Mapping):
            raise InvalidEvent('expected {"from": ..., "body": ...}')
        sender, body = obj.get("from"), obj.get("body")
    else:
        try:
            form = parse_qs(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=100)
        except (UnicodeDecodeError, ValueError) as exc:
            raise InvalidEvent(f"not a form: {exc}") from None
        sender = next(iter(form.get("From") or form.get("from") or []), None)
        body = next(iter(form.get("Body") or form.get("body") or []), None)
    if not isinstance(sender, str) or not sender:
        raise InvalidEvent("the sender's number is missing", "$.from")
    if not isinstance(body, str):
        raise InvalidEvent("the message text is missing", "$.body")
    number = normalise_phone(sender)
    if number is None:
        raise InvalidEvent(f"{sender[:40]!r} is not an international phone number (E.164, +<country><number>)",
                           "$.from")
    reply = parse_keyword(body)
    if reply is None:
        raise InvalidEvent(f"not a reply keyword: {KEYWORD_HINT}", "$.body")
    return number, reply


def parse_sos(body: Any, now: datetime, rules: EventRules = DEFAULT_RULES) -> Case:
    """An SOS as an open case: the country from the location; ``crisis_id`` is filled in by the caller."""
    if not isinstance(body, Mapping):
        raise InvalidEvent("expected a JSON object with citizen_id, lat, lon and an optional message")
    for name in ("citizen_id", "lat", "lon"):
        if name not in body:
            raise InvalidEvent("required field is missing", f"$.{name}")
    lat, lon, message, sent_at = body["lat"], body["lon"], body.get("message"), body.get("sent_at")
    for name, value in (("lat", lat), ("lon", lon)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidEvent("must be a number", f"$.{name}")
    if message is not None and not isinstance(message, str):
        raise InvalidEvent("must be a string", "$.message")
    when = now
    if sent_at is not None:
        try:
            if not isinstance(sent_at, str):
                raise ValueError(sent_at)
            when = parse_time(sent_at)
        except ValueError:
            raise InvalidEvent(f"{sent_at!r} is not an RFC 3339 date-time with a UTC offset", "$.sent_at") from None
        if when > now + timedelta(seconds=rules.max_future_skew_s):
            raise InvalidEvent("sent in the future", "$.sent_at")
    if not isinstance(body["citizen_id"], str):
        raise InvalidEvent("must be a string", "$.citizen_id")
    case = new_case(kind="sos", citizen_id=body["citizen_id"], crisis_id=None, country=None, lat=float(lat),
                    lon=float(lon), note=message, now=when.astimezone(UTC))
    case = replace(case, country=country_at(case.lat, case.lon))
    try:
        return prepare_outgoing(case, now, rules)[0]
    except InvalidEvent as exc:
        raise InvalidEvent(exc.reason, exc.field.replace("$.note", "$.message")) from None


def parse_case_change(body: Any, current: Case, now: datetime, rules: EventRules = DEFAULT_RULES) -> Case:
    """An operator's ``{state, assignee?, note?}`` applied to the stored case."""
    if not isinstance(body, Mapping):
        raise InvalidEvent("expected a JSON object with state and optional assignee and note")
    state, assignee, note = body.get("state"), body.get("assignee"), body.get("note")
    if not isinstance(state, str):
        raise InvalidEvent("required: one of " + ", ".join(CASE_STATES), "$.state")
    for name, value in (("assignee", assignee), ("note", note)):
        if value is not None and not isinstance(value, str):
            raise InvalidEvent("must be a string", f"$.{name}")
    try:
        changed = change(current, state=state, assignee=assignee, note=note, now=now)
    except CaseChangeError as exc:
        raise InvalidEvent(exc.reason, exc.field) from None
    return prepare_outgoing(changed, now, rules)[0]


# ---------------------------------------------------------------------------------------------
# HTTP: authentication, bounded body reading, error responses, publishing.
# ---------------------------------------------------------------------------------------------


class ApiError(Exception):
    """A refusal with its HTTP status, turned into ``{"error", "reason", "field"}`` JSON."""

    def __init__(self, status: int, error: str, reason: str, field: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status, self.error, self.reason, self.field = status, error, reason, field
        self.headers = dict(headers or {})


class ErrorBody(BaseModel):
    error: str
    reason: str
    field: str | None = None


class Accepted(BaseModel):
    accepted: int


@dataclass(frozen=True, slots=True)
class ApiTopics:
    """Where each endpoint publishes (injectable so tests can use their own topics)."""

    checkins: str = topics.CHECKINS
    citizens: str = topics.CITIZENS
    crises: str = topics.CRISIS_EVENTS
    acks: str = topics.ACKS
    cases: str = topics.CASES


@dataclass(frozen=True, slots=True)
class _Auth:
    """Bearer tokens with roles and per-token rate limits: 401 for no token or an unknown one, 403 for a
    token whose role is not enough, 429 (with ``Retry-After``) for one over its rate. The token that
    passed is left in ``request.state.api_token`` for the audit log."""

    tokens: tuple[ApiToken, ...]
    limiter: RateLimiter
    realm: str = "crisiswatch"
    _scheme: HTTPBearer = field(default_factory=lambda: HTTPBearer(auto_error=False))

    def dependency(self, role: Role, disabled_reason: str) -> Callable[..., Awaitable[None]]:
        async def check(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(self._scheme)) -> None:  # noqa: B008
            request.state.api_token = self.verify(None if credentials is None else credentials.credentials, role,
                                                  disabled_reason)

        return check

    def verify(self, presented: str | None, role: Role, disabled_reason: str) -> ApiToken:
        if not presented:
            raise ApiError(401, "unauthorized", "missing bearer token (Authorization: Bearer <token>)",
                           headers={"WWW-Authenticate": f'Bearer realm="{self.realm}"'})
        if not any(token.may(role) for token in self.tokens):
            raise ApiError(401, "unauthorized", disabled_reason,
                           headers={"WWW-Authenticate": f'Bearer realm="{self.realm}", error="invalid_token"'})
        token = find_token(self.tokens, presented)
        if token is None:
            raise ApiError(401, "unauthorized", "invalid bearer token",
                           headers={"WWW-Authenticate": f'Bearer realm="{self.realm}", error="invalid_token"'})
        if not token.may(role):
            raise ApiError(403, "forbidden", f"this token ({token.role}) may not use this endpoint (needs {role})",
                           headers={"WWW-Authenticate": f'Bearer realm="{self.realm}", error="insufficient_scope"'})
        wait = self.limiter.admit(token)
        if wait is not None:
            rate = self.limiter.limits[token.role]
            raise ApiError(429, "rate_limited", f"more than {rate:g} requests per second with this token "
                           "(CRISISWATCH_API_RATE_LIMITS); retry after the time in Retry-After",
                           headers={"Retry-After": str(max(1, math.ceil(wait)))})
        return token


# Security headers on every response (a page's own Content-Security-Policy, set by its route, wins).
SECURITY_HEADERS_ALL: Final[Mapping[str, str]] = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
CSP_API: Final = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'"
CSP_HTML: Final = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
                   "object-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
# FastAPI's /docs and /redoc pages start with an inline script and style.
CSP_DOCS: Final = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
                   "img-src 'self' data:; connect-src 'self'; object-src 'none'; frame-ancestors 'none'; base-uri 'none'")


def security_headers(response: Response, path: str, docs_paths: frozenset[str]) -> None:
    for name, value in SECURITY_HEADERS_ALL.items():
        response.headers.setdefault(name, value)
    html = response.headers.get("content-type", "").startswith("text/html")
    response.headers.setdefault("Content-Security-Policy",
                                CSP_DOCS if path in docs_paths else CSP_HTML if html else CSP_API)


def minimised_case(case: Case) -> dict[str, Any]:
    """A case as operators list it: where the citizen was while the case is open or assigned (someone may
    have to go there), only the country once it is closed."""
    shown = case.to_dict()
    if case.state == "closed":
        shown.update(lat=None, lon=None, location_withheld="the case is closed")
    return shown


def untracked_field(body: Any, index: int) -> str:
    """The JSON path of the ``citizen_id`` of the ``index``-th check-in of a request body."""
    if isinstance(body, list):
        return f"$[{index}].citizen_id"
    if isinstance(body, Mapping) and "checkins" in body:
        return f"$.checkins[{index}].citizen_id"
    return "$.citizen_id"


S = TypeVar("S")


def configured(store: S | None, why: str = "") -> S:
    """The store, or 503 when the API runs without a database."""
    if store is None:
        raise ApiError(503, "unavailable", f"no database is configured for this API (CRISISWATCH_DATABASE_URL){why}",
                       headers={"Retry-After": "30"})
    return store


async def from_store(store: S | None, read: Callable[[S], T], why: str = "") -> T:
    """``read(store)`` off the event loop; 503 without a database or while PostgreSQL is unavailable."""
    found = configured(store, why)
    try:
        return await run_in_threadpool(read, found)
    except StoreUnavailable as exc:
        raise ApiError(503, "database_unavailable", str(exc), headers={"Retry-After": "5"}) from None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes.

    Content-Length is checked first, and the streamed bytes are counted too, because a chunked
    request has no Content-Length and a client may send more than it declared.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "bad_request", "Content-Length is not a number")
        if int(declared) > limit:
            raise ApiError(413, "too_large", f"body of {int(declared)} bytes exceeds the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, "too_large", f"body exceeds the limit of {limit} bytes")
    return bytes(body)


def _messages(events: Sequence[Event], topic: str) -> list[Outgoing]:
    """Encode for Kafka. An event too large for the pipeline's consumers is refused here rather than dead-lettered
    there; only a crisis with a very detailed area can get this big, since the models drop unknown fields."""
    out = [outgoing(e, topic) for e in events]
    for message in out:
        if len(message.value) > MAX_MESSAGE_BYTES:
            raise ApiError(413, "too_large", f"event of {len(message.value)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte "
                           "message limit")
    return out


def _schema_file(name: str) -> dict[str, Any]:
    text = resources.files("schemas").joinpath("json", name.replace("/", "-") + ".schema.json").read_text("utf-8")
    return dict(json.loads(text))


def _inline_defs(node: Any, defs: Mapping[str, Any]) -> Any:
    """Replace local ``#/$defs/...`` references, which would not resolve inside the OpenAPI document."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline_defs(copy.deepcopy(defs[ref.removeprefix("#/$defs/")]), defs)
        return {k: _inline_defs(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline_defs(v, defs) for v in node]
    return node


def request_schema(name: str, optional: Sequence[str] = ()) -> dict[str, Any]:
    """The wire JSON Schema as an OpenAPI request body schema; ``schema`` and ``optional`` may be omitted."""
    schema = _schema_file(name)
    defs = schema.pop("$defs", {})
    schema.pop("$schema", None)
    schema.pop("$id", None)
    schema["required"] = [f for f in schema.get("required", []) if f not in ("schema", *optional)]
    return dict(_inline_defs(schema, defs))


def _body(schema: Mapping[str, Any], description: str) -> dict[str, Any]:
    return {"requestBody": {"required": True, "description": description,
                            "content": {"application/json": {"schema": schema}}}}


def _checkins_schema() -> dict[str, Any]:
    one = request_schema("checkin/1")
    many = {"type": "array", "minItems": 1, "maxItems": MAX_BATCH, "items": one}
    return {"oneOf": [one, many, {"type": "object", "properties": {"checkins": many}, "required": ["checkins"]}]}


_CRISIS_OPTIONAL = (*OPERATOR_DEFAULTS, "crisis_id", "version", "title", "source_ref", "effective", "geometry",
                    "country_codes")


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    meaning = {401: "missing or invalid bearer token", 403: "token not allowed on this endpoint",
               404: "no such crisis (a cancel names one PostgreSQL does not know)",
               429: "too many requests with this token: retry after Retry-After seconds",
               413: "body or batch too large", 422: "invalid input: the field (JSON path) and the reason",
               503: "Kafka unreachable: not accepted, retry later (a retry may store a duplicate, which is harmless)"}
    return {s: {"model": ErrorBody, "description": meaning[s]} for s in statuses}


def create_app(settings: Settings, publisher: Publisher, registry: CollectorRegistry, clock: Callable[[], datetime],
               *, api_topics: ApiTopics | None = None, new_crisis_id: Callable[[], str] | None = None,
               health: HealthProbe | None = None, crisis_store: CrisisStore | None = None,
               reply_store: ReplyStore | None = None, operator_store: OperatorStore | None = None,
               audit_log: AuditLog | None = None, citizen_store: CitizenStore | None = None, eraser: Eraser | None = None,
               monotonic: Callable[[], float] = time.monotonic) -> FastAPI:
    """The ingest API. Nothing global: settings, publisher, metrics registry, clock and the health
    probe (``/health``; without one, ``/health`` only says the process serves) come in, the crisis
    store the public CAP feed reads (without one, the CAP endpoints answer 503), the store replies,
    SOS and cases are checked against (without one, those endpoints answer 503), the store the
    operator's page reads (:mod:`producers.operator_page`; without one, its data endpoints answer 503),
    the audit log, the registry's citizens (consent, minimised views) and the eraser (without them, what
    needs them answers 503; check-ins are then not checked for consent here, the sink and the worker
    still are). ``monotonic`` times the rate limits."""
    routes = api_topics or ApiTopics()
    make_crisis_id = new_crisis_id or (lambda: f"op-{uuid.uuid4()}")
    metrics = ApiMetrics(registry)
    rules = settings.event_rules()
    auth = _Auth(configured_tokens(settings), RateLimiter(parse_rate_limits(settings.api_rate_limits), monotonic))
    ingest = [Depends(auth.dependency(
        "ingest", "no token is configured for this endpoint (CRISISWATCH_INGEST_TOKEN); it is disabled"))]
    operator = [Depends(auth.dependency(
        "operator", "no operator token is configured (CRISISWATCH_OPERATOR_TOKEN); this endpoint is disabled"))]
    admin = [Depends(auth.dependency(
        "admin", "no admin token is configured (CRISISWATCH_ADMIN_TOKEN); this endpoint is disabled"))]
    consent = ConsentCache(citizen_store.untracked) if citizen_store is not None else None

    # FastAPIOffline: /docs and /redoc served with their JS and CSS from the package, no CDN (works offline)
    app = FastAPIOffline(title="crisiswatch ingest API", version="1",
                  description="Check-ins, citizens' self-reports, operator crises and citizens' replies, into Kafka. "
                              "202 means Kafka acknowledged every event.")
    docs_paths = frozenset(p for p in (app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url) if p)
    if settings.cors_origins:  # closed unless configured: no CORS headers, so browsers keep other origins out
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_credentials=False,
                           allow_methods=["GET", "POST", "PATCH", "DELETE"], allow_headers=["Authorization", "Content-Type"],
                           max_age=600)

    @app.exception_handler(ApiError)
    async def refused(request: Request, exc: ApiError) -> JSONResponse:
        if exc.status >= 500:
            log.warning("request refused", extra={"path": request.url.path, "status": exc.status, "reason": exc.reason})
        else:
            log.info("request refused", extra={"path": request.url.path, "status": exc.status, "reason": exc.reason,
                                               "field": exc.field})
        body = ErrorBody(error=exc.error, reason=exc.reason, field=exc.field).model_dump(exclude_none=True)
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        try:
            response = await call_next(request)
        except Exception as exc:  # never a 500: what the input caused is a 422 (see validated), the rest is 503
            metrics.unexpected_errors.labels("request").inc()
            log.exception("unexpected error", extra={"path": request.url.path})
            body = ErrorBody(error="unavailable", reason=f"unexpected {type(exc).__name__}; nothing was accepted, "
                                                         "retry later").model_dump(exclude_none=True)
            response = JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
        endpoint = request.url.path if request.url.path in paths else "other"
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        security_headers(response, request.url.path, docs_paths)
        return response

    async def audit(request: Request, action: str, subject: str | None, detail: Mapping[str, Any] | None = None, *,
                    required: bool) -> None:
        """Record an operator action. ``required``: the action is refused (503) unless the entry is written
        (reading or erasing personal data); otherwise a failure is logged at ERROR and the action goes on."""
        token: ApiToken = request.state.api_token
        entry = AuditEntry(token.name, token.role, action, subject, dict(detail or {}))
        try:
            if audit_log is None:
                raise StoreUnavailable("no audit log is configured for this API (CRISISWATCH_DATABASE_URL)")
            await run_in_threadpool(audit_log.record, entry)
        except StoreUnavailable as exc:
            if required:
                raise ApiError(503, "audit_unavailable", f"not done: it could not be recorded in the audit log ({exc})",
                               headers={"Retry-After": "5"}) from None
            log.error("audit entry not written", extra={"action": action, "subject": subject, "actor": token.name,
                                                        "reason": str(exc)})

    # For routes other modules add (the operator's page): the same token checks and the same audit log.
    app.state.requires = {"ingest": ingest, "operator": operator, "admin": admin}
    app.state.audit = audit

    consent_down_until = [0.0]  # while PostgreSQL is away, check-ins are not held up by a lookup that would wait

    async def refuse_untracked(raw: bytes, checkins: Sequence[Checkin]) -> None:
        """422 for a batch holding a check-in of a citizen registered without location_tracking consent."""
        if consent is None or monotonic() < consent_down_until[0]:
            return
        try:
            untracked = await run_in_threadpool(consent.untracked, [c.citizen_id for c in checkins])
        except StoreUnavailable as exc:  # the sink and the worker check for themselves
            consent_down_until[0] = monotonic() + CONSENT_RETRY_S
            log.warning("consent not checked at the API while PostgreSQL is away (the sink and the worker still are)",
                        extra={"reason": str(exc), "retry_in_s": CONSENT_RETRY_S})
            return
        for index, item in enumerate(checkins):
            if item.citizen_id in untracked:
                raise ApiError(422, "no_consent", f"citizen {item.citizen_id!r} has not consented to location tracking "
                               "(consent.location_tracking is false); no check-in of this request is stored",
                               untracked_field(decode_json(raw), index))

    def unexpected_input_error(exc: Exception) -> ApiError:
        """An exception nobody foresaw while reading or checking this input: the input's fault, with a reason."""
        metrics.unexpected_errors.labels("validate").inc()
        log.exception("unexpected error while validating a request")
        detail = f"{type(exc).__name__}: {exc}".encode("utf-8", "backslashreplace").decode("utf-8")[:300]
        return ApiError(422, "invalid", f"the input could not be validated ({detail})")

    async def body_json(request: Request) -> Any:
        raw = await read_body(request, settings.max_body_bytes)
        try:
            return decode_json(raw)
        except InvalidEvent as exc:
            raise ApiError(422, "invalid", exc.reason, exc.field) from None
        except Exception as exc:
            raise unexpected_input_error(exc) from None

    async def publish(messages: list[Outgoing]) -> None:
        await handed_to_kafka(lambda: publisher.publish(messages))
        for message in messages:
            metrics.published.labels(message.topic).inc()

    async def publish_checkins(checkins: list[Checkin]) -> None:
        """One ``checkin-batch/1`` record per partition (CRISISWATCH_CHECKIN_BATCH_RECORDS), or one each;
        a check-in alone is a ``checkin/1`` record, as it always was."""
        if not settings.checkin_batch_records or len(checkins) == 1:
            await publish(_messages(checkins, routes.checkins))
            return
        await handed_to_kafka(lambda: publisher.publish_checkins(checkins, routes.checkins))
        metrics.published.labels(routes.checkins).inc(len(checkins))

    async def handed_to_kafka(send: Callable[[], object]) -> None:
        kafka_down = health.down().get(KAFKA) if health is not None else None
        if kafka_down is not None:  # known to be away: answer now rather than after the publish timeout
            raise ApiError(503, "broker_unavailable", f"Kafka is unreachable: {kafka_down}", headers={"Retry-After": "5"})
        started = time.perf_counter()
        try:
            await run_in_threadpool(send)
        except BrokerUnavailable as exc:
            raise ApiError(503, "broker_unavailable", str(exc), headers={"Retry-After": "5"}) from None
        metrics.publish_seconds.observe(time.perf_counter() - started)

    async def validated(parse: Callable[[], E | list[E]]) -> list[E]:
        # Schema checks of a full batch or normalising a detailed area take CPU time: keep the event loop free.
        try:
            result = await run_in_threadpool(parse)
        except InvalidEvent as exc:
            raise ApiError(422, "invalid", exc.reason, exc.field) from None
        except BatchTooLarge as exc:
            raise ApiError(413, "too_large", str(exc)) from None
        except Exception as exc:
            raise unexpected_input_error(exc) from None
        return result if isinstance(result, list) else [result]

    @app.get("/health", tags=["operations"], responses={503: {"description": "Kafka is unreachable; the body names it"}})
    async def health_page() -> JSONResponse:
        if health is None:
            return JSONResponse({"status": "ok"})
        status, body = health.report()
        return JSONResponse(body, status_code=status)

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/checkins", status_code=202, response_model=Accepted, dependencies=ingest, tags=["ingest"],
              responses=_errors(401, 403, 413, 422, 503),
              openapi_extra=_body(_checkins_schema(), f"one checkin/1, an array of up to {MAX_BATCH}, or "
                                  '{"checkins": [...]}; "schema" may be omitted'))
    async def post_checkins(request: Request) -> JSONResponse:
        raw = await read_body(request, settings.max_body_bytes)
        checkins = await validated(lambda: parse_checkin_body(raw, clock(), rules))
        await refuse_untracked(raw, checkins)
        await publish_checkins(checkins)
        return JSONResponse({"accepted": len(checkins)}, status_code=202)

    @app.post("/v1/citizens", status_code=202, response_model=Accepted, dependencies=ingest, tags=["ingest"],
              responses=_errors(401, 403, 413, 422, 503),
              openapi_extra=_body(request_schema("citizen/1"), "register or update a citizen (Lapor Diri)"))
    async def post_citizen(request: Request) -> JSONResponse:
        body = await body_json(request)
        citizens = await validated(lambda: parse_citizen(body, clock(), rules))
        await publish(_messages(citizens, routes.citizens))
        if consent is not None:
            consent.note(citizens[0].citizen_id, citizens[0].location_tracking)
        return JSONResponse({"accepted": 1}, status_code=202)

    @app.post("/v1/acks", status_code=202, response_model=Accepted, dependencies=ingest, tags=["ingest"],
              responses=_errors(401, 403, 413, 422, 503),
              openapi_extra=_body(request_schema("ack/1", ("received_at", "channel")),
                                  'a citizen\'s reply, "safe" or "need_help"; received_at defaults to now, channel to app'))
    async def post_ack(request: Request) -> JSONResponse:
        body = await body_json(request)
        acks = await validated(lambda: parse_ack(body, clock(), rules))
        case = await accept_reply(acks[0])
        return JSONResponse({"accepted": 1, **({} if case is None else {"case_id": case.case_id})}, status_code=202)

    @app.post("/v1/crises", status_code=202, dependencies=operator, tags=["operator"],
              responses={202: {"description": "the crisis/1 event as published"}, **_errors(401, 403, 404, 413, 422, 503)},
              openapi_extra=_body(request_schema("crisis/1", _CRISIS_OPTIONAL),
                                  "declare, update or cancel a crisis; everything but geometry has a default "
                                  "(a cancel needs only crisis_id and op)"))
    async def post_crisis(request: Request) -> JSONResponse:
        return await accept_crisis(request, await body_json(request))

    crisis_update = _body(request_schema("crisis/1", _CRISIS_OPTIONAL),
                          "the crisis's new version (crisis_id comes from the path; everything but geometry has a default)")

    @app.put("/v1/crises/{crisis_id:path}", status_code=202, dependencies=operator, tags=["operator"],
             responses={202: {"description": "the crisis/1 event as published"},
                        **_errors(401, 403, 404, 413, 422, 429, 503)}, openapi_extra=crisis_update)
    async def put_crisis(crisis_id: str, request: Request) -> JSONResponse:
        """Update a crisis that exists: 404 for one PostgreSQL does not know."""
        body = await body_json(request)
        if not isinstance(body, Mapping):
            raise ApiError(422, "invalid", "expected a JSON object (crisis/1)", "$")
        return await accept_crisis(request, {**body, "crisis_id": crisis_id, "op": "upsert"}, must_exist=True)

    @app.delete("/v1/crises/{crisis_id:path}", status_code=202, dependencies=operator, tags=["operator"],
                responses={202: {"description": "the cancel (crisis/1) as published"}, **_errors(401, 403, 404, 429, 503)})
    async def delete_crisis(crisis_id: str, request: Request) -> JSONResponse:
        """Cancel a crisis (its citizens get an all-clear): 404 for one PostgreSQL does not know."""
        return await accept_crisis(request, {"crisis_id": crisis_id, "op": "cancel"})

    async def accept_crisis(request: Request, body: Any, must_exist: bool = False) -> JSONResponse:
        """Declare (no crisis_id, or a new one the operator chose), update or cancel a crisis. A cancel, and
        an update through PUT, of a crisis PostgreSQL does not know is a 404."""
        crises = await validated(lambda: parse_crisis(body, clock(), make_crisis_id, rules))
        crisis = crises[0]
        if (crisis.op == "cancel" or must_exist) and not await known_crisis(crisis.crisis_id):
            what = "cancel" if crisis.op == "cancel" else "update"
            raise ApiError(404, "not_found", f"no crisis {crisis.crisis_id!r} to {what} (a crisis declared a moment "
                                             "ago reaches the database within seconds: retry then)", "$.crisis_id")
        await publish(_messages(crises, routes.crises))
        log.info("crisis published", extra={"crisis_id": crisis.crisis_id, "op": crisis.op, "version": crisis.version})
        action = "cancel" if crisis.op == "cancel" else "update" if "crisis_id" in body else "declare"
        await audit(request, action, crisis.crisis_id, {"version": crisis.version, "severity": crisis.severity},
                    required=False)
        return JSONResponse(crisis.to_dict(), status_code=202)

    async def known_crisis(crisis_id: str) -> bool:
        """Whether PostgreSQL has the crisis. Without a database, or while it is away, a cancel goes
        out unchecked: an all-clear must never wait on the database, and one for nothing is harmless."""
        if crisis_store is None:
            return True
        store = crisis_store
        try:
            return bool(await run_in_threadpool(store.versions, crisis_id))
        except StoreUnavailable:
            return True

    # CAP out: public alerting, read by other agencies and aggregators, so no token (like every CAP feed).

    async def stored(read: Callable[[CrisisStore], T]) -> T:
        return await from_store(crisis_store, read)

    @app.get("/v1/crises/{crisis_id:path}.cap", tags=["CAP"], response_class=Response,
             responses={200: {"content": {CAP_MEDIA_TYPE: {}}, "description": "the crisis's latest version as a CAP 1.2 alert"},
                        404: {"model": ErrorBody, "description": "no such crisis"},
                        503: {"model": ErrorBody, "description": "PostgreSQL unreachable"}})
    async def crisis_cap(crisis_id: str) -> Response:
        versions = await stored(lambda store: store.versions(crisis_id))
        if not versions:
            raise ApiError(404, "not_found", f"no crisis {crisis_id!r}")
        document = await run_in_threadpool(cap_alert, versions, settings.cap_sender)
        return Response(document, media_type=CAP_MEDIA_TYPE)

    @app.get("/v1/cap.atom", tags=["CAP"], response_class=Response,
             responses={200: {"content": {ATOM_MEDIA_TYPE: {}}, "description": "Atom feed of the active crises' CAP alerts"},
                        503: {"model": ErrorBody, "description": "PostgreSQL unreachable"}})
    async def cap_feed(request: Request) -> Response:
        now = clock()
        active = await stored(lambda store: store.active(now))
        document = atom_feed(active, sender=settings.cap_sender, base_url=str(request.base_url), now=now)
        return Response(document, media_type=ATOM_MEDIA_TYPE)

    # Replies, SOS and cases: checked against PostgreSQL (the registry), published to Kafka.

    async def looked_up(read: Callable[[ReplyStore], T]) -> T:
        return await from_store(reply_store, read, "; replies, SOS and cases cannot be checked")

    async def publish_with_case(messages: list[Outgoing], case: Case | None) -> None:
        if case is not None:
            country_topics = [m.topic for m in case_messages(case, routes.cases) if m.topic != routes.cases]
            if country_topics:
                try:
                    await run_in_threadpool(publisher.ensure_topics, country_topics)
                except BrokerUnavailable as exc:
                    raise ApiError(503, "broker_unavailable", str(exc), headers={"Retry-After": "5"}) from None
            messages = [*messages, *case_messages(case, routes.cases)]
        await publish(messages)

    async def accept_reply(ack: Ack) -> Case | None:
        """Publish a reply of a known citizen about a known crisis; a ``need_help`` reply opens a case
        (one per citizen and crisis: a case already open or assigned is left as it is). Returns the case."""
        known = await looked_up(lambda store: store.known(ack.citizen_id, ack.crisis_id))
        if not known.citizen:
            raise ApiError(422, "unknown_citizen", f"no registered citizen {ack.citizen_id!r}; the reply is not stored",
                           "$.citizen_id")
        if not known.crisis:
            raise ApiError(422, "unknown_crisis", f"no crisis {ack.crisis_id!r}; the reply is not stored", "$.crisis_id")
        case, opened = None, False
        if ack.status == "need_help":
            case, opened = await looked_up(lambda store: help_case(store, ack))
        await publish_with_case(_messages([ack], routes.acks), case if opened else None)
        log.info("reply accepted", extra={"citizen_id": ack.citizen_id, "crisis_id": ack.crisis_id,
                                          "status": ack.status, "channel": ack.channel})
        return case

    def help_case(store: ReplyStore, ack: Ack) -> tuple[Case, bool]:
        """The case of a ``need_help`` reply, and whether it is to be (re)opened."""
        opened = new_case(kind="need_help", citizen_id=ack.citizen_id, crisis_id=ack.crisis_id, country=None,
                          lat=None, lon=None, note=ack.note, now=ack.received_at)
        existing = store.case(opened.case_id)
        if existing is not None and existing.state != "closed":
            return existing, False
        where = store.last_location(ack.citizen_id, ack.crisis_id)
        lat, lon = where if where is not None else (None, None)
        return replace(opened, country=country_at(lat, lon), lat=lat, lon=lon), True

    @app.post("/v1/sms/inbound", status_code=202, dependencies=ingest, tags=["replies"],
              responses={202: {"description": "the reply as stored: citizen, crisis, status"},
                         **_errors(401, 403, 413, 422, 503)},
              openapi_extra={"requestBody": {"required": True, "description": (
                  "an SMS forwarded by a provider: form-encoded From and Body (Twilio-style) or JSON "
                  '{"from": ..., "body": ...}; the first word AMAN/SAFE or TOLONG/HELP, the rest kept as a note'),
                  "content": {"application/x-www-form-urlencoded": {"schema": _SMS_SCHEMA},
                              "application/json": {"schema": _SMS_SCHEMA}}}})
    async def sms_inbound(request: Request) -> JSONResponse:
        raw = await read_body(request, settings.max_body_bytes)
        try:
            sender, reply = parse_sms(raw, request.headers.get("content-type", ""))
        except InvalidEvent as exc:
            raise ApiError(422, "invalid", exc.reason, exc.field) from None
        citizen_id = await looked_up(lambda store: store.citizen_by_sms(sender))
        if citizen_id is None:
            raise ApiError(422, "unknown_sender", "no registered citizen has the sms number it came from; "
                           "the reply is not stored", "$.from")
        now = clock()
        crisis_id = await looked_up(lambda store: store.latest_warned_crisis(citizen_id, now))
        if crisis_id is None:
            raise ApiError(422, "no_crisis", f"citizen {citizen_id!r} was warned about no active crisis; "
                           "the reply is not stored", "$.body")
        acks = await validated(lambda: parse_ack({"citizen_id": citizen_id, "crisis_id": crisis_id,
                                                  "status": reply.status, "channel": "sms",
                                                  **({} if reply.note is None else {"note": reply.note})}, now, rules))
        case = await accept_reply(acks[0])
        return JSONResponse({"accepted": 1, "citizen_id": citizen_id, "crisis_id": crisis_id, "status": reply.status,
                             **({} if case is None else {"case_id": case.case_id})}, status_code=202)

    links = reply_links(settings, clock)

    def page(html: str, status: int = 200) -> HTMLResponse:
        return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)

    def link_token(token: str) -> ReplyToken:
        if links is None:
            raise ApiError(503, "unavailable", "reply links are not configured here (CRISISWATCH_REPLY_SECRET)")
        try:
            return links.verify(token)
        except ReplyTokenError as exc:
            raise ApiError(exc.status, "expired" if exc.status == 410 else "invalid_link", exc.reason) from None

    async def as_page(work: Callable[[], Awaitable[HTMLResponse]]) -> HTMLResponse:
        try:
            return await work()
        except ApiError as exc:
            log.info("reply link refused", extra={"status": exc.status, "reason": exc.reason})
            return HTMLResponse(problem_page(exc.reason), status_code=exc.status, headers={**SECURITY_HEADERS,
                                                                                           **exc.headers})

    @app.get("/r/{token}", tags=["replies"], response_class=HTMLResponse, include_in_schema=True,
             responses={400: {"description": "not a valid link"}, 410: {"description": "the link expired"}})
    async def reply_link_page(token: str) -> HTMLResponse:
        async def work() -> HTMLResponse:
            link_token(token)
            return page(ask_page())

        return await as_page(work)

    @app.post("/r/{token}", tags=["replies"], response_class=HTMLResponse,
              responses={400: {"description": "not a valid link, or no answer chosen"},
                         410: {"description": "the link expired"}, 422: {"description": "unknown citizen or crisis"},
                         503: {"description": "Kafka or PostgreSQL unreachable; nothing stored"}})
    async def reply_link_answer(token: str, request: Request) -> HTMLResponse:
        async def work() -> HTMLResponse:
            signed = link_token(token)
            raw = await read_body(request, settings.max_body_bytes)
            status = parse_qs(raw.decode("utf-8", "replace")).get("status", [""])[0]
            if status not in ("safe", "need_help"):
                raise ApiError(400, "bad_request", "choose one of the two buttons")
            acks = await validated(lambda: parse_ack({"citizen_id": signed.citizen_id, "crisis_id": signed.crisis_id,
                                                      "status": status, "channel": "link"}, clock(), rules))
            await accept_reply(acks[0])
            return page(thanks_page(status))

        return await as_page(work)

    @app.post("/v1/sos", status_code=202, dependencies=ingest, tags=["replies"],
              responses={202: {"description": "the case/1 opened"}, **_errors(401, 403, 413, 422, 503)},
              openapi_extra=_body(_SOS_SCHEMA, "a panic button: where the citizen is and an optional message; "
                                  "opens a case at once, whether or not a crisis is active"))
    async def post_sos(request: Request) -> JSONResponse:
        body = await body_json(request)
        [sos] = await validated(lambda: parse_sos(body, clock(), rules))
        known = await looked_up(lambda store: store.known(sos.citizen_id, None))
        if not known.citizen:
            raise ApiError(422, "unknown_citizen", f"no registered citizen {sos.citizen_id!r}", "$.citizen_id")
        crisis_id = await looked_up(lambda store: store.latest_warned_crisis(sos.citizen_id, clock()))
        case = replace(sos, crisis_id=crisis_id)
        await publish_with_case([], case)
        log.warning("SOS case opened", extra={"case_id": case.case_id, "citizen_id": case.citizen_id,
                                              "country": case.country, "crisis_id": case.crisis_id})
        return JSONResponse(case.to_dict(), status_code=202)

    @app.patch("/v1/cases/{case_id}", status_code=202, dependencies=operator, tags=["operator"],
               responses={202: {"description": "the case/1 as published"}, 404: {"model": ErrorBody},
                          **_errors(401, 403, 413, 422, 503)},
               openapi_extra=_body(_CASE_CHANGE_SCHEMA, "move a case: open, assigned (to someone) or closed"))
    async def patch_case(case_id: str, request: Request) -> JSONResponse:
        body = await body_json(request)
        current = await looked_up(lambda store: store.case(case_id)) if _CASE_ID.fullmatch(case_id) else None
        if current is None:
            raise ApiError(404, "not_found", f"no case {case_id!r} (a case just opened is listed once it is stored)")
        [changed] = await validated(lambda: parse_case_change(body, current, clock(), rules))
        await publish_with_case([], changed)
        log.info("case changed", extra={"case_id": case_id, "state": changed.state})
        await audit(request, "case_change", case_id, {"state": changed.state, "citizen_id": changed.citizen_id},
                    required=False)
        return JSONResponse(changed.to_dict(), status_code=202)

    @app.get("/v1/cases", dependencies=operator, tags=["operator"],
             responses={200: {"description": '{"cases": [case/1, ...]}, most recently changed first'},
                        **_errors(401, 403, 422, 503)})
    async def list_cases(request: Request, state: str | None = None) -> JSONResponse:
        if state is not None and state not in CASE_STATES:
            raise ApiError(422, "invalid", f"state must be one of {', '.join(CASE_STATES)}", "state")
        await audit(request, "list_cases", None, {"state": state}, required=True)
        found = await looked_up(lambda store: store.cases(state))
        return JSONResponse({"cases": [minimised_case(c) for c in found]})
    # Accountability (operator): who is inside or near, warned, reached, safe, needing help, unreached,
    # escalated — the crisis-status/1 the sink stored. ``{crisis_id:path}``: ids may hold "/"; a path
    # ending in ".cap" is the CAP route above, one ending in "/status" this one.

    @app.get("/v1/crises", dependencies=operator, tags=["operator"],
             responses={**_errors(401, 403), 503: {"model": ErrorBody, "description": "PostgreSQL unreachable"}})
    async def list_crises() -> JSONResponse:
        """The active crises with their accountability counts (zeros and ``as_of`` null before the first status)."""
        now = clock()
        return JSONResponse({"crises": await stored(lambda store: store.statuses(now))})

    @app.get("/v1/crises/{crisis_id:path}/status", dependencies=operator, tags=["operator"],
             responses={**_errors(401, 403), 404: {"model": ErrorBody, "description": "no such crisis"},
                        503: {"model": ErrorBody, "description": "PostgreSQL unreachable"}})
    async def crisis_status(crisis_id: str) -> JSONResponse:
        """One crisis's latest accountability counts."""
        found = await stored(lambda store: store.status(crisis_id))
        if found is None:
            raise ApiError(404, "not_found", f"no crisis {crisis_id!r}")
        return JSONResponse(found)

    # Citizens (operator: minimised view; admin: erasure) and the audit log (admin). Each is audited first.

    def registry_store() -> CitizenStore:
        return configured(citizen_store)

    async def read_registry(read: Callable[[CitizenStore], T]) -> T:
        return await from_store(citizen_store, read)

    @app.get("/v1/citizens/{citizen_id}", dependencies=operator, tags=["operator"],
             responses={200: {"description": "the registration; the location only while inside or near an active crisis"},
                        404: {"model": ErrorBody}, **_errors(401, 403, 429, 503)})
    async def view_citizen(citizen_id: str, request: Request) -> JSONResponse:
        """One citizen as registered. Where they are is shown only while they are inside or near an active
        crisis (``location``, ``crises``); otherwise ``location`` is null and ``location_withheld`` says why."""
        registry_store()
        await audit(request, "view_citizen", citizen_id, required=True)
        found = await read_registry(lambda store: store.citizen(citizen_id, clock()))
        if found is None:
            raise ApiError(404, "not_found", f"no registered citizen {citizen_id!r}")
        return JSONResponse(found, headers={"Cache-Control": "no-store"})

    @app.delete("/v1/citizens/{citizen_id}", dependencies=admin, tags=["admin"],
                responses={200: {"description": "what was deleted per table, and the topics a tombstone went to"},
                           **_errors(401, 403, 429, 503)})
    async def erase_citizen(citizen_id: str, request: Request) -> JSONResponse:
        """Erase a citizen everywhere: every PostgreSQL row about them, a tombstone for their key on the
        citizens and checkins topics (the worker deletes its state for them). Idempotent."""
        if eraser is None:
            raise ApiError(503, "unavailable", "no database is configured for this API (CRISISWATCH_DATABASE_URL)",
                           headers={"Retry-After": "30"})
        store = eraser
        await audit(request, "erase", citizen_id, required=True)
        try:
            deleted = await run_in_threadpool(store.erase, citizen_id)
        except StoreUnavailable as exc:
            raise ApiError(503, "database_unavailable", f"{exc}; nothing was erased", headers={"Retry-After": "5"}) from None
        if consent is not None:
            consent.forget(citizen_id)
        marks = (routes.citizens, routes.checkins)
        try:
            await publish(tombstones(citizen_id, marks))
        except ApiError as exc:
            raise ApiError(exc.status, exc.error, f"erased in PostgreSQL, but the Kafka tombstones were not published "
                           f"({exc.reason}); erase again to publish them", headers=exc.headers) from None
        log.info("citizen erased", extra={"citizen_id": citizen_id, "rows": sum(deleted.values())})
        return JSONResponse(Erased(citizen_id, deleted, marks).to_dict())

    @app.get("/v1/audit", dependencies=admin, tags=["admin"],
             responses={200: {"description": '{"entries": [{at, actor, role, action, subject, detail}]}, newest first'},
                        **_errors(401, 403, 422, 429, 503)})
    async def read_audit(request: Request, since: str | None = None, action: str | None = None,
                         subject: str | None = None, limit: int = 200) -> JSONResponse:
        """The audit log of operator actions; reading it is itself recorded."""
        try:
            after = None if since is None else parse_time(since)
        except (InvalidEvent, ValueError):
            raise ApiError(422, "invalid", "since must be an RFC 3339 date-time with an offset", "since") from None
        if not 1 <= limit <= MAX_LISTED_ENTRIES:
            raise ApiError(422, "invalid", f"limit must be between 1 and {MAX_LISTED_ENTRIES}", "limit")
        await audit(request, "read_audit", subject, {"action": action} if action else None, required=True)
        assert audit_log is not None  # audit() above refused otherwise
        reader = audit_log
        try:
            entries = await run_in_threadpool(lambda: reader.entries(since=after, action=action, subject=subject,
                                                                     limit=limit))
        except StoreUnavailable as exc:
            raise ApiError(503, "database_unavailable", str(exc), headers={"Retry-After": "5"}) from None
        return JSONResponse({"entries": [e.to_dict() for e in entries]}, headers={"Cache-Control": "no-store"})

    from producers.operator_page import register_operator_page  # imported here: the page uses this module's ApiError
    register_operator_page(app, operator, clock, operator_store)
    paths = frozenset(route.path for route in app.routes if hasattr(route, "path"))
    return app
