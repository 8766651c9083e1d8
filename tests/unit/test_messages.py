"""The messages a citizen receives: every kind in both languages, escaping, SMS segments, the embassy directory."""

from __future__ import annotations

import dataclasses
import html as html_lib
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import get_args

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.messages import (
    Embassy,
    EmbassyDirectory,
    EmbassyDirectoryError,
    Recipient,
    available_languages,
    language_for,
    render,
    sms_segments,
)
from pipeline.settings import Settings
from schemas import Warning
from schemas.models import WarningKind

KINDS: tuple[WarningKind, ...] = get_args(WarningKind)
REPLY_URL = "https://crisis.example.org/r/7Hq2kP9xVbN4sLwE3mZt"
KEYWORDS = {"id": ("AMAN", "TOLONG"), "en": ("SAFE", "HELP")}
MISSION = Embassy("MY", "KBRI Kuala Lumpur (sample)", "+60-3-0000-0000", "kualalumpur@embassy.example.org")


def warning(kind: WarningKind = "inside", *, title: str = "Banjir bandang Kuala Lumpur", distance_km: float = 0.0,
            instruction: str = "Move to higher ground and keep away from rivers.",
            country_codes: tuple[str, ...] = ("MY",)) -> Warning:
    at = datetime(2025, 3, 4, 10, 6, tzinfo=UTC)
    return Warning("w-1", "c-1", "kl-flood", 1, kind, "severe", title, instruction, distance_km, 3.14, 101.69, at, at,
                   country_codes)


def citizen(language: str) -> Recipient:
    return Recipient("c-1", "Siti Aminah", language)


# --- every kind, both languages ----------------------------------------------------------------


@pytest.mark.parametrize("language", ["id", "en"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_renders_in_both_languages_with_all_a_citizen_needs(kind: WarningKind, language: str) -> None:
    w = warning(kind, distance_km=4.2 if kind in ("near", "exited") else 0.0)
    m = render(w, citizen(language), embassy=MISSION, reply_url=REPLY_URL)
    assert m.language == language
    assert w.title in m.subject
    for body in (m.text, html_lib.unescape(m.html)):
        assert w.title in body
        assert w.instruction in body
        assert "Malaysia" in body
        assert MISSION.name in body and MISSION.phone in body and MISSION.email in body
        assert REPLY_URL in body
        assert all(keyword in body for keyword in KEYWORDS[language])
    assert f'href="{REPLY_URL}"' in m.html
    assert f'<html lang="{language}">' in m.html
    # The SMS keeps what a citizen acts on: the keywords, the link, the mission's number.
    assert all(keyword in m.sms for keyword in KEYWORDS[language])
    assert REPLY_URL in m.sms and MISSION.phone in m.sms
    assert m.sms_segments == sms_segments(m.sms) <= 2


def test_the_two_languages_say_different_things() -> None:
    w = warning("entered")
    indonesian = render(w, citizen("id"), embassy=MISSION, reply_url=REPLY_URL)
    english = render(w, citizen("en"), embassy=MISSION, reply_url=REPLY_URL)
    assert "Anda telah memasuki wilayah terdampak" in indonesian.text
    assert "You have entered the area affected by" in english.text
    assert indonesian.subject != english.subject


@pytest.mark.parametrize(("tag", "expected"), [("id", "id"), ("id-ID", "id"), ("ID_id", "id"), ("in", "id"),
                                               ("en-GB", "en"), ("fr", "en"), ("fr-FR", "en"), ("", "en"),
                                               ("x-klingon", "en")])
def test_the_primary_subtag_chooses_and_english_is_the_fallback(tag: str, expected: str) -> None:
    assert language_for(tag) == expected
    assert render(warning(), citizen(tag), embassy=None, reply_url=None).language == expected


def test_a_french_speaker_reads_english() -> None:
    m = render(warning("near", distance_km=3), citizen("fr"), embassy=MISSION, reply_url=REPLY_URL)
    assert m.language == "en"
    assert "You are 3 km from the area affected by" in m.text
    assert "Reply SAFE" in m.sms


def test_both_languages_ship_templates() -> None:
    assert {"id", "en"} <= available_languages()


# --- where and how far ----------------------------------------------------------------------------


def test_the_country_is_named_in_the_citizens_language() -> None:
    w = warning(country_codes=("JP", "SA"))
    assert "Jepang dan Arab Saudi" in render(w, citizen("id"), embassy=None, reply_url=None).text
    assert "Japan and Saudi Arabia" in render(w, citizen("en"), embassy=None, reply_url=None).text


def test_a_warning_without_countries_still_reads_as_a_sentence() -> None:
    m = render(warning("inside", country_codes=()), citizen("en"), embassy=None, reply_url=None)
    assert "You are inside the area affected by Banjir bandang Kuala Lumpur." in m.text


@pytest.mark.parametrize(("km", "indonesian", "english"), [
    (1234.56, "1.235 km", "1,235 km"),
    (3.456, "3,5 km", "3.5 km"),
    (0.437, "440 m", "440 m"),
    (0.001, "10 m", "10 m"),
])
def test_distances_follow_the_language_and_never_read_zero(km: float, indonesian: str, english: str) -> None:
    w = warning("near", distance_km=km)
    assert f"Anda berada {indonesian} dari" in render(w, citizen("id"), embassy=None, reply_url=None).text
    assert f"You are {english} from" in render(w, citizen("en"), embassy=None, reply_url=None).text


@pytest.mark.parametrize("kind", ["inside", "entered", "all_clear"])
def test_no_distance_where_it_means_nothing(kind: WarningKind) -> None:
    m = render(warning(kind, distance_km=0.0), citizen("en"), embassy=MISSION, reply_url=REPLY_URL)
    assert " km" not in m.text.replace(MISSION.email, "")
    assert "0.00" not in m.text and "0.0 km" not in m.sms


def test_near_at_no_distance_says_near_not_zero() -> None:
    m = render(warning("near", distance_km=0.0), citizen("en"), embassy=None, reply_url=None)
    assert "You are near the area affected by" in m.text
    assert "0 km" not in m.text and "0 m " not in m.text


def test_the_issue_time_follows_the_language() -> None:
    assert "4 Mar 2025, 10:06 UTC" in render(warning(), citizen("id"), embassy=None, reply_url=None).text
    assert "Dikeluarkan" in render(warning(), citizen("id"), embassy=None, reply_url=None).text


def test_without_a_mission_or_link_the_message_still_says_how_to_reply() -> None:
    m = render(warning(), citizen("id"), embassy=None, reply_url=None)
    assert "Balas AMAN" in m.text and "TOLONG" in m.sms
    assert "Perwakilan RI" not in m.text and "href=" not in m.html.split("<body", 1)[1].replace('href="tel', "")


# --- HTML escaping ------------------------------------------------------------------------------


@pytest.mark.parametrize("language", ["id", "en"])
@pytest.mark.parametrize("kind", KINDS)
def test_html_escapes_what_comes_from_outside(kind: WarningKind, language: str) -> None:
    hostile = '<script>alert("x")</script> & <b>'
    w = warning(kind, title=f"Flood {hostile}", instruction=f"Go {hostile}", distance_km=2.0)
    m = render(w, Recipient("c-1", f"Siti {hostile}", language), embassy=MISSION,
               reply_url='https://crisis.example.org/r/a?b=1&c="2"')
    assert "<script" not in m.html and "<b>" not in m.html
    assert "&lt;script&gt;" in m.html
    assert 'href="https://crisis.example.org/r/a?b=1&amp;c=&#34;2&#34;"' in m.html
    # The plain-text forms carry the words as they are, unescaped.
    assert hostile in m.text and "&lt;" not in m.text and "&lt;" not in m.subject


def test_a_reply_link_that_is_not_http_is_refused() -> None:
    with pytest.raises(ValueError, match="http"):
        render(warning(), citizen("en"), embassy=None, reply_url="javascript:alert(1)")


# --- SMS segments ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "segments"), [
    ("", 1),
    ("a" * 160, 1),
    ("a" * 161, 2),
    ("a" * 306, 2),
    ("a" * 307, 3),
    ("Anda berada di dalam wilayah terdampak. Balas AMAN atau TOLONG." * 2, 1),  # Indonesian is GSM-7
    ("é" * 160, 1),  # in the GSM basic table
    ("€" * 80, 1),  # extension table: two septets each
    ("€" * 81, 2),
    ("[" * 76 + "a", 1),  # 153 septets
    ("a" * 152 + "€" + "a" * 7, 2),  # 161 septets: concatenated, the escape pair is not split
    ("a" * 152 + "€" + "a" * 153, 3),  # the pair moves to the second segment and pushes one septet on
    ("ç" + "a" * 69, 1),  # ç is not GSM-7 (only Ç is): UCS-2, 70 in one
    ("ç" + "a" * 70, 2),
    ("ç" + "a" * 133, 2),  # 134 = 2 × 67
    ("ç" + "a" * 134, 3),
    ("😀" * 35, 1),  # an emoji takes two UTF-16 units
    ("😀" * 36, 2),
    ("a" * 66 + "😀" + "a" * 4, 2),  # 72 units concatenated: the surrogate pair is not split, 66 + (2 + 4)
    ("Gempa M7,1 — segera menjauh" + "a" * 50, 2),  # an em dash alone makes it UCS-2
])
def test_segments_are_counted_as_phones_count_them(text: str, segments: int) -> None:
    assert sms_segments(text) == segments


@pytest.mark.parametrize("max_segments", [1, 2, 3])
@pytest.mark.parametrize("language", ["id", "en"])
def test_a_long_sms_is_cut_within_the_limit_keeping_the_reply_and_link(max_segments: int, language: str) -> None:
    long = "Evacuate now to the nearest shelter, bring water, documents and medicine, and follow the police. " * 8
    m = render(warning("near", distance_km=12.0, instruction=long), citizen(language), embassy=MISSION,
               reply_url=REPLY_URL, sms_max_segments=max_segments)
    assert m.sms_segments == sms_segments(m.sms) <= max_segments
    assert REPLY_URL in m.sms and all(k in m.sms for k in KEYWORDS[language])
    assert "..." in m.sms  # GSM-7 stays GSM-7: the one-character ellipsis is not in its alphabet
    assert sms_segments(m.sms) == sms_segments(m.sms.replace("é", "e"))  # still counted as GSM-7
    assert re.search(r"\w\.\.\. ", m.sms), "cut at a word, not mid-punctuation"
    # A longer limit keeps more of the explanation.
    if max_segments > 1:
        shorter = render(warning("near", distance_km=12.0, instruction=long), citizen(language), embassy=MISSION,
                         reply_url=REPLY_URL, sms_max_segments=max_segments - 1)
        assert len(m.sms) > len(shorter.sms)


def test_typographic_characters_do_not_force_ucs2() -> None:
    w = warning(title="Gempa M7,1 — “Sulawesi Tengah”", instruction="Jauhi pantai… segera.")
    m = render(w, citizen("id"), embassy=MISSION, reply_url=REPLY_URL, sms_max_segments=2)
    assert '- "Sulawesi Tengah"' in m.sms and "pantai... segera" in m.sms
    assert m.sms.encode("gsm03.38")  # GSM-7 throughout


def test_a_ucs2_sms_is_cut_with_the_unicode_ellipsis_and_still_fits() -> None:
    w = warning(title="Gempa 🌋 Sulawesi", instruction="Segera menuju tempat tinggi dan jauhi pantai. " * 6)
    m = render(w, citizen("id"), embassy=MISSION, reply_url=REPLY_URL, sms_max_segments=3)
    assert "🌋" in m.sms and "…" in m.sms
    assert m.sms_segments == sms_segments(m.sms) == 3
    assert REPLY_URL in m.sms and "AMAN" in m.sms


def test_a_cut_that_drops_the_only_ucs2_character_makes_room_for_more() -> None:
    # Two UCS-2 segments leave no room for the volcano before the link; cut just before it, the body
    # is GSM-7 again and keeps the whole headline (which UCS-2 would have cut at "terdampak").
    w = warning(title="Gempa Sulawesi Tengah 🌋", instruction="Segera menuju tempat tinggi dan jauhi pantai. " * 6)
    m = render(w, citizen("id"), embassy=MISSION, reply_url=REPLY_URL, sms_max_segments=2)
    assert m.sms.startswith("Anda berada di dalam wilayah terdampak Gempa Sulawesi Tengah... Balas AMAN")
    assert m.sms.encode("gsm03.38") and m.sms_segments <= 2


def test_when_room_is_short_the_mission_gives_way_before_the_link() -> None:
    w = warning(title="T" * 60, instruction="I" * 300)
    long_link = "https://crisis.example.org/reply/" + "x" * 70
    m = render(w, citizen("en"), embassy=MISSION, reply_url=long_link, sms_max_segments=1)
    assert m.sms_segments == 1
    assert long_link in m.sms and "Reply SAFE or HELP" in m.sms
    assert MISSION.phone not in m.sms


def test_a_link_too_long_for_the_limit_still_yields_a_body_within_it() -> None:
    huge_link = "https://crisis.example.org/reply/" + "x" * 400
    m = render(warning(), citizen("en"), embassy=MISSION, reply_url=huge_link, sms_max_segments=1)
    assert m.sms_segments == 1 and m.sms.startswith("Reply SAFE or HELP: https://crisis.example.org/reply/xxx")


def test_the_explanation_keeps_what_fits_when_the_mission_has_gone() -> None:
    link = "https://crisis.example.org/reply/" + "x" * 60
    m = render(warning(title="T" * 60, instruction="I" * 300), citizen("en"), embassy=MISSION, reply_url=link,
               sms_max_segments=1)
    assert m.sms.startswith("You are inside the area") and m.sms.endswith(f"Reply SAFE or HELP: {link}")
    assert m.sms_segments == 1


def test_sms_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="sms_max_segments"):
        render(warning(), citizen("en"), embassy=None, reply_url=None, sms_max_segments=0)


@settings(max_examples=60, deadline=None)
@given(title=st.text(min_size=1, max_size=120), instruction=st.text(max_size=600),
       language=st.sampled_from(["id", "en", "fr"]), max_segments=st.integers(1, 4))
def test_any_words_render_and_the_sms_fits(title: str, instruction: str, language: str, max_segments: int) -> None:
    m = render(warning("near", title=title, instruction=instruction, distance_km=7.5), citizen(language),
               embassy=MISSION, reply_url=REPLY_URL, sms_max_segments=max_segments)
    assert m.sms_segments == sms_segments(m.sms) <= max_segments
    assert REPLY_URL in m.sms


# --- the embassy directory ------------------------------------------------------------------------


def test_the_shipped_sample_loads_with_fake_contacts_only() -> None:
    directory = EmbassyDirectory.load()
    assert len(directory) >= 5
    malaysia = directory.for_country("my")
    assert malaysia is not None and malaysia.country == "MY" and "Kuala Lumpur" in malaysia.name
    for mission in directory.by_country.values():
        assert mission.email.endswith("example.org")
        assert mission.phone.endswith("000-0000")
    assert directory.for_country(None) is None and directory.for_country("") is None
    assert directory.for_country("ZZ") is None


def test_a_configured_directory_is_loaded_from_its_file(tmp_path: Path) -> None:
    path = tmp_path / "missions.toml"
    path.write_text('[[mission]]\ncountry = "jp"\nname = "KBRI Tokyo"\nphone = "+81 3 0000 0000"\n'
                    'email = "tokyo@example.org"\n', encoding="utf-8")
    directory = EmbassyDirectory.load(path)
    assert directory.for_country("JP") == Embassy("JP", "KBRI Tokyo", "+81 3 0000 0000", "tokyo@example.org")
    assert Settings.from_env({"CRISISWATCH_EMBASSY_DIRECTORY": str(path)}).embassy_directory == path
    assert Settings.from_env({}).embassy_directory is None
    assert Settings.from_env(Settings(embassy_directory=path).env()).embassy_directory == path


GOOD = 'country = "JP"\nname = "KBRI Tokyo"\nphone = "+81-3-0000-0000"\nemail = "tokyo@example.org"\n'


@pytest.mark.parametrize(("text", "message"), [
    ("[[mission]\n", "not valid TOML"),
    ("", "no \\[\\[mission\\]\\] entries"),
    ('[embassy]\nname = "x"\n', "unknown top-level key"),
    ("mission = 3\n", "no \\[\\[mission\\]\\] entries"),
    (f"[[mission]]\n{GOOD}fax = \"1\"\n", "mission 1: unknown key\\(s\\) \\['fax'\\]"),
    ('[[mission]]\ncountry = "JP"\nname = "KBRI Tokyo"\n', "mission 1: missing email, phone"),
    (f"[[mission]]\n{GOOD.replace('KBRI Tokyo', ' ')}", "mission 1: name must be a non-empty string"),
    ("[[mission]]\n" + GOOD.replace('"JP"', '"XX"'), "country 'XX' is not an ISO 3166-1 alpha-2 code"),
    ("[[mission]]\n" + GOOD.replace('"JP"', '"JPN"'), "country 'JPN' is not an ISO 3166-1 alpha-2 code"),
    ("[[mission]]\n" + GOOD.replace('"JP"', "81"), "country must be a non-empty string, got 81"),
    (f"[[mission]]\n{GOOD.replace('+81-3-0000-0000', 'call us')}", "\\(JP\\): phone 'call us' is not a phone number"),
    (f"[[mission]]\n{GOOD.replace('tokyo@example.org', 'tokyo.example.org')}", "email 'tokyo.example.org' is not an e-mail"),
    (f"[[mission]]\n{GOOD}\n[[mission]]\n{GOOD.replace('KBRI Tokyo', 'KJRI Osaka')}",
     "mission 2: country JP is already covered by 'KBRI Tokyo'"),
])
def test_a_bad_directory_is_refused_naming_file_entry_and_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "missions.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(EmbassyDirectoryError, match=message) as caught:
        EmbassyDirectory.load(path)
    assert str(path) in str(caught.value)


def test_a_missing_directory_file_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(EmbassyDirectoryError, match=r"missing\.toml: cannot read it"):
        EmbassyDirectory.load(tmp_path / "missing.toml")


def test_results_are_immutable() -> None:
    m = render(warning(), citizen("en"), embassy=MISSION, reply_url=REPLY_URL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.sms = "x"  # type: ignore[misc]
