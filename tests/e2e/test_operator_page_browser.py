"""The operator's page in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``,
driven by Selenium) against the whole stack: embedded broker, a PostgreSQL database of this module's
own, worker, sink, dispatcher and the API as ``crisiswatch up`` runs them.

What an operator would notice: a wrong token is refused and the right one is kept out of the URL
(and in the tab across a reload, until logging out); an area drawn with mouse clicks on the map
becomes a crisis on the map with its proximity band; its counts change as check-ins arrive; opening
it shows exactly the citizens inside and near as points; a refused area shows the API's reason; an
update changes it in place; cancelling takes it off the map. The page runs under its
strict Content-Security-Policy without a single violation.

Without Chromium, chromedriver or Selenium the tests are skipped with the reason (``make test``
installs the browser where it runs as root with apt: ``.ci/test-tools``).
"""

from __future__ import annotations

import json
import math
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from shapely.geometry import shape

from pipeline.embedded import free_port
from pipeline.settings import Settings
from pipeline.stack import Stack, running_stack
from tests.stack_helpers import new_database

pytestmark = pytest.mark.e2e

OPERATOR = "operator-token-for-the-page"
INGEST = "ingest-token-for-the-page"
TOKEN_KEY = "crisiswatch.operatorToken"
NEAR_KM = 50.0


def browser_or_reason() -> tuple[Any, str]:
    """A headless Chromium under Selenium, or why there is none here."""
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return None, "selenium is not installed (pip install -e '.[dev]')"
    binary = next((found for name in ("chromium", "chromium-browser") if (found := shutil.which(name))), None)
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        return None, ("no Chromium and chromedriver on this machine: install Debian's chromium and chromium-driver "
                      "(`make test` does it when it runs as root with apt: .ci/test-tools)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,900",
                 "--no-first-run", "--disable-extensions"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        return webdriver.Chrome(options=options, service=Service(executable_path=driver_path)), ""
    except WebDriverException as exc:
        return None, f"Chromium did not start under chromedriver: {str(exc).strip().splitlines()[0][:300]}"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    driver, reason = browser_or_reason()
    if driver is None:
        pytest.skip(reason)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def stack(browser: Any, database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # A database of this module's own on the session's server: the page lists every active crisis.
    url = new_database(database_url, "page")
    data_dir: Path = tmp_path_factory.mktemp("operator-page")
    env = {"CRISISWATCH_DATA_DIR": str(data_dir), "CRISISWATCH_DATABASE_URL": url,
           "CRISISWATCH_API_PORT": str(free_port()), "CRISISWATCH_WORKER_WEB_PORT": str(free_port()),
           "CRISISWATCH_SINK_METRICS_PORT": str(free_port()), "CRISISWATCH_DISPATCH_METRICS_PORT": str(free_port()),
           "CRISISWATCH_INGEST_TOKEN": INGEST, "CRISISWATCH_OPERATOR_TOKEN": OPERATOR,
           "CRISISWATCH_STATUS_INTERVAL_S": "0.5", "CRISISWATCH_BATCH_WAIT_S": "0.02"}
    with running_stack(Settings.from_env(env)) as running:
        yield running


def wait_for(condition: Callable[[], Any], what: str, timeout_s: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = condition()
        except Exception:  # an element replaced while it was read: read again
            result = None
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f}s waiting for {what}"
        time.sleep(0.3)


def point_east(lat: float, lon: float, km: float) -> tuple[float, float]:
    return lat, lon + km / (111.32 * math.cos(math.radians(lat)))


def test_declare_by_drawing_watch_counts_open_and_cancel(browser: Any, stack: Stack) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    base = f"http://127.0.0.1:{stack.settings.api_port}"
    api = httpx.Client(base_url=base, timeout=15)
    driver = browser
    find = driver.find_element
    tag = uuid.uuid4().hex[:6]

    def text(selector: str) -> str:
        return str(find(By.CSS_SELECTOR, selector).text)

    def count(selector: str) -> int:
        return len(driver.find_elements(By.CSS_SELECTOR, selector))

    # The page and its files carry the security headers.
    page = api.get("/operator")
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert page.headers["x-frame-options"] == "DENY" and page.headers["x-content-type-options"] == "nosniff"

    # Logging in: a wrong token is refused, the right one is kept in this tab and never in the URL.
    driver.get(base + "/operator")
    find(By.ID, "token").send_keys(INGEST)
    find(By.ID, "login-button").click()
    wait_for(lambda: "not an operator token" in text("#login-error"), "the refusal of the ingest token")
    assert not find(By.ID, "main").is_displayed()
    find(By.ID, "token").send_keys(OPERATOR)
    find(By.ID, "login-button").click()
    wait_for(lambda: find(By.ID, "main").is_displayed(), "the page after logging in")
    assert OPERATOR not in driver.current_url
    assert driver.execute_script(f"return sessionStorage.getItem('{TOKEN_KEY}')") == OPERATOR
    wait_for(lambda: count("path.country") > 100, "the Natural Earth base layer")
    driver.refresh()  # a reload in the same tab stays logged in
    wait_for(lambda: find(By.ID, "main").is_displayed(), "the page after a reload")
    wait_for(lambda: count("path.country") > 100, "the base layer after a reload")

    # Citizens who agreed to location tracking.
    people = [f"page-{tag}-{n}" for n in range(5)]
    for person in people:
        answer = api.post("/v1/citizens", headers={"Authorization": f"Bearer {INGEST}"}, json={
            "citizen_id": person, "name": "Test Person", "nationality": "ID", "language": "en", "channels": [],
            "emergency_contacts": [], "consent": {"location_tracking": True}})
        assert answer.status_code == 202, answer.text

    # Declaring by drawing: zoom in twice, click four corners, finish, name it, declare.
    for _ in range(2):
        find(By.CSS_SELECTOR, "a.leaflet-control-zoom-in").click()
        time.sleep(1.0)  # the zoom animation
    title = f"Flooding {tag}"
    find(By.ID, "draw").click()
    map_element = find(By.ID, "map")
    for dx, dy in ((-90, -70), (90, -70), (90, 70), (-90, 70)):
        ActionChains(driver).move_to_element_with_offset(map_element, dx, dy).click().perform()
        time.sleep(0.3)  # clicks further apart than a double click
    find(By.ID, "finish-drawing").click()
    drawn = json.loads(find(By.ID, "geometry").get_attribute("value"))
    assert drawn["type"] == "Polygon" and len(drawn["coordinates"][0]) == 5
    find(By.ID, "title").send_keys(title)
    find(By.ID, "buffer-km").clear()
    find(By.ID, "buffer-km").send_keys(str(NEAR_KM))
    find(By.ID, "submit-crisis").click()
    wait_for(lambda: "Declared" in text("#form-message"), "the API's acceptance")

    row_selector = "#crises tbody tr"
    row = wait_for(lambda: next((r for r in driver.find_elements(By.CSS_SELECTOR, row_selector) if title in r.text), None),
                   "the crisis in the list")
    crisis_id = row.get_attribute("data-crisis-id")
    cell = f'#crises tr[data-crisis-id="{crisis_id}"] td[data-count="%s"]'
    wait_for(lambda: count("path.crisis-area") == 1 and count("path.crisis-band") == 1, "the area and its band on the map")
    assert text(cell % "inside") == "0" and text(cell % "near") == "0"

    # Check-ins arrive: two inside, then one more inside and two near.
    area = shape(drawn)
    inside = area.representative_point()
    west, _, east, _ = area.bounds
    near_points = [point_east(inside.y, east, 20.0), point_east(inside.y, west, -20.0)]

    def check_in(person: str, lat: float, lon: float) -> None:
        answer = api.post("/v1/checkins", headers={"Authorization": f"Bearer {INGEST}"}, json={
            "citizen_id": person, "lat": lat, "lon": lon, "source": "app",
            "observed_at": datetime.now(UTC).isoformat().replace("+00:00", "Z")})
        assert answer.status_code == 202, answer.text

    check_in(people[0], inside.y, inside.x)
    check_in(people[1], inside.y + 0.001, inside.x)
    wait_for(lambda: text(cell % "inside") == "2", "two inside on the page")
    assert text(cell % "near") == "0"
    check_in(people[2], inside.y - 0.001, inside.x)
    for person, (lat, lon) in zip(people[3:], near_points, strict=True):
        check_in(person, lat, lon)
    wait_for(lambda: text(cell % "inside") == "3" and text(cell % "near") == "2", "three inside and two near")
    wait_for(lambda: text(cell % "warned") == "5", "five warned")
    wait_for(lambda: count("#warnings li") >= 5, "the warnings in the feed")

    # Counts, not dots, until the operator opens the crisis; then exactly those inside and near.
    assert count("path.citizen") == 0
    overview = api.get("/v1/operator/overview", headers={"Authorization": f"Bearer {OPERATOR}"}).json()
    assert '"lat"' not in json.dumps(overview) and '"lon"' not in json.dumps(overview)
    find(By.CSS_SELECTOR, f'#crises tr[data-crisis-id="{crisis_id}"] a.title').click()
    wait_for(lambda: count("path.citizen-inside") == 3 and count("path.citizen-near") == 2, "the citizens as points")

    # A refused area shows the API's own reason.
    find(By.CSS_SELECTOR, f'#crises tr[data-crisis-id="{crisis_id}"] button.edit').click()
    wait_for(lambda: find(By.ID, "cancel-crisis").is_displayed(), "the form in update mode")
    point = {"type": "Point", "coordinates": [10.0, 10.0]}
    refused = api.post("/v1/crises", headers={"Authorization": f"Bearer {OPERATOR}"},
                       json={"crisis_id": crisis_id, "title": title, "severity": "severe", "geometry": point})
    assert refused.status_code == 422
    geometry_box = find(By.ID, "geometry")
    geometry_box.clear()
    geometry_box.send_keys(json.dumps(point))
    find(By.ID, "submit-crisis").click()
    wait_for(lambda: refused.json()["reason"] in text("#form-message"), "the API's reason on the page")
    assert text(cell % "inside") == "3"  # nothing changed

    # Updating: the same crisis under a new title (its area as it was).
    geometry_box.clear()
    geometry_box.send_keys(json.dumps(drawn))
    find(By.ID, "title").clear()
    find(By.ID, "title").send_keys(title + " (updated)")
    find(By.ID, "submit-crisis").click()
    wait_for(lambda: "Updated" in text("#form-message"), "the API's acceptance of the update")
    wait_for(lambda: text(f'#crises tr[data-crisis-id="{crisis_id}"] .title') == title + " (updated)", "the new title")
    assert count(row_selector) == 1 and count("path.crisis-area") == 1
    find(By.CSS_SELECTOR, f'#crises tr[data-crisis-id="{crisis_id}"] button.edit').click()
    wait_for(lambda: find(By.ID, "cancel-crisis").is_displayed(), "the form in update mode again")

    # Cancelling takes it off the map, its points too, and its people are no longer shown one by one.
    find(By.ID, "cancel-crisis").click()
    driver.switch_to.alert.accept()
    wait_for(lambda: "Cancelled" in text("#form-message"), "the API's acceptance of the cancel")
    wait_for(lambda: count(row_selector) == 0, "the crisis gone from the list")
    wait_for(lambda: count("path.crisis-area") == 0 and count("path.citizen") == 0, "the area and points gone from the map")
    gone = api.get(f"/v1/crises/{crisis_id}/citizens", headers={"Authorization": f"Bearer {OPERATOR}"})
    assert gone.status_code == 409, gone.text

    # Logging out forgets the token.
    find(By.ID, "logout").click()
    assert find(By.ID, "login").is_displayed()
    assert driver.execute_script(f"return sessionStorage.getItem('{TOKEN_KEY}')") is None

    # No Content-Security-Policy violation and no uncaught error in the whole session.
    logs = [entry["message"] for entry in driver.get_log("browser")]
    assert [m for m in logs if "Content Security Policy" in m or "Refused to" in m or "Uncaught" in m] == []
    api.close()
