"""Where the running stack is: ``crisiswatch up`` writes what it started into ``<data dir>/stack.json``,
and the verbs that talk to it (``tail``, ``simulate``, ``replay``, ``status``, ``token``) read it when
nothing is configured, so a user never has to copy a random port out of the banner.

The file is a convenience, never an authority: a variable set in the environment (or a flag) always
wins over it, and a file left behind by an ``up`` that was killed is recognised (its process is
gone, or another process now has its pid) and ignored. It is written whole or not at all, readable by
its owner only (it holds the database URL), rewritten when a part restarts with a new pid, and removed
by an orderly stop.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from pipeline.settings import Secret, Settings

STATE_FILE: Final = "stack.json"
FORMAT: Final = 1

# What a client needs to find the stack: addresses and ports, never tuning.
WHERE: Final = ("CRISISWATCH_KAFKA_BOOTSTRAP", "CRISISWATCH_DATABASE_URL", "CRISISWATCH_PARTITIONS",
                "CRISISWATCH_API_HOST", "CRISISWATCH_API_PORT", "CRISISWATCH_WORKER_WEB_PORT",
                "CRISISWATCH_SINK_METRICS_PORT", "CRISISWATCH_DISPATCH_METRICS_PORT")


class StateFileError(ValueError):
    """The state file exists but cannot be read; the message names it."""


@dataclass(frozen=True, slots=True)
class Part:
    """One process of the stack: its name, where it answers, its pid and its log."""

    name: str
    url: str  # base URL (http://host:port) or, for the servers, their address
    health_url: str | None
    pid: int | None
    log: str


@dataclass(frozen=True, slots=True)
class StackState:
    pid: int  # the `crisiswatch up` (or demo) process
    started: float  # its start time as the kernel has it (psutil), which tells a reused pid apart
    data_dir: str
    settings: dict[str, str]  # the WHERE variables the stack runs with
    kafka_embedded: bool
    database_embedded: bool
    tokens_file: str | None
    parts: tuple[Part, ...] = ()
    chosen_ports: dict[str, list[int]] = field(default_factory=dict)  # variable -> [wanted, chosen]

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **asdict(self)}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> StackState:
        raw = json.loads(text)
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ValueError(f"expected a stack state of format {FORMAT}")
        parts = tuple(Part(**p) for p in raw.get("parts", ()))
        return cls(pid=int(raw["pid"]), started=float(raw["started"]), data_dir=str(raw["data_dir"]),
                   settings={str(k): str(v) for k, v in raw["settings"].items()},
                   kafka_embedded=bool(raw["kafka_embedded"]), database_embedded=bool(raw["database_embedded"]),
                   tokens_file=raw.get("tokens_file"), parts=parts,
                   chosen_ports={str(k): [int(x) for x in v] for k, v in raw.get("chosen_ports", {}).items()})

    def running(self) -> bool:
        """Whether the process that wrote it still runs (not just a process with its pid)."""
        return process_start(self.pid) == self.started

    def setting(self, name: str) -> str:
        return self.settings.get(name, "")


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, for a banner or a report."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in creds else url
    return url


def state_path(data_dir: Path) -> Path:
    return data_dir / STATE_FILE


def process_start(pid: int) -> float | None:
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.Error, ValueError):
        return None


def describe(settings: Settings, parts: Sequence[Part], *, kafka_embedded: bool, database_embedded: bool,
             tokens_file: Path | None, chosen_ports: Mapping[str, tuple[int, int]]) -> StackState:
    """The state of a stack running with ``settings`` in this process."""
    env = settings.env()
    return StackState(pid=os.getpid(), started=process_start(os.getpid()) or 0.0,
                      data_dir=str(settings.data_dir.resolve()), settings={k: env[k] for k in WHERE},
                      kafka_embedded=kafka_embedded, database_embedded=database_embedded,
                      tokens_file=None if tokens_file is None else str(tokens_file.resolve()), parts=tuple(parts),
                      chosen_ports={k: list(v) for k, v in chosen_ports.items()})


def write(state: StackState, data_dir: Path) -> Path:
    """Write ``state`` to the data directory's state file, mode 0600 from the first byte, atomically."""
    path = state_path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(state.to_json())
        os.chmod(temporary, 0o600)  # O_CREAT's mode is masked by the umask, never widened
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def remove(data_dir: Path) -> None:
    """Forget the stack this process wrote (an orderly stop); a file another ``up`` wrote stays."""
    path = state_path(data_dir)
    try:
        state = read(data_dir)
    except StateFileError:
        return
    if state is not None and state.pid == os.getpid():
        path.unlink(missing_ok=True)


def read(data_dir: Path) -> StackState | None:
    """The state file in ``data_dir`` as written, running or not; None when there is none."""
    path = state_path(data_dir)
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateFileError(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        return StackState.from_json(text)
    except (ValueError, KeyError, TypeError) as exc:
        raise StateFileError(f"{path}: not a crisiswatch stack state ({exc})") from None


def running_stack(data_dir: Path) -> StackState | None:
    """The stack running on ``data_dir``; None when none runs (no file, or one an ``up`` left behind)."""
    try:
        state = read(data_dir)
    except StateFileError:
        return None
    return state if state is not None and state.running() else None


def kept_tokens(state: StackState) -> dict[str, str]:
    """The tokens ``up`` generated and keeps in the data directory (none when both were configured)."""
    if state.tokens_file is None:
        return {}
    try:
        raw: Any = json.loads(Path(state.tokens_file).read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(raw, dict) else {}


def with_running_stack(settings: Settings) -> tuple[Settings, StackState | None]:
    """``settings`` completed from the stack running on their data directory: every address, port and
    token the user did not set comes from it. Unchanged, with None, when no stack runs there."""
    state = running_stack(settings.data_dir)
    if state is None:
        return settings, None
    env = settings.env()
    for name in WHERE:
        if name not in settings.configured and state.setting(name):
            env[name] = state.setting(name)
    completed = Settings.from_env(env)
    tokens = kept_tokens(state)
    completed = replace(completed, configured=settings.configured,
                        ingest_token=settings.ingest_token or Secret(tokens.get("ingest", "")),
                        operator_token=settings.operator_token or Secret(tokens.get("operator", "")))
    return completed, state


def client_settings(env: Mapping[str, str] | None = None) -> tuple[Settings, StackState | None]:
    """The settings of a verb that talks to a running stack: the environment, completed from the state
    file of a stack running on its data directory."""
    return with_running_stack(Settings.from_env(env))


def no_stack(settings: Settings) -> str:
    """Why a client found nothing to talk to, and what to do, in one line."""
    where = settings.data_dir.resolve()
    try:
        left = read(settings.data_dir)
    except StateFileError as exc:
        return f"no running stack found: {exc}"
    gone = f" (the `crisiswatch up` that wrote {state_path(where)} is gone)" if left is not None else ""
    return (f"no stack runs on {where}{gone}: start one with `crisiswatch up` (from this directory, or set "
            "CRISISWATCH_DATA_DIR to its data directory), or set CRISISWATCH_KAFKA_BOOTSTRAP")
