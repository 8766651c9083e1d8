"""Every metric the Grafana dashboard and the Prometheus alert rules query is served by a running
process: ``crisiswatch up --feeds`` starts the whole stack (embedded broker and PostgreSQL, worker,
sink, ingest API, dispatcher, feed pollers and whatever else it starts); a citizen with a webhook on
loopback checks in, a crisis is declared around them, the warning reaches the webhook; then each
process's ``/metrics`` (every ``/metrics`` address the banner prints) is read over HTTP, and every
stage latency (ingest -> Kafka, check-in -> warning, crisis -> first warning, warning -> delivered)
has measured something. A name queried by deploy/ and declared by no process would be a panel that stays empty, or an
alert that never fires, in production.

A metric counts as exported when a process declares its family (``# TYPE``), with or without
samples yet: a labelled counter has no series before its first increment (no dead letter yet), and
that is the process being quiet, not the metric missing."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.embedded import free_port
from tests import deploy_queries
from tests.stack_helpers import WebhookReceiver, banner_token, bare_env, start_up

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
USGS_FIXTURE = REPO / "tests" / "fixtures" / "feeds" / "poller" / "usgs_quakes.geojson"


class Stack:
    """``crisiswatch up`` in a child process, read until its banner is complete."""

    def __init__(self, data_dir: Path, feeds_config: Path) -> None:
        env = bare_env(CRISISWATCH_DATA_DIR=str(data_dir), CRISISWATCH_API_PORT=str(free_port()),
                       CRISISWATCH_WORKER_WEB_PORT=str(free_port()), CRISISWATCH_SINK_METRICS_PORT=str(free_port()),
                       CRISISWATCH_DISPATCH_METRICS_PORT=str(free_port()))
        self.process, self.banner = start_up(["--feeds", str(feeds_config)], env, timeout_s=120)
        self.metrics_urls = dict(re.findall(r"^\s+(\w[\w ]*?)\s+(http://[\d.]+:\d+)(?:/metrics|\s)", self.banner, re.M))
        self.api = self.metrics_urls["ingest API"]
        self.ingest_token, self.operator_token = banner_token(self.banner, "ingest"), banner_token(self.banner, "operator")

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


def post(stack: Stack, path: str, token: str, body: dict[str, Any]) -> int:
    request = urllib.request.Request(f"{stack.api}{path}", data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def wait_for(what: str, check: Callable[[], bool], timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f}s"
        time.sleep(0.5)


def a_crisis_unfolds(stack: Stack, receiver: WebhookReceiver) -> None:
    """Two citizens register with a webhook; one checks in in Paris, a crisis is declared around them
    (the sweep warns them), then the other walks in (the check-in warns them)."""
    for n in (1, 2):
        citizen = {"schema": "citizen/1", "citizen_id": f"metrics-e2e-{n}", "name": "Camille Test", "nationality": "FR",
                   "language": "fr", "channels": [{"type": "webhook", "address": receiver.url("/hook")}], "emergency_contacts": [],
                   "consent": {"location_tracking": True}}
        assert post(stack, "/v1/citizens", stack.ingest_token, citizen) == 202
    wait_for("the citizens in PostgreSQL", lambda: sum(values(stack, "sink", "crisiswatch_sink_rows_written_total")) >= 2)

    def checkin(n: int) -> int:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return post(stack, "/v1/checkins", stack.ingest_token,
                    {"citizen_id": f"metrics-e2e-{n}", "lat": 48.857, "lon": 2.352, "observed_at": now, "source": "app"})

    assert checkin(1) == 202
    wait_for("the worker holding the citizen", lambda: sum(values(stack, "worker", "crisiswatch_citizens_tracked")) >= 1)
    zone = {"type": "Polygon", "coordinates": [[[2.2, 48.8], [2.5, 48.8], [2.5, 48.95], [2.2, 48.95], [2.2, 48.8]]]}
    assert post(stack, "/v1/crises", stack.operator_token,
                {"crisis_id": "metrics-e2e-zone", "title": "Flooding", "geometry": zone}) == 202
    wait_for("the sweep's warning at the webhook", lambda: len(receiver.received) >= 1, timeout_s=120)
    assert checkin(2) == 202
    wait_for("the check-in's warning at the webhook", lambda: len(receiver.received) >= 2, timeout_s=120)


def test_every_metric_the_dashboard_and_alerts_query_is_served_by_a_running_process(stack: Stack) -> None:
    assert {"ingest API", "worker", "sink", "dispatch", "feeds"} <= set(stack.metrics_urls), stack.banner
    receiver = WebhookReceiver()
    try:
        a_crisis_unfolds(stack, receiver)
    finally:
        receiver.close()

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
        measured = {f"{name} on {process}": any(v > 0 for v in values(stack, process, name)) for process, name in (
            ("ingest API", "crisiswatch_api_publish_seconds_count"),
            ("worker", "crisiswatch_checkin_to_warning_latency_seconds_count"),
            ("worker", "crisiswatch_crisis_to_first_warning_seconds_count"),
            ("dispatch", "crisiswatch_warning_to_delivered_seconds_count"),
            ("feeds", "crisiswatch_feed_last_success_timestamp_seconds"))}
        measured["crisiswatch_consumer_lag on sink"] = bool(values(stack, "sink", "crisiswatch_consumer_lag"))
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
