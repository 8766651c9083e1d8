"""Country polygons and country codes (ISO 3166-1), from the shipped ``pipeline/data/countries.geojson``.

The data is derived from Natural Earth 1:110m Admin-0 (public domain); see
``pipeline/data/PROVENANCE.md`` for the source, version and transformation, and
:func:`derive_countries` for the transformation itself. It is loaded lazily, once, on first use.

Countries too small to have a polygon at 1:110m (Singapore, Bahrain, Malta, the Pacific island
states...) are represented by a circle of :data:`TINY_COUNTRY_RADIUS_KM` around Natural Earth's
point for them; their features carry ``"approximate": true``. Countries in neither layer (e.g.
Andorra, Dominica, Cabo Verde) have no geometry: :func:`country_geometry` returns ``None`` for
them and callers must say so rather than invent an area.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import shapely
from shapely.geometry.base import BaseGeometry
from shapely.strtree import STRtree

from pipeline.domain import geometry

__all__ = [
    "TINY_COUNTRY_RADIUS_KM",
    "Country",
    "all_countries",
    "countries_for",
    "country",
    "country_geometry",
    "derive_countries",
    "iso2_from_iso3",
    "iso2_from_name",
]

# Radius of the circle standing for a country that 1:110m data only knows as a point. 50 km
# covers the main island or city of most of them (Singapore, Bahrain, Malta, Mauritius, Guam);
# archipelagos spread wider (Maldives, Kiribati) are only partly covered, which is why these
# features are marked approximate.
TINY_COUNTRY_RADIUS_KM = 50.0

_COORDINATE_DECIMALS = 5  # ~1 m, far below the ~1 km detail of 1:110m data


@dataclass(frozen=True, slots=True)
class Country:
    iso2: str
    iso3: str
    name: str
    geometry: Mapping[str, Any]
    approximate: bool = False


def country(iso2: str) -> Country | None:
    """The country with this ISO 3166-1 alpha-2 code (case-insensitive), if the data has it."""
    return _data().by_iso2.get(iso2.strip().upper())


def country_geometry(iso2: str) -> dict[str, Any] | None:
    """The normalised GeoJSON area of a country, or ``None`` when the shipped data has none."""
    found = country(iso2)
    return None if found is None else json.loads(json.dumps(found.geometry))


def countries_for(geometry_: Mapping[str, Any]) -> tuple[str, ...]:
    """Sorted ISO 3166-1 alpha-2 codes of the countries a (normalised) area touches."""
    data = _data()
    area = shapely.geometry.shape(geometry_)
    hits = data.tree.query(area, predicate="intersects")
    return tuple(sorted({data.countries[int(i)].iso2 for i in hits}))


def iso2_from_iso3(iso3: str) -> str | None:
    """ISO alpha-3 to alpha-2 (``"IDN"`` -> ``"ID"``); ``None`` when unknown."""
    return _data().by_iso3.get(iso3.strip().upper())


def iso2_from_name(name: str) -> str | None:
    """A country name as feeds write it (``"Viet Nam"``, ``"Côte d'Ivoire"``, ``"DR Congo"``) to alpha-2."""
    return _data().by_name.get(_name_key(name))


def all_countries() -> tuple[Country, ...]:
    return _data().countries


# --- loading -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Data:
    countries: tuple[Country, ...]
    by_iso2: Mapping[str, Country]
    by_iso3: Mapping[str, str]
    by_name: Mapping[str, str]
    tree: STRtree


def _name_key(name: str) -> str:
    folded = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii").casefold()
    folded = folded.replace("&", " and ")
    folded = re.sub(r"\bst\b\.?", "saint", folded)
    return " ".join(re.sub(r"[^a-z0-9]+", " ", folded).split())


@functools.cache
def _data() -> _Data:
    text = resources.files("pipeline").joinpath("data/countries.geojson").read_text(encoding="utf-8")
    collection = json.loads(text)
    countries: list[Country] = []
    by_name: dict[str, str] = {}
    for feature in collection["features"]:
        props = feature["properties"]
        entry = Country(props["iso2"], props["iso3"], props["name"], feature["geometry"], bool(props.get("approximate", False)))
        countries.append(entry)
        for name in (entry.name, *props.get("names", ())):
            by_name.setdefault(_name_key(name), entry.iso2)
    shapes: list[BaseGeometry] = [shapely.geometry.shape(c.geometry) for c in countries]
    return _Data(
        countries=tuple(countries),
        by_iso2={c.iso2: c for c in countries},
        by_iso3={c.iso3: c.iso2 for c in countries},
        by_name=by_name,
        tree=STRtree(shapes),
    )


# --- derivation of the shipped data ------------------------------------------------------------

# Natural Earth features whose ISO_A2/ISO_A3 are "-99": their real codes, by ADM0_A3. Northern
# Cyprus and Somaliland have no ISO 3166 code of their own; ISO 3166 counts them as part of
# Cyprus and Somalia, and so do travel advisories, so their polygons are merged into those.
_CODES_BY_ADM0_A3: dict[str, tuple[str, str]] = {
    "FRA": ("FR", "FRA"),
    "NOR": ("NO", "NOR"),
    "KOS": ("XK", "XKX"),  # user-assigned code used by the EU, IMF and most travel advisories
    "CYN": ("CY", "CYP"),
    "SOL": ("SO", "SOM"),
}

# Names feeds use that Natural Earth's name fields lack.
_EXTRA_NAMES: dict[str, tuple[str, ...]] = {
    "BO": ("Bolivia (Plurinational State of)",),
    "CD": ("DR Congo", "DRC", "Congo-Kinshasa", "Democratic Republic of the Congo", "Congo, Democratic Republic of the"),
    "CG": ("Congo-Brazzaville", "Republic of the Congo", "Congo, Republic of the"),
    "CI": ("Ivory Coast", "Cote d'Ivoire"),
    "CZ": ("Czech Republic",),
    "GB": ("UK", "Great Britain", "Britain"),
    "IR": ("Iran (Islamic Republic of)", "Iran, Islamic Republic of"),
    "KP": ("Korea, Democratic People's Republic of", "DPRK", "Korea, North"),
    "KR": ("Korea, Republic of", "Republic of Korea", "Korea, South", "Korea"),
    "LA": ("Lao People's Democratic Republic", "Lao PDR"),
    "MD": ("Moldova, Republic of", "Republic of Moldova"),
    "MK": ("North Macedonia", "Former Yugoslav Republic of Macedonia", "FYROM"),
    "MM": ("Burma",),
    "PS": ("Palestinian Territories", "West Bank and Gaza", "State of Palestine", "Palestine, State of"),
    "RU": ("Russian Federation",),
    "SY": ("Syrian Arab Republic",),
    "SZ": ("Eswatini",),
    "TL": ("East Timor",),
    "TR": ("Türkiye", "Turkiye"),
    "TW": ("Taiwan, Province of China", "Chinese Taipei"),
    "TZ": ("Tanzania, United Republic of", "United Republic of Tanzania"),
    "US": ("United States", "USA", "U.S.A.", "US"),
    "VE": ("Venezuela (Bolivarian Republic of)",),
    "VN": ("Viet Nam",),
    "FM": ("Micronesia (Federated States of)", "Micronesia (FSM)"),
}

# Natural Earth 1:110m Admin-0 *tiny countries* points (label points) for countries with an ISO
# code and no polygon at 1:110m: (iso2, iso3, name, lon, lat).
_TINY_COUNTRY_POINTS: tuple[tuple[str, str, str, float, float], ...] = (
    ("BB", "BRB", "Barbados", -59.554306, 13.174672),
    ("BH", "BHR", "Bahrain", 50.553638, 26.069443),
    ("BM", "BMU", "Bermuda", -64.747978, 32.307222),
    ("CK", "COK", "Cook Islands", -159.789227, -21.220087),
    ("FM", "FSM", "Micronesia", 158.242015, 6.885942),
    ("FO", "FRO", "Faroe Islands", -6.942568, 62.191618),
    ("GS", "SGS", "South Georgia and the Islands", -36.792143, -54.274479),
    ("GU", "GUM", "Guam", 144.770038, 13.459685),
    ("IO", "IOT", "British Indian Ocean Territory", 72.478729, -7.340706),
    ("KI", "KIR", "Kiribati", 173.135158, 1.364258),
    ("KM", "COM", "Comoros", 43.337943, -11.715556),
    ("MH", "MHL", "Marshall Islands", 168.728966, 7.31346),
    ("MP", "MNP", "Northern Mariana Islands", 145.739263, 15.174637),
    ("MT", "MLT", "Malta", 14.438179, 35.882081),
    ("MU", "MUS", "Mauritius", 57.58566, -20.302275),
    ("MV", "MDV", "Maldives", 73.502231, 4.186659),
    ("NR", "NRU", "Nauru", 166.937483, -0.523069),
    ("PF", "PYF", "French Polynesia", -149.475496, -17.625005),
    ("PM", "SPM", "Saint Pierre and Miquelon", -56.315703, 46.857466),
    ("PN", "PCN", "Pitcairn Islands", -128.3178, -24.36414),
    ("PW", "PLW", "Palau", 134.579241, 7.507494),
    ("SG", "SGP", "Singapore", 103.81482, 1.359364),
    ("SH", "SHN", "Saint Helena", -5.716296, -15.963222),
    ("ST", "STP", "São Tomé and Principe", 6.617199, 0.246807),
    ("TC", "TCA", "Turks and Caicos Islands", -71.953904, 21.912993),
    ("TO", "TON", "Tonga", -175.235333, -21.158188),
    ("TV", "TUV", "Tuvalu", 179.203974, -8.499724),
    ("WS", "WSM", "Samoa", -172.41373, -13.63737),
)

_NAME_FIELDS = ("NAME", "NAME_LONG", "ADMIN", "FORMAL_EN", "NAME_SORT", "NAME_ALT", "NAME_CIAWF", "BRK_NAME", "GEOUNIT", "SUBUNIT")


def derive_countries(admin0: Mapping[str, Any],
                     tiny_points: Iterable[tuple[str, str, str, float, float]] = _TINY_COUNTRY_POINTS) -> dict[str, Any]:
    """The shipped ``countries.geojson`` from a Natural Earth 1:110m Admin-0 FeatureCollection.

    One feature per ISO alpha-2 code with only ``iso2``, ``iso3``, ``name``, ``names`` (other
    spellings) and ``approximate``; geometry normalised (split at the antimeridian), snapped to a
    1e-5° grid and rounded to 5 decimals.
    """
    merged: dict[str, dict[str, Any]] = {}
    for feature in admin0["features"]:
        props = feature["properties"]
        iso2, iso3 = _codes(props)
        entry = merged.setdefault(iso2, {"iso3": iso3, "name": None, "names": [], "parts": []})
        if props["ADM0_A3"] not in ("CYN", "SOL"):
            entry["name"] = props["NAME"]
        entry["names"].extend(str(props[k]) for k in _NAME_FIELDS if props.get(k) not in (None, "", -99, "-99"))
        entry["parts"].append(geometry.normalise_geometry(feature["geometry"], max_globe_share=1.0))
    for iso2, iso3, name, lon, lat in tiny_points:
        if iso2 not in merged:
            merged[iso2] = {"iso3": iso3, "name": name, "names": [name], "approximate": True,
                            "parts": [geometry.circle(lat, lon, TINY_COUNTRY_RADIUS_KM)]}
    features = []
    for iso2 in sorted(merged):
        entry = merged[iso2]
        names = [n for n in dict.fromkeys([*entry["names"], *_EXTRA_NAMES.get(iso2, ())]) if n != entry["name"]]
        area = _on_grid(entry["parts"])
        properties: dict[str, Any] = {"iso2": iso2, "iso3": entry["iso3"], "name": entry["name"], "names": names}
        if entry.get("approximate"):
            properties["approximate"] = True
        features.append({"type": "Feature", "properties": properties, "geometry": area})
    return {"type": "FeatureCollection", "features": features}


def _codes(props: Mapping[str, Any]) -> tuple[str, str]:
    fixed = _CODES_BY_ADM0_A3.get(str(props["ADM0_A3"]))
    if fixed is not None:
        return fixed
    iso2, iso3 = str(props["ISO_A2"]), str(props.get("ISO_A3_EH") or props["ISO_A3"])
    if not re.fullmatch(r"[A-Z]{2}", iso2) or not re.fullmatch(r"[A-Z]{3}", iso3):
        raise ValueError(f"no ISO codes for Natural Earth feature {props['ADM0_A3']} ({props.get('NAME')})")
    return iso2, iso3


def _on_grid(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The union of the parts, normalised, with coordinates rounded and still valid."""
    shape = shapely.union_all([shapely.geometry.shape(g) for g in parts])
    for _ in range(5):
        snapped = shapely.set_precision(shape, 10.0 ** -_COORDINATE_DECIMALS)
        area = _rounded(geometry.normalise_geometry(shapely.geometry.mapping(snapped), max_globe_share=1.0))
        shape = shapely.geometry.shape(area)
        if shape.is_valid:
            return area
    raise ValueError(f"could not round the geometry to a valid one: {shapely.is_valid_reason(shape)}")


def _rounded(area: Mapping[str, Any]) -> dict[str, Any]:
    def ring(coords: Sequence[Sequence[float]]) -> list[list[float]]:
        return [[round(x, _COORDINATE_DECIMALS), round(y, _COORDINATE_DECIMALS)] for x, y in coords]

    if area["type"] == "Polygon":
        return {"type": "Polygon", "coordinates": [ring(r) for r in area["coordinates"]]}
    return {"type": "MultiPolygon", "coordinates": [[ring(r) for r in p] for p in area["coordinates"]]}
