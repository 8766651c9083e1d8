"""The operator page's reads on the real PostgreSQL, with rows as the sink writes them: the map's
crises with counts and bands, the latest warnings and cases without anybody's coordinates, and the
citizens of one active crisis — exactly those whose latest warning there says inside or near."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from consumers.sink import (
    CASES_TABLE,
    CRISES_TABLE,
    CRISIS_STATUS_TABLE,
    WARNINGS_TABLE,
    case_row,
    crisis_row,
    crisis_status_row,
    warning_row,
)
from pipeline.domain.cases import new_case
from pipeline.domain.ids import warning_id
from pipeline.testing import make_crisis, square
from producers.crisis_store import StoreUnavailable
from producers.operator_page import NotActive, PostgresOperatorStore
from schemas import Crisis, CrisisStatus, Warning
from schemas.models import WarningKind
from tests.stack_helpers import insert, new_database

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
def own_database(database_url: str) -> str:
    """A database of this test's own: the overview lists every active crisis and the latest warnings."""
    return new_database(database_url, "opstore")


def warn(url: str, citizen_id: str, crisis: Crisis, kind: WarningKind, minutes_ago: int, lat: float, distance: float = 0.0) -> None:
    at = NOW - timedelta(minutes=minutes_ago)
    insert(url, WARNINGS_TABLE, warning_row(Warning(
        warning_id(citizen_id, crisis.crisis_id, crisis.version, kind, minutes_ago), citizen_id, crisis.crisis_id,
        crisis.version, kind, crisis.severity, crisis.title, "Move to high ground", distance, lat, 106.8, at, at,
        crisis.country_codes)))


def test_overview_and_the_citizens_of_an_opened_crisis(own_database: str) -> None:
    url = own_database
    flood = make_crisis("flood", square(106.8, -6.2, 0.2), buffer_km=15, effective=NOW - timedelta(hours=2))
    quake = make_crisis("quake", square(110.0, -7.0, 0.2), effective=NOW - timedelta(hours=2))
    old = make_crisis("old", square(100.0, 0.0, 0.2), effective=NOW - timedelta(days=3), expires=NOW - timedelta(days=1))
    gone = make_crisis("gone", square(101.0, 1.0, 0.2), effective=NOW - timedelta(hours=3))
    for crisis in (flood, quake, old, gone, make_crisis("gone", op="cancel", version=2, geometry=None)):
        insert(url, CRISES_TABLE, crisis_row(crisis))
    insert(url, CRISIS_STATUS_TABLE, crisis_status_row(CrisisStatus("flood", 2, 1, 4, 3, 1, 1, 0, 0, NOW)))
    warn(url, "a", flood, "inside", 50, -6.21)
    warn(url, "b", flood, "near", 40, -6.45, 12.5)
    warn(url, "c", flood, "inside", 30, -6.22)
    warn(url, "c", flood, "exited", 10, -6.5)  # left: no longer shown
    warn(url, "d", flood, "near", 20, -6.46, 9.0)
    warn(url, "d", flood, "entered", 5, -6.19)  # moved in: inside, where last warned
    warn(url, "e", gone, "inside", 60, 1.0)
    insert(url, CASES_TABLE, case_row(new_case(kind="sos", citizen_id="a", crisis_id="flood", country="ID", lat=-6.2,
                                               lon=106.8, note="help", now=NOW - timedelta(minutes=1))))

    store = PostgresOperatorStore(url)
    try:
        overview = store.overview(NOW)
        crises = {c["crisis_id"]: c for c in overview["crises"]}
        assert set(crises) == {"flood", "quake"}  # neither the expired nor the cancelled one
        assert crises["flood"]["counts"] == {"inside": 2, "near": 1, "warned": 4, "delivered": 3, "safe": 1,
                                             "need_help": 1, "unreached": 0, "escalated": 0}
        assert crises["flood"]["counts_as_of"] is not None and crises["quake"]["counts_as_of"] is None
        assert crises["quake"]["counts"]["inside"] == 0 and crises["quake"]["band"] is None
        assert crises["flood"]["band"]["type"] in ("Polygon", "MultiPolygon")
        assert crises["flood"]["geometry"] == flood.geometry and crises["flood"]["buffer_km"] == 15
        assert [w["citizen_id"] for w in overview["warnings"]][:2] == ["d", "c"]  # newest first
        assert [(c["kind"], c["citizen_id"], c["country"]) for c in overview["cases"]] == [("sos", "a", "ID")]
        text = json.dumps(overview)
        assert '"lat"' not in text and '"lon"' not in text  # counts, not dots

        points = {p["citizen_id"]: p for p in store.citizens("flood", NOW) or []}
        assert set(points) == {"a", "b", "d"}
        assert points["a"]["zone"] == "inside" and points["b"]["zone"] == "near" and points["b"]["distance_km"] == 12.5
        assert points["d"]["zone"] == "inside" and points["d"]["lat"] == -6.19
        assert store.citizens("quake", NOW) == []
        assert store.citizens("no-such-crisis", NOW) is None
        for inactive in ("gone", "old"):
            with pytest.raises(NotActive):
                store.citizens(inactive, NOW)
    finally:
        store.close()


def test_an_unreachable_database_is_store_unavailable() -> None:
    store = PostgresOperatorStore("postgresql://nobody@127.0.0.1:1/none")
    with pytest.raises(StoreUnavailable):
        store.overview(NOW)
