"""``crisiswatch up`` as a user runs it: the banner tells where things are and the tokens; the API
takes a check-in; SIGTERM stops everything, children included; killing ``up`` outright takes the
broker and the processes down with it (PostgreSQL, a server with its data directory, is picked up
again by the next ``up``, and so are the tokens). A killed broker, database or child is started
again with a line saying so; a child that keeps dying stops ``up`` with one line naming it."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from consumers.kafka_io import read_topic
from pipeline.embedded import free_port
from pipeline.observability import read_metric
from schemas import Warning, decode
from tests.stack_helpers import banner_token, bare_env, start_up

pytestmark = pytest.mark.e2e


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Up:
    def __init__(self, data_dir: Path) -> None:
        # ports of its own: other stacks on this machine may come and go on the default ones
        env = bare_env(CRISISWATCH_DATA_DIR=str(data_dir), CRISISWATCH_API_PORT=str(free_port()),
                       CRISISWATCH_WORKER_WEB_PORT=str(free_port()), CRISISWATCH_SINK_METRICS_PORT=str(free_port()))
        self.process, self.banner = start_up([], env, timeout_s=90)
        self.ports = {name: int(port) for name, port in
                      re.findall(r"^\s+(ingest API|worker|accountability|sink|dispatch)\s+http://127\.0\.0\.1:(\d+)", self.banner, re.M)}
        self.kafka_port = int(re.search(r"kafka\s+127\.0\.0\.1:(\d+)", self.banner).group(1))  # type: ignore[union-attr]
        self.ingest_token, self.operator_token = banner_token(self.banner, "ingest"), banner_token(self.banner, "operator")
        self.later: list[str] = []  # what up prints after the banner
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.later.append(line.rstrip("\n"))

    def wait_line(self, pattern: str, timeout_s: float = 120) -> str:
        """The first line printed after the banner that matches ``pattern``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [line for line in list(self.later) if re.search(pattern, line)]
            if found:
                return found[0]
            time.sleep(0.2)
        raise AssertionError(f"no line matching {pattern!r} in {timeout_s:.0f}s; up printed: {self.later}")

    def child(self, marker: str) -> psutil.Process:
        """A process up started, found by a word of its command line."""
        found = [p for p in psutil.Process(self.process.pid).children() if marker in " ".join(p.cmdline())]
        assert len(found) == 1, [p.cmdline() for p in psutil.Process(self.process.pid).children()]
        return found[0]

    def all_ports(self) -> list[int]:
        return [*self.ports.values(), self.kafka_port]

    def health(self, name: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[name]}/health", timeout=5) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError:
            return 0

    def all_healthy(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while (statuses := {name: self.health(name) for name in self.ports}) != dict.fromkeys(self.ports, 200):
            assert time.monotonic() < deadline, f"not all healthy: {statuses}; up printed: {self.later}"
            time.sleep(0.5)

    def post_checkin(self) -> int:
        body = json.dumps({"citizen_id": "e2e-1", "lat": -6.2, "lon": 106.8, "observed_at": "2026-01-01T00:00:00Z",
                           "source": "app"}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.ports['ingest API']}/v1/checkins", data=body,
                                         method="POST", headers={"Authorization": f"Bearer {self.ingest_token}",
                                                                 "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=15) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    stack = Up(tmp_path / "data")
    yield stack
    if stack.process.poll() is None:
        stack.process.kill()
        stack.process.wait()


def wait_closed(ports: list[int], timeout_s: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(listening(p) for p in ports):
        time.sleep(0.2)
    return [p for p in ports if listening(p)]


def test_up_serves_the_api_and_stops_cleanly_on_sigterm(up: Up) -> None:
    assert set(up.ports) == {"ingest API", "worker", "accountability", "sink", "dispatch"}
    assert up.post_checkin() == 202
    for name in ("worker", "accountability", "sink", "dispatch"):
        with urllib.request.urlopen(f"http://127.0.0.1:{up.ports[name]}/health", timeout=5) as response:
            assert response.status == 200
    up.process.send_signal(signal.SIGTERM)
    assert up.process.wait(timeout=60) == 0
    assert wait_closed(up.all_ports()) == []


def test_killing_up_outright_takes_its_children_down(up: Up, tmp_path: Path) -> None:
    tokens = tmp_path / "data" / "tokens.json"
    assert f"tokens (kept in {tokens}" in up.banner
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o600
    up.process.kill()
    up.process.wait()
    assert wait_closed(up.all_ports()) == []
    again = Up(tmp_path / "data")  # the same data directory: PostgreSQL still running there is reused
    try:
        assert (again.ingest_token, again.operator_token) == (up.ingest_token, up.operator_token)
        assert again.post_checkin() == 202  # the kept token opens the API
        again.process.send_signal(signal.SIGTERM)
        assert again.process.wait(timeout=60) == 0
    finally:
        if again.process.poll() is None:
            again.process.kill()
    pid_file = tmp_path / "data" / "postgres" / "postmaster.pid"
    deadline = time.monotonic() + 30
    while pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not pid_file.exists()  # and now it is stopped


def post(url: str, token: str, body: dict) -> dict:  # type: ignore[type-arg]
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=15) as response:
        assert response.status == 202
        return dict(json.loads(response.read()))


def warnings_on(up: Up, until: Callable[[list[Warning]], bool], timeout_s: float = 60) -> list[Warning]:
    def decoded(messages: list) -> list[Warning]:  # type: ignore[type-arg]
        return [decode(m.value, Warning) for m in messages]

    return decoded(read_topic(f"127.0.0.1:{up.kafka_port}", "warnings", lambda seen: until(decoded(seen)), timeout_s))


def wait_metric(up: Up, name: str, label: str, at_least: float, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while read_metric(f"http://127.0.0.1:{up.ports['sink']}/metrics", name, label) < at_least:
        assert time.monotonic() < deadline, f"{name}{{{label}}} never reached {at_least}"
        time.sleep(0.3)


def test_up_again_on_the_same_data_dir_restores_what_the_lost_broker_held(tmp_path: Path) -> None:
    """The embedded broker keeps nothing: the second ``up`` gets the crisis and the citizens' states
    back from PostgreSQL, so a citizen walking in is warned and the warned get their all-clear."""
    zone = {"type": "Polygon", "coordinates": [[[106.7, -6.3], [106.9, -6.3], [106.9, -6.1], [106.7, -6.1],
                                                [106.7, -6.3]]]}
    first = Up(tmp_path / "data")
    try:
        operator = re.search(r"operator\s+(\S+)$", first.banner, re.M).group(1)  # type: ignore[union-attr]
        api = f"http://127.0.0.1:{first.ports['ingest API']}"
        post(f"{api}/v1/crises", operator, {"crisis_id": "e2e-zone", "title": "Flooding", "geometry": zone})
        deadline = time.monotonic() + 30
        while read_metric(f"http://127.0.0.1:{first.ports['worker']}/metrics", "crisiswatch_active_crises") < 1:
            assert time.monotonic() < deadline, "the worker never saw the crisis"
            time.sleep(0.2)
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        post(f"{api}/v1/checkins", first.ingest_token, {"checkins": [
            {"citizen_id": "e2e-inside", "lat": -6.2, "lon": 106.8, "observed_at": now, "source": "app"},
            {"citizen_id": "e2e-walker", "lat": -6.2, "lon": 108.0, "observed_at": now, "source": "app"}]})
        before = warnings_on(first, lambda ws: len(ws) >= 1)
        assert [(w.citizen_id, w.kind) for w in before] == [("e2e-inside", "entered")]
        for table, rows in (("crises", 1), ("checkins", 2), ("warnings", 1)):  # PostgreSQL has it all
            wait_metric(first, "crisiswatch_sink_rows_written_total", f'table="{table}"', rows)
        first.process.send_signal(signal.SIGTERM)
        assert first.process.wait(timeout=60) == 0
    finally:
        if first.process.poll() is None:
            first.process.kill()

    second = Up(tmp_path / "data")
    try:
        assert "restored from PostgreSQL: 1 active crises, 0 citizens, 2 citizen states (1 warned)" in second.banner
        operator = re.search(r"operator\s+(\S+)$", second.banner, re.M).group(1)  # type: ignore[union-attr]
        api = f"http://127.0.0.1:{second.ports['ingest API']}"
        later = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 1))
        post(f"{api}/v1/checkins", second.ingest_token,
             {"citizen_id": "e2e-walker", "lat": -6.2, "lon": 106.8, "observed_at": later, "source": "app"})
        got = warnings_on(second, lambda ws: len(ws) >= 1)
        assert [(w.citizen_id, w.kind) for w in got] == [("e2e-walker", "entered")]
        post(f"{api}/v1/crises", operator, {"crisis_id": "e2e-zone", "op": "cancel"})
        got = warnings_on(second, lambda ws: len(ws) >= 3)
        time.sleep(2.0)  # anything extra would arrive now
        got = warnings_on(second, lambda ws: False, timeout_s=3)
        assert sorted((w.citizen_id, w.kind) for w in got) == [
            ("e2e-inside", "all_clear"), ("e2e-walker", "all_clear"), ("e2e-walker", "entered")]
        assert not {w.warning_id for w in got} & {w.warning_id for w in before}
        second.process.send_signal(signal.SIGTERM)
        assert second.process.wait(timeout=60) == 0
    finally:
        if second.process.poll() is None:
            second.process.kill()
            second.process.wait()


def test_a_killed_broker_and_a_killed_database_are_restarted_and_the_stack_serves_again(up: Up, tmp_path: Path) -> None:
    up.all_healthy()
    up.child("--listener-url").kill()
    assert str(up.kafka_port) in up.wait_line(r"the embedded broker exited with code -9; restarting it")
    up.wait_line(r"the embedded broker is running again")
    up.all_healthy()
    assert up.post_checkin() == 202

    postmaster = int((tmp_path / "data" / "postgres" / "postmaster.pid").read_text().split()[0])
    os.kill(postmaster, signal.SIGKILL)
    up.wait_line(r"embedded PostgreSQL exited; restarting it")
    up.wait_line(r"embedded PostgreSQL is running again")
    up.all_healthy()
    assert up.post_checkin() == 202
    assert up.process.poll() is None

    up.process.send_signal(signal.SIGTERM)
    assert up.process.wait(timeout=60) == 0


def test_a_child_that_keeps_dying_stops_up_with_one_line_naming_it(up: Up, tmp_path: Path) -> None:
    up.all_healthy()
    up.child("pipeline.cli sink").kill()
    up.wait_line(r"^crisiswatch up: sink exited with code -9; restarting it")
    up.all_healthy()
    up.child("pipeline.cli sink").kill()
    deadline = time.monotonic() + 60
    while up.health("sink") != 200 or len([p for p in psutil.Process(up.process.pid).children()
                                           if "pipeline.cli sink" in " ".join(p.cmdline())]) != 1:
        assert time.monotonic() < deadline, up.later
        time.sleep(0.3)
    up.child("pipeline.cli sink").kill()  # the third death within 60 s

    assert up.process.wait(timeout=90) == 1
    up._reader.join(10)
    log = tmp_path / "data" / "logs" / "sink.log"
    assert up.later[-1] == f"crisiswatch up: stopped: sink exited with code -9, 3 times within 60s; see {log}"
    assert all(line.startswith("crisiswatch up: sink exited with code -9; restarting it") for line in up.later[:-1]), \
        "\n".join(up.later)
    assert wait_closed(up.all_ports()) == []
