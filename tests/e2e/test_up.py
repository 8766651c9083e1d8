"""``crisiswatch up`` as a user runs it: the banner tells where things are and the tokens; the API
takes a check-in; SIGTERM stops everything, children included; killing ``up`` outright takes the
broker and the processes down with it (PostgreSQL, a server with its data directory, is picked up
again by the next ``up``)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Up:
    def __init__(self, data_dir: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CRISISWATCH_")}
        env["CRISISWATCH_DATA_DIR"] = str(data_dir)
        self.process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "up"], env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        self.banner = ""
        deadline = time.monotonic() + 90
        assert self.process.stdout is not None
        while "Ctrl-C stops everything." not in self.banner:
            line = self.process.stdout.readline()
            assert line or self.process.poll() is None, f"up exited: {self.banner}"
            self.banner += line
            assert time.monotonic() < deadline, self.banner
        self.ports = {name: int(port) for name, port in
                      re.findall(r"^\s+(ingest API|worker|sink)\s+http://127\.0\.0\.1:(\d+)", self.banner, re.M)}
        self.kafka_port = int(re.search(r"kafka\s+127\.0\.0\.1:(\d+)", self.banner).group(1))  # type: ignore[union-attr]
        self.ingest_token = re.search(r"ingest\s+(\S+)$", self.banner, re.M).group(1)  # type: ignore[union-attr]

    def all_ports(self) -> list[int]:
        return [*self.ports.values(), self.kafka_port]


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
    assert set(up.ports) == {"ingest API", "worker", "sink"}
    body = json.dumps({"citizen_id": "e2e-1", "lat": -6.2, "lon": 106.8, "observed_at": "2026-01-01T00:00:00Z",
                       "source": "app"}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{up.ports['ingest API']}/v1/checkins", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {up.ingest_token}",
                                              "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=15) as response:
        assert response.status == 202
    for name in ("worker", "sink"):
        with urllib.request.urlopen(f"http://127.0.0.1:{up.ports[name]}/health", timeout=5) as response:
            assert response.status == 200
    up.process.send_signal(signal.SIGTERM)
    assert up.process.wait(timeout=60) == 0
    assert wait_closed(up.all_ports()) == []


def test_killing_up_outright_takes_its_children_down(up: Up, tmp_path: Path) -> None:
    up.process.kill()
    up.process.wait()
    assert wait_closed(up.all_ports()) == []
    again = Up(tmp_path / "data")  # the same data directory: PostgreSQL still running there is reused
    try:
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
