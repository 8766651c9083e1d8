"""The benchmark harness: medians of the rounds, targets, and a missing or failing module shown as
missing with its reason, never as a number."""

from __future__ import annotations

import json

from bench.__main__ import KEYS, Outcome, collect, in_child, main, render
from bench.workload import workload


def test_median_of_rounds_and_target() -> None:
    table = collect([Outcome("geofence", {"geofence_points_per_s": [3.0, 1.0, 2.0],
                                          "geofence_vs_bare_shapely_ratio": [0.6, 0.4, 0.7]}, None, 1.0)])
    assert table["geofence_points_per_s"]["median"] == 2.0
    assert table["geofence_points_per_s"]["rounds"] == [3.0, 1.0, 2.0]
    assert table["geofence_points_per_s"]["met"] is False
    assert table["geofence_vs_bare_shapely_ratio"]["met"] is True


def test_failed_module_keys_are_missing_with_its_error() -> None:
    table = collect([Outcome("latency", {}, "timed out after 300 s", 300.0),
                     Outcome("geofence", {"geofence_points_per_s": [1.0]}, None, 1.0)])
    for key in ("latency_p50_ms", "latency_p99_ms", "latency_vs_passthrough_p99_ratio"):
        assert table[key] == {"missing": True, "error": "timed out after 300 s", "module": "latency"}
    assert table["geofence_vs_naive_ratio"]["missing"] is True
    assert "did not report" in table["geofence_vs_naive_ratio"]["error"]
    assert table["sweep_first_warning_s"]["error"] == "bench.sweep not run"
    assert set(KEYS) <= set(table)
    text = render(table, {"quick": True, "date": "d", "machine": "m", "module_seconds": {"latency": 300.0}})
    assert "timed out after 300 s" in text


def test_a_module_that_cannot_run_is_reported_not_fatal() -> None:
    outcome = in_child("no_such_benchmark", quick=True, timeout_s=120, verbose=False)
    assert outcome.values == {}
    assert outcome.error is not None and "no_such_benchmark" in outcome.error


def test_json_has_every_key(capsys: object) -> None:
    main(["--json", "--only", "sweep"])  # whether or not bench.sweep exists yet, every key is there
    out = json.loads(capsys.readouterr().out)  # type: ignore[attr-defined]
    assert set(KEYS) <= set(out)
    assert "_run" in out and "machine" in out["_run"]
    assert out["geofence_points_per_s"]["missing"] is True


def test_workload_is_seeded_and_has_its_share_inside() -> None:
    load = workload(50)
    assert len(load.crises) == 50
    a, b = load.citizens(2000, inside_share=0.2), load.citizens(2000, inside_share=0.2)
    assert a.lats.tolist() == b.lats.tolist()
    assert 0.15 < a.inside.mean() < 0.25
    from pipeline.domain.geofence import CrisisIndex

    found = CrisisIndex(load.crises).match_columns(a.lats, a.lons)
    inside_own = {(int(p), int(c)) for p, c, d in zip(found.point, found.crisis, found.distance_km, strict=True) if d == 0.0}
    placed = {(i, int(c)) for i, c in enumerate(a.crisis.tolist()) if a.inside[i]}
    assert placed <= inside_own  # everyone placed inside is inside the crisis they were placed in
