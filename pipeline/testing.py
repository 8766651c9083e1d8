"""Builders for events with sensible defaults, for tests, the demo and scripts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from schemas import Checkin, Crisis

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

# Areas that test the geofence's edge cases: one split at the antimeridian, one with a hole.
FIJI_SPLIT: dict[str, Any] = {"type": "MultiPolygon", "coordinates": [
    [[[178.0, -18.5], [180.0, -18.5], [180.0, -16.0], [178.0, -16.0], [178.0, -18.5]]],
    [[[-180.0, -18.5], [-179.0, -18.5], [-179.0, -16.0], [-180.0, -16.0], [-180.0, -18.5]]],
]}
DONUT: dict[str, Any] = {"type": "Polygon", "coordinates": [
    [[10.0, 10.0], [12.0, 10.0], [12.0, 12.0], [10.0, 12.0], [10.0, 10.0]],
    [[10.5, 10.5], [10.5, 11.5], [11.5, 11.5], [11.5, 10.5], [10.5, 10.5]],
]}


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


def records_for(bootstrap: str, topic: str, keys: set[str], expected: int | None = None) -> list[Any]:
    """The records on ``topic`` whose key is one of ``keys``, read with assign + seek_to_beginning.

    Reading goes on until at least ``expected`` records were found and the topic is drained: past
    its listed end offsets (which the embedded broker may report short of the true end) and one
    poll that brought nothing new. Duplicates would therefore show. A ``checkin-batch/1`` record is
    read as the stages read it, as its check-ins (:func:`each_checkin`).
    """
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        assert partitions, f"topic {topic} has no partitions"
        consumer.assign(partitions)
        consumer.seek_to_beginning()
        end = consumer.end_offsets(partitions)
        found: list[Any] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            batches = consumer.poll(timeout_ms=500)
            found += [r for batch in batches.values() for record in batch for r in each_checkin(record)
                      if r.key is not None and r.key.decode() in keys]
            drained = not batches and all(consumer.position(tp) >= end[tp] for tp in partitions)
            if drained and len(found) >= (expected or 0):
                return found
        raise AssertionError(f"found {len(found)} of {expected} records on {topic} in 30 s")
    finally:
        consumer.close()


def each_checkin(record: Any) -> list[Any]:
    """A kafka-python record of a ``checkin-batch/1`` as one record per check-in, as every stage reads
    it: the value the check-in's bytes, the key its citizen, partition and offset the batch's. Any
    other record as it is."""
    from schemas import InvalidEvent
    from schemas.fast import citizen_of, split_checkin_batch

    try:
        items = split_checkin_batch(record.value) if record.value else None
    except InvalidEvent:
        items = None
    if items is None:
        return [record]
    return [record._replace(key=None if (c := citizen_of(item)) is None else c.encode(), value=item) for item in items]


def assert_normalised_area(geojson: Mapping[str, Any]) -> None:
    """What the geometry normaliser promises: a valid Polygon/MultiPolygon with closed rings of at least
    four positions, lon within ±180 and lat within ±90, exteriors counter-clockwise, a positive area."""
    import shapely
    from shapely.geometry import shape

    assert geojson["type"] in ("Polygon", "MultiPolygon"), geojson["type"]
    polygons = [geojson["coordinates"]] if geojson["type"] == "Polygon" else geojson["coordinates"]
    for rings in polygons:
        for ring in rings:
            assert len(ring) >= 4, ring
            assert ring[0] == ring[-1], "ring not closed"
            assert all(-180.0 <= lon <= 180.0 and -90.0 <= lat <= 90.0 for lon, lat in ring), ring
        assert shapely.is_ccw(shapely.LinearRing(rings[0])), "exterior ring is clockwise"
    area = shape(geojson)
    assert area.is_valid, shapely.is_valid_reason(area)
    assert area.area > 0



class VerbProcess:
    """A ``crisiswatch <verb>`` child process for tests: started, waited on until its ``/health`` on
    ``port`` answers 200, stopped by signal to its whole process group. Its output goes to ``log``,
    which failures quote."""

    def __init__(self, verb: str, env: Mapping[str, str], log: Path, port: int, host: str = "127.0.0.1",
                 args: Sequence[str] = ()) -> None:
        self.verb, self.env, self.log, self.args = verb, dict(env), log, list(args)
        self.health = f"http://{host}:{port}/health"
        self.metrics = f"http://{host}:{port}/metrics"
        self.process: subprocess.Popen[bytes] | None = None

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def start(self, timeout_s: float = 90.0) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", self.verb, *self.args], env=self.env, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.verb} not healthy after {timeout_s:.0f}s: {self.tail()}")
            time.sleep(0.3)

    def healthy(self) -> bool:
        """Whether ``/health`` answers 200; raises if the process has exited."""
        if self.process is None or self.process.poll() is not None:
            code = None if self.process is None else self.process.returncode
            raise AssertionError(f"{self.verb} exited with {code}: {self.tail()}")
        try:
            with urllib.request.urlopen(self.health, timeout=2) as response:  # noqa: S310 - a loopback URL built here
                return bool(response.status == 200)
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            self.process.wait(timeout=timeout_s)
