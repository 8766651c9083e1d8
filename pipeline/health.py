"""Whether this process's broker and database answer, known within seconds: the one probe behind
every long-running process's ``/health``.

Why a probe of its own: the clients a process already has do not say. kafka-python's ``poll()``
returns nothing, without raising, while the broker is down; aiokafka and Faust retry quietly; a sink
that has nothing to write never touches PostgreSQL. So each dependency is asked directly, on a
background thread: Kafka with a metadata request from a fresh client (aiokafka's bootstrap:
connect, ApiVersions, Metadata), PostgreSQL with ``SELECT 1`` on a fresh connection, each bounded by
a short timeout. ``/health`` reads the cached answer and never waits on a dependency that is away.

Per dependency: unknown until the first check; down at the first failure when nothing is known
yet, else after ``failures_to_down`` failures in a row (one slow answer from a busy broker does not
flip ``/health``); up again at the first success. A last check older than ``stale_after_s`` counts as
down too: the probe itself is stuck, and nothing is known. The state is also the gauge
``crisiswatch_dependency_up{dependency}``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

from prometheus_client import CollectorRegistry

from pipeline.metrics import DependencyMetrics
from pipeline.settings import Settings

log = logging.getLogger(__name__)

Check = Callable[[], None]
"""Asks a dependency once; returns if it answered, raises (anything) if it did not."""

KAFKA: Final = "kafka"
POSTGRESQL: Final = "postgresql"

CHECK_INTERVAL_S: Final = 1.0
CHECK_TIMEOUT_S: Final = 2.0
FAILURES_TO_DOWN: Final = 2
STALE_AFTER_S: Final = 15.0
_REASON_CHARS: Final = 300


@dataclass(frozen=True, slots=True)
class Dependency:
    """What is known of one dependency. ``up`` is None until the first check."""

    name: str
    up: bool | None = None
    reason: str = "not checked yet"
    failures: int = 0  # checks failed in a row
    checked_at: float | None = None
    changed_at: float | None = None


def after_check(dep: Dependency, error: str | None, now: float, failures_to_down: int = FAILURES_TO_DOWN) -> Dependency:
    """The state after one check that succeeded (``error`` None) or failed with ``error``. Pure."""
    if error is None:
        return replace(dep, up=True, reason="", failures=0, checked_at=now,
                       changed_at=dep.changed_at if dep.up is True else now)
    failures = dep.failures + 1
    if dep.up is True and failures < failures_to_down:
        return replace(dep, failures=failures, checked_at=now)  # still up: one miss is not an outage
    return replace(dep, up=False, reason=error, failures=failures, checked_at=now,
                   changed_at=dep.changed_at if dep.up is False else now)


def as_seen(dep: Dependency, now: float, stale_after_s: float = STALE_AFTER_S) -> Dependency:
    """``dep`` as of ``now``: a last check older than ``stale_after_s`` means nothing is known. Pure."""
    if dep.checked_at is not None and now - dep.checked_at > stale_after_s:
        return replace(dep, up=False, reason=f"no answer from the health probe for {now - dep.checked_at:.0f}s")
    return dep


def describe(exc: BaseException) -> str:
    """One short line for a failed check: exception type and the first line of its message."""
    name = type(exc).__name__
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines else ""
    return (first if first.startswith(name) else f"{name}: {first}" if first else name)[:_REASON_CHARS]


class HealthProbe:
    """Checks each dependency every ``interval_s`` on a daemon thread and keeps the answers.

    ``checks`` maps a dependency's name (``kafka``, ``postgresql``) to its :data:`Check`. Nothing
    here does I/O but the checks, so a test drives :meth:`check_now` with fake checks and a fake clock.
    """

    def __init__(self, checks: Mapping[str, Check], *, interval_s: float = CHECK_INTERVAL_S,
                 failures_to_down: int = FAILURES_TO_DOWN, stale_after_s: float = STALE_AFTER_S,
                 clock: Callable[[], float] = time.monotonic, registry: CollectorRegistry | None = None) -> None:
        if not checks:
            raise ValueError("a health probe needs at least one check")
        self.checks = dict(checks)
        self.interval_s = interval_s
        self.failures_to_down = failures_to_down
        self.stale_after_s = stale_after_s
        self.clock = clock
        self._lock = threading.Lock()
        self._deps = {name: Dependency(name) for name in self.checks}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if registry is not None:
            gauge = DependencyMetrics(registry).up
            for name in self.checks:
                gauge.labels(dependency=name).set_function(self._is_up(name))

    # -- checking --------------------------------------------------------------------------------
    def check_now(self) -> None:
        """Run every check once and record the answers; log a line when a dependency goes down or comes back."""
        for name, check in self.checks.items():
            try:
                check()
                error = None
            except Exception as exc:  # any failure to answer is the dependency's state, not the probe's
                error = describe(exc)
            now = self.clock()
            with self._lock:
                before = self._deps[name]
                after = after_check(before, error, now, self.failures_to_down)
                self._deps[name] = after
            if after.up is False and before.up is not False:
                log.warning("%s unreachable: %s", name, after.reason, extra={"dependency": name})
            elif after.up is True and before.up is False:
                down_s = now - before.changed_at if before.changed_at is not None else 0.0
                log.info("%s reachable again after %.0fs", name, down_s, extra={"dependency": name})

    def start(self) -> HealthProbe:
        """Check now and then every ``interval_s`` on a daemon thread, until :meth:`stop`."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="health-probe", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * CHECK_TIMEOUT_S * len(self.checks) + 1)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.check_now()
            self._stop.wait(self.interval_s)

    # -- reading ---------------------------------------------------------------------------------
    def _is_up(self, name: str) -> Callable[[], float]:
        return lambda: 1.0 if self._seen(name).up else 0.0

    def _seen(self, name: str) -> Dependency:
        with self._lock:
            dep = self._deps[name]
        return as_seen(dep, self.clock(), self.stale_after_s)

    def dependencies(self) -> dict[str, Dependency]:
        return {name: self._seen(name) for name in self.checks}

    def down(self) -> dict[str, str]:
        """Every dependency not known to be up, with the reason."""
        return {name: dep.reason for name, dep in self.dependencies().items() if dep.up is not True}

    def healthy(self) -> bool:
        return not self.down()

    def report(self, ready: bool = True, **details: Any) -> tuple[int, dict[str, Any]]:
        """The ``/health`` answer: 200 when ``ready`` and every dependency is up, else 503; the body
        names each dependency's state and, under ``down``, the ones that are not up."""
        deps = self.dependencies()
        down = sorted(name for name, dep in deps.items() if dep.up is not True)
        ok = ready and not down
        body: dict[str, Any] = {"status": "ok" if ok else ("unavailable" if down else "unhealthy"), **details,
                                "dependencies": {name: "up" if dep.up else f"down: {dep.reason}"
                                                 for name, dep in deps.items()}}
        if down:
            body["down"] = down
        return (200 if ok else 503), body


# -- the checks ------------------------------------------------------------------------------------


def _aiokafka_options(settings: Settings) -> dict[str, Any]:
    """The security settings in aiokafka's spelling (a TLS context instead of a CA file)."""
    opts: dict[str, Any] = {"security_protocol": settings.kafka_security_protocol}
    if settings.kafka_sasl_mechanism:
        opts.update(sasl_mechanism=settings.kafka_sasl_mechanism, sasl_plain_username=settings.kafka_sasl_username,
                    sasl_plain_password=settings.kafka_sasl_password.get())
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context

        opts["ssl_context"] = create_ssl_context(cafile=settings.kafka_ssl_cafile or None)
    return opts


def kafka_check(settings: Settings, timeout_s: float = CHECK_TIMEOUT_S) -> Check:
    """A metadata request to the cluster from a fresh aiokafka client, within ``timeout_s``."""
    import asyncio

    from aiokafka.client import AIOKafkaClient

    bootstrap = settings.kafka_bootstrap
    options = _aiokafka_options(settings)

    async def ask() -> None:
        client = AIOKafkaClient(bootstrap_servers=bootstrap, client_id="crisiswatch-health",
                                request_timeout_ms=int(timeout_s * 1000), **options)
        try:
            await asyncio.wait_for(client.bootstrap(), timeout_s)
        finally:
            await client.close()

    def check() -> None:
        asyncio.run(ask())

    return check


def postgresql_check(database_url: str, timeout_s: float = CHECK_TIMEOUT_S) -> Check:
    """``SELECT 1`` on a fresh connection; libpq's connect timeout counts whole seconds, at least 2."""

    def check() -> None:
        import psycopg

        with psycopg.connect(database_url, autocommit=True, connect_timeout=max(2, math.ceil(timeout_s)),
                             application_name="crisiswatch-health") as conn:
            conn.execute("SELECT 1")

    return check


def probe_for(settings: Settings, *, kafka: bool = True, postgresql: bool = False,
              registry: CollectorRegistry | None = None, **kwargs: Any) -> HealthProbe:
    """The probe of a process that uses Kafka and/or PostgreSQL as ``settings`` configure them (not started)."""
    checks: dict[str, Check] = {}
    if kafka:
        checks[KAFKA] = kafka_check(settings)
    if postgresql:
        checks[POSTGRESQL] = postgresql_check(settings.database_url.get())
    return HealthProbe(checks, registry=registry, **kwargs)
