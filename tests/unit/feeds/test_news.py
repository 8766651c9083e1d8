"""News feeds: crises are recognised in English and Indonesian, placed by the offline gazetteer, and
low-confidence items go to an operator instead of citizens."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from geopy.geocoders.base import Geocoder
from geopy.location import Location
from shapely.geometry import Point, shape

from pipeline.domain.countries import country_geometry
from pipeline.domain.feeds import news
from pipeline.domain.feeds.base import FeedError, ParseContext, ParseResult
from producers.feeds.geocoding import OfflineGazetteer, make_geocoder, normalise_name
from schemas import Crisis, check

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "feeds"
SAMPLES = Path(__file__).resolve().parents[3].parent / "shared" / "samples"
NOW = datetime(2024, 10, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def gazetteer() -> OfflineGazetteer:
    return OfflineGazetteer()


def parse(name: str, gazetteer: object, **ctx: object) -> ParseResult:
    data = (FIXTURES / "news" / name).read_bytes()
    result = news.parse(data, ParseContext(now=NOW, geocoder=gazetteer, **ctx))  # type: ignore[arg-type]
    for event in (*result.events, *result.review):
        check(event.to_dict(), "crisis/1")
    return result


def by_title(events: tuple[Crisis, ...]) -> dict[str, Crisis]:
    return {e.title: e for e in events}


def inside(event: Crisis, lat: float, lon: float) -> bool:
    assert event.geometry is not None
    return bool(shape(event.geometry).contains(Point(lon, lat)))


# ---- the offline gazetteer --------------------------------------------------------------------


def test_gazetteer_is_a_geopy_geocoder_returning_locations(gazetteer: OfflineGazetteer) -> None:
    assert isinstance(gazetteer, Geocoder)
    found = gazetteer.geocode("Cianjur")
    assert isinstance(found, Location)
    assert found.address == "Cianjur, Indonesia"
    assert found.latitude == pytest.approx(-6.82, abs=0.05) and found.longitude == pytest.approx(107.14, abs=0.05)
    assert found.raw["feature"] == "city" and found.raw["country_code"] == "ID"
    assert gazetteer.geocode("Xyzzyville") is None


def test_gazetteer_ranking_exact_names_countries_and_population(gazetteer: OfflineGazetteer) -> None:
    def address(query: str) -> str | None:
        found = gazetteer.geocode(query)
        assert found is None or isinstance(found, Location)
        return None if found is None else str(found.address)

    assert address("Gavle") == "Gävle, Sweden"  # accents ignored
    assert address("Reading") == "Reading, United Kingdom"  # the largest Reading first
    assert address("Bombay") == "Mumbai, India"  # an alternate name, when no city is called that
    assert address("Singapore") == "Singapore"  # the country before the city of the same name
    assert address("Palu, Indonesia") == "Palu, Indonesia"
    assert address("Palu, ID") == "Palu, Indonesia"
    assert address("Palu, Turkey") is None
    readings = gazetteer.geocode("Reading", exactly_one=False)
    assert isinstance(readings, list) and len(readings) > 1


def test_country_point_lies_inside_the_country(gazetteer: OfflineGazetteer) -> None:
    indonesia = gazetteer.geocode("Indonesia")
    assert isinstance(indonesia, Location) and indonesia.raw["feature"] == "country"
    area = country_geometry("ID")
    assert area is not None and shape(area).contains(Point(indonesia.longitude, indonesia.latitude))


def test_make_geocoder_defaults_offline_and_builds_geopy_services_by_name() -> None:
    assert isinstance(make_geocoder(), OfflineGazetteer)
    assert isinstance(make_geocoder("offline"), OfflineGazetteer)
    nominatim = make_geocoder("nominatim")
    assert type(nominatim).__name__ == "Nominatim"  # built, not called: no network in unit tests
    with pytest.raises(ValueError, match="unknown geocoder"):
        make_geocoder("no-such-service")


def test_names_are_normalised_for_matching() -> None:
    assert normalise_name("  Gävle ") == "gavle"
    assert normalise_name("Nord-Kivu") == "nord kivu"


# ---- classification and placement -------------------------------------------------------------


def test_english_items_are_classified_placed_and_scored(gazetteer: OfflineGazetteer) -> None:
    result = parse("rss_en_home_mixed.xml", gazetteer)
    events, review = by_title(result.events), by_title(result.review)
    assert set(events) == {"Earthquake kills dozens in Cianjur", "Flooding hits Semarang as rivers burst their banks"}
    quake = events["Earthquake kills dozens in Cianjur"]
    assert (quake.source, quake.op, quake.category, quake.certainty) == ("rss", "upsert", "geo", "likely")
    assert quake.country_codes == ("ID",)
    assert quake.version == int(datetime(2022, 11, 21, 9, 30, tzinfo=UTC).timestamp())
    assert quake.url == "https://news.crisiswatch.example/world-asia-101?at_medium=RSS&at_campaign=FIXTURE"
    assert quake.source_ref == "https://news.crisiswatch.example/world-asia-101"
    assert quake.language == "en-gb"
    assert quake.expires == quake.effective + news.NEWS_TTL
    assert inside(quake, -6.82, 107.14)  # Cianjur
    assert inside(quake, -6.60, 106.80)  # Bogor, ~50 km away: inside the earthquake search radius
    assert not inside(quake, -6.99, 110.42)  # Semarang, 360 km away
    flood = events["Flooding hits Semarang as rivers burst their banks"]
    assert flood.category == "met" and inside(flood, -6.99, 110.42)
    # La Palma is also a town in California: the item names Spain, so Spain it is, for an operator to check.
    volcano = review["Volcano erupts on La Palma, Spain's prime minister says"]
    assert volcano.country_codes == ("ES",)
    assert volcano.certainty == "possible"
    assert "Storm warnings: what the colours mean" in review  # a hazard in a title but no place: reviewed
    assert review["Storm warnings: what the colours mean"].geometry is None
    assert by_title(result.review)["No tsunami threat after strong quake off Japan"].category == "geo"
    assert "Premier League: late winner settles derby" not in events | review


def test_indonesian_items_are_classified_and_placed(gazetteer: OfflineGazetteer) -> None:
    result = parse("rss_id_berita.xml", gazetteer)
    events, review = by_title(result.events), by_title(result.review)
    assert set(events) == {"Gempa M5,6 guncang Cianjur, 162 orang tewas", "Banjir di Semarang, ribuan warga mengungsi"}
    gempa = events["Gempa M5,6 guncang Cianjur, 162 orang tewas"]
    assert (gempa.category, gempa.language) == ("geo", "id")
    assert inside(gempa, -6.82, 107.14)
    banjir = events["Banjir di Semarang, ribuan warga mengungsi"]
    assert banjir.category == "met" and inside(banjir, -6.99, 110.42)
    assert review["Letusan Gunung Semeru, status Awas"].category == "geo"  # the volcano is not a town
    # "tsunami" is negated; the earthquake is not, but "laut Banda" is the Banda Sea, not Banda in India.
    banda = review["Tidak ada potensi tsunami dari gempa di laut Banda"]
    assert banda.geometry is None
    assert "Harga beras naik menjelang akhir tahun" not in events | review


def test_atom_news_is_read_too(gazetteer: OfflineGazetteer) -> None:
    result = parse("atom_en_wildfire.atom.xml", gazetteer)
    [fire] = result.events
    assert (fire.title, fire.category, fire.country_codes) == ("Wildfire forces evacuations near Canberra", "fire", ("AU",))
    assert fire.language == "en-AU"
    assert fire.version == int(datetime(2024, 1, 10, 5, 40, tzinfo=UTC).timestamp())  # updated, not published
    assert inside(fire, -35.28, 149.13)
    assert result.review == ()


def test_quiet_feed_yields_nothing(gazetteer: OfflineGazetteer) -> None:
    result = parse("rss_quiet_no_cyclones.xml", gazetteer)
    assert (result.events, result.review, result.rejected) == ((), (), ())


def test_nhc_quiet_sample_yields_nothing(gazetteer: OfflineGazetteer) -> None:
    path = SAMPLES / "news" / "nhc_atlantic_index-at_rss_2024-09-02.xml"
    if not path.exists():
        pytest.skip("NHC sample not present")
    result = news.parse(path.read_bytes(), ParseContext(now=NOW, geocoder=gazetteer))
    assert (result.events, result.review, result.rejected) == ((), (), ())


def test_bbc_la_palma_sample_when_present(gazetteer: OfflineGazetteer) -> None:
    path = SAMPLES / "news" / "bbc_news_home_rss_2021-09-20_la_palma_volcano.xml"
    if not path.exists():
        pytest.skip("BBC sample not present")
    result = news.parse(path.read_bytes(), ParseContext(now=NOW, geocoder=gazetteer))
    volcano = [e for e in (*result.events, *result.review) if "volcano" in e.title.lower() or "eruption" in e.title.lower()]
    assert volcano
    assert all(e.category == "geo" and "US" not in e.country_codes for e in volcano)


def test_without_a_geocoder_only_countries_are_located() -> None:
    result = parse("rss_en_home_mixed.xml", None)
    assert result.events == ()  # nothing can be placed precisely enough for citizens
    review = by_title(result.review)
    assert review["Earthquake kills dozens in Cianjur"].geometry is None
    assert review["No tsunami threat after strong quake off Japan"].country_codes == ("JP",)


def test_confidence_threshold_is_configurable(gazetteer: OfflineGazetteer) -> None:
    strict = parse("rss_en_home_mixed.xml", gazetteer, min_confidence=0.95)
    assert strict.events == () and len(strict.review) == 5
    lenient = parse("rss_en_home_mixed.xml", gazetteer, min_confidence=0.3)
    assert len(lenient.events) == 5 and lenient.review == ()


class FailingGeocoder:
    """A geocoder whose service is down (the failure a network geocoder really raises)."""

    def geocode(self, query: str) -> Location | None:
        from geopy.exc import GeocoderUnavailable
        raise GeocoderUnavailable("service unavailable")


def test_a_failing_geocoder_never_breaks_the_feed() -> None:
    result = parse("rss_en_home_mixed.xml", FailingGeocoder())
    assert result.events == () and len(result.review) == 5
    assert any("geocoder failed" in note for note in result.notes)


def test_hostile_news_xml_is_refused_before_feedparser_sees_it() -> None:
    with pytest.raises(FeedError, match="external entity"):
        news.parse((FIXTURES / "hostile" / "xxe_http.xml").read_bytes(), ParseContext(now=NOW))


@pytest.mark.parametrize(("title", "expected"), [
    ("Earthquake hits Lombok", "earthquake"),
    ("Quake triggers tsunami warning", "tsunami"),
    ("Floods displace thousands", "flood"),
    ("Kebakaran hutan meluas di Riau", "wildfire"),
    ("Kebakaran pasar di Medan", "fire"),
    ("Erupsi Gunung Merapi", "volcano"),
    ("Typhoon makes landfall", "cyclone"),
    ("There are no tropical cyclones at this time.", None),
    ("Tidak ada gempa susulan", None),
    ("Ceasefire holds in the north", None),
    ("Stock markets rally", None),
])
def test_hazard_keywords(title: str, expected: str | None) -> None:
    hazard = news.hazard_of(title)
    assert (hazard.name if hazard else None) == expected
