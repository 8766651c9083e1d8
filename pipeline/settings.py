"""One frozen settings object, built once from the environment at the entry point and passed down."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
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


@dataclass(frozen=True, slots=True)
class EnvVar:
    name: str
    default: str
    meaning: str


# The single list of every environment variable: the CLI's --help and the README table come from here.
ENV_VARS: tuple[EnvVar, ...] = (
    EnvVar("CRISISWATCH_KAFKA_BOOTSTRAP", "", "Kafka bootstrap servers (host:port,...). Empty: start the embedded broker."),
    EnvVar("CRISISWATCH_DATABASE_URL", "", "PostgreSQL URL (postgresql://...). Empty: start embedded PostgreSQL."),
    EnvVar("CRISISWATCH_DATA_DIR", ".crisiswatch", "Where the embedded profile keeps PostgreSQL data, worker state, logs."),
    EnvVar("CRISISWATCH_PARTITIONS", "4", "Partitions of each topic created by crisiswatch (scale-out limit)."),
    EnvVar("CRISISWATCH_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT", "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL."),
    EnvVar("CRISISWATCH_KAFKA_SASL_MECHANISM", "", "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 when SASL is used."),
    EnvVar("CRISISWATCH_KAFKA_SASL_USERNAME", "", "SASL user name."),
    EnvVar("CRISISWATCH_KAFKA_SASL_PASSWORD", "", "SASL password (secret; never logged)."),
    EnvVar("CRISISWATCH_KAFKA_SSL_CAFILE", "", "CA bundle for TLS to the brokers."),
    EnvVar("CRISISWATCH_KAFKA_PUBLISH_TIMEOUT_S", "2", "Longest wait for Kafka to acknowledge a publish; the API answers 503 after it."),
    EnvVar("CRISISWATCH_API_HOST", "127.0.0.1", "Ingest API listen address."),
    EnvVar("CRISISWATCH_API_PORT", "8080", "Ingest API port."),
    EnvVar("CRISISWATCH_INGEST_TOKEN", "", "Bearer token for check-ins, citizens and acks. Embedded: generated, kept in the data dir."),
    EnvVar("CRISISWATCH_OPERATOR_TOKEN", "", "Bearer token for declaring crises. Embedded: generated, kept in the data dir."),
    EnvVar("CRISISWATCH_CAP_SENDER", "crisiswatch@localhost",
           "The sender of the CAP 1.2 alerts the API publishes (/v1/crises/{id}.cap, /v1/cap.atom), e.g. the ministry's address."),
    EnvVar("CRISISWATCH_PUBLIC_URL", "",
           "Base URL citizens reach the API at, for the reply links in messages. Empty: http://<api host>:<api port>."),
    EnvVar("CRISISWATCH_REPLY_SECRET", "",
           "Key that signs the reply links in messages (secret; never logged). Embedded: generated, kept in the data dir."),
    EnvVar("CRISISWATCH_REPLY_TTL_S", "604800", "How long a reply link works after the message was sent (seconds)."),
    EnvVar("CRISISWATCH_MAX_BODY_BYTES", "2000000", "Largest request body the ingest API accepts (413 above)."),
    EnvVar("CRISISWATCH_WORKER_WEB_PORT", "6066", "Worker's HTTP port (/metrics, /health); workers on one host need different ports."),
    EnvVar("CRISISWATCH_ACCOUNTABILITY_WEB_PORT", "6067", "Accountability process's HTTP port (/metrics, /health)."),
    EnvVar("CRISISWATCH_SINK_METRICS_PORT", "9102", "Postgres sink's /metrics and /health port."),
    EnvVar("CRISISWATCH_DISPATCH_METRICS_PORT", "9104", "Dispatcher's /metrics and /health port."),
    EnvVar("CRISISWATCH_WEBHOOK_SECRET", "",
           "Key of the HMAC-SHA256 signature on webhook deliveries (secret; never logged). Empty: unsigned."),
    EnvVar("CRISISWATCH_WEBHOOK_TIMEOUT_S", "10", "Longest wait for a webhook receiver's answer; a timeout is retried."),
    EnvVar("CRISISWATCH_SMTP_URL", "",
           "Mail relay: smtp://user:pass@host:port?starttls=true or smtps://... (secret). Empty: no email channel."),
    EnvVar("CRISISWATCH_MAIL_FROM", "crisiswatch@localhost", "Sender address of warning emails."),
    EnvVar("CRISISWATCH_APPRISE_SMS_URL", "",
           "Apprise URL for SMS with {address} for the number, e.g. twilio://SID:TOKEN@+1555/{address} (secret)."),
    EnvVar("CRISISWATCH_APPRISE_PUSH_URL", "", "Apprise URL for push with {address} for the device token or user (secret)."),
    EnvVar("CRISISWATCH_DISPATCH_CONCURRENCY", "16",
           "Citizens a dispatcher serves at once within a batch (each citizen's warnings stay in order); 1: one by one."),
    EnvVar("CRISISWATCH_DISPATCH_MAX_ATTEMPTS", "5",
           "Attempts per channel before the dispatcher falls back to the citizen's next channel."),
    EnvVar("CRISISWATCH_DISPATCH_RETRY_INITIAL_S", "1", "Wait after a channel's first failed attempt; doubles per attempt, with jitter."),
    EnvVar("CRISISWATCH_DISPATCH_RETRY_MAX_S", "60", "Longest wait between two attempts on one channel."),
    EnvVar("CRISISWATCH_RATE_LIMIT_WEBHOOK_PER_S", "0", "Webhook sends per second per dispatcher (0: no limit)."),
    EnvVar("CRISISWATCH_RATE_LIMIT_EMAIL_PER_S", "20", "Emails per second per dispatcher (0: no limit); above it the dispatcher waits."),
    EnvVar("CRISISWATCH_RATE_LIMIT_SMS_PER_S", "10", "SMS per second per dispatcher (0: no limit); above it the dispatcher waits."),
    EnvVar("CRISISWATCH_RATE_LIMIT_PUSH_PER_S", "100", "Push notifications per second per dispatcher (0: no limit)."),
    EnvVar("CRISISWATCH_STATUS_INTERVAL_S", "5", "At most one crisis-status per crisis this often (seconds)."),
    EnvVar("CRISISWATCH_ESCALATION", "extreme:15m,1h;severe:1h,6h;moderate:6h,24h",
           "Per severity: no reply after T1 re-sends through the next channel, after T2 opens a case. Empty: off."),
    EnvVar("CRISISWATCH_ESCALATION_INTERVAL_S", "30", "How often the dispatcher's escalation and pre-arrival sweep runs (seconds)."),
    EnvVar("CRISISWATCH_CHECKIN_RETENTION_DAYS", "30", "Days of check-in history kept in PostgreSQL."),
    EnvVar("CRISISWATCH_DWELL_SECONDS", "120", "How long a citizen must stay outside before 'exited' is sent (anti-flap)."),
    EnvVar("CRISISWATCH_HYSTERESIS_M", "50", "Minimum distance beyond the edge before a citizen counts as outside."),
    EnvVar("CRISISWATCH_BATCH_SIZE", "2000", "Largest batch of check-ins geofenced, or of facts folded by accountability."),
    EnvVar("CRISISWATCH_BATCH_WAIT_S", "0.05", "Longest wait to fill a batch, seconds."),
    EnvVar("CRISISWATCH_REBALANCE_TIMEOUT_S", "5", "Consumer-group rebalance timeout; short for the embedded broker, 60 on big clusters."),
    EnvVar("CRISISWATCH_PRODUCER_MAX_BATCH_BYTES", "", "Worker producer batch size; the embedded stack sets 1 (see README, known limits)."),
    EnvVar("CRISISWATCH_DLQ_MAX_PAYLOAD_BYTES", "524288",
           "Largest payload kept in a dead letter; longer ones are cut (size and SHA-256 kept in headers)."),
    EnvVar("CRISISWATCH_MAX_FUTURE_SKEW_S", "300", "Check-ins and replies dated more than this many seconds ahead are refused (422, dlq)."),
    EnvVar("CRISISWATCH_EXERCISE_MODE", "false", "When true, non-Actual alerts (Exercise/Test) reach citizens too."),
    EnvVar("CRISISWATCH_EMBASSY_DIRECTORY", "",
           "TOML file of the missions citizens are told to contact, per country. Empty: the shipped sample (fake numbers)."),
    EnvVar("CRISISWATCH_LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR."),
)


def _bool(name: str, raw: str) -> bool:
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise SettingsError(f"{name}: expected true/false, got {raw!r}")


def _int(name: str, raw: str, minimum: int = 0) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}: expected an integer, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name}: must be >= {minimum}, got {value}")
    return value


# A dead letter's payload must leave room for its key and headers under the 1,000,000-byte limit of
# Kafka's producers and brokers.
DLQ_PAYLOAD_CEILING = 900_000


def _int_between(name: str, raw: str, minimum: int, maximum: int) -> int:
    value = _int(name, raw, minimum)
    if value > maximum:
        raise SettingsError(f"{name}: must be <= {maximum}, got {value}")
    return value


def _escalation(raw: str) -> str:
    from pipeline.domain.escalation import parse_rules

    try:
        parse_rules(raw)
    except ValueError as exc:
        raise SettingsError(f"CRISISWATCH_ESCALATION: {exc}") from None
    return raw.strip()


def _float(name: str, raw: str, minimum: float = 0.0) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}: expected a number, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name}: must be >= {minimum}, got {value}")
    return value


def _smtp_url(raw: str) -> str:
    """An SMTP URL checked at start (the message never quotes it: it may hold a password)."""
    if raw and not raw.startswith(("smtp://", "smtps://")):
        raise SettingsError("CRISISWATCH_SMTP_URL: expected smtp://[user:pass@]host[:port][?starttls=true] or smtps://...")
    return raw


def _public_url(raw: str) -> str:
    if raw and not raw.startswith(("https://", "http://")):
        raise SettingsError(f"CRISISWATCH_PUBLIC_URL: expected an http(s) URL, got {raw!r}")
    return raw.rstrip("/")


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
    batch_wait_s: float = 0.05
    rebalance_timeout_s: float = 5.0
    producer_max_batch_bytes: int | None = None
    dlq_max_payload_bytes: int = 524_288
    max_future_skew_s: float = 300.0
    exercise_mode: bool = False
    embassy_directory: Path | None = None
    log_level: str = "INFO"

    @property
    def embedded_kafka(self) -> bool:
        return not self.kafka_bootstrap

    @property
    def embedded_database(self) -> bool:
        return not self.database_url

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        e = dict(os.environ if env is None else env)

        def get(name: str) -> str:
            return next(v.default for v in ENV_VARS if v.name == name) if name not in e else e[name]

        level = get("CRISISWATCH_LOG_LEVEL").upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise SettingsError(f"CRISISWATCH_LOG_LEVEL: expected DEBUG/INFO/WARNING/ERROR, got {level!r}")
        protocol = get("CRISISWATCH_KAFKA_SECURITY_PROTOCOL").upper()
        if protocol not in ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"):
            raise SettingsError(f"CRISISWATCH_KAFKA_SECURITY_PROTOCOL: unknown protocol {protocol!r}")
        return cls(
            kafka_bootstrap=get("CRISISWATCH_KAFKA_BOOTSTRAP").strip(),
            database_url=Secret(get("CRISISWATCH_DATABASE_URL").strip()),
            data_dir=Path(get("CRISISWATCH_DATA_DIR")),
            partitions=_int("CRISISWATCH_PARTITIONS", get("CRISISWATCH_PARTITIONS"), 1),
            kafka_security_protocol=protocol,
            kafka_sasl_mechanism=get("CRISISWATCH_KAFKA_SASL_MECHANISM"),
            kafka_sasl_username=get("CRISISWATCH_KAFKA_SASL_USERNAME"),
            kafka_sasl_password=Secret(get("CRISISWATCH_KAFKA_SASL_PASSWORD")),
            kafka_ssl_cafile=get("CRISISWATCH_KAFKA_SSL_CAFILE"),
            kafka_publish_timeout_s=_float("CRISISWATCH_KAFKA_PUBLISH_TIMEOUT_S", get("CRISISWATCH_KAFKA_PUBLISH_TIMEOUT_S"), 0.1),
            api_host=get("CRISISWATCH_API_HOST"),
            api_port=_int("CRISISWATCH_API_PORT", get("CRISISWATCH_API_PORT")),
            ingest_token=Secret(get("CRISISWATCH_INGEST_TOKEN")),
            operator_token=Secret(get("CRISISWATCH_OPERATOR_TOKEN")),
            cap_sender=get("CRISISWATCH_CAP_SENDER").strip() or "crisiswatch@localhost",
            public_url=_public_url(get("CRISISWATCH_PUBLIC_URL").strip()),
            reply_secret=Secret(get("CRISISWATCH_REPLY_SECRET")),
            reply_ttl_s=_float("CRISISWATCH_REPLY_TTL_S", get("CRISISWATCH_REPLY_TTL_S"), 60.0),
            max_body_bytes=_int("CRISISWATCH_MAX_BODY_BYTES", get("CRISISWATCH_MAX_BODY_BYTES"), 1024),
            worker_web_port=_int("CRISISWATCH_WORKER_WEB_PORT", get("CRISISWATCH_WORKER_WEB_PORT")),
            accountability_web_port=_int("CRISISWATCH_ACCOUNTABILITY_WEB_PORT", get("CRISISWATCH_ACCOUNTABILITY_WEB_PORT")),
            sink_metrics_port=_int("CRISISWATCH_SINK_METRICS_PORT", get("CRISISWATCH_SINK_METRICS_PORT")),
            dispatch_metrics_port=_int("CRISISWATCH_DISPATCH_METRICS_PORT", get("CRISISWATCH_DISPATCH_METRICS_PORT")),
            webhook_secret=Secret(get("CRISISWATCH_WEBHOOK_SECRET")),
            webhook_timeout_s=_float("CRISISWATCH_WEBHOOK_TIMEOUT_S", get("CRISISWATCH_WEBHOOK_TIMEOUT_S"), 0.1),
            smtp_url=Secret(_smtp_url(get("CRISISWATCH_SMTP_URL").strip())),
            mail_from=get("CRISISWATCH_MAIL_FROM").strip(),
            apprise_sms_url=Secret(get("CRISISWATCH_APPRISE_SMS_URL").strip()),
            apprise_push_url=Secret(get("CRISISWATCH_APPRISE_PUSH_URL").strip()),
            dispatch_concurrency=_int("CRISISWATCH_DISPATCH_CONCURRENCY", get("CRISISWATCH_DISPATCH_CONCURRENCY"), 1),
            dispatch_max_attempts=_int("CRISISWATCH_DISPATCH_MAX_ATTEMPTS", get("CRISISWATCH_DISPATCH_MAX_ATTEMPTS"), 1),
            dispatch_retry_initial_s=(retry_initial := _float("CRISISWATCH_DISPATCH_RETRY_INITIAL_S",
                                                              get("CRISISWATCH_DISPATCH_RETRY_INITIAL_S"))),
            dispatch_retry_max_s=_float("CRISISWATCH_DISPATCH_RETRY_MAX_S", get("CRISISWATCH_DISPATCH_RETRY_MAX_S"), retry_initial),
            rate_limit_webhook_per_s=_float("CRISISWATCH_RATE_LIMIT_WEBHOOK_PER_S", get("CRISISWATCH_RATE_LIMIT_WEBHOOK_PER_S")),
            rate_limit_email_per_s=_float("CRISISWATCH_RATE_LIMIT_EMAIL_PER_S", get("CRISISWATCH_RATE_LIMIT_EMAIL_PER_S")),
            rate_limit_sms_per_s=_float("CRISISWATCH_RATE_LIMIT_SMS_PER_S", get("CRISISWATCH_RATE_LIMIT_SMS_PER_S")),
            rate_limit_push_per_s=_float("CRISISWATCH_RATE_LIMIT_PUSH_PER_S", get("CRISISWATCH_RATE_LIMIT_PUSH_PER_S")),
            status_interval_s=_float("CRISISWATCH_STATUS_INTERVAL_S", get("CRISISWATCH_STATUS_INTERVAL_S")),
            escalation=_escalation(get("CRISISWATCH_ESCALATION")),
            escalation_interval_s=_float("CRISISWATCH_ESCALATION_INTERVAL_S", get("CRISISWATCH_ESCALATION_INTERVAL_S"), 0.01),
            checkin_retention_days=_int("CRISISWATCH_CHECKIN_RETENTION_DAYS", get("CRISISWATCH_CHECKIN_RETENTION_DAYS"), 1),
            dwell_seconds=_float("CRISISWATCH_DWELL_SECONDS", get("CRISISWATCH_DWELL_SECONDS")),
            hysteresis_m=_float("CRISISWATCH_HYSTERESIS_M", get("CRISISWATCH_HYSTERESIS_M")),
            batch_size=_int("CRISISWATCH_BATCH_SIZE", get("CRISISWATCH_BATCH_SIZE"), 1),
            batch_wait_s=_float("CRISISWATCH_BATCH_WAIT_S", get("CRISISWATCH_BATCH_WAIT_S")),
            rebalance_timeout_s=_float("CRISISWATCH_REBALANCE_TIMEOUT_S", get("CRISISWATCH_REBALANCE_TIMEOUT_S"), 1.0),
            producer_max_batch_bytes=(_int("CRISISWATCH_PRODUCER_MAX_BATCH_BYTES", raw_batch, 1)
                                      if (raw_batch := get("CRISISWATCH_PRODUCER_MAX_BATCH_BYTES").strip()) else None),
            dlq_max_payload_bytes=_int_between("CRISISWATCH_DLQ_MAX_PAYLOAD_BYTES",
                                               get("CRISISWATCH_DLQ_MAX_PAYLOAD_BYTES"), 1024, DLQ_PAYLOAD_CEILING),
            max_future_skew_s=_float("CRISISWATCH_MAX_FUTURE_SKEW_S", get("CRISISWATCH_MAX_FUTURE_SKEW_S")),
            exercise_mode=_bool("CRISISWATCH_EXERCISE_MODE", get("CRISISWATCH_EXERCISE_MODE")),
            embassy_directory=Path(raw_embassies) if (raw_embassies := get("CRISISWATCH_EMBASSY_DIRECTORY").strip()) else None,
            log_level=level,
        )

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
        return {
            "CRISISWATCH_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "CRISISWATCH_DATABASE_URL": self.database_url.get(),
            "CRISISWATCH_DATA_DIR": str(self.data_dir),
            "CRISISWATCH_PARTITIONS": str(self.partitions),
            "CRISISWATCH_KAFKA_SECURITY_PROTOCOL": self.kafka_security_protocol,
            "CRISISWATCH_KAFKA_SASL_MECHANISM": self.kafka_sasl_mechanism,
            "CRISISWATCH_KAFKA_SASL_USERNAME": self.kafka_sasl_username,
            "CRISISWATCH_KAFKA_SASL_PASSWORD": self.kafka_sasl_password.get(),
            "CRISISWATCH_KAFKA_SSL_CAFILE": self.kafka_ssl_cafile,
            "CRISISWATCH_KAFKA_PUBLISH_TIMEOUT_S": str(self.kafka_publish_timeout_s),
            "CRISISWATCH_API_HOST": self.api_host,
            "CRISISWATCH_API_PORT": str(self.api_port),
            "CRISISWATCH_INGEST_TOKEN": self.ingest_token.get(),
            "CRISISWATCH_OPERATOR_TOKEN": self.operator_token.get(),
            "CRISISWATCH_MAX_BODY_BYTES": str(self.max_body_bytes),
            "CRISISWATCH_PUBLIC_URL": self.public_url,
            "CRISISWATCH_REPLY_SECRET": self.reply_secret.get(),
            "CRISISWATCH_REPLY_TTL_S": str(self.reply_ttl_s),
            "CRISISWATCH_CAP_SENDER": self.cap_sender,
            "CRISISWATCH_WORKER_WEB_PORT": str(self.worker_web_port),
            "CRISISWATCH_ACCOUNTABILITY_WEB_PORT": str(self.accountability_web_port),
            "CRISISWATCH_SINK_METRICS_PORT": str(self.sink_metrics_port),
            "CRISISWATCH_DISPATCH_METRICS_PORT": str(self.dispatch_metrics_port),
            "CRISISWATCH_WEBHOOK_SECRET": self.webhook_secret.get(),
            "CRISISWATCH_WEBHOOK_TIMEOUT_S": str(self.webhook_timeout_s),
            "CRISISWATCH_SMTP_URL": self.smtp_url.get(),
            "CRISISWATCH_MAIL_FROM": self.mail_from,
            "CRISISWATCH_APPRISE_SMS_URL": self.apprise_sms_url.get(),
            "CRISISWATCH_APPRISE_PUSH_URL": self.apprise_push_url.get(),
            "CRISISWATCH_DISPATCH_CONCURRENCY": str(self.dispatch_concurrency),
            "CRISISWATCH_DISPATCH_MAX_ATTEMPTS": str(self.dispatch_max_attempts),
            "CRISISWATCH_DISPATCH_RETRY_INITIAL_S": str(self.dispatch_retry_initial_s),
            "CRISISWATCH_DISPATCH_RETRY_MAX_S": str(self.dispatch_retry_max_s),
            "CRISISWATCH_RATE_LIMIT_WEBHOOK_PER_S": str(self.rate_limit_webhook_per_s),
            "CRISISWATCH_RATE_LIMIT_EMAIL_PER_S": str(self.rate_limit_email_per_s),
            "CRISISWATCH_RATE_LIMIT_SMS_PER_S": str(self.rate_limit_sms_per_s),
            "CRISISWATCH_RATE_LIMIT_PUSH_PER_S": str(self.rate_limit_push_per_s),
            "CRISISWATCH_STATUS_INTERVAL_S": str(self.status_interval_s),
            "CRISISWATCH_ESCALATION": self.escalation,
            "CRISISWATCH_ESCALATION_INTERVAL_S": str(self.escalation_interval_s),
            "CRISISWATCH_CHECKIN_RETENTION_DAYS": str(self.checkin_retention_days),
            "CRISISWATCH_DWELL_SECONDS": str(self.dwell_seconds),
            "CRISISWATCH_HYSTERESIS_M": str(self.hysteresis_m),
            "CRISISWATCH_BATCH_SIZE": str(self.batch_size),
            "CRISISWATCH_BATCH_WAIT_S": str(self.batch_wait_s),
            "CRISISWATCH_REBALANCE_TIMEOUT_S": str(self.rebalance_timeout_s),
            "CRISISWATCH_PRODUCER_MAX_BATCH_BYTES": str(self.producer_max_batch_bytes or ""),
            "CRISISWATCH_DLQ_MAX_PAYLOAD_BYTES": str(self.dlq_max_payload_bytes),
            "CRISISWATCH_MAX_FUTURE_SKEW_S": str(self.max_future_skew_s),
            "CRISISWATCH_EXERCISE_MODE": "true" if self.exercise_mode else "false",
            "CRISISWATCH_EMBASSY_DIRECTORY": "" if self.embassy_directory is None else str(self.embassy_directory),
            "CRISISWATCH_LOG_LEVEL": self.log_level,
        }
