"""The operator's page: a map of the active crises, their counts live, the latest warnings and cases,
and a form to declare, update or cancel a crisis — served by the ingest API, offline.

Why it looks the way it does:

- **No internet.** A crisis centre's network may be cut off exactly when it is needed. The page, its
  script, Leaflet (vendored with its licence under ``static/vendor``) and the base layer (the Natural
  Earth outlines the pipeline already ships, ``pipeline/data/countries.geojson``) all come from this
  process; there is no tile server.
- **One way to declare a crisis.** The form posts to ``POST /v1/crises`` like any other client, so an
  area drawn on the map gets exactly the validation and repair of the API, and the API's refusal
  reason is what the operator reads.
- **The token never in a URL.** The page asks for the operator token, keeps it in
  ``sessionStorage`` (gone when the tab closes) and sends it as ``Authorization: Bearer``; the page
  and its files need no token, every data endpoint does. Server-sent events cannot send that header,
  so the page polls (every :data:`REFRESH_S` seconds).
- **Counts, not dots.** The overview holds counts per crisis and no coordinates of anybody. Only when
  an operator opens one active crisis are the citizens whose latest standing there is inside or near
  shown as points (``GET /v1/crises/{id}/citizens``): where they were when last warned, as the
  accountability counts define "inside" and "near" (:mod:`pipeline.domain.accountability`).
- **A strict Content-Security-Policy.** Scripts, styles, images and requests from this origin only,
  no inline script or style, no framing (:data:`PAGE_HEADERS`).
"""

from __future__ import annotations

import mimetypes
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any, Final, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from pipeline.domain.accountability import COUNT_NAMES
from pipeline.domain.map_view import proximity_band
from producers.api import ApiError, ErrorBody, from_store
from producers.crisis_store import MAX_FEED_ENTRIES, PostgresReader
from schemas import format_time

REFRESH_S: Final = 3.0
LATEST: Final = 25  # warnings and cases listed on the page
MAX_POINTS: Final = 5000  # citizens shown for one opened crisis; more are counted, not drawn
_BAND_CACHE_SIZE: Final = 512
_CRISIS_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}", re.ASCII)  # crisis/1's crisis_id

PAGE_HEADERS: Final = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_ZONE_OF_KIND: Final = {"inside": "inside", "entered": "inside", "near": "near"}

_CRISES_SQL: Final = (
    "SELECT c.crisis_id, c.version, c.source, c.title, c.category, c.severity, c.urgency, c.certainty, c.geometry, "
    "c.buffer_km, c.country_codes, c.effective, c.expires, c.instruction, s.as_of, "
    + ", ".join(f"s.{name}" for name in COUNT_NAMES)
    + " FROM crises_current c LEFT JOIN crisis_status s USING (crisis_id) "
    "WHERE c.op <> 'cancel' AND (c.expires IS NULL OR c.expires > %s) ORDER BY c.recorded_at DESC, c.crisis_id LIMIT %s")
_WARNINGS_SQL: Final = ("SELECT warning_id, citizen_id, crisis_id, kind, severity, title, distance_km, country_codes, "
                        "emitted_at FROM warnings ORDER BY emitted_at DESC, warning_id DESC LIMIT %s")
_CASES_SQL: Final = ("SELECT case_id, citizen_id, crisis_id, kind, state, assignee, country, opened_at, updated_at "
                     "FROM cases ORDER BY updated_at DESC, case_id LIMIT %s")
_ACTIVE_SQL: Final = ("SELECT op <> 'cancel' AND (expires IS NULL OR expires > %s) AS active FROM crises_current "
                      "WHERE crisis_id = %s")
# The latest warning of each citizen in the crisis decides their zone, as in accountability's COUNTS_SQL.
_CITIZENS_SQL: Final = (
    "SELECT citizen_id, kind, distance_km, lat, lon, emitted_at FROM ("
    " SELECT DISTINCT ON (citizen_id) citizen_id, kind, distance_km, lat, lon, emitted_at FROM warnings"
    " WHERE crisis_id = %s ORDER BY citizen_id, emitted_at DESC, warning_id DESC) latest "
    "WHERE kind IN ('inside', 'entered', 'near') ORDER BY citizen_id LIMIT %s")


class NotActive(Exception):
    """The crisis exists but was cancelled or has expired: its people are no longer shown one by one."""


class OperatorStore(Protocol):
    def overview(self, now: datetime) -> dict[str, Any]:
        """The active crises with areas, bands and counts; the latest warnings and cases (no coordinates)."""
        ...

    def citizens(self, crisis_id: str, now: datetime) -> list[dict[str, Any]] | None:
        """The citizens inside or near an active crisis, as points; None for an unknown crisis.
        Raises :class:`NotActive` for a cancelled or expired one."""
        ...


class PostgresOperatorStore(PostgresReader):
    """The page's reads, on one short-timeout connection (:class:`~producers.crisis_store.PostgresReader`)."""

    def __init__(self, database_url: str) -> None:
        super().__init__(database_url)
        self._bands: OrderedDict[tuple[str, int], dict[str, Any] | None] = OrderedDict()
        self._bands_lock = threading.Lock()

    def overview(self, now: datetime) -> dict[str, Any]:
        crises = [self._crisis(row) for row in self._rows(_CRISES_SQL, (now, MAX_FEED_ENTRIES))]
        warnings = [{**row, "emitted_at": _time(row["emitted_at"]), "country_codes": list(row["country_codes"] or ())}
                    for row in self._rows(_WARNINGS_SQL, (LATEST,))]
        cases = [{**row, "opened_at": _time(row["opened_at"]), "updated_at": _time(row["updated_at"])}
                 for row in self._rows(_CASES_SQL, (LATEST,))]
        return {"as_of": format_time(now), "refresh_s": REFRESH_S, "crises": crises, "warnings": warnings, "cases": cases}

    def citizens(self, crisis_id: str, now: datetime) -> list[dict[str, Any]] | None:
        found = self._rows(_ACTIVE_SQL, (now, crisis_id))
        if not found:
            return None
        if not found[0]["active"]:
            raise NotActive(crisis_id)
        return [{"citizen_id": row["citizen_id"], "zone": _ZONE_OF_KIND[row["kind"]], "lat": row["lat"],
                 "lon": row["lon"], "distance_km": row["distance_km"], "at": _time(row["emitted_at"])}
                for row in self._rows(_CITIZENS_SQL, (crisis_id, MAX_POINTS))]

    def _crisis(self, row: dict[str, Any]) -> dict[str, Any]:
        as_of = row["as_of"]
        return {"crisis_id": row["crisis_id"], "version": row["version"], "source": row["source"], "title": row["title"],
                "category": row["category"], "severity": row["severity"], "urgency": row["urgency"],
                "certainty": row["certainty"], "buffer_km": float(row["buffer_km"]),
                "country_codes": list(row["country_codes"] or ()), "effective": _time(row["effective"]),
                "expires": None if row["expires"] is None else _time(row["expires"]), "instruction": row["instruction"],
                "geometry": row["geometry"], "band": self._band(row),
                "counts": {name: int(row[name] or 0) for name in COUNT_NAMES},
                "counts_as_of": None if as_of is None else _time(as_of)}

    def _band(self, row: dict[str, Any]) -> dict[str, Any] | None:
        """Bands cost a buffer of the area each: computed once per crisis version."""
        key = (row["crisis_id"], int(row["version"]))
        with self._bands_lock:
            if key in self._bands:
                return self._bands[key]
        band = proximity_band(row["geometry"], float(row["buffer_km"]))
        with self._bands_lock:
            self._bands[key] = band
            if len(self._bands) > _BAND_CACHE_SIZE:
                self._bands.popitem(last=False)
        return band


def _time(value: datetime) -> str:
    return format_time(value.astimezone(UTC))


# ---------------------------------------------------------------------------------------------
# Files: the page, its script and style, vendored Leaflet, the base layer. Read once, served from memory.
# ---------------------------------------------------------------------------------------------


def _files(root: Traversable, prefix: str = "") -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for entry in root.iterdir():
        if entry.is_dir():
            out.update(_files(entry, f"{prefix}{entry.name}/"))
        elif not entry.name.startswith("."):
            out[prefix + entry.name] = entry.read_bytes()
    return out


def _media_type(name: str) -> str:
    if name.endswith((".geojson", ".json")):
        return "application/json"
    if name.endswith(".js"):
        return "text/javascript; charset=utf-8"
    guessed = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return f"{guessed}; charset=utf-8" if guessed.startswith("text/") else guessed


def static_files() -> dict[str, bytes]:
    """Every file under ``producers/static`` by its relative path, and the base layer as ``countries.geojson``."""
    files = _files(resources.files("producers").joinpath("static"))
    files["countries.geojson"] = resources.files("pipeline").joinpath("data", "countries.geojson").read_bytes()
    return files


# ---------------------------------------------------------------------------------------------
# Routes.
# ---------------------------------------------------------------------------------------------


def register_operator_page(app: FastAPI, operator: Sequence[Any], clock: Callable[[], datetime],
                           store: OperatorStore | None) -> None:
    """Add the page (``/operator``, its files under ``/operator/static/``) and its data endpoints
    (``GET /v1/operator/overview``, ``GET /v1/crises/{id}/citizens``, both with the operator token)
    to the API. Without a store, the data endpoints answer 503."""
    files = static_files()
    page = files.pop("index.html")

    async def read(work: Callable[[OperatorStore], Any]) -> Any:
        return await from_store(store, work)

    @app.get("/operator", include_in_schema=False)
    async def operator_page() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers={**PAGE_HEADERS, "Cache-Control": "no-store"})

    @app.get("/operator/static/{name:path}", include_in_schema=False)
    async def operator_file(name: str) -> Response:
        body = files.get(name)
        if body is None:
            raise ApiError(404, "not_found", f"no file {name[:100]!r}")
        return Response(body, media_type=_media_type(name), headers={**PAGE_HEADERS, "Cache-Control": "no-cache"})

    errors: dict[int | str, dict[str, Any]] = {
        401: {"model": ErrorBody, "description": "missing or invalid bearer token"},
        403: {"model": ErrorBody, "description": "token not allowed on this endpoint"},
        503: {"model": ErrorBody, "description": "PostgreSQL unreachable"}}

    @app.get("/v1/operator/overview", dependencies=list(operator), tags=["operator"], responses=errors)
    async def operator_overview() -> JSONResponse:
        """What the operator's page shows: every active crisis with its area, its proximity band (the
        area grown by ``buffer_km``, for drawing) and its accountability counts; the latest warnings and
        cases. Counts only: no citizen's location."""
        now = clock()
        return JSONResponse(await read(lambda s: s.overview(now)), headers={"Cache-Control": "no-store"})

    @app.get("/v1/crises/{crisis_id:path}/citizens", dependencies=list(operator), tags=["operator"],
             responses={**errors, 404: {"model": ErrorBody, "description": "no such crisis"},
                        409: {"model": ErrorBody, "description": "the crisis was cancelled or has expired"}})
    async def crisis_citizens(crisis_id: str, request: Request) -> JSONResponse:
        """The citizens whose latest standing in an active crisis is inside or near, as points (where
        they were when last warned); for no other crisis and nobody else (data minimisation). Every
        look is an ``export`` in the audit log, written before anything is read (refused with 503 if it
        cannot be)."""
        now = clock()
        if not _CRISIS_ID.fullmatch(crisis_id):  # no such id can exist; and a NUL would never reach PostgreSQL
            raise ApiError(404, "not_found", f"no crisis {crisis_id[:130]!r}")
        await request.app.state.audit(request, "export", crisis_id, required=True)
        try:
            found = await read(lambda s: s.citizens(crisis_id, now))
        except NotActive:
            raise ApiError(409, "not_active", f"crisis {crisis_id!r} was cancelled or has expired; its citizens are "
                           "no longer shown one by one") from None
        if found is None:
            raise ApiError(404, "not_found", f"no crisis {crisis_id!r}")
        return JSONResponse({"crisis_id": crisis_id, "citizens": found, "limit": MAX_POINTS},
                            headers={"Cache-Control": "no-store"})
