"""Every metric the Grafana dashboard and the Prometheus alert rules query is served by a running
process: ``crisiswatch up --feeds`` starts the whole stack (embedded broker and PostgreSQL, worker,
sink, ingest API, dispatcher, feed pollers and whatever else it starts), a check-in goes through the
API, and each process's ``/metrics`` (every ``/metrics`` address the banner prints) is read over
HTTP. A name queried by deploy/ and declared by no process would be a panel that stays empty, or an
alert that never fires, in production.

A metric counts as exported when a process declares its family (``# TYPE``), with or without
samples yet: a labelled counter has no series before its first increment (no dead letter yet), and
that is the process being quiet, not the metric missing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.embedded import free_port
from tests import deploy_queries

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
USGS_FIXTURE = REPO / "tests" / "fixtures" / "feeds" / "poller" / "usgs_quakes.geojson"


class Stack:
    """``crisiswatch up`` in a child process, read until its banner is complete."""

    def __init__(self, data_dir: Path, feeds_config: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CRISISWATCH_")}
        env["CRISISWATCH_DATA_DIR"] = str(data_dir)
        env.update({"CRISISWATCH_API_PORT": str(free_port()), "CRISISWATCH_WORKER_WEB_PORT": str(free_port()),
                    "CRISISWATCH_SINK_METRICS_PORT": str(free_port()),
                    "CRISISWATCH_DISPATCH_METRICS_PORT": str(free_port())})
        self.process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "up", "--feeds", str(feeds_config)],
                                        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.banner = ""
        deadline = time.monotonic() + 120
        assert self.process.stdout is not None
        while "Ctrl-C stops everything." not in self.banner:
            line = self.process.stdout.readline()
            assert line or self.process.poll() is None, f"up exited: {self.banner}"
            self.banner += line
            assert time.monotonic() < deadline, self.banner
        self.metrics_urls = dict(re.findall(r"^\s+(\w[\w ]*?)\s+(http://[\d.]+:\d+)(?:/metrics|\s)", self.banner, re.M))
        self.api = self.metrics_urls["ingest API"]
        self.ingest_token = re.search(r"ingest\s+(\S+)$", self.banner, re.M).group(1)  # type: ignore[union-attr]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("metrics-exported")
    config = root / "feeds.toml"
    config.write_text(f'[[feeds]]\nname = "usgs-fixture"\npath = "{USGS_FIXTURE}"\nformat = "usgs"\ninterval_s = 30\n',
                      "utf-8")
    running = Stack(root / "data", config)
    try:
        yield running
    finally:
        running.stop()


def get(url: str, timeout_s: float = 10) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return int(response.status), response.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode("utf-8", "replace")


def exported(text: str) -> set[str]:
    """Every series name a /metrics page declares (a counter's ``_total``, a histogram's parts)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        if family.type == "counter":
            names |= {family.name + "_total", family.name + "_created"}
        elif family.type == "histogram":
            names |= {family.name + suffix for suffix in ("_bucket", "_sum", "_count", "_created")}
        names.add(family.name)
        names |= {sample.name for sample in family.samples}
    return names


def values(stack: Stack, process: str, sample_name: str) -> list[float]:
    """The values of every sample called ``sample_name`` on ``process``'s /metrics."""
    status, text = get(f"{stack.metrics_urls[process]}/metrics")
    if status != 200:
        return []
    return [sample.value for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name == sample_name]


def post_checkin(stack: Stack) -> int:
    body = json.dumps({"citizen_id": "metrics-e2e-1", "lat": 48.85, "lon": 2.35, "observed_at": "2026-01-01T00:00:00Z",
                       "source": "app"}).encode()
    request = urllib.request.Request(f"{stack.api}/v1/checkins", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {stack.ingest_token}",
                                              "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_every_metric_the_dashboard_and_alerts_query_is_served_by_a_running_process(stack: Stack) -> None:
    assert {"ingest API", "worker", "sink", "dispatch", "feeds"} <= set(stack.metrics_urls), stack.banner
    assert post_checkin(stack) == 202

    wanted = {name for _, expr in deploy_queries.queries() for name in deploy_queries.metric_names(expr)}
    wanted -= deploy_queries.SYNTHETIC
    assert len(wanted) > 20, "the dashboard and the rules query far more than this: the parsing is broken"

    deadline = time.monotonic() + 120
    while True:
        served: dict[str, set[str]] = {}
        for process, base in stack.metrics_urls.items():
            status, text = get(f"{base}/metrics")
            if status == 200:
                served[process] = exported(text)
        missing = wanted - set().union(*served.values())
        # Samples too, where the stack has had the chance to make them: the check-in was published, the
        # feed polled, the lag read. A family declared but never measured would be an empty panel.
        measured = {
            "crisiswatch_api_publish_seconds_count": any(v > 0 for v in values(stack, "ingest API",
                                                                                "crisiswatch_api_publish_seconds_count")),
            "crisiswatch_feed_last_success_timestamp_seconds": any(
                v > 0 for v in values(stack, "feeds", "crisiswatch_feed_last_success_timestamp_seconds")),
            "crisiswatch_consumer_lag": bool(values(stack, "sink", "crisiswatch_consumer_lag")),
        }
        unmeasured = {name for name, ok in measured.items() if not ok}
        if (not missing and not unmeasured) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert sorted(missing) == [], {p: sorted(n for n in names if n.startswith("crisiswatch_")) for p, names in served.items()}
    assert sorted(unmeasured) == []


def test_each_process_serves_health_and_metrics_where_the_probes_look(stack: Stack) -> None:
    # readiness: /health (200 once Kafka and PostgreSQL answer); liveness: /metrics (always 200 while serving).
    deadline = time.monotonic() + 90
    while True:
        health = {process: get(f"{base}/health")[0] for process, base in stack.metrics_urls.items()}
        if set(health.values()) == {200} or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert health == dict.fromkeys(stack.metrics_urls, 200)
    assert {process: get(f"{base}/metrics")[0] for process, base in stack.metrics_urls.items()} == dict.fromkeys(
        stack.metrics_urls, 200)
