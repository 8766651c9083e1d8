"""Typed, immutable models of the version-1 events (see the JSON Schemas in ``json/``).

Field names are the wire contract. Datetimes are always timezone-aware; coordinates are
WGS84 degrees, and GeoJSON geometries are lon,lat (RFC 7946).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal, Protocol, TypeAlias

CheckinSource: TypeAlias = Literal["app", "sms", "manual", "import", "simulator"]
ChannelType: TypeAlias = Literal["webhook", "email", "sms", "push"]
CrisisOp: TypeAlias = Literal["upsert", "cancel"]
CrisisSource: TypeAlias = Literal["cap", "gdacs", "usgs", "rss", "advisory", "operator"]
Severity: TypeAlias = Literal["minor", "moderate", "severe", "extreme", "unknown"]
Urgency: TypeAlias = Literal["immediate", "expected", "future", "past", "unknown"]
Certainty: TypeAlias = Literal["observed", "likely", "possible", "unlikely", "unknown"]
WarningKind: TypeAlias = Literal["inside", "entered", "near", "exited", "all_clear", "pre_arrival", "in_country"]
DeliveryOutcome: TypeAlias = Literal["delivered", "gave_up"]
AckStatus: TypeAlias = Literal["safe", "need_help"]
CaseKind: TypeAlias = Literal["sos", "need_help", "escalation"]
CaseState: TypeAlias = Literal["open", "assigned", "closed"]
GeoJSON: TypeAlias = Mapping[str, Any]

SEVERITY_RANK: dict[str, int] = {"unknown": 0, "minor": 1, "moderate": 2, "severe": 3, "extreme": 4}


# The instants an event may name: a day inside Python's range at either end, so that any accepted
# time converts to UTC (and to any other offset) without overflowing, in every stage that reads it.
EARLIEST_TIME = datetime(1, 1, 2, tzinfo=UTC)
LATEST_TIME = datetime(9999, 12, 30, tzinfo=UTC)


def parse_time(value: str) -> datetime:
    """RFC 3339 text to an aware datetime; naive input and instants out of range are refused."""
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(f"datetime without offset: {value!r}")
    if not EARLIEST_TIME <= parsed <= LATEST_TIME:
        raise ValueError(f"date-time out of range: {value!r} (0001-01-02 to 9999-12-30 UTC)")
    return parsed


def format_time(value: datetime) -> str:
    if value.tzinfo is None:
        raise ValueError("naive datetime")
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def _opt_time(value: str | None) -> datetime | None:
    return None if value is None else parse_time(value)


class Event(Protocol):
    SCHEMA: ClassVar[str]

    def to_dict(self) -> dict[str, Any]: ...

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Event: ...


@dataclass(frozen=True, slots=True)
class Checkin:
    SCHEMA: ClassVar[str] = "checkin/1"
    citizen_id: str
    lat: float
    lon: float
    observed_at: datetime
    source: CheckinSource
    accuracy_m: float | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Checkin:
        acc = d.get("accuracy_m")
        return cls(d["citizen_id"], float(d["lat"]), float(d["lon"]), parse_time(d["observed_at"]), d["source"],
                   None if acc is None else float(acc))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema": self.SCHEMA, "citizen_id": self.citizen_id, "lat": self.lat, "lon": self.lon,
                               "observed_at": format_time(self.observed_at), "source": self.source}
        if self.accuracy_m is not None:
            out["accuracy_m"] = self.accuracy_m
        return out


@dataclass(frozen=True, slots=True)
class Channel:
    type: ChannelType
    address: str


@dataclass(frozen=True, slots=True)
class Citizen:
    SCHEMA: ClassVar[str] = "citizen/1"
    citizen_id: str
    name: str
    nationality: str
    language: str
    channels: tuple[Channel, ...]
    emergency_contacts: tuple[Mapping[str, str], ...]
    location_tracking: bool
    trip: Mapping[str, Any] | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Citizen:
        return cls(d["citizen_id"], d["name"], d["nationality"], d["language"],
                   tuple(Channel(c["type"], c["address"]) for c in d["channels"]),
                   tuple(dict(c) for c in d["emergency_contacts"]), bool(d["consent"]["location_tracking"]),
                   d.get("trip"))

    def to_dict(self) -> dict[str, Any]:
        return {"schema": self.SCHEMA, "citizen_id": self.citizen_id, "name": self.name,
                "nationality": self.nationality, "language": self.language,
                "channels": [{"type": c.type, "address": c.address} for c in self.channels],
                "emergency_contacts": [dict(c) for c in self.emergency_contacts],
                "trip": None if self.trip is None else dict(self.trip),
                "consent": {"location_tracking": self.location_tracking}}


@dataclass(frozen=True, slots=True)
class Crisis:
    SCHEMA: ClassVar[str] = "crisis/1"
    crisis_id: str
    op: CrisisOp
    version: int
    source: CrisisSource
    source_ref: str
    title: str
    category: str
    severity: Severity
    urgency: Urgency
    certainty: Certainty
    geometry: GeoJSON | None
    buffer_km: float
    country_codes: tuple[str, ...]
    effective: datetime
    expires: datetime | None
    instruction: str
    url: str
    references: tuple[str, ...] = ()
    language: str | None = None
    status: str = "actual"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Crisis:
        return cls(d["crisis_id"], d["op"], int(d["version"]), d["source"], d["source_ref"], d["title"],
                   d["category"], d["severity"], d["urgency"], d["certainty"], d["geometry"],
                   float(d["buffer_km"]), tuple(d["country_codes"]), parse_time(d["effective"]),
                   _opt_time(d["expires"]), d["instruction"], d["url"], tuple(d["references"]),
                   d.get("language"), d.get("status", "actual"))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema": self.SCHEMA, "crisis_id": self.crisis_id, "op": self.op, "version": self.version,
            "source": self.source, "source_ref": self.source_ref, "title": self.title, "category": self.category,
            "severity": self.severity, "urgency": self.urgency, "certainty": self.certainty,
            "geometry": None if self.geometry is None else dict(self.geometry), "buffer_km": self.buffer_km,
            "country_codes": list(self.country_codes), "effective": format_time(self.effective),
            "expires": None if self.expires is None else format_time(self.expires),
            "instruction": self.instruction, "url": self.url, "references": list(self.references),
            "status": self.status}
        if self.language is not None:
            out["language"] = self.language
        return out


@dataclass(frozen=True, slots=True)
class Warning:
    SCHEMA: ClassVar[str] = "warning/1"
    warning_id: str
    citizen_id: str
    crisis_id: str
    crisis_version: int
    kind: WarningKind
    severity: Severity
    title: str
    instruction: str
    distance_km: float
    lat: float
    lon: float
    observed_at: datetime
    emitted_at: datetime
    country_codes: tuple[str, ...] = field(default=())

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Warning:
        return cls(d["warning_id"], d["citizen_id"], d["crisis_id"], int(d["crisis_version"]), d["kind"],
                   d["severity"], d["title"], d["instruction"], float(d["distance_km"]), float(d["lat"]),
                   float(d["lon"]), parse_time(d["observed_at"]), parse_time(d["emitted_at"]),
                   tuple(d.get("country_codes", ())))

    def to_dict(self) -> dict[str, Any]:
        return {"schema": self.SCHEMA, "warning_id": self.warning_id, "citizen_id": self.citizen_id,
                "crisis_id": self.crisis_id, "crisis_version": self.crisis_version, "kind": self.kind,
                "severity": self.severity, "title": self.title, "instruction": self.instruction,
                "distance_km": self.distance_km, "lat": self.lat, "lon": self.lon,
                "observed_at": format_time(self.observed_at), "emitted_at": format_time(self.emitted_at),
                "country_codes": list(self.country_codes)}


@dataclass(frozen=True, slots=True)
class Ack:
    SCHEMA: ClassVar[str] = "ack/1"
    citizen_id: str
    crisis_id: str
    status: AckStatus
    received_at: datetime
    channel: str
    note: str | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Ack:
        return cls(d["citizen_id"], d["crisis_id"], d["status"], parse_time(d["received_at"]), d["channel"],
                   d.get("note"))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema": self.SCHEMA, "citizen_id": self.citizen_id, "crisis_id": self.crisis_id,
                               "status": self.status, "received_at": format_time(self.received_at),
                               "channel": self.channel}
        if self.note is not None:
            out["note"] = self.note
        return out


@dataclass(frozen=True, slots=True)
class CrisisStatus:
    SCHEMA: ClassVar[str] = "crisis-status/1"
    crisis_id: str
    inside: int
    near: int
    warned: int
    delivered: int
    safe: int
    need_help: int
    unreached: int
    escalated: int
    as_of: datetime

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CrisisStatus:
        c = {k: int(d[k]) for k in _STATUS_COUNTS}
        return cls(d["crisis_id"], c["inside"], c["near"], c["warned"], c["delivered"], c["safe"], c["need_help"],
                   c["unreached"], c["escalated"], parse_time(d["as_of"]))

    def to_dict(self) -> dict[str, Any]:
        counts = {k: getattr(self, k) for k in _STATUS_COUNTS}
        return {"schema": self.SCHEMA, "crisis_id": self.crisis_id, **counts, "as_of": format_time(self.as_of)}


@dataclass(frozen=True, slots=True)
class Case:
    """A consular case: opened by an SOS, a ``need_help`` reply or an escalation; its state changed by operators.
    ``crisis_id`` is None for an SOS outside any crisis; ``country``, ``lat`` and ``lon`` are None when
    where the citizen is is not known."""

    SCHEMA: ClassVar[str] = "case/1"
    case_id: str
    citizen_id: str
    crisis_id: str | None
    kind: CaseKind
    state: CaseState
    country: str | None
    lat: float | None
    lon: float | None
    note: str
    opened_at: datetime
    updated_at: datetime
    assignee: str | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Case:
        lat, lon = d["lat"], d["lon"]
        return cls(d["case_id"], d["citizen_id"], d["crisis_id"], d["kind"], d["state"], d["country"],
                   None if lat is None else float(lat), None if lon is None else float(lon), d["note"],
                   parse_time(d["opened_at"]), parse_time(d["updated_at"]), d.get("assignee"))

    def to_dict(self) -> dict[str, Any]:
        return {"schema": self.SCHEMA, "case_id": self.case_id, "citizen_id": self.citizen_id,
                "crisis_id": self.crisis_id, "kind": self.kind, "state": self.state, "assignee": self.assignee,
                "country": self.country, "lat": self.lat, "lon": self.lon, "note": self.note,
                "opened_at": format_time(self.opened_at), "updated_at": format_time(self.updated_at)}


@dataclass(frozen=True, slots=True)
class Delivery:
    """The final outcome of one warning for its citizen: ``delivered`` on ``channel``, or ``gave_up``
    on every channel (``channel`` the last one tried, None when the citizen has none). Published
    at least once per warning on ``deliveries`` (key citizen); readers keep the first per warning."""

    SCHEMA: ClassVar[str] = "delivery/1"
    warning_id: str
    citizen_id: str
    crisis_id: str
    channel: ChannelType | None
    outcome: DeliveryOutcome
    attempts: int
    at: datetime

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Delivery:
        return cls(d["warning_id"], d["citizen_id"], d["crisis_id"], d["channel"], d["outcome"], int(d["attempts"]),
                   parse_time(d["at"]))

    def to_dict(self) -> dict[str, Any]:
        return {"schema": self.SCHEMA, "warning_id": self.warning_id, "citizen_id": self.citizen_id,
                "crisis_id": self.crisis_id, "channel": self.channel, "outcome": self.outcome,
                "attempts": self.attempts, "at": format_time(self.at)}


_STATUS_COUNTS = ("inside", "near", "warned", "delivered", "safe", "need_help", "unreached", "escalated")

MODELS: dict[str, Any] = {m.SCHEMA: m for m in (Checkin, Citizen, Crisis, Warning, Ack, CrisisStatus, Case, Delivery)}
