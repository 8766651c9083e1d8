"""The API's security by design, over HTTP, with no broker or database (nothing here publishes): roles,
per-token rate limits (429 + Retry-After), security headers on every response, CORS closed unless
configured, and the audit log (its in-memory twin) refusing reads of personal data it cannot record."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from fastapi import Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from pipeline.settings import Secret, Settings, SettingsError
from producers.api import create_app
from producers.audit import MemoryAuditLog
from producers.publisher import Publisher

INGEST = {"Authorization": "Bearer ingest-secret"}
OPERATOR = {"Authorization": "Bearer operator-secret"}
ADMIN = {"Authorization": "Bearer admin-secret"}
SETTINGS = Settings(kafka_bootstrap="127.0.0.1:1", ingest_token=Secret("ingest-secret"),
                    operator_token=Secret("operator-secret"), admin_token=Secret("admin-secret"),
                    api_rate_limits="ingest:1000,operator:2,admin:20")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def publisher() -> Iterator[Publisher]:
    pub = Publisher(SETTINGS)  # connects on the first publish, which these tests never make
    yield pub
    pub.close()


def client(publisher: Publisher, settings: Settings = SETTINGS, **kwargs: object) -> TestClient:
    app = create_app(settings, publisher, CollectorRegistry(), lambda: datetime(2025, 3, 1, tzinfo=UTC),
                     **kwargs)  # type: ignore[arg-type]
    return TestClient(app)


def test_roles_admin_may_everything_operator_not_the_audit_log_ingest_neither(publisher: Publisher) -> None:
    audit = MemoryAuditLog()
    api = client(publisher, audit_log=audit)
    assert api.get("/v1/audit", headers=ADMIN).status_code == 200
    refused = api.get("/v1/audit", headers=OPERATOR)
    assert refused.status_code == 403 and "needs admin" in refused.json()["reason"]
    assert api.get("/v1/audit", headers=INGEST).status_code == 403
    assert api.get("/v1/audit").status_code == 401
    assert api.get("/v1/audit", headers={"Authorization": "Bearer admin-secretX"}).status_code == 401
    assert api.delete("/v1/citizens/x", headers=OPERATOR).status_code == 403
    assert api.get("/v1/citizens/x", headers=INGEST).status_code == 403
    # an admin may do what an operator may (503: no database here, past authentication)
    assert api.get("/v1/crises", headers=ADMIN).status_code == 503
    assert [(e.actor, e.role, e.action) for e in audit.kept] == [("admin", "admin", "read_audit")]


def test_without_an_admin_token_the_admin_endpoints_are_disabled(publisher: Publisher) -> None:
    api = client(publisher, replace(SETTINGS, admin_token=Secret("")), audit_log=MemoryAuditLog())
    refused = api.get("/v1/audit", headers=OPERATOR)
    assert refused.status_code == 401 and "CRISISWATCH_ADMIN_TOKEN" in refused.json()["reason"]


def test_each_token_has_its_rate_and_beyond_it_gets_429_with_retry_after(publisher: Publisher) -> None:
    clock = Clock()
    api = client(publisher, monotonic=clock)
    assert [api.get("/v1/crises", headers=OPERATOR).status_code for _ in range(2)] == [503, 503]
    limited = api.get("/v1/crises", headers=OPERATOR)
    assert limited.status_code == 429
    assert limited.json()["error"] == "rate_limited" and "CRISISWATCH_API_RATE_LIMITS" in limited.json()["reason"]
    assert int(limited.headers["Retry-After"]) >= 1
    assert api.get("/v1/crises", headers=ADMIN).status_code == 503  # another token, another bucket
    clock.now += 1.0
    assert api.get("/v1/crises", headers=OPERATOR).status_code == 503


def test_every_response_has_security_headers_and_html_a_content_security_policy(publisher: Publisher) -> None:
    api = client(publisher)
    for response in (api.get("/health"), api.get("/v1/crises"), api.get("/nowhere"), api.get("/openapi.json")):
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["Referrer-Policy"] == "no-referrer"
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    docs = api.get("/docs")
    assert docs.headers["content-type"].startswith("text/html")
    assert "frame-ancestors 'none'" in docs.headers["Content-Security-Policy"]
    page = api.get("/r/not-a-link")  # a page that sets its own, stricter policy keeps it
    assert page.headers["Content-Security-Policy"].startswith("default-src 'none'")


def test_cors_is_closed_by_default_and_open_only_to_the_origins_configured(publisher: Publisher) -> None:
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization"}
    closed = client(publisher)
    assert "access-control-allow-origin" not in closed.options("/v1/crises", headers=preflight).headers
    assert "access-control-allow-origin" not in closed.get("/health", headers={"Origin": "https://evil.example"}).headers

    opened = client(publisher, replace(SETTINGS, cors_origins=("https://ops.example.org",)))
    allowed = opened.options("/v1/crises", headers={**preflight, "Origin": "https://ops.example.org"})
    assert allowed.headers["access-control-allow-origin"] == "https://ops.example.org"
    assert "access-control-allow-origin" not in opened.options("/v1/crises", headers=preflight).headers


def test_cors_origins_must_be_exact(publisher: Publisher) -> None:
    assert Settings.from_env({"CRISISWATCH_CORS_ORIGINS": "https://a.example, http://b.example:8080/"}).cors_origins == \
        ("https://a.example", "http://b.example:8080")
    for bad in ("*", "ops.example.org"):
        with pytest.raises(SettingsError, match="CRISISWATCH_CORS_ORIGINS"):
            Settings.from_env({"CRISISWATCH_CORS_ORIGINS": bad})
    with pytest.raises(SettingsError, match="CRISISWATCH_API_RATE_LIMITS"):
        Settings.from_env({"CRISISWATCH_API_RATE_LIMITS": "reader:5"})


def test_reading_personal_data_is_refused_when_it_cannot_be_audited(publisher: Publisher) -> None:
    audit = MemoryAuditLog(available=False)
    api = client(publisher, audit_log=audit)
    refused = api.get("/v1/audit", headers=ADMIN)
    assert refused.status_code == 503 and refused.json()["error"] == "audit_unavailable"
    assert client(publisher).get("/v1/audit", headers=ADMIN).status_code == 503  # no audit log at all


class Registry:
    """The registry's consent lookup, away or back."""

    def __init__(self) -> None:
        self.away = True
        self.asked = 0

    def untracked(self, citizen_ids: object) -> set[str]:
        from producers.crisis_store import StoreUnavailable

        self.asked += 1
        if self.away:
            raise StoreUnavailable("PostgreSQL is unavailable: test")
        return {"u"}


def test_consent_lookups_pause_while_the_registry_is_away(publisher: Publisher) -> None:
    from pipeline.testing import make_checkin
    from producers.api import CONSENT_RETRY_S
    from schemas import encode

    clock, registry = Clock(), Registry()
    api = client(publisher, citizen_store=registry, monotonic=clock)
    body = encode(make_checkin("u", -6.2, 106.8, observed_at=datetime(2025, 3, 1, tzinfo=UTC))).decode()
    first = api.post("/v1/checkins", content=body, headers=INGEST)  # not checked: goes on to publish (no broker: 503)
    assert first.status_code == 503 and registry.asked == 1, first.text
    api.post("/v1/checkins", content=body, headers=INGEST)
    assert registry.asked == 1  # not asked again meanwhile: no request waits for an absent database
    registry.away = False
    clock.now += CONSENT_RETRY_S + 0.1
    refused = api.post("/v1/checkins", content=body, headers=INGEST)
    assert refused.status_code == 422 and refused.json()["error"] == "no_consent" and registry.asked == 2


def test_routes_other_modules_add_use_the_same_roles_and_audit_log(publisher: Publisher) -> None:
    audit = MemoryAuditLog()
    api = client(publisher, audit_log=audit)
    app = api.app

    @app.get("/v1/elsewhere", dependencies=app.state.requires["operator"])  # type: ignore[attr-defined]
    async def elsewhere(request: Request) -> JSONResponse:
        await request.app.state.audit(request, "export", "k1", required=True)
        return JSONResponse({"ok": True})

    assert api.get("/v1/elsewhere", headers=INGEST).status_code == 403
    assert api.get("/v1/elsewhere", headers=OPERATOR).status_code == 200
    assert [(e.actor, e.action, e.subject) for e in audit.kept] == [("operator", "export", "k1")]
