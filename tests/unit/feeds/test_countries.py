"""Country areas and codes from the shipped Natural Earth derivative."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from shapely.geometry import Point, shape

from pipeline.domain.countries import (
    all_countries,
    countries_for,
    country,
    country_geometry,
    derive_countries,
    iso2_from_iso3,
    iso2_from_name,
)
from pipeline.domain.geometry import bbox, circle

NATURAL_EARTH = Path(__file__).resolve().parents[4] / "shared" / "samples" / "boundaries" / "ne_110m_admin_0_countries.geojson"
SHIPPED = Path(__file__).resolve().parents[3] / "pipeline" / "data" / "countries.geojson"


def test_every_shipped_area_is_valid_split_and_coded() -> None:
    countries = all_countries()
    assert len(countries) == 203
    assert len({c.iso2 for c in countries}) == len(countries)
    for c in countries:
        assert len(c.iso2) == 2 and c.iso2.isupper() and len(c.iso3) == 3
        area = shape(c.geometry)
        assert area.is_valid, c.iso2
        minx, miny, maxx, maxy = area.bounds
        assert -180 <= minx <= maxx <= 180 and -90 <= miny <= maxy <= 90


@pytest.mark.parametrize(("iso2", "inside", "outside"), [
    ("FR", (2.35, 48.85), (-3.7, 40.4)),        # ISO_A3 is -99 in Natural Earth: joined on ADM0_A3
    ("NO", (10.75, 59.91), (18.07, 59.33)),
    ("FJ", (178.44, -18.14), (0.0, -18.0)),     # split at ±180, no band around the globe
    ("FJ", (-179.95, -16.3), (170.0, -16.3)),
    ("RU", (177.5, 64.7), (-100.0, 64.7)),      # Chukotka, east of 180
    ("CY", (33.36, 35.3), (35.5, 33.9)),        # Northern Cyprus merged into Cyprus
    ("SO", (44.06, 9.56), (42.6, 11.6)),        # Somaliland merged into Somalia
    ("SG", (103.82, 1.35), (101.7, 3.1)),       # tiny country: a 50 km circle
])
def test_country_areas_cover_their_capitals_and_not_their_neighbours(iso2: str, inside: tuple[float, float],
                                                                   outside: tuple[float, float]) -> None:
    area = country_geometry(iso2)
    assert area is not None
    assert shape(area).covers(Point(*inside))
    assert not shape(area).covers(Point(*outside))


def test_unknown_or_pointless_country_has_no_area() -> None:
    assert country_geometry("ZZ") is None
    assert country_geometry("AD") is None  # Andorra: in neither 1:110m layer
    sg = country("sg")
    assert sg is not None and sg.approximate
    fr = country("FR")
    assert fr is not None and not fr.approximate


def test_country_geometry_is_a_fresh_copy() -> None:
    first = country_geometry("FR")
    assert first is not None
    first["type"] = "broken"
    assert country_geometry("FR") == country_geometry("FR")
    assert country_geometry("FR")["type"] == "MultiPolygon"  # type: ignore[index]


def test_countries_for_an_area() -> None:
    assert countries_for(circle(48.85, 2.35, 600)) == ("AT", "BE", "CH", "DE", "FR", "GB", "IT", "LU", "NL")
    assert countries_for(bbox(-183.4738, -175.4738, -26.0701, -18.0701)) == ("FJ", "TO")
    assert countries_for(circle(0.0, -140.0, 100)) == ()


@pytest.mark.parametrize(("iso3", "iso2"), [("FRA", "FR"), ("idn", "ID"), ("NOR", "NO"), ("PSE", "PS"), ("TON", "TO"),
                                            ("XKX", "XK"), ("CYP", "CY"), ("ABC", None)])
def test_iso2_from_iso3(iso3: str, iso2: str | None) -> None:
    assert iso2_from_iso3(iso3) == iso2


@pytest.mark.parametrize(("name", "iso2"), [
    ("India", "IN"), ("Myanmar", "MM"), ("Burma", "MM"), ("Viet Nam", "VN"), ("Côte d'Ivoire", "CI"),
    ("COTE D'IVOIRE", "CI"), ("DR Congo", "CD"), ("Democratic Republic of the Congo", "CD"), ("Congo", "CG"),
    ("United States of America", "US"), ("Russian Federation", "RU"), ("Korea, Republic of", "KR"),
    ("Bosnia and Herz.", "BA"), ("Bosnia and Herzegovina", "BA"), ("St. Helena", "SH"), ("Somaliland", "SO"),
    ("Myanmar-India Border Region", None), ("", None),
])
def test_iso2_from_name(name: str, iso2: str | None) -> None:
    assert iso2_from_name(name) == iso2


@pytest.mark.skipif(not NATURAL_EARTH.is_file(), reason="Natural Earth copy not present")
def test_shipped_file_is_the_documented_derivation_of_natural_earth() -> None:
    derived = derive_countries(json.loads(NATURAL_EARTH.read_text()))
    shipped = json.loads(SHIPPED.read_text(encoding="utf-8"))
    assert derived == shipped
