"""CAP documents become exactly the crisis/1 events a crisis centre expects, in the right place."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import defusedxml.ElementTree as ET
import pytest
from shapely import make_valid, unary_union
from shapely.geometry import Point, Polygon, shape

from pipeline.domain.feeds import cap
from pipeline.domain.feeds.base import FeedError, ParseContext, ParseResult
from schemas import Crisis, check

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "feeds" / "cap"
SAMPLES = Path(__file__).resolve().parents[3].parent / "shared" / "samples"
NOW = datetime(2024, 9, 15, tzinfo=UTC)


def parse_bytes(data: bytes, **ctx: object) -> ParseResult:
    result = cap.parse(data, ParseContext(now=NOW, **ctx))  # type: ignore[arg-type]
    for event in (*result.events, *result.review):
        check(event.to_dict(), "crisis/1")
    return result


def fixture(name: str, **ctx: object) -> ParseResult:
    return parse_bytes((FIXTURES / name).read_bytes(), **ctx)


def sample(folder: str, name: str, **ctx: object) -> ParseResult:
    path = SAMPLES / folder / name
    if not path.exists():
        pytest.skip(f"shared sample {folder}/{name} not present")
    return parse_bytes(path.read_bytes(), **ctx)


def inside(event: Crisis, lat: float, lon: float) -> bool:
    assert event.geometry is not None
    area = shape(event.geometry)
    assert area.is_valid
    return bool(area.contains(Point(lon, lat)))


def only(result: ParseResult) -> Crisis:
    assert not result.rejected, result.rejected
    [event] = result.events
    return event


# ---- own fixtures -------------------------------------------------------------------------------


def test_polygon_alert_covers_the_flooded_district_and_nothing_far_away() -> None:
    event = only(fixture("cap12_polygon_alert_jakarta_flood.xml"))
    assert event.crisis_id == "cap:alerts@crisiswatch.example:CW-JKT-FL-20240115-001"
    assert (event.op, event.version, event.source) == ("upsert", 1705275000, "cap")
    assert (event.category, event.severity, event.urgency, event.certainty) == ("met", "severe", "immediate", "observed")
    assert event.title == "Flooding in central Jakarta"
    assert event.instruction == "Move to higher floors; avoid crossing flooded roads."
    assert event.url == "https://crisiswatch.example/alerts/CW-JKT-FL-20240115-001"
    assert event.expires == datetime.fromisoformat("2024-01-16T06:30:00+07:00")
    assert event.source_ref == "alerts@crisiswatch.example,CW-JKT-FL-20240115-001,2024-01-15T06:30:00+07:00"
    assert event.country_codes == ("ID",)
    assert event.status == "actual"
    assert inside(event, -6.1754, 106.8272)  # Monas, central Jakarta
    assert not inside(event, -6.9147, 107.6098)  # Bandung


def test_update_lands_on_the_crisis_of_the_original_alert_and_a_radius_zero_circle_is_a_small_area() -> None:
    event = only(fixture("cap12_circle_update_earthquake.xml"))
    assert event.crisis_id == "cap:seismic@crisiswatch.example:CW-EQ-7781.1"
    assert event.op == "upsert"
    assert event.version == int(datetime.fromisoformat("2022-11-21T14:05:00+07:00").timestamp())
    assert event.references == ("seismic@crisiswatch.example,CW-EQ-7781.1,2022-11-21T13:30:00+07:00",
                                "seismic@crisiswatch.example,CW-EQ-7781.2,2022-11-21T13:45:00+07:00")
    assert inside(event, -6.86, 107.01)
    assert not inside(event, -6.86, 107.05)  # ~4.4 km east: outside the minimum circle


def test_cancel_without_info_cancels_the_referenced_crisis_with_no_geometry() -> None:
    event = only(fixture("cap12_cancel_without_info.xml"))
    assert event.crisis_id == "cap:ops@crisiswatch.example:CW-ALERT-0041"
    assert event.op == "cancel"
    assert event.geometry is None
    assert event.version == int(datetime.fromisoformat("2024-03-02T09:15:00-05:00").timestamp())


def test_multilingual_alert_yields_one_event_in_the_preferred_language() -> None:
    english = only(fixture("cap12_multilingual_id_en.xml"))
    indonesian = only(fixture("cap12_multilingual_id_en.xml", language="id"))
    assert english.crisis_id == indonesian.crisis_id == "cap:cap@crisiswatch.example:urn:oid:2.49.0.1.360.0.2024.0611.1"
    assert (english.language, english.title) == ("en-US", "Ruang volcano eruption: 6 km danger zone")
    assert (indonesian.language, indonesian.title) == ("id-ID", "Letusan Gunung Ruang: zona bahaya 6 km")
    assert indonesian.instruction == "Kosongkan zona 6 km dari kawah."
    assert only(fixture("cap12_multilingual_id_en.xml", language="fr")).language == "en-US"  # no French: English
    assert inside(indonesian, 2.30, 125.37) and inside(indonesian, 2.34, 125.37)  # 6 km radius: 4.4 km north is in
    assert not inside(indonesian, 2.40, 125.37)


def test_exercise_is_dropped_unless_exercise_mode_is_on() -> None:
    dropped = fixture("cap12_exercise_polygon.xml")
    assert dropped.events == ()
    [rejection] = dropped.rejected
    assert rejection.item_ref == "CW-DRILL-2024-05"
    assert "Exercise" in rejection.reason
    drill = only(fixture("cap12_exercise_polygon.xml", exercise_mode=True))
    assert drill.status == "exercise"
    assert inside(drill, -0.93, 100.35)  # Padang coast


@pytest.mark.parametrize(("status", "exercise_mode", "kept"), [
    ("Test", False, False), ("Test", True, True), ("Draft", False, False), ("Draft", True, True),
    ("System", True, False), ("Actual", False, True),
])
def test_status_decides_who_sees_an_alert(status: str, exercise_mode: bool, kept: bool) -> None:
    data = (FIXTURES / "cap12_polygon_alert_jakarta_flood.xml").read_bytes().replace(
        b"<status>Actual</status>", f"<status>{status}</status>".encode())
    result = parse_bytes(data, exercise_mode=exercise_mode)
    assert len(result.events) == int(kept)
    assert len(result.rejected) == int(not kept)
    if kept:
        assert result.events[0].status == status.lower()


@pytest.mark.parametrize("msg_type", ["Ack", "Error", ""])
def test_acks_errors_and_missing_message_types_are_rejected(msg_type: str) -> None:
    data = (FIXTURES / "cap12_polygon_alert_jakarta_flood.xml").read_bytes().replace(
        b"<msgType>Alert</msgType>", f"<msgType>{msg_type}</msgType>".encode())
    result = parse_bytes(data)
    assert result.events == ()
    assert "is not an alert, update or cancel" in result.rejected[0].reason


def test_geocode_only_area_is_kept_without_geometry_and_noted() -> None:
    event = only(result := fixture("cap11_geocode_only_empty_polygon.xml"))
    assert event.geometry is None
    assert event.op == "upsert"
    assert event.country_codes == ("US",)  # FIPS6 codes are US county codes
    assert any("left without geometry" in note and "FIPS6 002020" in note for note in result.notes)


def test_iso_country_geocode_resolves_to_the_country_and_other_codes_are_noted() -> None:
    event = only(result := fixture("cap12_iso_country_geocode.xml"))
    assert "TL" in event.country_codes
    assert inside(event, -8.5569, 125.5603)  # Dili
    assert not inside(event, -10.1772, 123.6070)  # Kupang, Indonesian West Timor
    assert any("Unmapped district" in note for note in result.notes)


def test_spiked_polygon_is_repaired_not_dropped_and_both_polygons_count() -> None:
    event = only(fixture("cap12_two_polygons_one_spiked.xml"))
    assert event.geometry is not None and event.geometry["type"] == "MultiPolygon"
    assert inside(event, -8.35, 115.2)  # the spiked Bali polygon, repaired
    assert inside(event, -8.52, 116.10)  # the Lombok polygon
    assert event.language == "en-GB"


def test_tsunami_cancellation_sent_as_update_is_a_cancel_of_the_original_warning() -> None:
    result = fixture("cap12_tsunami_cancellation_as_update.xml")
    event = only(result)
    assert (event.crisis_id, event.op) == ("cap:tsunami@crisiswatch.example:PXFX-1-ab12cd", "cancel")
    assert event.geometry is None
    assert any("emitted as cancel" in note for note in result.notes)


def test_all_clear_update_is_a_cancel_of_the_original_warning() -> None:
    event = only(fixture("cap12_allclear_update_nuts3.xml", language="pt"))
    assert (event.crisis_id, event.op) == ("cap:avisos@crisiswatch.example:2.49.0.0.620.0.PT.20240229160000.7", "cancel")
    assert (event.language, event.title) == ("pt-PT", "Fim do aviso")


def test_edxl_de_envelope_yields_every_alert_and_a_broken_one_does_not_spoil_the_rest() -> None:
    result = fixture("edxlde_three_alerts_one_broken.xml")
    first, bowtie = result.events
    assert first.crisis_id == "cap:fires@crisiswatch.example:2024-09-14T04:10:00-00:00:880001"
    assert (first.category, first.severity, first.country_codes) == ("fire", "severe", ("AU",))
    assert inside(first, -33.55, 150.25)
    # The self-intersecting "bow-tie" is repaired into its two triangles.
    assert bowtie.geometry is not None and bowtie.geometry["type"] == "MultiPolygon"
    assert inside(bowtie, -32.03, 150.10) and inside(bowtie, -32.17, 150.10)
    [rejection] = result.rejected
    assert rejection.item_ref == "2024-09-14T04:30:00-00:00:880003"
    assert "not a date-time" in rejection.reason


def test_legacy_atom_entries_of_one_alert_are_one_event_and_the_ending_update_a_cancel() -> None:
    result = fixture("atom_legacy_inline_cap_nuts3.atom.xml")
    alert, ended = result.events
    assert alert.crisis_id == "cap:warnings.crisiswatch.example:2.49.0.0.620.0.PT.20240229160000.7"
    assert (alert.op, alert.severity, alert.urgency, alert.certainty) == ("upsert", "moderate", "future", "likely")
    assert alert.geometry is None  # NUTS3 regions only: never an invented area
    assert alert.country_codes == ("PT",)
    assert alert.url == "https://crisiswatch.example/api/warnings/pt/7"
    assert alert.title == "Yellow Coastal Event Warning issued for Portugal - Lisboa"
    assert any("PT1A0" in note and "PT16B" in note for note in result.notes)
    assert (ended.op, ended.version) == ("cancel", int(datetime(2024, 3, 1, 8, tzinfo=UTC).timestamp()))


def test_lon_lat_swapped_circles_are_detected_and_placed_in_the_right_country() -> None:
    result = fixture("atom_inline_lonlat_swapped_circles.atom.xml")
    helsinki, lapland = result.events
    assert helsinki.country_codes == ("FI",) and lapland.country_codes == ("FI",)
    assert inside(helsinki, 60.1699, 24.9384)
    assert not inside(helsinki, 24.9384, 60.1699)  # as published: southern Iran
    assert inside(lapland, 66.5039, 25.7294)  # Rovaniemi
    assert sum("swapped" in note for note in result.notes) == 3
    assert helsinki.language is None  # no language given: unknown, not the CAP en-US default


def test_circle_without_country_hints_is_kept_as_published() -> None:
    data = (FIXTURES / "atom_inline_lonlat_swapped_circles.atom.xml").read_bytes().replace(
        b"crisiswatch.fi", b"crisiswatch.example")
    result = parse_bytes(data)
    assert inside(result.events[0], 24.9384, 60.1699)  # no evidence of a swap: CAP order kept
    assert not any("swapped" in note for note in result.notes)


def test_impossible_latitude_is_swapped_even_without_hints() -> None:
    data = (FIXTURES / "cap12_circle_update_earthquake.xml").read_bytes().replace(
        b"<circle>-6.86,107.01 0</circle>", b"<circle>107.01,-6.86 0</circle>")
    result = parse_bytes(data)
    assert inside(result.events[0], -6.86, 107.01)
    assert any("latitude 107.0100 is impossible" in note for note in result.notes)


def test_full_alerts_embedded_in_atom_are_read_and_filtered_by_status() -> None:
    result = fixture("atom_embedded_full_alerts.atom.xml")
    [heat] = result.events
    assert heat.crisis_id == "cap:heat@crisiswatch.example:CW-PH-HEAT-1"
    assert inside(heat, 14.65, 120.98)  # 20 km circle around Manila
    assert [r.item_ref for r in result.rejected] == ["CW-PH-TEST-2"]


def test_absurd_area_rejects_the_alert_with_a_reason() -> None:
    data = (FIXTURES / "cap12_circle_update_earthquake.xml").read_bytes().replace(
        b"<circle>-6.86,107.01 0</circle>", b"<circle>-6.86,107.01 9000</circle>")
    result = parse_bytes(data)
    assert result.events == ()
    assert "globe" in result.rejected[0].reason


def test_not_a_cap_document_is_refused() -> None:
    with pytest.raises(FeedError, match="not a CAP document"):
        parse_bytes(b"<html><body/></html>")


# ---- the shared real-world samples ------------------------------------------------------------


def test_oasis_a2_severe_thunderstorm() -> None:
    event = only(sample("cap", "oasis_cap12_specA2_severe_thunderstorm_polygon_alert.xml"))
    assert event.crisis_id == "cap:KSTO@NWS.NOAA.GOV:KSTO1055887203"
    assert (event.op, event.version, event.severity, event.category) == ("upsert", 1055887020, "severe", "met")
    assert event.instruction == "TAKE COVER IN A SUBSTANTIAL SHELTER UNTIL THE STORM PASSES."
    assert event.expires == datetime.fromisoformat("2003-06-17T16:00:00-07:00")
    assert event.country_codes == ("US",)
    assert inside(event, 38.49, -119.93)
    assert not inside(event, 38.58, -121.49)  # Sacramento


def test_oasis_a3_earthquake_update_with_radius_zero_circle() -> None:
    event = only(sample("cap", "oasis_cap12_specA3_earthquake_circle_update.xml"))
    assert event.crisis_id == "cap:trinet@caltech.edu:TRI13970876.1"
    assert (event.op, event.version, event.severity, event.urgency) == ("upsert", 1055390160, "minor", "past")
    assert event.references == ("trinet@caltech.edu,TRI13970876.1,2003-06-11T20:30:00-07:00",)
    assert event.url == "http://www.trinet.org/scsn/scsn.html"
    assert inside(event, 32.9525, -115.5527)


def test_nws_hurricane_update_with_two_polygons_in_one_area() -> None:
    event = only(sample("cap", "nws_ipaws_hurricane_warning_update_multipolygon_2020-08-26.xml"))
    assert event.crisis_id == "cap:w-nws.webmaster@noaa.gov:NWS-IDP-PROD-4410291-3675936"
    assert (event.op, event.version, event.severity) == ("upsert", 1598433240, "extreme")
    assert len(event.references) == 8
    assert event.geometry is not None and event.geometry["type"] == "MultiPolygon"  # the sliver survives
    assert inside(event, 30.214, -92.374)  # Crowley, Acadia Parish


def test_ipaws_cancel_without_info() -> None:
    event = only(sample("cap", "ipaws_nevada_alertsense_cancel_2019-04-19.xml"))
    assert event.crisis_id == "cap:bbrundage@dps.state.nv.us:AS-NV-e18921c7-1b35-4a81-9705-42d25c265ddd"
    assert (event.op, event.version, event.geometry) == ("cancel", 1555695980, None)


def test_ipaws_montgomery_polygon_with_long_decimals() -> None:
    event = only(sample("cap", "ipaws_montgomery_md_local_area_emergency_polygon_2019-12-13.xml"))
    assert event.crisis_id == "cap:402013233923688:402013233923688"
    assert (event.op, event.version, event.severity, event.category) == ("upsert", 1576272290, "extreme", "geo")
    assert inside(event, 39.084, -77.149)  # Rockville
    assert not inside(event, 38.9, -77.03)  # Washington DC


def test_nws_tsunami_cancellation_sent_as_update() -> None:
    result = sample("cap", "nws_wcatwc_tsunami_cancellation_update_circle_2013-01-05.xml")
    event = only(result)
    assert (event.crisis_id, event.op, event.version) == ("cap:wcatwc@noaa.gov:PAAQ-1-mg5a94", "cancel", 1357383503)
    assert any("VTEC" in note for note in result.notes)


def test_eccc_bilingual_alert_is_one_event_in_the_chosen_language() -> None:
    english = only(sample("cap", "eccc_naad_cap-cp_alert_polygons_2019-07-12.xml"))
    french = only(sample("cap", "eccc_naad_cap-cp_alert_polygons_2019-07-12.xml", language="fr"))
    assert english.crisis_id == french.crisis_id == "cap:cap-pac@canada.ca:urn:oid:2.49.0.1.124.3026064006.2019"
    assert (english.language, french.language) == ("en-CA", "fr-CA")
    assert english.instruction == ""
    assert inside(english, 47.57, -59.14)  # Channel-Port aux Basques


def test_meteoalarm_legacy_atom_geocode_only_entries() -> None:
    result = sample("cap", "meteoalarm_legacy_atom_france_2022-12-08.atom.xml")
    alert, ended = result.events
    assert alert.crisis_id == "cap:meteoalarm.org:2.49.0.0.250.0.FR.20221207160058.764028"
    assert (alert.op, alert.version, alert.severity, alert.geometry) == ("upsert", 1670425258, "moderate", None)
    assert alert.country_codes == ("FR",)
    assert ended.op == "cancel"  # the Update expires the moment it takes effect
    assert any("FR718" in note for note in result.notes)


def test_meteofrance_all_clear_update_cancels_the_referenced_warning() -> None:
    event = only(sample("cap", "meteofrance_via_meteoalarm_cap_update_nuts3_geocodes_2022-12-07.xml", language="fr"))
    assert event.crisis_id == "cap:vigilance@meteo.fr:2.49.0.0.250.0.FR.20221206160108.315028"
    assert (event.op, event.version, event.language) == ("cancel", 1670389286, "fr-FR")


def test_met_eireann_six_polygons_one_with_a_spike_are_repaired_and_united() -> None:
    name = "met_eireann_via_meteoalarm_cap_alert_polygons_2022-12-06.xml"
    result = sample("cap", name)
    event = only(result)
    assert not result.notes  # the spiked polygon #5 is repaired, not refused
    [(polygons, _centres)] = raw_areas(SAMPLES / "cap" / name)
    assert len(polygons) == 6
    assert polygons[4].geom_type == "GeometryCollection"  # make_valid: the ring's area plus its spike
    areal = unary_union([part for p in polygons for part in getattr(p, "geoms", [p]) if part.area > 0])
    assert event.geometry is not None
    assert shape(event.geometry).buffer(1e-6).covers(areal)  # all six areas, the spiked one included
    assert event.crisis_id == "cap:forecasts@met.ie:2.49.0.1.372.0.221206232741.M_LowTemp003"
    assert (event.op, event.version, event.severity) == ("upsert", 1670369261, "moderate")
    assert "IE" in event.country_codes
    for lat, lon in [(53.35, -6.26), (51.90, -8.47), (53.27, -9.05), (54.27, -8.47)]:  # Dublin, Cork, Galway, Sligo
        assert inside(event, lat, lon)
    assert not inside(event, 54.60, -5.93)  # Belfast


def test_krisinformation_swapped_circles_land_in_sweden_not_the_arabian_sea() -> None:
    result = sample("tricky", "krisinformation_se_cap_atom_lonlat_swapped_circles_2018-11-21.atom.xml")
    assert len(result.events) == 4
    assert all(e.country_codes == ("SE",) for e in result.events)
    gavle = result.events[0]
    assert gavle.title == "Viktigt meddelande till allmänheten i Gävle"
    assert inside(gavle, 60.666667, 17.166667)
    assert not inside(gavle, 17.166667, 60.666667)
    assert sum("swapped" in note for note in result.notes) == 7


def raw_areas(path: Path) -> list[tuple[list[Polygon], list[tuple[float, float]]]]:
    """Per CAP alert of a document: its polygons (repaired independently, lon,lat) and circle centres (lat,lon)."""
    out = []
    for alert in ET.parse(path).getroot().iter("{urn:oasis:names:tc:emergency:cap:1.2}alert"):
        polygons = [make_valid(Polygon([(float(p.split(",")[1]), float(p.split(",")[0])) for p in (el.text or "").split()]))
                    for el in alert.iter("{urn:oasis:names:tc:emergency:cap:1.2}polygon")]
        centres = [(float(c.split()[0].split(",")[0]), float(c.split()[0].split(",")[1]))
                   for c in (el.text or "" for el in alert.iter("{urn:oasis:names:tc:emergency:cap:1.2}circle"))]
        out.append((polygons, centres))
    return out


def test_nsw_rfs_edxl_de_envelope_with_self_intersecting_polygons() -> None:
    name = "nsw_rfs_edxl-de_cap_bushfire_selfintersecting_polygons_2014-11-10.xml"
    result = sample("tricky", name)
    assert len(result.events) == 59 and not result.rejected
    assert not any("refused" in note for note in result.notes)  # every polygon repaired, none dropped
    assert all(e.country_codes == ("AU",) and e.op == "upsert" for e in result.events)
    by_title = {e.title: e for e in result.events}
    assert inside(by_title["Barham Rd, Barham"], -35.5807, 144.2342)  # the radius-0 incident point
    for event, (polygons, centres) in zip(result.events, raw_areas(SAMPLES / "tricky" / name), strict=True):
        for lat, lon in centres:
            assert inside(event, lat, lon), event.title
        for polygon in polygons:  # including Cliff Dr, Katoomba and Edwards Trl, Balickera, the invalid ones
            point = polygon.representative_point()
            assert inside(event, point.y, point.x), event.title


def test_nws_cap11_blizzard_with_empty_polygon() -> None:
    result = sample("tricky", "nws_cap11_blizzard_warning_empty_polygon_2021-12-27.xml")
    event = only(result)
    assert (event.op, event.severity, event.geometry) == ("upsert", "severe", None)
    assert event.crisis_id.startswith("cap:w-nws.webmaster@noaa.gov:")
    assert any("left without geometry" in note for note in result.notes)


def test_feed_without_cap_content_is_refused() -> None:
    with pytest.raises(FeedError, match="not a CAP feed"):
        parse_bytes(b'<rss version="2.0"><channel><item><title>Gempa</title></item></channel></rss>')
    assert parse_bytes(b'<feed xmlns="http://www.w3.org/2005/Atom"><title>quiet</title></feed>').events == ()
