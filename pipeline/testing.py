"""Builders for events with sensible defaults, for tests, the demo and scripts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from schemas import Checkin, Crisis

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def square(lon: float, lat: float, half_side_deg: float) -> dict[str, Any]:
    """A GeoJSON square centred on (lon, lat)."""
    x0, x1, y0, y1 = lon - half_side_deg, lon + half_side_deg, lat - half_side_deg, lat + half_side_deg
    return {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}


def make_crisis(crisis_id: str = "c-1", geometry: Mapping[str, Any] | None = None, *, version: int = 1,
                op: str = "upsert", buffer_km: float = 0.0, effective: datetime = T0, expires: datetime | None = None,
                severity: str = "severe", title: str = "Flooding", country_codes: Sequence[str] = ("ID",),
                status: str = "actual", source: str = "operator") -> Crisis:
    return Crisis(
        crisis_id=crisis_id, op=op, version=version, source=source, source_ref=crisis_id,  # type: ignore[arg-type]
        title=title, category="met", severity=severity, urgency="immediate", certainty="observed",  # type: ignore[arg-type]
        geometry=geometry if geometry is not None or op == "cancel" else square(106.8, -6.2, 0.1),
        buffer_km=buffer_km, country_codes=tuple(country_codes), effective=effective, expires=expires,
        instruction="Move to higher ground.", url="", references=(), status=status)


def make_checkin(citizen_id: str, lat: float, lon: float, observed_at: datetime = T0,
                 accuracy_m: float | None = 10.0, source: str = "app") -> Checkin:
    return Checkin(citizen_id, lat, lon, observed_at, source, accuracy_m)  # type: ignore[arg-type]
