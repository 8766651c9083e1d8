"""One frozen settings object, built once from the environment at the entry point and passed down.

Every setting is one row of :data:`ENV_VARS`: its variable, default, meaning and the verbs that use
it. The row is all there is: the value is parsed by the type of the :class:`Settings` field of the
same name (``CRISISWATCH_API_PORT`` -> ``api_port: int``) with the row's bounds or choices, so adding
a setting is a row and a field; ``crisiswatch <verb> --help`` lists the rows its verb uses and the
README's table lists them all (tests/unit/test_readme.py keeps it so).
"""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.domain.validation import EventRules


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names the variable."""


@dataclass(frozen=True, slots=True)
class Secret:
    """A secret value that never shows itself in logs, reprs or tracebacks."""

    _value: str = field(repr=False)

    def get(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('**********')" if self._value else "Secret('')"

    __str__ = __repr__


Parse = Callable[[str, str], Any]  # (variable name, raw text) -> value, or SettingsError


@dataclass(frozen=True, slots=True)
class EnvVar:
    """One setting. ``verbs``: the ``crisiswatch`` verbs that use it (empty: every verb). The value is
    parsed by the type of the :class:`Settings` field named like the variable, within ``minimum`` and
    ``maximum`` or among ``choices`` (upper-cased); ``parse`` replaces that for the odd one."""

    name: str
    default: str
    meaning: str
    verbs: frozenset[str] = frozenset()
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    parse: Parse | None = None

    @property
    def field(self) -> str:
        return self.name.removeprefix("CRISISWATCH_").lower()

    def used_by(self, verb: str) -> bool:
        return not self.verbs or verb in self.verbs


def _verbs(*names: str) -> frozenset[str]:
    return frozenset(names)


# Who uses what: `up` and `demo` run every part, so they use every setting.
STACK = _verbs("up", "demo")
KAFKA_CLIENTS = STACK | _verbs("worker", "accountability", "api", "sink", "dispatch", "simulate", "replay", "tail", "feeds", "restore",
                               "status")
PUBLISHERS = STACK | _verbs("api", "feeds", "simulate", "replay", "restore")
DATABASE_USERS = STACK | _verbs("api", "sink", "dispatch", "migrate", "restore", "status")
DISPATCH = STACK | _verbs("dispatch")
WORKER = STACK | _verbs("worker")


def _escalation(name: str, raw: str) -> str:
    from pipeline.domain.escalation import parse_rules

    try:
        parse_rules(raw)
    except ValueError as exc:
        raise SettingsError(f"{name}: {exc}") from None
    return raw.strip()


def _smtp_url(name: str, raw: str) -> Secret:
    """An SMTP URL checked at start (the message never quotes it: it may hold a password)."""
    raw = raw.strip()
    if raw and not raw.startswith(("smtp://", "smtps://")):
        raise SettingsError(f"{name}: expected smtp://[user:pass@]host[:port][?starttls=true] or smtps://...")
    return Secret(raw)


def _public_url(name: str, raw: str) -> str:
    raw = raw.strip()
    if raw and not raw.startswith(("https://", "http://")):
        raise SettingsError(f"{name}: expected an http(s) URL, got {raw!r}")
    return raw.rstrip("/")


def _rate_limits(name: str, raw: str) -> str:
    from pipeline.tokens import parse_rate_limits

    try:
        parse_rate_limits(raw)
    except ValueError as exc:
        raise SettingsError(f"{name}: {exc}") from None
    return raw.strip()


def _origins(name: str, raw: str) -> tuple[str, ...]:
    """Exact origins only: a wildcard would open the operator endpoints to every page on the web."""
    origins = tuple(o.strip().rstrip("/") for o in raw.split(",") if o.strip())
    for origin in origins:
        if origin == "*" or not origin.startswith(("https://", "http://")):
            raise SettingsError(f"{name}: expected origins like https://ops.example.org, got {origin!r}")
    return origins


def _or_default(default: str) -> Parse:
    return lambda _name, raw: raw.strip() or default


# A dead letter's payload must leave room for its key and headers under the 1,000,000-byte limit of
# Kafka's producers and brokers.
DLQ_PAYLOAD_CEILING = 900_000

# The single list of every environment variable: the settings, the CLI's --help and the README table come from here.
ENV_VARS: tuple[EnvVar, ...] = (
    EnvVar("CRISISWATCH_KAFKA_BOOTSTRAP", "", "Kafka bootstrap servers (host:port,...). Empty: start the embedded broker.",
           verbs=KAFKA_CLIENTS),
    EnvVar("CRISISWATCH_DATABASE_URL", "", "PostgreSQL URL (postgresql://...). Empty: start embedded PostgreSQL.",
           verbs=DATABASE_USERS),
    EnvVar("CRISISWATCH_DATA_DIR", ".crisiswatch", "Where the embedded profile keeps PostgreSQL data, worker state, logs.",
           verbs=STACK | _verbs("worker", "accountability", "feeds", "tail", "simulate", "replay", "status", "token", "psql")),
    EnvVar("CRISISWATCH_PARTITIONS", "4", "Partitions of each topic created by crisiswatch (scale-out limit).",
           verbs=PUBLISHERS | _verbs("worker", "accountability", "sink"), minimum=1),
    EnvVar("CRISISWATCH_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT", "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.",
           verbs=KAFKA_CLIENTS, choices=("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")),
    EnvVar("CRISISWATCH_KAFKA_SASL_MECHANISM", "", "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 when SASL is used.",
           verbs=KAFKA_CLIENTS),
    EnvVar("CRISISWATCH_KAFKA_SASL_USERNAME", "", "SASL user name.",
           verbs=KAFKA_CLIENTS),
    EnvVar("CRISISWATCH_KAFKA_SASL_PASSWORD", "", "SASL password (secret; never logged).",
           verbs=KAFKA_CLIENTS),
    EnvVar("CRISISWATCH_KAFKA_SSL_CAFILE", "", "CA bundle for TLS to the brokers.",
           verbs=KAFKA_CLIENTS),
    EnvVar("CRISISWATCH_KAFKA_PUBLISH_TIMEOUT_S", "2", "Longest wait for Kafka to acknowledge a publish; the API answers 503 after it.",
           verbs=PUBLISHERS, minimum=0.1),
    EnvVar("CRISISWATCH_API_HOST", "127.0.0.1", "Listen address of every port crisiswatch opens (API, worker, sink, dispatcher, feeds).",
           verbs=STACK | _verbs("api", "worker", "accountability", "sink", "dispatch", "feeds", "status")),
    EnvVar("CRISISWATCH_API_PORT", "8080", "Ingest API port.",
           verbs=STACK | _verbs("api", "status"), maximum=65535),
    EnvVar("CRISISWATCH_INGEST_TOKEN", "", "Bearer token for check-ins, citizens and acks. Embedded: generated, kept in the data dir.",
           verbs=STACK | _verbs("api", "token")),
    EnvVar("CRISISWATCH_OPERATOR_TOKEN", "", "Bearer token for declaring crises. Embedded: generated, kept in the data dir.",
           verbs=STACK | _verbs("api", "token")),
    EnvVar("CRISISWATCH_ADMIN_TOKEN", "",
           "Bearer token for the audit log and erasing citizens, and all an operator may. Embedded: generated, kept in the data dir.",
           verbs=STACK | _verbs("api", "token")),
    EnvVar("CRISISWATCH_API_RATE_LIMITS", "ingest:1000,operator:50,admin:20",
           "Requests per second each token may make, by role (bursts of one second's worth); above it 429 with Retry-After.",
           verbs=STACK | _verbs("api"), parse=_rate_limits),
    EnvVar("CRISISWATCH_CORS_ORIGINS", "",
           "Origins (https://host,...) whose pages may call the API from a browser. Empty: none (CORS closed).",
           verbs=STACK | _verbs("api"), parse=_origins),
    EnvVar("CRISISWATCH_CAP_SENDER", "crisiswatch@localhost",
           "The sender of the CAP 1.2 alerts the API publishes (/v1/crises/{id}.cap, /v1/cap.atom), e.g. the ministry's address.",
           verbs=STACK | _verbs("api"), parse=_or_default("crisiswatch@localhost")),
    EnvVar("CRISISWATCH_PUBLIC_URL", "",
           "Base URL citizens reach the API at, for the reply links in messages. Empty: http://<api host>:<api port>.",
           verbs=DISPATCH | _verbs("api"), parse=_public_url),
    EnvVar("CRISISWATCH_REPLY_SECRET", "",
           "Key that signs the reply links in messages (secret; never logged). Embedded: generated, kept in the data dir.",
           verbs=DISPATCH | _verbs("api")),
    EnvVar("CRISISWATCH_REPLY_TTL_S", "604800", "How long a reply link works after the message was sent (seconds).",
           verbs=DISPATCH | _verbs("api"), minimum=60.0),
    EnvVar("CRISISWATCH_MAX_BODY_BYTES", "2000000", "Largest request body the ingest API accepts (413 above).",
           verbs=STACK | _verbs("api"), minimum=1024),
    EnvVar("CRISISWATCH_WORKER_WEB_PORT", "6066", "Worker's HTTP port (/metrics, /health); workers on one host need different ports.",
           verbs=WORKER, maximum=65535),
    EnvVar("CRISISWATCH_ACCOUNTABILITY_WEB_PORT", "6067", "Accountability process's HTTP port (/metrics, /health).",
           verbs=STACK | _verbs("accountability"), maximum=65535),
    EnvVar("CRISISWATCH_SINK_METRICS_PORT", "9102", "Postgres sink's /metrics and /health port.",
           verbs=STACK | _verbs("sink"), maximum=65535),
    EnvVar("CRISISWATCH_DISPATCH_METRICS_PORT", "9104", "Dispatcher's /metrics and /health port.",
           verbs=DISPATCH, maximum=65535),
    EnvVar("CRISISWATCH_WEBHOOK_SECRET", "",
           "Key of the HMAC-SHA256 signature on webhook deliveries (secret; never logged). Empty: unsigned.",
           verbs=DISPATCH),
    EnvVar("CRISISWATCH_WEBHOOK_TIMEOUT_S", "10", "Longest wait for a webhook receiver's answer; a timeout is retried.",
           verbs=DISPATCH, minimum=0.1),
    EnvVar("CRISISWATCH_SMTP_URL", "",
           "Mail relay: smtp://user:pass@host:port?starttls=true or smtps://... (secret). Empty: no email channel.",
           verbs=DISPATCH, parse=_smtp_url),
    EnvVar("CRISISWATCH_MAIL_FROM", "crisiswatch@localhost", "Sender address of warning emails.",
           verbs=DISPATCH),
    EnvVar("CRISISWATCH_APPRISE_SMS_URL", "",
           "Apprise URL for SMS with {address} for the number, e.g. twilio://SID:TOKEN@+1555/{address} (secret).",
           verbs=DISPATCH),
    EnvVar("CRISISWATCH_APPRISE_PUSH_URL", "", "Apprise URL for push with {address} for the device token or user (secret).",
           verbs=DISPATCH),
    EnvVar("CRISISWATCH_DISPATCH_CONCURRENCY", "16",
           "Citizens a dispatcher serves at once within a batch (each citizen's warnings stay in order); 1: one by one.",
           verbs=DISPATCH, minimum=1),
    EnvVar("CRISISWATCH_DISPATCH_MAX_ATTEMPTS", "5",
           "Attempts per channel before the dispatcher falls back to the citizen's next channel.",
           verbs=DISPATCH, minimum=1),
    EnvVar("CRISISWATCH_DISPATCH_RETRY_INITIAL_S", "1", "Wait after a channel's first failed attempt; doubles per attempt, with jitter.",
           verbs=DISPATCH),
    EnvVar("CRISISWATCH_DISPATCH_RETRY_MAX_S", "60", "Longest wait between two attempts on one channel.",
           verbs=DISPATCH),
    EnvVar("CRISISWATCH_RATE_LIMIT_WEBHOOK_PER_S", "0", "Webhook sends per second per dispatcher (0: no limit).",
           verbs=DISPATCH),
    EnvVar("CRISISWATCH_RATE_LIMIT_EMAIL_PER_S", "20", "Emails per second per dispatcher (0: no limit); above it the dispatcher waits.",
           verbs=DISPATCH),
    EnvVar("CRISISWATCH_RATE_LIMIT_SMS_PER_S", "10", "SMS per second per dispatcher (0: no limit); above it the dispatcher waits.",
           verbs=DISPATCH),
    EnvVar("CRISISWATCH_RATE_LIMIT_PUSH_PER_S", "100", "Push notifications per second per dispatcher (0: no limit).",
           verbs=DISPATCH),
    EnvVar("CRISISWATCH_STATUS_INTERVAL_S", "5", "At most one crisis-status per crisis this often (seconds).",
           verbs=STACK | _verbs("accountability")),
    EnvVar("CRISISWATCH_ESCALATION", "extreme:15m,1h;severe:1h,6h;moderate:6h,24h",
           "Per severity: no reply after T1 re-sends through the next channel, after T2 opens a case. Empty: off.",
           verbs=DISPATCH, parse=_escalation),
    EnvVar("CRISISWATCH_ESCALATION_INTERVAL_S", "30", "How often the dispatcher's escalation and pre-arrival sweep runs (seconds).",
           verbs=DISPATCH, minimum=0.01),
    EnvVar("CRISISWATCH_CHECKIN_RETENTION_DAYS", "30", "Days of check-in history kept in PostgreSQL.",
           verbs=STACK | _verbs("sink"), minimum=1),
    EnvVar("CRISISWATCH_DWELL_SECONDS", "120", "How long a citizen must stay outside before 'exited' is sent (anti-flap).",
           verbs=WORKER | _verbs("geofence")),
    EnvVar("CRISISWATCH_HYSTERESIS_M", "50", "Minimum distance beyond the edge before a citizen counts as outside.",
           verbs=WORKER | _verbs("geofence")),
    EnvVar("CRISISWATCH_BATCH_SIZE", "2000", "Largest batch of check-ins geofenced, or of facts folded by accountability.",
           verbs=WORKER | _verbs("accountability", "sink", "dispatch"), minimum=1),
    EnvVar("CRISISWATCH_BATCH_WAIT_S", "0.02", "Longest wait to fill a batch, seconds.",
           verbs=WORKER | _verbs("accountability")),
    EnvVar("CRISISWATCH_CHECKIN_BATCH_RECORDS", "true",
           "The API publishes a request's check-ins as one checkin-batch/1 record per partition; false: one record each.",
           verbs=STACK | _verbs("api")),
    EnvVar("CRISISWATCH_REBALANCE_TIMEOUT_S", "5", "Consumer-group rebalance timeout; short for the embedded broker, 60 on big clusters.",
           verbs=WORKER | _verbs("accountability"), minimum=1.0),
    EnvVar("CRISISWATCH_SESSION_TIMEOUT_S", "6",
           "Group session timeout: the embedded broker holds a first join for half of it; Apache Kafka's minimum is 6.",
           verbs=WORKER | _verbs("accountability"), minimum=1.0),
    EnvVar("CRISISWATCH_PRODUCER_MAX_BATCH_BYTES", "",
           "Largest producer batch per partition of the worker (empty: 16 KiB, the producer's own).",
           verbs=WORKER | _verbs("accountability") | _verbs("restore"), minimum=1),
    EnvVar("CRISISWATCH_DLQ_MAX_PAYLOAD_BYTES", "524288",
           "Largest payload kept in a dead letter; longer ones are cut (size and SHA-256 kept in headers).",
           verbs=WORKER | _verbs("accountability", "sink", "dispatch"), minimum=1024, maximum=DLQ_PAYLOAD_CEILING),
    EnvVar("CRISISWATCH_MAX_FUTURE_SKEW_S", "300", "Check-ins and replies dated more than this many seconds ahead are refused (422, dlq).",
           verbs=STACK | _verbs("api", "replay", "restore")),
    EnvVar("CRISISWATCH_EXERCISE_MODE", "false", "When true, non-Actual alerts (Exercise/Test) reach citizens too.",
           verbs=WORKER | _verbs("geofence", "parse", "feeds")),
    EnvVar("CRISISWATCH_EMBASSY_DIRECTORY", "",
           "TOML file of the missions citizens are told to contact, per country. Empty: the shipped sample (fake numbers).",
           verbs=DISPATCH),
    EnvVar("CRISISWATCH_LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR.",
           choices=("DEBUG", "INFO", "WARNING", "ERROR")),
)


@dataclass(frozen=True, slots=True)
class Settings:
    kafka_bootstrap: str = ""
    database_url: Secret = Secret("")
    data_dir: Path = Path(".crisiswatch")
    partitions: int = 4
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str = ""
    kafka_sasl_username: str = ""
    kafka_sasl_password: Secret = Secret("")
    kafka_ssl_cafile: str = ""
    kafka_publish_timeout_s: float = 2.0
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    ingest_token: Secret = Secret("")
    operator_token: Secret = Secret("")
    admin_token: Secret = Secret("")
    api_rate_limits: str = "ingest:1000,operator:50,admin:20"
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 2_000_000
    public_url: str = ""
    reply_secret: Secret = Secret("")
    reply_ttl_s: float = 604_800.0
    cap_sender: str = "crisiswatch@localhost"
    worker_web_port: int = 6066
    accountability_web_port: int = 6067
    sink_metrics_port: int = 9102
    dispatch_metrics_port: int = 9104
    webhook_secret: Secret = Secret("")
    webhook_timeout_s: float = 10.0
    smtp_url: Secret = Secret("")
    mail_from: str = "crisiswatch@localhost"
    apprise_sms_url: Secret = Secret("")
    apprise_push_url: Secret = Secret("")
    dispatch_concurrency: int = 16
    dispatch_max_attempts: int = 5
    dispatch_retry_initial_s: float = 1.0
    dispatch_retry_max_s: float = 60.0
    rate_limit_webhook_per_s: float = 0.0
    rate_limit_email_per_s: float = 20.0
    rate_limit_sms_per_s: float = 10.0
    rate_limit_push_per_s: float = 100.0
    status_interval_s: float = 5.0
    escalation: str = "extreme:15m,1h;severe:1h,6h;moderate:6h,24h"
    escalation_interval_s: float = 30.0
    checkin_retention_days: int = 30
    dwell_seconds: float = 120.0
    hysteresis_m: float = 50.0
    batch_size: int = 2000
    batch_wait_s: float = 0.02
    checkin_batch_records: bool = True
    rebalance_timeout_s: float = 5.0
    session_timeout_s: float = 6.0
    producer_max_batch_bytes: int | None = None
    dlq_max_payload_bytes: int = 524_288
    max_future_skew_s: float = 300.0
    exercise_mode: bool = False
    embassy_directory: Path | None = None
    log_level: str = "INFO"
    # the variables that were set (not empty) where these settings came from: what a user chose,
    # which `up` never replaces (a busy port) and a running stack's state file never overrides
    configured: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    @property
    def embedded_kafka(self) -> bool:
        return not self.kafka_bootstrap

    @property
    def embedded_database(self) -> bool:
        return not self.database_url

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        e = os.environ if env is None else env
        values = {v.field: _parse(v, e.get(v.name, v.default)) for v in ENV_VARS}
        if values["dispatch_retry_max_s"] < values["dispatch_retry_initial_s"]:
            raise SettingsError(f"CRISISWATCH_DISPATCH_RETRY_MAX_S: must be >= {values['dispatch_retry_initial_s']}, "
                                f"got {values['dispatch_retry_max_s']}")
        return cls(**values, configured=frozenset(v.name for v in ENV_VARS if e.get(v.name, "").strip()))

    def event_rules(self) -> EventRules:
        """The domain's limits on incoming events (see :mod:`pipeline.domain.validation`)."""
        from pipeline.domain.validation import EventRules

        return EventRules(max_future_skew_s=self.max_future_skew_s)

    def rate_limit_per_s(self, channel: str) -> float:
        """The dispatcher's rate limit of a channel type (0: none)."""
        return {"webhook": self.rate_limit_webhook_per_s, "email": self.rate_limit_email_per_s,
                "sms": self.rate_limit_sms_per_s, "push": self.rate_limit_push_per_s}.get(channel, 0.0)

    def kafka_client_options(self) -> dict[str, Any]:
        """Security options in kafka-python's spelling (aiokafka takes the same names)."""
        opts: dict[str, Any] = {"security_protocol": self.kafka_security_protocol}
        if self.kafka_sasl_mechanism:
            opts.update(sasl_mechanism=self.kafka_sasl_mechanism, sasl_plain_username=self.kafka_sasl_username,
                        sasl_plain_password=self.kafka_sasl_password.get())
        if self.kafka_ssl_cafile:
            opts["ssl_cafile"] = self.kafka_ssl_cafile
        return opts

    def env(self) -> dict[str, str]:
        """The environment that rebuilds these settings in a child process."""
        return {v.name: _text(getattr(self, v.field)) for v in ENV_VARS}


def _text(value: Any) -> str:
    if isinstance(value, Secret):
        return value.get()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(value)
    return "" if value is None else str(value)


def _bool(name: str, raw: str) -> bool:
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise SettingsError(f"{name}: expected true/false, got {raw!r}")


def _number(var: EnvVar, raw: str, kind: type[int] | type[float]) -> int | float:
    try:
        value = kind(raw.strip())
    except ValueError:
        raise SettingsError(f"{var.name}: expected {'an integer' if kind is int else 'a number'}, got {raw!r}") from None
    minimum = 0 if var.minimum is None else var.minimum
    if value < minimum:
        raise SettingsError(f"{var.name}: must be >= {kind(minimum)}, got {value}")
    if var.maximum is not None and value > var.maximum:
        raise SettingsError(f"{var.name}: must be <= {kind(var.maximum)}, got {value}")
    return value


def _parse(var: EnvVar, raw: str) -> Any:
    if var.parse is not None:
        return var.parse(var.name, raw)
    if var.choices:
        value = raw.strip().upper()
        if value not in var.choices:
            raise SettingsError(f"{var.name}: expected {'/'.join(var.choices)}, got {raw!r}")
        return value
    kind = _FIELD_TYPES[var.field]
    optional = isinstance(kind, types.UnionType) and type(None) in typing.get_args(kind)
    if optional:
        if not raw.strip():
            return None
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    if kind is bool:
        return _bool(var.name, raw)
    if kind is int or kind is float:
        return _number(var, raw, kind)
    if kind is Secret:
        return Secret(raw.strip())
    if kind is Path:
        return Path(raw.strip())
    if kind is str:
        return raw.strip()
    raise TypeError(f"{var.name}: no parser for a field of type {kind}; give its EnvVar a parse=")


_FIELD_TYPES: dict[str, Any] = {f.name: t for f in fields(Settings)
                                if (t := typing.get_type_hints(Settings)[f.name]) is not None}
