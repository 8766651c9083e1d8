"""A new user's first minutes, with nothing exported: ``crisiswatch up`` in one terminal, then
``status``, ``token`` and ``tail`` in another, from the same directory, find the stack by themselves;
every port the stack opens listens on the configured host; an orderly stop forgets the stack; a
port the user set that is busy stops ``up`` before anything starts."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests import stack_helpers

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
JAKARTA = {"type": "Polygon", "coordinates": [[[106.7, -6.3], [106.9, -6.3], [106.9, -6.1], [106.7, -6.1],
                                               [106.7, -6.3]]]}


def bare_env() -> dict[str, str]:
    """The environment of a user who configured nothing."""
    return stack_helpers.bare_env(PYTHONPATH=str(REPO))


def crisiswatch(cwd: Path, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=bare_env(), text=True,
                          capture_output=True, timeout=timeout_s, check=False)


def start_up(cwd: Path) -> tuple[subprocess.Popen[str], str]:
    return stack_helpers.start_up([], bare_env(), timeout_s=120, cwd=cwd)


def post(url: str, token: str, body: object) -> int:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=15) as response:
        return int(response.status)


def test_the_other_verbs_find_the_stack_up_runs_with_nothing_configured(tmp_path: Path) -> None:
    up, banner = start_up(tmp_path)
    try:
        assert "state        .crisiswatch/stack.json" in banner

        status = crisiswatch(tmp_path, "status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.rstrip().endswith("all healthy")
        assert {"kafka", "postgresql", "worker", "sink", "dispatch", "api"} <= {
            line.split()[0] for line in status.stdout.splitlines() if line.startswith("  ") and line.split()}
        report = json.loads(crisiswatch(tmp_path, "status", "--json").stdout)
        api = next(p["where"] for p in report["parts"] if p["name"] == "api")

        operator = crisiswatch(tmp_path, "token", "operator").stdout.strip()
        ingest = crisiswatch(tmp_path, "token", "ingest").stdout.strip()
        assert re.search(rf"operator\s+{re.escape(operator)}$", banner, re.M)

        # every port a part of the stack listens on is on the configured host (127.0.0.1)
        ours = [psutil.Process(up.pid), *psutil.Process(up.pid).children(recursive=True)]
        listening = {(c.laddr.ip, c.laddr.port) for p in ours for c in p.net_connections("inet")
                     if c.status == psutil.CONN_LISTEN}
        assert listening and {ip for ip, _ in listening} == {"127.0.0.1"}, listening

        tail = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "tail", "--max", "1", "--wait-s", "90"],
                                cwd=tmp_path, env=bare_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert tail.stderr is not None
            assert "listening on warnings" in tail.stderr.readline()
            assert post(f"{api}/v1/crises", operator,
                        {"crisis_id": "e2e-find", "title": "Flooding, Jakarta", "geometry": JAKARTA}) == 202
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            deadline = time.monotonic() + 60
            while tail.poll() is None and time.monotonic() < deadline:  # until the worker knows the crisis
                post(f"{api}/v1/checkins", ingest,
                     {"citizen_id": "e2e-walker", "lat": -6.2, "lon": 106.8, "observed_at": now, "source": "app"})
                with contextlib.suppress(subprocess.TimeoutExpired):
                    tail.wait(timeout=3)
            out, err = tail.communicate(timeout=90)
        finally:
            if tail.poll() is None:
                tail.kill()
                tail.communicate()
        assert tail.returncode == 0, err
        [line] = out.splitlines()
        assert line.split()[1:3] == ["entered", "e2e-walker"] and "Flooding, Jakarta (ID)" in line, line

        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=90) == 0
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    assert not (tmp_path / ".crisiswatch" / "stack.json").exists()
    gone = crisiswatch(tmp_path, "status")
    assert gone.returncode == 1 and "no stack runs on" in gone.stderr


def test_a_busy_port_the_user_set_stops_up_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as other_program:
        other_program.bind(("127.0.0.1", 0))
        other_program.listen()
        port = other_program.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "pipeline.cli", "up"], cwd=tmp_path,
                              env={**bare_env(), "CRISISWATCH_API_PORT": str(port)}, text=True, capture_output=True,
                              timeout=120, check=False)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"crisiswatch up: port {port} on 127.0.0.1 (CRISISWATCH_API_PORT) is in use by another program; stop it, "
        "or set CRISISWATCH_API_PORT to a free port (unset, a free one is chosen)"]
    assert not (tmp_path / ".crisiswatch").exists()  # no broker, no database, nothing was started
