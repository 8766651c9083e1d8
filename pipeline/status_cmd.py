"""``crisiswatch status``: what the running stack is made of, where each part answers, and whether it
is healthy, asked of each part itself (its ``/health``; the broker with a metadata request, PostgreSQL
with ``SELECT 1``). The stack is the one ``crisiswatch up`` runs on the data directory (its state
file, :mod:`pipeline.state_file`), else the one the environment configures.

Exit 0 when every part is healthy, 1 when one is not or nothing runs: a script or a probe can use it.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Final

from pipeline.settings import Settings
from pipeline.state_file import Part, StackState, client_settings, no_stack, redact_url, state_path

HTTP_TIMEOUT_S: Final = 3.0


@dataclass(frozen=True, slots=True)
class Health:
    name: str
    where: str
    healthy: bool
    detail: str  # "healthy", or what is wrong
    pid: int | None = None
    log: str = ""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object (parts, their health, the files)")


def http_health(url: str, timeout_s: float = HTTP_TIMEOUT_S) -> tuple[bool, str]:
    """Whether ``url`` (a ``/health``) answers 200, and if not, what it said or why it did not answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - a URL of our own stack
            return response.status == 200, "healthy" if response.status == 200 else f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        body = exc.read(300).decode("utf-8", "replace")
        try:
            down = json.loads(body).get("down") or {}
        except (ValueError, AttributeError):
            down = {}
        because = "; ".join(f"{k}: {v}" for k, v in down.items()) if isinstance(down, dict) else ""
        return False, f"unhealthy (HTTP {exc.code}{': ' + because if because else ''})"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"down ({reason})"


def _dependency(check: Callable[[], None]) -> tuple[bool, str]:
    from pipeline.health import describe

    try:
        check()
    except Exception as exc:  # anything: the dependency did not answer
        return False, f"down ({describe(exc)})"
    return True, "healthy"


def _parts_from_settings(settings: Settings) -> list[Part]:
    """Where the parts of a stack the environment configures answer, by the configured ports."""
    host = settings.api_host
    ports = {"ingest API": settings.api_port, "worker": settings.worker_web_port, "sink": settings.sink_metrics_port,
             "dispatch": settings.dispatch_metrics_port}
    return [Part("kafka", settings.kafka_bootstrap, None, None, ""),
            Part("postgresql", settings.database_url.get(), None, None, ""),
            *(Part(name, f"http://{host}:{port}", f"http://{host}:{port}/health", None, "")
              for name, port in ports.items())]


def check_parts(settings: Settings, parts: Sequence[Part]) -> list[Health]:
    """Ask every part at once; one slow part costs its own timeout, not the sum."""
    from pipeline.health import kafka_check, postgresql_check

    def ask(part: Part) -> Health:
        if part.name == "kafka":
            ok, detail = _dependency(kafka_check(settings)) if settings.kafka_bootstrap else (False, "not configured")
        elif part.name == "postgresql":
            ok, detail = (_dependency(postgresql_check(settings.database_url.get())) if settings.database_url
                          else (False, "not configured"))
        elif part.health_url:
            ok, detail = http_health(part.health_url)
        else:
            ok, detail = False, "no health endpoint"
        return Health(part.name, part.url, ok, detail, part.pid, part.log)

    with ThreadPoolExecutor(max_workers=max(1, len(parts))) as pool:
        return list(pool.map(ask, parts))


def _shown_where(health: Health, state: StackState | None) -> str:
    if health.name == "kafka" and state is not None and state.kafka_embedded:
        return f"{health.where} (embedded)"
    if health.name == "postgresql":
        return redact_url(health.where) + (" (embedded)" if state is not None and state.database_embedded else "")
    return health.where


def report_lines(settings: Settings, state: StackState | None, healths: Sequence[Health]) -> list[str]:
    where = settings.data_dir.resolve()
    head = (f"crisiswatch stack on {where} (crisiswatch up, pid {state.pid})" if state is not None
            else "crisiswatch stack configured by the environment")
    width = max(len(_shown_where(h, state)) for h in healths)
    lines = [head, ""]
    lines += [f"  {h.name:<12} {_shown_where(h, state):<{width}}  {h.detail}" for h in healths]
    lines.append("")
    if state is not None:
        lines.append(f"  state file   {state_path(where)}")
        if state.tokens_file:
            lines.append(f"  tokens       {state.tokens_file}   (print one: crisiswatch token ingest|operator)")
        lines.append(f"  logs         {where / 'logs'}/")
    lines.append("  database     crisiswatch psql   (psql on the stack's database)")
    down = [h.name for h in healths if not h.healthy]
    lines += ["", f"not healthy: {', '.join(down)}" if down else "all healthy"]
    return lines


def run(args: argparse.Namespace) -> int:
    settings, state = client_settings()
    if state is None and not (settings.kafka_bootstrap or settings.database_url):
        print(f"crisiswatch status: {no_stack(settings)}", file=sys.stderr)
        return 1
    parts = list(state.parts) if state is not None else _parts_from_settings(settings)
    healths = check_parts(settings, parts)
    healthy = all(h.healthy for h in healths)
    if args.json:
        document: dict[str, Any] = {"healthy": healthy, "data_dir": str(settings.data_dir.resolve()),
                                    "up_pid": None if state is None else state.pid,
                                    "tokens_file": None if state is None else state.tokens_file,
                                    "parts": [{**asdict(h), "where": _shown_where(h, state)} for h in healths]}
        print(json.dumps(document, indent=2))
    else:
        print("\n".join(report_lines(settings, state, healths)))
    return 0 if healthy else 1
