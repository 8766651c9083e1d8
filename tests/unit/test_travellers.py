"""The simulated travellers: who they are, where they report from, and when."""

from __future__ import annotations

import re
from collections import Counter
from datetime import UTC, datetime, timedelta
from itertools import pairwise

import pytest

from pipeline.domain.travellers import (
    ACCURACY_M,
    EXCURSION_MAX_KM,
    City,
    TravellerModel,
    city_spread_m,
    distance_m,
)
from producers.cities import find_city, load_cities, parse_countries
from schemas import Checkin, Citizen, check

START = datetime(2025, 3, 1, 6, 0, tzinfo=UTC)
TOKYO = City("Tokyo", "JP", 35.6895, 139.69171, 9_733_276)
OSAKA = City("Osaka", "JP", 34.69374, 135.50218, 2_592_413)
KUALA_LUMPUR = City("Kuala Lumpur", "MY", 3.1412, 101.68653, 1_453_975)
JEDDAH = City("Jeddah", "SA", 21.54238, 39.19797, 2_867_446)
ONE_CITY_PER_COUNTRY = [TOKYO, KUALA_LUMPUR, JEDDAH]

RESERVED_PHONE = re.compile(r"^\+(447700900\d{3}|1\d{3}55501\d{2})$")


def model(n: int = 300, seed: int = 7, cities: list[City] | None = None) -> TravellerModel:
    return TravellerModel(ONE_CITY_PER_COUNTRY if cities is None else cities, n, seed, START)


def as_dicts(events: list[Checkin] | list[Citizen]) -> list[dict[str, object]]:
    return [e.to_dict() for e in events]


def test_the_same_seed_gives_the_same_travellers_and_reports() -> None:
    a, b = model(seed=42), model(seed=42)
    assert as_dicts(a.citizens()) == as_dicts(b.citizens())
    assert as_dicts(list(a.checkins(100, 5))) == as_dicts(list(b.checkins(100, 5)))
    assert as_dicts(a.step(START + timedelta(hours=6))) == as_dicts(b.step(START + timedelta(hours=6)))
    assert as_dicts(model(seed=43).citizens()) != as_dicts(a.citizens())


def test_registrations_are_valid_and_harmless() -> None:
    citizens = model(n=500).citizens()
    for citizen in citizens:
        assert check(citizen.to_dict()) == "citizen/1"
        assert citizen.channels, "every traveller can be reached somehow"
        for channel in citizen.channels:
            if channel.type == "sms":
                assert RESERVED_PHONE.match(channel.address), channel.address
            elif channel.type == "email":
                assert channel.address.endswith("@example.org")
            elif channel.type == "webhook":
                assert channel.address.startswith("https://hooks.example.org/")
        for contact in citizen.emergency_contacts:
            assert RESERVED_PHONE.match(contact["phone"])
        assert citizen.trip is not None and citizen.trip["country"] in {"JP", "MY", "SA"}
    assert len({c.citizen_id for c in citizens}) == len(citizens)
    nationalities = Counter(c.nationality for c in citizens)
    assert nationalities["ID"] > 0.9 * len(citizens)
    assert Counter(c.language for c in citizens)["id"] > 0.7 * len(citizens)


def test_home_cities_follow_population() -> None:
    big, small = TOKYO, City("Sapporo", "JP", 43.06417, 141.34694, 1_000_000)
    m = TravellerModel([big, small], 2000, 3, START)
    homes = Counter(m.traveller(c.citizen_id).city.name for c in m.citizens())
    share_big = homes["Tokyo"] / 2000
    assert 0.85 < share_big < 0.95  # 9.7 M of 10.7 M people


def test_country_weights_pick_the_country_first() -> None:
    m = TravellerModel(ONE_CITY_PER_COUNTRY, 1000, 5, START, country_weights={"MY": 3, "SA": 1, "XX": 5})
    countries = Counter(c.trip["country"] for c in m.citizens() if c.trip is not None)
    assert set(countries) == {"MY", "SA"}
    assert countries["MY"] > 2 * countries["SA"]


def test_reports_stay_near_the_home_city_over_two_days() -> None:
    m = model(n=100)
    homes = {c.citizen_id: m.traveller(c.citizen_id).city for c in m.citizens()}
    reports = m.step(START + timedelta(days=2))
    assert len({r.citizen_id for r in reports}) == 100
    for report in reports[::25]:
        assert check(report.to_dict()) == "checkin/1"
    for report in reports:
        home = homes[report.citizen_id]
        # hotel at most 3 spreads out, excursions at most 30 km, plus a wide GPS error
        limit = 3 * city_spread_m(home) + EXCURSION_MAX_KM * 1000 + 5 * ACCURACY_M["sms"][1]
        assert distance_m((report.lat, report.lon), (home.lat, home.lon)) <= limit


def test_travellers_go_out_and_come_back() -> None:
    m = model(n=50)
    reports = [r for r in m.step(START + timedelta(days=2)) if r.source == "app"]
    by_traveller: dict[str, list[Checkin]] = {}
    for r in reports:
        by_traveller.setdefault(r.citizen_id, []).append(r)
    movers = sum(1 for rs in by_traveller.values()
                 if max(distance_m((a.lat, a.lon), (rs[0].lat, rs[0].lon)) for a in rs) > 1000)
    assert movers > len(by_traveller) // 2, "most app users leave their hotel at least once in two days"


def test_some_travellers_move_to_another_city_of_the_same_country() -> None:
    m = model(n=200, cities=[TOKYO, OSAKA])
    before = {c.citizen_id: m.traveller(c.citizen_id).city for c in m.citizens()}
    for hours in range(0, 10 * 24, 6):
        for cid in before:
            m.position(cid, START + timedelta(hours=hours))
    moved = [cid for cid, city in before.items() if m.traveller(cid).city != city]
    assert moved
    assert all(m.traveller(cid).city.country_code == "JP" for cid in moved)


def test_accuracy_depends_on_how_the_location_was_obtained() -> None:
    reports = model(n=300).step(START + timedelta(hours=12))
    by_source: dict[str, list[float]] = {}
    for r in reports:
        assert r.accuracy_m is not None
        by_source.setdefault(r.source, []).append(r.accuracy_m)
    assert {"app", "sms"} <= set(by_source)
    assert all(5 <= a <= 50 for a in by_source["app"])
    assert all(300 <= a <= 3000 for a in by_source["sms"])


def test_step_returns_due_reports_in_time_order_and_each_once() -> None:
    m = model(n=100)
    first = m.step(START + timedelta(minutes=30))
    second = m.step(START + timedelta(minutes=60))
    for batch, low, high in ((first, START, START + timedelta(minutes=30)),
                             (second, START + timedelta(minutes=30), START + timedelta(minutes=60))):
        times = [r.observed_at for r in batch]
        assert times == sorted(times)
        assert all(low <= t <= high for t in times)
    assert first[-1].observed_at <= second[0].observed_at
    assert m.step(START + timedelta(minutes=60)) == []


def test_stream_has_the_requested_rate_and_shares_turns() -> None:
    m = model(n=40)
    stream = list(m.checkins(rate_per_s=200, duration_s=3))
    assert len(stream) == 600
    times = [r.observed_at for r in stream]
    assert times[0] == START
    assert all(b - a == timedelta(microseconds=5000) for a, b in pairwise(times))
    assert set(Counter(r.citizen_id for r in stream).values()) == {15}
    assert all(check(r.to_dict()) == "checkin/1" for r in stream)


def test_endless_stream_starts_where_asked() -> None:
    m = model(n=3)
    later = START + timedelta(hours=1)
    it = m.checkins(rate_per_s=10, start=later)
    first_thousand = [next(it) for _ in range(1000)]
    assert first_thousand[0].observed_at == later
    assert first_thousand[-1].observed_at == later + timedelta(seconds=99.9)


def test_a_cluster_is_placed_within_its_radius_and_stays_put_without_roaming() -> None:
    m = TravellerModel([TOKYO], 0, 1, START)
    shinjuku = City("Shinjuku", "JP", 35.6938, 139.7034, 0)
    cluster = m.add_cluster(shinjuku, 500, radius_km=3, roam=False)
    assert len(cluster) == len(m) == 500
    later = START + timedelta(days=1)
    for citizen in cluster:
        where = m.position(citizen.citizen_id, later)
        assert distance_m(where, (shinjuku.lat, shinjuku.lon)) <= 3000 + 1
        assert where == m.traveller(citizen.citizen_id).hotel
    assert len(m.within(shinjuku.lat, shinjuku.lon, 3.01, later)) == 500


def test_move_into_reports_along_the_way_and_stays_there() -> None:
    m = TravellerModel([TOKYO], 0, 1, START)
    [citizen] = m.add_cluster(TOKYO, 1, radius_km=1, roam=False)
    cid = citizen.citizen_id
    target = (35.3606, 138.7274)  # Mount Fuji, ~80 km away
    at = START + timedelta(hours=1)
    track = m.move_into(cid, *target, at, travel_s=3600, steps=4)
    assert [r.observed_at for r in track] == [at + timedelta(minutes=15 * i) for i in (1, 2, 3, 4)]
    assert (track[-1].lat, track[-1].lon) == target
    gaps = [distance_m((r.lat, r.lon), target) for r in track]
    assert gaps == sorted(gaps, reverse=True)
    assert m.within(*target, 0.1, at + timedelta(days=5)) == [cid]

    back_at = at + timedelta(days=5)
    [home] = m.return_to_base(cid, back_at)
    assert (home.lat, home.lon) == pytest.approx(m.traveller(cid).hotel, abs=1e-6)
    assert m.within(*target, 0.1, back_at + timedelta(hours=1)) == []


def test_move_into_an_unknown_traveller_is_a_clear_error() -> None:
    with pytest.raises(KeyError, match="no simulated traveller 'nobody'"):
        model(n=1).move_into("nobody", 0.0, 0.0, START)


def test_naive_start_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        TravellerModel([TOKYO], 1, 1, datetime(2025, 1, 1))


def test_real_cities_filtered_by_country_and_population() -> None:
    japan = load_cities(["jp"], min_population=1_000_000)
    assert japan and all(c.country_code == "JP" and c.population >= 1_000_000 for c in japan)
    assert "Osaka" in {c.name for c in japan}
    tokyo = find_city("tokyo")
    assert (tokyo.country_code, round(tokyo.lat), round(tokyo.lon)) == ("JP", 36, 140)
    with pytest.raises(KeyError):
        find_city("Nowhere Such Town")
    assert parse_countries(" id, JP ,id") == ("ID", "JP")
    with pytest.raises(ValueError, match="IDN"):
        parse_countries("IDN")
