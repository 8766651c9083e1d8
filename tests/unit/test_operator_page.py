"""The operator's page without a browser: its files, headers and data endpoints on an in-memory store
twin, and the proximity band it draws against the worker's own idea of "near"."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from html.parser import HTMLParser
from importlib import resources
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from shapely.geometry import Point, shape

from pipeline.domain.geofence import CrisisIndex
from pipeline.domain.map_view import proximity_band
from pipeline.settings import Settings
from pipeline.testing import make_crisis, square
from producers.api import create_app
from producers.audit import MemoryAuditLog
from producers.crisis_store import StoreUnavailable
from producers.operator_page import PAGE_HEADERS, NotActive, static_files

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
OPERATOR = {"Authorization": "Bearer op-token"}
INGEST = {"Authorization": "Bearer in-token"}


class MemoryOperatorStore:
    """What PostgresOperatorStore answers, from dictionaries; ``down`` makes every read fail as PostgreSQL would."""

    def __init__(self) -> None:
        self.crises: dict[str, dict[str, Any]] = {}
        self.points: dict[str, list[dict[str, Any]]] = {}
        self.cancelled: set[str] = set()
        self.asked: list[str] = []
        self.down = False

    def overview(self, now: datetime) -> dict[str, Any]:
        self._check()
        return {"as_of": now.isoformat(), "refresh_s": 3.0, "crises": list(self.crises.values()), "warnings": [],
                "cases": []}

    def citizens(self, crisis_id: str, now: datetime) -> list[dict[str, Any]] | None:
        self._check()
        self.asked.append(crisis_id)
        if crisis_id in self.cancelled:
            raise NotActive(crisis_id)
        return self.points.get(crisis_id) if crisis_id in self.crises else None

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("PostgreSQL is unavailable: connection refused")


def client(store: MemoryOperatorStore | None, audit: MemoryAuditLog | None = None) -> TestClient:
    settings = Settings.from_env({"CRISISWATCH_OPERATOR_TOKEN": "op-token", "CRISISWATCH_INGEST_TOKEN": "in-token"})
    return TestClient(create_app(settings, None, CollectorRegistry(), lambda: NOW, operator_store=store,  # type: ignore[arg-type]
                                 audit_log=MemoryAuditLog() if audit is None else audit))


class References(HTMLParser):
    """Every src/href of the page, and anything a strict CSP would block: inline script, style, handlers."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]
        if tag == "script" and not found.get("src"):
            self.inline.append("inline <script>")
        if tag == "style":
            self.inline.append("<style>")
        self.inline += [f"{tag} {k}=" for k, _ in attrs if k == "style" or k.startswith("on")]


def test_the_page_loads_only_its_own_files_under_a_strict_policy() -> None:
    api = client(MemoryOperatorStore())
    page = api.get("/operator")
    assert page.status_code == 200
    for name, value in PAGE_HEADERS.items():
        assert page.headers[name] == value
    csp = page.headers["content-security-policy"]
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp and "frame-ancestors 'none'" in csp
    references = References()
    references.feed(page.text)
    assert references.inline == []
    assert references.urls, "the page references its script and styles"
    for url in references.urls:
        assert not re.match(r"^[a-z]+:|^//", url), f"{url}: the page must work offline, from this origin only"
        served = api.get("/" + url)
        assert served.status_code == 200, url
        assert served.headers["x-content-type-options"] == "nosniff"
    assert api.get("/operator/static/vendor/leaflet/leaflet.js").headers["content-type"].startswith("text/javascript")
    assert api.get("/operator/static/countries.geojson").json()["type"] == "FeatureCollection"
    assert api.get("/operator/static/no-such-file.js").status_code == 404


def test_the_script_never_writes_server_text_as_html() -> None:
    script = resources.files("producers").joinpath("static", "app.js").read_text("utf-8")
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function", script)
    # The token goes in a header, never in a URL or a cookie.
    assert "Authorization" in script and "sessionStorage" in script
    assert not re.search(r"localStorage|document\.cookie|[?&]token=", script)


def test_vendored_files_come_with_their_licence() -> None:
    files = static_files()
    assert "BSD 2-Clause" in files["vendor/leaflet/LICENSE"].decode()
    assert b"Leaflet 1.9.4" in files["vendor/README.md"]
    assert {"index.html", "app.js", "page.css", "vendor/leaflet/leaflet.js", "vendor/leaflet/leaflet.css"} <= set(files)


def test_data_endpoints_need_the_operator_token() -> None:
    api = client(MemoryOperatorStore())
    for path in ("/v1/operator/overview", "/v1/crises/c-1/citizens"):
        assert api.get(path).status_code == 401
        assert api.get(path, headers=INGEST).status_code == 403
        assert api.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_overview_and_citizens_of_an_active_crisis_only() -> None:
    store = MemoryOperatorStore()
    store.crises["c-1"] = {"crisis_id": "c-1", "counts": {"inside": 1, "near": 1}}
    store.crises["c/2"] = {"crisis_id": "c/2", "counts": {"inside": 0, "near": 0}}
    store.points["c-1"] = [{"citizen_id": "a", "zone": "inside", "lat": 1.0, "lon": 2.0}]
    store.points["c/2"] = []
    store.cancelled.add("c-gone")
    audit = MemoryAuditLog()
    api = client(store, audit)
    overview = api.get("/v1/operator/overview", headers=OPERATOR)
    assert overview.status_code == 200 and overview.headers["cache-control"] == "no-store"
    assert [c["crisis_id"] for c in overview.json()["crises"]] == ["c-1", "c/2"]
    points = api.get("/v1/crises/c-1/citizens", headers=OPERATOR)
    assert points.status_code == 200 and points.json()["citizens"] == store.points["c-1"]
    assert api.get("/v1/crises/c/2/citizens", headers=OPERATOR).json()["citizens"] == []  # ids may hold "/"
    missing = api.get("/v1/crises/nope/citizens", headers=OPERATOR)
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    asked = len(store.asked)
    for impossible in ("%00x", "-leading-dash", "x" * 129, "caf%C3%A9"):  # never a crisis/1 id: not looked up
        assert api.get(f"/v1/crises/{impossible}/citizens", headers=OPERATOR).status_code == 404, impossible
    assert len(store.asked) == asked
    # every look at individual locations is in the audit log, before anything is read; impossible ids are not
    assert [(e.action, e.subject) for e in audit.kept] == [("export", "c-1"), ("export", "c/2"), ("export", "nope")]
    gone = api.get("/v1/crises/c-gone/citizens", headers=OPERATOR)
    assert gone.status_code == 409 and "no longer shown" in gone.json()["reason"]


def test_without_a_database_the_data_endpoints_say_so() -> None:
    answer = client(None).get("/v1/operator/overview", headers=OPERATOR)
    assert answer.status_code == 503 and "CRISISWATCH_DATABASE_URL" in answer.json()["reason"]
    store = MemoryOperatorStore()
    store.down = True
    answer = client(store).get("/v1/operator/overview", headers=OPERATOR)
    assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
    assert answer.json()["error"] == "database_unavailable"
    assert client(None).get("/operator").status_code == 200  # the page itself needs no database


@pytest.mark.parametrize(("lat", "band_km"), [(0.0, 10.0), (48.0, 25.0), (-33.9, 60.0), (64.0, 5.0)])
def test_the_band_drawn_is_where_the_worker_says_near(lat: float, band_km: float) -> None:
    area = square(20.0, lat, 0.3)
    band = proximity_band(area, band_km)
    assert band is not None
    drawn = shape(band)
    assert drawn.contains(shape(area))
    crisis = make_crisis("c-band", area, buffer_km=band_km)
    index = CrisisIndex([crisis])
    rng = np.random.default_rng(7)
    lats = lat + rng.uniform(-1.5, 1.5, 4000)
    lons = 20.0 + rng.uniform(-2.0, 2.0, 4000)
    distances = index.by_id["c-band"].distances_km(lats, lons)
    checked = 0
    for plat, plon, distance in zip(lats, lons, distances, strict=True):
        if distance == 0 or abs(distance - band_km) < 0.05 * band_km:
            continue  # inside, or too close to the band's edge for a drawing to decide
        checked += 1
        assert drawn.contains(Point(plon, plat)) == (distance <= band_km), (plat, plon, distance)
    assert checked > 500


def test_no_band_without_a_proximity_distance_or_an_area() -> None:
    assert proximity_band(square(0, 0, 1), 0) is None
    assert proximity_band(None, 10) is None
